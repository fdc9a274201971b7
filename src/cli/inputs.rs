//! Image inputs given on the command line: files and directories (recursed, image files by
//! extension, sorted), and unique output names for each.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use metauas::{Error, Result};

/// File extensions read as images (case-insensitive).
const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];
/// Directory levels followed below a `--query DIR`; deeper trees are refused, not truncated.
const MAX_DEPTH: usize = 32;
/// Images one command may take (a typo like `--query /` must fail fast, not list a disk).
pub const MAX_INPUTS: usize = 1_000_000;

/// One image to process and the name its outputs get (`stem` may hold `/`: a mirrored path).
#[derive(Clone, Debug)]
pub struct ImageInput {
    pub path: PathBuf,
    pub name: String,
}

/// Expands files and directories into image files, in argument order, each directory's images
/// sorted by path. The same file named twice is taken once.
pub fn expand(args: &[PathBuf], flag: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for arg in args {
        let meta = std::fs::metadata(arg).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::at(arg, "no such file or directory"),
            _ => Error::at(arg, format!("cannot read: {e}")),
        })?;
        if meta.is_dir() {
            let before = files.len();
            walk(arg, 0, &mut files)?;
            files[before..].sort();
            if files.len() == before {
                return Err(Error::at(
                    arg,
                    format!(
                        "{flag} directory holds no image files ({})",
                        IMAGE_EXTENSIONS.join(", ")
                    ),
                ));
            }
        } else {
            files.push(arg.clone());
        }
        if files.len() > MAX_INPUTS {
            return Err(Error::at(
                arg,
                format!("more than {MAX_INPUTS} images for {flag}"),
            ));
        }
    }
    let mut seen = HashSet::new();
    files.retain(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())));
    Ok(files)
}

fn walk(dir: &Path, depth: usize, files: &mut Vec<PathBuf>) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::at(
            dir,
            format!("directory tree deeper than {MAX_DEPTH} levels"),
        ));
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::at(dir, format!("cannot list: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::at(dir, format!("cannot list: {e}")))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        // file_type() does not follow symlinks: a linked directory is not entered (no loops),
        // a linked file is read if its name says image.
        let kind = entry
            .file_type()
            .map_err(|e| Error::at(&path, format!("cannot stat: {e}")))?;
        if hidden {
            continue;
        }
        if kind.is_dir() {
            walk(&path, depth + 1, files)?;
        } else if is_image_name(&path) {
            files.push(path);
        }
        if files.len() > MAX_INPUTS {
            return Err(Error::at(
                dir,
                format!("holds more than {MAX_INPUTS} images"),
            ));
        }
    }
    Ok(())
}

pub fn is_image_name(path: &Path) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// Output names: the file stem, unless several inputs share it; those get their path relative
/// to the inputs' common parent directory (without the extension), mirrored under `--out`.
pub fn name_inputs(files: Vec<PathBuf>) -> Result<Vec<ImageInput>> {
    let mut stems = Vec::with_capacity(files.len());
    let mut count: HashMap<String, usize> = HashMap::new();
    for f in &files {
        let stem = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::at(f, "path has no file name"))?;
        *count.entry(stem.clone()).or_default() += 1;
        stems.push(stem);
    }
    let absolute: Vec<PathBuf> = files.iter().map(|f| absolute(f)).collect();
    let root = common_parent(&absolute);
    let mut inputs = Vec::with_capacity(files.len());
    for ((path, stem), abs) in files.into_iter().zip(stems).zip(&absolute) {
        let name = if count[&stem] > 1 {
            mirrored_name(abs, &root, &stem)
        } else {
            stem
        };
        inputs.push(ImageInput { path, name });
    }
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for input in &inputs {
        if let Some(first) = seen.insert(&input.name, &input.path) {
            return Err(Error::at(
                &input.path,
                format!(
                    "its outputs would be named `{}` like those of {}",
                    input.name,
                    first.display()
                ),
            ));
        }
    }
    Ok(inputs)
}

fn absolute(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or(p.to_path_buf())
    })
}

/// The deepest directory holding every path.
fn common_parent(paths: &[PathBuf]) -> PathBuf {
    let mut root: Option<Vec<Component>> = None;
    for p in paths {
        let parent: Vec<Component> = p
            .parent()
            .map(|d| d.components().collect())
            .unwrap_or_default();
        root = Some(match root {
            None => parent,
            Some(r) => r
                .into_iter()
                .zip(parent)
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect(),
        });
    }
    root.unwrap_or_default().into_iter().collect()
}

/// `sub/dir/stem` for `root/sub/dir/stem.ext`, with only normal components.
fn mirrored_name(abs: &Path, root: &Path, stem: &str) -> String {
    let rel = abs.strip_prefix(root).unwrap_or(abs);
    let mut parts: Vec<String> = rel
        .parent()
        .map(|d| {
            d.components()
                .filter_map(|c| match c {
                    Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    parts.push(stem.to_string());
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(label: &str, files: &[&str]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("metauas-inputs-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for f in files {
            let p = dir.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        }
        dir
    }

    #[test]
    fn directories_are_recursed_sorted_and_filtered_by_extension() {
        let dir = tree(
            "walk",
            &[
                "b.png",
                "a/z.JPG",
                "a/y.txt",
                ".hidden/x.png",
                "c/d/e.tiff",
                "notes.md",
            ],
        );
        let files = expand(std::slice::from_ref(&dir), "--query").unwrap();
        let rel: Vec<String> = files
            .iter()
            .map(|f| f.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        assert_eq!(rel, ["a/z.JPG", "b.png", "c/d/e.tiff"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_same_file_twice_is_taken_once_and_empty_directories_are_named() {
        let dir = tree("dups", &["q/a.png", "empty/readme.txt"]);
        let a = dir.join("q/a.png");
        let files = expand(&[a.clone(), dir.join("q"), a.clone()], "--query").unwrap();
        assert_eq!(files, vec![a]);
        let err = expand(&[dir.join("empty")], "--query").unwrap_err();
        assert!(err.to_string().contains("no image files"), "{err}");
        let err = expand(&[dir.join("missing.png")], "--query").unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn colliding_stems_are_mirrored_others_stay_flat() {
        let dir = tree(
            "names",
            &["lineA/cam1/f.png", "lineA/cam2/f.jpg", "lineA/g.png"],
        );
        let files = expand(&[dir.join("lineA")], "--query").unwrap();
        let inputs = name_inputs(files).unwrap();
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["cam1/f", "cam2/f", "g"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_at_the_common_root_keeps_its_stem_when_mirrored() {
        let dir = tree("root", &["f.png", "sub/f.png"]);
        let inputs = name_inputs(vec![dir.join("f.png"), dir.join("sub/f.png")]).unwrap();
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["f", "sub/f"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

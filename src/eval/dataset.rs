//! Test sets for `metauas eval`: the authors' meta files (one JSON object per line) or the
//! standard MVTec AD folder layout, and the ground-truth masks as the authors prepare them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::image::{decode_image_file, resize_mask};
use crate::util::rng::{fnv1a64, SplitMix64};

/// One test image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The file name as listed (relative to the dataset root, `/`-separated).
    pub name: String,
    pub image: PathBuf,
    /// 0 = good, 1 = defective.
    pub label: u8,
    /// The ground-truth mask, if the image has one.
    pub mask: Option<PathBuf>,
    /// The normal image it is compared with.
    pub prompt: PathBuf,
}

/// The test images of one product class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassSet {
    pub name: String,
    pub samples: Vec<Sample>,
}

impl ClassSet {
    pub fn defective(&self) -> usize {
        self.samples.iter().filter(|s| s.label != 0).count()
    }
}

/// Image file extensions the MVTec layout scan picks up (case-insensitive).
const IMAGE_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"];

fn is_image(path: &Path) -> bool {
    path.is_file()
        && !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        && path.extension().is_some_and(|e| {
            let e = e.to_string_lossy().to_ascii_lowercase();
            IMAGE_EXTENSIONS.contains(&e.as_str())
        })
}

/// Entries of a folder, sorted by name.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = std::fs::read_dir(dir).map_err(|e| Error::at(dir, format!("cannot list: {e}")))?;
    let mut out = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| Error::at(dir, format!("cannot list: {e}")))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

fn check_root(root: &Path) -> Result<()> {
    if !root.exists() {
        return Err(Error::at(root, "no such directory (the dataset root)"));
    }
    if !root.is_dir() {
        return Err(Error::at(
            root,
            "not a directory (the dataset root is a folder)",
        ));
    }
    Ok(())
}

fn relative_name(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// The prompt the MVTec layout uses for `class`: one of its `train/good` images (sorted by
/// name), picked by `SplitMix64(fnv1a64("prompt:{seed}:{class}"))`'s first draw modulo
/// their count. The same seed always picks the same image.
pub fn pick_prompt(goods: &[PathBuf], seed: u64, class: &str) -> Option<PathBuf> {
    if goods.is_empty() {
        return None;
    }
    let mut rng = SplitMix64::new(fnv1a64(format!("prompt:{seed}:{class}").as_bytes()));
    let i = (rng.next_u64() % goods.len() as u64) as usize;
    Some(goods[i].clone())
}

/// The standard MVTec AD layout: `CLASS/train/good/*`, `CLASS/test/DEFECT/*` and
/// `CLASS/ground_truth/DEFECT/<stem>_mask.png`; a class is a folder of `root` that holds a
/// `test` folder. Every defective image must have its mask; `good` images have none.
pub fn mvtec_layout(root: &Path, prompt_seed: u64) -> Result<Vec<ClassSet>> {
    check_root(root)?;
    let mut classes = Vec::new();
    for class_dir in sorted_entries(root)? {
        if !class_dir.join("test").is_dir() {
            continue;
        }
        let name = class_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let good_dir = class_dir.join("train").join("good");
        if !good_dir.is_dir() {
            return Err(Error::at(
                &good_dir,
                "no such directory: the prompt is drawn from the class's train/good images",
            ));
        }
        let goods: Vec<PathBuf> = sorted_entries(&good_dir)?
            .into_iter()
            .filter(|p| is_image(p))
            .collect();
        let prompt = pick_prompt(&goods, prompt_seed, &name)
            .ok_or_else(|| Error::at(&good_dir, "no images to draw the prompt from"))?;
        let mut samples = Vec::new();
        for defect_dir in sorted_entries(&class_dir.join("test"))? {
            if !defect_dir.is_dir() {
                continue;
            }
            let defect = defect_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let label = u8::from(defect != "good");
            for image in sorted_entries(&defect_dir)?
                .into_iter()
                .filter(|p| is_image(p))
            {
                let mask = if label == 1 {
                    let stem = image
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let mask = class_dir
                        .join("ground_truth")
                        .join(&defect)
                        .join(format!("{stem}_mask.png"));
                    if !mask.is_file() {
                        return Err(Error::at(
                            &mask,
                            format!(
                                "missing ground-truth mask for the defective image {}",
                                image.display()
                            ),
                        ));
                    }
                    Some(mask)
                } else {
                    None
                };
                samples.push(Sample {
                    name: relative_name(root, &image),
                    image,
                    label,
                    mask,
                    prompt: prompt.clone(),
                });
            }
        }
        if samples.is_empty() {
            return Err(Error::at(
                &class_dir.join("test"),
                "no test images in this class",
            ));
        }
        classes.push(ClassSet { name, samples });
    }
    if classes.is_empty() {
        return Err(Error::at(
            root,
            "no CLASS/test folders: not an MVTec AD layout (or use the authors' meta files)",
        ));
    }
    Ok(classes)
}

/// The JSON objects of a file: the whole file as one value, or one object per line (blank
/// lines skipped), each with its 1-based line number (0 for a whole-file value).
fn json_objects(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::at(path, format!("cannot read: {e}")))?;
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&text) {
        return Ok(vec![(0, map)]);
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => out.push((i + 1, map)),
            Ok(_) => {
                return Err(Error::at(
                    path,
                    format!("line {}: not a JSON object", i + 1),
                ))
            }
            Err(e) => return Err(Error::at(path, format!("line {}: bad JSON: {e}", i + 1))),
        }
    }
    if out.is_empty() {
        return Err(Error::at(path, "no JSON objects in the file"));
    }
    Ok(out)
}

fn at_line(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!("line {line}: ")
    }
}

/// The first prompt file name of a prompt-json value: a string, an object with `filename`,
/// or a (ranked) list of either.
fn first_prompt(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Object(o) => o.get("filename").and_then(first_prompt),
        Value::Array(a) => a.first().and_then(first_prompt),
        _ => None,
    }
}

/// Reads the authors' prompt meta file: either one object per class
/// (`{"bottle": {"filename": ...}, ...}`) or one object per line mapping a query file name
/// to a ranked list of prompt file names (the first is used). Keys are looked up by the
/// query's file name first, then by its class.
pub fn read_prompt_json(path: &Path) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for (line, object) in json_objects(path)? {
        for (key, value) in object {
            let prompt = first_prompt(&value).ok_or_else(|| {
                Error::at(
                    path,
                    format!(
                        "{}`{key}`: expected a file name, an object with `filename`, or a list of them",
                        at_line(line)
                    ),
                )
            })?;
            out.insert(key, prompt);
        }
    }
    Ok(out)
}

/// One line of the authors' test meta file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Line number in the file (from 1).
    pub line: usize,
    pub class: String,
    /// `filename` as listed.
    pub name: String,
    pub image: PathBuf,
    /// 0 = good, 1 = defective.
    pub label: u8,
    pub mask: Option<PathBuf>,
}

impl Listed {
    /// As a test sample (its prompt left empty), e.g. for `load_mask`.
    pub fn sample(&self) -> Sample {
        Sample {
            name: self.name.clone(),
            image: self.image.clone(),
            label: self.label,
            mask: self.mask.clone(),
            prompt: PathBuf::new(),
        }
    }
}

/// Reads the authors' test meta file (one JSON object per line; paths relative to `root`):
/// `filename`, `label` (0/1), optional `maskname` and `clsname` (else the first folder of
/// `filename`). Every problem names the file and the line.
pub fn read_test_list(root: &Path, test_json: &Path) -> Result<Vec<Listed>> {
    check_root(root)?;
    let text = std::fs::read_to_string(test_json)
        .map_err(|e| Error::at(test_json, format!("cannot read: {e}")))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |problem: String| Error::at(test_json, format!("line {n}: {problem}"));
        let value: Value = serde_json::from_str(line).map_err(|e| bad(format!("bad JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(bad("not a JSON object".into()));
        };
        let filename = match obj.get("filename") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(bad("no `filename` string".into())),
        };
        let label = match obj.get("label") {
            Some(Value::Number(x)) if x.as_u64() == Some(0) => 0,
            Some(Value::Number(x)) if x.as_u64() == Some(1) => 1,
            Some(Value::Bool(b)) => u8::from(*b),
            Some(other) => return Err(bad(format!("`label` is {other}, expected 0 or 1"))),
            None => return Err(bad("no `label`".into())),
        };
        let mask = match obj.get("maskname") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(root.join(s)),
            Some(other) => return Err(bad(format!("`maskname` is {other}, expected a string"))),
        };
        let class = match obj.get("clsname") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            None | Some(Value::Null) => filename
                .split(['/', '\\'])
                .find(|c| !c.is_empty())
                .unwrap_or_default()
                .to_string(),
            Some(other) => return Err(bad(format!("`clsname` is {other}, expected a string"))),
        };
        out.push(Listed {
            line: n,
            class,
            image: root.join(&filename),
            name: filename,
            label,
            mask,
        });
    }
    if out.is_empty() {
        return Err(Error::at(test_json, "no test images listed"));
    }
    Ok(out)
}

/// Reads the authors' test meta file and prompt meta file (paths inside them relative to
/// `root`): `read_test_list`, each image with its prompt. Classes keep the order of their
/// first line.
pub fn meta_files(root: &Path, test_json: &Path, prompt_json: &Path) -> Result<Vec<ClassSet>> {
    check_root(root)?;
    let prompts = read_prompt_json(prompt_json)?;
    let mut classes: Vec<ClassSet> = Vec::new();
    for listed in read_test_list(root, test_json)? {
        let prompt = prompts
            .get(&listed.name)
            .or_else(|| prompts.get(&listed.class))
            .ok_or_else(|| {
                Error::at(
                    prompt_json,
                    format!(
                        "no prompt for `{}` (class `{}`, line {} of the test list)",
                        listed.name, listed.class, listed.line
                    ),
                )
            })?;
        let sample = Sample {
            prompt: root.join(prompt),
            ..listed.sample()
        };
        match classes.iter_mut().find(|c| c.name == listed.class) {
            Some(c) => c.samples.push(sample),
            None => classes.push(ClassSet {
                name: listed.class,
                samples: vec![sample],
            }),
        }
    }
    Ok(classes)
}

/// Keeps only the named classes (in the order given); an unknown name is an error that
/// lists the known ones.
pub fn select_classes(
    classes: Vec<ClassSet>,
    names: &[String],
    source: &Path,
) -> Result<Vec<ClassSet>> {
    if names.is_empty() {
        return Ok(classes);
    }
    let known: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
    let mut by_name: HashMap<String, ClassSet> =
        classes.into_iter().map(|c| (c.name.clone(), c)).collect();
    let mut out = Vec::new();
    for name in names {
        match by_name.remove(name) {
            Some(c) => out.push(c),
            None if known.contains(name) => {
                return Err(Error::new(format!("class `{name}` is chosen twice")))
            }
            None => {
                return Err(Error::at(
                    source,
                    format!("unknown class `{name}` (classes: {})", known.join(", ")),
                ))
            }
        }
    }
    Ok(out)
}

/// Checks that every image, mask and prompt file exists before any work starts.
pub fn check_files(classes: &[ClassSet]) -> Result<()> {
    for class in classes {
        for s in &class.samples {
            for (path, what) in [(&s.image, "test image"), (&s.prompt, "prompt image")]
                .into_iter()
                .chain(s.mask.iter().map(|m| (m, "mask")))
            {
                if !path.is_file() {
                    return Err(Error::at(
                        path,
                        format!("no such file ({what} of class `{}`)", class.name),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The ground truth of one test image at `size x size`, as the authors prepare it: the mask
/// read as grayscale (PIL's `convert('L')` weights), `> 0`, resized with the images'
/// bilinear align_corners resize, every value above 0 set to 1. Without a mask: all 0 for a
/// good image, all 1 for a defective one.
pub fn load_mask(sample: &Sample, size: usize) -> Result<Vec<u8>> {
    let Some(path) = &sample.mask else {
        return Ok(vec![sample.label; size * size]);
    };
    let img = decode_image_file(path)?;
    let binary: Vec<u8> = img
        .data
        .chunks_exact(3)
        .map(|p| {
            let l = (u32::from(p[0]) * 19595
                + u32::from(p[1]) * 38470
                + u32::from(p[2]) * 7471
                + 0x8000)
                >> 16;
            u8::from(l > 0)
        })
        .collect();
    Ok(resize_mask(&binary, img.width, img.height, size))
}

/// A file-name-safe name for a sample's saved map: its listed name without the extension,
/// folders joined by `__`.
pub fn map_file_stem(name: &str) -> String {
    let without_ext = match name.rfind('.') {
        Some(dot) if !name[dot..].contains(['/', '\\']) => &name[..dot],
        _ => name,
    };
    without_ext
        .split(['/', '\\'])
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
        .collect::<Vec<_>>()
        .join("__")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_flatten_folders() {
        assert_eq!(
            map_file_stem("bottle/test/broken_large/000.png"),
            "bottle__test__broken_large__000"
        );
        assert_eq!(map_file_stem("a.b/c"), "a.b__c");
        assert_eq!(map_file_stem("../x.png"), "x");
    }

    #[test]
    fn prompt_pick_is_reproducible_and_in_range() {
        let goods: Vec<PathBuf> = (0..7).map(|i| PathBuf::from(format!("{i}.png"))).collect();
        let a = pick_prompt(&goods, 3, "bottle").unwrap();
        assert_eq!(a, pick_prompt(&goods, 3, "bottle").unwrap());
        assert!(goods.contains(&a));
        assert!(pick_prompt(&[], 3, "bottle").is_none());
    }

    #[test]
    fn first_prompt_accepts_the_authors_forms() {
        let v: Value = serde_json::json!({"filename": "a/train/good/1.png"});
        assert_eq!(first_prompt(&v).unwrap(), "a/train/good/1.png");
        let v: Value = serde_json::json!(["x.png", "y.png"]);
        assert_eq!(first_prompt(&v).unwrap(), "x.png");
        assert!(first_prompt(&serde_json::json!(3)).is_none());
    }

    #[test]
    fn images_without_a_mask_are_all_their_label() {
        let sample = |label| Sample {
            name: "x.png".into(),
            image: "x.png".into(),
            label,
            mask: None,
            prompt: "p.png".into(),
        };
        assert_eq!(load_mask(&sample(0), 4).unwrap(), vec![0; 16]);
        assert_eq!(load_mask(&sample(1), 4).unwrap(), vec![1; 16]);
    }

    #[test]
    fn resized_masks_follow_the_bilinear_rule() {
        // One set pixel in a 3x3 mask, resized to 5x5 with align_corners: the centre maps
        // to source (1, 1) exactly, its neighbours (0.5 away) share its weight.
        let mut m = vec![0u8; 9];
        m[4] = 255;
        let r = resize_mask(&m, 3, 3, 5);
        let expect: Vec<u8> = (0..25)
            .map(|i| {
                let (y, x) = (i / 5, i % 5);
                u8::from((1..=3).contains(&y) && (1..=3).contains(&x))
            })
            .collect();
        assert_eq!(r, expect);
    }
}

//! Anomaly maps at the frame's size: OpenCV's `cv2.resize(map, (width, height),
//! interpolation=cv2.INTER_LINEAR)` on a float32 map, the convention of the authors'
//! visualizer. Half-pixel centers (`src = (dst + 0.5) * in / out - 0.5`), a coordinate left
//! of the first center or right of the last one clamps to that edge sample, no antialiasing
//! when shrinking. Arithmetic in float32 in OpenCV's order: rows first, then columns.

use rayon::prelude::*;

/// One output coordinate's two source samples and the weight of the second.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LinearTap {
    index: usize,
    next: usize,
    weight: f32,
}

/// OpenCV's taps for `input` samples resized to `output`: the scale as `1 / (out / in)` in
/// float64, the coordinate rounded to float32, clamped at both edges.
fn linear_taps(input: usize, output: usize) -> Vec<LinearTap> {
    let scale = 1.0 / (output as f64 / input as f64);
    let last = input - 1;
    (0..output)
        .map(|dst| {
            let src = ((dst as f64 + 0.5) * scale - 0.5) as f32;
            let floor = src.floor();
            let (mut index, mut weight) = (floor as i64, src - floor);
            if index < 0 {
                (index, weight) = (0, 0.0);
            }
            let mut index = index as usize;
            if index >= last {
                (index, weight) = (last, 0.0);
            }
            LinearTap {
                index,
                next: (index + 1).min(last),
                weight,
            }
        })
        .collect()
}

/// `map` (`side x side`, row-major) resized bilinearly to `width x height`.
///
/// Panics if `map` is not `side x side` or a size is 0.
pub fn resize_map(map: &[f32], side: usize, width: usize, height: usize) -> Vec<f32> {
    assert!(
        side > 0 && width > 0 && height > 0,
        "resize_map: empty size"
    );
    assert_eq!(map.len(), side * side, "resize_map: map is not side x side");
    if width == side && height == side {
        return map.to_vec();
    }
    let cols = linear_taps(side, width);
    let rows = linear_taps(side, height);
    // Every source row resized along x once (OpenCV's horizontal pass).
    let mut across = vec![0f32; side * width];
    across
        .par_chunks_mut(width)
        .zip(map.par_chunks(side))
        .for_each(|(out, src)| {
            for (o, t) in out.iter_mut().zip(&cols) {
                *o = src[t.index] * (1.0 - t.weight) + src[t.next] * t.weight;
            }
        });
    let mut out = vec![0f32; width * height];
    out.par_chunks_mut(width)
        .zip(rows.par_iter())
        .for_each(|(row, t)| {
            let top = &across[t.index * width..][..width];
            let bottom = &across[t.next * width..][..width];
            let (w0, w1) = (1.0 - t.weight, t.weight);
            for ((o, &a), &b) in row.iter_mut().zip(top).zip(bottom) {
                *o = a * w0 + b * w1;
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition in float64, independently: half-pixel centers, clamped edges.
    fn naive(map: &[f32], side: usize, width: usize, height: usize) -> Vec<f64> {
        let sample = |src: f64| -> (usize, usize, f64) {
            let s = src.clamp(0.0, (side - 1) as f64);
            let i = s.floor() as usize;
            let j = (i + 1).min(side - 1);
            (i, j, s - i as f64)
        };
        let mut out = Vec::with_capacity(width * height);
        for y in 0..height {
            let (y0, y1, fy) = sample((y as f64 + 0.5) * side as f64 / height as f64 - 0.5);
            for x in 0..width {
                let (x0, x1, fx) = sample((x as f64 + 0.5) * side as f64 / width as f64 - 0.5);
                let at = |yy: usize, xx: usize| f64::from(map[yy * side + xx]);
                let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                out.push(top * (1.0 - fy) + bottom * fy);
            }
        }
        out
    }

    #[test]
    fn matches_the_float64_definition_up_down_and_odd() {
        let mut rng = crate::util::rng::SplitMix64::new(5);
        for &(side, width, height) in &[(4, 9, 7), (8, 3, 5), (5, 5, 11), (1, 3, 2), (7, 1, 1)] {
            let map: Vec<f32> = (0..side * side)
                .map(|_| (rng.next_signed_f32() + 1.0) * 0.5)
                .collect();
            let got = resize_map(&map, side, width, height);
            let want = naive(&map, side, width, height);
            for (g, w) in got.iter().zip(&want) {
                assert!((f64::from(*g) - w).abs() < 1e-6, "{side}->{width}x{height}");
            }
        }
    }

    #[test]
    fn same_size_is_a_copy_and_constant_stays_constant() {
        let map = vec![0.25f32; 16];
        assert_eq!(resize_map(&map, 4, 4, 4), map);
        assert!(resize_map(&map, 4, 13, 6).iter().all(|&v| v == 0.25));
    }
}

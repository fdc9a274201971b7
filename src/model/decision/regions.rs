//! Defect regions: the 8-connected components of `map >= pixel threshold` inside the
//! inspection mask, each with its box, area, scores and centroid, in the map's pixels and in
//! the frame's.

/// Labels the 8-connected regions (scikit-image `label(mask, connectivity=2)`, scipy
/// `ndimage.label` with a 3x3 structure) of a `height x width` mask (non-zero = foreground):
/// per pixel 0 for background or the region number from 1, and the number of regions.
/// Regions are numbered in raster order of their first pixel, as both libraries do.
pub fn label_regions(mask: &[u8], height: usize, width: usize) -> (Vec<u32>, usize) {
    assert_eq!(mask.len(), height * width, "mask is not height x width");
    let mut labels = vec![0u32; mask.len()];
    let mut count = 0usize;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if mask[start] == 0 || labels[start] != 0 {
            continue;
        }
        count += 1;
        let id = count as u32;
        labels[start] = id;
        stack.push(start);
        while let Some(p) = stack.pop() {
            let (y, x) = (p / width, p % width);
            for ny in y.saturating_sub(1)..(y + 2).min(height) {
                for nx in x.saturating_sub(1)..(x + 2).min(width) {
                    let q = ny * width + nx;
                    if mask[q] != 0 && labels[q] == 0 {
                        labels[q] = id;
                        stack.push(q);
                    }
                }
            }
        }
    }
    (labels, count)
}

/// One defect region.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    /// Bounding box in the frame's pixels, `[x0, y0, x1, y1]` with `x1`, `y1` exclusive: the
    /// frame pixels covered by the region's map pixels (map pixel `i` spans
    /// `[i * width / side, (i + 1) * width / side)`, the half-pixel convention of the
    /// frame-size map).
    pub bbox: [usize; 4],
    /// The same box in the map's pixels, `[x0, y0, x1, y1]`, exclusive ends.
    pub map_bbox: [usize; 4],
    /// Map pixels in the region.
    pub area_px: usize,
    /// `area_px` over the pixels inspected (the ROI's, or the whole map).
    pub area_fraction: f64,
    /// Highest and mean map value over the region (mean in float64).
    pub max: f32,
    pub mean: f64,
    /// Unweighted centroid in the frame's pixel coordinates `[x, y]` (pixel centers at
    /// integers), and in the map's.
    pub centroid: [f64; 2],
    pub map_centroid: [f64; 2],
}

/// Accumulates one component while the map is scanned.
#[derive(Clone, Copy)]
struct Extent {
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
    count: usize,
    sum: f64,
    max: f32,
    sum_x: f64,
    sum_y: f64,
}

/// The regions of `map` (`side x side`) where `value >= threshold` and `inside` (the ROI:
/// non-zero = inspected; `None` inspects everything), for a frame of `width x height`.
/// Regions smaller than `min_area` map pixels are dropped; the rest are sorted by max score,
/// highest first (ties keep raster order).
pub fn find_regions(
    map: &[f32],
    side: usize,
    threshold: f64,
    inside: Option<&[u8]>,
    frame: (usize, usize),
    min_area: usize,
) -> Vec<Region> {
    assert_eq!(map.len(), side * side, "map is not side x side");
    let inspected = |i: usize| inside.is_none_or(|m| m[i] != 0);
    let mask: Vec<u8> = (0..map.len())
        .map(|i| u8::from(inspected(i) && f64::from(map[i]) >= threshold))
        .collect();
    let (labels, count) = label_regions(&mask, side, side);
    let empty = Extent {
        x0: usize::MAX,
        y0: usize::MAX,
        x1: 0,
        y1: 0,
        count: 0,
        sum: 0.0,
        max: f32::NEG_INFINITY,
        sum_x: 0.0,
        sum_y: 0.0,
    };
    let mut extents = vec![empty; count];
    for (i, &label) in labels.iter().enumerate() {
        if label == 0 {
            continue;
        }
        let e = &mut extents[label as usize - 1];
        let (y, x) = (i / side, i % side);
        (e.x0, e.y0) = (e.x0.min(x), e.y0.min(y));
        (e.x1, e.y1) = (e.x1.max(x + 1), e.y1.max(y + 1));
        e.count += 1;
        e.sum += f64::from(map[i]);
        e.max = e.max.max(map[i]);
        e.sum_x += x as f64;
        e.sum_y += y as f64;
    }
    let inspected_pixels = inside.map_or(map.len(), |m| m.iter().filter(|&&v| v != 0).count());
    let mut regions: Vec<Region> = extents
        .iter()
        .filter(|e| e.count >= min_area.max(1))
        .map(|e| region(e, side, frame, inspected_pixels))
        .collect();
    regions.sort_by(|a, b| b.max.total_cmp(&a.max));
    regions
}

fn region(e: &Extent, side: usize, (width, height): (usize, usize), inspected: usize) -> Region {
    let n = e.count as f64;
    let map_centroid = [e.sum_x / n, e.sum_y / n];
    // Map pixel i spans [i * W / side, (i + 1) * W / side) of the frame.
    let start = |i: usize, len: usize| i * len / side;
    let end = |i: usize, len: usize| (i * len).div_ceil(side);
    let to_frame = |c: f64, len: usize| (c + 0.5) * len as f64 / side as f64 - 0.5;
    Region {
        bbox: [
            start(e.x0, width),
            start(e.y0, height),
            end(e.x1, width),
            end(e.y1, height),
        ],
        map_bbox: [e.x0, e.y0, e.x1, e.y1],
        area_px: e.count,
        area_fraction: n / inspected.max(1) as f64,
        max: e.max,
        mean: e.sum / n,
        centroid: [
            to_frame(map_centroid[0], width),
            to_frame(map_centroid[1], height),
        ],
        map_centroid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagonal_neighbours_join_and_boxes_scale_to_the_frame() {
        #[rustfmt::skip]
        let map = [
            0.9, 0.0, 0.0, 0.0,
            0.0, 0.8, 0.0, 0.6,
            0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0f32,
        ];
        let regions = find_regions(&map, 4, 0.5, None, (8, 6), 1);
        assert_eq!(regions.len(), 2);
        let r = &regions[0];
        assert_eq!((r.area_px, r.max, r.map_bbox), (2, 0.9, [0, 0, 2, 2]));
        assert_eq!(r.bbox, [0, 0, 4, 3]);
        assert!((r.mean - (0.9f64 as f32 as f64 + 0.8f32 as f64) / 2.0).abs() < 1e-12);
        assert_eq!(r.map_centroid, [0.5, 0.5]);
        assert_eq!(r.centroid, [1.5, 1.0]);
        assert_eq!(regions[1].bbox, [6, 1, 8, 3]);
        assert_eq!(r.area_fraction, 2.0 / 16.0);
        // Drop regions below two pixels; an ROI that hides the first pixel splits nothing
        // but shrinks the region and the inspected area.
        assert_eq!(find_regions(&map, 4, 0.5, None, (4, 4), 2).len(), 1);
        let mut roi = [1u8; 16];
        roi[0] = 0;
        let hidden = find_regions(&map, 4, 0.5, Some(&roi), (4, 4), 1);
        assert_eq!((hidden[0].area_px, hidden[0].max), (1, 0.8));
        assert_eq!(hidden[0].area_fraction, 1.0 / 15.0);
    }
}

//! From a map to a decision: thresholds (calibrated on normal images or given), the
//! verdict, defect regions, inspection masks (ROI) and maps at the frame's size.
//!
//! ```
//! use metauas::model::decision::{Policy, Threshold};
//! use metauas::model::AnomalyMap;
//!
//! let mut map = AnomalyMap { size: 4, data: vec![0.1; 16] };
//! map.data[5] = 0.9;
//! let policy = Policy {
//!     image: Some(Threshold::given(0.5)),
//!     pixel: Some(Threshold::given(0.5)),
//!     ..Policy::default()
//! };
//! let decision = policy.decide(&mut map, (400, 300))?; // the frame was 400 x 300
//! assert_eq!(decision.anomalous, Some(true));
//! assert_eq!(decision.regions[0].bbox, [100, 75, 200, 150]);
//! # Ok::<(), metauas::Error>(())
//! ```

mod calibrate;
mod regions;
mod resize;

use serde_json::{json, Value};

pub use calibrate::{
    parse_selection, quantile_of_sorted, selection_name, CalibratedThreshold, Calibration,
    Calibrator, F1Thresholds, Rule, Stats, FEW_IMAGES, MAX_CALIBRATION_IMAGES, RECORDED_QUANTILES,
};
pub use regions::{find_regions, label_regions, Region};
pub use resize::resize_map;

use crate::error::{Error, Result};
use crate::io::image::{resize_rgb8, RgbImage8};
use crate::model::engine::AnomalyMap;

/// An inspection mask at the model's size: outside it the map is 0 for the score, the
/// regions and the calibration.
#[derive(Clone, Debug, PartialEq)]
pub struct RoiMask {
    pub side: usize,
    /// One byte per map pixel, row-major: 1 = inspected, 0 = ignored.
    pub inside: Vec<u8>,
    /// The size of the mask image, which is the size of the frames it applies to.
    pub frame: (usize, usize),
}

impl RoiMask {
    /// From a mask image (white = inspect): resized to `side x side` with the model's own
    /// resize (bilinear, align_corners, so it lies on the image as the model sees it), then a
    /// map pixel is inspected where its gray level (Pillow's `L`) is at least 128.
    pub fn from_image(mask: &RgbImage8, side: usize) -> Result<RoiMask> {
        let small = resize_rgb8(mask, side);
        let inside: Vec<u8> = small
            .data
            .chunks_exact(3)
            .map(|p| u8::from(luma(p) >= 128))
            .collect();
        if inside.iter().all(|&v| v == 0) {
            return Err(Error::new(
                "the inspection mask is all black at the model's size: nothing would be inspected",
            ));
        }
        Ok(RoiMask {
            side,
            inside,
            frame: (mask.width, mask.height),
        })
    }

    /// Refuses a frame of another size than the mask's.
    pub fn check_frame(&self, width: usize, height: usize) -> Result<()> {
        if (width, height) != self.frame {
            return Err(Error::new(format!(
                "the image is {width}x{height} but the inspection mask is {}x{}",
                self.frame.0, self.frame.1
            )));
        }
        Ok(())
    }

    /// Inspected map pixels.
    pub fn pixels(&self) -> usize {
        self.inside.iter().filter(|&&v| v != 0).count()
    }

    /// Sets the map to 0 outside the mask.
    pub fn apply(&self, map: &mut AnomalyMap) -> Result<()> {
        if map.size != self.side {
            return Err(Error::new(format!(
                "the inspection mask is {0}x{0}, the map {1}x{1}",
                self.side, map.size
            )));
        }
        for (v, &inside) in map.data.iter_mut().zip(&self.inside) {
            if inside == 0 {
                *v = 0.0;
            }
        }
        Ok(())
    }
}

/// Pillow's `convert('L')`: ITU-R 601-2 luma in 16-bit fixed point.
fn luma(p: &[u8]) -> u32 {
    (u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16
}

/// Where a threshold came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThresholdSource {
    /// The bank's calibration on normal images.
    Calibration,
    /// Given by the caller (`--threshold`, `threshold=`).
    Given,
}

impl ThresholdSource {
    pub fn name(self) -> &'static str {
        match self {
            ThresholdSource::Calibration => "calibration",
            ThresholdSource::Given => "given",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Threshold {
    pub value: f64,
    pub source: ThresholdSource,
}

impl Threshold {
    pub fn given(value: f64) -> Threshold {
        Threshold {
            value,
            source: ThresholdSource::Given,
        }
    }

    pub fn calibrated(value: f64) -> Threshold {
        Threshold {
            value,
            source: ThresholdSource::Calibration,
        }
    }

    fn to_json(self) -> Value {
        json!({"value": self.value, "source": self.source.name()})
    }
}

/// How maps become decisions: thresholds (either may be missing), the ROI, the smallest
/// region kept.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// An image is anomalous when its score is at least this.
    pub image: Option<Threshold>,
    /// Regions are where the map is at least this.
    pub pixel: Option<Threshold>,
    pub roi: Option<RoiMask>,
    /// Regions of fewer map pixels are dropped (0 and 1 keep all).
    pub min_region_area: usize,
}

impl Policy {
    /// The policy of a calibration: both thresholds calibrated.
    pub fn calibrated(calibration: &Calibration, roi: Option<RoiMask>) -> Policy {
        Policy {
            image: Some(Threshold::calibrated(calibration.image.value)),
            pixel: Some(Threshold::calibrated(calibration.pixel.value)),
            roi,
            min_region_area: 0,
        }
    }

    /// Applies the ROI to `map` (0 outside), then decides for a frame of `frame`
    /// (width, height) pixels. Errors when the frame or the map do not fit the ROI.
    pub fn decide(&self, map: &mut AnomalyMap, frame: (usize, usize)) -> Result<Decision> {
        if let Some(roi) = &self.roi {
            roi.check_frame(frame.0, frame.1)?;
            roi.apply(map)?;
        }
        let score = map.score();
        let regions = self.pixel.map(|t| {
            let inside = self.roi.as_ref().map(|r| r.inside.as_slice());
            find_regions(
                &map.data,
                map.size,
                t.value,
                inside,
                frame,
                self.min_region_area,
            )
        });
        Ok(Decision {
            score,
            anomalous: self.image.map(|t| f64::from(score) >= t.value),
            image_threshold: self.image,
            pixel_threshold: self.pixel,
            regions: regions.unwrap_or_default(),
            frame,
        })
    }
}

/// The decision for one query.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The map's maximum (inside the ROI).
    pub score: f32,
    /// `score >= image threshold`; `None` without an image threshold.
    pub anomalous: Option<bool>,
    pub image_threshold: Option<Threshold>,
    pub pixel_threshold: Option<Threshold>,
    /// Defect regions, highest max first (empty without a pixel threshold).
    pub regions: Vec<Region>,
    /// The frame's width and height, the coordinates of the region boxes.
    pub frame: (usize, usize),
}

impl Decision {
    /// `{"anomalous", "score", "image_threshold", "pixel_threshold"}` (thresholds with
    /// their source, `null` when absent).
    pub fn verdict_json(&self) -> Value {
        json!({
            "anomalous": self.anomalous,
            "score": self.score,
            "image_threshold": self.image_threshold.map(Threshold::to_json),
            "pixel_threshold": self.pixel_threshold.map(Threshold::to_json),
        })
    }

    /// The regions as JSON objects (`box` in frame pixels, `[x0, y0, x1, y1)`).
    pub fn regions_json(&self) -> Value {
        self.regions
            .iter()
            .map(|r| {
                json!({
                    "box": r.bbox, "map_box": r.map_bbox, "area_px": r.area_px,
                    "area_fraction": r.area_fraction, "max": r.max, "mean": r.mean,
                    "centroid": r.centroid,
                })
            })
            .collect()
    }
}

//! The weights of a Winograd conv, transformed and packed once when the model is loaded.

use super::transform::transform_kernel;
use super::POS;
use crate::cpu::kernels::partition::{column_groups, ColumnGroup};
use crate::cpu::kernels::simd::{AlignedBuf, LANES};

/// 3x3 weights transformed to the Winograd domain (`U = G g G^T`), packed for the
/// microkernel: output channels split into groups of 1-3 vectors of 16 (as `PackedConv`),
/// each stored as `[position][input channel][16 * nv lanes]`, zero past `cout`.
/// 4x the memory of the plain weights.
pub struct PackedWinograd {
    pub(super) cout: usize,
    pub(super) cin: usize,
    pub(super) groups: Vec<ColumnGroup>,
    data: AlignedBuf,
}

impl PackedWinograd {
    /// Pack PyTorch-layout 3x3 weights `[cout][cin][3][3]`.
    pub fn pack(w_oihw: &[f32], cout: usize, cin: usize) -> Self {
        assert!(cout > 0 && cin > 0, "empty convolution weights");
        assert_eq!(w_oihw.len(), cout * cin * 9, "conv weight length");
        let (groups, len) = column_groups(cout, POS * cin);
        let mut buf = AlignedBuf::zeroed(len);
        let data = buf.as_mut_slice();
        for group in &groups {
            let nr = group.nv * LANES;
            for lane in 0..nr.min(cout - group.co0) {
                let co = group.co0 + lane;
                for ci in 0..cin {
                    let w = &w_oihw[(co * cin + ci) * 9..][..9];
                    let u = transform_kernel(w);
                    for (pos, &value) in u.iter().enumerate() {
                        data[group.offset + (pos * cin + ci) * nr + lane] = value as f32;
                    }
                }
            }
        }
        PackedWinograd {
            cout,
            cin,
            groups,
            data: buf,
        }
    }

    pub fn cout(&self) -> usize {
        self.cout
    }

    pub fn cin(&self) -> usize {
        self.cin
    }

    /// The packed weights of `group` at `pos`, from input channel `c0`.
    #[inline]
    pub(super) fn weights(&self, group: &ColumnGroup, pos: usize, c0: usize) -> *const f32 {
        let nr = group.nv * LANES;
        self.data.as_slice()[group.offset + (pos * self.cin + c0) * nr..].as_ptr()
    }
}

//! Strided views over raw storage bytes: bounds checks and row-major gathering with dtype
//! decoding. A torch tensor is (storage, offset, shape, stride) in elements; a safetensors
//! entry is the contiguous special case.

use super::{element_count, DType, TensorData};

/// Byte order of the stored elements (torch records it; safetensors is always little).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ByteOrder {
    Little,
    Big,
}

/// Element `i` (row-major multi-index `idx`) lives at `offset + sum(idx[d] * stride[d])`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct View {
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl View {
    pub fn contiguous(shape: &[usize]) -> View {
        let mut stride = vec![0; shape.len()];
        let mut step = 1usize;
        for d in (0..shape.len()).rev() {
            stride[d] = step;
            step = step.saturating_mul(shape[d]);
        }
        View {
            offset: 0,
            shape: shape.to_vec(),
            stride,
        }
    }

    /// One past the highest storage element the view touches (0 for an empty view);
    /// `None` on arithmetic overflow.
    pub fn extent(&self) -> Option<usize> {
        if self.shape.contains(&0) {
            return Some(0);
        }
        let mut last = self.offset;
        for (&n, &s) in self.shape.iter().zip(&self.stride) {
            last = last.checked_add((n - 1).checked_mul(s)?)?;
        }
        last.checked_add(1)
    }

    /// Whether the elements are exactly `offset .. offset + numel` in row-major order.
    fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&n, &s) in self.shape.iter().zip(&self.stride).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(n);
        }
        true
    }

    /// Checks that the view is well formed and stays within `storage_len` elements.
    pub fn check_within(&self, storage_len: usize) -> Result<(), String> {
        if self.shape.len() != self.stride.len() {
            return Err(format!(
                "has {} sizes but {} strides",
                self.shape.len(),
                self.stride.len()
            ));
        }
        let extent = self.extent().ok_or_else(|| {
            format!(
                "view (offset {}, shape {:?}, stride {:?}) overflows the address range",
                self.offset, self.shape, self.stride
            )
        })?;
        if extent > storage_len {
            return Err(format!(
                "view (offset {}, shape {:?}, stride {:?}) reaches element {} of a storage holding {} elements",
                self.offset,
                self.shape,
                self.stride,
                extent - 1,
                storage_len
            ));
        }
        Ok(())
    }
}

/// The element's bytes in little-endian order.
#[inline(always)]
fn le<const N: usize>(b: &[u8], order: ByteOrder) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    if order == ByteOrder::Big {
        a.reverse();
    }
    a
}

/// Decodes the view's elements in row-major order; `decode` gets exactly `size` bytes.
fn gather<T>(
    bytes: &[u8],
    size: usize,
    view: &View,
    decode: impl Fn(&[u8]) -> T,
) -> Result<Vec<T>, String> {
    let numel = element_count(&view.shape).ok_or("element count overflows")?;
    let storage_len = bytes.len() / size;
    view.check_within(storage_len)?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    if view.is_contiguous() {
        let start = view.offset * size;
        let run = &bytes[start..start + numel * size];
        return Ok(run.chunks_exact(size).map(decode).collect());
    }
    let mut out = Vec::with_capacity(numel);
    let at = |e: usize| &bytes[e * size..e * size + size];
    let ndim = view.shape.len();
    let (inner_n, inner_s) = (view.shape[ndim - 1], view.stride[ndim - 1]);
    let mut idx = vec![0usize; ndim - 1];
    let mut base = view.offset;
    loop {
        for k in 0..inner_n {
            out.push(decode(at(base + k * inner_s)));
        }
        // Odometer over the outer dims; `base` never leaves the checked extent.
        let mut d = ndim - 1;
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            if idx[d] + 1 < view.shape[d] {
                idx[d] += 1;
                base += view.stride[d];
                break;
            }
            base -= idx[d] * view.stride[d];
            idx[d] = 0;
        }
    }
}

/// The view's values converted to f32 (float dtypes only).
pub(crate) fn gather_f32(
    bytes: &[u8],
    dtype: DType,
    view: &View,
    order: ByteOrder,
) -> Result<Vec<f32>, String> {
    let size = dtype.size();
    match dtype {
        DType::F32 => gather(bytes, size, view, |b| f32::from_le_bytes(le(b, order))),
        DType::F16 => gather(bytes, size, view, |b| {
            half::f16::from_le_bytes(le(b, order)).to_f32()
        }),
        DType::BF16 => gather(bytes, size, view, |b| {
            half::bf16::from_le_bytes(le(b, order)).to_f32()
        }),
        DType::F64 => gather(bytes, size, view, |b| {
            f64::from_le_bytes(le(b, order)) as f32
        }),
        other => Err(format!("dtype {other:?} is not a floating-point type")),
    }
}

/// The view's values in their own dtype.
pub(crate) fn gather_data(
    bytes: &[u8],
    dtype: DType,
    view: &View,
    order: ByteOrder,
) -> Result<TensorData, String> {
    let size = dtype.size();
    let shape = view.shape.clone();
    Ok(match dtype {
        DType::F32 => TensorData::F32 {
            shape,
            data: gather(bytes, size, view, |b| f32::from_le_bytes(le(b, order)))?,
        },
        DType::F64 => TensorData::F64 {
            shape,
            data: gather(bytes, size, view, |b| f64::from_le_bytes(le(b, order)))?,
        },
        DType::F16 => TensorData::F16 {
            shape,
            data: gather(bytes, size, view, |b| {
                half::f16::from_le_bytes(le(b, order))
            })?,
        },
        DType::BF16 => TensorData::BF16 {
            shape,
            data: gather(bytes, size, view, |b| {
                half::bf16::from_le_bytes(le(b, order))
            })?,
        },
        DType::I64 => TensorData::I64 {
            shape,
            data: gather(bytes, size, view, |b| i64::from_le_bytes(le(b, order)))?,
        },
        DType::I32 => TensorData::I32 {
            shape,
            data: gather(bytes, size, view, |b| i32::from_le_bytes(le(b, order)))?,
        },
        DType::I16 => TensorData::I16 {
            shape,
            data: gather(bytes, size, view, |b| i16::from_le_bytes(le(b, order)))?,
        },
        DType::I8 => TensorData::I8 {
            shape,
            data: gather(bytes, size, view, |b| b[0] as i8)?,
        },
        DType::U8 => TensorData::U8 {
            shape,
            data: gather(bytes, size, view, |b| b[0])?,
        },
        DType::Bool => TensorData::Bool {
            shape,
            data: gather(bytes, size, view, |b| b[0] != 0)?,
        },
    })
}

#[cfg(test)]
mod view_tests {
    use super::*;

    fn bytes_of(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn transposed_offset_and_broadcast_views() {
        let storage: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let bytes = bytes_of(&storage);
        // 3x4 matrix at offset 2 read transposed: element [i][j] = storage[2 + i + 4j].
        let view = View {
            offset: 2,
            shape: vec![4, 3],
            stride: vec![1, 4],
        };
        let got = gather_f32(&bytes, DType::F32, &view, ByteOrder::Little).unwrap();
        let mut want = Vec::new();
        for i in 0..4 {
            for j in 0..3 {
                want.push(storage[2 + i + 4 * j]);
            }
        }
        assert_eq!(got, want);
        let broadcast = View {
            offset: 7,
            shape: vec![2, 3, 2],
            stride: vec![0, 1, 0],
        };
        let got = gather_f32(&bytes, DType::F32, &broadcast, ByteOrder::Little).unwrap();
        assert_eq!(got, vec![7., 7., 8., 8., 9., 9., 7., 7., 8., 8., 9., 9.]);
    }

    #[test]
    fn out_of_range_and_overflowing_views_are_errors() {
        let bytes = bytes_of(&[1.0; 10]);
        let past_end = View {
            offset: 5,
            shape: vec![6],
            stride: vec![1],
        };
        let err = gather_f32(&bytes, DType::F32, &past_end, ByteOrder::Little).unwrap_err();
        assert!(err.contains("reaches element 10"), "{err}");
        let huge = View {
            offset: 1,
            shape: vec![3, 2],
            stride: vec![usize::MAX / 2, 1],
        };
        assert!(gather_f32(&bytes, DType::F32, &huge, ByteOrder::Little).is_err());
        let empty = View {
            offset: 1000,
            shape: vec![0, 5],
            stride: vec![1, 1],
        };
        assert_eq!(
            gather_f32(&bytes, DType::F32, &empty, ByteOrder::Little).unwrap(),
            Vec::<f32>::new()
        );
    }

    #[test]
    fn big_endian_storage_decodes() {
        let bytes: Vec<u8> = [1.5f32, -2.25]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let view = View::contiguous(&[2]);
        let got = gather_f32(&bytes, DType::F32, &view, ByteOrder::Big).unwrap();
        assert_eq!(got, vec![1.5, -2.25]);
    }
}

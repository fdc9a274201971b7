//! Shared by the weights-like targets: reading every entry of a file that opened, within a
//! budget (a checkpoint may legitimately broadcast one float to a huge view; `convert` refuses
//! that by its own budget, the fuzz target just skips it).

use metauas::io::weights::WeightFile;

fn element_count_of(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Bytes of decoded tensors a single input may make us allocate.
const DECODE_BUDGET: usize = 64 << 20;

pub fn read_every_entry(file: &WeightFile) {
    let mut spent = 0usize;
    for info in file.entries() {
        let bytes = element_count_of(&info.shape)
            .and_then(|n| n.checked_mul(info.dtype.size()))
            .unwrap_or(usize::MAX);
        spent = spent.saturating_add(bytes);
        if spent > DECODE_BUDGET {
            break;
        }
        let data = file.tensor_data(&info.name);
        if let Ok(data) = &data {
            assert_eq!(data.shape(), info.shape.as_slice());
            assert_eq!(data.dtype(), info.dtype);
            assert_eq!(Some(data.len()), element_count_of(&info.shape));
        }
        if info.dtype.is_float() {
            let floats = file.tensor_f32(&info.name, &info.shape);
            assert_eq!(floats.is_ok(), data.is_ok(), "{}", info.name);
        }
    }
}

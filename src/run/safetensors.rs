//! Checkpoint tensors written as safetensors by std's file API: tch's writer neither syncs
//! the file (a checkpoint renamed into place could be empty after a power cut) nor keeps
//! the I/O error (a full disk reads as a debug dump of it).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use tch::{Device, Kind, TchError, Tensor};

/// Why a checkpoint file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("tensor {name} has dtype {kind:?}, which checkpoints do not hold")]
    Kind { name: String, kind: Kind },
}

/// The safetensors name and byte width of the kinds checkpoints hold.
fn dtype(kind: Kind) -> Option<(&'static str, usize)> {
    match kind {
        Kind::Float => Some(("F32", 4)),
        Kind::Double => Some(("F64", 8)),
        Kind::Int64 => Some(("I64", 8)),
        Kind::Half => Some(("F16", 2)),
        Kind::BFloat16 => Some(("BF16", 2)),
        _ => None,
    }
}

/// Writes `tensors` to `path` (created new or truncated) and syncs it. The header lists
/// the tensors sorted by name, as tch's reader expects nothing of the order.
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), WriteError> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = BTreeMap::new();
    let mut offset = 0usize;
    for (name, tensor) in &sorted {
        let kind = tensor.f_kind()?;
        let (dtype, width) = dtype(kind).ok_or_else(|| WriteError::Kind {
            name: name.clone(),
            kind,
        })?;
        let bytes = tensor.numel() * width;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": tensor.size(),
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    // Pads the header with spaces to 8 bytes, so the data that follows is aligned.
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let file = File::create(path)?;
    let mut out = BufWriter::new(file);
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    for (_, tensor) in sorted {
        let cpu = tensor.f_to_device(Device::Cpu)?.f_contiguous()?;
        let (_, width) = dtype(cpu.f_kind()?).unwrap_or(("", 1));
        let mut bytes = vec![0u8; cpu.numel() * width];
        cpu.f_copy_data_u8(&mut bytes, cpu.numel())?;
        out.write_all(&bytes)?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(())
}

/// tch's error reading a safetensors file, in words and without the path it repeats:
/// the caller names the file.
pub fn read_error(error: &TchError) -> String {
    use ::safetensors::SafeTensorError as E;
    let TchError::SafeTensorError { err, .. } = error else {
        return error.to_string();
    };
    match err {
        E::IoError(io) => io.to_string(),
        E::InvalidHeader
        | E::InvalidHeaderStart
        | E::InvalidHeaderDeserialization
        | E::HeaderTooLarge
        | E::HeaderTooSmall
        | E::InvalidHeaderLength
        | E::JsonError(_) => {
            format!("not a readable safetensors file ({err:?}): truncated or damaged")
        }
        E::TensorNotFound(name) => format!("has no tensor {name}"),
        E::InvalidOffset(name) => format!("the offsets of tensor {name} are wrong: damaged"),
        E::TensorInvalidInfo
        | E::InvalidTensorView(..)
        | E::MetadataIncompleteBuffer
        | E::ValidationOverflow => {
            format!("its header's shapes, dtypes and offsets disagree ({err:?}): damaged")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_reads_back_with_tchs_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let tensors = vec![
            (
                "b.weight".to_string(),
                Tensor::from_slice(&[1.5f32, -2.0, 3.25, 4.0, 5.0, 6.0]).reshape([2, 3]),
            ),
            ("a.steps".to_string(), Tensor::from_slice(&[7i64])),
            ("c.moment".to_string(), Tensor::from_slice(&[0.1f64, 0.2])),
        ];
        write(&path, &tensors).unwrap();
        let read: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(read.len(), 3);
        for (name, tensor) in &tensors {
            let back = &read[name];
            assert_eq!(back.kind(), tensor.kind(), "{name}");
            assert_eq!(back.size(), tensor.size(), "{name}");
            assert!(back.equal(tensor), "{name}");
        }
    }

    /// A missing, truncated or garbled file is said in words, once, without the path
    /// (the caller names the file) and without Rust's Debug form of an I/O error.
    #[test]
    fn read_errors_are_worded_without_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let read = |path: &Path| read_error(&Tensor::read_safetensors(path).unwrap_err());
        assert_eq!(read(&path), "No such file or directory (os error 2)");
        write(&path, &[("w".into(), Tensor::from_slice(&[1f32, 2.0]))]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..4]).unwrap();
        let truncated = read(&path);
        assert!(
            truncated.starts_with("not a readable safetensors file ("),
            "{truncated}"
        );
        assert!(!truncated.contains("m.safetensors"), "{truncated}");
        let mut short = bytes.clone();
        short.truncate(bytes.len() - 4);
        std::fs::write(&path, &short).unwrap();
        let damaged = read(&path);
        assert!(
            damaged.ends_with("disagree (MetadataIncompleteBuffer): damaged"),
            "{damaged}"
        );
    }

    #[test]
    fn a_failed_write_says_the_io_error() {
        let err = write(Path::new("/no/such/folder/t.safetensors"), &[]).unwrap_err();
        assert!(matches!(err, WriteError::Io(_)), "{err:?}");
        assert_eq!(err.to_string(), "No such file or directory (os error 2)");
    }
}

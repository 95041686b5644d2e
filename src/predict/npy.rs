//! NumPy's `.npy` format (version 1.0), the part predict reads and writes: C-order arrays of
//! float32, float64, uint8 or uint16, little-endian.
use std::io::{self, Write};

const MAGIC: &[u8] = b"\x93NUMPY";
/// Refuse headers longer than this: NumPy's own are well under it, and it bounds what an
/// input file can make us allocate before its shape is known.
const MAX_HEADER: usize = 64 * 1024;
/// The most elements an input array may have (a 16384 x 16384 image).
pub const MAX_ELEMENTS: usize = 1 << 28;

/// A 2-D or 3-D array read from a `.npy` file, as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Parses `bytes` as an `.npy` file; the error says what is wrong.
pub fn parse(bytes: &[u8]) -> Result<Array, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => {
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (len as usize, 12)
        }
        v => return Err(format!(".npy version {v} is not supported")),
    };
    if header_len > MAX_HEADER || start + header_len > bytes.len() {
        return Err(format!("header of {header_len} bytes runs past the file"));
    }
    let header = std::str::from_utf8(&bytes[start..start + header_len])
        .map_err(|_| "header is not text".to_string())?;
    let descr = field(header, "descr").ok_or("header has no descr")?;
    if field(header, "fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err(
            "Fortran-order arrays are not supported; save with np.ascontiguousarray".into(),
        );
    }
    let shape = shape(header)?;
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| format!("shape {shape:?} is larger than {MAX_ELEMENTS} elements"))?;
    let data = &bytes[start + header_len..];
    let values = decode(quoted(descr).ok_or("descr is not a string")?, data, count)?;
    Ok(Array { shape, values })
}

/// The text after `'key':` up to the next comma at the top level.
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = header[at + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?;
    Some(rest.trim_start())
}

/// The text of a value that starts with a quoted string.
fn quoted(value: &str) -> Option<&str> {
    let quote = value.chars().next().filter(|c| matches!(c, '\'' | '"'))?;
    value[1..].split(quote).next()
}

fn shape(header: &str) -> Result<Vec<usize>, String> {
    let rest = field(header, "shape").ok_or("header has no shape")?;
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.split(')').next())
        .ok_or("shape is not a tuple")?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.parse()
                .map_err(|_| format!("shape entry {d:?} is not a size"))
        })
        .collect()
}

fn decode(descr: &str, data: &[u8], count: usize) -> Result<Vec<f32>, String> {
    let size = match descr {
        "<f4" => 4,
        "<f8" => 8,
        "|u1" | "<u1" => 1,
        "<u2" => 2,
        other => {
            return Err(format!(
                "dtype {other} is not supported (float32, float64, uint8 or uint16, little-endian)"
            ))
        }
    };
    if data.len() != count * size {
        return Err(format!(
            "{} bytes of data for {count} elements of {size} bytes",
            data.len()
        ));
    }
    let values = data.chunks_exact(size).map(|c| match descr {
        "<f4" => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        "<f8" => f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32,
        "<u2" => f32::from(u16::from_le_bytes([c[0], c[1]])) / 65535.0,
        _ => f32::from(c[0]) / 255.0,
    });
    Ok(values.collect())
}

/// Writes a float32 array of `shape` in `.npy` format.
pub fn write_f32(out: &mut impl Write, shape: &[usize], values: &[f32]) -> io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // The magic, version, length and header together are a multiple of 64, ending in \n.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    out.write_all(MAGIC)?;
    out.write_all(&[1, 0])?;
    out.write_all(&(header.len() as u16).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    for v in values {
        out.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_arrays_read_back() {
        let mut bytes = Vec::new();
        write_f32(&mut bytes, &[2, 3], &[0.0, 0.5, 1.0, 0.25, 0.75, 1.5]).unwrap();
        assert_eq!((bytes.len() - 24) % 64, 0, "header padded to 64");
        let array = parse(&bytes).unwrap();
        assert_eq!(array.shape, [2, 3]);
        assert_eq!(array.values, [0.0, 0.5, 1.0, 0.25, 0.75, 1.5]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert!(parse(b"PNG....").unwrap_err().contains("magic"));
        let mut bytes = Vec::new();
        write_f32(&mut bytes, &[4], &[1.0; 4]).unwrap();
        bytes.truncate(bytes.len() - 3);
        assert!(parse(&bytes).unwrap_err().contains("bytes of data"));
        let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }\n";
        let mut bytes = MAGIC.to_vec();
        bytes.extend([1, 0]);
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend([0; 8]);
        assert!(parse(&bytes).unwrap_err().contains("<i8"));
        let huge = header
            .replace("<i8", "<f4")
            .replace("(1,)", "(100000, 100000)");
        let mut bytes = MAGIC.to_vec();
        bytes.extend([1, 0]);
        bytes.extend((huge.len() as u16).to_le_bytes());
        bytes.extend(huge.as_bytes());
        assert!(parse(&bytes).unwrap_err().contains("larger than"));
    }
}

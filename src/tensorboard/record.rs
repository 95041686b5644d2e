//! TFRecord framing: every event file is a sequence of length-prefixed,
//! checksummed records, which lets readers detect and skip a torn last record.

use std::io::{self, Write};

/// CRC32C of `data`, rotated and offset as TFRecord requires; the mask keeps a
/// CRC over data that itself contains CRCs from being degenerate.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// Writes one record: u64 LE length, masked CRC of those 8 bytes, the payload,
/// masked CRC of the payload.
pub fn write_record(out: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = (payload.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc32c(&len).to_le_bytes())?;
    out.write_all(payload)?;
    out.write_all(&masked_crc32c(payload).to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values come from `tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c`
    /// (tensorboard 2.21).
    #[test]
    fn masked_crc_matches_python_reference() {
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc32c(b"hello world"), 0x6dd8_7e00);
        assert_eq!(masked_crc32c(&11u64.to_le_bytes()), 0x04f5_1586);
    }

    /// Bytes produced by `tensorboard.summary.writer.record_writer.RecordWriter`
    /// for the payload `b"hello world"`.
    #[test]
    fn record_framing_matches_python_writer() {
        let mut out = Vec::new();
        write_record(&mut out, b"hello world").unwrap();
        let expected: Vec<u8> = [
            &[0x0b, 0, 0, 0, 0, 0, 0, 0][..],
            &[0x86, 0x15, 0xf5, 0x04],
            b"hello world",
            &[0x00, 0x7e, 0xd8, 0x6d],
        ]
        .concat();
        assert_eq!(out, expected);
    }
}

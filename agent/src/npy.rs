//! A small `.npy` reader and writer (format versions 1.0-3.0): little-endian or
//! single-byte element types the runtime carries (`f4 f8 i1 u1 i2 i4 i8`), C order.
//!
//! Every length is checked before it is used: the header is capped at
//! [`MAX_HEADER_BYTES`], and the data must be exactly `shape.product() * itemsize` bytes.

use outpost_protocol::release::DType;

use crate::runtime::HostTensor;

/// Largest header accepted (numpy writes 128 bytes or so).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

const MAGIC: &[u8] = b"\x93NUMPY";

/// Why a `.npy` file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NpyError {
    /// Not a `.npy` file, or cut short.
    #[error("not a .npy file: {0}")]
    Format(String),
    /// A header this reader does not handle (Fortran order, big-endian, unknown dtype).
    #[error("unsupported .npy header: {0}")]
    Unsupported(String),
    /// The data does not have the length the header says.
    #[error(".npy data is {got} bytes, header says {expected}")]
    Length {
        /// Bytes the header implies.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
}

/// Parses `.npy` bytes into a tensor.
pub fn read(bytes: &[u8]) -> Result<HostTensor, NpyError> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(NpyError::Format("missing \\x93NUMPY magic".into()));
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(NpyError::Format("header length cut short".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(NpyError::Unsupported(format!("format version {v}"))),
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(NpyError::Format(format!("header of {header_len} bytes")));
    }
    let end = start + header_len;
    let header = bytes
        .get(start..end)
        .ok_or_else(|| NpyError::Format("header cut short".into()))?;
    let header =
        std::str::from_utf8(header).map_err(|_| NpyError::Format("header is not text".into()))?;
    let descr = dict_value(header, "descr")?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let dtype = match descr {
        "<f4" => DType::F32,
        "<f8" => DType::F64,
        "|i1" | "<i1" | "i1" => DType::I8,
        "|u1" | "<u1" | "u1" => DType::U8,
        "<i2" => DType::I16,
        "<i4" => DType::I32,
        "<i8" => DType::I64,
        other => return Err(NpyError::Unsupported(format!("dtype {other}"))),
    };
    let fortran = dict_value(header, "fortran_order")?;
    if fortran.trim() != "False" {
        return Err(NpyError::Unsupported("Fortran order".into()));
    }
    let shape_text = dict_value(header, "shape")?;
    let inner = shape_text
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| NpyError::Format(format!("shape {shape_text}")))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| NpyError::Format(format!("shape {shape_text}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let expected = shape
        .iter()
        .try_fold(dtype.size(), |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| NpyError::Format(format!("shape {shape:?} overflows")))?;
    let data = &bytes[end..];
    if data.len() != expected {
        return Err(NpyError::Length {
            expected,
            got: data.len(),
        });
    }
    Ok(HostTensor {
        dtype,
        shape,
        data: data.to_vec(),
    })
}

/// The text after `'key':` up to the next top-level comma or the closing brace.
fn dict_value<'a>(header: &'a str, key: &str) -> Result<&'a str, NpyError> {
    let pat_single = format!("'{key}'");
    let pat_double = format!("\"{key}\"");
    let at = header
        .find(&pat_single)
        .map(|i| i + pat_single.len())
        .or_else(|| header.find(&pat_double).map(|i| i + pat_double.len()))
        .ok_or_else(|| NpyError::Format(format!("header has no {key:?}")))?;
    let rest = header[at..]
        .trim_start()
        .strip_prefix(':')
        .ok_or_else(|| NpyError::Format(format!("header: {key:?} has no value")))?;
    let mut depth = 0usize;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth = depth.saturating_sub(1),
            ',' | '}' if depth == 0 => return Ok(&rest[..i]),
            _ => {}
        }
    }
    Err(NpyError::Format(format!(
        "header: {key:?} is not terminated"
    )))
}

/// Serializes a tensor as `.npy` version 1.0.
pub fn write(t: &HostTensor) -> Vec<u8> {
    let descr = match t.dtype {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::I16 => "<i2",
        DType::I32 => "<i4",
        _ => "<i8",
    };
    let shape = match t.shape.len() {
        1 => format!("({},)", t.shape[0]),
        _ => format!(
            "({})",
            t.shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that the data starts on a 64-byte boundary, header ends with '\n'.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&t.data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype() {
        for dtype in [
            DType::F32,
            DType::F64,
            DType::I8,
            DType::U8,
            DType::I16,
            DType::I32,
            DType::I64,
        ] {
            let t =
                HostTensor::from_f64_values(dtype, vec![2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap();
            let bytes = write(&t);
            assert_eq!((bytes.len() - t.data.len()) % 64, 0);
            assert_eq!(read(&bytes).unwrap(), t, "{dtype:?}");
        }
        let scalar = HostTensor::from_f32(vec![], &[7.0]).unwrap();
        assert_eq!(read(&write(&scalar)).unwrap(), scalar);
        let vector = HostTensor::from_f32(vec![3], &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(read(&write(&vector)).unwrap(), vector);
    }

    #[test]
    fn reads_numpy_written_header() {
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&1.5f32.to_le_bytes());
        bytes.extend_from_slice(&(-2.0f32).to_le_bytes());
        let t = read(&bytes).unwrap();
        assert_eq!(t.shape, vec![1, 2]);
        assert_eq!(t.to_f32_vec().unwrap(), vec![1.5, -2.0]);
    }

    #[test]
    fn rejects_truncated_data() {
        let t = HostTensor::from_f32(vec![4], &[1.0; 4]).unwrap();
        let bytes = write(&t);
        assert!(matches!(
            read(&bytes[..bytes.len() - 1]),
            Err(NpyError::Length {
                expected: 16,
                got: 15
            })
        ));
    }

    #[test]
    fn rejects_header_length_past_end_and_huge_shape() {
        let mut bytes = b"\x93NUMPY\x01\x00\xff\x7f".to_vec();
        bytes.extend_from_slice(b"{'descr'");
        assert!(matches!(read(&bytes), Err(NpyError::Format(_))));

        let header = format!(
            "{{'descr': '<f8', 'fortran_order': False, 'shape': ({}, 4), }}",
            usize::MAX / 2
        );
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        assert!(matches!(read(&bytes), Err(NpyError::Format(_))));
    }

    #[test]
    fn rejects_big_endian_and_fortran_order() {
        for header in [
            "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }",
            "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }",
        ] {
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&[0; 4]);
            assert!(matches!(read(&bytes), Err(NpyError::Unsupported(_))));
        }
    }
}

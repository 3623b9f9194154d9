//! [`HostTensor`]: a typed, shaped buffer of little-endian bytes, the runtime's input and
//! output type, and its conversion to and from tract tensors.

use outpost_protocol::release::{DType, TensorData};
use tract_onnx::prelude::{DatumType, Tensor};

use super::RuntimeError;

/// A tensor owned by the caller: element type, shape and the elements as little-endian
/// bytes in row-major order. This is the layout of `.npy` files and of the C ABI buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Element type.
    pub dtype: DType,
    /// Shape (batch dimension included).
    pub shape: Vec<usize>,
    /// `element_count * dtype.size()` little-endian bytes.
    pub data: Vec<u8>,
}

impl HostTensor {
    /// Builds a tensor, checking that `data` holds exactly as many bytes as `shape` needs.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Self, RuntimeError> {
        let expected = byte_len(dtype, &shape).ok_or_else(|| RuntimeError::ShapeOverflow {
            shape: shape.clone(),
        })?;
        if expected != data.len() {
            return Err(RuntimeError::WrongByteLength {
                input: String::new(),
                expected,
                got: data.len(),
            });
        }
        Ok(HostTensor { dtype, shape, data })
    }

    /// An `f32` tensor from values. Fails when `values.len()` does not fill `shape`.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Self, RuntimeError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        HostTensor::new(DType::F32, shape, data)
    }

    /// A tensor of `dtype` from `f64` values (integers are converted with `as`, which
    /// saturates). Used for golden vectors, whose JSON carries every value as a number.
    pub fn from_f64_values(
        dtype: DType,
        shape: Vec<usize>,
        values: &[f64],
    ) -> Result<Self, RuntimeError> {
        let mut data = Vec::with_capacity(values.len() * dtype.size());
        for &v in values {
            match dtype {
                DType::F32 => data.extend_from_slice(&(v as f32).to_le_bytes()),
                DType::F64 => data.extend_from_slice(&v.to_le_bytes()),
                DType::I8 => data.extend_from_slice(&(v as i8).to_le_bytes()),
                DType::U8 => data.extend_from_slice(&(v as u8).to_le_bytes()),
                DType::I16 => data.extend_from_slice(&(v as i16).to_le_bytes()),
                DType::I32 => data.extend_from_slice(&(v as i32).to_le_bytes()),
                DType::I64 => data.extend_from_slice(&(v as i64).to_le_bytes()),
                other => return Err(RuntimeError::UnsupportedDtype(format!("{other:?}"))),
            }
        }
        HostTensor::new(dtype, shape, data)
    }

    /// A golden-vector tensor from release metadata.
    pub fn from_tensor_data(t: &TensorData) -> Result<Self, RuntimeError> {
        HostTensor::from_f64_values(t.dtype, t.shape.clone(), &t.data)
    }

    /// Number of elements.
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements as `f64` (exact for every supported type except `i64` beyond 2^53).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let size = self.dtype.size();
        self.data
            .chunks_exact(size)
            .map(|c| match self.dtype {
                DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                DType::F64 => f64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
                DType::I8 => c[0] as i8 as f64,
                DType::U8 => c[0] as f64,
                DType::I16 => i16::from_le_bytes([c[0], c[1]]) as f64,
                DType::I32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                DType::I64 => i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64,
                _ => f64::NAN,
            })
            .collect()
    }

    /// The elements as `f32` when the tensor is `f32`.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    pub(crate) fn to_tract(&self) -> Result<Tensor, RuntimeError> {
        fn build<T, const N: usize>(
            t: &HostTensor,
            from: fn([u8; N]) -> T,
        ) -> Result<Tensor, RuntimeError>
        where
            T: tract_onnx::prelude::Datum + Copy,
        {
            let values: Vec<T> = t
                .data
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    from(a)
                })
                .collect();
            Tensor::from_shape(&t.shape, &values).map_err(|e| RuntimeError::Run {
                message: format!("{e:#}"),
            })
        }
        match self.dtype {
            DType::F32 => build(self, f32::from_le_bytes),
            DType::F64 => build(self, f64::from_le_bytes),
            DType::I8 => build(self, i8::from_le_bytes),
            DType::U8 => build(self, u8::from_le_bytes),
            DType::I16 => build(self, i16::from_le_bytes),
            DType::I32 => build(self, i32::from_le_bytes),
            DType::I64 => build(self, i64::from_le_bytes),
            other => Err(RuntimeError::UnsupportedDtype(format!("{other:?}"))),
        }
    }

    pub(crate) fn from_tract(t: &Tensor) -> Result<Self, RuntimeError> {
        fn collect<T: tract_onnx::prelude::Datum + Copy, const N: usize>(
            t: &Tensor,
            to: fn(T) -> [u8; N],
        ) -> Result<Vec<u8>, RuntimeError> {
            let view = t
                .to_plain_array_view::<T>()
                .map_err(|e| RuntimeError::Run {
                    message: format!("{e:#}"),
                })?;
            Ok(view.iter().flat_map(|v| to(*v)).collect())
        }
        let dt = t.datum_type();
        let (dtype, data) = match dt {
            DatumType::F32 => (DType::F32, collect(t, f32::to_le_bytes)?),
            DatumType::F64 => (DType::F64, collect(t, f64::to_le_bytes)?),
            DatumType::I8 => (DType::I8, collect(t, i8::to_le_bytes)?),
            DatumType::U8 => (DType::U8, collect(t, u8::to_le_bytes)?),
            DatumType::I16 => (DType::I16, collect(t, i16::to_le_bytes)?),
            DatumType::I32 => (DType::I32, collect(t, i32::to_le_bytes)?),
            DatumType::I64 => (DType::I64, collect(t, i64::to_le_bytes)?),
            other => return Err(RuntimeError::UnsupportedDtype(format!("{other:?}"))),
        };
        Ok(HostTensor {
            dtype,
            shape: t.shape().to_vec(),
            data,
        })
    }
}

/// Bytes needed for `shape` elements of `dtype`, `None` on overflow.
pub(crate) fn byte_len(dtype: DType, shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, d| acc.checked_mul(*d))
}

/// The tract element type of a release dtype.
pub(crate) fn datum_type(dtype: DType) -> Result<DatumType, RuntimeError> {
    Ok(match dtype {
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::I8 => DatumType::I8,
        DType::U8 => DatumType::U8,
        DType::I16 => DatumType::I16,
        DType::I32 => DatumType::I32,
        DType::I64 => DatumType::I64,
        other => return Err(RuntimeError::UnsupportedDtype(format!("{other:?}"))),
    })
}

/// The short name used in JSON and messages (`f32`, `u8`, ...), as in release metadata.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::I8 => "i8",
        DType::U8 => "u8",
        DType::I16 => "i16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_data_shorter_than_shape() {
        let err = HostTensor::new(DType::F32, vec![2, 2], vec![0; 15]).unwrap_err();
        assert!(matches!(
            err,
            RuntimeError::WrongByteLength {
                expected: 16,
                got: 15,
                ..
            }
        ));
    }

    #[test]
    fn rejects_shape_whose_byte_length_overflows() {
        let err = HostTensor::new(DType::F64, vec![usize::MAX / 2, 3], vec![]).unwrap_err();
        assert!(matches!(err, RuntimeError::ShapeOverflow { .. }));
    }

    #[test]
    fn tract_round_trip_keeps_values_for_every_dtype() {
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
                HostTensor::from_f64_values(dtype, vec![2, 3], &[0., 1., 2., 3., 4., 5.]).unwrap();
            let back = HostTensor::from_tract(&t.to_tract().unwrap()).unwrap();
            assert_eq!(back, t, "{dtype:?}");
            assert_eq!(back.to_f64_vec(), vec![0., 1., 2., 3., 4., 5.]);
        }
    }
}

//! Finds tensor data inside a serialized ONNX `ModelProto` without deserializing it.
//!
//! Field numbers from `onnx.proto`: ModelProto.graph = 7, .training_info = 20
//! (TrainingInfoProto.initialization = 1, .algorithm = 2), .functions = 25
//! (FunctionProto.node = 7); GraphProto.node = 1, .initializer = 5,
//! .sparse_initializer = 15 (SparseTensorProto.values = 1); NodeProto.attribute = 5;
//! AttributeProto.t = 5, .g = 6, .tensors = 10, .graphs = 11, .sparse_tensor = 22,
//! .sparse_tensors = 23; TensorProto.dims = 1, .data_type = 2, .float_data = 4 (packed),
//! .name = 8, .raw_data = 9, .double_data = 10 (packed).
//!
//! The walk is best effort: a malformed message ends the walk of that message, and the
//! ranges found so far are still valid ranges of the input.

use super::wire::{Reader, Value};
use std::ops::Range;

/// Subgraph nesting deeper than this is not walked.
const MAX_DEPTH: u32 = 32;

/// The data of one tensor: its bytes are `model[data]`, little-endian elements of
/// `width` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tensor<'a> {
    pub(crate) name: &'a [u8],
    pub(crate) data_type: u64,
    pub(crate) dims: Vec<u64>,
    pub(crate) width: usize,
    pub(crate) data: Range<usize>,
}

impl Tensor<'_> {
    /// Whether the elements are IEEE floats (XOR against the base suits them).
    pub(crate) fn is_float(&self) -> bool {
        matches!(self.data_type, 1 | 10 | 11 | 16)
    }
}

/// Element width in bytes of an ONNX `TensorProto.DataType` stored as `raw_data`.
fn width_of(data_type: u64) -> Option<usize> {
    Some(match data_type {
        // UINT8, INT8, BOOL, FLOAT8 variants
        2 | 3 | 9 | 17..=20 => 1,
        // UINT16, INT16, FLOAT16, BFLOAT16
        4 | 5 | 10 | 16 => 2,
        // FLOAT, INT32, UINT32
        1 | 6 | 12 => 4,
        // INT64, DOUBLE, UINT64, COMPLEX64
        7 | 11 | 13 | 14 => 8,
        _ => return None,
    })
}

/// Every tensor with fixed-width data in `model`, in file order.
pub(crate) fn tensors(model: &[u8]) -> Vec<Tensor<'_>> {
    let mut out = Vec::new();
    let mut r = Reader::new(model);
    while let Some((number, value)) = r.field() {
        let Value::Len(range) = value else { continue };
        let sub = r.sub(range);
        match number {
            7 => graph(sub, 0, &mut out),
            20 => messages(sub, &[1, 2], |g| graph(g, 0, &mut out)),
            25 => messages(sub, &[7], |n| node(n, 0, &mut out)),
            _ => {}
        }
    }
    out.sort_by_key(|t| t.data.start);
    out
}

/// Calls `f` on every length-delimited field of `r` numbered in `numbers`.
fn messages<'a>(mut r: Reader<'a>, numbers: &[u64], mut f: impl FnMut(Reader<'a>)) {
    while let Some((number, value)) = r.field() {
        if let Value::Len(range) = value
            && numbers.contains(&number)
        {
            f(r.sub(range));
        }
    }
}

fn graph<'a>(mut r: Reader<'a>, depth: u32, out: &mut Vec<Tensor<'a>>) {
    if depth > MAX_DEPTH {
        return;
    }
    while let Some((number, value)) = r.field() {
        let Value::Len(range) = value else { continue };
        let sub = r.sub(range);
        match number {
            1 => node(sub, depth, out),
            5 => tensor(sub, out),
            15 => messages(sub, &[1], |t| tensor(t, out)),
            _ => {}
        }
    }
}

fn node<'a>(r: Reader<'a>, depth: u32, out: &mut Vec<Tensor<'a>>) {
    messages(r, &[5], |a| attribute(a, depth, out));
}

fn attribute<'a>(mut r: Reader<'a>, depth: u32, out: &mut Vec<Tensor<'a>>) {
    while let Some((number, value)) = r.field() {
        let Value::Len(range) = value else { continue };
        let sub = r.sub(range);
        match number {
            5 | 10 => tensor(sub, out),
            6 | 11 => graph(sub, depth + 1, out),
            22 | 23 => messages(sub, &[1], |t| tensor(t, out)),
            _ => {}
        }
    }
}

fn tensor<'a>(mut r: Reader<'a>, out: &mut Vec<Tensor<'a>>) {
    let mut name: &[u8] = &[];
    let mut data_type = 0;
    let mut dims = Vec::new();
    let mut raw = None;
    let mut packed = None;
    while let Some((number, value)) = r.field() {
        match (number, value) {
            (1, Value::Varint(d)) => dims.push(d),
            (1, Value::Len(range)) => {
                let mut p = r.sub(range);
                while !p.is_empty() {
                    let Some(d) = p.varint() else { return };
                    dims.push(d);
                }
            }
            (2, Value::Varint(t)) => data_type = t,
            (8, Value::Len(range)) => name = r.slice(range),
            (9, Value::Len(range)) => raw = Some(range),
            (4, Value::Len(range)) => packed = Some((range, 4)),
            (10, Value::Len(range)) => packed = Some((range, 8)),
            _ => {}
        }
    }
    let found = match (raw, packed) {
        (Some(range), _) => width_of(data_type).map(|w| (range, w)),
        (None, Some(p)) => Some(p),
        (None, None) => None,
    };
    if let Some((data, width)) = found
        && !data.is_empty()
        && data.len() % width == 0
    {
        out.push(Tensor {
            name,
            data_type,
            dims,
            width,
            data,
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::delta::wire::put_varint;

    /// Minimal protobuf writer for building ONNX-like test models.
    pub(crate) fn field(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
        put_varint(out, number << 3 | 2);
        put_varint(out, payload.len() as u64);
        out.extend_from_slice(payload);
    }

    pub(crate) fn varint_field(out: &mut Vec<u8>, number: u64, v: u64) {
        put_varint(out, number << 3);
        put_varint(out, v);
    }

    pub(crate) fn tensor_proto(name: &str, dims: &[u64], data_type: u64, raw: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        for &d in dims {
            varint_field(&mut t, 1, d);
        }
        varint_field(&mut t, 2, data_type);
        field(&mut t, 8, name.as_bytes());
        field(&mut t, 9, raw);
        t
    }

    #[test]
    fn finds_initializers_constants_and_subgraph_tensors() {
        let w: Vec<u8> = (0..16u8).collect();
        let mut sub = Vec::new();
        field(&mut sub, 5, &tensor_proto("inner", &[2], 1, &w[..8]));
        let mut attr_g = Vec::new();
        field(&mut attr_g, 1, b"then_branch");
        field(&mut attr_g, 6, &sub);
        let mut if_node = Vec::new();
        field(&mut if_node, 4, b"If");
        field(&mut if_node, 5, &attr_g);

        // Constant with packed float_data instead of raw_data
        let mut c = Vec::new();
        varint_field(&mut c, 2, 1);
        field(&mut c, 8, b"const");
        field(&mut c, 4, &w[..12]);
        let mut attr_t = Vec::new();
        field(&mut attr_t, 1, b"value");
        field(&mut attr_t, 5, &c);
        let mut const_node = Vec::new();
        field(&mut const_node, 4, b"Constant");
        field(&mut const_node, 5, &attr_t);

        let mut g = Vec::new();
        field(&mut g, 1, &const_node);
        field(&mut g, 1, &if_node);
        field(&mut g, 5, &tensor_proto("init", &[4], 6, &w));
        let mut model = Vec::new();
        varint_field(&mut model, 1, 8);
        field(&mut model, 7, &g);

        let found = tensors(&model);
        let names: Vec<&[u8]> = found.iter().map(|t| t.name).collect();
        assert_eq!(names, [&b"const"[..], b"inner", b"init"]);
        assert_eq!(&model[found[0].data.clone()], &w[..12]);
        assert_eq!(&model[found[1].data.clone()], &w[..8]);
        assert_eq!(&model[found[2].data.clone()], &w[..]);
        assert_eq!(found[2].dims, [4]);
        assert_eq!(found[2].width, 4);
    }

    #[test]
    fn stops_at_malformed_lengths_without_panicking() {
        let mut g = Vec::new();
        field(
            &mut g,
            5,
            &tensor_proto("w", &[2], 1, &[1, 2, 3, 4, 5, 6, 7, 8]),
        );
        let mut model = Vec::new();
        field(&mut model, 7, &g);
        for cut in 0..model.len() {
            for t in tensors(&model[..cut]) {
                assert!(t.data.end <= cut);
            }
        }
        let mut bad = model.clone();
        bad[1] = 0x7f; // graph length beyond the buffer
        assert!(tensors(&bad).is_empty());
    }
}

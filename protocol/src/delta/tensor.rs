//! The tensor-aware codec ([`super::Codec::Tensor`]).
//!
//! Payload: three sections, each `varint raw_len | varint frame_len | zstd frame`
//! (`frame_len` is 0 when `raw_len` is 0):
//!
//! 1. ops (no prefix): `varint count`, then ops covering the target in order:
//!    `0 len` literal bytes from section 2; `1 base_off len` a copy of a base range;
//!    `2 base_off len transform width stored_len` the next `stored_len` bytes of
//!    section 3, inverse transformed against `base[base_off..][..len]`;
//!    `3 base_off base_len len transform width stored_len rank base_dims target_dims`
//!    the same against a base tensor of another shape (same rank), laid out in the
//!    target's shape: elements inside both shapes come from the base, the rest are 0
//!    (a widened layer keeps its old rows and columns aligned).
//! 2. literals, compressed with the base as reference prefix.
//! 3. transformed tensor differences.
//!
//! Transforms work on little-endian elements of `width` bytes (1, 2, 4 or 8): `1` XOR,
//! `2` wrapping difference, zigzag-encoded. Both then split the elements into byte planes
//! (byte 0 of every element, then byte 1, ...), which puts the mostly-zero high bytes
//! of small differences next to each other. With bit `0x80` set (widths 2, 4, 8), the
//! elements are first grouped by the exponent bits of the base element (a stable
//! counting sort the decoder repeats from the base), so that differences of similar
//! magnitude sit together. `3` is the sparse zigzag difference:
//! `varint count | count x element value | count x varint gap`, for tensors where few
//! elements changed.

use super::onnx::{self, Tensor};
use super::wire::{Reader, put_varint};
use super::{DeltaError, Result, zref};
use std::collections::HashMap;

const OP_LITERAL: u8 = 0;
const OP_COPY: u8 = 1;
const OP_DELTA: u8 = 2;
const OP_RESHAPED: u8 = 3;
/// Highest tensor rank a reshaped difference may declare.
const MAX_RANK: usize = 8;

/// Hard cap on the decoded ops section.
const MAX_OPS_BYTES: u64 = 64 << 20;
/// Tensors smaller than this stay in the literal section: an op would cost more than
/// the reference-prefix match that covers them there.
const MIN_TENSOR_LEN: usize = 64;
/// Transforms of tensors up to this size are compared at the encoding level; larger ones
/// at [`PROBE_LEVEL`], which is fast but sometimes ranks them differently.
const EXACT_PROBE_LEN: usize = 1 << 20;
/// zstd level for comparing transforms of large tensors.
const PROBE_LEVEL: i32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transform {
    Xor { grouped: bool },
    Sub { grouped: bool },
    Sparse,
    Split { grouped: bool },
}

const GROUPED: u8 = 0x80;

impl Transform {
    fn id(self) -> u8 {
        match self {
            Transform::Xor { grouped } => 1 | if grouped { GROUPED } else { 0 },
            Transform::Sub { grouped } => 2 | if grouped { GROUPED } else { 0 },
            Transform::Sparse => 3,
            Transform::Split { grouped } => 4 | if grouped { GROUPED } else { 0 },
        }
    }

    fn from_id(id: u8) -> Option<Self> {
        let grouped = id & GROUPED != 0;
        match id & !GROUPED {
            1 => Some(Transform::Xor { grouped }),
            2 => Some(Transform::Sub { grouped }),
            3 if !grouped => Some(Transform::Sparse),
            4 => Some(Transform::Split { grouped }),
            _ => None,
        }
    }

    fn grouped(self) -> bool {
        matches!(
            self,
            Transform::Xor { grouped: true }
                | Transform::Sub { grouped: true }
                | Transform::Split { grouped: true }
        )
    }

    /// Whether the transform stores exactly one byte per target byte.
    fn dense(self) -> bool {
        matches!(self, Transform::Xor { .. } | Transform::Sub { .. })
    }
}

enum Op {
    Literal(usize),
    Copy {
        off: usize,
        len: usize,
    },
    Delta {
        off: usize,
        len: usize,
        transform: Transform,
        width: usize,
        stored: usize,
        reshape: Option<Box<Reshape>>,
    },
}

/// Shapes of a difference whose base tensor has another shape than the target.
struct Reshape {
    base_len: usize,
    base_dims: Vec<usize>,
    target_dims: Vec<usize>,
}

impl Reshape {
    /// `None` unless both shapes have the same rank (1..=MAX_RANK) and describe exactly
    /// `base_len` and `len` bytes of `width`-byte elements.
    fn checked(
        base_dims: Vec<usize>,
        target_dims: Vec<usize>,
        width: usize,
        base_len: usize,
        len: usize,
    ) -> Option<Self> {
        let bytes = |dims: &[usize]| dims.iter().try_fold(width, |acc, &d| acc.checked_mul(d));
        let ok = (1..=MAX_RANK).contains(&base_dims.len())
            && base_dims.len() == target_dims.len()
            && bytes(&base_dims) == Some(base_len)
            && bytes(&target_dims) == Some(len);
        ok.then_some(Reshape {
            base_len,
            base_dims,
            target_dims,
        })
    }

    /// The base tensor laid out in the target's shape (zeros outside the base's shape).
    fn align(&self, base: &[u8], width: usize) -> Vec<u8> {
        let (b, t) = (&self.base_dims, &self.target_dims);
        let rank = t.len();
        let (blast, tlast) = (b[rank - 1] * width, t[rank - 1] * width);
        let copy = blast.min(tlast);
        let rows: usize = t[..rank - 1].iter().product();
        let mut out = vec![0u8; rows * tlast];
        let mut idx = vec![0usize; rank - 1];
        for row in 0..rows {
            if idx.iter().zip(b).all(|(i, d)| i < d) {
                let brow = idx.iter().zip(b).fold(0, |acc, (i, d)| acc * d + i);
                out[row * tlast..][..copy].copy_from_slice(&base[brow * blast..][..copy]);
            }
            for d in (0..rank - 1).rev() {
                idx[d] += 1;
                if idx[d] < t[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }
}

/// Appends the tensor-codec payload for `base` -> `target` to `out`.
pub(crate) fn encode(base: &[u8], target: &[u8], level: i32, out: &mut Vec<u8>) -> Result<()> {
    let base_tensors = onnx::tensors(base);
    let mut by_key: HashMap<(&[u8], usize), &Tensor<'_>> = HashMap::new();
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    for t in &base_tensors {
        let n = seen.entry(t.name).or_default();
        by_key.insert((t.name, *n), t);
        *n += 1;
    }
    seen.clear();

    let mut ops = Vec::new();
    let mut literals = Vec::new();
    let mut diffs = Vec::new();
    let mut cursor = 0;
    for t in onnx::tensors(target) {
        let n = seen.entry(t.name).or_default();
        let key = (t.name, *n);
        *n += 1;
        let Some(b) = by_key.get(&key) else { continue };
        if t.data.start < cursor || t.data.len() < MIN_TENSOR_LEN || b.width != t.width {
            continue;
        }
        let (tb, bb) = (&target[t.data.clone()], &base[b.data.clone()]);
        let reshape = if bb.len() == tb.len() {
            None
        } else {
            let dims = |d: &[u64]| {
                d.iter()
                    .map(|&x| usize::try_from(x).ok())
                    .collect::<Option<Vec<_>>>()
            };
            let (Some(bd), Some(td)) = (dims(&b.dims), dims(&t.dims)) else {
                continue;
            };
            match Reshape::checked(bd, td, t.width, bb.len(), tb.len()) {
                Some(r) => Some(Box::new(r)),
                None => continue,
            }
        };
        let aligned;
        let bb = match &reshape {
            Some(r) => {
                aligned = r.align(bb, t.width);
                &aligned[..]
            }
            None => bb,
        };
        let op = if tb == bb && reshape.is_none() {
            Op::Copy {
                off: b.data.start,
                len: tb.len(),
            }
        } else {
            let probe = if tb.len() <= EXACT_PROBE_LEN {
                level
            } else {
                PROBE_LEVEL.min(level)
            };
            match best_transform(&t, bb, tb, probe)? {
                Some((transform, bytes)) => {
                    diffs.extend_from_slice(&bytes);
                    Op::Delta {
                        off: b.data.start,
                        len: tb.len(),
                        transform,
                        width: t.width,
                        stored: bytes.len(),
                        reshape,
                    }
                }
                None => continue,
            }
        };
        if t.data.start > cursor {
            ops.push(Op::Literal(t.data.start - cursor));
            literals.extend_from_slice(&target[cursor..t.data.start]);
        }
        ops.push(op);
        cursor = t.data.end;
    }
    if cursor < target.len() {
        ops.push(Op::Literal(target.len() - cursor));
        literals.extend_from_slice(&target[cursor..]);
    }

    let mut op_bytes = Vec::new();
    put_varint(&mut op_bytes, ops.len() as u64);
    for op in &ops {
        match op {
            Op::Literal(len) => {
                op_bytes.push(OP_LITERAL);
                put_varint(&mut op_bytes, *len as u64);
            }
            Op::Copy { off, len } => {
                op_bytes.push(OP_COPY);
                put_varint(&mut op_bytes, *off as u64);
                put_varint(&mut op_bytes, *len as u64);
            }
            Op::Delta {
                off,
                len,
                transform,
                width,
                stored,
                reshape,
            } => {
                op_bytes.push(if reshape.is_some() {
                    OP_RESHAPED
                } else {
                    OP_DELTA
                });
                put_varint(&mut op_bytes, *off as u64);
                if let Some(r) = reshape {
                    put_varint(&mut op_bytes, r.base_len as u64);
                }
                put_varint(&mut op_bytes, *len as u64);
                op_bytes.push(transform.id());
                op_bytes.push(*width as u8);
                put_varint(&mut op_bytes, *stored as u64);
                if let Some(r) = reshape {
                    op_bytes.push(r.base_dims.len() as u8);
                    for &d in r.base_dims.iter().chain(&r.target_dims) {
                        put_varint(&mut op_bytes, d as u64);
                    }
                }
            }
        }
    }
    put_section(out, &[], &op_bytes, level)?;
    put_section(out, base, &literals, level)?;
    put_section(out, &[], &diffs, level)?;
    Ok(())
}

/// The transform whose output compresses best, or `None` if storing the target bytes
/// as literals is no worse.
fn best_transform(
    t: &Tensor<'_>,
    base: &[u8],
    target: &[u8],
    probe: i32,
) -> Result<Option<(Transform, Vec<u8>)>> {
    let w = t.width;
    let changed = target
        .chunks_exact(w)
        .zip(base.chunks_exact(w))
        .filter(|(a, b)| a != b)
        .count();
    let mut candidates = Vec::new();
    if changed * 8 <= target.len() / w {
        candidates.push(Transform::Sparse);
    }
    for grouped in [false, true] {
        if grouped && (w == 1 || !t.is_float()) {
            continue;
        }
        candidates.push(Transform::Xor { grouped });
        candidates.push(Transform::Sub { grouped });
        if w > 1 {
            candidates.push(Transform::Split { grouped });
        }
    }
    let mut best: Option<(usize, Transform, Vec<u8>)> = None;
    for transform in candidates {
        let bytes = forward(transform, w, base, target);
        let size = zref::compress(&[], &bytes, probe)?.len();
        if best.as_ref().is_none_or(|(s, _, _)| size < *s) {
            best = Some((size, transform, bytes));
        }
    }
    // In the literal section these bytes are matched against the base, so estimate them
    // with the base tensor as prefix.
    let literal = zref::compress(base, target, probe)?.len();
    Ok(best
        .filter(|(size, _, _)| *size < literal)
        .map(|(_, transform, bytes)| (transform, bytes)))
}

fn put_section(out: &mut Vec<u8>, prefix: &[u8], raw: &[u8], level: i32) -> Result<()> {
    put_varint(out, raw.len() as u64);
    if raw.is_empty() {
        put_varint(out, 0);
        return Ok(());
    }
    let frame = zref::compress(prefix, raw, level)?;
    put_varint(out, frame.len() as u64);
    out.extend_from_slice(&frame);
    Ok(())
}

/// Reads one section header and frame; `raw_len` is checked against `max` before use.
fn read_section<'a>(r: &mut Reader<'a>, what: &'static str, max: u64) -> Result<(usize, &'a [u8])> {
    let raw_len = r.varint().ok_or(DeltaError::Truncated)?;
    if raw_len > max {
        return Err(DeltaError::TooLarge {
            what,
            len: raw_len,
            max,
        });
    }
    let frame_len = r.varint().ok_or(DeltaError::Truncated)?;
    let frame = r.bytes(frame_len).ok_or(DeltaError::Truncated)?;
    if raw_len == 0 && !frame.is_empty() {
        return Err(DeltaError::Corrupt("frame for an empty section"));
    }
    // raw_len <= max <= MAX_TARGET_LEN, which fits in usize where a target can be held.
    let raw_len = usize::try_from(raw_len).map_err(|_| DeltaError::TooLarge {
        what,
        len: raw_len,
        max: usize::MAX as u64,
    })?;
    Ok((raw_len, frame))
}

fn inflate(prefix: &[u8], frame: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    if raw_len == 0 {
        return Ok(Vec::new());
    }
    zref::decompress(prefix, frame, raw_len)
}

/// Decodes a tensor-codec payload into exactly `target_len` bytes.
pub(crate) fn decode(base: &[u8], payload: &[u8], target_len: usize) -> Result<Vec<u8>> {
    let t = target_len as u64;
    let mut r = Reader::new(payload);
    let ops_max = MAX_OPS_BYTES.min(t.saturating_mul(24).saturating_add(16));
    let (ops_len, ops_frame) = read_section(&mut r, "ops section", ops_max)?;
    let (lit_len, lit_frame) = read_section(&mut r, "literal section", t)?;
    let (diff_len, diff_frame) = read_section(&mut r, "difference section", t)?;
    if !r.is_empty() {
        return Err(DeltaError::Corrupt("trailing bytes after the last section"));
    }

    let op_bytes = inflate(&[], ops_frame, ops_len)?;
    let ops = parse_ops(&op_bytes, base.len(), target_len, lit_len, diff_len)?;
    let literals = inflate(base, lit_frame, lit_len)?;
    let diffs = inflate(&[], diff_frame, diff_len)?;

    let mut out = Vec::new();
    out.try_reserve_exact(target_len)
        .map_err(|_| DeltaError::TooLarge {
            what: "target allocation",
            len: t,
            max: t.saturating_sub(1),
        })?;
    let (mut lp, mut dp) = (0, 0);
    // parse_ops proved every range below lies inside its buffer.
    for op in ops {
        match op {
            Op::Literal(len) => {
                out.extend_from_slice(&literals[lp..lp + len]);
                lp += len;
            }
            Op::Copy { off, len } => out.extend_from_slice(&base[off..off + len]),
            Op::Delta {
                off,
                transform,
                width,
                stored,
                len,
                reshape,
            } => {
                let aligned;
                let b = match reshape {
                    Some(r) => {
                        aligned = r.align(&base[off..off + r.base_len], width);
                        &aligned[..]
                    }
                    None => &base[off..off + len],
                };
                inverse(transform, width, b, &diffs[dp..dp + stored], &mut out)?;
                dp += stored;
            }
        }
    }
    Ok(out)
}

/// Parses and validates ops: every op covers at least one byte, base ranges lie in the
/// base, and the ops use exactly `target_len`, `lit_len` and `diff_len` bytes.
fn parse_ops(
    bytes: &[u8],
    base_len: usize,
    target_len: usize,
    lit_len: usize,
    diff_len: usize,
) -> Result<Vec<Op>> {
    const BAD: DeltaError = DeltaError::Corrupt("malformed op");
    let mut r = Reader::new(bytes);
    let count = r.varint().ok_or(BAD)?;
    if count > r.remaining() as u64 || count > target_len as u64 {
        return Err(DeltaError::Corrupt("op count exceeds its bounds"));
    }
    let mut ops = Vec::with_capacity(count as usize);
    let (mut tp, mut lp, mut dp) = (0usize, 0usize, 0usize);
    let usize_of = |v: u64| usize::try_from(v).map_err(|_| BAD);
    let base_range = |r: &mut Reader<'_>| -> Result<(usize, usize)> {
        let off = usize_of(r.varint().ok_or(BAD)?)?;
        let len = usize_of(r.varint().ok_or(BAD)?)?;
        match off.checked_add(len) {
            Some(end) if end <= base_len => Ok((off, len)),
            _ => Err(DeltaError::Corrupt("op reads past the end of the base")),
        }
    };
    for _ in 0..count {
        let op =
            match r.u8().ok_or(BAD)? {
                OP_LITERAL => {
                    let len = usize_of(r.varint().ok_or(BAD)?)?;
                    lp = lp.checked_add(len).filter(|&n| n <= lit_len).ok_or(
                        DeltaError::Corrupt("literal ops exceed the literal section"),
                    )?;
                    Op::Literal(len)
                }
                OP_COPY => {
                    let (off, len) = base_range(&mut r)?;
                    Op::Copy { off, len }
                }
                tag @ (OP_DELTA | OP_RESHAPED) => {
                    let off = usize_of(r.varint().ok_or(BAD)?)?;
                    let read_len = usize_of(if tag == OP_RESHAPED {
                        r.varint().ok_or(BAD)?
                    } else {
                        0
                    })?;
                    let len = usize_of(r.varint().ok_or(BAD)?)?;
                    let base_read = if tag == OP_RESHAPED { read_len } else { len };
                    if off.checked_add(base_read).is_none_or(|end| end > base_len) {
                        return Err(DeltaError::Corrupt("op reads past the end of the base"));
                    }
                    let transform = Transform::from_id(r.u8().ok_or(BAD)?)
                        .ok_or(DeltaError::Corrupt("unknown transform"))?;
                    let width = usize::from(r.u8().ok_or(BAD)?);
                    if !matches!(width, 1 | 2 | 4 | 8) || len % width != 0 {
                        return Err(DeltaError::Corrupt("bad element width"));
                    }
                    if transform.grouped() && width == 1 {
                        return Err(DeltaError::Corrupt("grouping needs elements of 2+ bytes"));
                    }
                    let stored = usize_of(r.varint().ok_or(BAD)?)?;
                    // Dense transforms store exactly one byte per target byte; the others
                    // are checked while decoding, inside their `stored` bytes.
                    if transform.dense() && stored != len {
                        return Err(DeltaError::Corrupt("dense difference of the wrong length"));
                    }
                    dp = dp.checked_add(stored).filter(|&n| n <= diff_len).ok_or(
                        DeltaError::Corrupt("delta ops exceed the difference section"),
                    )?;
                    let reshape = if tag == OP_RESHAPED {
                        let rank = usize::from(r.u8().ok_or(BAD)?);
                        if rank == 0 || rank > MAX_RANK {
                            return Err(DeltaError::Corrupt("bad tensor rank"));
                        }
                        let mut dims = Vec::with_capacity(2 * rank);
                        for _ in 0..2 * rank {
                            dims.push(usize_of(r.varint().ok_or(BAD)?)?);
                        }
                        let target_dims = dims.split_off(rank);
                        let shape = Reshape::checked(dims, target_dims, width, read_len, len)
                            .ok_or(DeltaError::Corrupt("shapes do not match lengths"))?;
                        Some(Box::new(shape))
                    } else {
                        None
                    };
                    Op::Delta {
                        off,
                        len,
                        transform,
                        width,
                        stored,
                        reshape,
                    }
                }
                _ => return Err(DeltaError::Corrupt("unknown op")),
            };
        let len = match &op {
            Op::Literal(len) | Op::Copy { len, .. } | Op::Delta { len, .. } => *len,
        };
        if len == 0 {
            return Err(DeltaError::Corrupt("empty op"));
        }
        tp = tp
            .checked_add(len)
            .filter(|&n| n <= target_len)
            .ok_or(DeltaError::Corrupt("ops exceed the target length"))?;
        ops.push(op);
    }
    if !r.is_empty() {
        return Err(DeltaError::Corrupt("trailing bytes after the last op"));
    }
    if tp != target_len || lp != lit_len || dp != diff_len {
        return Err(DeltaError::Corrupt(
            "ops do not cover the target and sections exactly",
        ));
    }
    Ok(ops)
}

fn load(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |v, &x| v << 8 | u64::from(x))
}

fn mask(width: usize) -> u64 {
    u64::MAX >> (64 - 8 * width)
}

fn zigzag(d: u64, width: usize) -> u64 {
    let m = mask(width);
    let neg = if d >> (8 * width - 1) & 1 == 1 { m } else { 0 };
    ((d << 1) & m) ^ neg
}

fn unzigzag(z: u64, width: usize) -> u64 {
    (z >> 1) ^ if z & 1 == 1 { mask(width) } else { 0 }
}

/// Positions of elements in exponent-grouped order: a stable counting sort keyed by the
/// bits just below the sign of each base element (the exponent of an IEEE float; for
/// 2-byte elements, the bfloat16 exponent or the float16 exponent and top mantissa bits).
struct Order {
    next: Option<Vec<usize>>,
}

impl Order {
    fn new(base: &[u8], width: usize, grouped: bool) -> Self {
        if !grouped {
            return Order { next: None };
        }
        let mut next = vec![0usize; 1 << Self::key_bits(width)];
        for b in base.chunks_exact(width) {
            next[Self::key(load(b), width)] += 1;
        }
        let mut acc = 0;
        for slot in &mut next {
            let n = *slot;
            *slot = acc;
            acc += n;
        }
        Order { next: Some(next) }
    }

    fn key_bits(width: usize) -> u32 {
        if width == 8 { 11 } else { 8 }
    }

    fn key(b: u64, width: usize) -> usize {
        let bits = Self::key_bits(width);
        let shift = 8 * width as u32 - 1 - bits;
        ((b >> shift) & ((1 << bits) - 1)) as usize
    }

    /// Position of element `i` (whose base value is `b`); call once per element, in order.
    /// Always below the element count, since the counts came from the same base.
    fn pos(&mut self, i: usize, b: u64, width: usize) -> usize {
        match &mut self.next {
            None => i,
            Some(next) => {
                let slot = &mut next[Self::key(b, width)];
                let p = *slot;
                *slot += 1;
                p
            }
        }
    }
}

/// Little-endian bit packer: the `n` low bits of each value, least significant first.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u128,
    len: u32,
}

impl BitWriter {
    fn put(&mut self, v: u64, n: u32) {
        self.acc |= u128::from(v & (u64::MAX >> (64 - n))) << self.len;
        self.len += n;
        while self.len >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.len -= 8;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.len > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    acc: u128,
    len: u32,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        BitReader {
            bytes,
            acc: 0,
            len: 0,
        }
    }

    /// The next `n` (1..=63) bits, or `None` past the end.
    fn take(&mut self, n: u32) -> Option<u64> {
        while self.len < n {
            let (&b, rest) = self.bytes.split_first()?;
            self.bytes = rest;
            self.acc |= u128::from(b) << self.len;
            self.len += 8;
        }
        let v = (self.acc & ((1u128 << n) - 1)) as u64;
        self.acc >>= n;
        self.len -= n;
        Some(v)
    }

    /// All bytes used and the padding bits of the last one zero.
    fn at_end(&self) -> bool {
        self.bytes.is_empty() && self.len < 8 && self.acc == 0
    }
}

/// Transformed bytes of `target` against `base` (same length, a multiple of `width`).
fn forward(transform: Transform, width: usize, base: &[u8], target: &[u8]) -> Vec<u8> {
    let n = target.len() / width;
    let pairs = target.chunks_exact(width).zip(base.chunks_exact(width));
    if transform == Transform::Sparse {
        let (mut values, mut gaps, mut count, mut last) = (Vec::new(), Vec::new(), 0u64, 0);
        for (i, (t, b)) in pairs.enumerate() {
            let z = zigzag(load(t).wrapping_sub(load(b)), width);
            if z != 0 {
                values.extend_from_slice(&z.to_le_bytes()[..width]);
                put_varint(&mut gaps, (i - last) as u64);
                last = i + 1;
                count += 1;
            }
        }
        let mut out = Vec::new();
        put_varint(&mut out, count);
        out.extend_from_slice(&values);
        out.extend_from_slice(&gaps);
        return out;
    }
    if let Transform::Split { grouped } = transform {
        let mut classes = vec![0u8; n];
        let mut bits = BitWriter::default();
        let mut order = Order::new(base, width, grouped);
        for (i, (t, b)) in pairs.enumerate() {
            let b = load(b);
            let z = zigzag(load(t).wrapping_sub(b), width);
            let class = u64::BITS - z.leading_zeros();
            classes[order.pos(i, b, width)] = class as u8;
            if class > 1 {
                bits.put(z, class - 1);
            }
        }
        classes.extend_from_slice(&bits.finish());
        return classes;
    }
    let mut out = vec![0u8; target.len()];
    let mut order = Order::new(base, width, transform.grouped());
    for (i, (t, b)) in pairs.enumerate() {
        let (t, b) = (load(t), load(b));
        let e = match transform {
            Transform::Xor { .. } => t ^ b,
            _ => zigzag(t.wrapping_sub(b), width),
        };
        let at = order.pos(i, b, width);
        for p in 0..width {
            out[p * n + at] = (e >> (8 * p)) as u8;
        }
    }
    out
}

/// Inverse of [`forward`]: appends the `base.len()` target bytes to `out`. `stored` is
/// untrusted (its length was only checked for dense transforms).
fn inverse(
    transform: Transform,
    width: usize,
    base: &[u8],
    stored: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    let n = base.len() / width;
    let m = mask(width);
    if transform == Transform::Sparse {
        const BAD: DeltaError = DeltaError::Corrupt("malformed sparse difference");
        let mut r = Reader::new(stored);
        let count = r.varint().ok_or(BAD)?;
        if count > n as u64 {
            return Err(BAD);
        }
        let values = r.bytes(count * width as u64).ok_or(BAD)?;
        let mut values = values.chunks_exact(width);
        let mut next = |from: usize| -> Result<Option<(usize, u64)>> {
            let Some(v) = values.next() else {
                return Ok(None);
            };
            let gap = usize::try_from(r.varint().ok_or(BAD)?).map_err(|_| BAD)?;
            match from.checked_add(gap) {
                Some(at) if at < n => Ok(Some((at, load(v)))),
                _ => Err(BAD),
            }
        };
        let mut pending = next(0)?;
        for (i, b) in base.chunks_exact(width).enumerate() {
            let z = match pending {
                Some((at, z)) if at == i => {
                    pending = next(i + 1)?;
                    z
                }
                _ => 0,
            };
            let t = load(b).wrapping_add(unzigzag(z, width)) & m;
            out.extend_from_slice(&t.to_le_bytes()[..width]);
        }
        if pending.is_some() || !r.is_empty() {
            return Err(BAD);
        }
        return Ok(());
    }
    if let Transform::Split { grouped } = transform {
        const BAD: DeltaError = DeltaError::Corrupt("malformed split difference");
        if stored.len() < n {
            return Err(BAD);
        }
        let (classes, rest) = stored.split_at(n);
        let mut bits = BitReader::new(rest);
        let mut order = Order::new(base, width, grouped);
        for (i, b) in base.chunks_exact(width).enumerate() {
            let b = load(b);
            let class = u32::from(classes[order.pos(i, b, width)]);
            let z = match class {
                0 => 0,
                1 => 1,
                c if c <= 8 * width as u32 => 1 << (c - 1) | bits.take(c - 1).ok_or(BAD)?,
                _ => return Err(BAD),
            };
            let t = b.wrapping_add(unzigzag(z, width)) & m;
            out.extend_from_slice(&t.to_le_bytes()[..width]);
        }
        if !bits.at_end() {
            return Err(BAD);
        }
        return Ok(());
    }
    let mut order = Order::new(base, width, transform.grouped());
    for (i, b) in base.chunks_exact(width).enumerate() {
        let b = load(b);
        let at = order.pos(i, b, width);
        let e = (0..width).fold(0u64, |v, p| v | u64::from(stored[p * n + at]) << (8 * p));
        let t = match transform {
            Transform::Xor { .. } => e ^ b,
            _ => b.wrapping_add(unzigzag(e, width)) & m,
        };
        out.extend_from_slice(&t.to_le_bytes()[..width]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::onnx::tests::{field, tensor_proto, varint_field};
    use crate::delta::{Codec, apply, encode};

    fn model(tensors: &[(&str, Vec<f32>)]) -> Vec<u8> {
        let mut g = Vec::new();
        field(&mut g, 2, b"graph");
        for (name, values) in tensors {
            let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            field(
                &mut g,
                5,
                &tensor_proto(name, &[values.len() as u64], 1, &raw),
            );
        }
        let mut m = Vec::new();
        varint_field(&mut m, 1, 8);
        field(&mut m, 7, &g);
        m
    }

    fn weights(seed: u32, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32 - 0.5) * 0.2
            })
            .collect()
    }

    #[test]
    fn transforms_invert_for_every_width() {
        let base: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
        let target: Vec<u8> = (0..64u32).map(|i| (i * 91 + 200) as u8).collect();
        let mut sparse_target = base.clone();
        sparse_target[17] ^= 0x40;
        sparse_target[63] = 0;
        for (transform, target) in [
            (Transform::Xor { grouped: false }, &target),
            (Transform::Xor { grouped: true }, &target),
            (Transform::Sub { grouped: false }, &target),
            (Transform::Sub { grouped: true }, &target),
            (Transform::Sparse, &target),
            (Transform::Sparse, &sparse_target),
            (Transform::Split { grouped: false }, &target),
            (Transform::Split { grouped: true }, &target),
            (Transform::Split { grouped: true }, &sparse_target),
        ] {
            for width in [1, 2, 4, 8] {
                if transform.grouped() && width == 1 {
                    continue;
                }
                let stored = forward(transform, width, &base, target);
                let mut back = Vec::new();
                inverse(transform, width, &base, &stored, &mut back).unwrap();
                assert_eq!(&back, target, "{transform:?} width {width}");
            }
        }
    }

    #[test]
    fn unchanged_tensors_cost_nothing() {
        let big = weights(1, 50_000);
        let base = model(&[("a", big.clone()), ("b", weights(2, 100))]);
        let target = model(&[("a", big), ("b", weights(3, 100))]);
        let d = encode(&base, &target, Codec::Tensor, 19).unwrap();
        // 200 kB of unchanged weights: only the 400-byte head and a few ops are paid for.
        assert!(d.len() < 92 + 600, "delta is {} bytes", d.len());
        assert_eq!(apply(&base, &d, u64::MAX).unwrap(), target);
    }

    #[test]
    fn fine_tuned_floats_beat_zstd_ref() {
        let w = weights(7, 40_000);
        let tuned: Vec<f32> = w
            .iter()
            .zip(weights(8, 40_000))
            .map(|(a, e)| a + e * 1e-4)
            .collect();
        let base = model(&[("w", w)]);
        let target = model(&[("w", tuned)]);
        let tensor = encode(&base, &target, Codec::Tensor, 19).unwrap();
        let zref = encode(&base, &target, Codec::ZstdRef, 19).unwrap();
        assert!(
            tensor.len() * 10 < zref.len() * 7,
            "tensor {} vs zstd-ref {}",
            tensor.len(),
            zref.len()
        );
        assert_eq!(apply(&base, &tensor, u64::MAX).unwrap(), target);
    }

    #[test]
    fn matches_renamed_and_reordered_tensors_by_name() {
        let (a, b) = (weights(1, 5000), weights(2, 5000));
        let base = model(&[("a", a.clone()), ("b", b.clone())]);
        let target = model(&[("b", b), ("new", weights(9, 10)), ("a", a)]);
        let d = encode(&base, &target, Codec::Tensor, 19).unwrap();
        assert!(d.len() < 400, "delta is {} bytes", d.len());
        assert_eq!(apply(&base, &d, u64::MAX).unwrap(), target);
    }

    fn matrix(name: &str, rows: usize, cols: usize, values: &[f32]) -> Vec<u8> {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut g = Vec::new();
        field(
            &mut g,
            5,
            &tensor_proto(name, &[rows as u64, cols as u64], 1, &raw),
        );
        let mut m = Vec::new();
        field(&mut m, 7, &g);
        m
    }

    #[test]
    fn widened_layer_is_diffed_against_aligned_base() {
        let (rows, cols, wide) = (64, 100, 130);
        let w = weights(11, rows * cols);
        let noise = weights(12, rows * wide);
        let mut widened = Vec::new();
        for r in 0..rows {
            for c in 0..wide {
                let e = noise[r * wide + c];
                widened.push(if c < cols {
                    w[r * cols + c] + e * 1e-5
                } else {
                    e
                });
            }
        }
        let base = matrix("fc", rows, cols, &w);
        let target = matrix("fc", rows, wide, &widened);
        let tensor = encode(&base, &target, Codec::Tensor, 19).unwrap();
        let zref = encode(&base, &target, Codec::ZstdRef, 19).unwrap();
        assert_eq!(apply(&base, &tensor, u64::MAX).unwrap(), target);
        // old columns cost ~2 bytes per element instead of ~4
        assert!(
            tensor.len() * 10 < zref.len() * 8,
            "tensor {} vs zstd-ref {}",
            tensor.len(),
            zref.len()
        );
    }

    #[test]
    fn aligns_every_rank_like_indexing() {
        let width = 2;
        let (bd, td) = (vec![2, 3, 2], vec![3, 2, 3]);
        let base: Vec<u8> = (0..12u16).flat_map(|v| v.to_le_bytes()).collect();
        let r = Reshape::checked(bd.clone(), td.clone(), width, base.len(), 18 * width).unwrap();
        let out = r.align(&base, width);
        for i in 0..3 {
            for j in 0..2 {
                for k in 0..3 {
                    let at = ((i * 2 + j) * 3 + k) * width;
                    let got = u16::from_le_bytes([out[at], out[at + 1]]);
                    let want = if i < 2 && j < 3 && k < 2 {
                        ((i * 3 + j) * 2 + k) as u16
                    } else {
                        0
                    };
                    assert_eq!(got, want, "at {i},{j},{k}");
                }
            }
        }
        assert!(Reshape::checked(bd, td, width, base.len(), 17 * width).is_none());
    }

    fn tensor_delta() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let w = weights(7, 2000);
        let tuned: Vec<f32> = w.iter().map(|a| a * 1.001).collect();
        let base = model(&[("w", w), ("same", weights(3, 500))]);
        let target = model(&[("w", tuned), ("same", weights(3, 500))]);
        let d = encode(&base, &target, Codec::Tensor, 3).unwrap();
        (base, target, d)
    }

    #[test]
    fn rejects_copy_op_pointing_past_base() {
        let (base, _, d) = tensor_delta();
        let short = &base[..base.len() / 2];
        let mut d2 = d.clone();
        d2[12..20].copy_from_slice(&(short.len() as u64).to_le_bytes());
        d2[20..52].copy_from_slice(&crate::delta::sha256(short));
        assert!(matches!(
            apply(short, &d2, u64::MAX),
            Err(DeltaError::Corrupt(_))
        ));
    }

    #[test]
    fn rejects_flipped_payload_bytes() {
        let (base, target, d) = tensor_delta();
        for i in crate::delta::Header::LEN..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 0x41;
            // A flip may hit bytes zstd never reads; then the exact target is fine.
            if let Ok(out) = apply(&base, &bad, u64::MAX) {
                assert_eq!(out, target, "flip at {i} produced other bytes");
            }
        }
    }
}

//! Bounded readers for varints and protobuf wire-format fields.
//!
//! Every read is checked against the end of the slice; nothing here can index out of
//! bounds or loop without consuming input.

use std::ops::Range;

/// Appends `v` as a LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A cursor over `buf[pos..end]` that reports absolute offsets into `buf`.
#[derive(Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            end: buf.len(),
        }
    }

    /// A reader over the absolute range `r` of the same buffer (`r` must lie inside it).
    pub(crate) fn sub(&self, r: Range<usize>) -> Self {
        let end = r.end.min(self.buf.len());
        Reader {
            buf: self.buf,
            pos: r.start.min(end),
            end,
        }
    }

    /// The bytes of an absolute range returned by this reader (empty if out of bounds).
    pub(crate) fn slice(&self, r: Range<usize>) -> &'a [u8] {
        self.buf.get(r).unwrap_or(&[])
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        if self.pos >= self.end {
            return None;
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        Some(b)
    }

    /// A LEB128 varint of at most 10 bytes that fits in 64 bits.
    pub(crate) fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return None;
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The absolute range of the next `n` bytes, consumed.
    pub(crate) fn take(&mut self, n: u64) -> Option<Range<usize>> {
        let n = usize::try_from(n).ok()?;
        if n > self.remaining() {
            return None;
        }
        let start = self.pos;
        self.pos += n;
        Some(start..self.pos)
    }

    pub(crate) fn bytes(&mut self, n: u64) -> Option<&'a [u8]> {
        let r = self.take(n)?;
        Some(&self.buf[r])
    }

    /// The next protobuf field: (field number, value). `None` at the end of the message
    /// or on malformed input (including groups, which ONNX does not use).
    pub(crate) fn field(&mut self) -> Option<(u64, Value)> {
        if self.is_empty() {
            return None;
        }
        let key = self.varint()?;
        let number = key >> 3;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let len = self.varint()?;
                Value::Len(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            _ => return None,
        };
        Some((number, value))
    }
}

/// A protobuf field value; length-delimited ones as an absolute range.
pub(crate) enum Value {
    Varint(u64),
    Fixed,
    Len(Range<usize>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trips() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut r = Reader::new(&b);
            assert_eq!(r.varint(), Some(v));
            assert!(r.is_empty());
        }
    }

    #[test]
    fn rejects_overlong_and_overflowing_varints() {
        assert_eq!(Reader::new(&[0xff; 11]).varint(), None);
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert_eq!(Reader::new(&over).varint(), None);
        assert_eq!(Reader::new(&[0x80]).varint(), None);
    }

    #[test]
    fn rejects_length_past_end_of_message() {
        // field 1, wire type 2, length 5, but only 2 bytes follow
        let mut r = Reader::new(&[0x0a, 0x05, 1, 2]);
        assert!(r.field().is_none());
        // the same field inside a sub-range that ends earlier than the buffer
        let buf = [0x0a, 0x02, 1, 2, 3, 4];
        let mut r = Reader::new(&buf).sub(0..3);
        assert!(r.field().is_none());
    }
}

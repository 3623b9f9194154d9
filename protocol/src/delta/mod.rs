//! Binary deltas between two versions of a model file.
//!
//! The fleet server encodes, the agent decodes. A delta is a fixed [`Header`] followed by
//! a codec payload:
//!
//! - [`Codec::ZstdRef`]: one zstd frame compressed with the base file as reference
//!   prefix and long-distance matching (what `zstd --patch-from` does).
//! - [`Codec::Tensor`]: ONNX-aware. Tensors of the target (graph initializers, `Constant`
//!   node values, subgraphs of `If`/`Loop`/`Scan`, functions) are matched by name with the
//!   base; unchanged ones become a copy of a base byte range, changed ones of the same
//!   size are stored as XOR or zigzag wrapping difference against the base, split into
//!   byte planes, then zstd-compressed. All other bytes are zstd-compressed with the base
//!   as reference prefix. The codec works on byte ranges of the target file and never
//!   re-serializes the protobuf, so the output is byte-identical to the target.
//!
//! Decoding ([`apply`]) checks the base hash before doing any work, bounds every length
//! and allocation by the header's target length (itself capped by the caller and by
//! [`MAX_TARGET_LEN`]), and verifies the SHA-256 of the result against the header. The
//! caller still checks the result against the signed target.
//!
//! ```
//! use outpost_protocol::delta::{self, Codec};
//! let base = b"weights: 1 2 3 4 5 6 7 8".repeat(20);
//! let mut target = base.clone();
//! target[7] = b'9';
//! let d = delta::encode(&base, &target, Codec::ZstdRef, delta::DEFAULT_LEVEL).unwrap();
//! assert_eq!(delta::apply(&base, &d, 1 << 20).unwrap(), target);
//! ```
//!
//! The format is described in `docs/delta.md`.

mod onnx;
mod tensor;
mod wire;
mod zref;

use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// First bytes of every delta.
pub const MAGIC: [u8; 8] = *b"OUTPDLTA";
/// The delta format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Hard cap on the length of a target a delta may produce, whatever the caller allows.
pub const MAX_TARGET_LEN: u64 = 2 << 30;
/// zstd level used by [`encode_best`] (and recommended for [`encode`]).
pub const DEFAULT_LEVEL: i32 = 19;

/// Result type of this module.
pub type Result<T, E = DeltaError> = std::result::Result<T, E>;

/// Why a delta could not be encoded or applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// The bytes do not start with [`MAGIC`].
    #[error("not an Outpost delta (bad magic)")]
    BadMagic,
    /// The header's format version is not [`FORMAT_VERSION`].
    #[error("unsupported delta format version {version}")]
    UnsupportedVersion {
        /// Version found in the header.
        version: u16,
    },
    /// The header names a codec this build does not know.
    #[error("unsupported delta codec {codec}")]
    UnsupportedCodec {
        /// Codec byte found in the header.
        codec: u8,
    },
    /// The delta was made against another base than the one supplied.
    #[error(
        "delta expects base sha256 {}, supplied base has {}",
        hex::encode(expected),
        hex::encode(actual)
    )]
    BaseMismatch {
        /// Base hash recorded in the delta header.
        expected: [u8; 32],
        /// Hash of the base supplied to [`apply`].
        actual: [u8; 32],
    },
    /// The decoded bytes do not hash to the header's target hash.
    #[error(
        "decoded target has sha256 {}, header says {}",
        hex::encode(actual),
        hex::encode(expected)
    )]
    TargetHashMismatch {
        /// Target hash recorded in the delta header.
        expected: [u8; 32],
        /// Hash of the decoded bytes.
        actual: [u8; 32],
    },
    /// The delta ends before a declared field or section does.
    #[error("delta is truncated")]
    Truncated,
    /// A declared length is above its limit.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Which length.
        what: &'static str,
        /// Declared length.
        len: u64,
        /// Limit it was checked against.
        max: u64,
    },
    /// The payload is inconsistent with itself, the header or the base.
    #[error("corrupt delta: {0}")]
    Corrupt(&'static str),
    /// zstd failed while encoding (not caused by the input bytes).
    #[error("zstd compression failed: {0}")]
    Compress(&'static str),
}

/// How the payload after the header is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// zstd with the base as reference prefix and long-distance matching.
    ZstdRef,
    /// ONNX-tensor-aware: tensors matched by name and stored as transformed differences.
    Tensor,
}

impl Codec {
    /// Every codec, in the order [`encode_best`] tries them.
    pub const ALL: [Codec; 2] = [Codec::ZstdRef, Codec::Tensor];

    /// The byte identifying this codec in the header.
    pub fn id(self) -> u8 {
        match self {
            Codec::ZstdRef => 1,
            Codec::Tensor => 2,
        }
    }

    /// The codec with header byte `id`.
    pub fn from_id(id: u8) -> Result<Self> {
        match id {
            1 => Ok(Codec::ZstdRef),
            2 => Ok(Codec::Tensor),
            codec => Err(DeltaError::UnsupportedCodec { codec }),
        }
    }

    /// Stable name (`zstd-ref`, `tensor`), as used on command lines and in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::ZstdRef => "zstd-ref",
            Codec::Tensor => "tensor",
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A codec name that is not one of [`Codec::as_str`].
#[derive(Debug, thiserror::Error)]
#[error("unknown delta codec {0:?} (expected zstd-ref or tensor)")]
pub struct UnknownCodec(pub String);

impl FromStr for Codec {
    type Err = UnknownCodec;

    fn from_str(s: &str) -> Result<Self, UnknownCodec> {
        Codec::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCodec(s.to_owned()))
    }
}

/// The fixed-size header at the start of every delta (all integers little-endian).
///
/// Layout: magic (8) | version u16 | codec u8 | reserved u8 (0) | base length u64 |
/// base sha256 (32) | target sha256 (32) | target length u64.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Header {
    /// Format version, [`FORMAT_VERSION`].
    pub version: u16,
    /// Codec of the payload.
    pub codec: Codec,
    /// Length of the base file in bytes.
    pub base_len: u64,
    /// SHA-256 of the base file.
    pub base_sha256: [u8; 32],
    /// SHA-256 of the file the delta produces.
    pub target_sha256: [u8; 32],
    /// Length of the file the delta produces.
    pub target_len: u64,
}

impl Header {
    /// Encoded length of a header.
    pub const LEN: usize = 8 + 2 + 1 + 1 + 8 + 32 + 32 + 8;

    /// Builds the header of a delta from `base` to `target`.
    pub fn new(codec: Codec, base: &[u8], target: &[u8]) -> Self {
        Header {
            version: FORMAT_VERSION,
            codec,
            base_len: base.len() as u64,
            base_sha256: sha256(base),
            target_sha256: sha256(target),
            target_len: target.len() as u64,
        }
    }

    /// Parses the header at the start of `delta`. Checks magic, version, codec and the
    /// reserved byte; lengths are checked by [`apply`] against its limits.
    pub fn parse(delta: &[u8]) -> Result<Self> {
        if delta.len() < MAGIC.len() {
            return Err(if MAGIC.starts_with(delta) {
                DeltaError::Truncated
            } else {
                DeltaError::BadMagic
            });
        }
        if delta[..8] != MAGIC {
            return Err(DeltaError::BadMagic);
        }
        let h = delta.get(..Self::LEN).ok_or(DeltaError::Truncated)?;
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != FORMAT_VERSION {
            return Err(DeltaError::UnsupportedVersion { version });
        }
        let codec = Codec::from_id(h[10])?;
        if h[11] != 0 {
            return Err(DeltaError::Corrupt("reserved header byte is not zero"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let hash_at = |at: usize| {
            let mut b = [0u8; 32];
            b.copy_from_slice(&h[at..at + 32]);
            b
        };
        Ok(Header {
            version,
            codec,
            base_len: u64_at(12),
            base_sha256: hash_at(20),
            target_sha256: hash_at(52),
            target_len: u64_at(84),
        })
    }

    /// The encoded header.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&self.version.to_le_bytes());
        out[10] = self.codec.id();
        out[12..20].copy_from_slice(&self.base_len.to_le_bytes());
        out[20..52].copy_from_slice(&self.base_sha256);
        out[52..84].copy_from_slice(&self.target_sha256);
        out[84..92].copy_from_slice(&self.target_len.to_le_bytes());
        out
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Encodes a delta that turns `base` into `target` with `codec` at zstd `level`
/// (1..=22; [`DEFAULT_LEVEL`] is a good trade-off for a server encoding once).
pub fn encode(base: &[u8], target: &[u8], codec: Codec, level: i32) -> Result<Vec<u8>> {
    if target.len() as u64 > MAX_TARGET_LEN {
        return Err(DeltaError::TooLarge {
            what: "target",
            len: target.len() as u64,
            max: MAX_TARGET_LEN,
        });
    }
    let mut out = Header::new(codec, base, target).to_bytes().to_vec();
    match codec {
        Codec::ZstdRef => out.extend_from_slice(&zref::compress(base, target, level)?),
        Codec::Tensor => tensor::encode(base, target, level, &mut out)?,
    }
    Ok(out)
}

/// What [`encode_best`] found to be the smallest artifact for a (base, target) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Best {
    /// A delta is smaller than the zstd-compressed full target.
    Delta {
        /// Codec of the smallest delta.
        codec: Codec,
        /// The delta, header included.
        delta: Vec<u8>,
        /// Length of the target compressed on its own with zstd at [`DEFAULT_LEVEL`].
        full_zstd_len: usize,
    },
    /// The full target compressed with zstd is no larger than any delta: ship it.
    Full {
        /// Length of the target compressed on its own with zstd at [`DEFAULT_LEVEL`].
        full_zstd_len: usize,
        /// Codec of the smallest delta.
        codec: Codec,
        /// Length of the smallest delta, header included.
        delta_len: usize,
    },
}

/// Encodes with every codec at [`DEFAULT_LEVEL`] and returns the smallest delta, or
/// [`Best::Full`] if compressing the target alone with zstd is no larger.
pub fn encode_best(base: &[u8], target: &[u8]) -> Result<Best> {
    let mut best: Option<(Codec, Vec<u8>)> = None;
    for codec in Codec::ALL {
        let d = encode(base, target, codec, DEFAULT_LEVEL)?;
        if best.as_ref().is_none_or(|(_, b)| d.len() < b.len()) {
            best = Some((codec, d));
        }
    }
    let (codec, delta) = best.ok_or(DeltaError::Compress("no codec available"))?;
    let full_zstd_len = zref::compress(&[], target, DEFAULT_LEVEL)?.len();
    Ok(if delta.len() < full_zstd_len {
        Best::Delta {
            codec,
            delta,
            full_zstd_len,
        }
    } else {
        Best::Full {
            full_zstd_len,
            codec,
            delta_len: delta.len(),
        }
    })
}

/// The full target as one zstd frame at [`DEFAULT_LEVEL`], declaring its content size:
/// the compressed-full artifact ([`crate::wire::ArtifactKind::FullZstd`]). Not a delta:
/// no header; the signed hash of the target is what checks the decoded bytes.
pub fn compress_full(target: &[u8]) -> Result<Vec<u8>> {
    zref::compress(&[], target, DEFAULT_LEVEL)
}

/// Decodes a compressed-full artifact into exactly `target_len` bytes (the signed
/// length), never more than [`MAX_TARGET_LEN`]. A frame declaring more than
/// `target_len` (a compression bomb) is refused as [`DeltaError::TooLarge`] before
/// anything is allocated; one declaring less, or none, is [`DeltaError::Corrupt`];
/// decoding writes into a buffer of `target_len` bytes, so a frame that lies about its
/// size fails instead of growing it. The caller checks the result against the signed
/// hashes.
pub fn decompress_full(frame: &[u8], target_len: u64) -> Result<Vec<u8>> {
    let max = target_len.min(MAX_TARGET_LEN);
    let declared = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) => n,
        Ok(None) => return Err(DeltaError::Corrupt("the frame does not declare its size")),
        Err(_) => return Err(DeltaError::Corrupt("not a zstd frame")),
    };
    if declared > max {
        return Err(DeltaError::TooLarge {
            what: "decompressed full model",
            len: declared,
            max,
        });
    }
    if declared != target_len {
        return Err(DeltaError::Corrupt(
            "the frame declares another length than the signed one",
        ));
    }
    let len = usize::try_from(declared).map_err(|_| DeltaError::TooLarge {
        what: "decompressed full model",
        len: declared,
        max: usize::MAX as u64,
    })?;
    zref::decompress(&[], frame, len)
}

/// Applies `delta` to `base` and returns the target, at most `max_target_len` bytes
/// (and never more than [`MAX_TARGET_LEN`]).
///
/// Checks, in order: header, target length against the limits, base length and hash,
/// payload consistency, and finally the SHA-256 of the result against the header.
pub fn apply(base: &[u8], delta: &[u8], max_target_len: u64) -> Result<Vec<u8>> {
    let header = Header::parse(delta)?;
    let max = max_target_len.min(MAX_TARGET_LEN);
    if header.target_len > max {
        return Err(DeltaError::TooLarge {
            what: "target",
            len: header.target_len,
            max,
        });
    }
    let target_len = usize::try_from(header.target_len).map_err(|_| DeltaError::TooLarge {
        what: "target",
        len: header.target_len,
        max: usize::MAX as u64,
    })?;
    let actual = sha256(base);
    if header.base_len != base.len() as u64 || actual != header.base_sha256 {
        return Err(DeltaError::BaseMismatch {
            expected: header.base_sha256,
            actual,
        });
    }
    let payload = &delta[Header::LEN..];
    let target = match header.codec {
        Codec::ZstdRef => zref::decompress(base, payload, target_len)?,
        Codec::Tensor => tensor::decode(base, payload, target_len)?,
    };
    let actual = sha256(&target);
    if actual != header.target_sha256 {
        return Err(DeltaError::TargetHashMismatch {
            expected: header.target_sha256,
            actual,
        });
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Vec<u8>) {
        let base: Vec<u8> = (0..20_000u32)
            .flat_map(|i| (i * 7919).to_le_bytes())
            .collect();
        let mut target = base.clone();
        for i in (0..target.len()).step_by(997) {
            target[i] ^= 0x5a;
        }
        target.extend_from_slice(b"appended tail");
        (base, target)
    }

    #[test]
    fn compressed_full_round_trips_at_the_signed_length() {
        let (_, target) = sample();
        let frame = compress_full(&target).unwrap();
        assert!(frame.len() < target.len());
        assert_eq!(
            decompress_full(&frame, target.len() as u64).unwrap(),
            target
        );
    }

    #[test]
    fn rejects_compression_bomb_over_the_signed_length() {
        // 16 MiB of zeros compress to a few KiB; the signed length says 1 KiB.
        let bomb = compress_full(&vec![0u8; 16 << 20]).unwrap();
        assert!(bomb.len() < 16 << 10, "bomb is {} bytes", bomb.len());
        assert!(matches!(
            decompress_full(&bomb, 1024),
            Err(DeltaError::TooLarge { len, max: 1024, .. }) if len == 16 << 20
        ));
    }

    #[test]
    fn rejects_compression_bomb_hiding_its_size() {
        // A frame without a declared size is refused rather than decoded until it stops.
        let mut cctx = zstd::zstd_safe::CCtx::create();
        cctx.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
            .unwrap();
        let data = vec![0u8; 1 << 20];
        let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        let mut input = zstd::zstd_safe::InBuffer::around(&data[..]);
        let mut output = zstd::zstd_safe::OutBuffer::around(&mut frame);
        cctx.compress_stream2(
            &mut output,
            &mut input,
            zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end,
        )
        .unwrap();
        assert!(
            matches!(zstd::zstd_safe::get_frame_content_size(&frame), Ok(None)),
            "the test frame must not declare its size"
        );
        assert!(matches!(
            decompress_full(&frame, 1024),
            Err(DeltaError::Corrupt(_))
        ));
    }

    #[test]
    fn rejects_compressed_full_shorter_than_signed_or_not_zstd() {
        let (_, target) = sample();
        let frame = compress_full(&target).unwrap();
        assert!(matches!(
            decompress_full(&frame, target.len() as u64 + 1),
            Err(DeltaError::Corrupt(_))
        ));
        assert!(matches!(
            decompress_full(&target, target.len() as u64),
            Err(DeltaError::Corrupt(_))
        ));
    }

    #[test]
    fn header_round_trips() {
        let h = Header::new(Codec::Tensor, b"base", b"target");
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn codec_names_round_trip() {
        for c in Codec::ALL {
            assert_eq!(c.as_str().parse::<Codec>().unwrap(), c);
            assert_eq!(Codec::from_id(c.id()).unwrap(), c);
        }
        assert!("bsdiff".parse::<Codec>().is_err());
    }

    #[test]
    fn rejects_foreign_bytes_as_bad_magic() {
        assert!(matches!(
            apply(b"", b"\x28\xb5\x2f\xfd not a delta", 100),
            Err(DeltaError::BadMagic)
        ));
    }

    #[test]
    fn rejects_unknown_version_and_codec() {
        let (base, target) = sample();
        let d = encode(&base, &target, Codec::ZstdRef, 3).unwrap();
        let mut v2 = d.clone();
        v2[8] = 2;
        assert!(matches!(
            apply(&base, &v2, u64::MAX),
            Err(DeltaError::UnsupportedVersion { version: 2 })
        ));
        let mut c9 = d;
        c9[10] = 9;
        assert!(matches!(
            apply(&base, &c9, u64::MAX),
            Err(DeltaError::UnsupportedCodec { codec: 9 })
        ));
    }

    #[test]
    fn rejects_target_above_caller_limit_before_decoding() {
        let (base, target) = sample();
        let d = encode(&base, &target, Codec::ZstdRef, 3).unwrap();
        let err = apply(&base, &d, target.len() as u64 - 1).unwrap_err();
        assert!(matches!(err, DeltaError::TooLarge { what: "target", .. }));
        assert_eq!(apply(&base, &d, target.len() as u64).unwrap(), target);
    }

    #[test]
    fn rejects_declared_target_above_hard_cap() {
        let (base, target) = sample();
        let mut d = encode(&base, &target, Codec::ZstdRef, 3).unwrap();
        d[84..92].copy_from_slice(&(MAX_TARGET_LEN + 1).to_le_bytes());
        assert!(matches!(
            apply(&base, &d, u64::MAX),
            Err(DeltaError::TooLarge {
                max: MAX_TARGET_LEN,
                ..
            })
        ));
    }

    #[test]
    fn rejects_wrong_base() {
        let (base, target) = sample();
        for codec in Codec::ALL {
            let d = encode(&base, &target, codec, 3).unwrap();
            let mut other = base.clone();
            other[0] ^= 1;
            match apply(&other, &d, u64::MAX) {
                Err(DeltaError::BaseMismatch { expected, actual }) => {
                    assert_eq!(expected, sha256(&base));
                    assert_eq!(actual, sha256(&other));
                }
                r => panic!("{codec}: expected BaseMismatch, got {r:?}"),
            }
        }
    }

    #[test]
    fn rejects_forged_target_hash() {
        let (base, target) = sample();
        for codec in Codec::ALL {
            let mut d = encode(&base, &target, codec, 3).unwrap();
            d[52] ^= 1;
            assert!(
                matches!(
                    apply(&base, &d, u64::MAX),
                    Err(DeltaError::TargetHashMismatch { .. })
                ),
                "{codec}"
            );
        }
    }

    #[test]
    fn rejects_every_truncation() {
        let (base, target) = sample();
        for codec in Codec::ALL {
            let d = encode(&base, &target, codec, 3).unwrap();
            for cut in (0..d.len()).step_by(7).chain([d.len() - 1]) {
                assert!(
                    apply(&base, &d[..cut], u64::MAX).is_err(),
                    "{codec} cut {cut}"
                );
            }
            let short = &d[..Header::LEN - 1];
            assert!(matches!(
                apply(&base, short, u64::MAX),
                Err(DeltaError::Truncated)
            ));
        }
    }

    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn encode_best_ships_full_when_base_is_unrelated() {
        let (base, target) = (noise(1, 4096), noise(2, 4096));
        match encode_best(&base, &target).unwrap() {
            Best::Full {
                full_zstd_len,
                delta_len,
                ..
            } => assert!(full_zstd_len <= delta_len),
            other => panic!("expected full for unrelated noise, got {other:?}"),
        }
    }

    #[test]
    fn encode_best_ships_delta_for_small_edit() {
        let (base, target) = sample();
        match encode_best(&base, &target).unwrap() {
            Best::Delta {
                delta,
                full_zstd_len,
                ..
            } => {
                assert!(delta.len() < full_zstd_len);
                assert_eq!(apply(&base, &delta, u64::MAX).unwrap(), target);
            }
            other => panic!("expected a delta for a small edit, got {other:?}"),
        }
    }
}

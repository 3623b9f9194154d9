//! zstd with an optional reference prefix (the base file), as `zstd --patch-from` does.

use super::{DeltaError, Result};
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter};

/// Largest window the encoder uses and the decoder accepts: 1 GiB, the zstd maximum on
/// 32-bit targets. One-shot decoding into a preallocated buffer allocates no window,
/// so this bounds nothing on the device but keeps deltas decodable on armv7.
const WINDOW_LOG_MAX: u32 = 30;

/// Smallest window covering `n` bytes, within zstd's limits.
fn window_log_for(n: usize) -> u32 {
    let log = usize::BITS - n.saturating_sub(1).leading_zeros();
    log.clamp(10, WINDOW_LOG_MAX)
}

/// One zstd frame of `data` at `level`, matching against `prefix` if it is not empty.
/// (zstd ignores a prefix that overlaps `data` in memory: the frame stays correct, only
/// larger.)
pub(crate) fn compress(prefix: &[u8], data: &[u8], level: i32) -> Result<Vec<u8>> {
    let err = |code| DeltaError::Compress(zstd_safe::get_error_name(code));
    let mut cctx = CCtx::try_create().ok_or(DeltaError::Compress("cannot allocate a context"))?;
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(err)?;
    cctx.set_parameter(CParameter::WindowLog(window_log_for(
        prefix.len() + data.len(),
    )))
    .map_err(err)?;
    if !prefix.is_empty() {
        cctx.set_parameter(CParameter::EnableLongDistanceMatching(true))
            .map_err(err)?;
        cctx.ref_prefix(prefix).map_err(err)?;
    }
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data).map_err(err)?;
    Ok(out)
}

/// Decodes `frame` (matching against `prefix`) into exactly `len` bytes; output beyond
/// `len` is an error, never an allocation.
pub(crate) fn decompress(prefix: &[u8], frame: &[u8], len: usize) -> Result<Vec<u8>> {
    let corrupt = |code| DeltaError::Corrupt(zstd_safe::get_error_name(code));
    let mut dctx = DCtx::try_create().ok_or(DeltaError::Corrupt("cannot allocate a context"))?;
    dctx.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))
        .map_err(corrupt)?;
    if !prefix.is_empty() {
        dctx.ref_prefix(prefix).map_err(corrupt)?;
    }
    let mut out = Vec::new();
    out.try_reserve_exact(len)
        .map_err(|_| DeltaError::TooLarge {
            what: "decoded section allocation",
            len: len as u64,
            max: len.saturating_sub(1) as u64,
        })?;
    let n = dctx.decompress(&mut out, frame).map_err(corrupt)?;
    if n != len {
        return Err(DeltaError::Corrupt(
            "zstd frame decodes to a different length",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_covers_base_and_target() {
        assert_eq!(window_log_for(0), 10);
        assert_eq!(window_log_for(1 << 20), 20);
        assert_eq!(window_log_for((1 << 20) + 1), 21);
        assert_eq!(window_log_for(usize::MAX), WINDOW_LOG_MAX);
    }

    #[test]
    fn rejects_frame_longer_than_declared() {
        let data = vec![3u8; 1000];
        let frame = compress(&[], &data, 3).unwrap();
        assert!(matches!(
            decompress(&[], &frame, 999),
            Err(DeltaError::Corrupt(_))
        ));
        assert!(matches!(
            decompress(&[], &frame, 1001),
            Err(DeltaError::Corrupt(_))
        ));
        assert_eq!(decompress(&[], &frame, 1000).unwrap(), data);
    }

    #[test]
    fn prefix_is_required_to_decode() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let base: Vec<u8> = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let alone = compress(&[], &base, 19).unwrap();
        // A separate copy: zstd drops a prefix that overlaps the input in memory.
        let target = base.clone();
        let frame = compress(&base, &target, 19).unwrap();
        assert!(alone.len() > 49_000, "noise compressed to {}", alone.len());
        assert!(frame.len() < 100, "frame {}", frame.len());
        assert_eq!(decompress(&base, &frame, base.len()).unwrap(), base);
        assert!(decompress(&[], &frame, base.len()).is_err());
    }
}

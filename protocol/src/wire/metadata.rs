//! TUF metadata in ranges, optionally zstd-compressed: the encoding both sides agree on
//! and the device's reassembly.
//!
//! A device asks for `[offset, offset + len)` of a metadata file as the server encodes it
//! for devices that accept zstd ([`compress`]; identity when that is not smaller). Every
//! ranged answer carries `total` (the encoded length), `offset`, `encoding` and `etag`
//! (sha256 of the whole encoded file). [`MetadataFetch`] stitches ranges of one etag,
//! starts again when the etag changes (a new version was published between two
//! requests), refuses a `total` over the role's cap before asking for more, and decodes
//! into at most the cap ([`decompress`]).
//!
//! ```
//! use outpost_protocol::wire::metadata::{MetadataFetch, serve_range, compress};
//! use outpost_protocol::wire::{CHUNK_LEN, Encoding, RequestBody};
//!
//! let file = br#"{"signed":{"_type":"targets"},"signatures":[]}"#.repeat(4000);
//! let encoded = compress(&file);
//! let mut fetch = MetadataFetch::new("targets", None, 5_000_000, CHUNK_LEN, true);
//! let bytes = loop {
//!     let RequestBody::Metadata { offset, len, .. } = fetch.request() else { unreachable!() };
//!     let resp = serve_range(7, &encoded, Encoding::Zstd, offset.unwrap(), len.unwrap());
//!     if let Some(done) = fetch.accept(&resp).unwrap() {
//!         break done;
//!     }
//! };
//! assert_eq!(bytes, file);
//! assert!(fetch.wire_bytes() < file.len() as u64 / 10);
//! ```

use sha2::{Digest, Sha256};
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx};

use super::{Encoding, RequestBody, Response, Status};

/// zstd level of [`compress`]: metadata is compressed once per version and cached, so
/// the slow, small end of the scale pays.
pub const LEVEL: i32 = 19;

/// How often a fetch starts again on a changed etag before giving up (the repository
/// changes once per release; a server whose etag changes at every answer is broken).
pub const MAX_RESTARTS: u32 = 4;

/// Errors of a ranged metadata fetch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// The server has no such file (ends a root-version probe).
    #[error("not found")]
    NotFound,
    /// The server refused the request.
    #[error("refused: {0}")]
    Refused(String),
    /// The announced (encoded) or decoded length is over the role's cap.
    #[error("{what} is {len} bytes, over the {max}-byte cap")]
    TooLarge {
        /// Encoded total, or decoded content.
        what: &'static str,
        /// The length (the declared one, or `max + 1` for a stream cut at the cap).
        len: u64,
        /// The cap.
        max: u64,
    },
    /// The answer is not the range asked for (truncated, other offset, missing
    /// fields). Asking again for the same range may succeed.
    #[error("answer does not match the request: {0}")]
    Mismatch(String),
    /// The file changed more than [`MAX_RESTARTS`] times during one fetch.
    #[error("metadata changed {0} times during one fetch")]
    KeptChanging(u32),
    /// The compressed body does not decode.
    #[error("undecodable zstd metadata: {0}")]
    Corrupt(String),
}

/// One zstd frame of `raw`, with its content size. Deterministic for one zstd build
/// (fixed level, window sized to the input); the server still caches the result per
/// content so that every range of one version comes from the same bytes.
pub fn compress(raw: &[u8]) -> Vec<u8> {
    let mut cctx = CCtx::create();
    let window = (usize::BITS - raw.len().saturating_sub(1).leading_zeros()).clamp(10, 27);
    cctx.set_parameter(CParameter::CompressionLevel(LEVEL))
        .and_then(|_| cctx.set_parameter(CParameter::WindowLog(window)))
        .and_then(|_| cctx.set_parameter(CParameter::ContentSizeFlag(true)))
        .expect("valid zstd parameters");
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(raw.len()));
    cctx.compress2(&mut out, raw)
        .expect("the output buffer is compress_bound long");
    out
}

/// Decodes one zstd frame into at most `max_len` bytes. The frame must declare its
/// content size (ours do); a declared size over `max_len` is refused before anything is
/// decoded or allocated, and decoding writes into a buffer of the declared size plus
/// one, so a frame that lies about its size fails instead of growing it.
pub fn decompress(frame: &[u8], max_len: u64) -> Result<Vec<u8>, MetadataError> {
    let declared = match zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) => n,
        Ok(None) => {
            return Err(MetadataError::Corrupt(
                "the frame does not declare its size".into(),
            ));
        }
        Err(_) => return Err(MetadataError::Corrupt("not a zstd frame".into())),
    };
    if declared > max_len {
        return Err(MetadataError::TooLarge {
            what: "decompressed metadata",
            len: declared,
            max: max_len,
        });
    }
    let cap = usize::try_from(declared + 1).map_err(|_| MetadataError::TooLarge {
        what: "decompressed metadata",
        len: declared,
        max: max_len,
    })?;
    let mut out = Vec::new();
    out.try_reserve_exact(cap)
        .map_err(|_| MetadataError::Corrupt("cannot allocate the declared size".into()))?;
    let mut dctx = DCtx::create();
    let n = dctx
        .decompress(&mut out, frame)
        .map_err(|code| MetadataError::Corrupt(zstd_safe::get_error_name(code).into()))?;
    if n as u64 != declared {
        return Err(MetadataError::Corrupt(format!(
            "frame declares {declared} bytes and decodes to {n}"
        )));
    }
    Ok(out)
}

/// sha256 (hex) of an encoded file: the `etag` of its ranges.
pub fn etag(encoded: &[u8]) -> String {
    hex::encode(Sha256::digest(encoded))
}

/// The server's answer to a ranged request of `encoded` (clamped to its end; an offset
/// past the end gets an empty body, and the device sees from `total` and `etag` that
/// the file changed). The response id is `id`.
pub fn serve_range(id: u64, encoded: &[u8], encoding: Encoding, offset: u64, len: u32) -> Response {
    serve_range_tagged(id, encoded, encoding, etag(encoded), offset, len)
}

/// [`serve_range`] with the etag computed by the caller (servers cache it).
pub fn serve_range_tagged(
    id: u64,
    encoded: &[u8],
    encoding: Encoding,
    etag: String,
    offset: u64,
    len: u32,
) -> Response {
    let total = encoded.len() as u64;
    let start = offset.min(total) as usize;
    let end = offset.saturating_add(u64::from(len)).min(total) as usize;
    let mut r = Response::ok(id, encoded[start..end].to_vec());
    r.header.total = Some(total);
    r.header.offset = Some(offset);
    r.header.encoding = Some(encoding);
    r.header.etag = Some(etag);
    r
}

/// A device's fetch of one metadata file in ranges. Pure: [`MetadataFetch::request`]
/// says what to ask next, [`MetadataFetch::accept`] takes the answer. The caller may
/// ask again for the same range after a [`MetadataError::Mismatch`]; every other error
/// ends the fetch.
#[derive(Debug, Clone)]
pub struct MetadataFetch {
    role: String,
    version: Option<u64>,
    max_len: u64,
    chunk_len: u32,
    accept_zstd: bool,
    /// Encoded bytes received so far, of `current`.
    buf: Vec<u8>,
    /// `(etag, total, encoding)` of the file being stitched.
    current: Option<(String, u64, Encoding)>,
    restarts: u32,
    wire_bytes: u64,
}

impl MetadataFetch {
    /// A fetch of `ROLE.json` (or `VERSION.ROLE.json`) capped at `max_len` bytes
    /// (encoded and decoded), asking `chunk_len` bytes at a time (clamped to
    /// `1..=CHUNK_LEN`).
    pub fn new(
        role: &str,
        version: Option<u64>,
        max_len: u64,
        chunk_len: u32,
        accept_zstd: bool,
    ) -> MetadataFetch {
        MetadataFetch {
            role: role.to_owned(),
            version,
            max_len,
            chunk_len: chunk_len.clamp(1, super::CHUNK_LEN),
            accept_zstd,
            buf: Vec::new(),
            current: None,
            restarts: 0,
            wire_bytes: 0,
        }
    }

    /// The next request: the range after what was received.
    pub fn request(&self) -> RequestBody {
        let offset = self.buf.len() as u64;
        let len = match &self.current {
            Some((_, total, _)) => (total - offset).clamp(1, u64::from(self.chunk_len)) as u32,
            None => self.chunk_len,
        };
        RequestBody::Metadata {
            role: self.role.clone(),
            version: self.version,
            offset: Some(offset),
            len: Some(len),
            accept_zstd: self.accept_zstd,
        }
    }

    /// Body bytes received so far, kept or not (what the wire carried).
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }

    /// Times the fetch started again on a changed etag.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Takes the answer to [`MetadataFetch::request`]: `Some(file)` when complete and
    /// decoded, `None` when more is to be asked.
    pub fn accept(&mut self, resp: &Response) -> Result<Option<Vec<u8>>, MetadataError> {
        let h = &resp.header;
        match h.status {
            Status::Ok => {}
            Status::NotFound => return Err(MetadataError::NotFound),
            _ => {
                return Err(MetadataError::Refused(
                    h.message.clone().unwrap_or_else(|| "server error".into()),
                ));
            }
        }
        self.wire_bytes += resp.body.len() as u64;
        let Some(total) = h.total else {
            // A server from before ranged metadata answers with the whole file.
            if self.current.is_some() || !self.buf.is_empty() {
                return Err(MetadataError::Mismatch(
                    "an unranged answer mid-fetch".into(),
                ));
            }
            if resp.body.len() as u64 > self.max_len {
                return Err(MetadataError::TooLarge {
                    what: "metadata",
                    len: resp.body.len() as u64,
                    max: self.max_len,
                });
            }
            return Ok(Some(resp.body.clone()));
        };
        let (Some(offset), Some(etag)) = (h.offset, h.etag.as_ref()) else {
            return Err(MetadataError::Mismatch(
                "a ranged answer without offset or etag".into(),
            ));
        };
        let encoding = h.encoding.unwrap_or(Encoding::Identity);
        if encoding == Encoding::Zstd && !self.accept_zstd {
            return Err(MetadataError::Mismatch("zstd was not asked for".into()));
        }
        // Endless data: refused from the first answer, before asking for more.
        if total > self.max_len {
            return Err(MetadataError::TooLarge {
                what: "encoded metadata",
                len: total,
                max: self.max_len,
            });
        }
        let same = self
            .current
            .as_ref()
            .is_some_and(|(e, t, enc)| e == etag && *t == total && *enc == encoding);
        if !same {
            if self.current.is_some() {
                self.restarts += 1;
                if self.restarts > MAX_RESTARTS {
                    return Err(MetadataError::KeptChanging(self.restarts));
                }
            }
            // Never stitched onto ranges of another version: start again from 0.
            // The body answered a range computed for the old file: ask again.
            let first = self.current.is_none();
            self.buf.clear();
            self.current = Some((etag.clone(), total, encoding));
            if !first {
                return Ok(None);
            }
        }
        let at = self.buf.len() as u64;
        let want = (total - at).min(u64::from(self.chunk_len));
        if offset != at || resp.body.len() as u64 != want {
            return Err(MetadataError::Mismatch(format!(
                "asked {want} bytes at {at}, got {} at {offset} of {total}",
                resp.body.len()
            )));
        }
        self.buf.extend_from_slice(&resp.body);
        if (self.buf.len() as u64) < total {
            return Ok(None);
        }
        let encoded = std::mem::take(&mut self.buf);
        match encoding {
            Encoding::Zstd => decompress(&encoded, self.max_len).map(Some),
            _ => Ok(Some(encoded)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::CHUNK_LEN;

    fn targets_like(n: usize) -> Vec<u8> {
        let mut s = String::from(r#"{"signed":{"_type":"targets","targets":{"#);
        for i in 0..n {
            s.push_str(&format!(
                r#""models/m{i}.onnx":{{"length":{},"custom":{{"golden":[{}]}}}},"#,
                i * 31,
                (0..50)
                    .map(|j| format!("{:.6}", (i * j) as f64 / 7.0))
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        s.push_str("}}}");
        s.into_bytes()
    }

    /// Runs a fetch against `serve`, which answers each request; returns the result
    /// and the number of requests.
    fn run(
        fetch: &mut MetadataFetch,
        mut serve: impl FnMut(u64, u32, usize) -> Response,
    ) -> (Result<Vec<u8>, MetadataError>, usize) {
        for n in 0..10_000 {
            let RequestBody::Metadata {
                offset: Some(o),
                len: Some(l),
                ..
            } = fetch.request()
            else {
                panic!("not a ranged request");
            };
            match fetch.accept(&serve(o, l, n)) {
                Ok(Some(b)) => return (Ok(b), n + 1),
                Ok(None) => {}
                Err(e) => return (Err(e), n + 1),
            }
        }
        panic!("fetch did not end");
    }

    #[test]
    fn ranges_of_compressed_metadata_reassemble_to_the_file() {
        let raw = targets_like(3000);
        assert!(raw.len() > 4 * CHUNK_LEN as usize, "{}", raw.len());
        let z = compress(&raw);
        assert_eq!(compress(&raw), z, "deterministic");
        assert!(z.len() * 3 < raw.len());
        let mut f = MetadataFetch::new("targets", Some(4), 5_000_000, 4096, true);
        let (got, requests) = run(&mut f, |o, l, _| serve_range(1, &z, Encoding::Zstd, o, l));
        assert_eq!(got.unwrap(), raw);
        assert_eq!(requests, z.len().div_ceil(4096));
        assert_eq!(f.wire_bytes(), z.len() as u64);
        // Identity, too, with the exact cap.
        let mut f = MetadataFetch::new("targets", None, raw.len() as u64, CHUNK_LEN, false);
        let (got, _) = run(&mut f, |o, l, _| {
            serve_range(1, &raw, Encoding::Identity, o, l)
        });
        assert_eq!(got.unwrap(), raw);
    }

    #[test]
    fn an_empty_file_is_one_empty_range() {
        let mut f = MetadataFetch::new("x", None, 10, 16, true);
        let (got, n) = run(&mut f, |o, l, _| {
            serve_range(1, b"", Encoding::Identity, o, l)
        });
        assert_eq!((got.unwrap(), n), (vec![], 1));
    }

    #[test]
    fn a_server_without_ranges_answers_the_whole_file() {
        let mut f = MetadataFetch::new("root", Some(2), 100, CHUNK_LEN, true);
        assert_eq!(
            f.accept(&Response::ok(1, b"{}".to_vec())).unwrap(),
            Some(b"{}".to_vec())
        );
        let mut f = MetadataFetch::new("root", Some(2), 1, CHUNK_LEN, true);
        assert!(matches!(
            f.accept(&Response::ok(1, b"{}".to_vec())),
            Err(MetadataError::TooLarge { .. })
        ));
        let mut f = MetadataFetch::new("root", Some(9), 100, CHUNK_LEN, true);
        assert_eq!(
            f.accept(&Response::fail(1, Status::NotFound, "no")),
            Err(MetadataError::NotFound)
        );
    }

    #[test]
    fn metadata_changed_between_chunks_restarts_from_the_first_byte() {
        let old = targets_like(2000);
        let new = targets_like(2100);
        let (zo, zn) = (compress(&old), compress(&new));
        let mut f = MetadataFetch::new("targets", None, 5_000_000, 1024, true);
        // The third request meets the new version, mid-file.
        let (got, requests) = run(&mut f, |o, l, n| {
            let z = if n < 2 { &zo } else { &zn };
            serve_range(1, z, Encoding::Zstd, o, l)
        });
        assert_eq!(got.unwrap(), new, "never a mix of both versions");
        assert_eq!(f.restarts(), 1);
        assert_eq!(requests, 2 + 1 + zn.len().div_ceil(1024));
    }

    #[test]
    fn metadata_that_keeps_changing_between_chunks_fails() {
        let files: Vec<Vec<u8>> = (0..20).map(|i| compress(&targets_like(1000 + i))).collect();
        let mut f = MetadataFetch::new("targets", None, 5_000_000, 1024, true);
        let (got, _) = run(&mut f, |o, l, n| {
            serve_range(1, &files[n % 20], Encoding::Zstd, o, l)
        });
        assert_eq!(got, Err(MetadataError::KeptChanging(MAX_RESTARTS + 1)));
    }

    #[test]
    fn rejects_total_over_the_roles_max_length_before_fetching_more() {
        // Endless data: the first answer announces more than the role may have.
        let big = vec![b' '; 300_000];
        let mut f = MetadataFetch::new("timestamp", None, 16_384, CHUNK_LEN, false);
        let (got, requests) = run(&mut f, |o, l, _| {
            serve_range(1, &big, Encoding::Identity, o, l)
        });
        assert!(matches!(
            got,
            Err(MetadataError::TooLarge {
                len: 300_000,
                max: 16_384,
                ..
            })
        ));
        assert_eq!(requests, 1);
        assert!(f.wire_bytes() <= u64::from(CHUNK_LEN));
        // Growing total mid-fetch (a "new version" each time) is capped the same way.
        let mut f = MetadataFetch::new("timestamp", None, 16_384, 1024, false);
        let (got, _) = run(&mut f, |o, l, n| {
            let file = vec![b'x'; 2048 * (n + 1)];
            serve_range(1, &file, Encoding::Identity, o, l)
        });
        assert!(matches!(
            got,
            Err(MetadataError::TooLarge { .. }) | Err(MetadataError::KeptChanging(_))
        ));
    }

    #[test]
    fn rejects_a_compression_bomb_without_decoding_it() {
        // 64 MiB of zeros in a few kilobytes, announced as such.
        let bomb = compress(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
        let mut f = MetadataFetch::new("targets", None, 5_000_000, CHUNK_LEN, true);
        let (got, _) = run(&mut f, |o, l, _| {
            serve_range(1, &bomb, Encoding::Zstd, o, l)
        });
        assert!(
            matches!(
                got,
                Err(MetadataError::TooLarge {
                    what: "decompressed metadata",
                    ..
                })
            ),
            "{got:?}"
        );
        // A frame that does not declare its size, or declares less than it holds.
        let undeclared = zstd::stream::encode_all(&vec![0u8; 8 << 20][..], 3).unwrap();
        assert!(matches!(
            decompress(&undeclared, 5_000_000),
            Err(MetadataError::Corrupt(_))
        ));
        let small = compress(&[7u8; 1000]);
        let mut lying = small.clone();
        // Frame header: magic (4), descriptor (1), window (1 unless single-segment),
        // then the content size; rewriting it to a smaller value must not overflow.
        let fcs = zstd_safe::get_frame_content_size(&small).unwrap().unwrap();
        assert_eq!(fcs, 1000);
        let pos = (4..small.len() - 1)
            .find(|&i| u16::from_le_bytes([small[i], small[i + 1]]) == 1000 - 256)
            .expect("2-byte content size field");
        // Declares 256 bytes (the field stores the size minus 256).
        lying[pos..pos + 2].copy_from_slice(&0u16.to_le_bytes());
        assert!(decompress(&lying, 5_000_000).is_err());
    }

    #[test]
    fn rejects_a_truncated_chunk_and_can_ask_again() {
        let raw = targets_like(500);
        let mut f = MetadataFetch::new("targets", None, 5_000_000, 1024, false);
        let first = f.request();
        let mut short = serve_range(1, &raw, Encoding::Identity, 0, 1024);
        short.body.truncate(1000);
        assert!(matches!(f.accept(&short), Err(MetadataError::Mismatch(_))));
        assert_eq!(f.request(), first, "the same range is asked again");
        let (got, _) = run(&mut f, |o, l, _| {
            serve_range(1, &raw, Encoding::Identity, o, l)
        });
        assert_eq!(got.unwrap(), raw);
        // A truncated final frame does not decode.
        let z = compress(&raw);
        assert!(decompress(&z[..z.len() - 3], 5_000_000).is_err());
    }

    #[test]
    fn rejects_answers_for_another_range_or_without_an_etag() {
        let raw = targets_like(200);
        let mut f = MetadataFetch::new("targets", None, 5_000_000, 1024, false);
        f.accept(&serve_range(1, &raw, Encoding::Identity, 0, 1024))
            .unwrap();
        let other = serve_range(1, &raw, Encoding::Identity, 4096, 1024);
        assert!(matches!(f.accept(&other), Err(MetadataError::Mismatch(_))));
        let mut no_tag = serve_range(1, &raw, Encoding::Identity, 1024, 1024);
        no_tag.header.etag = None;
        assert!(matches!(f.accept(&no_tag), Err(MetadataError::Mismatch(_))));
        let mut unasked = MetadataFetch::new("targets", None, 5_000_000, 1024, false);
        let z = compress(&raw);
        assert!(matches!(
            unasked.accept(&serve_range(1, &z, Encoding::Zstd, 0, 1024)),
            Err(MetadataError::Mismatch(_))
        ));
    }
}

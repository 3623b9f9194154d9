//! Metadata for devices in ranges (`wire::metadata`): each file is encoded once per
//! content (zstd when the device accepts it and it is smaller) and cached, so that every
//! range of one version comes from the same bytes under the same etag.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use outpost_protocol::wire::metadata::{compress, etag, serve_range_tagged};
use outpost_protocol::wire::{Encoding, Response};
use sha2::{Digest, Sha256};

/// Encoded files kept: the four top-level roles, a few delegations and the versions
/// being replaced while devices still fetch them.
const ENTRIES: usize = 16;

/// One file as sent to devices that accept zstd.
#[derive(Debug)]
struct Encoded {
    bytes: Vec<u8>,
    encoding: Encoding,
    etag: String,
}

/// Cache of encoded metadata, keyed by the sha256 of the file's bytes.
#[derive(Debug, Default)]
pub struct MetadataCache {
    entries: Mutex<VecDeque<([u8; 32], Arc<Encoded>)>>,
}

impl MetadataCache {
    /// The answer to a ranged request for `raw` (the current bytes of the file).
    pub fn range(&self, raw: &[u8], accept_zstd: bool, offset: u64, len: u32) -> Response {
        let key: [u8; 32] = Sha256::digest(raw).into();
        if !accept_zstd {
            return serve_range_tagged(0, raw, Encoding::Identity, hex::encode(key), offset, len);
        }
        let e = self.encoded(key, raw);
        match e.encoding {
            Encoding::Zstd => {
                serve_range_tagged(0, &e.bytes, Encoding::Zstd, e.etag.clone(), offset, len)
            }
            _ => serve_range_tagged(0, raw, Encoding::Identity, e.etag.clone(), offset, len),
        }
    }

    /// Encodes `raw` now, so that the first device asking does not wait for it (device
    /// requests are handled one at a time).
    pub fn warm(&self, raw: &[u8]) {
        self.encoded(Sha256::digest(raw).into(), raw);
    }

    fn encoded(&self, key: [u8; 32], raw: &[u8]) -> Arc<Encoded> {
        let lock = || self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, e)) = lock().iter().find(|(k, _)| *k == key) {
            return e.clone();
        }
        // Compressed outside the lock; two racing requests compute the same bytes.
        let z = compress(raw);
        let e = Arc::new(if z.len() < raw.len() {
            Encoded {
                etag: etag(&z),
                bytes: z,
                encoding: Encoding::Zstd,
            }
        } else {
            Encoded {
                bytes: Vec::new(),
                encoding: Encoding::Identity,
                etag: hex::encode(key),
            }
        });
        let mut entries = lock();
        if !entries.iter().any(|(k, _)| *k == key) {
            if entries.len() >= ENTRIES {
                entries.pop_front();
            }
            entries.push_back((key, e.clone()));
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::wire::metadata::MetadataFetch;
    use outpost_protocol::wire::{CHUNK_LEN, RequestBody};

    #[test]
    fn ranges_of_one_version_share_an_etag_and_reassemble() {
        let cache = MetadataCache::default();
        let raw = br#"{"signed":{"targets":{"a":1}}}"#.repeat(10_000);
        cache.warm(&raw);
        let mut f = MetadataFetch::new("targets", None, 5_000_000, CHUNK_LEN, true);
        let mut etags = Vec::new();
        let got = loop {
            let RequestBody::Metadata { offset, len, .. } = f.request() else {
                unreachable!()
            };
            let r = cache.range(&raw, true, offset.unwrap(), len.unwrap());
            assert_eq!(r.header.encoding, Some(Encoding::Zstd));
            etags.push(r.header.etag.clone());
            if let Some(b) = f.accept(&r).unwrap() {
                break b;
            }
        };
        assert_eq!(got, raw);
        assert!(etags.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(cache.entries.lock().unwrap().len(), 1);
        // Incompressible bytes, and devices that do not take zstd, get the file itself.
        let noise: Vec<u8> = (0..200u32)
            .flat_map(|i| Sha256::digest(i.to_le_bytes()))
            .take(5000)
            .collect();
        for accept in [true, false] {
            let r = cache.range(&noise, accept, 0, 100);
            assert_eq!(r.header.encoding, Some(Encoding::Identity));
            assert_eq!(r.body, noise[..100]);
            assert_eq!(r.header.total, Some(5000));
        }
    }
}

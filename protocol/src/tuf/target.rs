//! Target files: the verified entry found by a lookup, and checking downloaded bytes
//! against it (length capped while streaming, every signed hash compared at the end).

use super::metadata::{MultiHasher, TargetFile};
use super::{Error, Result};

/// A target entry found in verified targets metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetInfo {
    /// Target path (the key in `targets`).
    pub path: String,
    /// Length, hashes and custom metadata.
    pub file: TargetFile,
    /// Name of the targets role that listed it.
    pub role: String,
}

impl TargetInfo {
    /// Path to fetch from the repository: with consistent snapshots the file name is
    /// prefixed with its hash (`dir/HASH.name`, first hash in algorithm order), as
    /// python-tuf does.
    pub fn remote_path(&self, consistent_snapshot: bool) -> String {
        match self.file.hashes.values().next() {
            Some(hash) if consistent_snapshot => match self.path.rsplit_once('/') {
                Some((dir, name)) => format!("{dir}/{hash}.{name}"),
                None => format!("{hash}.{}", self.path),
            },
            _ => self.path.clone(),
        }
    }

    /// Checks complete target bytes against the signed length and hashes.
    pub fn verify_bytes(&self, bytes: &[u8]) -> Result<()> {
        let mut h = TargetHasher::new(&self.path, &self.file)?;
        h.update(bytes)?;
        h.finish()
    }
}

/// Hashes a target while it downloads. Rejects the first chunk that would pass the signed
/// length; [`TargetHasher::finish`] checks the exact length and every signed hash. No
/// byte may be used before `finish` returned `Ok`.
pub struct TargetHasher {
    what: String,
    file: TargetFile,
    read: u64,
    hasher: MultiHasher,
}

impl TargetHasher {
    /// A hasher for target `path` with signed entry `file`. Fails if the entry names a
    /// hash algorithm this crate cannot compute (then no download can ever verify).
    pub fn new(path: &str, file: &TargetFile) -> Result<Self> {
        Ok(TargetHasher {
            what: path.to_owned(),
            hasher: MultiHasher::new(path, &file.hashes)?,
            file: file.clone(),
            read: 0,
        })
    }

    /// Feeds the next chunk.
    pub fn update(&mut self, chunk: &[u8]) -> Result<()> {
        let len = self.read.saturating_add(chunk.len() as u64);
        if len > self.file.length {
            return Err(Error::TooLarge {
                what: self.what.clone(),
                len,
                max: self.file.length,
            });
        }
        self.read = len;
        self.hasher.update(chunk);
        Ok(())
    }

    /// Bytes still expected.
    pub fn remaining(&self) -> u64 {
        self.file.length - self.read
    }

    /// Checks the total length and the hashes.
    pub fn finish(self) -> Result<()> {
        if self.read != self.file.length {
            return Err(Error::LengthMismatch {
                what: self.what,
                expected: self.file.length,
                found: self.read,
            });
        }
        self.hasher.finish(&self.what, &self.file.hashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(bytes: &[u8]) -> TargetInfo {
        TargetInfo {
            path: "models/m.onnx".into(),
            file: TargetFile::from_bytes(bytes, None),
            role: "targets".into(),
        }
    }

    #[test]
    fn streaming_hasher_accepts_exact_bytes_in_chunks() {
        let data = vec![5u8; 1000];
        let info = info(&data);
        let mut h = TargetHasher::new(&info.path, &info.file).unwrap();
        for chunk in data.chunks(333) {
            h.update(chunk).unwrap();
        }
        assert_eq!(h.remaining(), 0);
        h.finish().unwrap();
    }

    #[test]
    fn rejects_endless_target_data_past_signed_length() {
        let info = info(b"abc");
        let mut h = TargetHasher::new(&info.path, &info.file).unwrap();
        h.update(b"ab").unwrap();
        assert!(matches!(
            h.update(b"cd"),
            Err(Error::TooLarge { max: 3, .. })
        ));
    }

    #[test]
    fn rejects_truncated_or_altered_target() {
        let info = info(b"abc");
        assert!(matches!(
            info.verify_bytes(b"ab"),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(
            info.verify_bytes(b"abd"),
            Err(Error::HashMismatch { .. })
        ));
        info.verify_bytes(b"abc").unwrap();
    }

    #[test]
    fn consistent_snapshot_paths_are_hash_prefixed() {
        let info = info(b"abc");
        let h = &info.file.hashes["sha256"];
        assert_eq!(info.remote_path(true), format!("models/{h}.m.onnx"));
        assert_eq!(info.remote_path(false), "models/m.onnx");
    }
}

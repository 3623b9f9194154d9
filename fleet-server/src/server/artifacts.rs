//! Content-addressed artifact files (full models and deltas, named by the sha256 of
//! their bytes) and staged uploads.
//!
//! ```text
//! DATA/artifacts/<sha256>   what devices fetch in chunks
//! DATA/uploads/<sha256>     bytes uploaded by operators, not yet part of a release
//! ```

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use outpost_protocol::delta::{self, Best};
use sha2::{Digest, Sha256};

use super::ServerError;
use super::repository::write_atomic;

/// Whether `s` is a lowercase hex sha256.
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// sha256 hex of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A delta artifact worth keeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaChoice {
    /// Codec name.
    pub codec: String,
    /// The delta bytes.
    pub bytes: Vec<u8>,
}

/// The artifact store.
#[derive(Debug)]
pub struct ArtifactStore {
    artifacts: PathBuf,
    uploads: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.to_owned(),
        source,
    }
}

impl ArtifactStore {
    /// Opens (creating) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<ArtifactStore, ServerError> {
        let s = ArtifactStore {
            artifacts: data_dir.join("artifacts"),
            uploads: data_dir.join("uploads"),
        };
        for d in [&s.artifacts, &s.uploads] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        Ok(s)
    }

    fn artifact_path(&self, id: &str) -> PathBuf {
        self.artifacts.join(id)
    }

    /// Stages uploaded bytes under their sha256, which must equal `claimed`.
    pub fn stage_upload(&self, claimed: &str, bytes: &[u8]) -> Result<(), ServerError> {
        if !valid_sha256(claimed) {
            return Err(ServerError::Rejected(format!(
                "{claimed:?} is not a lowercase hex sha256"
            )));
        }
        let actual = sha256_hex(bytes);
        if actual != claimed {
            return Err(ServerError::Rejected(format!(
                "uploaded bytes hash to {actual}, not {claimed}"
            )));
        }
        write_atomic(&self.uploads.join(claimed), bytes)
    }

    /// The bytes of a target, from the artifacts or the staged uploads.
    pub fn target_bytes(&self, sha256: &str) -> Result<Option<Vec<u8>>, ServerError> {
        if !valid_sha256(sha256) {
            return Ok(None);
        }
        for p in [self.artifact_path(sha256), self.uploads.join(sha256)] {
            match std::fs::read(&p) {
                Ok(b) => return Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&p)(e)),
            }
        }
        Ok(None)
    }

    /// Stores bytes as an artifact, returning its id; removes a staged upload of them.
    pub fn put(&self, bytes: &[u8]) -> Result<String, ServerError> {
        let id = sha256_hex(bytes);
        let p = self.artifact_path(&id);
        if !p.exists() {
            write_atomic(&p, bytes)?;
        }
        let staged = self.uploads.join(&id);
        if staged.exists() {
            std::fs::remove_file(&staged).map_err(io(&staged))?;
        }
        Ok(id)
    }

    /// Reads `len` bytes at `offset` of artifact `id` (fewer at the end). `None` if the
    /// artifact file is missing or the offset is past its end.
    pub fn chunk(
        &self,
        id: &str,
        offset: u64,
        len: u32,
    ) -> Result<Option<(u64, Vec<u8>)>, ServerError> {
        if !valid_sha256(id) {
            return Ok(None);
        }
        let p = self.artifact_path(id);
        let mut f = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&p)(e)),
        };
        let total = f.metadata().map_err(io(&p))?.len();
        if offset >= total && !(offset == 0 && total == 0) {
            return Ok(None);
        }
        f.seek(SeekFrom::Start(offset)).map_err(io(&p))?;
        let want = (total - offset).min(u64::from(len)) as usize;
        let mut buf = vec![0u8; want];
        f.read_exact(&mut buf).map_err(io(&p))?;
        Ok(Some((total, buf)))
    }
}

/// The full target compressed with zstd ([`delta::compress_full`], level 19) if that is
/// smaller than the target itself, which is what devices download otherwise.
pub fn compressed_full(target: &[u8]) -> Result<Option<Vec<u8>>, ServerError> {
    let frame = delta::compress_full(target)?;
    Ok((frame.len() < target.len()).then_some(frame))
}

/// The delta from `base` to `target` if it is smaller than the full target, which is
/// what devices download otherwise. `encode_best` measures every codec; when it finds
/// compressing the full target smaller than any delta the best delta is re-encoded only
/// if it still beats the raw full file.
pub fn best_delta(base: &[u8], target: &[u8]) -> Result<Option<DeltaChoice>, ServerError> {
    let best = delta::encode_best(base, target)?;
    let (codec, bytes) = match best {
        Best::Delta { codec, delta, .. } => (codec, delta),
        Best::Full {
            codec, delta_len, ..
        } if (delta_len as u64) < target.len() as u64 => (
            codec,
            delta::encode(base, target, codec, delta::DEFAULT_LEVEL)?,
        ),
        _ => return Ok(None),
    };
    if bytes.len() >= target.len() {
        return Ok(None);
    }
    Ok(Some(DeltaChoice {
        codec: format!("{codec:?}"),
        bytes,
    }))
}

//! Operator key files: Ed25519 signing keys at rest, optionally sealed with a passphrase.
//!
//! One JSON file per key, written with mode 0600 and never printed:
//!
//! ```json
//! {"outpost_key": 1, "role": "root", "keytype": "ed25519", "scheme": "ed25519",
//!  "public": "<hex>", "private": "<hex seed>"}
//! ```
//!
//! or, sealed (`private` replaced by `sealed`): the 32-byte seed encrypted with
//! ChaCha20-Poly1305 under a key derived from the passphrase by scrypt
//! (`log_n` 15, `r` 8, `p` 1 by default; the parameters are stored). A wrong passphrase
//! fails the AEAD tag check and gives [`KeyError::WrongPassphrase`].

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Errors reading or writing key files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file does not exist.
    #[error("key file {path} not found")]
    Missing {
        /// The path looked at.
        path: PathBuf,
    },
    /// The file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not an Outpost key file.
    #[error("key file {path} is not an Outpost key file: {reason}")]
    Malformed {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key is sealed and no passphrase was given.
    #[error("key file {path} is sealed with a passphrase; set OUTPOST_KEY_PASSPHRASE")]
    PassphraseRequired {
        /// The path.
        path: PathBuf,
    },
    /// The passphrase does not open the key.
    #[error("wrong passphrase for key file {path}")]
    WrongPassphrase {
        /// The path.
        path: PathBuf,
    },
    /// Refusing to overwrite an existing key.
    #[error("key file {path} already exists; refusing to overwrite a key")]
    Exists {
        /// The path.
        path: PathBuf,
    },
}

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct KeyFile {
    outpost_key: u32,
    role: String,
    keytype: String,
    scheme: String,
    public: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    private: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<Sealed>,
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    kdf: String,
    log_n: u8,
    r: u32,
    p: u32,
    salt: String,
    cipher: String,
    nonce: String,
    ciphertext: String,
}

/// scrypt cost used when sealing. Tests lower it through [`SealCost`].
#[derive(Debug, Clone, Copy)]
pub struct SealCost {
    /// log2 of scrypt's N.
    pub log_n: u8,
}

impl Default for SealCost {
    fn default() -> Self {
        SealCost { log_n: 15 }
    }
}

/// Fills `buf` from the operating system's random source.
pub fn random_bytes(buf: &mut [u8]) {
    getrandom::getrandom(buf).expect("the operating system's random source failed");
}

/// Generates a new Ed25519 signing key from the operating system's random source.
pub fn generate() -> SigningKey {
    let mut seed = Zeroizing::new([0u8; 32]);
    random_bytes(seed.as_mut());
    SigningKey::from_bytes(&seed)
}

fn derive(passphrase: &str, salt: &[u8], log_n: u8, r: u32, p: u32) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    let params = scrypt::Params::new(log_n, r, p, 32).expect("valid scrypt parameters");
    scrypt::scrypt(passphrase.as_bytes(), salt, &params, out.as_mut())
        .expect("32-byte scrypt output is valid");
    out
}

/// Writes `key` for `role` to `path` with mode 0600. Sealed when `passphrase` is given.
/// Never overwrites an existing file.
pub fn write(
    path: &Path,
    role: &str,
    key: &SigningKey,
    passphrase: Option<&str>,
    cost: SealCost,
) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let seed = Zeroizing::new(key.to_bytes());
    let (private, sealed) = match passphrase {
        None => (Some(hex::encode(seed.as_ref())), None),
        Some(pass) => {
            let mut salt = [0u8; 16];
            let mut nonce = [0u8; 12];
            random_bytes(&mut salt);
            random_bytes(&mut nonce);
            let k = derive(pass, &salt, cost.log_n, 8, 1);
            let cipher = ChaCha20Poly1305::new(k.as_ref().into());
            let ct = cipher
                .encrypt(&Nonce::from(nonce), seed.as_ref())
                .expect("encrypting 32 bytes cannot fail");
            (
                None,
                Some(Sealed {
                    kdf: "scrypt".into(),
                    log_n: cost.log_n,
                    r: 8,
                    p: 1,
                    salt: hex::encode(salt),
                    cipher: "chacha20poly1305".into(),
                    nonce: hex::encode(nonce),
                    ciphertext: hex::encode(ct),
                }),
            )
        }
    };
    let file = KeyFile {
        outpost_key: FORMAT,
        role: role.to_owned(),
        keytype: "ed25519".into(),
        scheme: "ed25519".into(),
        public: hex::encode(key.verifying_key().as_bytes()),
        private,
        sealed,
    };
    let json = Zeroizing::new(serde_json::to_vec_pretty(&file).expect("key file serializes"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_owned(),
                }
            } else {
                io(e)
            }
        })?;
    f.write_all(&json).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

/// Reads a key file, opening it with `passphrase` when it is sealed.
pub fn read(path: &Path, passphrase: Option<&str>) -> Result<SigningKey, KeyError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            KeyError::Missing {
                path: path.to_owned(),
            }
        } else {
            KeyError::Io {
                path: path.to_owned(),
                source,
            }
        }
    })?);
    let malformed = |reason: String| KeyError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let file: KeyFile = serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
    if file.outpost_key != FORMAT || file.keytype != "ed25519" || file.scheme != "ed25519" {
        return Err(malformed(format!(
            "unsupported format {} / key type {} / scheme {}",
            file.outpost_key, file.keytype, file.scheme
        )));
    }
    let seed: Zeroizing<[u8; 32]> = match (&file.private, &file.sealed) {
        (Some(hex_seed), None) => {
            let mut seed = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(hex_seed, seed.as_mut())
                .map_err(|e| malformed(format!("private key: {e}")))?;
            seed
        }
        (None, Some(s)) => {
            let pass = passphrase.ok_or_else(|| KeyError::PassphraseRequired {
                path: path.to_owned(),
            })?;
            if s.kdf != "scrypt" || s.cipher != "chacha20poly1305" || s.log_n > 22 {
                return Err(malformed(format!(
                    "unsupported sealing {}/{}",
                    s.kdf, s.cipher
                )));
            }
            let salt = hex::decode(&s.salt).map_err(|e| malformed(format!("salt: {e}")))?;
            let nonce = hex::decode(&s.nonce).map_err(|e| malformed(format!("nonce: {e}")))?;
            let ct =
                hex::decode(&s.ciphertext).map_err(|e| malformed(format!("ciphertext: {e}")))?;
            let nonce: [u8; 12] = nonce
                .try_into()
                .map_err(|_| malformed("nonce must be 12 bytes".into()))?;
            let k = derive(pass, &salt, s.log_n, s.r, s.p);
            let cipher = ChaCha20Poly1305::new(k.as_ref().into());
            let plain = Zeroizing::new(cipher.decrypt(&Nonce::from(nonce), ct.as_ref()).map_err(
                |_| KeyError::WrongPassphrase {
                    path: path.to_owned(),
                },
            )?);
            let seed: [u8; 32] = plain
                .as_slice()
                .try_into()
                .map_err(|_| malformed("sealed seed is not 32 bytes".into()))?;
            Zeroizing::new(seed)
        }
        _ => {
            return Err(malformed(
                "exactly one of `private` and `sealed` must be present".into(),
            ));
        }
    };
    let key = SigningKey::from_bytes(&seed);
    if hex::encode(key.verifying_key().as_bytes()) != file.public {
        return Err(malformed(
            "public key does not match the private key".into(),
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: SealCost = SealCost { log_n: 4 };

    #[test]
    fn plain_key_round_trips_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        let key = generate();
        write(&path, "targets", &key, None, CHEAP).unwrap();
        assert_eq!(read(&path, None).unwrap().to_bytes(), key.to_bytes());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn sealed_key_needs_the_right_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        let key = generate();
        write(&path, "root", &key, Some("correct horse"), CHEAP).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&hex::encode(key.to_bytes())), "seed leaked");
        assert!(matches!(
            read(&path, None),
            Err(KeyError::PassphraseRequired { .. })
        ));
        assert!(matches!(
            read(&path, Some("wrong")),
            Err(KeyError::WrongPassphrase { .. })
        ));
        assert_eq!(
            read(&path, Some("correct horse")).unwrap().to_bytes(),
            key.to_bytes()
        );
    }

    #[test]
    fn refuses_to_overwrite_and_reports_missing_or_malformed_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        write(&path, "root", &generate(), None, CHEAP).unwrap();
        assert!(matches!(
            write(&path, "root", &generate(), None, CHEAP),
            Err(KeyError::Exists { .. })
        ));
        assert!(matches!(
            read(&dir.path().join("none.json"), None),
            Err(KeyError::Missing { .. })
        ));
        std::fs::write(dir.path().join("bad.json"), b"{\"not\": 1}").unwrap();
        assert!(matches!(
            read(&dir.path().join("bad.json"), None),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn rejects_key_file_whose_public_half_was_swapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.json");
        write(&path, "root", &generate(), None, CHEAP).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["public"] = hex::encode(generate().verifying_key().as_bytes()).into();
        let other = dir.path().join("swapped.json");
        std::fs::write(&other, serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(matches!(
            read(&other, None),
            Err(KeyError::Malformed { .. })
        ));
    }
}

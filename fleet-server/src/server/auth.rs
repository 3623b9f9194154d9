//! Credentials: operator bearer tokens with roles, and device broker passwords stored as
//! Mosquitto 2.0 password hashes (`$7$ITERATIONS$SALT$HASH`, PBKDF2-HMAC-SHA512), the
//! format `mosquitto_passwd` writes, so the server's password file is Mosquitto's.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};

/// Iterations `mosquitto_passwd` 2.0 uses.
pub const MOSQUITTO_ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;

/// An operator's role. Each role can do everything the previous one can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads devices, releases and telemetry.
    Viewer,
    /// Also uploads releases, provisions devices and assigns releases.
    Operator,
    /// Also mints tokens and reads the audit log.
    Admin,
}

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    crate::keys::random_bytes(&mut b);
    b
}

/// A new operator token (`opt_` and 64 hex digits). Only its hash is stored.
pub fn new_token() -> String {
    format!("opt_{}", hex::encode(random::<32>()))
}

/// What the server stores of a token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new device password (32 URL-safe characters, 192 bits).
pub fn new_password() -> String {
    URL_SAFE_NO_PAD.encode(random::<24>())
}

/// Hashes `password` in Mosquitto's `$7$` format with a random salt.
pub fn mosquitto_hash(password: &str) -> String {
    mosquitto_hash_with(password, &random::<SALT_LEN>(), MOSQUITTO_ITERATIONS)
}

fn mosquitto_hash_with(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut out = [0u8; HASH_LEN];
    pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), salt, iterations, &mut out);
    format!(
        "$7${iterations}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(out)
    )
}

/// Checks `password` against a `$7$` hash (for an embedded broker's auth hook).
pub fn mosquitto_verify(password: &str, hash: &str) -> bool {
    let mut parts = hash.split('$');
    let (Some(""), Some("7"), Some(iter), Some(salt), Some(expected), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Ok(iter), Ok(salt)) = (iter.parse::<u32>(), STANDARD.decode(salt)) else {
        return false;
    };
    if iter == 0 || iter > 1_000_000 {
        return false;
    }
    let computed = mosquitto_hash_with(password, &salt, iter);
    let got = computed.rsplit('$').next().unwrap_or_default();
    // Both sides are public-length base64 of a fixed-size digest.
    got.len() == expected.len()
        && got
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_hash_written_by_mosquitto_passwd() {
        // `mosquitto_passwd -b -c f alice secret` (Mosquitto 2.0.11).
        let line = "$7$101$EBUHy/TBBNvcxnUa$XqRiq6uyTk69KAqBJhR84ZBADuE4tCEszKxJjPklf6xplvx2/APWPCO3D9iNu6RftrgyUPdccwur0RG+bcYZqg==";
        assert!(mosquitto_verify("secret", line));
        assert!(!mosquitto_verify("secreT", line));
        let salt = STANDARD.decode("EBUHy/TBBNvcxnUa").unwrap();
        assert_eq!(mosquitto_hash_with("secret", &salt, 101), line);
    }

    #[test]
    fn own_hashes_verify_and_malformed_hashes_do_not() {
        let p = new_password();
        let h = mosquitto_hash(&p);
        assert!(mosquitto_verify(&p, &h));
        assert!(!mosquitto_verify("other", &h));
        for bad in [
            "",
            "$6$1$a$b",
            "$7$0$AAAA$AAAA",
            "$7$x$AAAA$AAAA",
            "$7$1$AAAA",
        ] {
            assert!(!mosquitto_verify(&p, bad), "{bad}");
        }
    }

    #[test]
    fn roles_are_ordered_by_privilege() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for r in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }
}

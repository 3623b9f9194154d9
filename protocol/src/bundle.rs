//! The device bundle: what `outpostctl devices bundle --id ID --out DIR` writes and what
//! `outpost-agent run --config DIR/agent.toml` reads. Flashing a board is copying the
//! directory.
//!
//! ```text
//! DIR/agent.toml     AgentConfig (this module), TOML
//! DIR/credentials    the device's broker password, one line, mode 0600
//! DIR/root.json      the trusted root of the image repository (TUF trust anchor)
//! DIR/ca.pem         optional: CA certificate of the broker's TLS listener
//! ```
//!
//! Relative paths in `agent.toml` are relative to the directory holding it.
//!
//! ```
//! use outpost_protocol::bundle::AgentConfig;
//! let cfg = AgentConfig::from_toml(r#"
//!     device_id = "pi-kitchen-01"
//!     data_dir = "/var/lib/outpost"
//!     [broker]
//!     url = "mqtt://fleet.example.com:1883"
//! "#).unwrap();
//! assert_eq!(cfg.broker.username(&cfg.device_id), "pi-kitchen-01");
//! assert_eq!(cfg.trust.root, std::path::PathBuf::from("root.json"));
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading an agent configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not valid TOML for this schema.
    #[error("agent config: {0}")]
    Toml(#[from] toml::de::Error),
    /// A rule is broken.
    #[error("agent config: {0}")]
    Invalid(String),
}

/// The agent's configuration file (`agent.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Device id: MQTT client id and username, and the director's device id.
    pub device_id: String,
    /// Data directory (model store, outbox, update state). Locked while the agent runs.
    pub data_dir: PathBuf,
    /// The broker connection.
    pub broker: BrokerConfig,
    /// The trust anchor.
    #[serde(default)]
    pub trust: TrustConfig,
    /// Telemetry and monitoring.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Update behaviour.
    #[serde(default)]
    pub update: UpdateConfig,
    /// Device tags (also set on the server with `outpostctl devices add --tag`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
}

/// The broker connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    /// MQTT username; default: the device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the password (one line); default `credentials`.
    #[serde(default = "default_credentials")]
    pub password_file: PathBuf,
    /// `mqtts://` only: PEM file of the CA certificate(s) to trust, and only these;
    /// without it, the operating system's trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// `mqtts://` only: the name the broker's certificate must carry, instead of the
    /// URL's host (a broker reached by IP address whose certificate names a DNS name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Keep-alive in seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u16,
    /// Largest reconnect back-off in seconds (exponential from 1 s, with jitter).
    #[serde(default = "default_max_backoff")]
    pub max_backoff_secs: u16,
}

impl BrokerConfig {
    /// The MQTT username for `device_id`.
    pub fn username<'a>(&'a self, device_id: &'a str) -> &'a str {
        self.username.as_deref().unwrap_or(device_id)
    }
}

fn default_credentials() -> PathBuf {
    PathBuf::from("credentials")
}
fn default_keep_alive() -> u16 {
    30
}
fn default_max_backoff() -> u16 {
    60
}

/// The trust anchor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// The image repository's root metadata shipped with the device.
    #[serde(default = "default_root")]
    pub root: PathBuf,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            root: default_root(),
        }
    }
}

fn default_root() -> PathBuf {
    PathBuf::from("root.json")
}

/// Telemetry and monitoring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Close a monitoring window after this many seconds...
    #[serde(default = "default_window_secs")]
    pub window_secs: u32,
    /// ...or this many inferences, whichever comes first.
    #[serde(default = "default_window_count")]
    pub window_count: u32,
    /// Upload a batch at most this often, in seconds.
    #[serde(default = "default_upload_secs")]
    pub upload_secs: u32,
    /// Total byte cap of the outbox.
    #[serde(default = "default_outbox_bytes")]
    pub outbox_max_bytes: u64,
    /// Collect retraining samples (data-collection consent); off unless set.
    #[serde(default)]
    pub consent: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            window_secs: default_window_secs(),
            window_count: default_window_count(),
            upload_secs: default_upload_secs(),
            outbox_max_bytes: default_outbox_bytes(),
            consent: false,
        }
    }
}

fn default_window_secs() -> u32 {
    60
}
fn default_window_count() -> u32 {
    1000
}
fn default_upload_secs() -> u32 {
    10
}
fn default_outbox_bytes() -> u64 {
    16 * 1024 * 1024
}

/// Update behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// Probation after activation, in seconds: crashes, errors or failing accuracy
    /// proxies in this window revert to the previous model.
    #[serde(default = "default_probation")]
    pub probation_secs: u32,
    /// Chunk requests in flight at once.
    #[serde(default = "default_window")]
    pub chunk_window: u32,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            probation_secs: default_probation(),
            chunk_window: default_window(),
        }
    }
}

fn default_probation() -> u32 {
    300
}
fn default_window() -> u32 {
    4
}

impl AgentConfig {
    /// Parses and checks `agent.toml`.
    pub fn from_toml(text: &str) -> Result<AgentConfig, BundleError> {
        let cfg: AgentConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Serializes to TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("agent config serializes")
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), BundleError> {
        if !crate::wire::valid_device_id(&self.device_id) {
            return Err(BundleError::Invalid(format!(
                "device_id {:?} must be 1-64 characters of [A-Za-z0-9._-]",
                self.device_id
            )));
        }
        let url = &self.broker.url;
        let Some(rest) = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("mqtts://"))
        else {
            return Err(BundleError::Invalid(format!(
                "broker.url {url:?} must start with mqtt:// or mqtts://"
            )));
        };
        if rest
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(BundleError::Invalid(format!(
                "broker.url {url:?} must name a port (host:port)"
            )));
        }
        if url.starts_with("mqtt://")
            && (self.broker.ca_file.is_some() || self.broker.tls_server_name.is_some())
        {
            return Err(BundleError::Invalid(format!(
                "broker.ca_file and broker.tls_server_name need an mqtts:// url, not {url:?}"
            )));
        }
        if self.telemetry.window_count == 0 || self.telemetry.window_secs == 0 {
            return Err(BundleError::Invalid(
                "telemetry windows need a positive duration and count".into(),
            ));
        }
        if self.update.chunk_window == 0 || self.update.chunk_window > 64 {
            return Err(BundleError::Invalid(
                "update.chunk_window must be 1 to 64".into(),
            ));
        }
        Ok(())
    }

    /// Host and port of the broker, and whether TLS is on.
    pub fn broker_endpoint(&self) -> (String, u16, bool) {
        let url = &self.broker.url;
        let (tls, rest) = match url.strip_prefix("mqtts://") {
            Some(r) => (true, r),
            None => (false, url.strip_prefix("mqtt://").unwrap_or(url)),
        };
        let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
        (host.to_owned(), port.parse().unwrap_or(1883), tls)
    }

    /// Resolves a path from the config against the config file's directory.
    pub fn resolve(config_dir: &Path, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            config_dir.join(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_fills_defaults() {
        let cfg = AgentConfig::from_toml(
            "device_id = \"d1\"\ndata_dir = \"data\"\n[broker]\nurl = \"mqtts://h:8883\"\n",
        )
        .unwrap();
        assert_eq!(cfg.broker_endpoint(), ("h".into(), 8883, true));
        assert_eq!(cfg.broker.password_file, PathBuf::from("credentials"));
        assert!(!cfg.telemetry.consent);
        assert_eq!(AgentConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
    }

    #[test]
    fn rejects_bad_ids_urls_and_unknown_keys() {
        let base = |id: &str, url: &str| {
            format!("device_id = \"{id}\"\ndata_dir = \"d\"\n[broker]\nurl = \"{url}\"\n")
        };
        assert!(AgentConfig::from_toml(&base("a/b", "mqtt://h:1")).is_err());
        assert!(AgentConfig::from_toml(&base("a", "http://h:1")).is_err());
        assert!(AgentConfig::from_toml(&base("a", "mqtt://h")).is_err());
        let typo = base("a", "mqtt://h:1") + "[telemetry]\nconsnet = true\n";
        assert!(AgentConfig::from_toml(&typo).is_err());
        // A CA file on a plain URL would look like TLS while there is none.
        let plain_ca = base("a", "mqtt://h:1") + "ca_file = \"ca.pem\"\n";
        assert!(AgentConfig::from_toml(&plain_ca).is_err());
        let tls_ca = base("a", "mqtts://10.0.0.2:8883")
            + "ca_file = \"ca.pem\"\ntls_server_name = \"fleet.example.com\"\n";
        let cfg = AgentConfig::from_toml(&tls_ca).unwrap();
        assert_eq!(
            cfg.broker.tls_server_name.as_deref(),
            Some("fleet.example.com")
        );
    }
}

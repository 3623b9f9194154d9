//! Shared pieces: credentials, topic layout, the ACL rule, client options, certificates,
//! and the child-process broker handle.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rumqttc::{AsyncClient, EventLoop, MqttOptions, TlsConfiguration, Transport};

/// Largest packet both sides accept: a 64 KiB chunk plus headers, with headroom.
pub const MAX_PACKET: usize = 1024 * 1024;
/// Username and client id of the server's own, privileged client.
pub const SERVER_USER: &str = "outpost-server";
/// Password of the server's own client (bench only).
pub const SERVER_PASS: &str = "server-secret";

/// Device password for the bench: devices are `dev-N`, passwords `pw-N`.
pub fn device_password(device_id: &str) -> Option<String> {
    device_id
        .strip_prefix("dev-")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .map(|n| format!("pw-{n}"))
}

/// The topic prefix a device owns.
pub fn device_prefix(device_id: &str) -> String {
    format!("outpost/v1/devices/{device_id}/")
}

/// Outpost's ACL by construction: a device may use a topic (or filter) only when its
/// first four levels are literally `outpost/v1/devices/{device_id}` and a fifth level
/// exists. Wildcards in the first four levels, `$share/...` and `$SYS/...` all fail.
pub fn device_may_use(device_id: &str, topic_or_filter: &str) -> bool {
    let mut levels = topic_or_filter.split('/');
    let head: Vec<&str> = levels.by_ref().take(4).collect();
    head == ["outpost", "v1", "devices", device_id] && levels.next().is_some()
}

/// Checks CONNECT credentials. Returns `Some(superuser)` when accepted.
pub fn authenticate(
    client_id: &str,
    username: Option<&str>,
    password: Option<&[u8]>,
) -> Option<bool> {
    let username = username?;
    let password = password?;
    if username == SERVER_USER {
        return (client_id == SERVER_USER && password == SERVER_PASS.as_bytes()).then_some(true);
    }
    // Device: username = client id = device id; never a wildcard or separator.
    if username != client_id || client_id.contains(['/', '+', '#']) {
        return None;
    }
    let expected = device_password(username)?;
    (password == expected.as_bytes()).then_some(false)
}

/// Where a broker under test listens.
#[derive(Debug, Clone, Copy)]
pub struct Endpoints {
    /// Plain MQTT listener.
    pub tcp: SocketAddr,
    /// MQTT over TLS listener.
    pub tls: SocketAddr,
}

/// Self-signed certificate files for `127.0.0.1` and `localhost`.
pub struct TlsFiles {
    /// PEM certificate path.
    pub cert: PathBuf,
    /// PEM private key path.
    pub key: PathBuf,
    /// PEM certificate bytes (the client's trust anchor).
    pub cert_pem: Vec<u8>,
}

/// Writes (or reuses) a self-signed certificate in `dir`.
pub fn tls_files(dir: &Path) -> Result<TlsFiles> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if !cert.exists() {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])?;
        std::fs::write(&cert, ck.cert.pem())?;
        std::fs::write(&key, ck.key_pair.serialize_pem())?;
    }
    let cert_pem = std::fs::read(&cert)?;
    Ok(TlsFiles {
        cert,
        key,
        cert_pem,
    })
}

/// Installs the process-wide rustls provider (several are compiled in via quinn/rumqttc).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Client options with the packet size raised (rumqttc's default is 10 KiB).
pub fn options(client_id: &str, password: &str, addr: SocketAddr, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_credentials(client_id, password);
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(clean);
    o.set_inflight(32);
    o
}

/// Options for a TLS connection trusting `cert_pem`.
pub fn tls_options(
    client_id: &str,
    password: &str,
    addr: SocketAddr,
    cert_pem: &[u8],
) -> MqttOptions {
    let mut o = options(client_id, password, addr, true);
    o.set_transport(Transport::Tls(TlsConfiguration::Simple {
        ca: cert_pem.to_vec(),
        alpn: None,
        client_auth: None,
    }));
    o
}

/// Opens a client with a generous request channel.
pub fn client(o: MqttOptions) -> (AsyncClient, EventLoop) {
    AsyncClient::new(o, 512)
}

/// Device password lookup that panics on a bad bench id (bench-internal ids only).
pub fn pw(device_id: &str) -> String {
    device_password(device_id).expect("bench device ids are dev-N")
}

/// A broker running in a child process of this binary (`broker-eval serve ...`).
pub struct BrokerProcess {
    child: Child,
    /// Its listeners.
    pub endpoints: Endpoints,
}

impl BrokerProcess {
    /// Starts `serve <broker> <data_dir> [extra...]` and waits for its `READY` line.
    pub fn spawn(broker: &str, data_dir: &Path, extra: &[String]) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("serve")
            .arg(broker)
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .ok_or_else(|| anyhow!("broker exited before READY"))??;
        // READY tcp=ADDR tls=ADDR
        let mut tcp = None;
        let mut tls = None;
        for part in line.split_whitespace() {
            if let Some(v) = part.strip_prefix("tcp=") {
                tcp = Some(v.parse()?);
            } else if let Some(v) = part.strip_prefix("tls=") {
                tls = Some(v.parse()?);
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let endpoints = Endpoints {
            tcp: tcp.context("READY without tcp=")?,
            tls: tls.context("READY without tls=")?,
        };
        Ok(Self { child, endpoints })
    }

    /// Process id (for `/proc` readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        proc_status_field(self.pid(), "VmRSS:")
    }

    /// Number of OS threads.
    pub fn threads(&self) -> Result<u64> {
        proc_status_field(self.pid(), "Threads:")
    }

    /// SIGKILLs the broker: nothing gets a chance to flush.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_status_field(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix(field) {
            let n = rest.split_whitespace().next().context("empty field")?;
            return Ok(n.parse()?);
        }
    }
    bail!("{field} not in /proc/{pid}/status")
}

/// Shared flag type used by the brokers to count messages they dropped.
pub type DropCounter = Arc<std::sync::atomic::AtomicU64>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_cannot_use_wildcards_or_other_devices() {
        assert!(device_may_use(
            "dev-1",
            "outpost/v1/devices/dev-1/assignment"
        ));
        assert!(device_may_use("dev-1", "outpost/v1/devices/dev-1/#"));
        assert!(!device_may_use("dev-1", "#"));
        assert!(!device_may_use("dev-1", "outpost/v1/devices/+/assignment"));
        assert!(!device_may_use("dev-1", "outpost/v1/devices/#"));
        assert!(!device_may_use(
            "dev-1",
            "outpost/v1/devices/dev-2/assignment"
        ));
        assert!(!device_may_use("dev-1", "outpost/v1/devices/dev-1"));
        assert!(!device_may_use(
            "dev-1",
            "$share/g/outpost/v1/devices/dev-1/x"
        ));
        assert!(!device_may_use("dev-1", "outpost/+/devices/dev-1/x"));
    }

    #[test]
    fn rejects_username_that_differs_from_client_id() {
        assert_eq!(
            authenticate("dev-1", Some("dev-1"), Some(b"pw-1")),
            Some(false)
        );
        assert_eq!(authenticate("dev-2", Some("dev-1"), Some(b"pw-1")), None);
        assert_eq!(authenticate("dev-1", Some("dev-1"), Some(b"pw-2")), None);
        assert_eq!(authenticate("dev-1", None, None), None);
        assert_eq!(
            authenticate(SERVER_USER, Some(SERVER_USER), Some(SERVER_PASS.as_bytes())),
            Some(true)
        );
        assert_eq!(
            authenticate("x", Some(SERVER_USER), Some(SERVER_PASS.as_bytes())),
            None
        );
    }
}

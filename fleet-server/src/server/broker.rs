//! The embedded MQTT broker: rmqtt 0.24 on the server's tokio runtime, chosen by
//! measurement (`docs/broker.md`).
//!
//! [`EmbeddedBroker::start`] binds up to three listeners:
//! - a plain TCP device listener (`--mqtt`), meant for loopback or a trusted network;
//! - an optional TLS device listener (`--mqtts`): the server terminates TLS itself
//!   (tokio-rustls on ring, one task per connection with a handshake timeout) and pipes
//!   each connection to a loopback listener of the broker, so rmqtt's `tls` feature and
//!   its second crypto provider (aws-lc) stay out of the build;
//! - a loopback-only listener for the server's own client ([`super::mqtt`]), with random
//!   credentials made at each start and a large delivery queue.
//!
//! Auth and ACL are one in-code hook ([`OutpostHook`]): a device's username must equal
//! its client id and its password must match the `$7$` hash in the server's SQLite
//! device table (the credentials `outpostctl devices add/bundle` hand out); a device may
//! use exactly its own topics ([`wire::device_acl`]); the server's client is a superuser
//! and connects only on the internal listener. Devices are refused until the server's
//! client has subscribed to [`wire::SERVER_FILTERS`], so no request published after the
//! CONNACK can be lost for want of a subscriber.
//!
//! Retained messages live in memory only (`rmqtt-retainer`, `ram`, no TTL). SQLite stays
//! the durable store: the broker starts empty with the process, the server's client
//! finds no session and re-publishes every device's current assignment
//! ([`super::Core::current_assignments`]).
//!
//! rmqtt has no graceful stop: [`EmbeddedBroker::stop`] aborts its tasks.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outpost_protocol::wire::{self, Access};
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, ListenerId, PublishAclResult, SubscribeAclResult};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::BrokerClient;

/// Errors starting the embedded broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// A listener could not be bound.
    #[error("embedded broker: binding the {listener} listener on {addr}: {reason}")]
    Bind {
        /// Which listener (`devices`, `devices-tls`, `internal`).
        listener: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The TLS certificate or key is unusable.
    #[error("embedded broker: TLS {path}: {reason}")]
    Tls {
        /// The certificate or key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The device table could not be opened.
    #[error("embedded broker: device credentials in {path}: {source}")]
    Credentials {
        /// The database.
        path: PathBuf,
        /// The error.
        source: rusqlite::Error,
    },
    /// The retained-message plugin failed to start.
    #[error("embedded broker: retainer plugin: {reason}")]
    Plugin {
        /// Why.
        reason: String,
    },
}

/// The TLS device listener.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// Listen address (devices use `mqtts://`).
    pub addr: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificate(s) devices trust for this listener, written into device
    /// bundles as `ca.pem`; `None`: bundles rely on the devices' system trust store.
    pub ca: Option<PathBuf>,
}

/// Configuration of the embedded broker.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Plain TCP device listener; `None` turns it off. Loopback or trusted networks only:
    /// passwords cross it in clear text.
    pub mqtt: Option<SocketAddr>,
    /// TLS device listener.
    pub mqtts: Option<TlsListener>,
    /// Username and client id of the server's own client (refused as a device id).
    pub server_user: String,
}

/// Per-subscriber delivery queue of devices. QoS 1 overflow evicts the oldest message
/// (counted by [`EmbeddedBroker::dropped_messages`]); chunk windows stay far below it.
pub const DEVICE_MQUEUE_LEN: usize = 1000;
/// Delivery queue of the server's client, which subscribes to every device's topics.
pub const INTERNAL_MQUEUE_LEN: usize = 100_000;
/// How long a TLS or MQTT handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const LID_DEVICES: ListenerId = 1;
const LID_DEVICES_TLS: ListenerId = 2;
const LID_INTERNAL: ListenerId = 3;

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    /// Bound plain device listener.
    pub mqtt_addr: Option<SocketAddr>,
    /// Bound TLS device listener.
    pub mqtts_addr: Option<SocketAddr>,
    /// The TLS listener's CA certificate(s) for device bundles (PEM, checked at start).
    pub device_ca_pem: Option<String>,
    /// How the server's client reaches the internal listener.
    pub internal: BrokerClient,
    dropped: Arc<AtomicU64>,
    ready: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Binds the listeners and starts the broker on the current tokio runtime. `db` is
    /// the server's SQLite file (device credentials are read from it per CONNECT).
    pub async fn start(cfg: &EmbeddedConfig, db: &Path) -> Result<EmbeddedBroker, BrokerError> {
        let creds = Credentials::open(db)?;
        let tls = cfg.mqtts.as_ref().map(tls_acceptor).transpose()?;
        let device_ca_pem = cfg
            .mqtts
            .as_ref()
            .and_then(|t| t.ca.as_deref())
            .map(device_ca)
            .transpose()?;
        let internal = BrokerClient {
            host: "127.0.0.1".into(),
            port: 0,
            username: cfg.server_user.clone(),
            password: super::auth::new_password(),
            client_id: cfg.server_user.clone(),
        };
        let (ready_tx, ready) = watch::channel(false);
        let dropped = Arc::new(AtomicU64::new(0));
        let hook = Arc::new(OutpostHook {
            creds,
            server_user: internal.username.clone(),
            server_password: internal.password.clone(),
            subscribed: Mutex::new(BTreeSet::new()),
            ready: ready_tx,
            dropped: dropped.clone(),
        });

        let scx = ServerContext::new()
            .node_id(1)
            // Default: refuse CONNECTs while the *host's* CPU > 90 % or load1 > 80.
            .busy_check_enable(false)
            // Default TTL falls back to the listener's message expiry: assignments
            // would vanish. "0s" = never expire.
            .plugins_config_map_add(
                "rmqtt-retainer",
                "storage.type = \"ram\"\nretained_message_ttl = \"0s\"\nmax_payload_size = \"1MB\"\n",
            )
            .build()
            .await;
        rmqtt_retainer::register(&scx, true, false)
            .await
            .map_err(|e| BrokerError::Plugin {
                reason: e.to_string(),
            })?;
        let register = scx.extends.hook_mgr().register();
        for typ in [
            Type::ClientAuthenticate,
            Type::ClientSubscribeCheckAcl,
            Type::MessagePublishCheckAcl,
            Type::SessionSubscribed,
            Type::MessageDropped,
        ] {
            register.add(typ, Box::new(HookRef(hook.clone()))).await;
        }
        register.start().await;

        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut server = MqttServer::new(scx);
        let mut mqtt_addr = None;
        if let Some(addr) = cfg.mqtt {
            let (l, a) = bind("devices", addr, DEVICE_MQUEUE_LEN, 16)?;
            server = server.listener_by_id(l, LID_DEVICES);
            mqtt_addr = Some(a);
        }
        let mut tasks = Vec::new();
        let mut mqtts_addr = None;
        if let (Some(t), Some(acceptor)) = (&cfg.mqtts, tls) {
            let (l, backend) = bind("devices-tls", loopback, DEVICE_MQUEUE_LEN, 16)?;
            server = server.listener_by_id(l, LID_DEVICES_TLS);
            let front = TcpListener::bind(t.addr)
                .await
                .map_err(|e| bind_error("devices-tls", t.addr, e))?;
            mqtts_addr = Some(
                front
                    .local_addr()
                    .map_err(|e| bind_error("devices-tls", t.addr, e))?,
            );
            tasks.push(tokio::spawn(tls_front(front, acceptor, backend)));
        }
        let (l, internal_addr) = bind("internal", loopback, INTERNAL_MQUEUE_LEN, 128)?;
        let server = server.listener_by_id(l, LID_INTERNAL).build();
        // Not `MqttServer::start()`: it calls `std::process::exit(1)` when a listener fails.
        tasks.push(tokio::spawn(async move {
            if let Err(e) = server.run().await {
                eprintln!("outpost-server: embedded broker stopped: {e}");
            }
        }));
        Ok(EmbeddedBroker {
            mqtt_addr,
            mqtts_addr,
            device_ca_pem,
            internal: BrokerClient {
                port: internal_addr.port(),
                ..internal
            },
            dropped,
            ready,
            tasks,
        })
    }

    /// Waits until the server's client has subscribed to every device topic (devices
    /// are refused before). Returns whether it did within `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.ready.clone();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Messages the broker dropped (a full delivery queue, expiry) since start.
    pub fn dropped_messages(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops the broker (aborts its tasks; rmqtt has no graceful stop). Durable state is
    /// in SQLite, so nothing is lost that a restart does not re-publish.
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

fn bind_error(listener: &'static str, addr: SocketAddr, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Bind {
        listener,
        addr,
        reason: e.to_string(),
    }
}

fn bind(
    name: &'static str,
    addr: SocketAddr,
    mqueue: usize,
    inflight: u16,
) -> Result<(rmqtt::net::Listener, SocketAddr), BrokerError> {
    let inflight = NonZeroU16::new(inflight).unwrap_or(NonZeroU16::MIN);
    let l = Builder::new()
        .name(name)
        .laddr(addr)
        .allow_anonymous(false)
        .max_packet_size(super::mqtt::MAX_PACKET as u32)
        .max_inflight(inflight)
        .max_mqueue_len(mqueue)
        .message_expiry_interval(Duration::from_secs(3600))
        .handshake_timeout(HANDSHAKE_TIMEOUT)
        .nodelay(true)
        // A restarted server must rebind while the old connections sit in TIME_WAIT
        // (tokio's own listeners set it too).
        .reuseaddr(Some(true))
        .bind()
        .and_then(|b| b.tcp())
        .map_err(|e| bind_error(name, addr, e))?;
    let bound = l.local_addr().map_err(|e| bind_error(name, addr, e))?;
    Ok((l, bound))
}

fn tls_acceptor(t: &TlsListener) -> Result<TlsAcceptor, BrokerError> {
    let err = |path: &Path, reason: String| BrokerError::Tls {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(&t.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(&t.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(&t.cert, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&t.key).map_err(|e| err(&t.key, e.to_string()))?;
    // An explicit provider: no process-wide default to install or to race for.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&t.cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| err(&t.key, e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Reads the CA file devices are given, checking that it holds PEM certificates only.
fn device_ca(path: &Path) -> Result<String, BrokerError> {
    let err = |reason: String| BrokerError::Tls {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(pem)
}

/// Accepts TLS device connections: each handshake runs in its own task under
/// [`HANDSHAKE_TIMEOUT`] (a stalled client never blocks the accept loop), then the
/// plaintext is piped to the broker's loopback `devices-tls` listener.
async fn tls_front(front: TcpListener, acceptor: TlsAcceptor, backend: SocketAddr) {
    loop {
        let tcp = match front.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("outpost-server: mqtts accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(Ok(mut tls)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let Ok(mut up) = TcpStream::connect(backend).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
        });
    }
}

/// Device password hashes, read per CONNECT from the server's SQLite file through a
/// read-only connection of its own (WAL: never blocks the server's writer).
#[derive(Debug)]
struct Credentials {
    conn: Mutex<rusqlite::Connection>,
}

impl Credentials {
    fn open(path: &Path) -> Result<Credentials, BrokerError> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| {
            c.busy_timeout(Duration::from_secs(5))?;
            Ok(c)
        })
        .map_err(|source| BrokerError::Credentials {
            path: path.to_owned(),
            source,
        })?;
        Ok(Credentials {
            conn: Mutex::new(conn),
        })
    }

    /// Whether `password` is device `id`'s current password.
    fn check(&self, id: &str, password: &[u8]) -> bool {
        let Ok(password) = std::str::from_utf8(password) else {
            return false;
        };
        let hash: Option<String> = {
            let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            match conn
                .prepare_cached("SELECT password_hash FROM devices WHERE id = ?1")
                .and_then(|mut st| st.query_row([id], |r| r.get(0)))
            {
                Ok(h) => Some(h),
                Err(rusqlite::Error::QueryReturnedNoRows) => None,
                Err(e) => {
                    eprintln!("outpost-server: embedded broker: reading credentials of {id}: {e}");
                    None
                }
            }
        };
        hash.is_some_and(|h| super::auth::mosquitto_verify(password, &h))
    }
}

/// Constant-time equality of two byte strings (length is not secret).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who may connect where, as [`OutpostHook`] decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The server's client (superuser: rmqtt skips the ACL hooks for it).
    Server,
    /// A device whose credentials still need checking.
    CheckDevice,
    /// Refused.
    Refuse,
}

/// The CONNECT rules that need no database: the server's user only on the internal
/// listener with its per-start password; devices only on device listeners, with
/// username = client id = a valid device id, and only once the server listens.
fn classify(
    lid: ListenerId,
    client_id: &str,
    username: &str,
    password: &[u8],
    server_user: &str,
    server_password: &str,
    server_ready: bool,
) -> Verdict {
    if username == server_user || client_id == server_user {
        let ok = lid == LID_INTERNAL
            && username == server_user
            && client_id == server_user
            && same_secret(password, server_password.as_bytes());
        return if ok { Verdict::Server } else { Verdict::Refuse };
    }
    if lid == LID_INTERNAL || !server_ready {
        return Verdict::Refuse;
    }
    if username != client_id || !wire::valid_device_id(client_id) {
        return Verdict::Refuse;
    }
    Verdict::CheckDevice
}

/// Outpost's auth and ACL, plus the readiness gate and the dropped-message counter.
#[derive(Debug)]
struct OutpostHook {
    creds: Credentials,
    server_user: String,
    server_password: String,
    subscribed: Mutex<BTreeSet<String>>,
    ready: watch::Sender<bool>,
    dropped: Arc<AtomicU64>,
}

/// rmqtt takes one boxed handler per hook type; they share one [`OutpostHook`].
struct HookRef(Arc<OutpostHook>);

#[async_trait]
impl Handler for HookRef {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let h = &self.0;
        match param {
            Parameter::ClientAuthenticate(ci) => {
                let id = ci.id();
                let username = ci.username().map(|u| u.to_string()).unwrap_or_default();
                let password = ci.password().map(|p| p.to_vec()).unwrap_or_default();
                let verdict = classify(
                    id.lid,
                    &id.client_id,
                    &username,
                    &password,
                    &h.server_user,
                    &h.server_password,
                    *h.ready.borrow(),
                );
                let res = match verdict {
                    Verdict::Server => AuthResult::Allow(true, None),
                    Verdict::Refuse => AuthResult::BadUsernameOrPassword,
                    Verdict::CheckDevice => {
                        let hook = self.0.clone();
                        let ok = tokio::task::spawn_blocking(move || {
                            hook.creds.check(&username, &password)
                        })
                        .await
                        .unwrap_or(false);
                        if ok {
                            AuthResult::Allow(false, None)
                        } else {
                            AuthResult::BadUsernameOrPassword
                        }
                    }
                };
                (false, Some(HookResult::AuthResult(res)))
            }
            // Superusers never reach the two ACL arms (rmqtt skips the hook for them).
            Parameter::ClientSubscribeCheckAcl(s, sub) => {
                let res = if wire::device_acl(&s.id.client_id, &sub.topic_filter, Access::Read) {
                    SubscribeAclResult::new_success(sub.opts.qos(), None)
                } else {
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(res)))
            }
            Parameter::MessagePublishCheckAcl(s, p) => {
                let res = if wire::device_acl(&s.id.client_id, &p.topic, Access::Write) {
                    PublishAclResult::allow()
                } else {
                    // Disconnect: an MQTT 3.1.1 client has no negative PUBACK to see.
                    PublishAclResult::rejected(true, None)
                };
                (false, Some(HookResult::PublishAclResult(res)))
            }
            Parameter::SessionSubscribed(s, sub) => {
                if *s.id.client_id == *h.server_user {
                    let mut set = h.subscribed.lock().unwrap_or_else(|p| p.into_inner());
                    set.insert(sub.topic_filter.to_string());
                    if wire::SERVER_FILTERS.iter().all(|f| set.contains(*f)) {
                        h.ready.send_replace(true);
                    }
                }
                (true, acc)
            }
            Parameter::MessageDropped(to, _from, p, reason) => {
                h.dropped.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "outpost-server: embedded broker dropped a message on {} for {:?}: {reason:?}",
                    p.topic,
                    to.as_ref().map(|t| t.client_id.to_string())
                );
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PW: &str = "per-start-secret";

    fn verdict(lid: ListenerId, client: &str, user: &str, pw: &str, ready: bool) -> Verdict {
        classify(
            lid,
            client,
            user,
            pw.as_bytes(),
            "outpost-server",
            PW,
            ready,
        )
    }

    #[test]
    fn server_user_is_superuser_only_on_the_internal_listener_with_its_password() {
        let s = "outpost-server";
        assert_eq!(verdict(LID_INTERNAL, s, s, PW, false), Verdict::Server);
        assert_eq!(verdict(LID_DEVICES, s, s, PW, true), Verdict::Refuse);
        assert_eq!(verdict(LID_DEVICES_TLS, s, s, PW, true), Verdict::Refuse);
        assert_eq!(
            verdict(LID_INTERNAL, s, s, "per-start-secreT", true),
            Verdict::Refuse
        );
        assert_eq!(verdict(LID_INTERNAL, s, s, "", true), Verdict::Refuse);
    }

    #[test]
    fn device_cannot_claim_the_server_identity() {
        assert_eq!(
            verdict(LID_DEVICES, "outpost-server", "dev-1", "x", true),
            Verdict::Refuse
        );
        assert_eq!(
            verdict(LID_DEVICES, "dev-1", "outpost-server", PW, true),
            Verdict::Refuse
        );
    }

    #[test]
    fn device_username_must_equal_a_valid_client_id() {
        assert_eq!(
            verdict(LID_DEVICES, "dev-1", "dev-1", "x", true),
            Verdict::CheckDevice
        );
        assert_eq!(
            verdict(LID_DEVICES_TLS, "dev-1", "dev-1", "x", true),
            Verdict::CheckDevice
        );
        assert_eq!(
            verdict(LID_DEVICES, "dev-1", "dev-2", "x", true),
            Verdict::Refuse
        );
        for bad in ["", "a/b", "+", "#", ".hidden"] {
            assert_eq!(
                verdict(LID_DEVICES, bad, bad, "x", true),
                Verdict::Refuse,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn devices_refused_before_the_server_subscribed_and_on_the_internal_listener() {
        assert_eq!(
            verdict(LID_DEVICES, "dev-1", "dev-1", "x", false),
            Verdict::Refuse
        );
        assert_eq!(
            verdict(LID_INTERNAL, "dev-1", "dev-1", "x", true),
            Verdict::Refuse
        );
    }

    #[test]
    fn device_password_checked_against_the_device_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        let db = super::super::db::Db::open(&path).unwrap();
        let hash = super::super::auth::mosquitto_hash("right");
        assert!(
            db.insert_device("dev-1", &Default::default(), &hash, 0)
                .unwrap()
        );
        let creds = Credentials::open(&path).unwrap();
        assert!(creds.check("dev-1", b"right"));
        assert!(!creds.check("dev-1", b"wrong"));
        assert!(!creds.check("dev-2", b"right"));
        assert!(!creds.check("dev-1", &[0xff, 0xfe]));
        db.set_password("dev-1", &super::super::auth::mosquitto_hash("rotated"))
            .unwrap();
        assert!(
            !creds.check("dev-1", b"right"),
            "old password still accepted"
        );
        assert!(creds.check("dev-1", b"rotated"));
    }
}

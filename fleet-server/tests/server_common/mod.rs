//! Shared pieces of the server tests: an operator repository, an in-process server, a
//! Mosquitto started from the shipped config on a port it could bind, and MQTT device
//! clients.
#![allow(dead_code)]

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use outpost_protocol::release::ModelRelease;
use outpost_protocol::tuf::UtcTime;
use outpost_server::keys::SealCost;
use outpost_server::repo::{Expiries, InitOptions, Repo};
use outpost_server::server::client::ApiClient;
use outpost_server::server::repository::OnlineExpiries;
use outpost_server::server::{BrokerClient, BrokerLink, RunningServer, ServeConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

pub const WAIT: Duration = Duration::from_secs(20);

pub fn now() -> UtcTime {
    UtcTime::from_system_time(std::time::SystemTime::now())
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

pub fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/mosquitto")
        .join(name)
}

/// A fresh operator repository.
pub fn operator_repo(dir: &Path) -> Repo {
    let opts = InitOptions {
        root_keys: 1,
        root_threshold: 1,
        passphrase: None,
        expiries: Expiries::default(),
        seal_cost: SealCost { log_n: 4 },
    };
    Repo::init(dir, &opts, now()).unwrap()
}

/// Signs `bytes` as `model` `version` with the io spec of fixture cnn_a.
pub fn sign_bytes(repo: &Repo, file: &str, bytes: &[u8], model: &str, version: &str) {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("cnn_a.release.json")).unwrap())
            .unwrap();
    v["model"] = model.into();
    v["version"] = version.into();
    let release = ModelRelease::from_value(&v).unwrap();
    repo.sign_release(file, bytes, release, now()).unwrap();
}

/// Signs a fixture model file.
pub fn sign_fixture(repo: &Repo, file: &str, model: &str, version: &str) -> Vec<u8> {
    let bytes = std::fs::read(fixtures().join(file)).unwrap();
    sign_bytes(repo, file, &bytes, model, version);
    bytes
}

/// How many times Mosquitto is started on a newly drawn port when it cannot bind one.
pub const BIND_ATTEMPTS: usize = 8;

/// A port for Mosquitto, which cannot report a port-0 bind: drawn at random below the
/// kernel's ephemeral range (`ip_local_port_range`), where neither a port-0 bind nor an
/// outgoing connection lands, so only another explicit bind can take it before
/// Mosquitto's; [`Mosquitto::start`] draws again when Mosquitto cannot bind it.
pub fn pick_port() -> u16 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12_000 {
        (10_000, low)
    } else {
        (1024, u16::MAX)
    };
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        let port = from + (h.finish() % u64::from(to - from)) as u16;
        // Only a filter: Mosquitto's own bind is what checks.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A server in its own runtime, with the operator repository it was imported from.
pub struct Fixture {
    pub rt: tokio::runtime::Runtime,
    pub server: RunningServer,
    pub dir: tempfile::TempDir,
    pub repo: Repo,
    pub url: String,
    pub admin: ApiClient,
    pub passwd: PathBuf,
    /// Mosquitto's port (0 without a broker).
    pub broker_port: u16,
    broker: Option<Mosquitto>,
}

impl Fixture {
    /// Starts a server importing a fresh operator repository. With `broker`, Mosquitto
    /// runs first (on whichever port it could bind) and the server connects to it;
    /// [`Fixture::mosquitto`] makes it read the devices added since.
    pub fn start(broker: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let repo = operator_repo(&dir.path().join("operator"));
        let passwd = dir.path().join("mosquitto.passwd");
        let (link, broker) = if broker {
            // The server's login, before Mosquitto reads the file; the server rewrites
            // the file (same password) at its start.
            let hash = outpost_server::server::auth::mosquitto_hash("server-secret");
            std::fs::write(&passwd, format!("outpost-server:{hash}\n")).unwrap();
            let m = Mosquitto::start(dir.path(), &passwd);
            let link = BrokerLink::External(BrokerClient {
                host: "127.0.0.1".into(),
                port: m.port,
                username: "outpost-server".into(),
                password: "server-secret".into(),
                client_id: "outpost-server".into(),
            });
            (link, Some(m))
        } else {
            (BrokerLink::None, None)
        };
        let broker_port = broker.as_ref().map_or(0, |m| m.port);
        let cfg = ServeConfig {
            data_dir: dir.path().join("data"),
            import_repo: Some(repo.dir().to_owned()),
            http: "127.0.0.1:0".parse().unwrap(),
            broker: link,
            mosquitto_passwd_file: Some(passwd.clone()),
            expiries: OnlineExpiries::default(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(outpost_server::server::start(cfg)).unwrap();
        let url = format!("http://{}", server.http_addr);
        let token = std::fs::read_to_string(server.admin_token_file.as_ref().unwrap()).unwrap();
        let admin = ApiClient::new(&url, &token);
        Fixture {
            rt,
            server,
            dir,
            repo,
            url,
            admin,
            passwd,
            broker_port,
            broker,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn client(&self, role: &str) -> ApiClient {
        let t = self
            .admin
            .post(
                "/api/v1/tokens",
                &serde_json::json!({"name": format!("t-{role}"), "role": role}),
            )
            .unwrap();
        ApiClient::new(&self.url, t["token"].as_str().unwrap())
    }

    /// Creates a device; returns its password.
    pub fn add_device(&self, id: &str, tags: serde_json::Value) -> String {
        let r = self
            .admin
            .post(
                "/api/v1/devices",
                &serde_json::json!({"id": id, "tags": tags}),
            )
            .unwrap();
        r["password"].as_str().unwrap().to_owned()
    }

    /// Mosquitto, once it re-read the password file (the devices added so far) and the
    /// server is connected to it.
    pub fn mosquitto(&self) -> &Mosquitto {
        let m = self.broker.as_ref().expect("Fixture::start(true)");
        m.reload();
        let link = self.server.mqtt.as_ref().unwrap();
        assert!(
            self.rt.block_on(link.wait_connected(WAIT)),
            "server did not connect to the broker"
        );
        m
    }
}

/// A Mosquitto process using `docs/mosquitto/outpost.conf` and `outpost.acl`, with
/// only the DEPLOY lines (port, paths) replaced.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    log: mpsc::Receiver<String>,
}

impl Mosquitto {
    /// Starts Mosquitto from the shipped config on newly drawn ports ([`pick_port`])
    /// until it binds one, [`BIND_ATTEMPTS`] at most.
    pub fn start(dir: &Path, passwd: &Path) -> Mosquitto {
        Self::start_from(dir, passwd, std::iter::repeat_with(pick_port))
    }

    /// [`Mosquitto::start`] on the first of `ports` it can bind.
    pub fn start_from(
        dir: &Path,
        passwd: &Path,
        ports: impl IntoIterator<Item = u16>,
    ) -> Mosquitto {
        for port in ports.into_iter().take(BIND_ATTEMPTS) {
            let path = Self::write_conf(dir, port, passwd);
            let mut child = Command::new("/usr/sbin/mosquitto")
                .arg("-c")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let stderr = child.stderr.take().unwrap();
            let (tx, log) = mpsc::channel();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            // Until it runs, or its stderr ends: it exited.
            let mut seen = Vec::new();
            let deadline = std::time::Instant::now() + WAIT;
            let running = loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match log.recv_timeout(left) {
                    Ok(l) if l.contains("running") => break true,
                    Ok(l) => seen.push(l),
                    Err(mpsc::RecvTimeoutError::Disconnected) => break false,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let _ = child.kill();
                        panic!("mosquitto did not start: {seen:#?}");
                    }
                }
            };
            if running {
                return Mosquitto { child, port, log };
            }
            let status = child.wait().unwrap();
            assert!(
                seen.iter().any(|l| l.contains("Address already in use")),
                "mosquitto exited with {status}: {seen:#?}"
            );
        }
        panic!("mosquitto could not bind a port in {BIND_ATTEMPTS} attempts");
    }

    fn write_conf(dir: &Path, port: u16, passwd: &Path) -> PathBuf {
        let conf = std::fs::read_to_string(shipped("outpost.conf")).unwrap();
        let persist = dir.join("mosquitto-db");
        std::fs::create_dir_all(&persist).unwrap();
        let mut replaced = 0;
        let mut out = String::new();
        for line in conf.lines() {
            let l = if line.starts_with("listener ") {
                format!("listener {port} 127.0.0.1")
            } else if line.starts_with("password_file ") {
                format!("password_file {}", passwd.display())
            } else if line.starts_with("acl_file ") {
                format!("acl_file {}", shipped("outpost.acl").display())
            } else if line.starts_with("persistence_location ") {
                format!("persistence_location {}/", persist.display())
            } else {
                out.push_str(line);
                out.push('\n');
                continue;
            };
            replaced += 1;
            out.push_str(&l);
            out.push('\n');
        }
        assert_eq!(replaced, 4, "the shipped config lost a DEPLOY line");
        let user = Command::new("id").arg("-un").output().unwrap();
        out.push_str("log_dest stderr\nlog_type all\n");
        out.push_str(&format!(
            "user {}\n",
            String::from_utf8_lossy(&user.stdout).trim()
        ));
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, out).unwrap();
        path
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return,
                Ok(_) => {}
                Err(e) => panic!("mosquitto never logged {needle:?}: {e}"),
            }
        }
    }

    /// Reloads the password file and ACL (SIGHUP) and waits until it was read.
    pub fn reload(&self) {
        let s = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(s.success());
        self.wait_log("Reloading config");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a device client saw.
#[derive(Debug)]
pub enum DevEvent {
    Connected,
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    Publish(rumqttc::Publish),
    PubAck(u16),
    Failed(String),
}

/// A device's MQTT client, its events forwarded to a channel.
pub struct Device {
    pub id: String,
    pub client: AsyncClient,
    events: mpsc::Receiver<DevEvent>,
    backlog: std::cell::RefCell<std::collections::VecDeque<DevEvent>>,
}

impl Device {
    pub fn connect(rt: &tokio::runtime::Runtime, port: u16, id: &str, password: &str) -> Device {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_credentials(id, password);
        opts.set_clean_session(true);
        opts.set_max_packet_size(
            outpost_server::server::mqtt::MAX_PACKET,
            outpost_server::server::mqtt::MAX_PACKET,
        );
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(opts, 100);
        let (tx, events) = mpsc::channel();
        rt.spawn(async move {
            loop {
                let ev = match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => DevEvent::Connected,
                    Ok(Event::Incoming(Packet::SubAck(s))) => DevEvent::SubAck(s.return_codes),
                    Ok(Event::Incoming(Packet::Publish(p))) => DevEvent::Publish(p),
                    Ok(Event::Incoming(Packet::PubAck(a))) => DevEvent::PubAck(a.pkid),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(DevEvent::Failed(e.to_string()));
                        break;
                    }
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        Device {
            id: id.into(),
            client,
            events,
            backlog: Default::default(),
        }
    }

    /// The first event matching `f`, oldest first; events it does not match stay
    /// queued for later waits. Panics after [`WAIT`].
    pub fn wait<T>(&self, what: &str, mut f: impl FnMut(&DevEvent) -> Option<T>) -> T {
        let mut backlog = self.backlog.borrow_mut();
        for i in 0..backlog.len() {
            if let Some(t) = f(&backlog[i]) {
                backlog.remove(i);
                return t;
            }
        }
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) => match f(&ev) {
                    Some(t) => return t,
                    None => backlog.push_back(ev),
                },
                Err(e) => panic!("{}: no {what}: {e}", self.id),
            }
        }
    }

    pub fn connected(&self) {
        self.wait("connack", |e| match e {
            DevEvent::Connected => Some(()),
            DevEvent::Failed(m) => panic!("{} failed to connect: {m}", self.id),
            _ => None,
        })
    }

    pub fn subscribe(
        &self,
        rt: &tokio::runtime::Runtime,
        topic: &str,
    ) -> Vec<rumqttc::SubscribeReasonCode> {
        rt.block_on(self.client.subscribe(topic, QoS::AtLeastOnce))
            .unwrap();
        self.wait("suback", |e| match e {
            DevEvent::SubAck(s) => Some(s.clone()),
            _ => None,
        })
    }

    pub fn publish(&self, rt: &tokio::runtime::Runtime, topic: &str, payload: Vec<u8>) {
        rt.block_on(self.client.publish(topic, QoS::AtLeastOnce, false, payload))
            .unwrap();
    }

    /// The next message on `topic`.
    pub fn message(&self, topic: &str) -> rumqttc::Publish {
        self.wait(topic, |e| match e {
            DevEvent::Publish(p) if p.topic == topic => Some(p.clone()),
            _ => None,
        })
    }
}

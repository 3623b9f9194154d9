//! The harness of the fleet scenarios: the real binaries (`outpostctl`, `outpost-server
//! serve`, `outpost-agent run`) in their own processes, and a broker, each test in its own
//! temp dir with free ports. Waits poll a condition with a deadline; nothing sleeps to
//! synchronize.
//!
//! The broker is a parameter ([`Broker`]): Mosquitto from `docs/mosquitto/` with only its
//! `DEPLOY` lines replaced, the password file written by the server
//! (`--mosquitto-passwd-file`) and reloaded with SIGHUP after devices are added; or the
//! broker embedded in `outpost-server serve` (`--mqtt`), which checks device passwords
//! against the server's own table, and whose restart is a restart of the server.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use outpost_protocol::bundle::AgentConfig;
use outpost_server::server::client::ApiClient;

/// Longest wait for any one condition.
pub const WAIT: Duration = Duration::from_secs(90);

/// Model slot every scenario updates.
pub const MODEL: &str = "digits";

/// Which MQTT broker the fleet runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// Mosquitto 2.0 from the shipped config, the server maintaining its password file.
    Mosquitto,
    /// The broker embedded in `outpost-server serve`.
    Embedded,
}

/// The binaries under test, built by `cargo test --workspace` (or `cargo build
/// --workspace --bins`) next to this test's `deps/` directory.
#[derive(Debug, Clone)]
pub struct Bins {
    pub agent: PathBuf,
    pub server: PathBuf,
    pub ctl: PathBuf,
}

impl Bins {
    pub fn locate() -> Bins {
        let exe = std::env::current_exe().expect("current test executable");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test runs from target/<profile>/deps");
        let find = |name: &str| {
            let p = dir.join(name);
            assert!(
                p.is_file(),
                "{} is missing: build the binaries first (`cargo test --workspace`, or \
                 `cargo build -p outpost-agent -p outpost-server --bins` before \
                 `cargo test -p outpost-e2e`)",
                p.display()
            );
            p
        };
        Bins {
            agent: find("outpost-agent"),
            server: find("outpost-server"),
            ctl: find("outpostctl"),
        }
    }
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models")
}

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/mosquitto")
        .join(name)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    outpost_protocol::delta::sha256(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How many times a process is started on newly drawn ports (or, after a restart, on
/// its own ports again) when it cannot bind them.
pub const BIND_ATTEMPTS: usize = 8;

/// A port for a listener the harness starts in a child process that cannot report a
/// port-0 bind (Mosquitto), or one that must come back on the same port after a restart
/// (the server and its embedded broker). Drawn at random below the kernel's ephemeral
/// range (`ip_local_port_range`), where neither a port-0 bind nor an outgoing
/// connection ever lands, so only another explicit bind can take it between the draw
/// and the child's bind. The caller still starts the child again on a new draw when it
/// cannot bind ([`BIND_ATTEMPTS`]): other services and other tests draw here too.
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
        // Only a filter (the port may be taken right after): the start that follows
        // is what checks.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// How a child process's start ended.
enum Started {
    Ready,
    /// It exited and said `Address already in use`.
    AddrInUse,
}

/// Waits until `ready()` holds while `child` runs. If the child exits first, its
/// output (followed into `log` by `stderr`, joined here so it is complete) decides:
/// `Address already in use` is [`Started::AddrInUse`], anything else a panic.
fn wait_started(
    child: &mut Child,
    name: &str,
    log: &Log,
    mark: usize,
    stderr: std::thread::JoinHandle<()>,
    mut ready: impl FnMut() -> bool,
) -> Started {
    let exited = wait_for(&format!("{name} to start"), WAIT, || {
        if ready() {
            return Some(None);
        }
        child.try_wait().expect("waitpid").map(Some)
    });
    let Some(status) = exited else {
        return Started::Ready;
    };
    let _ = stderr.join();
    let prefix = format!("[{name}] ");
    let in_use = log.lines()[mark..]
        .iter()
        .any(|l| l.starts_with(&prefix) && l.contains("Address already in use"));
    if in_use {
        return Started::AddrInUse;
    }
    log.dump(50);
    panic!("{name} exited with {status} while starting");
}

/// Polls `f` until it returns `Some`, at most `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a signal to a child process (by its pid only).
pub fn signal(pid: u32, sig: &str) {
    let s = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(s.success(), "kill -{sig} {pid} failed");
}

// ------------------------------------------------------------------ logs

/// Output lines of every process of a test, prefixed with the process name; printed
/// when a test fails.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn lines(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forwards a pipe's lines into the log from a thread, which ends at the pipe's end.
    fn follow(
        &self,
        name: &str,
        pipe: impl std::io::Read + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let log = self.clone();
        let name = name.to_owned();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                log.lines().push(format!("[{name}] {line}"));
            }
        })
    }

    /// The number of lines so far (a mark for [`Log::wait_line`]).
    pub fn mark(&self) -> usize {
        self.lines().len()
    }

    /// Whether a line after `mark` starts with `[name]` and contains `needle`.
    pub fn has_line(&self, mark: usize, name: &str, needle: &str) -> bool {
        let prefix = format!("[{name}] ");
        self.lines()[mark..]
            .iter()
            .any(|l| l.starts_with(&prefix) && l.contains(needle))
    }

    /// Waits for a line after `mark` that starts with `[name]` and contains `needle`.
    pub fn wait_line(&self, mark: usize, name: &str, needle: &str) {
        wait_for(&format!("{name} to log {needle:?}"), WAIT, || {
            self.has_line(mark, name, needle).then_some(())
        });
    }

    pub fn dump(&self, last: usize) {
        let lines = self.lines();
        let from = lines.len().saturating_sub(last);
        eprintln!("---- last {} process log lines ----", lines.len() - from);
        for l in &lines[from..] {
            eprintln!("{l}");
        }
    }
}

// ------------------------------------------------------------------ broker

/// The broker process, when it is not the server itself.
pub enum BrokerProc {
    Mosquitto(Mosquitto),
    /// Inside `outpost-server serve`.
    Embedded,
}

/// Mosquitto from `docs/mosquitto/outpost.conf` and `outpost.acl`.
pub struct Mosquitto {
    child: Child,
    conf: PathBuf,
    log: Log,
    /// The plain listener (the shipped config's).
    pub port: u16,
    /// The second listener, when asked for (TLS).
    pub tls_port: Option<u16>,
}

impl Mosquitto {
    /// Starts Mosquitto on newly drawn ports ([`pick_port`]) until it binds them. `tls`:
    /// the options of a second listener (its `cafile`, `certfile`, `keyfile` lines), or
    /// empty for none; the harness writes its `listener` line.
    fn start(dir: &Path, passwd: &Path, tls: &str, log: &Log) -> Mosquitto {
        for _ in 0..BIND_ATTEMPTS {
            let port = pick_port();
            let tls_port = (!tls.is_empty()).then(|| {
                loop {
                    let p = pick_port();
                    if p != port {
                        break p;
                    }
                }
            });
            let conf = Self::write_conf(dir, port, tls_port.map(|p| (p, tls)), passwd);
            let mark = log.mark();
            let (mut child, stderr) = Self::spawn(&conf, log);
            let ready = || log.has_line(mark, "mosquitto", "running");
            match wait_started(&mut child, "mosquitto", log, mark, stderr, ready) {
                Started::Ready => {
                    return Mosquitto {
                        child,
                        conf,
                        log: log.clone(),
                        port,
                        tls_port,
                    };
                }
                Started::AddrInUse => continue,
            }
        }
        log.dump(50);
        panic!("mosquitto could not bind a port in {BIND_ATTEMPTS} attempts");
    }

    fn write_conf(dir: &Path, port: u16, tls: Option<(u16, &str)>, passwd: &Path) -> PathBuf {
        let shipped_conf = std::fs::read_to_string(shipped("outpost.conf")).unwrap();
        let persist = dir.join("mosquitto-db");
        std::fs::create_dir_all(&persist).unwrap();
        let mut out = String::new();
        let mut replaced = 0;
        for line in shipped_conf.lines() {
            let deploy = if line.starts_with("listener ") {
                Some(format!("listener {port} 127.0.0.1"))
            } else if line.starts_with("password_file ") {
                Some(format!("password_file {}", passwd.display()))
            } else if line.starts_with("acl_file ") {
                Some(format!("acl_file {}", shipped("outpost.acl").display()))
            } else if line.starts_with("persistence_location ") {
                Some(format!("persistence_location {}/", persist.display()))
            } else {
                None
            };
            replaced += usize::from(deploy.is_some());
            out.push_str(deploy.as_deref().unwrap_or(line));
            out.push('\n');
        }
        assert_eq!(replaced, 4, "the shipped config lost a DEPLOY line");
        if let Some((tls_port, options)) = tls {
            out.push_str(&format!("listener {tls_port} 127.0.0.1\n{options}\n"));
        }
        let user = Command::new("id").arg("-un").output().unwrap();
        out.push_str("log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n");
        out.push_str(&format!(
            "user {}\n",
            String::from_utf8_lossy(&user.stdout).trim()
        ));
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, out).unwrap();
        conf
    }

    fn spawn(conf: &Path, log: &Log) -> (Child, std::thread::JoinHandle<()>) {
        let mut child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto (Debian package `mosquitto`) runs");
        let stderr = log.follow("mosquitto", child.stderr.take().unwrap());
        (child, stderr)
    }

    /// SIGTERM (Mosquitto saves its persistence file), then the same config again, on
    /// the same ports: started again while another process holds one of them, for
    /// [`BIND_ATTEMPTS`] at most.
    fn restart(&mut self, while_down: impl FnOnce()) {
        signal(self.child.id(), "TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "mosquitto stopped with {status}");
        while_down();
        for attempt in 1..=BIND_ATTEMPTS {
            let mark = self.log.mark();
            let (mut child, stderr) = Self::spawn(&self.conf, &self.log);
            let ready = || self.log.has_line(mark, "mosquitto", "running");
            match wait_started(&mut child, "mosquitto", &self.log, mark, stderr, ready) {
                Started::Ready => {
                    self.child = child;
                    return;
                }
                // Someone holds the port for now; it is ours again once they let go.
                Started::AddrInUse => {
                    std::thread::sleep(Duration::from_millis(200 * attempt as u64))
                }
            }
        }
        self.log.dump(50);
        panic!("mosquitto could not bind its ports again in {BIND_ATTEMPTS} attempts");
    }

    /// SIGHUP: re-reads the password file and ACL.
    fn reload(&self) {
        let mark = self.log.mark();
        signal(self.child.id(), "HUP");
        self.log.wait_line(mark, "mosquitto", "Reloading config");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ fleet

/// A signed release of [`MODEL`].
#[derive(Debug, Clone)]
pub struct Target {
    pub version: String,
    pub path: String,
    pub sha256: String,
    pub length: u64,
}

/// An operator repository, a fleet server and its broker.
pub struct Fleet {
    pub bins: Bins,
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub data: PathBuf,
    pub url: String,
    pub token: String,
    pub admin: ApiClient,
    pub broker_port: u16,
    /// The devices' TLS listener: the embedded broker's `--mqtts`, or Mosquitto's second
    /// listener.
    pub mqtts_port: Option<u16>,
    /// The server's broker password (user `outpost-server`, which may use every topic);
    /// the embedded broker has no such login for other clients.
    pub server_password: Option<String>,
    pub broker: BrokerProc,
    pub log: Log,
    server: Child,
    ports: Ports,
    ports_file: PathBuf,
    /// `outpost-server serve` arguments after the first start (no `--import-repo`).
    restart_args: Vec<OsString>,
}

impl Fleet {
    /// `outpostctl repo init`, release 1.0 of [`MODEL`] signed from `cnn_a.onnx`, the
    /// broker, and `outpost-server serve --import-repo` connected to it.
    pub fn start(kind: Broker) -> (Fleet, Target) {
        Fleet::start_with(kind, &[], "")
    }

    /// [`Fleet::start`] with more `serve` arguments (e.g. the embedded broker's TLS
    /// listener, `--mqtts 127.0.0.1:0`: its port is [`Fleet::mqtts_port`]) and, for
    /// Mosquitto, the options of a second listener (`cafile`, `certfile`, `keyfile`
    /// lines; the harness gives it a port, [`Fleet::mqtts_port`]).
    pub fn start_with(
        kind: Broker,
        serve_args: &[OsString],
        mosquitto_tls: &str,
    ) -> (Fleet, Target) {
        let bins = Bins::locate();
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let repo = dir.path().join("repo");
        ctl_ok(
            &bins,
            &["repo", "init", "--dir", repo.to_str().unwrap()],
            None,
        );
        let v1 = sign(&bins, &repo, "cnn_a.onnx", "1.0", &[]);
        let data = dir.path().join("data");
        let ports_file = dir.path().join("server-ports.json");
        let mut base: Vec<OsString> = vec!["serve".into(), "--data".into(), data.clone().into()];
        let mut server_password = None;
        let passwd = dir.path().join("mosquitto.passwd");
        let mut broker = BrokerProc::Embedded;
        if kind == Broker::Mosquitto {
            let pw = format!("server-{}", std::process::id());
            let pw_file = dir.path().join("server.pw");
            std::fs::write(&pw_file, &pw).unwrap();
            // Mosquitto starts first (it may need several ports before one binds) and
            // needs the server's login; the server rewrites the file at its start.
            let hash = outpost_server::server::auth::mosquitto_hash(&pw);
            std::fs::write(&passwd, format!("outpost-server:{hash}\n")).unwrap();
            server_password = Some(pw);
            let m = Mosquitto::start(dir.path(), &passwd, mosquitto_tls, &log);
            base.extend([
                "--broker".into(),
                format!("mqtt://127.0.0.1:{}", m.port).into(),
                "--broker-password-file".into(),
                pw_file.into(),
                "--mosquitto-passwd-file".into(),
                passwd.clone().into(),
            ]);
            broker = BrokerProc::Mosquitto(m);
        }
        let mut started = None;
        for _ in 0..BIND_ATTEMPTS {
            // Fixed ports, not port 0: a restart must find them again.
            let http = pick_port();
            let mut args = base.clone();
            args.extend(["--http".into(), format!("127.0.0.1:{http}").into()]);
            if kind == Broker::Embedded {
                let mqtt = loop {
                    let p = pick_port();
                    if p != http {
                        break p;
                    }
                };
                args.extend(["--mqtt".into(), format!("127.0.0.1:{mqtt}").into()]);
            }
            args.extend(serve_args.iter().cloned());
            let mut first = args.clone();
            first.extend(["--import-repo".into(), repo.clone().into()]);
            match spawn_server(&bins, &first, &ports_file, &log) {
                Some((server, ports)) => {
                    started = Some((server, ports, args));
                    break;
                }
                // The import ran before the bind failed: import again from scratch.
                None => std::fs::remove_dir_all(&data).unwrap(),
            }
        }
        let Some((server, ports, mut restart_args)) = started else {
            log.dump(50);
            panic!("outpost-server could not bind its ports in {BIND_ATTEMPTS} attempts");
        };
        // A TLS listener asked for on port 0 comes back on the port it got.
        if let (Some(i), Some(tls)) = (
            restart_args.iter().position(|a| a == "--mqtts"),
            ports.mqtts,
        ) {
            restart_args[i + 1] = tls.to_string().into();
        }
        let url = format!("http://{}", ports.http);
        let token = std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        let admin = ApiClient::new(&url, &token);
        let (broker_port, mqtts_port) = match &broker {
            BrokerProc::Mosquitto(m) => (m.port, m.tls_port),
            BrokerProc::Embedded => (
                ports
                    .mqtt
                    .expect("serve reports its --mqtt listener")
                    .port(),
                ports.mqtts.map(|a| a.port()),
            ),
        };
        let fleet = Fleet {
            bins,
            dir,
            repo,
            data,
            url,
            token,
            admin,
            broker_port,
            mqtts_port,
            server_password,
            broker,
            log,
            server,
            ports,
            ports_file,
            restart_args,
        };
        fleet.wait_broker_connected();
        (fleet, v1)
    }

    pub fn wait_broker_connected(&self) {
        wait_for("the server to connect to the broker", WAIT, || {
            let h = self.admin.get("/api/v1/health").ok()?;
            (h["broker"] == "connected").then_some(())
        });
    }

    /// Stops the broker, calls `while_down`, and starts it again on the same port with
    /// the same persistence. The embedded broker restarts with its server (SIGTERM, then
    /// `serve` again on the same data directory and ports).
    pub fn restart_broker(&mut self, while_down: impl FnOnce()) {
        match &mut self.broker {
            BrokerProc::Mosquitto(m) => m.restart(while_down),
            BrokerProc::Embedded => {
                signal(self.server.id(), "TERM");
                let status = self.server.wait().unwrap();
                assert!(status.success(), "outpost-server stopped with {status}");
                while_down();
                self.server = self.respawn_server();
            }
        }
        self.wait_broker_connected();
    }

    /// `serve` again on its data directory and ports; started again while another
    /// process holds one of them, for [`BIND_ATTEMPTS`] at most.
    fn respawn_server(&self) -> Child {
        for attempt in 1..=BIND_ATTEMPTS {
            match spawn_server(&self.bins, &self.restart_args, &self.ports_file, &self.log) {
                Some((server, ports)) => {
                    assert_eq!(ports, self.ports, "the server came back on other ports");
                    return server;
                }
                // Someone holds a port for now; it is ours again once they let go.
                None => std::thread::sleep(Duration::from_millis(200 * attempt as u64)),
            }
        }
        self.log.dump(50);
        panic!("outpost-server could not bind its ports again in {BIND_ATTEMPTS} attempts");
    }

    /// Makes the broker read device credentials again (the embedded broker reads the
    /// server's table on every connection).
    pub fn reload_broker(&self) {
        match &self.broker {
            BrokerProc::Mosquitto(m) => m.reload(),
            BrokerProc::Embedded => {}
        }
    }

    /// `outpostctl` against this server; panics with its output unless it succeeds.
    pub fn ctl(&self, args: &[&str]) -> String {
        ctl_ok(&self.bins, args, Some((&self.url, &self.token)))
    }

    /// `outpostctl release sign` of a fixture model as `version` of [`MODEL`].
    pub fn sign(&self, file: &str, version: &str) -> Target {
        sign(&self.bins, &self.repo, file, version, &[])
    }

    /// [`Fleet::sign`] with another fixture's release info (io spec, golden vectors).
    pub fn sign_with_info(&self, file: &str, version: &str, info: &str) -> Target {
        let info = fixtures().join(info);
        let args = ["--release-info", info.to_str().unwrap()];
        sign(&self.bins, &self.repo, file, version, &args)
    }

    /// `outpostctl release push`.
    pub fn push(&self, t: &Target) {
        let repo = self.repo.to_str().unwrap();
        self.ctl(&[
            "release",
            "push",
            "--repo",
            repo,
            "--model",
            MODEL,
            "--version",
            &t.version,
        ]);
    }

    /// `outpostctl assign --device ...`; returns each device's new counter.
    pub fn assign(&self, t: &Target, devices: &[&str]) -> BTreeMap<String, u64> {
        let mut args = vec!["assign", "--model", MODEL, "--version", &t.version];
        for d in devices {
            args.extend(["--device", d]);
        }
        let out = self.ctl(&args);
        let mut counters = BTreeMap::new();
        for line in out.lines() {
            // "assigned digits 1.1 to pi-7 (counter 1)"
            let Some(rest) = line.split(" to ").nth(1) else {
                continue;
            };
            let Some((dev, counter)) = rest.split_once(" (counter ") else {
                continue;
            };
            let counter = counter.trim_end_matches(')').parse().unwrap();
            counters.insert(dev.to_owned(), counter);
        }
        assert_eq!(counters.len(), devices.len(), "assign printed: {out}");
        counters
    }

    /// `outpostctl devices add` and `devices bundle` for each id, `tune` applied to each
    /// bundle's agent.toml, then one broker reload.
    pub fn add_devices(&self, ids: &[&str], tune: impl Fn(&mut AgentConfig)) -> Vec<Device> {
        let url = format!("mqtt://127.0.0.1:{}", self.broker_port);
        self.add_devices_with(ids, &["--broker-url", &url], tune)
    }

    /// [`Fleet::add_devices`] with these `devices bundle` arguments instead of
    /// `--broker-url mqtt://...` (none: the server's default URL, its TLS listener if it
    /// runs one).
    pub fn add_devices_with(
        &self,
        ids: &[&str],
        bundle_args: &[&str],
        tune: impl Fn(&mut AgentConfig),
    ) -> Vec<Device> {
        let devices = ids
            .iter()
            .map(|id| {
                self.ctl(&["devices", "add", "--id", id, "--tag", "site=e2e"]);
                let root = self.dir.path().join("devices").join(id);
                let bundle = root.join("bundle");
                let data = root.join("data");
                let mut args = vec![
                    "devices",
                    "bundle",
                    "--id",
                    id,
                    "--out",
                    bundle.to_str().unwrap(),
                    "--data-dir",
                    data.to_str().unwrap(),
                ];
                args.extend(bundle_args);
                self.ctl(&args);
                let config = bundle.join("agent.toml");
                let mut cfg =
                    AgentConfig::from_toml(&std::fs::read_to_string(&config).unwrap()).unwrap();
                // Tests need fast reconnects and short probation.
                cfg.broker.max_backoff_secs = 2;
                cfg.update.probation_secs = 1;
                tune(&mut cfg);
                cfg.validate().unwrap();
                std::fs::write(&config, cfg.to_toml()).unwrap();
                Device {
                    id: (*id).to_owned(),
                    bundle,
                    data,
                    config,
                    chunk_len: 1024,
                    bin: self.bins.agent.clone(),
                    log: self.log.clone(),
                    child: None,
                }
            })
            .collect();
        self.reload_broker();
        devices
    }

    /// The server's view of a device (`GET /api/v1/devices/{id}`).
    pub fn device(&self, id: &str) -> serde_json::Value {
        self.admin
            .get(&format!("/api/v1/devices/{id}"))
            .unwrap_or_else(|e| panic!("GET device {id}: {e}"))
    }

    /// Waits until the server sees `id` running `t`, committed, after an assignment with
    /// at least `counter`; returns the device's last status report.
    pub fn wait_converged(&self, id: &str, t: &Target, counter: u64) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let d = self.device(id);
            let s = &d["status"];
            let slot = &s["models"][MODEL];
            if slot["active_sha256"] == t.sha256.as_str()
                && slot["active"] == t.path.as_str()
                // A redelivered assignment leaves it committed (the last outcome stays).
                && s["update"]["state"] == "committed"
                && s["assignment_counter"].as_u64() >= Some(counter)
            {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for {id} to commit {} (counter {counter}): {d}",
                t.path
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every telemetry record the server stored for `id`, in sequence order.
    pub fn telemetry(&self, id: &str) -> Vec<serde_json::Value> {
        let mut out: Vec<serde_json::Value> = Vec::new();
        loop {
            let after = out.last().map_or(0, |r| r["seq"].as_u64().unwrap());
            let page = self
                .admin
                .get(&format!(
                    "/api/v1/devices/{id}/telemetry?after={after}&limit=1000"
                ))
                .unwrap();
            let records = page["records"].as_array().unwrap().clone();
            if records.is_empty() {
                return out;
            }
            out.extend(records);
        }
    }

    /// Length of the zstd-compressed full model the server keeps for `t`
    /// (`GET /api/v1/releases`); panics if it kept none.
    pub fn full_zstd_length(&self, t: &Target) -> u64 {
        let r = self.admin.get("/api/v1/releases").unwrap();
        let release = r["releases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["path"] == t.path.as_str())
            .unwrap_or_else(|| panic!("{} is not on the server: {r}", t.path));
        let a = release["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["kind"] == "full_zstd")
            .unwrap_or_else(|| panic!("no compressed full model of {}: {release}", t.path));
        let len = a["length"].as_u64().unwrap();
        assert!(len < t.length, "{release}");
        len
    }

    pub fn artifacts_dir(&self) -> PathBuf {
        self.data.join("artifacts")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.log.dump(150);
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// The listeners `outpost-server serve --ports-file` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ports {
    http: SocketAddr,
    mqtt: Option<SocketAddr>,
    mqtts: Option<SocketAddr>,
}

impl Ports {
    /// The file, once the server wrote it (whole: it renames it into place).
    fn read(path: &Path) -> Option<Ports> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let addr = |k: &str| v[k].as_str().map(|a| a.parse().expect("a socket address"));
        Some(Ports {
            http: addr("http")?,
            mqtt: addr("mqtt"),
            mqtts: addr("mqtts"),
        })
    }
}

/// Starts `outpost-server` with `--ports-file` and waits for the file; `None` when it
/// exited because a port was taken.
fn spawn_server(
    bins: &Bins,
    args: &[OsString],
    ports_file: &Path,
    log: &Log,
) -> Option<(Child, Ports)> {
    let _ = std::fs::remove_file(ports_file);
    let mut server = Command::new(&bins.server)
        .args(args)
        .arg("--ports-file")
        .arg(ports_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("outpost-server runs");
    let mark = log.mark();
    let stderr = log.follow("server", server.stderr.take().unwrap());
    log.follow("server", server.stdout.take().unwrap());
    let mut ports = None;
    let ready = || {
        ports = Ports::read(ports_file);
        ports.is_some()
    };
    match wait_started(&mut server, "server", log, mark, stderr, ready) {
        Started::Ready => Some((server, ports.expect("read when ready"))),
        Started::AddrInUse => None,
    }
}

fn ctl_ok(bins: &Bins, args: &[&str], server: Option<(&str, &str)>) -> String {
    let mut cmd = Command::new(&bins.ctl);
    cmd.args(args).env_remove("OUTPOST_KEY_PASSPHRASE");
    if let Some((url, token)) = server {
        cmd.env("OUTPOST_SERVER", url).env("OUTPOST_TOKEN", token);
    }
    let o: Output = cmd.output().expect("outpostctl runs");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "outpostctl {args:?}: {out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn sign(bins: &Bins, repo: &Path, file: &str, version: &str, extra: &[&str]) -> Target {
    let model = fixtures().join(file);
    let mut args = vec![
        "release",
        "sign",
        model.to_str().unwrap(),
        "--repo",
        repo.to_str().unwrap(),
        "--model",
        MODEL,
        "--version",
        version,
    ];
    args.extend(extra);
    ctl_ok(bins, &args, None);
    let bytes = std::fs::read(&model).unwrap();
    Target {
        version: version.to_owned(),
        path: format!("{MODEL}/{version}/{file}"),
        sha256: sha256_hex(&bytes),
        length: bytes.len() as u64,
    }
}

// ------------------------------------------------------------------ devices

/// One device: its bundle, data directory and (when running) its `outpost-agent run`.
pub struct Device {
    pub id: String,
    pub bundle: PathBuf,
    pub data: PathBuf,
    pub config: PathBuf,
    /// `run --chunk-len`.
    pub chunk_len: u32,
    bin: PathBuf,
    log: Log,
    child: Option<Child>,
}

impl Device {
    /// Starts `outpost-agent run --config BUNDLE/agent.toml`.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} runs already", self.id);
        let mut child = Command::new(&self.bin)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--chunk-len")
            .arg(self.chunk_len.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("outpost-agent runs");
        self.log.follow(&self.id, child.stderr.take().unwrap());
        self.child = Some(child);
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the agent runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM: a clean shutdown (exit 0).
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("the agent runs");
        signal(child.id(), "TERM");
        let status = child.wait().unwrap();
        assert!(status.success(), "{} stopped with {status}", self.id);
    }

    /// The persisted update state, as `outpost-agent status` prints it (same function,
    /// in-process, so that it can be polled every millisecond).
    pub fn status(&self) -> Result<serde_json::Value, String> {
        outpost_agent::update::daemon::status_json(&self.config).map_err(|e| format!("{e:#}"))
    }

    /// The persisted update state's name (`idle`, `verifying`, ...).
    pub fn phase(&self) -> Result<String, String> {
        let s = self.status()?;
        Ok(s["state"]["state"].as_str().unwrap_or("?").to_owned())
    }

    /// `outpost-agent status --config ...`, the CLI.
    pub fn status_cli(&self) -> serde_json::Value {
        let o = Command::new(&self.bin)
            .arg("status")
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "outpost-agent status: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }

    /// Opens the stopped agent's model store as the agent does at start and checks the
    /// active model: no pointer had to be repaired, no partial or corrupt blob was
    /// found, and its verified bytes are one of `signed`. Returns its sha256.
    pub fn check_store(&self, signed: &[&Target]) -> Option<String> {
        assert!(self.child.is_none(), "the agent holds the store");
        let store = outpost_agent::store::Store::open(&self.data).unwrap();
        let report = store.recovery_report();
        assert!(
            report.repaired_slots.is_empty() && report.bad_blobs_removed.is_empty(),
            "{}: store recovery had to repair: {report:?}",
            self.id
        );
        let active = store.active(MODEL).unwrap()?;
        let loaded = store.open_model(MODEL).unwrap();
        let sha = sha256_hex(&loaded.bytes);
        assert_eq!(sha, active.hash.to_hex());
        assert!(
            signed
                .iter()
                .any(|t| t.sha256 == sha && t.length == loaded.bytes.len() as u64),
            "{}: the active model {sha} is not a signed target",
            self.id
        );
        Some(sha)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ------------------------------------------------------------------ MQTT probe

/// What a probe client saw.
#[derive(Debug)]
pub enum ProbeEvent {
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    Publish(rumqttc::Publish),
    PubAck,
}

/// A plain MQTT client with someone's credentials (an attacker holding a device's
/// bundle, or the server's user forging assignments).
pub struct Probe {
    client: rumqttc::Client,
    events: mpsc::Receiver<ProbeEvent>,
    backlog: Vec<ProbeEvent>,
}

impl Probe {
    pub fn connect(port: u16, client_id: &str, user: &str, password: &str) -> Probe {
        Self::try_connect(port, client_id, user, password)
            .unwrap_or_else(|e| panic!("{client_id} as {user} did not connect: {e}"))
    }

    /// Connects, or returns why the broker refused (or dropped) the connection.
    pub fn try_connect(
        port: u16,
        client_id: &str,
        user: &str,
        password: &str,
    ) -> Result<Probe, String> {
        let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_credentials(user, password);
        opts.set_clean_session(true);
        // Outgoing up to 1 MiB: the broker, not the probe, refuses oversized packets.
        opts.set_max_packet_size(300 * 1024, 1024 * 1024);
        let (client, mut conn) = rumqttc::Client::new(opts, 64);
        let (tx, events) = mpsc::channel();
        let (ctx, crx) = mpsc::channel();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                use rumqttc::{Event, Packet};
                let ev = match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = ctx.send(Ok(()));
                        continue;
                    }
                    Ok(Event::Incoming(Packet::SubAck(s))) => ProbeEvent::SubAck(s.return_codes),
                    Ok(Event::Incoming(Packet::Publish(p))) => ProbeEvent::Publish(p),
                    Ok(Event::Incoming(Packet::PubAck(_))) => ProbeEvent::PubAck,
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = ctx.send(Err(e.to_string()));
                        break;
                    }
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        match crx.recv_timeout(WAIT) {
            Ok(Ok(())) => Ok(Probe {
                client,
                events,
                backlog: Vec::new(),
            }),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(format!("no CONNACK: {e}")),
        }
    }

    fn next(&mut self, what: &str, mut f: impl FnMut(&ProbeEvent) -> bool) -> ProbeEvent {
        if let Some(i) = self.backlog.iter().position(&mut f) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = self
                .events
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("probe: no {what}: {e}"));
            if f(&ev) {
                return ev;
            }
            self.backlog.push(ev);
        }
    }

    pub fn subscribe(&mut self, topic: &str) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client
            .subscribe(topic, rumqttc::QoS::AtLeastOnce)
            .unwrap();
        match self.next("suback", |e| matches!(e, ProbeEvent::SubAck(_))) {
            ProbeEvent::SubAck(codes) => codes,
            _ => unreachable!(),
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK (which Mosquitto also sends
    /// for a publish its ACL drops). Err when the broker closed the connection instead
    /// (the embedded broker's answer to a publish its ACL refuses).
    pub fn try_publish(
        &mut self,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
            .map_err(|e| e.to_string())?;
        if let Some(i) = self
            .backlog
            .iter()
            .position(|e| matches!(e, ProbeEvent::PubAck))
        {
            self.backlog.remove(i);
            return Ok(());
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ProbeEvent::PubAck) => return Ok(()),
                Ok(ev) => self.backlog.push(ev),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the broker closed the connection".into());
                }
                Err(e) => panic!("probe: no puback: {e}"),
            }
        }
    }

    /// [`Probe::try_publish`] that must be acknowledged.
    pub fn publish(&mut self, topic: &str, retain: bool, payload: Vec<u8>) {
        if let Err(e) = self.try_publish(topic, retain, payload) {
            panic!("probe: publishing on {topic}: {e}");
        }
    }

    /// Every message received so far and up to `until` returns true for one.
    pub fn messages_until(
        &mut self,
        what: &str,
        mut until: impl FnMut(&rumqttc::Publish) -> bool,
    ) -> Vec<rumqttc::Publish> {
        let mut seen = Vec::new();
        loop {
            let ev = self.next(what, |e| matches!(e, ProbeEvent::Publish(_)));
            let ProbeEvent::Publish(p) = ev else {
                unreachable!()
            };
            let done = until(&p);
            seen.push(p);
            if done {
                return seen;
            }
        }
    }
}

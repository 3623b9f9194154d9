//! The fleet part of the demo: real processes on loopback.
//!
//! 1. Operator: `repo init`, the server (`outpost-server serve --import-repo`, its
//!    embedded broker or Mosquitto), N devices added and bundled (short telemetry windows
//!    and probation written into each `agent.toml`).
//! 2. N `outpost-agent run` daemons with simulated app traffic (held-out digits, half of
//!    the predictions labelled).
//! 3. Release 1.0.0 signed, pushed, assigned to every device: full download.
//! 4. Release 1.1.0 (fine-tuned) signed, pushed (the server computes the delta),
//!    assigned: every device must install it by delta, fewer bytes than the full model.
//! 5. After window summaries of each version arrived from every device: agents and
//!    server stopped (SIGTERM), summary printed.
//!
//! Progress lines come from polling `GET /api/v1/devices` every 200 ms.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use outpost_protocol::bundle::AgentConfig;
use outpost_protocol::release::ModelRelease;
use serde_json::{Value, json};

use super::{Bins, DemoBroker, DemoOptions, Report, now};
use crate::keys::SealCost;
use crate::quality::Aggregator;
use crate::repo::{Expiries, InitOptions, Repo};
use crate::server::client::{ApiClient, push_release};

/// The model slot of the demo.
const MODEL: &str = "digits-cnn";
const POLL: Duration = Duration::from_millis(200);

/// A child process stopped (SIGTERM) and reaped on drop.
struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    /// SIGTERM, then waits up to `timeout` (SIGKILL after it).
    fn stop(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not stop within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log_file(logs: &Path, name: &str) -> anyhow::Result<File> {
    let p = logs.join(format!("{name}.log"));
    File::create(&p).with_context(|| format!("creating {}", p.display()))
}

/// How many times Mosquitto is started on a newly drawn port when it cannot bind one.
const BIND_ATTEMPTS: usize = 8;

/// A port for Mosquitto, which cannot report a port-0 bind: drawn at random below the
/// kernel's ephemeral range (`ip_local_port_range`), where neither a port-0 bind nor an
/// outgoing connection lands; [`start_mosquitto`] draws again when Mosquitto cannot
/// bind it (another service holds it).
fn pick_port() -> u16 {
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
        let mut r = [0u8; 2];
        crate::keys::random_bytes(&mut r);
        let port = from + u16::from_le_bytes(r) % (to - from);
        // Only a filter: Mosquitto's own bind is what checks.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Mosquitto from the shipped `outpost.conf` (its DEPLOY lines replaced), on newly drawn
/// ports until one binds ([`BIND_ATTEMPTS`]); returns it running, and its port.
fn start_mosquitto(
    shipped: &Path,
    work: &Path,
    passwd: &Path,
    logs: &Path,
    timeout: Duration,
) -> anyhow::Result<(Proc, u16)> {
    let conf = std::fs::read_to_string(shipped.join("outpost.conf"))
        .context("reading the shipped outpost.conf")?;
    let persist = work.join("mosquitto-db");
    std::fs::create_dir_all(&persist)?;
    let log_path = logs.join("mosquitto.log");
    for _ in 0..BIND_ATTEMPTS {
        let port = pick_port();
        let mut out = String::new();
        for line in conf.lines() {
            let l = if line.starts_with("listener ") {
                format!("listener {port} 127.0.0.1")
            } else if line.starts_with("password_file ") {
                format!("password_file {}", passwd.display())
            } else if line.starts_with("acl_file ") {
                format!("acl_file {}", shipped.join("outpost.acl").display())
            } else if line.starts_with("persistence_location ") {
                format!("persistence_location {}/", persist.display())
            } else {
                line.to_owned()
            };
            out.push_str(&l);
            out.push('\n');
        }
        out.push_str("log_dest stderr\n");
        // Started as root, Mosquitto would switch to the `mosquitto` user and could not
        // re-read the password file the server writes (mode 0640) on SIGHUP.
        if let Ok(o) = Command::new("id").arg("-un").output()
            && o.status.success()
        {
            out.push_str(&format!(
                "user {}\n",
                String::from_utf8_lossy(&o.stdout).trim()
            ));
        }
        let conf_path = work.join("mosquitto.conf");
        std::fs::write(&conf_path, out)?;
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(logs, "mosquitto")?)
            .spawn()
            .context("starting /usr/sbin/mosquitto")?;
        let mut proc = Proc {
            name: "mosquitto".into(),
            child: Some(child),
        };
        let exited = wait_for("mosquitto to start", timeout, || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains(" running") {
                return Ok(Some(false));
            }
            let child = proc.child.as_mut().context("mosquitto")?;
            Ok(child.try_wait()?.map(|_| true))
        })?;
        if !exited {
            return Ok((proc, port));
        }
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if !log.contains("Address already in use") {
            bail!("mosquitto exited at start; see {}", log_path.display());
        }
    }
    bail!("mosquitto could not bind a port in {BIND_ATTEMPTS} attempts")
}

/// Polls `f` every [`POLL`] until it returns `Some`, for at most `timeout`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f()? {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// The server process and how to reach it.
struct Server {
    proc: Proc,
    url: String,
    mqtt_url: String,
    api: ApiClient,
    _broker: Option<Proc>,
    mosquitto: Option<Mosquitto>,
}

/// Mosquitto, started before the server (with only the server's login in its
/// password file); reloaded once the devices exist.
struct Mosquitto {
    log: PathBuf,
}

fn start_server(
    bins: &Bins,
    work: &Path,
    repo: &Path,
    broker: &DemoBroker,
    logs: &Path,
    timeout: Duration,
) -> anyhow::Result<Server> {
    let data = work.join("server");
    let mut cmd = Command::new(&bins.server);
    cmd.arg("serve")
        .arg("--data")
        .arg(&data)
        .arg("--import-repo")
        .arg(repo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(logs, "server")?);
    let mut mosquitto = None;
    let mut broker_proc = None;
    let mut mqtt_url = String::new();
    if let DemoBroker::Mosquitto(shipped) = broker {
        let pw = work.join("server-broker.pw");
        let mut secret = [0u8; 16];
        crate::keys::random_bytes(&mut secret);
        let secret = hex::encode(secret);
        std::fs::write(&pw, &secret)?;
        // The server rewrites this file at its start (same password for its login).
        let passwd = work.join("mosquitto.passwd");
        let hash = crate::server::auth::mosquitto_hash(&secret);
        std::fs::write(&passwd, format!("outpost-server:{hash}\n"))?;
        let (proc, port) = start_mosquitto(shipped, work, &passwd, logs, timeout)?;
        broker_proc = Some(proc);
        cmd.arg("--broker")
            .arg(format!("mqtt://127.0.0.1:{port}"))
            .arg("--broker-password-file")
            .arg(&pw)
            .arg("--mosquitto-passwd-file")
            .arg(&passwd);
        mqtt_url = format!("mqtt://127.0.0.1:{port}");
        mosquitto = Some(Mosquitto {
            log: logs.join("mosquitto.log"),
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bins.server.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let proc = Proc {
        name: "outpost-server".into(),
        child: Some(child),
    };
    // The bound addresses come first on stdout: http, then (embedded broker) mqtt.
    let mut lines = BufReader::new(stdout).lines();
    let mut url = String::new();
    while url.is_empty() || (mosquitto.is_none() && mqtt_url.is_empty()) {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => bail!(
                "outpost-server serve stopped before printing its addresses; see {}",
                logs.join("server.log").display()
            ),
        };
        if let Some(u) = line.strip_prefix("outpost-server: http://") {
            url = format!("http://{u}");
        } else if let Some(u) = line.strip_prefix("outpost-server: mqtt://") {
            mqtt_url = format!("mqtt://{u}");
        } else if line.contains("admin token") && mqtt_url.is_empty() && mosquitto.is_none() {
            bail!(
                "outpost-server serve runs no embedded broker (no mqtt:// line); \
                 use --broker mosquitto"
            );
        }
    }
    let mut rest = log_file(logs, "server.stdout")?;
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = writeln!(rest, "{l}");
        }
    });
    let token = std::fs::read_to_string(data.join("admin.token"))
        .context("reading the server's admin token")?;
    let api = ApiClient::new(&url, token.trim());
    Ok(Server {
        proc,
        url,
        mqtt_url,
        api,
        _broker: broker_proc,
        mosquitto,
    })
}

impl Server {
    /// Reloads Mosquitto (if that is the broker) now that the password file lists every
    /// device, and waits until the server's MQTT link is up.
    fn broker_up(&mut self, timeout: Duration) -> anyhow::Result<()> {
        if let (Some(m), Some(proc)) = (&self.mosquitto, &self._broker) {
            let child = proc.child.as_ref().context("mosquitto stopped")?;
            let reloads = |log: &Path| {
                std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .matches("Reloading config")
                    .count()
            };
            let before = reloads(&m.log);
            let hup = Command::new("kill")
                .arg("-HUP")
                .arg(child.id().to_string())
                .status()?;
            if !hup.success() {
                bail!("kill -HUP mosquitto failed");
            }
            wait_for("mosquitto to reload its password file", timeout, || {
                Ok((reloads(&m.log) > before).then_some(()))
            })?;
        }
        wait_for("the server's MQTT link", timeout, || {
            let h = self.api.get("/api/v1/health")?;
            Ok((h["broker"] == "connected").then_some(()))
        })
    }
}

/// One device: bundle, data directory, daemon.
struct Device {
    id: String,
    config: PathBuf,
    proc: Option<Proc>,
}

fn add_device(server: &Server, work: &Path, id: &str) -> anyhow::Result<Device> {
    server.api.post(
        "/api/v1/devices",
        &json!({"id": id, "tags": {"fleet": "demo"}}),
    )?;
    let root = work.join("devices").join(id);
    let bundle_dir = root.join("bundle");
    std::fs::create_dir_all(&bundle_dir)?;
    let b = server.api.post(
        &format!("/api/v1/devices/{id}/bundle"),
        &json!({"broker_url": server.mqtt_url, "data_dir": root.join("data").to_string_lossy()}),
    )?;
    let mut cfg = AgentConfig::from_toml(b["agent_toml"].as_str().unwrap_or_default())
        .context("the server's agent.toml")?;
    // Demo pacing: windows every 200 inferences or 5 s, uploads every 2 s, a short
    // probation, quick reconnects.
    cfg.telemetry.window_count = 200;
    cfg.telemetry.window_secs = 5;
    cfg.telemetry.upload_secs = 2;
    cfg.update.probation_secs = 2;
    cfg.broker.max_backoff_secs = 2;
    cfg.validate()?;
    let config = bundle_dir.join("agent.toml");
    std::fs::write(&config, cfg.to_toml())?;
    std::fs::write(
        bundle_dir.join("root.json"),
        b["root_json"].as_str().unwrap_or_default(),
    )?;
    let creds = bundle_dir.join("credentials");
    std::fs::write(&creds, b["credentials"].as_str().unwrap_or_default())?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600))?;
    Ok(Device {
        id: id.to_owned(),
        config,
        proc: None,
    })
}

impl Device {
    fn start(&mut self, bins: &Bins, fx: &Path, rate: f64, logs: &Path) -> anyhow::Result<()> {
        let child = Command::new(&bins.agent)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--simulate-inputs")
            .arg(fx.join("heldout_image.npy"))
            .arg("--simulate-labels")
            .arg(fx.join("heldout_labels.npy"))
            .arg("--simulate-rate")
            .arg(rate.to_string())
            .arg("--simulate-label-share")
            .arg("0.5")
            .stdin(Stdio::null())
            .stdout(log_file(logs, &self.id)?)
            .stderr(log_file(logs, &format!("{}.stderr", self.id))?)
            .spawn()
            .with_context(|| format!("starting {}", bins.agent.display()))?;
        self.proc = Some(Proc {
            name: self.id.clone(),
            child: Some(child),
        });
        Ok(())
    }
}

/// A signed release.
struct Signed {
    version: String,
    path: String,
    sha256: String,
    length: u64,
}

fn sign(repo: &Repo, fx: &Path, file: &str, version: &str) -> anyhow::Result<Signed> {
    let bytes = std::fs::read(fx.join(file))?;
    let info = std::fs::read(fx.join(file).with_extension("release.json"))?;
    let mut release = ModelRelease::from_json(&info)?;
    release.model = MODEL.into();
    release.version = version.into();
    let e = repo.sign_release(file, &bytes, release, now())?;
    Ok(Signed {
        version: version.into(),
        sha256: e.target.hashes.get("sha256").cloned().unwrap_or_default(),
        path: e.path,
        length: e.target.length,
    })
}

/// Everything the demo keeps reading from the server.
struct Watch<'a> {
    api: &'a ApiClient,
    agents: Vec<Device>,
    logs: PathBuf,
    started: Instant,
    shown: BTreeMap<String, String>,
    telemetry: BTreeMap<String, Vec<Value>>,
}

impl Watch<'_> {
    /// The server's device list; fails when an agent process has exited.
    fn devices(&mut self) -> anyhow::Result<Vec<Value>> {
        for a in &mut self.agents {
            if let Some(child) = a.proc.as_mut().and_then(|p| p.child.as_mut())
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited ({status}); see {}",
                    a.id,
                    self.logs.join(format!("{}.stderr.log", a.id)).display()
                );
            }
        }
        let d = self.api.get("/api/v1/devices")?;
        Ok(d["devices"].as_array().cloned().unwrap_or_default())
    }

    /// Prints a line for each device whose state changed since the last call.
    fn progress(&mut self, devices: &[Value]) {
        for d in devices {
            let id = d["id"].as_str().unwrap_or("?").to_owned();
            let line = describe(&d["status"]);
            if self.shown.get(&id) != Some(&line) {
                println!(
                    "  [{:5.1}s] {id:<9} {line}",
                    self.started.elapsed().as_secs_f64()
                );
                self.shown.insert(id, line);
            }
        }
    }

    /// Fetches each device's new telemetry records.
    fn pull_telemetry(&mut self, ids: &[String]) -> anyhow::Result<()> {
        for id in ids {
            let got = self.telemetry.entry(id.clone()).or_default();
            loop {
                let after = got.last().and_then(|r| r["seq"].as_u64()).unwrap_or(0);
                let page = self.api.get(&format!(
                    "/api/v1/devices/{id}/telemetry?after={after}&limit=1000"
                ))?;
                let records = page["records"].as_array().cloned().unwrap_or_default();
                if records.is_empty() {
                    break;
                }
                got.extend(records);
            }
        }
        Ok(())
    }

    /// Waits until every device runs `t` committed after an assignment of at least its
    /// counter; a device reporting a failure for it ends the wait.
    fn converge(
        &mut self,
        t: &Signed,
        counters: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> anyhow::Result<BTreeMap<String, Value>> {
        wait_for(
            &format!("every device to commit {}", t.path),
            timeout,
            || {
                let devices = self.devices()?;
                self.progress(&devices);
                let mut done = BTreeMap::new();
                for d in &devices {
                    let id = d["id"].as_str().unwrap_or_default();
                    let Some(&counter) = counters.get(id) else {
                        continue;
                    };
                    let s = &d["status"];
                    let current = s["assignment_counter"].as_u64() >= Some(counter);
                    if current && s["update"]["state"] == "failed" {
                        bail!(
                            "{id} failed to install {}: {}",
                            t.path,
                            s["last_error"]["message"].as_str().unwrap_or("?")
                        );
                    }
                    let slot = &s["models"][MODEL];
                    if current
                        && slot["active_sha256"] == t.sha256.as_str()
                        && s["update"]["state"] == "committed"
                    {
                        done.insert(id.to_owned(), s.clone());
                    }
                }
                Ok((done.len() == counters.len()).then_some(done))
            },
        )
    }

    /// Waits until every device uploaded a window summary of `version` with labels.
    fn windows_of(
        &mut self,
        ids: &[String],
        version: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        wait_for(
            &format!("window summaries of {version} from every device"),
            timeout,
            || {
                let devices = self.devices()?;
                self.progress(&devices);
                self.pull_telemetry(ids)?;
                let all = ids.iter().all(|id| {
                    self.telemetry[id].iter().any(|r| {
                        r["class"] == "window"
                            && r["payload"]["version"] == version
                            && r["payload"]["realized"]["labels"].as_u64() > Some(0)
                    })
                });
                Ok(all.then_some(()))
            },
        )
    }
}

/// One line of a device's state as the server sees it.
fn describe(s: &Value) -> String {
    if s.is_null() {
        return "registered, not connected yet".into();
    }
    let slot = &s["models"][MODEL];
    let active = slot["version"]
        .as_str()
        .map_or("no model".to_owned(), |v| format!("{MODEL} {v}"));
    let u = &s["update"];
    let Some(state) = u["state"].as_str() else {
        return format!("idle, {active}");
    };
    let target = u["target"].as_str().unwrap_or("?");
    match state {
        "committed" => format!("committed, running {active}"),
        "fetching" => format!(
            "fetching {target}: {} {} / {} bytes",
            u["artifact"].as_str().unwrap_or("?"),
            u["bytes_done"],
            u["bytes_total"]
        ),
        "failed" => format!(
            "failed {target}: {}",
            s["last_error"]["message"].as_str().unwrap_or("?")
        ),
        other => format!("{other} {target} (running {active})"),
    }
}

fn assign(api: &ApiClient, t: &Signed, ids: &[String]) -> anyhow::Result<BTreeMap<String, u64>> {
    let r = api.post(
        "/api/v1/assignments",
        &json!({"model": MODEL, "version": t.version, "devices": ids}),
    )?;
    let counters: BTreeMap<String, u64> = r["assigned"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a["device"].as_str()?.to_owned(), a["counter"].as_u64()?)))
        .collect();
    if counters.len() != ids.len() {
        bail!(
            "assignment reached {} of {} devices: {r}",
            counters.len(),
            ids.len()
        );
    }
    Ok(counters)
}

/// Pushes the release; returns the length of its compressed full model, if the server
/// kept one (smaller than the file).
fn push(api: &ApiClient, repo: &Repo, t: &Signed) -> anyhow::Result<Option<u64>> {
    let r = push_release(api, repo, MODEL, &t.version)?;
    let mut compressed = None;
    for rel in r["releases"].as_array().into_iter().flatten() {
        if rel["version"] != t.version.as_str() {
            continue;
        }
        compressed = rel["artifacts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["kind"] == "full_zstd")
            .and_then(|a| a["length"].as_u64());
        let arts: Vec<String> = rel["artifacts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                format!(
                    "{} {} bytes",
                    a["kind"].as_str().unwrap_or("?"),
                    a["length"]
                )
            })
            .collect();
        println!(
            "  pushed {} ({} bytes); artifacts: {}",
            t.path,
            t.length,
            arts.join(", ")
        );
    }
    Ok(compressed)
}

fn bytes(s: &Value, kind: &str) -> u64 {
    s["bytes_received"][kind].as_u64().unwrap_or(0)
}

/// Runs the fleet demo in `work`, adding its checks to `report`.
pub(super) fn run_fleet(
    opts: &DemoOptions,
    bins: &Bins,
    work: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let fx = &opts.fixtures;
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let started = Instant::now();

    println!(
        "\n1. operator: image repository, server, {} devices",
        opts.devices
    );
    let repo_dir = work.join("repo");
    let repo = Repo::init(
        &repo_dir,
        &InitOptions {
            root_keys: 1,
            root_threshold: 1,
            passphrase: None,
            expiries: Expiries::default(),
            seal_cost: SealCost::default(),
        },
        now(),
    )?;
    let mut server = start_server(bins, work, &repo_dir, &opts.broker, &logs, opts.timeout)?;
    println!(
        "  outpost-server serve: {} and {} (logs in {})",
        server.url,
        server.mqtt_url,
        logs.display()
    );
    let ids: Vec<String> = (1..=opts.devices).map(|i| format!("device-{i}")).collect();
    let mut devices = ids
        .iter()
        .map(|id| add_device(&server, work, id))
        .collect::<anyhow::Result<Vec<_>>>()?;
    server.broker_up(opts.timeout)?;
    for d in &mut devices {
        d.start(bins, fx, opts.rate, &logs)?;
    }
    println!(
        "  {} agents started ({} simulated inferences/s each, half of them labelled)",
        devices.len(),
        opts.rate
    );
    let mut watch = Watch {
        api: &server.api,
        agents: devices,
        logs: logs.clone(),
        started,
        shown: BTreeMap::new(),
        telemetry: BTreeMap::new(),
    };

    println!("\n2. release {MODEL} 1.0.0: sign, push, assign to every device");
    let v1 = sign(&repo, fx, "cnn_a.onnx", "1.0.0")?;
    let v1_zstd = push(&server.api, &repo, &v1)?;
    let counters = assign(&server.api, &v1, &ids)?;
    let after_v1 = watch.converge(&v1, &counters, opts.timeout)?;
    let full_ok = after_v1.values().all(|s| {
        Some(bytes(s, "full_zstd")) == v1_zstd && bytes(s, "full") == 0 && bytes(s, "delta") == 0
    });
    report.check(
        &format!("every device runs {MODEL} 1.0.0, fetched as the zstd-compressed full model"),
        full_ok,
        &format!(
            "{} bytes each (the file: {})",
            v1_zstd.map_or("none kept".to_owned(), |z| z.to_string()),
            v1.length
        ),
    );
    watch.windows_of(&ids, &v1.version, opts.timeout)?;
    println!(
        "  [{:5.1}s] window summaries of 1.0.0 arrived from every device",
        started.elapsed().as_secs_f64()
    );

    println!("\n3. release {MODEL} 1.1.0 (fine-tuned): sign, push, assign");
    let v2 = sign(&repo, fx, "cnn_a_ft.onnx", "1.1.0")?;
    push(&server.api, &repo, &v2)?;
    let counters = assign(&server.api, &v2, &ids)?;
    let after_v2 = watch.converge(&v2, &counters, opts.timeout)?;
    let mut by_delta = true;
    let mut detail = Vec::new();
    for (id, s) in &after_v2 {
        let delta = bytes(s, "delta");
        let before = &after_v1[id];
        by_delta &= delta > 0
            && delta < v2.length
            && bytes(s, "full") == bytes(before, "full")
            && bytes(s, "full_zstd") == bytes(before, "full_zstd");
        detail.push(format!("{id} {delta}"));
    }
    report.check(
        &format!("every device runs {MODEL} 1.1.0, fetched as a delta smaller than the full model"),
        by_delta,
        &format!("delta bytes: {} (full: {})", detail.join(", "), v2.length),
    );
    watch.windows_of(&ids, &v2.version, opts.timeout)?;
    println!(
        "  [{:5.1}s] window summaries of 1.1.0 arrived from every device",
        started.elapsed().as_secs_f64()
    );

    println!("\n4. stop the agents and the server (SIGTERM)");
    let final_devices = watch.devices()?;
    watch.pull_telemetry(&ids)?;
    let quality = server.api.get(&format!("/api/v1/models/{MODEL}/quality"))?;
    let mut clean = true;
    for d in &mut watch.agents {
        let status = d
            .proc
            .as_mut()
            .context("agent not running")?
            .stop(Duration::from_secs(15))?;
        clean &= status.success();
    }
    report.check("agents stopped cleanly (exit 0)", clean, "");
    let status = server.proc.stop(Duration::from_secs(15))?;
    report.check("server stopped cleanly (exit 0)", status.success(), "");
    if let Some(b) = &mut server._broker {
        let _ = b.stop(Duration::from_secs(5));
    }

    summary(
        &final_devices,
        &watch.telemetry,
        &quality,
        [&v1, &v2],
        report,
    );
    println!("\nfleet demo took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn summary(
    devices: &[Value],
    telemetry: &BTreeMap<String, Vec<Value>>,
    quality: &Value,
    releases: [&Signed; 2],
    report: &mut Report,
) {
    println!("\nsummary: devices (as the server last saw them)");
    println!(
        "  {:<9} {:<8} {:<12} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "device", "model", "sha256", "full B", "zstd B", "delta B", "meta B", "telemetry"
    );
    for d in devices {
        let s = &d["status"];
        let slot = &s["models"][MODEL];
        let sha = slot["active_sha256"].as_str().unwrap_or("-");
        let id = d["id"].as_str().unwrap_or("?");
        let records = telemetry.get(id).map_or(0, Vec::len);
        let mut classes: BTreeMap<&str, usize> = BTreeMap::new();
        for r in telemetry.get(id).into_iter().flatten() {
            *classes
                .entry(r["class"].as_str().unwrap_or("?"))
                .or_default() += 1;
        }
        let classes: Vec<String> = classes.iter().map(|(c, n)| format!("{n} {c}")).collect();
        println!(
            "  {:<9} {:<8} {:<12} {:>10} {:>10} {:>10} {:>10} {:>10}  ({})",
            id,
            slot["version"].as_str().unwrap_or("-"),
            &sha[..sha.len().min(12)],
            bytes(s, "full"),
            bytes(s, "full_zstd"),
            bytes(s, "delta"),
            bytes(s, "metadata"),
            records,
            classes.join(", ")
        );
    }
    let versions = quality["versions"].as_array().cloned().unwrap_or_default();
    println!(
        "\nsummary: accuracy proxies per model version \
         (GET /api/v1/models/{MODEL}/quality: window summaries of every device)"
    );
    println!(
        "  {:<8} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "version", "windows", "inferences", "expected", "realized", "labels", "PSI", "JS"
    );
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("-".to_owned(), |v| format!("{:.1}%", v * 100.0))
    };
    let num = |v: &Value| v.as_f64().map_or("-".to_owned(), |v| format!("{v:.4}"));
    for v in &versions {
        println!(
            "  {:<8} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            v["version"].as_str().unwrap_or("?"),
            v["windows"].as_u64().unwrap_or(0),
            v["inferences"].as_u64().unwrap_or(0),
            pct(&v["expected_accuracy"]),
            pct(&v["realized_accuracy"]),
            v["labels"].as_u64().unwrap_or(0),
            num(&v["mean_psi"]),
            num(&v["mean_js"]),
        );
    }
    println!(
        "  expected = CBPE (mean calibrated confidence); realized = labelled predictions \
         correct; PSI/JS = mean input-feature drift against the release's reference"
    );
    let has = |r: &Signed| {
        versions.iter().any(|v| {
            v["version"] == r.version.as_str()
                && v["inferences"].as_u64() > Some(0)
                && v["expected_accuracy"].is_f64()
                && v["realized_accuracy"].is_f64()
        })
    };
    report.check(
        "accuracy proxies (expected and realized) for both versions",
        releases.iter().all(|r| has(r)),
        "",
    );
    // The server's aggregate must account for exactly the window summaries it stored.
    let mut agg = Aggregator::new(MODEL);
    for (id, records) in telemetry {
        for r in records {
            agg.add(id, r["class"].as_str().unwrap_or(""), &r["payload"]);
        }
    }
    let mine = agg.finish();
    let agrees = mine.len() == versions.len()
        && versions.iter().all(|v| {
            mine.get(v["version"].as_str().unwrap_or(""))
                .is_some_and(|m| {
                    v["windows"].as_u64() == Some(m.windows)
                        && v["inferences"].as_u64() == Some(m.inferences)
                        && v["labels"].as_u64() == Some(m.labels)
                        && v["correct"].as_u64() == Some(m.correct)
                })
        });
    report.check(
        "the server's per-version aggregate matches the stored window summaries",
        agrees,
        "",
    );
}

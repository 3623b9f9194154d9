//! `outpost-server demo`: the trust layer end to end, with real processes.
//!
//! An operator creates an image repository and signs two releases of a real model; the
//! repository is served over HTTP on loopback; a device (the real `outpost-tuf-client`
//! process, then `outpost-agent infer`) fetches, verifies and runs the model; the
//! director assigns it; then the demo plays the attacks TUF and the director stop and
//! checks that each one is refused. Exit status 0 only when every expectation held.
//!
//! This grows into the fleet demo (server, broker, agents, a rollout) with the fleet
//! channel; the trust steps stay.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use outpost_protocol::director::{self, Assignment, CounterState, SlotTarget};
use outpost_protocol::release::ModelRelease;
use outpost_protocol::tuf::metadata::{Envelope, Timestamp};
use outpost_protocol::tuf::{
    FetchError, MetadataStore, Remote, StoreError, Updater, UpdaterConfig, UtcTime,
};

use crate::keys::SealCost;
use crate::repo::{Expiries, InitOptions, Repo};
use crate::static_http::StaticServer;

/// Where the committed model fixtures live in a source checkout.
pub const DEFAULT_FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/models");

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Directory with `cnn_a.onnx`, `cnn_a_ft.onnx`, their `.release.json` and
    /// `sample_image_0.npy`.
    pub fixtures: PathBuf,
    /// Work directory; a temporary one (removed at the end) when `None`.
    pub work_dir: Option<PathBuf>,
    /// Directory holding `outpost-agent` and `outpost-tuf-client`; default: next to this
    /// executable, built with the running cargo when missing.
    pub agent_bin_dir: Option<PathBuf>,
}

struct Report {
    checks: Vec<(String, bool)>,
}

impl Report {
    fn check(&mut self, what: &str, ok: bool, detail: &str) {
        let mark = if ok { "ok  " } else { "FAIL" };
        if detail.is_empty() {
            println!("  [{mark}] {what}");
        } else {
            println!("  [{mark}] {what}: {detail}");
        }
        self.checks.push((what.to_owned(), ok));
    }
}

fn now() -> UtcTime {
    UtcTime::from_system_time(std::time::SystemTime::now())
}

/// Finds a sibling binary of this executable (same cargo profile directory), building the
/// agent package with the cargo that runs us when it is missing.
fn agent_binary(name: &str, bin_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = bin_dir {
        let path = dir.join(name);
        if !path.exists() {
            bail!(
                "{} not found; build it: cargo build -p outpost-agent",
                path.display()
            );
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().context("executable has no directory")?;
    let path = dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO").context(format!(
        "{} not found; build it first: cargo build --release -p outpost-agent",
        path.display()
    ))?;
    println!("building the agent binaries (cargo build -p outpost-agent) ...");
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "outpost-agent", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo")?;
    if !status.success() || !path.exists() {
        bail!("could not build {}", path.display());
    }
    Ok(path)
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(bin: &Path, args: &[&str]) -> anyhow::Result<Run> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

/// The device's TUF view for director checks: the same pure workflow as the device's
/// client, reading the served repository directly (in-process) from its trusted root.
struct DirRemote {
    meta: PathBuf,
}

impl Remote for DirRemote {
    fn fetch_metadata(
        &mut self,
        role: &str,
        version: Option<u64>,
        max_len: u64,
    ) -> Result<Vec<u8>, FetchError> {
        let name = match version {
            Some(v) => format!("{v}.{role}.json"),
            None => format!("{role}.json"),
        };
        let bytes = std::fs::read(self.meta.join(name)).map_err(|_| FetchError::NotFound)?;
        if bytes.len() as u64 > max_len {
            return Err(FetchError::TooLarge { max: max_len });
        }
        Ok(bytes)
    }

    fn fetch_target(&mut self, _path: &str, _max_len: u64) -> Result<Vec<u8>, FetchError> {
        Err(FetchError::NotFound)
    }
}

#[derive(Default)]
struct MemStore(BTreeMap<String, Vec<u8>>);

impl MetadataStore for MemStore {
    fn load(&mut self, role: &str) -> Option<Vec<u8>> {
        self.0.get(role).cloned()
    }
    fn save(&mut self, role: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.0.insert(role.to_owned(), bytes.to_vec());
        Ok(())
    }
    fn delete(&mut self, role: &str) -> Result<(), StoreError> {
        self.0.remove(role);
        Ok(())
    }
}

type DeviceView = Updater<DirRemote, MemStore>;

fn device_view(trusted_root: &[u8], repo: &Repo) -> anyhow::Result<DeviceView> {
    let mut store = MemStore::default();
    store.save("root", trusted_root)?;
    let remote = DirRemote {
        meta: repo.metadata_dir(),
    };
    let mut up = Updater::new(remote, store, UpdaterConfig::default(), now())?;
    up.refresh()?;
    Ok(up)
}

fn verify_for(
    view: &mut DeviceView,
    bytes: &[u8],
    device: &str,
    last: Option<&CounterState>,
) -> Result<director::AcceptedAssignment, director::DirectorError> {
    let root = view.trusted_set().root().clone();
    director::verify_assignment(
        bytes,
        &root,
        &mut |p: &str| view.get_target_info(p),
        device,
        last,
        now(),
    )
}

/// Runs the demo. Returns `Ok(true)` when every check passed.
pub fn run_demo(opts: &DemoOptions) -> anyhow::Result<bool> {
    let tmp;
    let work = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = TempDir::new()?;
            tmp.path.clone()
        }
    };
    let fx = &opts.fixtures;
    for f in ["cnn_a.onnx", "cnn_a_ft.onnx", "sample_image_0.npy"] {
        if !fx.join(f).exists() {
            bail!(
                "fixture {} missing; pass --fixtures DIR (tests/fixtures/models)",
                fx.join(f).display()
            );
        }
    }
    let bin_dir = opts.agent_bin_dir.as_deref();
    let tuf_client = agent_binary("outpost-tuf-client", bin_dir)?;
    let agent = agent_binary("outpost-agent", bin_dir)?;
    let mut report = Report { checks: Vec::new() };

    println!("\n1. operator: create the image repository and sign two releases");
    let repo_dir = work.join("repo");
    let repo = Repo::init(
        &repo_dir,
        &InitOptions {
            root_keys: 3,
            root_threshold: 2,
            passphrase: None,
            expiries: Expiries::default(),
            seal_cost: SealCost::default(),
        },
        now(),
    )?;
    println!(
        "  repository {} (3 offline root keys, threshold 2)",
        repo_dir.display()
    );
    let mut entries = Vec::new();
    for (file, version) in [("cnn_a.onnx", "1.0.0"), ("cnn_a_ft.onnx", "1.1.0")] {
        let bytes = std::fs::read(fx.join(file))?;
        let info = std::fs::read(fx.join(file).with_extension("release.json"))?;
        let mut release = ModelRelease::from_json(&info)?;
        release.model = "digits-cnn".into();
        release.version = version.into();
        let e = repo.sign_release(file, &bytes, release, now())?;
        println!(
            "  signed {} ({} bytes, release sequence {})",
            e.path, e.target.length, e.release.sequence
        );
        entries.push(e);
    }
    let (old, new) = (&entries[0], &entries[1]);

    println!("\n2. server: serve the repository on loopback");
    let server = StaticServer::start(&repo.metadata_dir(), &repo.targets_dir())?;
    let (meta_url, targets_url) = (server.metadata_url(), server.targets_url());
    println!("  metadata {meta_url}\n  targets  {targets_url}");

    println!(
        "\n3. device-1: trust root v1, refresh, download {}, run it",
        new.path
    );
    let dev = work.join("device-1");
    let (dev_meta, dev_targets) = (dev.join("metadata"), dev.join("targets"));
    std::fs::create_dir_all(&dev_meta)?;
    let root1 = repo.metadata_dir().join("1.root.json");
    let client = |meta: &Path, args: &[&str]| -> anyhow::Result<Run> {
        let mut all = vec!["--metadata-dir", meta.to_str().context("utf-8 path")?];
        all.extend_from_slice(args);
        run(&tuf_client, &all)
    };
    let download = |meta: &Path, target_dir: &Path, path: &str| -> anyhow::Result<Run> {
        std::fs::create_dir_all(target_dir)?;
        client(
            meta,
            &[
                "--metadata-url",
                &meta_url,
                "--target-name",
                path,
                "--target-base-url",
                &targets_url,
                "--target-dir",
                target_dir.to_str().context("utf-8 path")?,
                "download",
            ],
        )
    };
    let r = client(&dev_meta, &["init", root1.to_str().context("utf-8 path")?])?;
    report.check("device initialised from the trusted root", r.ok, &r.stderr);
    let r = client(&dev_meta, &["--metadata-url", &meta_url, "refresh"])?;
    report.check(
        "refresh: root, timestamp, snapshot, targets verified",
        r.ok,
        &r.stderr,
    );
    let r = download(&dev_meta, &dev_targets, &new.path)?;
    let stored = dev_targets.join(new.path.replace('/', "%2F"));
    let got = std::fs::read(&stored).unwrap_or_default();
    let want = std::fs::read(fx.join("cnn_a_ft.onnx"))?;
    report.check(
        "download: length and sha256 match the signed target",
        r.ok && got == want,
        &r.stderr,
    );

    let sample = fx.join("sample_image_0.npy");
    let r = run(
        &agent,
        &[
            "infer",
            "--model",
            stored.to_str().context("utf-8 path")?,
            "--release",
            fx.join("cnn_a_ft.release.json")
                .to_str()
                .context("utf-8 path")?,
            "--input",
            &format!("x={}", sample.display()),
        ],
    )?;
    let digit = serde_json::from_str::<serde_json::Value>(last_line(&r.stdout))
        .ok()
        .and_then(|v| {
            let data = v["outputs"]["logits"]["data"].as_array()?.clone();
            let best = data
                .iter()
                .enumerate()
                .filter_map(|(i, x)| Some((i, x.as_f64()?)))
                .max_by(|a, b| a.1.total_cmp(&b.1))?;
            Some((best.0, v["path"].as_str().unwrap_or("?").to_owned()))
        });
    let label = sample_label(fx);
    match (&digit, label) {
        (Some((d, path)), Some(l)) => report.check(
            "outpost-agent infer on the verified model",
            *d as i64 == l,
            &format!("predicted digit {d} (true label {l}), path {path}"),
        ),
        _ => report.check(
            "outpost-agent infer on the verified model",
            false,
            &format!("{} {}", last_line(&r.stdout), r.stderr),
        ),
    }

    println!("\n4. director: assign releases per device (Uptane split)");
    let root1_bytes = std::fs::read(&root1)?;
    let mut view = device_view(&root1_bytes, &repo)?;
    let director_key = repo.load_key("director")?;
    let slot = |e: &crate::repo::ReleaseEntry| SlotTarget {
        path: e.path.clone(),
        length: e.target.length,
        hashes: e.target.hashes.clone(),
        extra: Default::default(),
    };
    let sign = |device: &str, counter: u64, expires: UtcTime, target: SlotTarget| {
        let mut a = Assignment::new(device, counter, expires);
        a.targets.insert("digits-cnn".into(), target);
        director::sign_assignment(&a, &[&director_key])
    };
    let in_a_day = now().plus_seconds(86_400);
    let good = sign("device-1", 2, in_a_day, slot(new))?;
    let accepted = verify_for(&mut view, &good, "device-1", None);
    report.check(
        "assignment device-1 -> 1.1.0 accepted",
        accepted.is_ok(),
        &accepted
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default(),
    );
    let last: Option<CounterState> = accepted.ok().map(|a| a.state);
    let mut refused = |what: &str, bytes: Vec<u8>, device: &str| {
        let r = verify_for(&mut view, &bytes, device, last.as_ref());
        let detail = r
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default();
        report.check(what, r.is_err(), &detail);
    };
    let mut wrong_len = slot(new);
    wrong_len.length += 1;
    refused(
        "attack: assignment whose length differs from the signed target",
        sign("device-1", 3, in_a_day, wrong_len)?,
        "device-1",
    );
    let mut unsigned = slot(new);
    unsigned.path = "digits-cnn/6.6.6/evil.onnx".into();
    refused(
        "attack: assignment to a target no operator signed",
        sign("device-1", 3, in_a_day, unsigned)?,
        "device-1",
    );
    refused(
        "attack: replay of an older assignment (counter 1 < 2)",
        sign("device-1", 1, in_a_day, slot(old))?,
        "device-1",
    );
    refused(
        "attack: another device's assignment",
        sign("device-2", 3, in_a_day, slot(old))?,
        "device-1",
    );
    refused(
        "attack: expired assignment",
        sign("device-1", 3, now().plus_seconds(-60), slot(old))?,
        "device-1",
    );

    println!("\n5. attacks on the transport (a fresh device-2 and device-1 refreshing)");
    let hashed = |e: &crate::repo::ReleaseEntry| {
        let (dir, name) = e.path.rsplit_once('/').expect("model/version/file");
        repo.targets_dir()
            .join(dir)
            .join(format!("{}.{name}", e.target.hashes["sha256"]))
    };
    let served = hashed(new);
    let original = std::fs::read(&served)?;
    let mut evil = original.clone();
    let mid = evil.len() / 2;
    evil[mid] ^= 0x55;
    std::fs::write(&served, &evil)?;
    let dev2 = work.join("device-2");
    let (dev2_meta, dev2_targets) = (dev2.join("metadata"), dev2.join("targets"));
    std::fs::create_dir_all(&dev2_meta)?;
    client(&dev2_meta, &["init", root1.to_str().context("utf-8 path")?])?;
    let r = download(&dev2_meta, &dev2_targets, &new.path)?;
    let nothing_stored = !dev2_targets.join(new.path.replace('/', "%2F")).exists();
    report.check(
        "attack: model bytes modified in transit -> refused, nothing stored",
        !r.ok && nothing_stored,
        last_line(&r.stderr),
    );
    std::fs::write(&served, &original)?;

    let ts_path = repo.metadata_dir().join("timestamp.json");
    let good_ts = std::fs::read(&ts_path)?;
    let env = Envelope::from_bytes("timestamp", &good_ts, 1 << 20)?;
    let mut ts: Timestamp = env.parse_signed()?;
    ts.version += 1;
    ts.expires = now().plus_seconds(-3600);
    let timestamp_key = repo.load_key("timestamp")?;
    let mut frozen = Envelope::new(&ts)?;
    frozen.sign(&timestamp_key)?;
    std::fs::write(&ts_path, frozen.to_bytes())?;
    let r = client(&dev_meta, &["--metadata-url", &meta_url, "refresh"])?;
    report.check(
        "attack: freeze (expired timestamp) -> refused",
        !r.ok,
        last_line(&r.stderr),
    );

    repo.refresh_online(now())?;
    repo.refresh_online(now())?;
    let r = client(&dev_meta, &["--metadata-url", &meta_url, "refresh"])?;
    report.check(
        "server re-signs timestamp: device refreshes",
        r.ok,
        &r.stderr,
    );
    let newest_ts = std::fs::read(&ts_path)?;
    std::fs::write(&ts_path, &good_ts)?;
    let r = client(&dev_meta, &["--metadata-url", &meta_url, "refresh"])?;
    report.check(
        "attack: rollback to an older timestamp -> refused",
        !r.ok && r.stderr.contains("rollback"),
        last_line(&r.stderr),
    );
    std::fs::write(&ts_path, &newest_ts)?;

    println!(
        "\n6. operator: revoke {} {}",
        old.release.model, old.release.version
    );
    repo.revoke_release(&old.release.model, &old.release.version, now())?;
    let r = client(&dev_meta, &["--metadata-url", &meta_url, "refresh"])?;
    report.check(
        "device refreshes to the new targets metadata",
        r.ok,
        &r.stderr,
    );
    let r = download(&dev_meta, &dev.join("targets-old"), &old.path)?;
    report.check(
        "revoked release is no longer downloadable",
        !r.ok && r.stderr.contains("not listed") && !r.stderr.contains("rollback"),
        last_line(&r.stderr),
    );
    let mut view = device_view(&root1_bytes, &repo)?;
    let r = verify_for(
        &mut view,
        &sign("device-1", 9, in_a_day, slot(old))?,
        "device-1",
        last.as_ref(),
    );
    report.check(
        "director assignment to the revoked release -> refused",
        r.is_err(),
        &r.err().map(|e| e.to_string()).unwrap_or_default(),
    );

    drop(server);
    let failed: Vec<&String> = report
        .checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(w, _)| w)
        .collect();
    println!(
        "\nsummary: {} checks, {} passed, {} failed",
        report.checks.len(),
        report.checks.len() - failed.len(),
        failed.len()
    );
    for f in &failed {
        println!("  failed: {f}");
    }
    Ok(failed.is_empty())
}

fn sample_label(fx: &Path) -> Option<i64> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.join("index.json")).ok()?).ok()?;
    let samples = index.get("samples")?;
    // The generator records the true label of each single-sample file.
    for key in ["sample_image_0", "sample_image_0.npy"] {
        if let Some(l) = samples.get(key).and_then(|s| s.get("label")) {
            return l.as_i64();
        }
    }
    samples
        .as_array()?
        .iter()
        .find(|s| {
            s.get("file")
                .and_then(|f| f.as_str())
                .is_some_and(|f| f.contains("sample_image_0"))
        })?
        .get("label")?
        .as_i64()
}

/// A temporary directory removed on drop (std only).
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let mut bytes = [0u8; 8];
        crate::keys::random_bytes(&mut bytes);
        let path = std::env::temp_dir().join(format!("outpost-demo-{}", hex::encode(bytes)));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

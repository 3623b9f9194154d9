//! The trust part of the demo: an operator creates an image repository and signs two
//! releases of a real model; the repository is served over HTTP on loopback; a device
//! (the real `outpost-tuf-client` process, then `outpost-agent infer`) fetches, verifies
//! and runs the model; the director assigns it; then the attacks TUF and the director
//! stop are played and each one must be refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use outpost_protocol::director::{self, Assignment, CounterState, SlotTarget};
use outpost_protocol::release::ModelRelease;
use outpost_protocol::tuf::metadata::{Envelope, Timestamp};
use outpost_protocol::tuf::{
    FetchError, MetadataStore, Remote, StoreError, Updater, UpdaterConfig, UtcTime,
};

use super::{Report, now};
use crate::keys::SealCost;
use crate::repo::{Expiries, InitOptions, Repo};
use crate::static_http::StaticServer;

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

/// Runs the trust checks in `work`, adding each to `report`.
pub(super) fn run_trust(
    work: &Path,
    fx: &Path,
    tuf_client: &Path,
    agent: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(work)?;

    println!("\ntrust 1. operator: create the image repository and sign two releases");
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

    println!("\ntrust 2. server: serve the repository on loopback");
    let server = StaticServer::start(&repo.metadata_dir(), &repo.targets_dir())?;
    let (meta_url, targets_url) = (server.metadata_url(), server.targets_url());
    println!("  metadata {meta_url}\n  targets  {targets_url}");

    println!(
        "\ntrust 3. device-1: trust root v1, refresh, download {}, run it",
        new.path
    );
    let dev = work.join("device-1");
    let (dev_meta, dev_targets) = (dev.join("metadata"), dev.join("targets"));
    std::fs::create_dir_all(&dev_meta)?;
    let root1 = repo.metadata_dir().join("1.root.json");
    let client = |meta: &Path, args: &[&str]| -> anyhow::Result<Run> {
        let mut all = vec!["--metadata-dir", meta.to_str().context("utf-8 path")?];
        all.extend_from_slice(args);
        run(tuf_client, &all)
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
        agent,
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

    println!("\ntrust 4. director: assign releases per device (Uptane split)");
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

    println!("\ntrust 5. attacks on the transport (a fresh device-2 and device-1 refreshing)");
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
        "\ntrust 6. operator: revoke {} {}",
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
    Ok(())
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

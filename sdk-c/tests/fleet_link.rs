//! The C SDK's fleet link against a real server: `outpostctl repo init` and `release
//! sign`, `outpost-server serve` with its embedded broker on port 0, `devices add`,
//! `devices bundle` and `assign`, then `tests/c/fleet_test.c` (built with ASan + UBSan
//! against the freshly built `liboutpost`) opens the bundle's `agent.toml`, starts the
//! link, and checks the callbacks, the delivered model's outputs and a clean stop.
//!
//! The binaries are found next to this test's `deps/` directory, where `cargo test
//! --workspace` builds them (the test fails, not skips, without them).

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outpost_agent::npy;
use outpost_agent::runtime::HostTensor;
use outpost_protocol::bundle::AgentConfig;

const MODEL: &str = "digits";
const DEVICE: &str = "sdk-c-dev";
const SAMPLES: usize = 40;
const WAIT: Duration = Duration::from_secs(60);

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    manifest_dir().join("../tests/fixtures/models")
}

/// `$CARGO_TARGET_DIR/<profile>`: the library and the workspace's binaries.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

fn bin(name: &str) -> PathBuf {
    let p = profile_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the binaries first (`cargo test --workspace`, or `cargo build \
         -p outpost-server --bins` before `cargo test -p outpost-sdk-c`)",
        p.display()
    );
    p
}

fn check(cmd: &mut Command) -> String {
    let out: Output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A running `outpost-server serve` (killed on drop).
struct Server {
    child: Child,
    url: String,
    mqtt_port: u16,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(data: &Path, repo: &Path) -> Server {
        let mut child = Command::new(bin("outpost-server"))
            .arg("serve")
            .arg("--data")
            .arg(data)
            .arg("--import-repo")
            .arg(repo)
            .args(["--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("outpost-server runs");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let (mut url, mut mqtt_port) = (None, None);
        while url.is_none() || mqtt_port.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(e) => {
                    let _ = child.kill();
                    panic!("outpost-server did not print its addresses: {e}");
                }
            };
            let Some(rest) = line.strip_prefix("outpost-server: ") else {
                continue;
            };
            if rest.starts_with("http://") {
                url = Some(rest.to_owned());
            } else if let Some(addr) = rest.strip_prefix("mqtt://") {
                let port = addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
                mqtt_port = Some(port.expect("mqtt://HOST:PORT"));
            }
        }
        let token = std::fs::read_to_string(data.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_owned();
        Server {
            child,
            url: url.unwrap_or_default(),
            mqtt_port: mqtt_port.unwrap_or_default(),
            token,
        }
    }

    fn ctl(&self, args: &[&str]) -> String {
        check(
            Command::new(bin("outpostctl"))
                .args(args)
                .env("OUTPOST_SERVER", &self.url)
                .env("OUTPOST_TOKEN", &self.token)
                .env_remove("OUTPOST_KEY_PASSPHRASE"),
        )
    }
}

fn ctl_offline(args: &[&str]) -> String {
    check(
        Command::new(bin("outpostctl"))
            .args(args)
            .env_remove("OUTPOST_KEY_PASSPHRASE"),
    )
}

/// The first `n` rows of a fixture `.npy`, as raw little-endian bytes.
fn rows(name: &str, n: usize) -> Vec<u8> {
    let t: HostTensor = npy::read(&std::fs::read(fixtures().join(name)).unwrap()).unwrap();
    let row = t.data.len() / t.shape[0];
    t.data[..n * row].to_vec()
}

/// gcc, C99, every warning an error, ASan + UBSan, against the shared library.
fn build_asan(src: &Path, exe: &Path, tmp: &Path) {
    let lib = tmp.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    // Beside this test binary in <profile>/deps: `cargo test` builds the cdylib there and
    // does not copy it up to <profile>/ as `cargo build` does.
    let so = std::env::current_exe()
        .expect("test binary path")
        .with_file_name("liboutpost.so");
    assert!(so.exists(), "{} missing", so.display());
    for name in ["liboutpost.so", "liboutpost.so.0"] {
        std::os::unix::fs::symlink(&so, lib.join(name)).unwrap();
    }
    check(
        Command::new("gcc")
            .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-g"])
            .args([
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer",
            ])
            .arg("-I")
            .arg(manifest_dir().join("include"))
            .arg(src)
            .arg(format!("-L{}", lib.display()))
            .arg("-loutpost")
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .args(["-lpthread", "-lm", "-o"])
            .arg(exe),
    );
}

#[test]
fn c_app_receives_an_assigned_model_over_the_fleet_link_under_sanitizers() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let repo = t.join("repo");
    let repo_s = repo.to_str().unwrap();
    ctl_offline(&["repo", "init", "--dir", repo_s]);
    let model_file = fixtures().join("cnn_a.onnx");
    ctl_offline(&[
        "release",
        "sign",
        model_file.to_str().unwrap(),
        "--repo",
        repo_s,
        "--model",
        MODEL,
        "--version",
        "1.0",
    ]);
    let server = Server::start(&t.join("server"), &repo);

    server.ctl(&["devices", "add", "--id", DEVICE]);
    let bundle = t.join("bundle");
    let data = t.join("device-data");
    server.ctl(&[
        "devices",
        "bundle",
        "--id",
        DEVICE,
        "--out",
        bundle.to_str().unwrap(),
        "--broker-url",
        &format!("mqtt://127.0.0.1:{}", server.mqtt_port),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let config = bundle.join("agent.toml");
    let mut cfg = AgentConfig::from_toml(&std::fs::read_to_string(&config).unwrap()).unwrap();
    // A short probation so that COMMITTED comes within the test's wait.
    cfg.update.probation_secs = 1;
    cfg.broker.max_backoff_secs = 2;
    std::fs::write(&config, cfg.to_toml()).unwrap();
    let assigned = server.ctl(&[
        "assign",
        "--model",
        MODEL,
        "--version",
        "1.0",
        "--device",
        DEVICE,
    ]);
    assert!(assigned.contains(DEVICE), "assign printed: {assigned}");

    let bins = t.join("bin");
    std::fs::create_dir_all(&bins).unwrap();
    std::fs::write(bins.join("image.bin"), rows("heldout_image.npy", SAMPLES)).unwrap();
    std::fs::write(bins.join("cnn_ref.bin"), rows("cnn_a.ort.npy", SAMPLES)).unwrap();
    let other = t.join("plain-data");
    // What the device downloads for a first install: the server keeps a zstd copy of the
    // full model when it is smaller (docs/delta.md, "Artifact choice"), and the progress
    // callback counts the artifact's bytes.
    let model = std::fs::read(&model_file).unwrap();
    let compressed = outpost_protocol::delta::compress_full(&model).unwrap();
    let model_len = compressed.len().min(model.len());

    let exe = t.join("fleet_test");
    build_asan(&manifest_dir().join("tests/c/fleet_test.c"), &exe, t);
    let out = check(
        Command::new(&exe)
            .arg(&config)
            .arg(&other)
            .arg(&bins)
            .arg(SAMPLES.to_string())
            .arg(MODEL)
            .arg(model_len.to_string())
            .env(
                "ASAN_OPTIONS",
                "detect_leaks=1:abort_on_error=0:exitcode=23",
            )
            .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1"),
    );
    assert!(out.contains("fleet link: ok"), "{out}");

    // The server saw the device report the release active (status reports go out from
    // the link thread at each transition, a second before the commit).
    let listed = server.ctl(&["devices", "list"]);
    let line = listed.lines().find(|l| l.starts_with(DEVICE));
    assert!(
        line.is_some_and(|l| l.contains(&format!("{MODEL}={MODEL}/1.0/cnn_a.onnx"))),
        "{listed}"
    );
}

//! The real binaries: `outpost-server serve --import-repo` and the `outpostctl`
//! provisioning, release and assignment commands against it.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctl(args: &[&str], server: &str, token: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpostctl"))
        .args(args)
        .env("OUTPOST_SERVER", server)
        .env("OUTPOST_TOKEN", token)
        .env_remove("OUTPOST_KEY_PASSPHRASE")
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn operator_provisions_releases_and_assigns_with_outpostctl() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    ok(ctl(
        &["repo", "init", "--dir", repo.to_str().unwrap()],
        "",
        "",
    ));
    let model = fixtures.join("cnn_a.onnx");
    ok(ctl(
        &[
            "release",
            "sign",
            model.to_str().unwrap(),
            "--repo",
            repo.to_str().unwrap(),
            "--model",
            "digits",
            "--version",
            "1.0",
        ],
        "",
        "",
    ));

    let data = dir.path().join("data");
    let passwd = dir.path().join("passwd");
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost-server"))
        .args(["serve", "--data", data.to_str().unwrap(), "--import-repo"])
        .arg(&repo)
        .arg("--mosquitto-passwd-file")
        .arg(&passwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _server = Server(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first.strip_prefix("outpost-server: ").unwrap().to_owned();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let token = token.trim();

    // The server holds only the online keys.
    let mut keys: Vec<String> = std::fs::read_dir(data.join("repo/keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    keys.sort();
    assert_eq!(keys, ["director.json", "snapshot.json", "timestamp.json"]);

    // The imported release is served; a new one is pushed.
    let model_ft = fixtures.join("cnn_a_ft.onnx");
    ok(ctl(
        &[
            "release",
            "sign",
            model_ft.to_str().unwrap(),
            "--repo",
            repo.to_str().unwrap(),
            "--model",
            "digits",
            "--version",
            "1.1",
        ],
        "",
        "",
    ));
    let out = ok(ctl(
        &[
            "release",
            "push",
            "--repo",
            repo.to_str().unwrap(),
            "--model",
            "digits",
            "--version",
            "1.1",
        ],
        &url,
        token,
    ));
    assert!(out.contains("uploaded digits 1.1"), "{out}");
    assert!(out.contains("delta"), "{out}");

    ok(ctl(
        &["devices", "add", "--id", "pi-7", "--tag", "site=lab"],
        &url,
        token,
    ));
    let bundle = dir.path().join("bundle");
    ok(ctl(
        &[
            "devices",
            "bundle",
            "--id",
            "pi-7",
            "--out",
            bundle.to_str().unwrap(),
            "--broker-url",
            "mqtt://fleet.example:1883",
        ],
        &url,
        token,
    ));
    use std::os::unix::fs::PermissionsExt as _;
    let creds = bundle.join("credentials");
    assert_eq!(
        std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let password = std::fs::read_to_string(&creds).unwrap();
    let line = std::fs::read_to_string(&passwd).unwrap();
    let hash = line
        .lines()
        .find_map(|l| l.strip_prefix("pi-7:"))
        .unwrap()
        .to_owned();
    assert!(outpost_server::server::auth::mosquitto_verify(
        password.trim(),
        &hash
    ));
    let cfg = outpost_protocol::bundle::AgentConfig::from_toml(
        &std::fs::read_to_string(bundle.join("agent.toml")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg.device_id, "pi-7");
    outpost_protocol::tuf::TrustedSet::new(
        &std::fs::read(bundle.join("root.json")).unwrap(),
        outpost_protocol::tuf::UtcTime::from_system_time(std::time::SystemTime::now()),
    )
    .unwrap();

    let out = ok(ctl(
        &[
            "assign",
            "--model",
            "digits",
            "--version",
            "1.1",
            "--tag",
            "site=lab",
        ],
        &url,
        token,
    ));
    assert!(
        out.contains("assigned digits 1.1 to pi-7 (counter 1)"),
        "{out}"
    );
    let out = ok(ctl(&["devices", "list"], &url, token));
    assert!(
        out.contains("pi-7") && out.contains("digits=digits/1.1/cnn_a_ft.onnx"),
        "{out}"
    );

    // Without a token the CLI fails with the server's message.
    let o = ctl(&["devices", "list"], &url, "wrong");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("401"));
}

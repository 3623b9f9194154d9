//! Devices on the embedded broker's TLS listener (`serve --mqtts --tls-ca`): the bundle
//! gets an `mqtts://` URL and the listener's CA, an update goes through, and the link
//! refuses what a network attacker or a misconfiguration puts in its way: a certificate
//! from another CA (an interceptor), a certificate for another name, a plain listener
//! behind an `mqtts://` URL and a TLS listener behind an `mqtt://` URL. Certificates
//! are made by the `openssl` CLI in each test's temp dir.

use std::ffi::OsString;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use outpost_protocol::bundle::AgentConfig;

use crate::support::{Broker, Device, Fleet, Target};

/// The DNS name (besides IP 127.0.0.1) in the fleet's server certificate.
const SERVER_NAME: &str = "fleet.test";

/// A certificate and its key, PEM files.
struct Pem {
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(cmd: &mut Command) {
    let o = cmd
        .output()
        .expect("openssl (Debian package `openssl`) runs");
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A CA (P-256, self-signed).
fn make_ca(dir: &Path, name: &str) -> Pem {
    let conf = dir.join(format!("{name}.cnf"));
    std::fs::write(
        &conf,
        format!(
            "[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n\
             [dn]\nCN = {name}\n\
             [ext]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign\n\
             subjectKeyIdentifier = hash\n"
        ),
    )
    .unwrap();
    let pem = Pem {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    openssl(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .arg("-config")
            .arg(&conf)
            .arg("-keyout")
            .arg(&pem.key)
            .arg("-out")
            .arg(&pem.cert),
    );
    pem
}

/// A server certificate for `san` (e.g. `IP:127.0.0.1,DNS:fleet.test`) signed by `ca`.
fn make_leaf(dir: &Path, name: &str, san: &str, ca: &Pem) -> Pem {
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!(
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = serverAuth\nsubjectAltName = {san}\n"
        ),
    )
    .unwrap();
    let csr = dir.join(format!("{name}.csr"));
    let pem = Pem {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    openssl(
        Command::new("openssl")
            .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-subj", &format!("/CN={name}")])
            .arg("-keyout")
            .arg(&pem.key)
            .arg("-out")
            .arg(&csr),
    );
    openssl(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-set_serial"])
            .arg(format!("{}", serial()))
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&ca.cert)
            .arg("-CAkey")
            .arg(&ca.key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&pem.cert),
    );
    pem
}

fn serial() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1
}

/// A fleet whose embedded broker has a TLS listener with a certificate from `ca` for
/// 127.0.0.1 and [`SERVER_NAME`]; returns it, release 1.0 and the TLS port.
fn tls_fleet(pki: &Path, ca: &Pem) -> (Fleet, Target, u16) {
    let leaf = make_leaf(
        pki,
        "server",
        &format!("IP:127.0.0.1,DNS:{SERVER_NAME}"),
        ca,
    );
    let args: Vec<OsString> = vec![
        "--mqtts".into(),
        "127.0.0.1:0".into(),
        "--tls-cert".into(),
        leaf.cert.into(),
        "--tls-key".into(),
        leaf.key.into(),
        "--tls-ca".into(),
        ca.cert.clone().into(),
    ];
    let (f, v1) = Fleet::start_with(Broker::Embedded, &args, "");
    let port = f.mqtts_port.expect("the TLS listener is bound");
    (f, v1, port)
}

/// One device bundled with the server's defaults (no `--broker-url`): the TLS listener
/// at the API's host, and the listener's CA as `ca.pem`.
fn tls_device(f: &Fleet, id: &str, port: u16, ca: &Pem) -> Device {
    let want = format!("mqtts://127.0.0.1:{port}");
    let d = f
        .add_devices_with(&[id], &[], |c| {
            assert_eq!(c.broker.url, want);
            assert_eq!(c.broker.ca_file.as_deref(), Some(Path::new("ca.pem")));
        })
        .remove(0);
    assert_eq!(
        std::fs::read(d.bundle.join("ca.pem")).unwrap(),
        std::fs::read(&ca.cert).unwrap(),
        "the bundle's ca.pem is not the listener's CA"
    );
    d
}

/// Rewrites the device's agent.toml.
fn reconfigure(d: &Device, edit: impl FnOnce(&mut AgentConfig)) {
    let mut cfg = AgentConfig::from_toml(&std::fs::read_to_string(&d.config).unwrap()).unwrap();
    edit(&mut cfg);
    cfg.validate().unwrap();
    std::fs::write(&d.config, cfg.to_toml()).unwrap();
}

/// Starts the agent, waits for its link to log `needle` (a refused connection), checks
/// that it still has `t` active and stops it: it keeps running, serving its model, and
/// exits cleanly.
fn refused_keeps_model(f: &Fleet, d: &mut Device, t: &Target, needle: &str) {
    let mark = f.log.mark();
    d.start();
    f.log.wait_line(mark, &d.id, needle);
    let s = d.status().unwrap();
    d.stop();
    assert_eq!(
        d.check_store(&[t]).as_deref(),
        Some(t.sha256.as_str()),
        "status: {s}"
    );
}

#[test]
fn device_updates_over_tls_and_refuses_a_certificate_for_another_name() {
    let pki = tempfile::tempdir().unwrap();
    let ca = make_ca(pki.path(), "fleet-ca");
    let (f, v1, port) = tls_fleet(pki.path(), &ca);
    let mut d = tls_device(&f, "t1", port, &ca);
    d.start();
    let c = f.assign(&v1, &["t1"]);
    f.wait_converged("t1", &v1, c["t1"]);
    let v2 = f.sign("cnn_a_ft.onnx", "1.1");
    f.push(&v2);
    let c = f.assign(&v2, &["t1"]);
    let s = f.wait_converged("t1", &v2, c["t1"]);
    assert!(s["last_error"].is_null(), "{s}");
    d.stop();

    // Good: reached by IP address, checked against the certificate's DNS name.
    reconfigure(&d, |c| c.broker.tls_server_name = Some(SERVER_NAME.into()));
    d.start();
    let v3 = f.sign("cnn_a.onnx", "1.2");
    f.push(&v3);
    let c = f.assign(&v3, &["t1"]);
    f.wait_converged("t1", &v3, c["t1"]);
    d.stop();

    // Bad: the certificate does not carry the name the device expects.
    reconfigure(&d, |c| c.broker.tls_server_name = Some("other.test".into()));
    refused_keeps_model(&f, &mut d, &v3, "not valid for the name");
}

#[test]
fn refuses_mitm_certificate_from_another_ca_and_keeps_serving_its_model() {
    let pki = tempfile::tempdir().unwrap();
    let ca = make_ca(pki.path(), "fleet-ca");
    let (f, v1, port) = tls_fleet(pki.path(), &ca);
    let mut d = tls_device(&f, "m1", port, &ca);
    d.start();
    let c = f.assign(&v1, &["m1"]);
    f.wait_converged("m1", &v1, c["m1"]);
    d.stop();

    // The interceptor holds a certificate for the very address the device dials, from
    // a CA of its own.
    let evil_ca = make_ca(pki.path(), "evil-ca");
    let evil = make_leaf(
        pki.path(),
        "evil",
        &format!("IP:127.0.0.1,DNS:{SERVER_NAME}"),
        &evil_ca,
    );
    let mitm = TlsServer::start(&evil);
    reconfigure(&d, |c| {
        c.broker.url = format!("mqtts://127.0.0.1:{}", mitm.port)
    });
    refused_keeps_model(&f, &mut d, &v1, "not signed by a CA in the CA file");
}

#[test]
fn plain_listener_on_mqtts_url_and_tls_listener_on_mqtt_url_fail_naming_tls() {
    let pki = tempfile::tempdir().unwrap();
    let ca = make_ca(pki.path(), "fleet-ca");
    let (f, _v1, port) = tls_fleet(pki.path(), &ca);
    let mut d = tls_device(&f, "p1", port, &ca);

    // The embedded broker's plain listener behind an mqtts:// URL.
    reconfigure(&d, |c| {
        c.broker.url = format!("mqtts://127.0.0.1:{}", f.broker_port);
    });
    let mark = f.log.mark();
    d.start();
    f.log.wait_line(mark, "p1", "TLS handshake with");
    f.log
        .wait_line(mark, "p1", "the broker URL must be mqtt://");
    d.stop();

    // The TLS listener behind an mqtt:// URL.
    reconfigure(&d, |c| {
        c.broker.url = format!("mqtt://127.0.0.1:{port}");
        c.broker.ca_file = None;
    });
    let mark = f.log.mark();
    d.start();
    f.log
        .wait_line(mark, "p1", "the broker URL must be mqtts://");
    d.stop();
}

#[test]
fn device_updates_over_tls_through_mosquitto_and_refuses_a_certificate_from_another_ca() {
    let pki = tempfile::tempdir().unwrap();
    let ca = make_ca(pki.path(), "fleet-ca");
    let leaf = make_leaf(
        pki.path(),
        "mosquitto",
        &format!("IP:127.0.0.1,DNS:{SERVER_NAME}"),
        &ca,
    );
    // The server stays on the plain loopback listener; devices use the TLS one.
    let tls_listener = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        ca.cert.display(),
        leaf.cert.display(),
        leaf.key.display()
    );
    let (f, v1) = Fleet::start_with(Broker::Mosquitto, &[], &tls_listener);
    let url = format!("mqtts://127.0.0.1:{}", f.mqtts_port.unwrap());
    let ca_file = ca.cert.to_str().unwrap();
    let mut d = f
        .add_devices_with(
            &["q1"],
            &["--broker-url", &url, "--ca-file", ca_file],
            |c| {
                assert_eq!(c.broker.ca_file.as_deref(), Some(Path::new("ca.pem")));
            },
        )
        .remove(0);
    d.start();
    let c = f.assign(&v1, &["q1"]);
    f.wait_converged("q1", &v1, c["q1"]);
    d.stop();

    // The device trusts another CA than the one that signed Mosquitto's certificate.
    let other = make_ca(pki.path(), "other-ca");
    std::fs::copy(&other.cert, d.bundle.join("ca.pem")).unwrap();
    refused_keeps_model(&f, &mut d, &v1, "not signed by a CA in the CA file");
}

/// `openssl s_server` with a certificate: a TLS endpoint that is not the fleet's.
struct TlsServer {
    child: Child,
    port: u16,
}

impl TlsServer {
    fn start(pem: &Pem) -> TlsServer {
        let mut child = Command::new("openssl")
            .args(["s_server", "-accept", "127.0.0.1:0"])
            .arg("-cert")
            .arg(&pem.cert)
            .arg("-key")
            .arg(&pem.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server runs");
        // Once it listens on port 0 it prints `ACCEPT 127.0.0.1:PORT`.
        let out = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(out).lines();
        let port = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("ACCEPT 127.0.0.1:")?.parse().ok())
            .expect("openssl s_server prints the port it listens on");
        std::thread::spawn(move || lines.for_each(drop));
        TlsServer { child, port }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

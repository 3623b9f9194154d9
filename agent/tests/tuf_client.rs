//! End-to-end tests of `outpost-tuf-client`, the TUF conformance client-under-test.
//!
//! Each test builds a repository in its own temp dir, serves it from a tiny HTTP server
//! on 127.0.0.1:0 that records every request path, runs the real binary and checks
//! exit codes, the files in the metadata and target dirs, and the request log.
//!
//! Repositories come from two places: `tests/fixtures/tuf/<scheme>/` (made by
//! python-tuf, see `generate.py` there: ecdsa, rsa-pss and ed25519 keys), and
//! repositories built here with the protocol crate's ed25519 signing helpers.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Serves files under `root` over HTTP/1.1 (`Connection: close`), logging each
/// request path. Percent-escapes in the path are decoded; `..` segments get 404.
struct Server {
    addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(root: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let root = root.to_path_buf();
        let thread = {
            let log = Arc::clone(&log);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        serve_one(stream, &root, &log);
                    }
                }
            })
        };
        Self {
            addr,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path)
    }

    /// Request paths so far, in order.
    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(stream: TcpStream, root: &Path, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => break,
            Ok(_) if header == "\r\n" || header == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_owned();
    log.lock().unwrap().push(path.clone());
    let body = resolve(root, &path).and_then(|p| std::fs::read(p).ok());
    let mut stream = &stream;
    let _ = match body {
        Some(body) => stream
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .and_then(|()| stream.write_all(&body)),
        None => stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    };
    let _ = stream.flush();
}

fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    for segment in url_path.trim_start_matches('/').split('/') {
        let segment = percent_decode(segment)?;
        if segment.is_empty() || segment == "." || segment == ".." || segment.contains('/') {
            return None;
        }
        path.push(segment);
    }
    Some(path)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A client working dir: `metadata/` and `targets/`, like the suite's ClientRunner.
struct Client {
    _tmp: tempfile::TempDir,
    metadata_dir: PathBuf,
    target_dir: PathBuf,
    root_file: PathBuf,
}

/// Outcome of one client run.
struct Run {
    code: i32,
    stderr: String,
}

impl Client {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let metadata_dir = tmp.path().join("metadata");
        let target_dir = tmp.path().join("targets");
        std::fs::create_dir(&metadata_dir).unwrap();
        std::fs::create_dir(&target_dir).unwrap();
        let root_file = tmp.path().join("initial_root.json");
        Self {
            _tmp: tmp,
            metadata_dir,
            target_dir,
            root_file,
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_outpost-tuf-client"))
            .args(args)
            .output()
            .expect("spawn outpost-tuf-client");
        Run {
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn init(&self, trusted_root: &[u8]) -> Run {
        std::fs::write(&self.root_file, trusted_root).unwrap();
        self.run(&[
            "--metadata-dir",
            self.metadata_dir.to_str().unwrap(),
            "init",
            self.root_file.to_str().unwrap(),
        ])
    }

    fn refresh(&self, metadata_url: &str) -> Run {
        self.run(&[
            "--metadata-dir",
            self.metadata_dir.to_str().unwrap(),
            "--metadata-url",
            metadata_url,
            "refresh",
        ])
    }

    fn download(&self, metadata_url: &str, targets_url: &str, names: &[&str]) -> Run {
        let mut args = vec![
            "--metadata-dir",
            self.metadata_dir.to_str().unwrap(),
            "--metadata-url",
            metadata_url,
            "--target-base-url",
            targets_url,
            "--target-dir",
            self.target_dir.to_str().unwrap(),
        ];
        for name in names {
            args.push("--target-name");
            args.push(name);
        }
        args.push("download");
        self.run(&args)
    }

    /// Sorted file names in the metadata dir.
    fn metadata_files(&self) -> Vec<String> {
        list(&self.metadata_dir)
    }

    /// Sorted file names in the target dir.
    fn target_files(&self) -> Vec<String> {
        list(&self.target_dir)
    }

    fn metadata(&self, role: &str) -> Vec<u8> {
        std::fs::read(self.metadata_dir.join(format!("{role}.json"))).unwrap()
    }

    fn version(&self, role: &str) -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&self.metadata(role)).unwrap();
        v["signed"]["version"].as_u64().unwrap()
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn fixture_dir(scheme: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tuf")
        .join(scheme)
}

mod interop {
    //! Repositories generated by python-tuf (tests/fixtures/tuf/generate.py).
    use super::*;

    const TARGET: &str = "models/classifier.bin";
    const TARGET_BYTES: &[u8] = b"outpost interop fixture: a tiny stand-in for a model file\n";

    fn init_refresh_download(scheme: &str) {
        let dir = fixture_dir(scheme);
        let server = Server::start(&dir);
        let client = Client::new();
        let root_v1 = std::fs::read(dir.join("metadata/1.root.json")).unwrap();
        let md = server.url("metadata/");
        let tg = server.url("targets/");

        let run = client.init(&root_v1);
        assert_eq!(run.code, 0, "init: {}", run.stderr);
        assert!(
            server.requests().is_empty(),
            "init must not touch the network"
        );

        let run = client.refresh(&md);
        assert_eq!(run.code, 0, "refresh: {}", run.stderr);
        assert_eq!(
            server.requests(),
            [
                "/metadata/2.root.json",
                "/metadata/3.root.json",
                "/metadata/timestamp.json",
                "/metadata/1.snapshot.json",
                "/metadata/1.targets.json",
            ]
        );
        assert_eq!(
            client.metadata("root"),
            std::fs::read(dir.join("metadata/2.root.json")).unwrap(),
            "rotated root must be stored byte for byte"
        );
        assert_eq!(
            client.metadata_files(),
            [
                "root.json",
                "snapshot.json",
                "targets.json",
                "timestamp.json"
            ]
        );

        server.clear();
        let run = client.download(&md, &tg, &[TARGET]);
        assert_eq!(run.code, 0, "download: {}", run.stderr);
        let hash = "90c593fb34d85882f5a505777bf62c13968e641ab5cc77e64fc81f44788d983c";
        assert_eq!(
            server.requests(),
            [
                "/metadata/3.root.json".to_owned(),
                "/metadata/timestamp.json".to_owned(),
                "/metadata/1.models.json".to_owned(),
                format!("/targets/models/{hash}.classifier.bin"),
            ]
        );
        assert_eq!(client.target_files(), ["models%2Fclassifier.bin"]);
        assert_eq!(
            std::fs::read(client.target_dir.join("models%2Fclassifier.bin")).unwrap(),
            TARGET_BYTES
        );
        assert!(client.metadata_files().contains(&"models.json".to_owned()));
    }

    #[test]
    fn python_tuf_ecdsa_repository_refreshes_and_downloads() {
        init_refresh_download("ecdsa");
    }

    #[test]
    fn python_tuf_rsa_pss_repository_refreshes_and_downloads() {
        init_refresh_download("rsa-pss");
    }

    #[test]
    fn python_tuf_ed25519_repository_refreshes_and_downloads() {
        init_refresh_download("ed25519");
    }
}

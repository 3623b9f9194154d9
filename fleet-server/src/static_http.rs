//! A minimal static-file HTTP server for serving a TUF repository (metadata and targets)
//! on loopback: demos and tests. Not the fleet API.
//!
//! `GET /metadata/<file>` and `GET /targets/<path>` map to two directories; anything
//! else, any `..` segment, and any missing file is a 404. Each request is logged so that
//! tests can assert on what a client fetched. One thread accepts; one short-lived thread
//! per connection serves it. Dropping the [`StaticServer`] stops it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A running server.
#[derive(Debug)]
pub struct StaticServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl StaticServer {
    /// Serves `metadata_dir` under `/metadata/` and `targets_dir` under `/targets/` on
    /// 127.0.0.1 at a free port.
    pub fn start(metadata_dir: &Path, targets_dir: &Path) -> std::io::Result<StaticServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(false)?;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let roots = Arc::new((metadata_dir.to_owned(), targets_dir.to_owned()));
        let thread = {
            let stop = stop.clone();
            let log = log.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let roots = roots.clone();
                    let log = log.clone();
                    std::thread::spawn(move || {
                        let _ = serve(conn, &roots.0, &roots.1, &log);
                    });
                }
            })
        };
        Ok(StaticServer {
            addr,
            stop,
            log,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT/metadata/`
    pub fn metadata_url(&self) -> String {
        format!("http://{}/metadata/", self.addr)
    }

    /// `http://127.0.0.1:PORT/targets/`
    pub fn targets_url(&self) -> String {
        format!("http://{}/targets/", self.addr)
    }

    /// Request paths served so far (with their status), oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn resolve(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut out = root.to_owned();
    for seg in rel.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." || seg.contains('\\') {
            return None;
        }
        out.push(seg);
    }
    Some(out)
}

fn serve(
    conn: TcpStream,
    metadata: &Path,
    targets: &Path,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Drain headers.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let file = if method != "GET" {
        None
    } else if let Some(rest) = path.strip_prefix("/metadata/") {
        resolve(metadata, &percent_decode(rest))
    } else if let Some(rest) = path.strip_prefix("/targets/") {
        resolve(targets, &percent_decode(rest))
    } else {
        None
    };
    let body = file.and_then(|f| std::fs::read(f).ok());
    let mut out = conn;
    match body {
        Some(b) => {
            log.lock().expect("log lock").push(format!("200 {path}"));
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                b.len()
            )?;
            out.write_all(&b)?;
        }
        None => {
            log.lock().expect("log lock").push(format!("404 {path}"));
            out.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
        }
    }
    out.flush()
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h << 4) | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(addr: &str, path: &str) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf);
        let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body_at = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (status, buf[body_at..].to_vec())
    }

    #[test]
    fn serves_files_and_refuses_path_traversal() {
        let dir = tempfile::tempdir().unwrap();
        let (m, t) = (dir.path().join("m"), dir.path().join("t"));
        std::fs::create_dir_all(t.join("a")).unwrap();
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("root.json"), b"{}").unwrap();
        std::fs::write(t.join("a/x y.bin"), b"xyz").unwrap();
        std::fs::write(dir.path().join("secret"), b"no").unwrap();
        let server = StaticServer::start(&m, &t).unwrap();
        let addr = server.addr.to_string();
        assert_eq!(get(&addr, "/metadata/root.json"), (200, b"{}".to_vec()));
        assert_eq!(get(&addr, "/targets/a/x%20y.bin"), (200, b"xyz".to_vec()));
        assert_eq!(get(&addr, "/metadata/../secret").0, 404);
        assert_eq!(get(&addr, "/metadata/%2e%2e/secret").0, 404);
        assert_eq!(get(&addr, "/metadata/missing.json").0, 404);
        assert_eq!(server.requests().len(), 5);
    }
}

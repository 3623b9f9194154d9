//! `outpost-tuf-client`: the client-under-test for the public TUF conformance suite.
//!
//! A thin HTTP shell around the pure TUF client workflow in `outpost-protocol`:
//!
//! ```text
//! outpost-tuf-client --metadata-dir DIR init TRUSTED_ROOT
//! outpost-tuf-client --metadata-dir DIR --metadata-url URL refresh
//! outpost-tuf-client --metadata-dir DIR --metadata-url URL --target-name PATH \
//!     [--target-name PATH ...] --target-base-url URL --target-dir DIR download
//! ```
//!
//! Exit code 0 on full success, 1 on any failure (one line on stderr). Trusted metadata
//! lives in the metadata dir under non-versioned names (`root.json`, `ROLE.json` with
//! the role name percent-encoded); targets are stored as `TARGET_DIR/quote(path)`.
//! `docs/conformance.md` lists the suite's expectations and how each is met.

use std::fs;
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// Caps for metadata whose length is not pinned by signed metadata (python-tuf's).
const ROOT_MAX_LEN: u64 = 512_000;
const TIMESTAMP_MAX_LEN: u64 = 16_384;
const SNAPSHOT_MAX_LEN: u64 = 2_000_000;
const TARGETS_MAX_LEN: u64 = 5_000_000;
/// Upper bound on root versions fetched in one refresh (python-tuf's default since 5.0).
const MAX_ROOT_ROTATIONS: u64 = 256;

#[derive(Debug, Parser)]
#[command(
    name = "outpost-tuf-client",
    version,
    about = "TUF client-under-test for the TUF conformance suite"
)]
struct Cli {
    /// Directory for trusted metadata (non-versioned file names).
    #[arg(long, value_name = "DIR")]
    metadata_dir: PathBuf,
    /// Base URL of the repository's metadata.
    #[arg(long, value_name = "URL")]
    metadata_url: Option<String>,
    /// TUF target path to download; repeat for several, processed in order.
    #[arg(long = "target-name", value_name = "PATH")]
    target_names: Vec<String>,
    /// Base URL of the repository's targets.
    #[arg(long, value_name = "URL")]
    target_base_url: Option<String>,
    /// Directory where verified targets are stored.
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trust TRUSTED_ROOT: check it is root metadata signed by its own root keys, store it.
    Init {
        /// File with the initial root.json.
        trusted_root: PathBuf,
    },
    /// Update top-level metadata following the TUF client workflow.
    Refresh,
    /// Refresh, then download and verify each --target-name into --target-dir.
    Download,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost-tuf-client: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let store = MetadataDir::new(cli.metadata_dir.clone());
    match cli.command {
        Command::Init { trusted_root } => {
            let bytes = fs::read(&trusted_root)
                .with_context(|| format!("reading {}", trusted_root.display()))?;
            tuf::init(&store, &bytes, now())
        }
        Command::Refresh => {
            let url = cli.metadata_url.context("refresh needs --metadata-url")?;
            let http = Http::new()?;
            tuf::refresh(&store, &http, &url, now())?;
            Ok(())
        }
        Command::Download => {
            let url = cli.metadata_url.context("download needs --metadata-url")?;
            let base = cli
                .target_base_url
                .context("download needs --target-base-url")?;
            let dir = cli.target_dir.context("download needs --target-dir")?;
            if cli.target_names.is_empty() {
                bail!("download needs at least one --target-name");
            }
            let http = Http::new()?;
            tuf::download(&store, &http, &url, &base, &dir, &cli.target_names, now())
        }
    }
}

/// Wall-clock time, read once per run (`faketime` intercepts this under the suite).
fn now() -> outpost_protocol::tuf::UtcTime {
    outpost_protocol::tuf::UtcTime::from_system_time(std::time::SystemTime::now())
}

/// Percent-encodes every byte outside `A-Z a-z 0-9 - . _ ~` and outside `keep`
/// (Python's `urllib.parse.quote(s, safe=keep)`, which python-tuf and the suite use).
fn quote(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `base` + `name`, with exactly one `/` between them.
fn join_url(base: &str, name: &str) -> String {
    if base.ends_with('/') {
        format!("{base}{name}")
    } else {
        format!("{base}/{name}")
    }
}

/// Transport failures, kept apart from TUF verification failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum FetchError {
    /// The server answered 404 (or another 4xx): the file does not exist.
    #[error("{url}: not found (HTTP {status})")]
    NotFound { url: String, status: u16 },
    /// Any other non-success status.
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    /// The body was longer than the cap.
    #[error("{url}: response exceeds {cap} bytes")]
    TooLarge { url: String, cap: u64 },
    /// Connection, protocol or timeout error.
    #[error("{url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: ureq::Error,
    },
    /// Reading the body failed.
    #[error("{url}: reading body: {source}")]
    Body {
        url: String,
        #[source]
        source: io::Error,
    },
}

/// Blocking HTTP GET with timeouts and a per-request length cap.
struct Http {
    agent: ureq::Agent,
}

impl Http {
    fn new() -> anyhow::Result<Self> {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_recv_body(Some(Duration::from_secs(60)))
            .build();
        Ok(Self {
            agent: config.into(),
        })
    }

    /// Fetches `url`, reading at most `cap + 1` bytes so that an oversize body is
    /// detected rather than truncated.
    fn get(&self, url: &str, cap: u64) -> Result<Vec<u8>, FetchError> {
        let mut resp = self
            .agent
            .get(url)
            .call()
            .map_err(|source| FetchError::Transport {
                url: url.to_owned(),
                source,
            })?;
        let status = resp.status().as_u16();
        if (400..500).contains(&status) {
            return Err(FetchError::NotFound {
                url: url.to_owned(),
                status,
            });
        }
        if !(200..300).contains(&status) {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status,
            });
        }
        let mut body = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(cap.saturating_add(1))
            .read_to_end(&mut body)
            .map_err(|source| FetchError::Body {
                url: url.to_owned(),
                source,
            })?;
        if u64::try_from(body.len()).unwrap_or(u64::MAX) > cap {
            return Err(FetchError::TooLarge {
                url: url.to_owned(),
                cap,
            });
        }
        Ok(body)
    }
}

/// Trusted metadata on disk: `DIR/quote(role).json`, written atomically.
struct MetadataDir {
    dir: PathBuf,
}

impl MetadataDir {
    fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{}.json", quote(role, b"")))
    }

    fn load(&self, role: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.path(role);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn store(&self, role: &str, bytes: &[u8]) -> anyhow::Result<()> {
        write_atomic(&self.path(role), bytes)
    }

    fn remove(&self, role: &str) -> anyhow::Result<()> {
        let path = self.path(role);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
}

/// Writes `bytes` to a temp file beside `path`, syncs it, and renames it over `path`,
/// so readers see either the old or the new content, never a partial file.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| -> io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

mod tuf {
    //! Glue between the pure workflow in `outpost_protocol::tuf` and HTTP + files.

    use super::*;
    use outpost_protocol::tuf::{
        FetchError as RemoteError, Limits, MetadataStore, Remote, StoreError, TrustedSet, Updater,
        UpdaterConfig, UtcTime,
    };

    fn config() -> UpdaterConfig {
        UpdaterConfig {
            limits: Limits {
                root: ROOT_MAX_LEN,
                timestamp: TIMESTAMP_MAX_LEN,
                snapshot: SNAPSHOT_MAX_LEN,
                targets: TARGETS_MAX_LEN,
            },
            max_root_rotations: MAX_ROOT_ROTATIONS,
            ..UpdaterConfig::default()
        }
    }

    /// The repository over HTTP: `METADATA_URL/[VERSION.]quote(ROLE).json` and
    /// `TARGET_BASE_URL/quote(remote path, keeping '/')`.
    struct HttpRemote<'a> {
        http: &'a Http,
        metadata_url: &'a str,
        target_base_url: Option<&'a str>,
    }

    impl Remote for HttpRemote<'_> {
        fn fetch_metadata(
            &mut self,
            role: &str,
            version: Option<u64>,
            max_len: u64,
        ) -> Result<Vec<u8>, RemoteError> {
            let role = quote(role, b"");
            let name = match version {
                Some(v) => format!("{v}.{role}.json"),
                None => format!("{role}.json"),
            };
            fetch(self.http, &join_url(self.metadata_url, &name), max_len)
        }

        fn fetch_target(
            &mut self,
            remote_path: &str,
            max_len: u64,
        ) -> Result<Vec<u8>, RemoteError> {
            let base = self
                .target_base_url
                .ok_or_else(|| RemoteError::Transport("no --target-base-url".into()))?;
            fetch(
                self.http,
                &join_url(base, &quote(remote_path, b"/")),
                max_len,
            )
        }
    }

    fn fetch(http: &Http, url: &str, max_len: u64) -> Result<Vec<u8>, RemoteError> {
        http.get(url, max_len).map_err(|e| match e {
            FetchError::NotFound { .. } => RemoteError::NotFound,
            FetchError::TooLarge { cap, .. } => RemoteError::TooLarge { max: cap },
            other => RemoteError::Transport(other.to_string()),
        })
    }

    impl MetadataStore for &MetadataDir {
        fn load(&mut self, role: &str) -> Option<Vec<u8>> {
            MetadataDir::load(self, role).ok().flatten()
        }

        fn save(&mut self, role: &str, bytes: &[u8]) -> Result<(), StoreError> {
            self.store(role, bytes)
                .map_err(|e| StoreError(format!("{e:#}")))
        }

        fn delete(&mut self, role: &str) -> Result<(), StoreError> {
            self.remove(role).map_err(|e| StoreError(format!("{e:#}")))
        }
    }

    /// `init`: the root must parse and carry a threshold of signatures from its own root
    /// keys (expiry is not checked: only the final root of a refresh must be current).
    /// Nothing is written unless it does.
    pub(crate) fn init(store: &MetadataDir, root: &[u8], now: UtcTime) -> anyhow::Result<()> {
        TrustedSet::with_limits(root, now, config().limits).context("initial root rejected")?;
        store.store("root", root)
    }

    fn updater<'a>(
        store: &'a MetadataDir,
        http: &'a Http,
        metadata_url: &'a str,
        target_base_url: Option<&'a str>,
        now: UtcTime,
    ) -> anyhow::Result<Updater<HttpRemote<'a>, &'a MetadataDir>> {
        let remote = HttpRemote {
            http,
            metadata_url,
            target_base_url,
        };
        Updater::new(remote, store, config(), now).context("loading trusted root")
    }

    /// `refresh`: the top-level workflow (TUF 5.3 to 5.6).
    pub(crate) fn refresh(
        store: &MetadataDir,
        http: &Http,
        metadata_url: &str,
        now: UtcTime,
    ) -> anyhow::Result<()> {
        let mut updater = updater(store, http, metadata_url, None, now)?;
        updater.refresh().context("refresh")?;
        Ok(())
    }

    /// `download`: refresh, then for each target in order: look it up, keep the local
    /// copy if it matches the signed length and hashes, else download, verify and store
    /// it as `TARGET_DIR/quote(path)`. Stops at the first failure.
    pub(crate) fn download(
        store: &MetadataDir,
        http: &Http,
        metadata_url: &str,
        target_base_url: &str,
        target_dir: &Path,
        target_names: &[String],
        now: UtcTime,
    ) -> anyhow::Result<()> {
        let mut updater = updater(store, http, metadata_url, Some(target_base_url), now)?;
        updater.refresh().context("refresh")?;
        for name in target_names {
            let info = updater
                .get_target_info(name)
                .with_context(|| format!("looking up target {name:?}"))?
                .with_context(|| format!("target {name:?} is not listed by any trusted role"))?;
            let local = target_dir.join(quote(name, b""));
            if let Some(cached) = read_capped(&local, info.file.length)?
                && info.verify_bytes(&cached).is_ok()
            {
                continue;
            }
            let bytes = updater
                .download_target(&info)
                .with_context(|| format!("downloading target {name:?}"))?;
            write_atomic(&local, &bytes)?;
        }
        Ok(())
    }

    /// Reads at most `len + 1` bytes of `path` (enough to tell a too-long file);
    /// `None` if it does not exist.
    fn read_capped(path: &Path, len: u64) -> anyhow::Result<Option<Vec<u8>>> {
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let mut bytes = Vec::new();
        file.take(len.saturating_add(1))
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_matches_python_for_role_names_that_could_escape_the_dir() {
        assert_eq!(quote("../delegatedrole", b""), "..%2Fdelegatedrole");
        assert_eq!(quote("/delegatedrole", b""), "%2Fdelegatedrole");
        assert_eq!(quote("?", b""), "%3F");
        assert_eq!(quote("#", b""), "%23");
        assert_eq!(quote("a b/ü", b"/"), "a%20b/%C3%BC");
        assert_eq!(quote("A-z_0.9~", b""), "A-z_0.9~");
    }

    #[test]
    fn join_url_adds_exactly_one_slash() {
        assert_eq!(
            join_url("http://h/m/", "1.root.json"),
            "http://h/m/1.root.json"
        );
        assert_eq!(
            join_url("http://h/m", "1.root.json"),
            "http://h/m/1.root.json"
        );
    }

    #[test]
    fn metadata_dir_never_writes_outside_the_dir_for_hostile_role_names() {
        let tmp = tempfile::tempdir().unwrap();
        let store = MetadataDir::new(tmp.path().join("md"));
        fs::create_dir(tmp.path().join("md")).unwrap();
        store.store("../evil", b"x").unwrap();
        assert!(!tmp.path().join("evil.json").exists());
        assert_eq!(store.load("../evil").unwrap().as_deref(), Some(&b"x"[..]));
        let names: Vec<_> = fs::read_dir(tmp.path().join("md"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["..%2Fevil.json".to_owned()]);
    }
}

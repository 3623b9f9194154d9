//! A small blocking client of the REST API (`outpostctl`, tests).

use serde_json::Value;

/// Errors talking to the API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The request did not complete.
    #[error("{url}: {source}")]
    Transport {
        /// URL.
        url: String,
        /// Cause.
        source: ureq::Error,
    },
    /// The server answered with an error status.
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        /// URL.
        url: String,
        /// Status code.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The answer is not JSON.
    #[error("{url}: response is not JSON: {reason}")]
    Malformed {
        /// URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// An API client: base URL (`http://host:port`) and bearer token.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl ApiClient {
    /// A client for the server at `base` using `token`.
    pub fn new(base: &str, token: &str) -> ApiClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build();
        ApiClient {
            base: base.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
            agent: ureq::Agent::new_with_config(config),
        }
    }

    /// Sends a request and returns the status and raw body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let url = format!("{}{}", self.base, path);
        let transport = |source| ClientError::Transport {
            url: url.clone(),
            source,
        };
        let auth = format!("Bearer {}", self.token);
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            (m, body) => {
                let (ctype, bytes) = body.unwrap_or(("application/json", b"{}".to_vec()));
                let req = match m {
                    "PUT" => self.agent.put(&url),
                    _ => self.agent.post(&url),
                };
                req.header("Authorization", &auth)
                    .content_type(ctype)
                    .send(&bytes[..])
            }
        };
        let mut resp = resp.map_err(transport)?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_vec()
            .map_err(transport)?;
        Ok((status, bytes))
    }

    fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{}", self.base, path);
        let (status, bytes) = self.raw(method, path, body)?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| ClientError::Malformed {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Status {
                url,
                status,
                message: value["error"].as_str().unwrap_or("no message").to_owned(),
            });
        }
        Ok(value)
    }

    /// GET, expecting JSON.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.json("GET", path, None)
    }

    /// POST a JSON body, expecting JSON.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.json(
            "POST",
            path,
            Some((
                "application/json",
                serde_json::to_vec(body).expect("JSON serializes"),
            )),
        )
    }

    /// PUT raw bytes, expecting JSON.
    pub fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> Result<Value, ClientError> {
        self.json("PUT", path, Some(("application/octet-stream", bytes)))
    }
}

/// Errors of [`push_release`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The operator repository.
    #[error(transparent)]
    Repo(#[from] crate::repo::RepoError),
    /// The API.
    #[error(transparent)]
    Api(#[from] ClientError),
    /// A file of the repository.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The release is not in the repository.
    #[error("no release {model} {version} in the repository; sign it first")]
    NoSuchRelease {
        /// Model.
        model: String,
        /// Version.
        version: String,
    },
}

/// Uploads a release signed in an operator repository: the model file (`PUT
/// /api/v1/blobs/SHA`), then the repository's current `targets.json` (`POST
/// /api/v1/releases`). Returns the server's answer.
pub fn push_release(
    api: &ApiClient,
    repo: &crate::repo::Repo,
    model: &str,
    version: &str,
) -> Result<Value, PushError> {
    let entry = repo
        .releases()?
        .into_iter()
        .find(|e| e.release.model == model && e.release.version == version)
        .ok_or_else(|| PushError::NoSuchRelease {
            model: model.into(),
            version: version.into(),
        })?;
    // Upload this release's file and any other signed file the server does not hold.
    let held = api.get("/api/v1/releases")?;
    let held: Vec<&str> = held["releases"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["sha256"].as_str()).collect())
        .unwrap_or_default();
    for e in repo.releases()? {
        let sha = e.target.hashes.get("sha256").cloned().unwrap_or_default();
        if e.path != entry.path && held.contains(&sha.as_str()) {
            continue;
        }
        let path = repo.targets_dir().join(&e.path);
        let bytes = std::fs::read(&path).map_err(|source| PushError::Io {
            path: path.clone(),
            source,
        })?;
        api.put_bytes(&format!("/api/v1/blobs/{sha}"), bytes)?;
    }
    let tpath = repo.metadata_dir().join("targets.json");
    let targets = std::fs::read_to_string(&tpath).map_err(|source| PushError::Io {
        path: tpath.clone(),
        source,
    })?;
    Ok(api.post(
        "/api/v1/releases",
        &serde_json::json!({ "targets": targets }),
    )?)
}

/// Uploads the root versions of an operator repository that the server does not have
/// yet, oldest first (`POST /api/v1/repository/root`), each with the repository's
/// `targets.json` when its targets keys differ from the server's current root (a
/// rotation that replaced the release key). Returns the versions uploaded.
pub fn push_root(api: &ApiClient, repo: &crate::repo::Repo) -> Result<Vec<u64>, PushError> {
    let read = |name: &str| {
        let path = repo.metadata_dir().join(name);
        std::fs::read_to_string(&path).map_err(|source| PushError::Io { path, source })
    };
    let mut server = api.get("/api/v1/root")?;
    let local = repo.root()?.version;
    let mut pushed = Vec::new();
    while let Some(v) = server["signed"]["version"].as_u64().map(|v| v + 1)
        && v <= local
    {
        let root = read(&format!("{v}.root.json"))?;
        let next: Value = serde_json::from_str(&root).map_err(|e| {
            PushError::Repo(crate::repo::RepoError::Usage(format!(
                "{v}.root.json does not parse: {e}"
            )))
        })?;
        let keys = |r: &Value| r["signed"]["roles"]["targets"]["keyids"].clone();
        let mut body = serde_json::json!({ "root": root });
        if keys(&next) != keys(&server) {
            body["targets"] = read("targets.json")?.into();
        }
        api.post("/api/v1/repository/root", &body)?;
        pushed.push(v);
        server = next;
    }
    Ok(pushed)
}

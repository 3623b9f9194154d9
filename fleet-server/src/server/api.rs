//! The REST API, `/api/v1`, for operators (`outpostctl`, dashboards, CI).
//!
//! Every route but `/health` needs `Authorization: Bearer TOKEN`; the token's role
//! (viewer < operator < admin) must reach the route's. Errors are
//! `{"error": "plain message"}`; internal causes are logged, never returned. The
//! routes are listed in `docs/server.md`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use outpost_protocol::bundle::{
    AgentConfig, BrokerConfig, TelemetryConfig, TrustConfig, UpdateConfig,
};
use outpost_protocol::tuf::UtcTime;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Role;
use super::mqtt::MqttHandle;
use super::{Core, ServerError};

/// Largest upload (a model file).
pub const MAX_UPLOAD: usize = 512 * 1024 * 1024;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The core.
    pub core: Arc<Core>,
    /// The MQTT link, if any.
    pub mqtt: Option<MqttHandle>,
    /// The embedded broker's device listeners, for bundles.
    pub devices: DeviceEndpoints,
}

/// What device bundles are told about the embedded broker's device listeners.
#[derive(Debug, Clone, Default)]
pub struct DeviceEndpoints {
    /// Port of the plain device listener.
    pub mqtt_port: Option<u16>,
    /// Port of the TLS device listener.
    pub mqtts_port: Option<u16>,
    /// CA certificate(s) devices trust for the TLS listener (PEM).
    pub ca_pem: Option<String>,
}

impl DeviceEndpoints {
    /// The URL a bundle gets when the operator names none: the TLS listener, else the
    /// plain one, at `host` (the host the operator reached the API at).
    fn default_url(&self, host: &str) -> Option<String> {
        match (self.mqtts_port, self.mqtt_port) {
            (Some(p), _) => Some(format!("mqtts://{host}:{p}")),
            (None, Some(p)) => Some(format!("mqtt://{host}:{p}")),
            (None, None) => None,
        }
    }
}

/// The host of a `Host` header value (`name`, `name:port`, `[v6]:port`).
fn host_of(value: &str) -> &str {
    if value.starts_with('[') {
        return value.split_inclusive(']').next().unwrap_or(value);
    }
    value.rsplit_once(':').map_or(value, |(h, _)| h)
}

/// An API error: a status and a plain message. Causes are logged where it is built.
#[derive(Debug)]
pub struct AppError {
    status: StatusCode,
    message: String,
}

impl AppError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        AppError {
            status,
            message: message.into(),
        }
    }
}

impl From<ServerError> for AppError {
    fn from(e: ServerError) -> Self {
        match e {
            ServerError::Rejected(m) => AppError::new(StatusCode::BAD_REQUEST, m),
            ServerError::NotFound(m) => AppError::new(StatusCode::NOT_FOUND, m),
            ServerError::Tuf(e) => {
                AppError::new(StatusCode::BAD_REQUEST, format!("metadata rejected: {e}"))
            }
            other => {
                eprintln!("outpost-server: api: {other}");
                AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message}))).into_response()
    }
}

type ApiResult<T> = Result<T, AppError>;

fn now() -> UtcTime {
    UtcTime::from_system_time(std::time::SystemTime::now())
}

/// Checks the bearer token; returns the token's name.
fn require(state: &AppState, headers: &HeaderMap, role: Role) -> ApiResult<String> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| AppError::new(StatusCode::UNAUTHORIZED, "missing bearer token"))?;
    let (name, has) = state
        .core
        .authenticate(token.trim())?
        .ok_or_else(|| AppError::new(StatusCode::UNAUTHORIZED, "unknown token"))?;
    if has < role {
        return Err(AppError::new(
            StatusCode::FORBIDDEN,
            format!(
                "this needs the {} role; the token has {}",
                role.as_str(),
                has.as_str()
            ),
        ));
    }
    Ok(name)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServerError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            eprintln!("outpost-server: api task: {e}");
            AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        })?
        .map_err(AppError::from)
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/tokens", post(create_token))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/root", get(root))
        .route("/api/v1/repository/root", post(upload_root))
        .route("/api/v1/blobs/{sha256}", put(put_blob))
        .route("/api/v1/releases", post(upload_release).get(list_releases))
        .route("/api/v1/models", get(list_models))
        .route("/api/v1/models/{name}/quality", get(model_quality))
        .route("/api/v1/devices", post(add_device).get(list_devices))
        .route("/api/v1/devices/{id}", get(get_device))
        .route("/api/v1/devices/{id}/bundle", post(bundle))
        .route("/api/v1/devices/{id}/telemetry", get(telemetry))
        .route("/api/v1/assignments", post(assign))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD))
        .with_state(state)
}

async fn health(State(s): State<AppState>) -> Json<Value> {
    Json(json!({
        "ok": true,
        "broker": s.mqtt.as_ref().map(|m| if m.is_connected() { "connected" } else { "disconnected" }),
    }))
}

#[derive(Deserialize)]
struct TokenReq {
    name: String,
    role: String,
}

async fn create_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<TokenReq>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let actor = require(&s, &headers, Role::Admin)?;
    let role = Role::parse(&req.role).ok_or_else(|| {
        AppError::new(
            StatusCode::BAD_REQUEST,
            "role must be viewer, operator or admin",
        )
    })?;
    let token = s.core.mint_token(&actor, &req.name, role, now())?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": req.name, "role": role.as_str(), "token": token})),
    ))
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<u32>,
    after: Option<u64>,
}

async fn audit(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Limit>,
) -> ApiResult<Json<Value>> {
    require(&s, &headers, Role::Admin)?;
    let rows = s
        .core
        .db()
        .audit_log(q.limit.unwrap_or(100).min(10_000))
        .map_err(ServerError::from)?;
    Ok(Json(json!({ "entries": rows })))
}

async fn root(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    require(&s, &headers, Role::Viewer)?;
    let bytes = s.core.repo().root_bytes()?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

#[derive(Deserialize)]
struct RootReq {
    /// The signed next `root.json`, verbatim.
    root: String,
    /// The signed `targets.json`, verbatim, when the rotation replaced the release key.
    #[serde(default)]
    targets: Option<String>,
}

async fn upload_root(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<RootReq>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let actor = require(&s, &headers, Role::Operator)?;
    let core = s.core.clone();
    let version = blocking(move || {
        core.upload_root(
            &actor,
            req.root.as_bytes(),
            req.targets.as_deref().map(str::as_bytes),
            now(),
        )
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!({ "version": version }))))
}

async fn put_blob(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(sha): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    require(&s, &headers, Role::Operator)?;
    let core = s.core.clone();
    let len = body.len();
    let sha2 = sha.clone();
    blocking(move || core.upload_blob(&sha2, &body)).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"sha256": sha, "length": len})),
    ))
}

#[derive(Deserialize)]
struct ReleaseReq {
    /// The signed `targets.json`, verbatim.
    targets: String,
    /// Delegated roles: name → signed metadata, verbatim.
    #[serde(default)]
    delegated: BTreeMap<String, String>,
}

async fn upload_release(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<ReleaseReq>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let actor = require(&s, &headers, Role::Operator)?;
    let core = s.core.clone();
    let releases = blocking(move || {
        let delegated = req
            .delegated
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        core.upload_release(&actor, req.targets.as_bytes(), &delegated, now())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!({ "releases": releases }))))
}

async fn list_releases(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    require(&s, &headers, Role::Viewer)?;
    Ok(Json(json!({ "releases": s.core.release_views()? })))
}

async fn list_models(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    require(&s, &headers, Role::Viewer)?;
    let mut models: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in s.core.release_views()? {
        models
            .entry(r.model)
            .or_default()
            .push(json!({"version": r.version, "sequence": r.sequence, "path": r.path}));
    }
    let list: Vec<Value> = models
        .into_iter()
        .map(|(m, rs)| json!({"model": m, "releases": rs}))
        .collect();
    Ok(Json(json!({ "models": list })))
}

/// Accuracy proxies per version of a model, over every device's stored window
/// summaries (read in pages; the cost grows with the stored telemetry).
async fn model_quality(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    require(&s, &headers, Role::Viewer)?;
    let core = s.core.clone();
    let model = name.clone();
    let versions = blocking(move || {
        let mut agg = crate::quality::Aggregator::new(&model);
        for d in core.db().devices()? {
            let mut after = 0;
            loop {
                let page = core.db().telemetry(&d.id, after, 1000)?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for r in &page {
                    agg.add(&d.id, &r.class, &r.payload);
                }
            }
        }
        Ok(agg.finish())
    })
    .await?;
    let versions: Vec<Value> = versions
        .into_iter()
        .map(|(version, q)| {
            let mut v = serde_json::to_value(&q).unwrap_or_default();
            v["version"] = json!(version);
            v["realized_accuracy"] = json!(q.realized_accuracy());
            v
        })
        .collect();
    Ok(Json(json!({ "model": name, "versions": versions })))
}

#[derive(Deserialize)]
struct DeviceReq {
    id: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

async fn add_device(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<DeviceReq>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let actor = require(&s, &headers, Role::Operator)?;
    let core = s.core.clone();
    let id = req.id.clone();
    let password = blocking(move || core.add_device(&actor, &req.id, &req.tags, now())).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": id,
            "password": password,
            "broker_reload_required": s.core.maintains_passwd_file(),
        })),
    ))
}

async fn list_devices(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    require(&s, &headers, Role::Viewer)?;
    Ok(Json(
        json!({ "devices": s.core.db().devices().map_err(ServerError::from)? }),
    ))
}

async fn get_device(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    require(&s, &headers, Role::Viewer)?;
    let d = s
        .core
        .db()
        .device(&id)
        .map_err(ServerError::from)?
        .ok_or_else(|| AppError::new(StatusCode::NOT_FOUND, format!("no device {id}")))?;
    Ok(Json(serde_json::to_value(d).unwrap_or_default()))
}

#[derive(Deserialize)]
struct BundleReq {
    /// Broker URL devices connect to; default: [`DeviceEndpoints::default_url`].
    #[serde(default)]
    broker_url: Option<String>,
    /// The agent's data directory on the device.
    #[serde(default)]
    data_dir: Option<String>,
}

async fn bundle(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(req): Json<BundleReq>,
) -> ApiResult<Json<Value>> {
    let actor = require(&s, &headers, Role::Operator)?;
    let device = s
        .core
        .db()
        .device(&id)
        .map_err(ServerError::from)?
        .ok_or_else(|| AppError::new(StatusCode::NOT_FOUND, format!("no device {id}")))?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map_or("localhost", host_of);
    let url = match req.broker_url {
        Some(u) => u,
        None => s.devices.default_url(host).ok_or_else(|| {
            AppError::new(
                StatusCode::BAD_REQUEST,
                "broker_url is needed: the server runs no device listener of its own",
            )
        })?,
    };
    // The TLS listener's CA goes to every mqtts:// bundle; without one, devices use
    // their system trust store.
    let ca_pem = url
        .starts_with("mqtts://")
        .then(|| s.devices.ca_pem.clone())
        .flatten();
    let cfg = AgentConfig {
        device_id: id.clone(),
        data_dir: req
            .data_dir
            .unwrap_or_else(|| "/var/lib/outpost".into())
            .into(),
        broker: BrokerConfig {
            url,
            username: None,
            password_file: "credentials".into(),
            ca_file: ca_pem.as_ref().map(|_| "ca.pem".into()),
            tls_server_name: None,
            keep_alive_secs: 30,
            max_backoff_secs: 60,
        },
        trust: TrustConfig::default(),
        telemetry: TelemetryConfig::default(),
        update: UpdateConfig::default(),
        tags: device.tags,
    };
    cfg.validate()
        .map_err(|e| AppError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let core = s.core.clone();
    let (password, root) = blocking(move || {
        let p = core.rotate_password(&actor, &id, now())?;
        Ok((p, core.repo().root_bytes()?))
    })
    .await?;
    Ok(Json(json!({
        "agent_toml": cfg.to_toml(),
        "credentials": password,
        "root_json": String::from_utf8_lossy(&root),
        "ca_pem": ca_pem,
        "broker_reload_required": s.core.maintains_passwd_file(),
    })))
}

async fn telemetry(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<Limit>,
) -> ApiResult<Json<Value>> {
    require(&s, &headers, Role::Viewer)?;
    let rows = s
        .core
        .db()
        .telemetry(
            &id,
            q.after.unwrap_or(0),
            q.limit.unwrap_or(1000).min(10_000),
        )
        .map_err(ServerError::from)?;
    Ok(Json(json!({ "records": rows })))
}

#[derive(Deserialize)]
struct AssignReq {
    model: String,
    version: String,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

async fn assign(
    State(s): State<AppState>,
    headers: HeaderMap,
    Json(req): Json<AssignReq>,
) -> ApiResult<Json<Value>> {
    let actor = require(&s, &headers, Role::Operator)?;
    let core = s.core.clone();
    let (assigned, msgs) = blocking(move || {
        core.assign(
            &actor,
            &req.model,
            &req.version,
            &req.devices,
            &req.tags,
            now(),
        )
    })
    .await?;
    let published = match &s.mqtt {
        Some(m) => match m.publish(msgs).await {
            Ok(()) => true,
            Err(e) => {
                // Stored: republished on the next session the broker does not remember.
                eprintln!("outpost-server: publishing assignments: {e}");
                false
            }
        },
        None => false,
    };
    Ok(Json(
        json!({ "assigned": assigned, "published": published }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_url_defaults_to_the_tls_listener_at_the_api_host() {
        assert_eq!(host_of("fleet.example.com:8080"), "fleet.example.com");
        assert_eq!(host_of("[::1]:8080"), "[::1]");
        assert_eq!(host_of("fleet"), "fleet");
        let mut d = DeviceEndpoints {
            mqtt_port: Some(1883),
            mqtts_port: Some(8883),
            ca_pem: None,
        };
        assert_eq!(d.default_url("fleet").unwrap(), "mqtts://fleet:8883");
        d.mqtts_port = None;
        assert_eq!(d.default_url("fleet").unwrap(), "mqtt://fleet:1883");
        d.mqtt_port = None;
        assert_eq!(d.default_url("fleet"), None);
    }
}

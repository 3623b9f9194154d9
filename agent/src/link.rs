//! The agent's MQTT link to the fleet server (rumqttc 0.25).
//!
//! - `mqtt://` or `mqtts://`: TLS on rustls with the ring provider, the bundle's CA file
//!   or the system trust store ([`tls`]).
//! - Persistent session: `clean_session=false`, client id = device id, credentials from
//!   the bundle; the broker keeps subscriptions and queued QoS1 messages across
//!   reconnects, and rumqttc re-sends unacknowledged publishes (possibly twice).
//! - Max packet size `wire::MAX_PAYLOAD` + overhead both ways; `tcp_nodelay` on.
//! - Reconnects with exponential back-off from 1 s, doubling up to `max_backoff_secs`,
//!   with equal jitter; reset after a CONNACK. Subscribes to the device's `assignment`,
//!   `resp` and `ack` topics after every CONNACK (the retained assignment is delivered
//!   again each time).
//! - Requests ([`Link::call`]) carry ids; a response is matched by id, and one arriving
//!   for an id nobody waits for (duplicate, or late after a timeout) is dropped. Each
//!   attempt has a timeout and uses a fresh id, so retries are idempotent on both sides
//!   (the server is stateless per request).
//!
//! - A failed connection attempt is logged (once per distinct reason) and kept as
//!   [`Link::last_error`]: refused certificates, name mismatches, a plain listener behind
//!   an `mqtts://` URL and the reverse are said in words.
//!
//! [`Link::start`] spawns one task on the caller's tokio runtime: the event loop. It is
//! the daemon's only background task for the network.

pub mod tls;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_protocol::bundle::AgentConfig as Bundle;
use outpost_protocol::wire::{
    self, DeviceTopics, Request, RequestBody, Response, StatusReport, TelemetryAck, TelemetryBatch,
};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS, TlsConfiguration,
    Transport,
};
use tokio::sync::{mpsc, oneshot};

/// Room for MQTT headers and the topic on top of the largest payload.
const PACKET_OVERHEAD: usize = 4096;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Device id (client id; topics).
    pub device_id: String,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT username.
    pub username: String,
    /// MQTT password.
    pub password: String,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// Largest back-off between reconnect attempts.
    pub max_backoff: Duration,
    /// TLS (`mqtts://`); `None`: plain MQTT.
    pub tls: Option<TlsSettings>,
}

pub use tls::TlsSettings;

/// The TLS settings of a bundle whose broker URL is `mqtts://` (`None` for `mqtt://`);
/// `ca_file` resolved against `dir`, the bundle's directory.
pub fn tls_settings(bundle: &Bundle, dir: &Path) -> Option<TlsSettings> {
    let (_, _, tls) = bundle.broker_endpoint();
    tls.then(|| TlsSettings {
        ca_file: bundle
            .broker
            .ca_file
            .as_ref()
            .map(|p| Bundle::resolve(dir, p)),
        server_name: bundle.broker.tls_server_name.clone(),
    })
}

/// Errors of the link.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// No response within the timeout, after every attempt.
    #[error("request timed out after {attempts} attempts")]
    Timeout {
        /// Attempts made.
        attempts: u32,
    },
    /// The client's request queue is closed (the event loop stopped).
    #[error("MQTT client closed: {0}")]
    Closed(String),
    /// A message could not be encoded within the payload cap.
    #[error("{0}")]
    TooLarge(String),
    /// The TLS settings are unusable (CA file missing, unreadable or not PEM; a name
    /// that cannot be a TLS server name).
    #[error("TLS: {0}")]
    Tls(String),
}

/// What arrives from the server, and connection changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// CONNACK received and subscriptions sent.
    Connected,
    /// The connection dropped (the event loop reconnects by itself).
    Disconnected(String),
    /// A director assignment (retained message) arrived.
    Assignment(Vec<u8>),
    /// The server stored telemetry up to this sequence.
    TelemetryAck(TelemetryAck),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

/// A connected (or reconnecting) link. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Link {
    client: AsyncClient,
    topics: DeviceTopics,
    pending: Pending,
    next_id: AtomicU64,
    connected: Arc<AtomicBool>,
    last_error: LastError,
}

type LastError = Arc<Mutex<Option<String>>>;

impl Link {
    /// Builds the client and spawns its event loop on the current tokio runtime.
    /// Connection events and server messages arrive on the returned receiver.
    pub fn start(cfg: &LinkConfig) -> Result<(Arc<Link>, mpsc::Receiver<Inbound>), LinkError> {
        let topics =
            DeviceTopics::new(&cfg.device_id).map_err(|e| LinkError::Closed(e.to_string()))?;
        let mut opts = MqttOptions::new(&cfg.device_id, &cfg.host, cfg.port);
        if let Some(t) = &cfg.tls {
            let config = tls::client_config(t, &cfg.host)?;
            opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(config)));
        }
        opts.set_clean_session(false)
            .set_credentials(&cfg.username, &cfg.password)
            .set_keep_alive(cfg.keep_alive.max(Duration::from_secs(5)))
            .set_max_packet_size(
                wire::MAX_PAYLOAD + PACKET_OVERHEAD,
                wire::MAX_PAYLOAD + PACKET_OVERHEAD,
            )
            .set_inflight(64);
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(10);
        eventloop.set_network_options(net);
        let pending: Pending = Arc::default();
        let connected = Arc::new(AtomicBool::new(false));
        let last_error = LastError::default();
        let (tx, rx) = mpsc::channel(256);
        let link = Arc::new(Link {
            client: client.clone(),
            topics: topics.clone(),
            pending: pending.clone(),
            // Ids start at a random point so that a restarted agent does not match
            // responses meant for its previous run.
            next_id: AtomicU64::new(fastrand::u64(1..u64::MAX / 2)),
            connected: connected.clone(),
            last_error: last_error.clone(),
        });
        let max_backoff = cfg.max_backoff.max(Duration::from_secs(1));
        tokio::spawn(drive(
            eventloop,
            client,
            Shared {
                topics,
                pending,
                connected,
                last_error,
                endpoint: format!("{}:{}", cfg.host, cfg.port),
                tls: cfg.tls.clone(),
            },
            tx,
            max_backoff,
        ));
        Ok((link, rx))
    }

    /// Whether the last connection attempt succeeded and has not dropped since.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Why the last connection attempt failed, if it did and none succeeded since.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The device's topics.
    pub fn topics(&self) -> &DeviceTopics {
        &self.topics
    }

    /// Sends a request and waits for its response, `attempts` times at most, each with
    /// `timeout`. Cancel-safe: dropping the future drops its pending entry's receiver,
    /// and a later response for that id is discarded.
    pub async fn call(
        &self,
        body: RequestBody,
        timeout: Duration,
        attempts: u32,
    ) -> Result<Response, LinkError> {
        for _ in 0..attempts.max(1) {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.pending_lock().insert(id, tx);
            let req = Request {
                id,
                body: body.clone(),
            };
            let sent = tokio::time::timeout(
                timeout,
                self.client
                    .publish(&self.topics.req, QoS::AtLeastOnce, false, req.to_bytes()),
            )
            .await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.pending_lock().remove(&id);
                    return Err(LinkError::Closed(e.to_string()));
                }
                Err(_) => {
                    self.pending_lock().remove(&id);
                    continue;
                }
            }
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(resp)) => return Ok(resp),
                _ => {
                    self.pending_lock().remove(&id);
                }
            }
        }
        Err(LinkError::Timeout { attempts })
    }

    /// Publishes the retained status. Cancel-safe only before the publish is queued.
    pub async fn publish_status(&self, report: &StatusReport) -> Result<(), LinkError> {
        let bytes = serde_json::to_vec(report).map_err(|e| LinkError::TooLarge(e.to_string()))?;
        self.client
            .publish(&self.topics.status, QoS::AtLeastOnce, true, bytes)
            .await
            .map_err(|e| LinkError::Closed(e.to_string()))
    }

    /// Publishes a telemetry batch (QoS 1, not retained).
    pub async fn publish_telemetry(&self, batch: &TelemetryBatch) -> Result<(), LinkError> {
        let bytes = serde_json::to_vec(batch).map_err(|e| LinkError::TooLarge(e.to_string()))?;
        if bytes.len() > wire::MAX_PAYLOAD {
            return Err(LinkError::TooLarge(format!(
                "telemetry batch of {} bytes",
                bytes.len()
            )));
        }
        self.client
            .publish(&self.topics.telemetry, QoS::AtLeastOnce, false, bytes)
            .await
            .map_err(|e| LinkError::Closed(e.to_string()))
    }

    /// Disconnects politely (best effort).
    pub async fn disconnect(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await;
    }

    fn pending_lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Response>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the event loop shares with the [`Link`], and what it says in messages.
struct Shared {
    topics: DeviceTopics,
    pending: Pending,
    connected: Arc<AtomicBool>,
    last_error: LastError,
    endpoint: String,
    tls: Option<TlsSettings>,
}

/// The event loop: polls rumqttc, dispatches messages, backs off between reconnects.
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    shared: Shared,
    tx: mpsc::Sender<Inbound>,
    max_backoff: Duration,
) {
    let Shared {
        topics,
        pending,
        connected,
        last_error,
        endpoint,
        tls,
    } = shared;
    let mut backoff = Duration::from_secs(1);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_secs(1);
                connected.store(true, Ordering::Relaxed);
                *last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let subs = [&topics.assignment, &topics.resp, &topics.ack]
                    .map(|t| rumqttc::SubscribeFilter::new(t.to_string(), QoS::AtLeastOnce));
                // try_: the request queue is drained by this very loop, so awaiting
                // here could deadlock when it is full.
                if let Err(e) = client.try_subscribe_many(subs) {
                    tracing_warn(&format!("subscribe: {e}"));
                }
                if tx.send(Inbound::Connected).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let msg = if p.topic == topics.resp {
                    match Response::from_bytes(&p.payload) {
                        Ok(resp) => {
                            let waiter = pending
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&resp.header.id);
                            if let Some(w) = waiter {
                                let _ = w.send(resp);
                            }
                        }
                        Err(e) => tracing_warn(&format!("bad response frame: {e}")),
                    }
                    None
                } else if p.topic == topics.assignment {
                    Some(Inbound::Assignment(p.payload.to_vec()))
                } else if p.topic == topics.ack {
                    match serde_json::from_slice::<TelemetryAck>(&p.payload) {
                        Ok(a) => Some(Inbound::TelemetryAck(a)),
                        Err(e) => {
                            tracing_warn(&format!("bad telemetry ack: {e}"));
                            None
                        }
                    }
                } else {
                    None
                };
                if let Some(m) = msg
                    && tx.send(m).await.is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let was = connected.swap(false, Ordering::Relaxed);
                if was && tx.send(Inbound::Disconnected(e.to_string())).await.is_err() {
                    return;
                }
                if !was {
                    let why = tls::describe(&e, &endpoint, tls.as_ref());
                    let mut last = last_error.lock().unwrap_or_else(|e| e.into_inner());
                    // Once per distinct reason: the loop retries every few seconds.
                    if last.as_deref() != Some(why.as_str()) {
                        tracing_warn(&format!("connect failed: {why}"));
                        *last = Some(why);
                    }
                }
                if tx.is_closed() {
                    return;
                }
                // Equal jitter: sleep uniformly in [backoff/2, backoff].
                let half = backoff.as_millis() as u64 / 2;
                let sleep = Duration::from_millis(half + fastrand::u64(0..=half));
                tokio::time::sleep(sleep).await;
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

fn tracing_warn(msg: &str) {
    eprintln!("outpost-agent: link: {msg}");
}

/// Back-off schedule (for tests and docs): the upper bound of the n-th wait.
pub fn backoff_bound(n: u32, max: Duration) -> Duration {
    Duration::from_secs(1)
        .saturating_mul(1u32.checked_shl(n).unwrap_or(u32::MAX))
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff_bound(0, max), Duration::from_secs(1));
        assert_eq!(backoff_bound(3, max), Duration::from_secs(8));
        assert_eq!(backoff_bound(10, max), max);
        assert_eq!(backoff_bound(40, max), max);
    }
}

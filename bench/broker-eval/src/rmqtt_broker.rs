//! rmqtt 0.24 embedded on the caller's tokio runtime: TCP + TLS listeners, Outpost's
//! auth/ACL as one in-code hook handler, retained messages and sessions on sled.
//!
//! This is the recipe `docs/broker.md` hands to the server.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, anyhow};
use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, PublishAclResult, SubscribeAclResult};

use crate::common::{DropCounter, Endpoints, TlsFiles, authenticate, device_may_use};

/// Tunables the criteria vary.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Per-subscriber delivery queue (rmqtt default 1000; QoS1 overflow evicts the oldest).
    pub max_mqueue_len: usize,
    /// Per-connection outgoing inflight window (rmqtt default 16).
    pub max_inflight: u16,
    /// Expiry of queued (and, unless the retainer overrides it, retained) messages.
    pub message_expiry: Duration,
    /// Retainer TTL: `"0s"` = retained messages never expire.
    pub retained_ttl: String,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            max_mqueue_len: 1000,
            max_inflight: 16,
            message_expiry: Duration::from_secs(5 * 60),
            retained_ttl: "0s".into(),
        }
    }
}

/// Starts the broker on the current tokio runtime; returns once both listeners are bound.
pub async fn start(
    data_dir: &Path,
    tls: &TlsFiles,
    tuning: &Tuning,
    dropped: DropCounter,
) -> Result<Endpoints> {
    let retain_dir = data_dir.join("retain");
    let session_dir = data_dir.join("session");
    let retainer_cfg = format!(
        "storage.type = \"sled\"\nstorage.sled.path = {:?}\nstorage.sled.cache_capacity = \"16MB\"\n\
         retained_message_ttl = {:?}\nmax_payload_size = \"1MB\"\n",
        retain_dir.display().to_string(),
        tuning.retained_ttl,
    );
    let session_cfg = format!(
        "storage.type = \"sled\"\nstorage.sled.path = {:?}\nstorage.sled.cache_capacity = \"16MB\"\n",
        session_dir.display().to_string(),
    );
    let scx = ServerContext::new()
        .node_id(1)
        // Default: refuse CONNECTs while host CPU > 90 % or load1 > 80 (host-wide, not ours).
        .busy_check_enable(false)
        .plugins_config_map_add("rmqtt-retainer", retainer_cfg)
        .plugins_config_map_add("rmqtt-session-storage", session_cfg)
        .build()
        .await;

    rmqtt_retainer::register(&scx, true, false).await?;
    rmqtt_session_storage::register(&scx, true, false).await?;

    let register = scx.extends.hook_mgr().register();
    for typ in [
        Type::ClientAuthenticate,
        Type::ClientSubscribeCheckAcl,
        Type::MessagePublishCheckAcl,
        Type::MessageDropped,
    ] {
        register
            .add(
                typ,
                Box::new(OutpostAcl {
                    dropped: dropped.clone(),
                }),
            )
            .await;
    }
    register.start().await;

    let inflight =
        NonZeroU16::new(tuning.max_inflight).ok_or_else(|| anyhow!("max_inflight must be > 0"))?;
    let common = |b: Builder| {
        b.allow_anonymous(false)
            .max_packet_size(1024 * 1024)
            .max_inflight(inflight)
            .max_mqueue_len(tuning.max_mqueue_len)
            .message_expiry_interval(tuning.message_expiry)
            .handshake_timeout(Duration::from_secs(10))
            .nodelay(true)
    };
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let tcp = common(Builder::new().name("tcp").laddr(loopback))
        .bind()?
        .tcp()?;
    let tls_l = common(Builder::new().name("tls").laddr(loopback))
        .tls_cert(Some(tls.cert.display().to_string()))
        .tls_key(Some(tls.key.display().to_string()))
        .bind()?
        .tls()?;
    let endpoints = Endpoints {
        tcp: tcp.local_addr()?,
        tls: tls_l.local_addr()?,
    };
    let server = MqttServer::new(scx)
        .listener_by_id(tcp, 1)
        .listener_by_id(tls_l, 2)
        .build();
    // Not `MqttServer::start()`: it calls `std::process::exit(1)` when a listener fails.
    tokio::spawn(async move {
        if let Err(e) = server.run().await {
            eprintln!("rmqtt stopped: {e}");
        }
    });
    Ok(endpoints)
}

/// Outpost's auth and ACL. Superusers (the server's client) bypass the ACL hooks inside
/// rmqtt itself; devices get exactly their own subtree.
struct OutpostAcl {
    dropped: DropCounter,
}

#[async_trait]
impl Handler for OutpostAcl {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(ci) => {
                let id = ci.id();
                let verdict = authenticate(
                    &id.client_id,
                    ci.username().map(|u| &u[..]),
                    ci.password().map(|p| &p[..]),
                );
                let res = match verdict {
                    Some(superuser) => AuthResult::Allow(superuser, None),
                    None => AuthResult::BadUsernameOrPassword,
                };
                (false, Some(HookResult::AuthResult(res)))
            }
            Parameter::ClientSubscribeCheckAcl(s, sub) => {
                let res = if device_may_use(&s.id.client_id, &sub.topic_filter) {
                    SubscribeAclResult::new_success(sub.opts.qos(), None)
                } else {
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(res)))
            }
            Parameter::MessagePublishCheckAcl(s, p) => {
                let res = if device_may_use(&s.id.client_id, &p.topic) {
                    PublishAclResult::allow()
                } else {
                    // Disconnect: an MQTT 3.1.1 client has no negative PUBACK to see.
                    PublishAclResult::rejected(true, None)
                };
                (false, Some(HookResult::PublishAclResult(res)))
            }
            Parameter::MessageDropped(to, _from, p, reason) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "rmqtt dropped message on {} to {:?}: {reason:?}",
                    p.topic,
                    to.as_ref().map(|t| t.client_id.clone())
                );
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

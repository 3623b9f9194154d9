//! rumqttd 0.20 configured in code: password hook only (it has no ACL hook), TLS via
//! rustls, router on its own threads (`Broker::start` blocks).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};

use anyhow::Result;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

use crate::common::{Endpoints, TlsFiles, authenticate};

/// Segment size of the router's in-memory log, MiB (rumqttd.toml ships 100 MiB x 10).
pub fn start(tls: &TlsFiles, segment_mib: usize) -> Result<Endpoints> {
    // rumqttd binds the address itself and does not report it: reserve a free port first
    // (a small race, acceptable for a bench).
    let tcp = free_port()?;
    let tls_addr = free_port()?;
    let connections = || {
        let mut c = ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 1024 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        c.set_auth_handler(|client_id: String, user: String, pass: String| async move {
            authenticate(&client_id, Some(&user), Some(pass.as_bytes())).is_some()
        });
        c
    };
    let mut v4 = HashMap::new();
    v4.insert(
        "tcp".to_string(),
        ServerSettings {
            name: "tcp".into(),
            listen: tcp,
            tls: None,
            next_connection_delay_ms: 0,
            connections: connections(),
        },
    );
    v4.insert(
        "tls".to_string(),
        ServerSettings {
            name: "tls".into(),
            listen: tls_addr,
            tls: Some(TlsConfig::Rustls {
                capath: None,
                certpath: tls.cert.display().to_string(),
                keypath: tls.key.display().to_string(),
            }),
            next_connection_delay_ms: 0,
            connections: connections(),
        },
    );
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 20_000,
            max_outgoing_packet_count: 200,
            max_segment_size: segment_mib * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::spawn(move || {
        let mut broker = Broker::new(config);
        if let Err(e) = broker.start() {
            eprintln!("rumqttd stopped: {e}");
        }
    });
    Ok(Endpoints { tcp, tls: tls_addr })
}

fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

//! The server's MQTT link: one rumqttc client with a persistent session, subscribed to
//! [`wire::SERVER_FILTERS`] at QoS 1 with manual acknowledgements (a message is acked
//! only after [`Core::handle_device_message`] stored it and its reply was queued, so a
//! crash before that gets it redelivered).
//!
//! The broker is external (Mosquitto) today. An embedded broker would run in-process
//! and this same client would connect to it over loopback: nothing here changes.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocol::tuf::UtcTime;
use outpost_protocol::wire;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};

use super::{BrokerClient, Core, Outgoing};

/// Largest packet either way: a full chunk response plus MQTT overhead.
pub const MAX_PACKET: usize = wire::MAX_PAYLOAD + 16 * 1024;

/// A handle on the link: publish and observe the connection.
#[derive(Debug, Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    connected: watch::Receiver<bool>,
}

impl MqttHandle {
    /// Queues messages for the broker (QoS 1). Cancel-safe only between messages.
    pub async fn publish(&self, msgs: Vec<Outgoing>) -> Result<(), rumqttc::ClientError> {
        for m in msgs {
            self.client
                .publish(m.topic, QoS::AtLeastOnce, m.retain, m.payload)
                .await?;
        }
        Ok(())
    }

    /// Whether the link is up now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until the link is up, at most `timeout`. Returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

fn now() -> UtcTime {
    UtcTime::from_system_time(std::time::SystemTime::now())
}

/// Starts the link. The returned task ends when `shutdown` turns true.
pub fn spawn(
    core: Arc<Core>,
    cfg: BrokerClient,
    shutdown: watch::Receiver<bool>,
) -> (MqttHandle, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_credentials(cfg.username.clone(), cfg.password.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(false);
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    opts.set_manual_acks(true);
    opts.set_inflight(100);
    opts.set_request_channel_capacity(4096);
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (connected_tx, connected) = watch::channel(false);
    let handle = MqttHandle {
        client: client.clone(),
        connected,
    };
    let task = tokio::spawn(run(core, client, eventloop, connected_tx, shutdown));
    (handle, task)
}

async fn run(
    core: Arc<Core>,
    client: AsyncClient,
    mut eventloop: EventLoop,
    connected: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Unbounded, but the broker keeps at most its in-flight window of unacked QoS 1
    // messages outstanding to us, and we ack only after handling.
    let (tx, rx) = mpsc::unbounded_channel::<Publish>();
    let worker = tokio::spawn(worker(core.clone(), client.clone(), rx));
    let mut backoff = Duration::from_millis(100);
    loop {
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(100);
                let _ = connected.send(true);
                if !ack.session_present {
                    for f in wire::SERVER_FILTERS {
                        if let Err(e) = client.try_subscribe(f, QoS::AtLeastOnce) {
                            eprintln!("outpost-server: mqtt subscribe {f}: {e}");
                        }
                    }
                    // The broker lost our session and maybe its retained messages:
                    // publish every current assignment again (devices accept an equal
                    // counter with the same content as a redelivery).
                    let (c, cl) = (core.clone(), client.clone());
                    tokio::spawn(async move {
                        match tokio::task::spawn_blocking(move || c.current_assignments()).await {
                            Ok(Ok(msgs)) => {
                                let h = MqttHandle {
                                    client: cl,
                                    connected: watch::channel(true).1,
                                };
                                if let Err(e) = h.publish(msgs).await {
                                    eprintln!("outpost-server: republishing assignments: {e}");
                                }
                            }
                            Ok(Err(e)) => eprintln!("outpost-server: reading assignments: {e}"),
                            Err(e) => eprintln!("outpost-server: {e}"),
                        }
                    });
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if *connected.borrow() {
                    eprintln!("outpost-server: mqtt connection lost: {e}");
                }
                let _ = connected.send(false);
                // rumqttc reconnects on the next poll without waiting: back off here.
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    drop(tx);
    let _ = worker.await;
    let _ = client.try_disconnect();
}

/// Handles device messages one at a time, in arrival order (telemetry acks and
/// status updates of one device stay ordered).
async fn worker(core: Arc<Core>, client: AsyncClient, mut rx: mpsc::UnboundedReceiver<Publish>) {
    while let Some(p) = rx.recv().await {
        let c = core.clone();
        let (topic, payload) = (p.topic.clone(), p.payload.clone());
        let out =
            tokio::task::spawn_blocking(move || c.handle_device_message(&topic, &payload, now()))
                .await
                .unwrap_or_default();
        for m in out {
            if let Err(e) = client
                .publish(m.topic, QoS::AtLeastOnce, m.retain, m.payload)
                .await
            {
                eprintln!("outpost-server: mqtt publish: {e}");
            }
        }
        if let Err(e) = client.ack(&p).await {
            eprintln!("outpost-server: mqtt ack: {e}");
        }
    }
}

//! The criteria, written once against rumqttc and run against every broker.
//!
//! Waits are on events with timeouts; the only sleeps simulate a slow consumer or let
//! time pass on purpose (restart settle time, expiry), and say so.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::common::{self, BrokerProcess, Endpoints, SERVER_PASS, SERVER_USER, pw};

/// What a pump task reports from one client's event loop.
#[derive(Debug)]
pub enum Ev {
    /// An incoming PUBLISH.
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    /// SUBACK return codes (true = granted).
    SubAck(Vec<bool>),
    /// PUBACK for one of our publishes.
    PubAck,
    /// Connection error; the pump stops.
    Closed(String),
}

/// Polls `el` until CONNACK (or failure), bounded by `limit`.
pub async fn connect(o: MqttOptions, limit: Duration) -> Result<(AsyncClient, EventLoop)> {
    let (c, mut el) = common::client(o);
    let res = timeout(limit, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return if a.code == ConnectReturnCode::Success {
                        Ok(())
                    } else {
                        Err(anyhow!("refused: {:?}", a.code))
                    };
                }
                Ok(_) => {}
                Err(e) => return Err(anyhow!("connection error: {e}")),
            }
        }
    })
    .await;
    match res {
        Ok(Ok(())) => Ok((c, el)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow!("no CONNACK within {limit:?}")),
    }
}

/// Spawns a task polling `el` and forwarding the interesting events. When `slow` is
/// set, the task stops reading for that long after each PUBLISH (a slow consumer).
pub fn pump(mut el: EventLoop, slow: Option<Duration>) -> mpsc::UnboundedReceiver<Ev> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let ev = match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let ev = Ev::Publish {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    };
                    if tx.send(ev).is_err() {
                        return;
                    }
                    if let Some(d) = slow {
                        // Simulated slow consumer, not synchronisation.
                        tokio::time::sleep(d).await;
                    }
                    continue;
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => Ev::SubAck(
                    s.return_codes
                        .iter()
                        .map(|c| matches!(c, SubscribeReasonCode::Success(_)))
                        .collect(),
                ),
                Ok(Event::Incoming(Packet::PubAck(_))) => Ev::PubAck,
                Ok(_) => continue,
                Err(e) => {
                    let _ = tx.send(Ev::Closed(e.to_string()));
                    return;
                }
            };
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    rx
}

async fn next_matching<T>(
    rx: &mut mpsc::UnboundedReceiver<Ev>,
    limit: Duration,
    mut f: impl FnMut(&Ev) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, rx.recv()).await {
            Ok(Some(ev)) => {
                if let Some(t) = f(&ev) {
                    return Ok(t);
                }
                if let Ev::Closed(e) = ev {
                    bail!("connection closed: {e}");
                }
            }
            Ok(None) => bail!("pump ended"),
            Err(_) => bail!("timeout after {limit:?}"),
        }
    }
}

async fn suback(rx: &mut mpsc::UnboundedReceiver<Ev>) -> Result<Vec<bool>> {
    next_matching(rx, Duration::from_secs(5), |e| match e {
        Ev::SubAck(v) => Some(v.clone()),
        _ => None,
    })
    .await
}

async fn puback(rx: &mut mpsc::UnboundedReceiver<Ev>) -> Result<()> {
    next_matching(rx, Duration::from_secs(10), |e| {
        matches!(e, Ev::PubAck).then_some(())
    })
    .await
}

const WAIT: Duration = Duration::from_secs(5);

fn server_opts(addr: SocketAddr) -> MqttOptions {
    common::options(SERVER_USER, SERVER_PASS, addr, true)
}

/// Criterion 1: cross-device reads and writes, plus credential checks.
pub async fn acl(ep: &Endpoints) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let (srv, el) = connect(server_opts(ep.tcp), WAIT)
        .await
        .context("server connect")?;
    let mut srv_rx = pump(el, None);
    srv.subscribe("outpost/v1/devices/#", QoS::AtLeastOnce)
        .await?;
    out.push((
        "server subscribes outpost/v1/devices/#".into(),
        fmt_granted(&suback(&mut srv_rx).await?),
    ));

    let dev1 = || common::options("dev-1", &pw("dev-1"), ep.tcp, true);
    let (mut d1, el) = connect(dev1(), WAIT).await?;
    let mut d1_rx = pump(el, None);
    for filter in [
        "#",
        "outpost/v1/devices/+/assignment",
        "outpost/v1/devices/#",
        "outpost/v1/devices/dev-2/#",
        "$SYS/#",
        "outpost/v1/devices/dev-1/#",
    ] {
        let r = match d1.subscribe(filter, QoS::AtLeastOnce).await {
            Ok(()) => suback(&mut d1_rx).await.map(|g| fmt_granted(&g)),
            Err(e) => Err(anyhow!("{e}")),
        };
        let r = r.unwrap_or_else(|e| format!("error/disconnect: {e}"));
        if r.starts_with("error") {
            let (c, el) = connect(dev1(), WAIT).await?;
            (d1, d1_rx) = (c, pump(el, None));
        }
        out.push((format!("dev-1 subscribes {filter}"), r));
    }

    // Fresh session holding a cross-device wildcard (if the broker grants it) and its own.
    let (c, el) = connect(dev1(), WAIT).await?;
    (d1, d1_rx) = (c, pump(el, None));
    for filter in [
        "outpost/v1/devices/+/assignment",
        "outpost/v1/devices/dev-1/#",
    ] {
        d1.subscribe(filter, QoS::AtLeastOnce).await?;
        suback(&mut d1_rx).await?;
    }

    // Reads: the server writes dev-2's assignment, then dev-1's. Per-publisher ordering
    // means anything leaked to dev-1 arrives before its own message.
    srv.publish(
        "outpost/v1/devices/dev-2/assignment",
        QoS::AtLeastOnce,
        false,
        "secret-of-dev-2",
    )
    .await?;
    srv.publish(
        "outpost/v1/devices/dev-1/assignment",
        QoS::AtLeastOnce,
        false,
        "mine",
    )
    .await?;
    let mut leaked = Vec::new();
    let got_own = next_matching(&mut d1_rx, WAIT, |e| match e {
        Ev::Publish { topic, payload, .. } => {
            if !topic.starts_with("outpost/v1/devices/dev-1/") {
                leaked.push(topic.clone());
            }
            (payload == b"mine").then_some(())
        }
        _ => None,
    })
    .await;
    out.push((
        "dev-1 receives another device's assignment".into(),
        match got_own {
            Ok(()) if leaked.is_empty() => "no (own message arrived, nothing else)".into(),
            Ok(()) => format!("YES: {leaked:?}"),
            Err(e) => format!("own message missing: {e}"),
        },
    ));

    // Writes: dev-1 spoofs dev-2's telemetry, then writes a marker on its own topic.
    d1.publish(
        "outpost/v1/devices/dev-2/telemetry",
        QoS::AtLeastOnce,
        false,
        "spoof",
    )
    .await?;
    let spoof_ack = next_matching(&mut d1_rx, WAIT, |e| match e {
        Ev::PubAck => Some("PUBACK".to_string()),
        Ev::Closed(e) => Some(format!("disconnected ({e})")),
        _ => None,
    })
    .await
    .unwrap_or_else(|e| format!("no answer: {e}"));
    let d1 = if spoof_ack.starts_with("disconnected") {
        let (c, el) = connect(common::options("dev-1", &pw("dev-1"), ep.tcp, true), WAIT).await?;
        d1_rx = pump(el, None);
        c
    } else {
        d1
    };
    d1.publish(
        "outpost/v1/devices/dev-1/telemetry",
        QoS::AtLeastOnce,
        false,
        "marker",
    )
    .await?;
    let mut spoofed = false;
    let marker = next_matching(&mut srv_rx, WAIT, |e| match e {
        Ev::Publish { topic, payload, .. } => {
            spoofed |= topic == "outpost/v1/devices/dev-2/telemetry";
            (payload == b"marker").then_some(())
        }
        _ => None,
    })
    .await;
    out.push(("dev-1 spoof publish answered with".into(), spoof_ack));
    out.push((
        "server receives dev-1's spoof on dev-2's topic".into(),
        match marker {
            Ok(()) if spoofed => "YES".into(),
            Ok(()) => "no (marker arrived, spoof did not)".into(),
            Err(e) => format!("marker missing: {e}"),
        },
    ));
    drop(d1_rx);

    for (label, cid, user, pass) in [
        ("wrong password", "dev-3", "dev-3", "pw-4"),
        ("username != client id", "dev-9", "dev-3", "pw-3"),
        (
            "device claims server user",
            "dev-3",
            SERVER_USER,
            SERVER_PASS,
        ),
    ] {
        let mut o = common::options(cid, pass, ep.tcp, true);
        o.set_credentials(user, pass);
        let r = match connect(o, WAIT).await {
            Ok(_) => "ACCEPTED".to_string(),
            Err(e) => format!("rejected ({e})"),
        };
        out.push((format!("connect with {label}"), r));
    }
    Ok(out)
}

fn fmt_granted(g: &[bool]) -> String {
    if g.iter().all(|x| *x) {
        "granted".into()
    } else {
        "refused".into()
    }
}

/// Result of [`slow_subscriber`].
#[derive(Debug)]
pub struct SlowReport {
    /// Messages published.
    pub published: usize,
    /// PUBACKs the publisher got.
    pub pubacks: usize,
    /// Distinct messages the subscriber got.
    pub received: usize,
    /// Duplicate deliveries.
    pub duplicates: usize,
    /// Connection errors the subscriber saw.
    pub sub_errors: usize,
    /// Seconds from first publish to last delivery.
    pub secs: f64,
}

/// Criterion 2: a slow QoS1 subscriber and a publisher sending `count` x `size`.
/// With `window`, the publisher keeps at most that many messages ahead of what the
/// subscriber has received (Outpost's pull-based chunk requests).
pub async fn slow_subscriber(
    ep: &Endpoints,
    count: usize,
    size: usize,
    delay: Duration,
    window: Option<usize>,
) -> Result<SlowReport> {
    let topic = "outpost/v1/devices/dev-1/chunks";
    let (sub, el) = connect(common::options("dev-1", &pw("dev-1"), ep.tcp, false), WAIT).await?;
    let mut sub_rx = pump(el, Some(delay));
    sub.subscribe(topic, QoS::AtLeastOnce).await?;
    if !suback(&mut sub_rx).await?.iter().all(|x| *x) {
        bail!("subscription refused");
    }
    let (srv, el) = connect(server_opts(ep.tcp), WAIT).await?;
    let mut srv_rx = pump(el, None);

    let (seen_tx, mut seen_rx) = tokio::sync::watch::channel(0usize);
    let collector = tokio::spawn(async move {
        let mut seen = BTreeSet::new();
        let mut dups = 0;
        let mut errors = 0;
        let mut last = Instant::now();
        // Ends when everything arrived or nothing arrived for 10 s.
        while seen.len() < count {
            match timeout(Duration::from_secs(10), sub_rx.recv()).await {
                Ok(Some(Ev::Publish { payload, .. })) => {
                    let seq = u32::from_be_bytes(payload[..4].try_into().unwrap_or_default());
                    if !seen.insert(seq) {
                        dups += 1;
                    }
                    last = Instant::now();
                    let _ = seen_tx.send(seen.len());
                }
                Ok(Some(Ev::Closed(_))) => {
                    errors += 1;
                    break;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        (seen.len(), dups, errors, last)
    });

    let start = Instant::now();
    let mut pubacks = 0;
    let mut payload = vec![0xA5u8; size];
    for i in 0..count {
        if let Some(w) = window {
            // Pull model: wait until the device has caught up to within the window.
            let _ = timeout(Duration::from_secs(30), seen_rx.wait_for(|n| i < n + w)).await;
        }
        payload[..4].copy_from_slice(&(i as u32).to_be_bytes());
        srv.publish(topic, QoS::AtLeastOnce, false, payload.clone())
            .await?;
        // Count acks as they come so the request channel never fills.
        while let Ok(ev) = srv_rx.try_recv() {
            if matches!(ev, Ev::PubAck) {
                pubacks += 1;
            }
        }
    }
    while pubacks < count {
        match puback(&mut srv_rx).await {
            Ok(()) => pubacks += 1,
            Err(_) => break,
        }
    }
    let (received, duplicates, sub_errors, last) = collector.await?;
    Ok(SlowReport {
        published: count,
        pubacks,
        received,
        duplicates,
        sub_errors,
        secs: last.duration_since(start).as_secs_f64(),
    })
}

/// Criterion 3: with `stalled` raw TCP connections open on the TLS port and silent,
/// how long a normal TLS client takes to get its CONNACK, or why it got none in 15 s.
pub async fn tls_stall(
    ep: &Endpoints,
    cert_pem: &[u8],
    stalled: usize,
) -> Result<std::result::Result<Duration, String>> {
    let mut idle = Vec::new();
    for _ in 0..stalled {
        idle.push(TcpStream::connect(ep.tls).await?);
    }
    let start = Instant::now();
    let r = connect(
        common::tls_options("dev-1", &pw("dev-1"), ep.tls, cert_pem),
        Duration::from_secs(15),
    )
    .await;
    let took = start.elapsed();
    drop(idle);
    Ok(r.map(|_| took).map_err(|e| format!("{e} after {took:?}")))
}

/// Publishes a retained assignment and waits for its PUBACK.
pub async fn publish_retained(ep: &Endpoints, topic: &str, payload: &str) -> Result<()> {
    let (srv, el) = connect(server_opts(ep.tcp), WAIT).await?;
    let mut rx = pump(el, None);
    srv.publish(topic, QoS::AtLeastOnce, true, payload.to_string())
        .await?;
    puback(&mut rx).await
}

/// Subscribes as `device` and returns the retained payload on `topic`, if one comes.
pub async fn fetch_retained(ep: &Endpoints, device: &str, topic: &str) -> Result<Option<String>> {
    let (c, el) = connect(common::options(device, &pw(device), ep.tcp, true), WAIT).await?;
    let mut rx = pump(el, None);
    c.subscribe(topic, QoS::AtLeastOnce).await?;
    if !suback(&mut rx).await?.iter().all(|x| *x) {
        bail!("subscription refused");
    }
    let r = next_matching(&mut rx, WAIT, |e| match e {
        Ev::Publish {
            payload,
            retain: true,
            ..
        } => Some(String::from_utf8_lossy(payload).into_owned()),
        _ => None,
    })
    .await;
    Ok(r.ok())
}

/// Criterion 4: retained message, SIGKILL `settle` after its PUBACK, restart, fetch.
pub async fn retain_restart(
    spawn: &dyn Fn(&Path) -> Result<BrokerProcess>,
    data: &Path,
    settle: Duration,
) -> Result<Option<String>> {
    let topic = "outpost/v1/devices/dev-1/assignment";
    let b = spawn(data)?;
    publish_retained(&b.endpoints, topic, "assignment-v7").await?;
    // Deliberate: how long the broker lives after the PUBACK is the variable under test.
    tokio::time::sleep(settle).await;
    b.kill()?;
    let b = spawn(data)?;
    fetch_retained(&b.endpoints, "dev-1", topic).await
}

/// Result of [`scale`].
#[derive(Debug)]
pub struct ScaleReport {
    /// Seconds for all clients to connect (with auth) and get their SUBACK.
    pub connect_subscribe_secs: f64,
    /// Clients that failed.
    pub failures: usize,
    /// Clients kept open (their pumps hold the event loops).
    pub clients: Vec<(AsyncClient, mpsc::UnboundedReceiver<Ev>)>,
}

/// `n` authenticated devices connect and subscribe to their own subtree, concurrently.
pub async fn scale(ep: &Endpoints, n: usize) -> Result<ScaleReport> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let addr = ep.tcp;
        tasks.push(tokio::spawn(async move {
            let id = format!("dev-{}", 1000 + i);
            let (c, el) = connect(
                common::options(&id, &pw(&id), addr, true),
                Duration::from_secs(60),
            )
            .await?;
            let mut rx = pump(el, None);
            c.subscribe(format!("outpost/v1/devices/{id}/#"), QoS::AtLeastOnce)
                .await?;
            let g = next_matching(&mut rx, Duration::from_secs(60), |e| match e {
                Ev::SubAck(v) => Some(v.clone()),
                _ => None,
            })
            .await?;
            if !g.iter().all(|x| *x) {
                bail!("refused");
            }
            Ok::<_, anyhow::Error>((c, rx))
        }));
    }
    let mut clients = Vec::new();
    let mut failures = 0;
    for t in tasks {
        match t.await? {
            Ok(c) => clients.push(c),
            Err(_) => failures += 1,
        }
    }
    Ok(ScaleReport {
        connect_subscribe_secs: start.elapsed().as_secs_f64(),
        failures,
        clients,
    })
}

//! `broker-eval serve BROKER DATA [opts]` runs one broker and prints `READY tcp=.. tls=..`.
//! `broker-eval eval BROKER [CRITERION..]` spawns `serve` children and measures.
//!
//! Criteria: acl, slow, slow-window, slow-small-queue, tls, retain, retain-expiry, scale[:N].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use broker_eval::common::{self, BrokerProcess};
use broker_eval::criteria;

fn main() -> Result<()> {
    common::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Runtime::new()?;
    match args.first().map(String::as_str) {
        Some("serve") => rt.block_on(serve(&args[1..])),
        Some("eval") => rt.block_on(eval(&args[1..])),
        _ => bail!(
            "usage: broker-eval serve BROKER DATA [--mqueue N] [--expiry-secs S] [--retained-ttl T] [--segment-mib M] | eval BROKER [CRITERION..]"
        ),
    }
}

#[cfg_attr(
    not(any(feature = "rmqtt-broker", feature = "rumqttd-broker")),
    allow(dead_code)
)]
fn opt<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

#[allow(unreachable_code, unused_variables)] // without broker features
async fn serve(args: &[String]) -> Result<()> {
    let broker = args.first().context("BROKER")?.as_str();
    let data = PathBuf::from(args.get(1).context("DATA")?);
    std::fs::create_dir_all(&data)?;
    let tls = common::tls_files(&data)?;
    let ep: common::Endpoints = match broker {
        #[cfg(feature = "rmqtt-broker")]
        "rmqtt" => {
            let mut t = broker_eval::rmqtt_broker::Tuning::default();
            if let Some(v) = opt(args, "--mqueue") {
                t.max_mqueue_len = v.parse()?;
            }
            if let Some(v) = opt(args, "--expiry-secs") {
                t.message_expiry = Duration::from_secs(v.parse()?);
            }
            if let Some(v) = opt(args, "--retained-ttl") {
                t.retained_ttl = v.to_string();
            }
            broker_eval::rmqtt_broker::start(&data, &tls, &t, Default::default()).await?
        }
        #[cfg(feature = "rumqttd-broker")]
        "rumqttd" => {
            let seg = opt(args, "--segment-mib").unwrap_or("100").parse()?;
            let ep = broker_eval::rumqttd_broker::start(&tls, seg)?;
            // rumqttd binds on its own threads: wait until both ports accept.
            for addr in [ep.tcp, ep.tls] {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while tokio::net::TcpStream::connect(addr).await.is_err() {
                    if std::time::Instant::now() > deadline {
                        bail!("rumqttd did not bind {addr}");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            ep
        }
        other => bail!("broker {other:?} not compiled in"),
    };
    println!("READY tcp={} tls={}", ep.tcp, ep.tls);
    std::future::pending::<()>().await;
    Ok(())
}

async fn eval(args: &[String]) -> Result<()> {
    let broker = args.first().context("BROKER")?.clone();
    let all = [
        "acl",
        "slow",
        "slow-window",
        "slow-small-queue",
        "tls",
        "retain",
        "retain-expiry",
        "scale",
    ];
    let wanted: Vec<String> = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        all.iter().map(|s| s.to_string()).collect()
    };
    let tmp = tempfile::tempdir()?;
    let extra = |flags: &[&str]| flags.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let spawn_with = |dir: &Path, flags: &[&str]| BrokerProcess::spawn(&broker, dir, &extra(flags));
    for (n, c) in wanted.iter().enumerate() {
        let dir = tmp.path().join(format!("{n}-{c}"));
        println!("== {broker} / {c}");
        match c.as_str() {
            "acl" => {
                let b = spawn_with(&dir, &[])?;
                for (k, v) in criteria::acl(&b.endpoints).await? {
                    println!("  {k}: {v}");
                }
            }
            "slow" | "slow-window" | "slow-small-queue" => {
                let (flags, window): (&[&str], _) = match c.as_str() {
                    "slow" => (&[], None),
                    "slow-window" => (&["--mqueue", "50"], Some(16)),
                    _ => (&["--mqueue", "50", "--segment-mib", "1"], None),
                };
                let b = spawn_with(&dir, flags)?;
                let r = criteria::slow_subscriber(
                    &b.endpoints,
                    200,
                    64 * 1024,
                    Duration::from_millis(20),
                    window,
                )
                .await?;
                println!("  flags {flags:?} window {window:?}: {r:?}");
                println!(
                    "  silently lost: {}",
                    if r.pubacks == r.published && r.received < r.published && r.sub_errors == 0 {
                        format!("YES, {} of {}", r.published - r.received, r.published)
                    } else {
                        "no".into()
                    }
                );
            }
            "tls" => {
                let b = spawn_with(&dir, &[])?;
                let cert = common::tls_files(&dir)?.cert_pem;
                for stalled in [0, 1, 50] {
                    let r = criteria::tls_stall(&b.endpoints, &cert, stalled).await?;
                    println!("  {stalled} stalled TCP connections -> TLS CONNACK after {r:?}");
                }
            }
            "retain" => {
                for settle in [0, 200, 600, 2000].map(Duration::from_millis) {
                    let d = dir.join(format!("settle-{}", settle.as_millis()));
                    let r = criteria::retain_restart(&|p| spawn_with(p, &[]), &d, settle).await?;
                    println!("  SIGKILL {settle:?} after PUBACK, restart -> retained: {r:?}");
                }
            }
            "retain-expiry" => {
                for ttl in ["", "0s"] {
                    let d = dir.join(format!("ttl-{ttl}"));
                    let b = spawn_with(&d, &["--expiry-secs", "2", "--retained-ttl", ttl])?;
                    let topic = "outpost/v1/devices/dev-1/assignment";
                    criteria::publish_retained(&b.endpoints, topic, "assignment-v7").await?;
                    // Deliberate: let the 2 s message expiry pass.
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    let r = criteria::fetch_retained(&b.endpoints, "dev-1", topic).await?;
                    println!(
                        "  message expiry 2 s, retained_ttl {ttl:?}, after 4 s -> retained: {r:?}"
                    );
                }
            }
            c if c == "scale" || c.starts_with("scale:") => {
                let n: usize = c.strip_prefix("scale:").unwrap_or("1000").parse()?;
                let b = spawn_with(&dir, &[])?;
                let idle = b.rss_kib()?;
                let threads = b.threads()?;
                let r = criteria::scale(&b.endpoints, n).await?;
                // Let the broker settle before reading memory.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let loaded = b.rss_kib()?;
                println!(
                    "  {n} clients connect+subscribe: {:.2} s, failures {}; broker RSS idle {} KiB -> {} KiB with {n} connections; threads {} -> {}",
                    r.connect_subscribe_secs,
                    r.failures,
                    idle,
                    loaded,
                    threads,
                    b.threads()?
                );
                drop(r.clients);
            }
            other => bail!("unknown criterion {other}"),
        }
    }
    Ok(())
}

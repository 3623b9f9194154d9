//! The `outpost-server` binary.
//!
//! Exit codes: 0 success; 1 failure (for `demo`: a check did not hold; for `serve`: it
//! could not start or stopped on an error).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use outpost_server::demo::{
    DEFAULT_FIXTURES, DEFAULT_MOSQUITTO_CONFIG, DemoBroker, DemoOptions, DemoPart, run_demo,
};
use outpost_server::server::broker::{EmbeddedConfig, TlsListener};
use outpost_server::server::repository::OnlineExpiries;
use outpost_server::server::{BrokerClient, BrokerLink, ServeConfig};

#[derive(Parser)]
#[command(name = "outpost-server", version, about = "The Outpost fleet server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the fleet server: REST API, image repository, director, MQTT link.
    Serve(ServeArgs),
    /// Run the end-to-end demo in a temporary directory: a server and several agents
    /// with simulated traffic, a rollout by full model and one by delta, a summary of
    /// bytes, telemetry and accuracy proxies; then the trust checks (attacks refused).
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Which part: all (fleet, then trust), fleet, trust.
    #[arg(value_enum, default_value = "all")]
    part: PartArg,
    /// Model fixtures directory (tests/fixtures/models of a source checkout).
    #[arg(long, default_value = DEFAULT_FIXTURES)]
    fixtures: PathBuf,
    /// Keep the demo's files in this directory instead of a temporary one.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Devices (agent processes) in the fleet part.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=50))]
    devices: u16,
    /// Simulated inferences per second per device.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Longest wait for any one step, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// The fleet part's broker: the embedded one, or Mosquitto with docs/mosquitto/.
    #[arg(long, value_enum, default_value = "embedded")]
    broker: BrokerArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PartArg {
    All,
    Fleet,
    Trust,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BrokerArg {
    Embedded,
    Mosquitto,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Data directory (database, repository copy, artifacts, admin.token).
    #[arg(long)]
    data: PathBuf,
    /// On first start: operator repository to import (its metadata/ and the three
    /// online keys keys/{timestamp,snapshot,director}.json; root and release keys are
    /// never read).
    #[arg(long)]
    import_repo: Option<PathBuf>,
    /// HTTP listen address; the bound address is printed.
    #[arg(long, default_value = "127.0.0.1:0")]
    http: SocketAddr,
    /// Once every listener is bound, write their addresses to this file as JSON
    /// (`{"http": "127.0.0.1:8080", "mqtt": ..., "mqtts": ...}`, null for a listener that
    /// is off), atomically: a script that sees the file can read it whole. With port 0
    /// for each listener, this is how tests learn the ports the system chose.
    #[arg(long)]
    ports_file: Option<PathBuf>,
    /// External MQTT broker (Mosquitto), mqtt://host:port. Without it the server runs
    /// its embedded broker (see --mqtt, --mqtts).
    #[arg(long)]
    broker: Option<String>,
    /// Embedded broker: plain MQTT device listener; the bound address is printed
    /// (`outpost-server: mqtt://ADDR`). Passwords cross it in clear text: loopback or
    /// a trusted network only (e.g. 0.0.0.0:1883 on a private LAN).
    #[arg(long, default_value = "127.0.0.1:0", conflicts_with = "broker")]
    mqtt: SocketAddr,
    /// Embedded broker: no plain device listener (TLS only).
    #[arg(long, conflicts_with = "broker", requires = "mqtts")]
    no_plain_mqtt: bool,
    /// Embedded broker: MQTT over TLS device listener, e.g. 0.0.0.0:8883; needs
    /// --tls-cert and --tls-key. The bound address is printed (`outpost-server: mqtts://ADDR`).
    #[arg(long, conflicts_with = "broker", requires_all = ["tls_cert", "tls_key"])]
    mqtts: Option<SocketAddr>,
    /// PEM certificate chain of the TLS listener (leaf first).
    #[arg(long, requires = "mqtts")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listener.
    #[arg(long, requires = "mqtts")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate that devices trust for --mqtts: `outpostctl devices bundle`
    /// writes it into bundles as ca.pem. Without it, devices use their system trust store
    /// (a publicly trusted --tls-cert).
    #[arg(long, requires = "mqtts")]
    tls_ca: Option<PathBuf>,
    /// The server's broker username.
    #[arg(long, default_value = "outpost-server")]
    broker_user: String,
    /// File holding the server's broker password (one line).
    #[arg(long)]
    broker_password_file: Option<PathBuf>,
    /// Mosquitto password file to maintain (the server's user and every device).
    /// Reload Mosquitto (SIGHUP) after devices are added or their credentials rotated.
    #[arg(long)]
    mosquitto_passwd_file: Option<PathBuf>,
    /// Lifetime of director assignments, in seconds.
    #[arg(long, default_value_t = 30 * 86_400, value_parser = clap::value_parser!(i64).range(2..))]
    assignment_expiry_secs: i64,
    /// Assignments that expire within this many seconds are re-signed with the next
    /// counter and re-published; below --assignment-expiry-secs.
    #[arg(long, default_value_t = 7 * 86_400, value_parser = clap::value_parser!(i64).range(1..))]
    assignment_renew_secs: i64,
}

/// What holds and what does not in embedded mode (docs/broker.md), said at every start.
const EMBEDDED_LIMITS: &str = "outpost-server: embedded broker (rmqtt): device auth against \
the device table and per-device topic ACL hold; retained assignments are kept in memory and \
re-published from SQLite at every start; a QoS 1 message beyond a subscriber's queue of 1000 is \
dropped (chunk windows and telemetry acks stay below it; drops are logged); one process only \
(use --broker with Mosquitto for more)";

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.assignment_renew_secs >= args.assignment_expiry_secs {
        anyhow::bail!(
            "--assignment-renew-secs ({}) must be below --assignment-expiry-secs ({})",
            args.assignment_renew_secs,
            args.assignment_expiry_secs
        );
    }
    let broker = match &args.broker {
        Some(url) => {
            let (host, port) = BrokerClient::parse_url(url)?;
            let pw_file = args
                .broker_password_file
                .as_ref()
                .context("--broker needs --broker-password-file")?;
            let password = std::fs::read_to_string(pw_file)
                .with_context(|| format!("reading {}", pw_file.display()))?
                .trim()
                .to_owned();
            BrokerLink::External(BrokerClient {
                host,
                port,
                client_id: args.broker_user.clone(),
                username: args.broker_user.clone(),
                password,
            })
        }
        None => BrokerLink::Embedded(EmbeddedConfig {
            mqtt: (!args.no_plain_mqtt).then_some(args.mqtt),
            mqtts: args.mqtts.map(|addr| TlsListener {
                addr,
                cert: args.tls_cert.clone().unwrap_or_default(),
                key: args.tls_key.clone().unwrap_or_default(),
                ca: args.tls_ca.clone(),
            }),
            server_user: args.broker_user.clone(),
        }),
    };
    let cfg = ServeConfig {
        data_dir: args.data,
        import_repo: args.import_repo,
        http: args.http,
        broker,
        mosquitto_passwd_file: args.mosquitto_passwd_file,
        expiries: OnlineExpiries {
            assignment_secs: args.assignment_expiry_secs,
            assignment_renew_secs: args.assignment_renew_secs,
            ..OnlineExpiries::default()
        },
    };
    let args_ports_file = args.ports_file;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let server = outpost_server::server::start(cfg).await?;
        // The first line is the bound address (scripts read it); a closed stdout must
        // not stop the server.
        use std::io::Write as _;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "outpost-server: http://{}", server.http_addr);
        if let Some(b) = &server.embedded {
            if let Some(a) = b.mqtt_addr {
                let _ = writeln!(out, "outpost-server: mqtt://{a}");
                eprintln!(
                    "outpost-server: embedded broker: plain MQTT devices on {a}: passwords \
                     cross it in clear text, use it on loopback or a trusted network only; \
                     use --mqtts (TLS) on untrusted networks"
                );
            }
            if let Some(a) = b.mqtts_addr {
                let _ = writeln!(out, "outpost-server: mqtts://{a}");
            }
            eprintln!("{}", EMBEDDED_LIMITS);
        }
        if let Some(p) = &server.admin_token_file {
            let _ = writeln!(
                out,
                "outpost-server: admin token written to {}",
                p.display()
            );
        }
        let _ = out.flush();
        if let Some(path) = &args_ports_file {
            write_ports_file(path, &server)?;
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c")?,
            _ = term.recv() => {}
        }
        server.shutdown().await;
        anyhow::Ok(())
    })
}

/// Writes the bound addresses as JSON to a temporary file beside `path`, then renames
/// it over `path` (a reader never sees a partial file).
fn write_ports_file(
    path: &std::path::Path,
    server: &outpost_server::server::RunningServer,
) -> anyhow::Result<()> {
    let embedded = server.embedded.as_ref();
    let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string());
    let json = serde_json::json!({
        "http": server.http_addr.to_string(),
        "mqtt": addr(embedded.and_then(|b| b.mqtt_addr)),
        "mqtts": addr(embedded.and_then(|b| b.mqtts_addr)),
    });
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{json}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("outpost-server serve: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Demo(args) => {
            let mut opts = DemoOptions::new(args.fixtures);
            opts.work_dir = args.keep;
            opts.part = match args.part {
                PartArg::All => DemoPart::All,
                PartArg::Fleet => DemoPart::Fleet,
                PartArg::Trust => DemoPart::Trust,
            };
            opts.devices = usize::from(args.devices);
            opts.rate = args.rate;
            opts.timeout = std::time::Duration::from_secs(args.timeout_secs);
            opts.broker = match args.broker {
                BrokerArg::Embedded => DemoBroker::Embedded,
                BrokerArg::Mosquitto => DemoBroker::Mosquitto(DEFAULT_MOSQUITTO_CONFIG.into()),
            };
            match run_demo(&opts) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("outpost-server demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

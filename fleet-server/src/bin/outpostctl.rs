//! `outpostctl`: the operator CLI.
//!
//! Exit codes: 0 success, 1 the operation failed (the message says why), 2 bad usage
//! (clap's own exit code).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use outpost_protocol::release::ModelRelease;
use outpost_protocol::tuf::time::UtcTime;
use outpost_server::keys::SealCost;
use outpost_server::repo::{Expiries, InitOptions, Repo, RootRotation};
use outpost_server::server::client::{ApiClient, push_release, push_root};

// Not under src/bin/ directly: cargo would take it for a binary.
#[path = "outpostctl/device_target.rs"]
mod device_target;

#[derive(Parser)]
#[command(
    name = "outpostctl",
    version,
    about = "Operate an Outpost fleet: keys, releases, devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The image repository: keys and metadata.
    #[command(subcommand)]
    Repo(RepoCmd),
    /// Model releases: sign, revoke, list.
    #[command(subcommand)]
    Release(ReleaseCmd),
    /// Root metadata: rotate keys, change thresholds.
    #[command(subcommand)]
    Root(RootCmd),
    /// Devices on the fleet server: provision, bundle, list.
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// Models and releases held by the fleet server.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Model deltas: what the server sends instead of a full model.
    #[command(subcommand)]
    Delta(DeltaCmd),
    /// Assign a release to devices (by id and/or tag) on the fleet server.
    Assign {
        #[command(flatten)]
        server: ServerArg,
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
        /// Device id. Repeatable.
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Devices carrying this tag (k=v). Repeatable: all must match.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
}

#[derive(Subcommand)]
enum DeltaCmd {
    /// Encode the smallest delta from BASE to TARGET (every codec is tried; prints the
    /// codec, the delta size and the size of the full model compressed alone).
    Encode {
        /// The model the device has.
        #[arg(long)]
        base: PathBuf,
        /// The new model.
        #[arg(long)]
        target: PathBuf,
        /// Where to write the delta.
        #[arg(long)]
        out: PathBuf,
    },
    /// Apply a delta to BASE; the result is checked against the hash in the delta.
    Apply {
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        delta: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Refuse targets longer than this many bytes.
        #[arg(long, default_value_t = 1 << 31)]
        max_len: u64,
    },
}

fn delta_cmd(cmd: DeltaCmd) -> anyhow::Result<()> {
    use outpost_protocol::delta::{self, Best};
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    match cmd {
        DeltaCmd::Encode { base, target, out } => {
            let (base, target_bytes) = (read(&base)?, read(&target)?);
            let (codec, bytes, full) = match delta::encode_best(&base, &target_bytes)? {
                Best::Delta {
                    codec,
                    delta,
                    full_zstd_len,
                } => (codec.to_string(), delta, full_zstd_len),
                Best::Full {
                    codec,
                    full_zstd_len,
                    ..
                } => (
                    format!("{codec} (full model compressed alone is smaller)"),
                    delta::encode(&base, &target_bytes, codec, delta::DEFAULT_LEVEL)?,
                    full_zstd_len,
                ),
                other => anyhow::bail!("unexpected encoder choice {other:?}"),
            };
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "codec {codec}: delta {} bytes, target {} bytes, full zstd -19 {full} bytes",
                bytes.len(),
                target_bytes.len()
            );
        }
        DeltaCmd::Apply {
            base,
            delta: d,
            out,
            max_len,
        } => {
            let target = delta::apply(&read(&base)?, &read(&d)?, max_len)?;
            std::fs::write(&out, &target).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} bytes, hash checked)",
                out.display(),
                target.len()
            );
        }
    }
    Ok(())
}

#[derive(Args)]
struct ServerArg {
    /// Fleet server URL (default: $OUTPOST_SERVER).
    #[arg(long)]
    server: Option<String>,
    /// API token (default: $OUTPOST_TOKEN).
    #[arg(long)]
    token: Option<String>,
}

impl ServerArg {
    fn client(&self) -> anyhow::Result<ApiClient> {
        let from = |flag: &Option<String>, var: &str| {
            flag.clone()
                .or_else(|| std::env::var(var).ok().filter(|v| !v.is_empty()))
                .with_context(|| {
                    format!(
                        "pass --{} or set {var}",
                        var.trim_start_matches("OUTPOST_").to_lowercase()
                    )
                })
        };
        Ok(ApiClient::new(
            &from(&self.server, "OUTPOST_SERVER")?,
            &from(&self.token, "OUTPOST_TOKEN")?,
        ))
    }
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("tag {s:?} must be key=value"))
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Every release the server holds, by model, with the artifacts devices can fetch
    /// (full file and deltas from earlier releases, smallest first).
    List {
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Subcommand)]
enum DevicesCmd {
    /// Create a device and its broker credentials.
    Add {
        #[command(flatten)]
        server: ServerArg,
        #[arg(long)]
        id: String,
        /// Tag (k=v). Repeatable.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Write a device bundle: agent.toml, credentials (0600, a new password), root.json,
    /// and ca.pem for an mqtts:// broker whose CA the server or --ca-file provides.
    Bundle {
        #[command(flatten)]
        server: ServerArg,
        #[arg(long)]
        id: String,
        /// Output directory (created; existing bundle files are replaced).
        #[arg(long)]
        out: PathBuf,
        /// Broker URL the device connects to [default: the embedded broker's TLS
        /// listener (mqtts://), else its plain one, at the --server host].
        #[arg(long)]
        broker_url: Option<String>,
        /// PEM CA certificate the device trusts for an mqtts:// --broker-url (an external
        /// broker's, e.g. Mosquitto with TLS); copied into the bundle as ca.pem. Default:
        /// the CA of the server's TLS listener (`serve --tls-ca`), if any.
        #[arg(long, requires = "broker_url")]
        ca_file: Option<PathBuf>,
        /// The agent's data directory on the device.
        #[arg(long)]
        data_dir: Option<String>,
        /// Also put the agent binary for this Linux device target (e.g.
        /// aarch64-unknown-linux-gnu) and a systemd unit into the bundle.
        #[arg(long)]
        target: Option<String>,
        /// The agent binary for --target (default: where `targets/build.sh TRIPLE` writes
        /// it, $OUTPOST_CROSS_TARGET_DIR/dist/TRIPLE/outpost-agent).
        #[arg(long, requires = "target")]
        agent_bin: Option<PathBuf>,
        /// Where the bundle directory is copied on the device, for the systemd unit
        /// [default: /opt/outpost].
        #[arg(long, requires = "target")]
        install_dir: Option<String>,
    },
    /// List devices and their state.
    List {
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Subcommand)]
enum RepoCmd {
    /// Create a repository: N offline root keys (threshold K), a release key, and online
    /// timestamp, snapshot and director keys for the server. Keys are written with mode
    /// 0600 and never printed. With OUTPOST_KEY_PASSPHRASE set, offline keys are sealed.
    Init {
        /// Directory to create (must be empty or absent).
        #[arg(long)]
        dir: PathBuf,
        /// Number of offline root keys.
        #[arg(long, default_value_t = 1)]
        root_keys: usize,
        /// Root signatures required.
        #[arg(long, default_value_t = 1)]
        root_threshold: u64,
    },
    /// Re-sign snapshot and timestamp with fresh expiries (needs the online keys).
    Refresh {
        #[command(flatten)]
        repo: RepoArg,
    },
}

#[derive(Args)]
struct RepoArg {
    /// Repository directory.
    #[arg(long)]
    repo: PathBuf,
}

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Add a model as a signed target with its release metadata.
    Sign {
        /// The model file (.onnx).
        model_file: PathBuf,
        #[command(flatten)]
        repo: RepoArg,
        /// Model slot name (devices run one release per model).
        #[arg(long)]
        model: String,
        /// Version string of this release.
        #[arg(long)]
        version: String,
        /// Release-info JSON (io spec, reference statistics, calibrator, golden vectors,
        /// budgets). Default: MODEL_FILE with `.onnx` replaced by `.release.json`.
        #[arg(long)]
        release_info: Option<PathBuf>,
    },
    /// Remove a release from targets; devices then refuse assignments to it.
    Revoke {
        #[command(flatten)]
        repo: RepoArg,
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
    },
    /// List signed releases.
    List {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Upload a signed release (model file and targets metadata) to the fleet server.
    Push {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        server: ServerArg,
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
    },
}

#[derive(Subcommand)]
enum RootCmd {
    /// Write the next root version: add, remove or replace keys, change the threshold.
    /// Signed by a threshold of the current and of the new root keys.
    Rotate {
        #[command(flatten)]
        repo: RepoArg,
        /// Generate this many new root keys.
        #[arg(long, default_value_t = 0)]
        add_keys: usize,
        /// Remove the root key with this id (or unique id prefix). Repeatable.
        #[arg(long = "remove-key")]
        remove_keys: Vec<String>,
        /// New root threshold.
        #[arg(long)]
        threshold: Option<u64>,
        /// Replace the key of a role (targets, snapshot, timestamp, director). Repeatable.
        #[arg(long = "replace-role-key")]
        replace_roles: Vec<String>,
    },
    /// Upload the root versions the fleet server does not have yet, oldest first (with
    /// targets.json when a rotation replaced the release key). Devices fetch them at
    /// their next refresh.
    Push {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        server: ServerArg,
    },
}

fn passphrase() -> Option<String> {
    std::env::var("OUTPOST_KEY_PASSPHRASE")
        .ok()
        .filter(|p| !p.is_empty())
}

fn now() -> UtcTime {
    UtcTime::from_system_time(std::time::SystemTime::now())
}

fn write_file(path: &std::path::Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp-write");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The agent binary for a device target, checked to run there.
fn target_agent(
    triple: &str,
    agent_bin: Option<PathBuf>,
) -> anyhow::Result<(device_target::DeviceTarget, Vec<u8>)> {
    let target = device_target::DeviceTarget::parse(triple)?;
    let path = agent_bin
        .unwrap_or_else(|| target.default_agent_bin(std::env::var_os("OUTPOST_CROSS_TARGET_DIR")));
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading the agent binary {} (build it with targets/build.sh {triple}, or pass --agent-bin)",
            path.display()
        )
    })?;
    let header = &bytes[..bytes.len().min(device_target::ELF_HEADER_LEN)];
    target
        .check_agent_binary(header)
        .with_context(|| path.display().to_string())?;
    Ok((target, bytes))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Release(ReleaseCmd::Push {
            repo,
            server,
            model,
            version,
        }) => {
            let r = push_release(
                &server.client()?,
                &Repo::open(&repo.repo, passphrase())?,
                &model,
                &version,
            )?;
            for rel in r["releases"].as_array().into_iter().flatten() {
                println!(
                    "uploaded {} {} ({})",
                    rel["model"].as_str().unwrap_or("?"),
                    rel["version"].as_str().unwrap_or("?"),
                    rel["path"].as_str().unwrap_or("?")
                );
                for a in rel["artifacts"].as_array().into_iter().flatten() {
                    println!(
                        "  {}\t{} bytes{}",
                        a["kind"].as_str().unwrap_or("?"),
                        a["length"],
                        a["base"]
                            .as_str()
                            .map(|b| format!("\tfrom {}", &b[..b.len().min(12)]))
                            .unwrap_or_default()
                    );
                }
            }
        }
        Command::Devices(DevicesCmd::Add { server, id, tags }) => {
            let tags: std::collections::BTreeMap<_, _> = tags.into_iter().collect();
            let r = server.client()?.post(
                "/api/v1/devices",
                &serde_json::json!({"id": id, "tags": tags}),
            )?;
            println!("created device {id}");
            if r["broker_reload_required"] == true {
                println!("reload the broker (SIGHUP to mosquitto) so that the device can connect");
            }
            println!("write its bundle with: outpostctl devices bundle --id {id} --out DIR");
        }
        Command::Devices(DevicesCmd::Bundle {
            server,
            id,
            out,
            broker_url,
            ca_file,
            data_dir,
            target,
            agent_bin,
            install_dir,
        }) => {
            // Checked before the server rotates the device's password.
            let device_files = match &target {
                Some(triple) => Some(target_agent(triple, agent_bin)?),
                None => None,
            };
            let own_ca = match &ca_file {
                Some(p) => {
                    if !broker_url
                        .as_deref()
                        .is_some_and(|u| u.starts_with("mqtts://"))
                    {
                        anyhow::bail!("--ca-file needs an mqtts:// --broker-url");
                    }
                    let pem = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    if !pem.contains("-----BEGIN CERTIFICATE-----") {
                        anyhow::bail!("{} holds no PEM certificate", p.display());
                    }
                    Some(pem)
                }
                None => None,
            };
            let r = server.client()?.post(
                &format!("/api/v1/devices/{id}/bundle"),
                &serde_json::json!({"broker_url": broker_url, "data_dir": data_dir}),
            )?;
            let field = |k: &str| {
                r[k].as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("server answer lacks {k}"))
            };
            let mut agent_toml = field("agent_toml")?;
            let ca_pem = own_ca.or_else(|| r["ca_pem"].as_str().map(str::to_owned));
            if ca_pem.is_some() {
                let mut config = outpost_protocol::bundle::AgentConfig::from_toml(&agent_toml)
                    .context("the server's agent.toml")?;
                config.broker.ca_file = Some("ca.pem".into());
                config.validate()?;
                agent_toml = config.to_toml();
            }
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            if let Some(pem) = &ca_pem {
                write_file(&out.join("ca.pem"), pem.as_bytes(), 0o644)?;
            }
            write_file(&out.join("agent.toml"), agent_toml.as_bytes(), 0o644)?;
            write_file(
                &out.join("credentials"),
                format!("{}\n", field("credentials")?).as_bytes(),
                0o600,
            )?;
            write_file(
                &out.join("root.json"),
                field("root_json")?.as_bytes(),
                0o644,
            )?;
            if let Some((triple, agent)) = device_files {
                let config = outpost_protocol::bundle::AgentConfig::from_toml(&agent_toml)
                    .context("the server's agent.toml")?;
                let data_dir = config.data_dir.to_str().context("data_dir is not UTF-8")?;
                let install_dir = install_dir.as_deref().unwrap_or("/opt/outpost");
                let unit = device_target::systemd_unit(install_dir, data_dir)?;
                write_file(&out.join("outpost-agent"), &agent, 0o755)?;
                write_file(&out.join("outpost-agent.service"), unit.as_bytes(), 0o644)?;
                println!(
                    "added the {} agent and outpost-agent.service: copy {} to {install_dir} on the device",
                    triple.triple(),
                    out.display()
                );
            }
            let config = outpost_protocol::bundle::AgentConfig::from_toml(&agent_toml)
                .context("the server's agent.toml")?;
            println!(
                "wrote bundle for {id} to {} (new credentials; broker {}{})",
                out.display(),
                config.broker.url,
                if ca_pem.is_some() { ", ca.pem" } else { "" }
            );
            if r["broker_reload_required"] == true {
                println!(
                    "reload the broker (SIGHUP to mosquitto) so that the new password is accepted"
                );
            }
        }
        Command::Devices(DevicesCmd::List { server }) => {
            let r = server.client()?.get("/api/v1/devices")?;
            for d in r["devices"].as_array().into_iter().flatten() {
                print!("{}", device_lines(d));
            }
        }
        Command::Models(ModelsCmd::List { server }) => {
            let r = server.client()?.get("/api/v1/releases")?;
            print!("{}", release_lines(&r["releases"]));
        }
        Command::Delta(cmd) => delta_cmd(cmd)?,
        Command::Assign {
            server,
            model,
            version,
            devices,
            tags,
        } => {
            let tags: std::collections::BTreeMap<_, _> = tags.into_iter().collect();
            let r = server.client()?.post(
                "/api/v1/assignments",
                &serde_json::json!({"model": model, "version": version, "devices": devices, "tags": tags}),
            )?;
            for a in r["assigned"].as_array().into_iter().flatten() {
                println!(
                    "assigned {model} {version} to {} (counter {})",
                    a["device"].as_str().unwrap_or("?"),
                    a["counter"]
                );
            }
            if r["published"] != true {
                println!(
                    "not published yet: the server is not connected to its broker; it will publish on reconnect"
                );
            }
        }
        Command::Repo(RepoCmd::Init {
            dir,
            root_keys,
            root_threshold,
        }) => {
            let opts = InitOptions {
                root_keys,
                root_threshold,
                passphrase: passphrase(),
                expiries: Expiries::default(),
                seal_cost: SealCost::default(),
            };
            let repo = Repo::init(&dir, &opts, now())?;
            let root = repo.root()?;
            println!(
                "created repository {} (root v{}: {} root keys, threshold {})",
                dir.display(),
                root.version,
                root_keys,
                root_threshold
            );
            println!("  offline: keys/root-*.json and keys/targets.json (the release key)");
            println!(
                "  online, for the server: keys/timestamp.json keys/snapshot.json keys/director.json"
            );
            println!(
                "  devices trust: {}",
                repo.metadata_dir().join("1.root.json").display()
            );
        }
        Command::Repo(RepoCmd::Refresh { repo }) => {
            Repo::open(&repo.repo, passphrase())?.refresh_online(now())?;
            println!("re-signed snapshot and timestamp");
        }
        Command::Release(ReleaseCmd::Sign {
            model_file,
            repo,
            model,
            version,
            release_info,
        }) => {
            let info_path =
                release_info.unwrap_or_else(|| model_file.with_extension("release.json"));
            let info = std::fs::read(&info_path).with_context(|| {
                format!(
                    "reading release info {} (io spec, golden vectors, budgets; pass --release-info)",
                    info_path.display()
                )
            })?;
            let mut value: serde_json::Value = serde_json::from_slice(&info)
                .with_context(|| format!("{} is not JSON", info_path.display()))?;
            let obj = value
                .as_object_mut()
                .with_context(|| format!("{} is not a JSON object", info_path.display()))?;
            obj.insert("model".into(), model.into());
            obj.insert("version".into(), version.into());
            obj.entry("schema").or_insert(1.into());
            obj.entry("sequence").or_insert(0.into());
            let release = ModelRelease::from_value(&value)
                .with_context(|| format!("release info {}", info_path.display()))?;
            let bytes = std::fs::read(&model_file)
                .with_context(|| format!("reading model {}", model_file.display()))?;
            let name = model_file
                .file_name()
                .and_then(|n| n.to_str())
                .context("model file name is not UTF-8")?;
            let entry =
                Repo::open(&repo.repo, passphrase())?.sign_release(name, &bytes, release, now())?;
            println!(
                "signed {} ({} bytes, sha256 {}), release sequence {}",
                entry.path,
                entry.target.length,
                entry.target.hashes["sha256"],
                entry.release.sequence
            );
        }
        Command::Release(ReleaseCmd::Revoke {
            repo,
            model,
            version,
        }) => {
            let removed =
                Repo::open(&repo.repo, passphrase())?.revoke_release(&model, &version, now())?;
            for p in removed {
                println!("revoked {p}");
            }
        }
        Command::Release(ReleaseCmd::List { repo }) => {
            for e in Repo::open(&repo.repo, passphrase())?.releases()? {
                println!(
                    "{}\t{}\tseq {}\t{} bytes\t{}",
                    e.release.model, e.release.version, e.release.sequence, e.target.length, e.path
                );
            }
        }
        Command::Root(RootCmd::Rotate {
            repo,
            add_keys,
            remove_keys,
            threshold,
            replace_roles,
        }) => {
            let change = RootRotation {
                add_keys,
                remove: remove_keys,
                threshold,
                replace_roles,
            };
            let root = Repo::open(&repo.repo, passphrase())?.rotate_root(&change, now())?;
            let r = root.role("root").expect("root role");
            println!(
                "wrote root v{}: {} root keys, threshold {}",
                root.version,
                r.keyids.len(),
                r.threshold
            );
            println!("  upload it to the fleet server: outpostctl root push --repo ...");
        }
        Command::Root(RootCmd::Push { repo, server }) => {
            let pushed = push_root(&server.client()?, &Repo::open(&repo.repo, passphrase())?)?;
            if pushed.is_empty() {
                println!("the server has the repository's root already");
            }
            for v in pushed {
                println!("uploaded root v{v}");
            }
        }
    }
    Ok(())
}

/// `devices list`: one line of what the server assigned, then what the device last
/// reported: active models, the update in progress, the last failure.
fn device_lines(d: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_owned();
    let slots: Vec<String> = d["slots"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(m, t)| format!("{m}={}", text(t)))
        .collect();
    let s = &d["status"];
    let mut out = format!(
        "{}\tagent {}\tcounter {}\tacked {}\tlast seen {}\tassigned {}\n",
        text(&d["id"]),
        s["agent_version"].as_str().unwrap_or("-"),
        d["assignment_counter"],
        d["telemetry_acked"],
        d["last_seen"],
        slots.join(",")
    );
    if s.is_null() {
        out.push_str("  no status reported yet\n");
        return out;
    }
    for (m, slot) in s["models"].as_object().into_iter().flatten() {
        out.push_str(&format!(
            "  active {m}={} ({})\n",
            slot["active"].as_str().unwrap_or("-"),
            slot["version"].as_str().unwrap_or("?")
        ));
    }
    let u = &s["update"];
    if !u.is_null() {
        let mut line = format!("  update {} {}", text(&u["target"]), text(&u["state"]));
        if let Some(kind) = u["artifact"].as_str() {
            line.push_str(&format!(
                " ({kind} {}/{} bytes)",
                u["bytes_done"], u["bytes_total"]
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    let e = &s["last_error"];
    if !e.is_null() {
        out.push_str(&format!(
            "  last error {}: {}\n",
            text(&e["kind"]),
            text(&e["message"])
        ));
    }
    out
}

/// `models list`: each release, then the artifacts that reconstruct it.
fn release_lines(releases: &serde_json::Value) -> String {
    let list = releases.as_array().map(Vec::as_slice).unwrap_or_default();
    let version_of = |sha: &str| {
        list.iter()
            .find(|r| r["sha256"] == sha)
            .and_then(|r| r["version"].as_str())
            .map_or_else(|| format!("{}…", &sha[..sha.len().min(12)]), str::to_owned)
    };
    let mut out = String::new();
    for r in list {
        out.push_str(&format!(
            "{}\t{}\tseq {}\t{} bytes\t{}\n",
            r["model"].as_str().unwrap_or("?"),
            r["version"].as_str().unwrap_or("?"),
            r["sequence"],
            r["length"],
            r["path"].as_str().unwrap_or("?")
        ));
        for a in r["artifacts"].as_array().into_iter().flatten() {
            let what = match (a["base"].as_str(), a["kind"].as_str()) {
                (Some(base), _) => format!(
                    "delta from {} ({})",
                    version_of(base),
                    a["codec"].as_str().unwrap_or("?")
                ),
                (None, Some("full_zstd")) => "full (zstd)".to_owned(),
                (None, _) => "full".to_owned(),
            };
            out.push_str(&format!("  {what}\t{} bytes\n", a["length"]));
        }
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpostctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lines_show_the_reported_state_and_progress() {
        let d = serde_json::json!({
            "id": "pi-7", "assignment_counter": 3, "telemetry_acked": 12, "last_seen": 100,
            "slots": {"digits": "digits/1.1/b.onnx"},
            "status": {
                "agent_version": "0.1.0",
                "models": {"digits": {"active": "digits/1.0/a.onnx", "version": "1.0"}},
                "update": {"slot": "digits", "target": "digits/1.1/b.onnx", "state": "fetching",
                           "bytes_done": 4096, "bytes_total": 9846, "artifact": "delta"},
                "last_error": {"kind": "hash", "message": "artifact x hashed to y"}
            }
        });
        assert_eq!(
            device_lines(&d),
            "pi-7\tagent 0.1.0\tcounter 3\tacked 12\tlast seen 100\tassigned digits=digits/1.1/b.onnx\n\
             \x20 active digits=digits/1.0/a.onnx (1.0)\n\
             \x20 update digits/1.1/b.onnx fetching (delta 4096/9846 bytes)\n\
             \x20 last error hash: artifact x hashed to y\n"
        );
        let new = serde_json::json!({"id": "pi-8", "assignment_counter": 0, "slots": {}});
        assert!(device_lines(&new).ends_with("\n  no status reported yet\n"));
    }

    #[test]
    fn release_lines_name_delta_bases_by_version() {
        let r = serde_json::json!([
            {"model": "digits", "version": "1.0", "sequence": 1, "length": 100,
             "path": "digits/1.0/a.onnx", "sha256": "aa",
             "artifacts": [{"id": "aa", "kind": "full", "length": 100}]},
            {"model": "digits", "version": "1.1", "sequence": 2, "length": 100,
             "path": "digits/1.1/b.onnx", "sha256": "bb",
             "artifacts": [
                {"id": "cc", "kind": "delta", "base": "aa", "codec": "Tensor", "length": 40},
                {"id": "dd", "kind": "delta", "base": "0123456789abcdef", "codec": "ZstdRef", "length": 60},
                {"id": "ee", "kind": "full_zstd", "codec": "zstd", "length": 90},
                {"id": "bb", "kind": "full", "length": 100}]}
        ]);
        let out = release_lines(&r);
        assert!(
            out.contains("digits\t1.1\tseq 2\t100 bytes\tdigits/1.1/b.onnx\n"),
            "{out}"
        );
        assert!(
            out.contains("  delta from 1.0 (Tensor)\t40 bytes\n"),
            "{out}"
        );
        // A base no longer listed is named by its hash.
        assert!(
            out.contains("  delta from 0123456789ab… (ZstdRef)\t60 bytes\n"),
            "{out}"
        );
        assert!(out.contains("  full (zstd)\t90 bytes\n"), "{out}");
        assert!(out.contains("  full\t100 bytes\n"), "{out}");
    }
}

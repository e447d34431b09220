//! `seb-agent`: the node broker daemon and its command-line tools.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use seb_agent::{
    admission::state::RevocationTarget,
    agent,
    audit::{head as audit_head, keys},
    cert::{MutationRequest, dev_sab::Algorithm},
    cli::{self, call_broker},
    config::Config,
    denials,
    enforcement::{PinLayout, loader},
    protocol::{Request, Response},
};

const DEFAULT_CONFIG: &str = "/etc/seb/agent.toml";
const DEFAULT_SOCKET: &str = "/run/seb/broker.sock";

#[derive(Parser)]
#[command(name = "seb-agent", version, about = "seb node broker: certified mutations in, kernel-enforced egress out")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArg {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

impl ConfigArg {
    fn load(&self) -> Result<Config> {
        Ok(Config::load(&self.config)?)
    }
}

/// Where the audit database is: given directly, or from the config.
#[derive(Args)]
struct DatabaseArg {
    #[command(flatten)]
    config: ConfigArg,
    /// Read this audit database instead of the one named in the config.
    #[arg(long)]
    database: Option<PathBuf>,
}

impl DatabaseArg {
    fn path(&self) -> Result<PathBuf> {
        match &self.database {
            Some(path) => Ok(path.clone()),
            None => Ok(self.config.load()?.audit.database),
        }
    }
}

/// The broker socket: given directly, or from the config, or the default.
#[derive(Args)]
struct SocketArg {
    /// The broker socket (default: from --config if given, else /run/seb/broker.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long)]
    config: Option<PathBuf>,
}

impl SocketArg {
    fn path(&self) -> Result<PathBuf> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        match &self.config {
            Some(config) => Ok(Config::load(config)?.broker.socket),
            None => Ok(PathBuf::from(DEFAULT_SOCKET)),
        }
    }
}

/// Write the cluster's resources instead of one node's state.
#[derive(Args)]
struct ClusterArg {
    /// Write the cluster's SebRevocation / SebPolicy (kubeconfig or in-cluster credentials).
    #[arg(long)]
    cluster: bool,
}

impl ClusterArg {
    /// The resource names: from `[cluster]` in the config when given, else `default`.
    fn names(&self, socket: &SocketArg) -> Result<(String, String)> {
        let cluster = match &socket.config {
            Some(path) => Config::load(path)?.cluster,
            None => None,
        };
        Ok(cluster.map_or_else(|| ("default".into(), "default".into()), |c| (c.policy, c.revocation)))
    }
}

fn kube_client() -> Result<(tokio::runtime::Runtime, kube::Client)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = runtime
        .block_on(kube::Client::try_default())
        .context("connecting to the cluster (KUBECONFIG, ~/.kube/config or the in-cluster ServiceAccount)")?;
    Ok((runtime, client))
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker: attach (or re-adopt) kernel enforcement and serve the broker socket.
    Run(ConfigArg),
    /// Write the custom resource definitions (generated from the Rust types) to DIR.
    Crds {
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Validate a configuration file and print it with every default filled in.
    CheckConfig(ConfigArg),
    /// Validate SebPolicy and SebRevocation objects (JSON) as a broker would apply them.
    CheckClusterState { files: Vec<PathBuf> },
    /// Propose a mutation: print the broker's decision as JSON; exit 1 if denied.
    Propose {
        #[command(flatten)]
        socket: SocketArg,
        /// The SAB certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// The request it certifies (JSON).
        #[arg(long)]
        request: PathBuf,
    },
    /// A read-only passthrough read through the broker (no certificate); prints JSON.
    Read {
        #[command(flatten)]
        socket: SocketArg,
        /// `{"provider", "operation", "target"}` (JSON).
        #[arg(long)]
        request: PathBuf,
    },
    /// Revoke a certificate serial or a contract id (takes effect at the next admission,
    /// and cuts connections of executions under it). With --cluster, every node's.
    Revoke {
        #[command(flatten)]
        socket: SocketArg,
        #[command(flatten)]
        cluster: ClusterArg,
        #[arg(long, conflicts_with = "contract", required_unless_present = "contract")]
        serial: Option<String>,
        #[arg(long)]
        contract: Option<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Attached programs, map sizes, epochs and the last kernel denial (admin only).
    Status {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show or set the active policy and revocation epochs. With --cluster, set them in
    /// the cluster's SebPolicy and SebRevocation.
    Epoch {
        #[command(flatten)]
        socket: SocketArg,
        #[command(flatten)]
        cluster: ClusterArg,
        #[arg(long)]
        policy: Option<u64>,
        #[arg(long)]
        revocation: Option<u64>,
    },
    /// The development SAB: a CA and certificates binding execution contracts.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// The signed audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print kernel denials from the audit store.
    Denials {
        #[command(flatten)]
        database: DatabaseArg,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Keep printing denials as they are recorded.
        #[arg(long)]
        follow: bool,
    },
    /// Detach the kernel programs and remove every pin (enforcement ends).
    Unload(ConfigArg),
    /// Ask the running broker to open a TCP connection to ADDR as itself (admin only).
    ProbeEgress {
        #[command(flatten)]
        socket: SocketArg,
        /// host:port, IPv6 as [addr]:port.
        addr: String,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a dev SAB CA in DIR (sab-ca.pem, sab-ca.key).
    Ca {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "seb dev SAB")]
        name: String,
        #[arg(long, value_enum, default_value = "ed25519")]
        algorithm: Algorithm,
    },
    /// Issue a certificate binding a contract (JSON); prints PEM or writes --out.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        contract: PathBuf,
        /// Fill the contract's request digest, provider, operation and target from this request.
        #[arg(long)]
        request: Option<PathBuf>,
        /// Validity in seconds.
        #[arg(long, default_value_t = 300)]
        ttl: u64,
        #[arg(long, value_enum, default_value = "ed25519")]
        algorithm: Algorithm,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a certificate's serial, validity and contract as JSON.
    Inspect { cert: PathBuf },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// List records, oldest first.
    List {
        #[command(flatten)]
        database: DatabaseArg,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one record.
    Show {
        #[command(flatten)]
        database: DatabaseArg,
        seq: i64,
    },
    /// Every record with hashes and signatures, one JSON object per line.
    Export {
        #[command(flatten)]
        database: DatabaseArg,
        #[arg(long)]
        json: bool,
    },
    /// Verify the hash chain and signatures; exit 1 and name the first bad record if broken.
    Verify {
        #[command(flatten)]
        database: DatabaseArg,
        /// The broker's public key (default: `audit.signing_key` + ".pub" from the config).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// The broker's head file, to detect removed newest records (default, when the
        /// public key comes from the config: `audit.signing_key` + ".head").
        #[arg(long)]
        head: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Verify the store fully and record its head in the head file, as the one the broker
    /// trusts from now on: for a store written by a version without head files, or a
    /// deliberate recovery. Run it while the broker is stopped.
    Adopt {
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("seb-agent: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEB_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("SEB_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(config) => {
            let config = config.load()?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let result = runtime.block_on(agent::run(config));
            // A blocking task still running (a certificate being verified) does not hold the exit.
            runtime.shutdown_timeout(Duration::from_millis(500));
            result?;
        }
        Command::Crds { out_dir } => {
            std::fs::create_dir_all(&out_dir)?;
            for (name, text) in seb_agent::cluster::crd::rendered() {
                std::fs::write(out_dir.join(name), text)?;
            }
        }
        Command::CheckConfig(config) => print!("{}", toml::to_string_pretty(&config.load()?)?),
        Command::CheckClusterState { files } => {
            for file in files {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                cli::cluster::check_object(&text).with_context(|| format!("{}", file.display()))?;
            }
        }
        Command::Propose { socket, cert, request } => {
            let certificate = std::fs::read_to_string(&cert).with_context(|| format!("reading {}", cert.display()))?;
            let request: MutationRequest = serde_json::from_str(
                &std::fs::read_to_string(&request).with_context(|| format!("reading {}", request.display()))?,
            )
            .with_context(|| format!("{} is not a valid request", request.display()))?;
            let Response::Decision(decision) = call_broker(&socket.path()?, Request::Propose { certificate, request })?
            else {
                bail!("the broker answered something other than a decision");
            };
            print_json(&*decision)?;
            return Ok(if decision.admitted { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        Command::Read { socket, request } => {
            let request: MutationRequest = serde_json::from_str(
                &std::fs::read_to_string(&request).with_context(|| format!("reading {}", request.display()))?,
            )
            .with_context(|| format!("{} is not a valid request", request.display()))?;
            print_json(&call_broker(&socket.path()?, Request::Read { request })?)?;
        }
        Command::Revoke { socket, cluster, serial, contract, reason } => {
            let (target, value) = match (serial, contract) {
                (Some(serial), _) => (RevocationTarget::Serial, serial),
                (None, Some(contract)) => (RevocationTarget::ContractId, contract),
                (None, None) => bail!("give --serial or --contract"),
            };
            if cluster.cluster {
                let (_, name) = cluster.names(&socket)?;
                let (runtime, client) = kube_client()?;
                print_json(&runtime.block_on(cli::cluster::revoke(client, &name, target, &value))?)?;
            } else {
                print_json(&call_broker(&socket.path()?, Request::Revoke { target, value, reason })?)?;
            }
        }
        Command::Status { socket } => {
            let Response::Status(report) = call_broker(&socket.path()?, Request::Status)? else {
                bail!("the broker answered something other than a status");
            };
            println!("{}", serde_json::to_string_pretty(&*report)?);
        }
        Command::Epoch { socket, cluster, policy, revocation } if cluster.cluster => {
            let (policy_name, revocation_name) = cluster.names(&socket)?;
            if policy.is_none() && revocation.is_none() {
                bail!("with --cluster, give --policy and/or --revocation");
            }
            let (runtime, client) = kube_client()?;
            if let Some(epoch) = revocation {
                let written =
                    runtime.block_on(cli::cluster::set_revocation_epoch(client.clone(), &revocation_name, epoch))?;
                print_json(&written)?;
            }
            if let Some(epoch) = policy {
                print_json(&runtime.block_on(cli::cluster::set_policy_epoch(client, &policy_name, epoch))?)?;
            }
        }
        Command::Epoch { socket, policy, revocation, .. } => {
            let request = if policy.is_none() && revocation.is_none() {
                Request::GetEpochs
            } else {
                Request::SetEpochs { policy, revocation }
            };
            print_json(&call_broker(&socket.path()?, request)?)?;
        }
        Command::Cert { command } => cert(command)?,
        Command::Audit { command } => return audit(command),
        Command::Denials { database, json, follow } => denials::print(&database.path()?, json, follow)?,
        Command::Unload(config) => {
            let config = config.load()?;
            let removed = loader::unload(&PinLayout::new(&config.bpf.pin_path))?;
            eprintln!("removed {removed} pins from {}", config.bpf.pin_path.display());
        }
        Command::ProbeEgress { socket, addr } => {
            let response = call_broker(&socket.path()?, Request::ProbeEgress { addr })?;
            print_json(&response)?;
            let connected = matches!(response, Response::ProbeEgress { connected: true, .. });
            return Ok(if connected { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cert(command: CertCommand) -> Result<()> {
    match command {
        CertCommand::Ca { dir, name, algorithm } => cli::cert::create_ca(&dir, &name, algorithm),
        CertCommand::Issue { dir, contract, request, ttl, algorithm, out } => {
            let pem = cli::cert::issue(&dir, &contract, request.as_deref(), Duration::from_secs(ttl), algorithm)?;
            match out {
                Some(out) => std::fs::write(&out, pem).with_context(|| format!("writing {}", out.display())),
                None => {
                    print!("{pem}");
                    Ok(())
                }
            }
        }
        CertCommand::Inspect { cert } => print_json(&cli::cert::inspect(&cert)?),
    }
}

fn audit(command: AuditCommand) -> Result<ExitCode> {
    match command {
        AuditCommand::List { database, kind, json } => cli::audit::list(&database.path()?, kind.as_deref(), json)?,
        AuditCommand::Show { database, seq } => cli::audit::show(&database.path()?, seq)?,
        AuditCommand::Export { database, .. } => cli::audit::export(&database.path()?)?,
        AuditCommand::Verify { database, public_key, head, json } => {
            let (public_key, head) = match public_key {
                Some(path) => (path, head),
                None => {
                    let signing_key = database.config.load()?.audit.signing_key;
                    (
                        keys::public_key_path(&signing_key),
                        Some(head.unwrap_or_else(|| audit_head::path_for(&signing_key))),
                    )
                }
            };
            let ok = cli::audit::verify(&database.path()?, &public_key, head.as_deref(), json)?;
            return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        AuditCommand::Adopt { config } => {
            let audit = config.load()?.audit;
            cli::audit::adopt(&audit.database, &audit.signing_key)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

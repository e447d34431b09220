//! `seb-agent`: the node broker daemon and its command-line tools.

use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use seb_agent::{
    admission::state::RevocationTarget,
    agent,
    audit::{head as audit_head, keys},
    cert::{MutationRequest, dev_sab::Algorithm},
    cli::{
        self, call_broker,
        exit::{EXIT_STATUS_HELP, Exit},
        output::{self, Output},
        render,
    },
    config::Config,
    denials,
    enforcement::{PinLayout, loader},
    protocol::{Request, Response},
};

/// Requests are allocated on the runtime's workers and freed on the ledger thread, and
/// the other way round: glibc's per-thread arenas then contend on their locks. mimalloc
/// frees to the owning thread's heap without a lock.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_CONFIG: &str = "/etc/seb/agent.toml";
const DEFAULT_SOCKET: &str = "/run/seb/broker.sock";

#[derive(Parser)]
#[command(
    name = "seb-agent",
    version,
    about = "seb node broker: certified mutations in, kernel-enforced egress out",
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    /// Print machine-readable JSON instead of text (lists: one JSON object per line).
    /// For `run`, log as JSON lines.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArg {
    /// The agent's configuration file (TOML).
    #[arg(long, env = "SEB_CONFIG", default_value = DEFAULT_CONFIG)]
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
    /// The broker socket [default: `broker.socket` from the config if one is given, else /run/seb/broker.sock].
    #[arg(long, env = "SEB_SOCKET")]
    socket: Option<PathBuf>,
    /// The agent's configuration file (TOML), to find the socket (and, with --cluster, the resource names).
    #[arg(long, env = "SEB_CONFIG")]
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

    fn call(&self, request: Request) -> Result<Response> {
        call_broker(&self.path()?, request)
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

/// A request from a JSON file, or from standard input for `-`.
fn read_request(path: &PathBuf) -> Result<MutationRequest> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the request from standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid request", path.display()))
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker: attach (or re-adopt) kernel enforcement and serve the broker socket.
    Run(ConfigArg),
    /// Write the custom resource definitions (generated from the Rust types) to DIR.
    Crds {
        /// The directory to write the CRD YAML files to (created if missing).
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
    /// Check a configuration file as `run` does before it touches the kernel (every field,
    /// every file and cgroup it names), and print it with every default filled in.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
        /// Check the fields only, not the files and cgroups they name (a config written
        /// for another machine, such as a ConfigMap).
        #[arg(long)]
        fields_only: bool,
    },
    /// Mount a bpffs at /sys/fs/bpf if none is there, so pins outlive the agent, and a
    /// tracefs at /sys/kernel/tracing (the syscall tracepoints are found there): a
    /// DaemonSet's privileged init container, with Bidirectional mount propagation.
    MountBpffs(ConfigArg),
    /// Validate SebPolicy and SebRevocation objects (JSON) as a broker would apply them.
    CheckClusterState {
        /// The object files (JSON), each one SebPolicy or SebRevocation.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the certified AWS request a preset builds (e.g. `s3:PutObject`), to certify
    /// and propose.
    AwsPreset {
        /// The preset operation, e.g. `s3:PutObject`, `ec2:AuthorizeSecurityGroupIngress`.
        operation: String,
        /// The target ARN.
        target: String,
        /// The preset's parameters (JSON), e.g. `{"body": "replicas=3"}`.
        #[arg(long, default_value = "{}")]
        params: String,
    },
    /// Propose a mutation and print the broker's decision and, if admitted, its outcome.
    /// Exit 0 only if it was admitted and executed (see "Exit status").
    Propose {
        #[command(flatten)]
        socket: SocketArg,
        /// The SAB certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// The request it certifies (JSON; `-` for standard input).
        #[arg(long)]
        request: PathBuf,
    },
    /// A read-only passthrough read through the broker (no certificate).
    Read {
        #[command(flatten)]
        socket: SocketArg,
        /// `{"provider", "operation", "target"}` (JSON; `-` for standard input).
        #[arg(long)]
        request: PathBuf,
    },
    /// Serve an AI agent's tools over MCP on standard input and output (for an MCP host to
    /// start): read a resource, propose a change (live state, SAB certificate, broker), and
    /// ask the SAB about a request awaiting approval.
    Mcp {
        #[command(flatten)]
        socket: SocketArg,
        #[command(flatten)]
        sab: seb_agent::mcp::SabOptions,
    },
    /// Revoke a certificate serial or a contract id. It takes effect at the next admission
    /// and cuts the connections of executions under it. With --cluster, on every node.
    Revoke {
        #[command(flatten)]
        socket: SocketArg,
        #[command(flatten)]
        cluster: ClusterArg,
        /// The certificate serial to revoke (hex, colons allowed).
        #[arg(long, conflicts_with = "contract", required_unless_present = "contract")]
        serial: Option<String>,
        /// The contract id to revoke (every certificate binding it).
        #[arg(long)]
        contract: Option<String>,
        /// Why, recorded in the audit log.
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
        /// Set the policy epoch: certificates must name this one.
        #[arg(long)]
        policy: Option<u64>,
        /// Set the revocation epoch (it only moves forward): certificates naming an older one are refused.
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
        /// Keep printing denials as they are recorded.
        #[arg(long)]
        follow: bool,
    },
    /// Detach the kernel programs and remove every pin (enforcement ends).
    Unload(ConfigArg),
    /// Ask the running broker to open a TCP connection to ADDR as itself (admin only).
    /// Exit 1 if it could not connect.
    ProbeEgress {
        #[command(flatten)]
        socket: SocketArg,
        /// host:port, IPv6 as [addr]:port.
        addr: String,
    },
    /// The SAB: certifies proposed actions under Cedar policies, with human approval.
    Sab {
        #[command(subcommand)]
        command: SabCommand,
    },
    /// Print a shell completion script, e.g. `seb-agent completions bash > /etc/bash_completion.d/seb-agent`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a dev SAB CA in DIR (sab-ca.pem, sab-ca.key).
    Ca {
        /// The directory to create the CA's certificate and key in.
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "seb dev SAB")]
        name: String,
        /// The CA key's algorithm.
        #[arg(long, value_enum, default_value = "ed25519")]
        algorithm: Algorithm,
    },
    /// Issue a certificate binding a contract (JSON); prints PEM or writes --out.
    Issue {
        /// The directory holding the CA (from `cert ca`).
        #[arg(long)]
        dir: PathBuf,
        /// The execution contract to bind (JSON).
        #[arg(long)]
        contract: PathBuf,
        /// Fill the contract's request digest, provider, operation and target from this request.
        #[arg(long)]
        request: Option<PathBuf>,
        /// Validity in seconds.
        #[arg(long, default_value_t = 300)]
        ttl: u64,
        /// The certificate key's algorithm.
        #[arg(long, value_enum, default_value = "ed25519")]
        algorithm: Algorithm,
        /// Write the PEM here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a certificate's serial, validity and contract.
    Inspect {
        /// The certificate (PEM).
        cert: PathBuf,
    },
}

/// Where the SAB is and how to authenticate to it.
#[derive(Args)]
struct SabClientArgs {
    /// The SAB's URL (https://host:port).
    #[arg(long, env = "SEB_SAB_URL")]
    url: String,
    /// Our client certificate (PEM), naming us by a seb:// URI SAN.
    #[arg(long, env = "SEB_SAB_CERT")]
    cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "SEB_SAB_KEY")]
    key: PathBuf,
    /// The CA that issued the SAB's server certificate (PEM).
    #[arg(long, env = "SEB_SAB_CA")]
    ca: PathBuf,
}

#[derive(Subcommand)]
enum SabCommand {
    /// Serve the SAB's HTTPS API.
    Serve {
        /// The SAB's configuration file (TOML).
        #[arg(long, env = "SEB_SAB_CONFIG")]
        config: PathBuf,
    },
    /// Approve a pending request (as the approver our client certificate names).
    Approve {
        #[command(flatten)]
        client: SabClientArgs,
        /// The request id.
        #[arg(value_parser = seb_agent::sab::client::request_id)]
        id: String,
        /// Why, recorded in the SAB's log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a pending request.
    Deny {
        #[command(flatten)]
        client: SabClientArgs,
        /// The request id.
        #[arg(value_parser = seb_agent::sab::client::request_id)]
        id: String,
        /// Why, recorded in the SAB's log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// List the pending requests we may see, oldest first, 100 at a time.
    Pending {
        #[command(flatten)]
        client: SabClientArgs,
        /// Skip this many (the answer's `more` says how many follow).
        #[arg(long, default_value_t = 0)]
        offset: usize,
    },
    /// Show one request's state.
    Show {
        #[command(flatten)]
        client: SabClientArgs,
        /// The request id.
        #[arg(value_parser = seb_agent::sab::client::request_id)]
        id: String,
    },
    /// Validate a policy directory against the schema, as the SAB would load it.
    Check {
        /// The directory of *.cedar files.
        #[arg(long)]
        policies: PathBuf,
    },
    /// Print the Cedar schema policies are validated against.
    Schema,
    /// Create the SAB's CAs (issuing: sab-ca.*, TLS: tls-ca.*) and its server certificate in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// DNS names or IP addresses of the SAB's server certificate.
        #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
    },
    /// Issue a client certificate from DIR's TLS CA naming IDENTITY (seb://node/<node>/cgroup/<path>
    /// or seb://approver/<name>); writes <OUT>.pem and <OUT>.key.
    ClientCert {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        identity: String,
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 30)]
        days: u64,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// List records, oldest first.
    List {
        #[command(flatten)]
        database: DatabaseArg,
        /// Only records of this kind (decision, outcome, kernel_denial, ...).
        #[arg(long)]
        kind: Option<String>,
    },
    /// Print records as they are written, until stopped: for a log shipper, with --json
    /// (one object per line). Resume with `--since <the last seq received>`: no record is
    /// missed or repeated.
    Follow {
        #[command(flatten)]
        database: DatabaseArg,
        /// Only records of this kind (decision, outcome, kernel_denial, tamper, ...).
        #[arg(long)]
        kind: Option<String>,
        /// Start after this record sequence number, or at this RFC 3339 time [default: the first record].
        #[arg(long, value_name = "SEQ|TIME", default_value = "0")]
        since: cli::audit::Since,
    },
    /// Show one record.
    Show {
        #[command(flatten)]
        database: DatabaseArg,
        /// The record's sequence number.
        seq: i64,
    },
    /// Every record with hashes and signatures, one JSON object per line (always JSON).
    Export {
        #[command(flatten)]
        database: DatabaseArg,
    },
    /// Verify the hash chain and signatures; exit 1 and name the first bad record if broken.
    Verify {
        #[command(flatten)]
        database: DatabaseArg,
        /// The broker's public key (default: `audit.signing_key` + ".pub" from the config).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// The broker's head file, to detect removed newest records (default, when the
        /// public key comes from the config: `audit.signing_key` + ".head"). With
        /// `--public-key`, give it or say `--no-head`.
        #[arg(long, conflicts_with = "no_head")]
        head: Option<PathBuf>,
        /// Verify without a head file: records removed from the end go unnoticed.
        #[arg(long)]
        no_head: bool,
        /// The public key (64 hex digits, as the report prints it) the records must be
        /// signed with, kept apart from the node: whoever can write beside the store can
        /// replace its `.pub` and re-sign the chain with a key of their own.
        #[arg(long, value_name = "HEX")]
        expect_key: Option<String>,
    },
    /// Verify the store fully and record its head in the head file, as the one the broker
    /// trusts from now on: for a store written by a version without head files, or a
    /// deliberate recovery. Run it while the broker is stopped.
    Adopt {
        #[command(flatten)]
        config: ConfigArg,
        /// Adopt a store that does not hold the head already trusted (a deliberate
        /// rollback: certificates used since then can be admitted again).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.json && matches!(cli.command, Command::Run(_)));
    let output = Output { json: cli.json };
    match run(cli.command, output) {
        Ok(exit) => exit.into(),
        // The reader went away (`| head`): nothing more to say.
        Err(error) if output::is_stdout_closed(&error) => Exit::Success.into(),
        Err(error) => {
            eprintln!("seb-agent: {error:#}");
            Exit::Error.into()
        }
    }
}

/// Logs go to standard error: JSON lines when it is not a terminal (a service manager,
/// a log shipper) or when `SEB_LOG_FORMAT=json`; text, coloured only on a terminal, otherwise.
fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEB_LOG").unwrap_or_else(|_| "info".into());
    let terminal = std::io::stderr().is_terminal();
    let format = std::env::var("SEB_LOG_FORMAT").ok();
    let json = json
        || match format.as_deref() {
            Some("json") => true,
            Some("text") => false,
            Some(other) => {
                eprintln!("seb-agent: SEB_LOG_FORMAT={other} is neither `json` nor `text`; ignored");
                !terminal
            }
            None => !terminal,
        };
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(terminal && !json);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(command: Command, output: Output) -> Result<Exit> {
    match command {
        Command::Run(config) => {
            let config = config.load()?;
            // Fails the start when a join was needed and failed: cgroup paths read from the
            // container's own namespace would decide scope and callers wrongly.
            if let Some(pid) = seb_agent::enforcement::processes::join_host_cgroup_namespace()? {
                tracing::info!(
                    pid,
                    "joined the cgroup namespace of the outermost process it sees: cgroup paths are read as the host \
                     names them"
                );
            }
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let result = runtime.block_on(agent::run(config));
            // A blocking task still running (a certificate being verified) does not hold the exit.
            runtime.shutdown_timeout(Duration::from_millis(500));
            result?;
        }
        Command::Crds { out_dir } => {
            std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
            let mut written = Vec::new();
            for (name, text) in seb_agent::cluster::crd::rendered() {
                let path = out_dir.join(name);
                std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
                written.push(path.display().to_string());
            }
            output.show(&serde_json::json!({ "written": written }), |out| {
                written.iter().try_for_each(|path| writeln!(out, "wrote {path}"))
            })?;
        }
        Command::CheckConfig { config, fields_only } => {
            let config = config.load()?;
            if !fields_only {
                seb_agent::preflight::check(&config)?;
            }
            output.show(&config, |out| {
                write!(out, "{}", toml::to_string_pretty(&config).map_err(std::io::Error::other)?)
            })?;
        }
        Command::MountBpffs(config) => {
            let pin_path = config.load()?.bpf.pin_path;
            seb_agent::bpffs::ensure_mounted(&pin_path)?;
            seb_agent::tracefs::ensure_mounted()?;
            output.show(&serde_json::json!({ "bpffs": pin_path, "tracefs": true }), |out| {
                writeln!(out, "{} is on a bpffs; tracefs is mounted", pin_path.display())
            })?;
        }
        Command::CheckClusterState { files } => {
            for file in &files {
                let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
                cli::cluster::check_object(&text).with_context(|| format!("{}", file.display()))?;
            }
            let files: Vec<_> = files.iter().map(|f| f.display().to_string()).collect();
            output.show(&serde_json::json!({ "valid": files }), |out| {
                files.iter().try_for_each(|file| writeln!(out, "{file}: valid"))
            })?;
        }
        Command::AwsPreset { operation, target, params } => {
            let params: serde_json::Value = serde_json::from_str(&params).context("--params is not JSON")?;
            let request = seb_agent::execute::aws::preset::request(&operation, &target, &params)?;
            println!("{}", serde_json::to_string_pretty(&request)?);
        }
        Command::Propose { socket, cert, request } => {
            let certificate = std::fs::read_to_string(&cert).with_context(|| format!("reading {}", cert.display()))?;
            let request = read_request(&request)?;
            let Response::Decision(decision) = socket.call(Request::Propose { certificate, request })? else {
                bail!("the broker answered something other than a decision");
            };
            output.show(&*decision, |out| render::decision(out, &decision))?;
            return Ok(Exit::of_decision(&decision));
        }
        Command::Read { socket, request } => {
            let Response::Read(read) = socket.call(Request::Read { request: read_request(&request)? })? else {
                bail!("the broker answered something other than a read");
            };
            output.show(&read, |out| render::read(out, &read))?;
        }
        Command::Mcp { socket, sab } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(seb_agent::mcp::serve(socket.path()?, &sab))?;
        }
        Command::Revoke { socket, cluster, serial, contract, reason } => {
            let (target, value) = match (serial, contract) {
                (Some(serial), _) => (RevocationTarget::Serial, serial),
                (None, Some(contract)) => (RevocationTarget::ContractId, contract),
                (None, None) => bail!("give --serial or --contract"),
            };
            let what = match target {
                RevocationTarget::Serial => "serial",
                RevocationTarget::ContractId => "contract",
            };
            if cluster.cluster {
                let (_, name) = cluster.names(&socket)?;
                let (runtime, client) = kube_client()?;
                let written = runtime.block_on(seb_agent::cluster::writes::revoke(client, &name, target, &value))?;
                output.show(&written, |out| writeln!(out, "revoked {what} {value} in the cluster: {written}"))?;
            } else {
                let Response::Revoked { record_seq } =
                    socket.call(Request::Revoke { target, value: value.clone(), reason })?
                else {
                    bail!("the broker answered something other than a revocation");
                };
                output
                    .show(&serde_json::json!({ "revoked": what, "value": value, "record_seq": record_seq }), |out| {
                        writeln!(out, "revoked {what} {value} (audit record {record_seq})")
                    })?;
            }
        }
        Command::Status { socket } => {
            let Response::Status(report) = socket.call(Request::Status)? else {
                bail!("the broker answered something other than a status");
            };
            output.show(&*report, |out| render::status(out, &report))?;
        }
        Command::Epoch { socket, cluster, policy, revocation } if cluster.cluster => {
            let (policy_name, revocation_name) = cluster.names(&socket)?;
            if policy.is_none() && revocation.is_none() {
                bail!("with --cluster, give --policy and/or --revocation");
            }
            let (runtime, client) = kube_client()?;
            if let Some(epoch) = revocation {
                let written = runtime.block_on(seb_agent::cluster::writes::set_revocation_epoch(
                    client.clone(),
                    &revocation_name,
                    epoch,
                ))?;
                output.show(&written, |out| writeln!(out, "{written}"))?;
            }
            if let Some(epoch) = policy {
                let written =
                    runtime.block_on(seb_agent::cluster::writes::set_policy_epoch(client, &policy_name, epoch))?;
                output.show(&written, |out| writeln!(out, "{written}"))?;
            }
        }
        Command::Epoch { socket, policy, revocation, .. } => {
            let request = if policy.is_none() && revocation.is_none() {
                Request::GetEpochs
            } else {
                Request::SetEpochs { policy, revocation }
            };
            let Response::Epochs(epochs) = socket.call(request)? else {
                bail!("the broker answered something other than the epochs");
            };
            output.show(&epochs, |out| render::epochs(out, &epochs))?;
        }
        Command::Cert { command } => cert(command, output)?,
        Command::Sab { command } => return sab(command, output),
        Command::Audit { command } => return audit(command, output),
        Command::Denials { database, follow } => {
            denials::print(&database.path()?, output.json, follow, &mut output::Stdout::lock())?
        }
        Command::Unload(config) => {
            let config = config.load()?;
            let pins = &config.bpf.pin_path;
            let removed = loader::unload(&PinLayout::new(pins))?;
            output.show(&serde_json::json!({ "removed_pins": removed, "pin_path": pins }), |out| {
                writeln!(out, "removed {removed} pins from {}", pins.display())
            })?;
        }
        Command::ProbeEgress { socket, addr } => {
            let Response::ProbeEgress { addr, connected, error } = socket.call(Request::ProbeEgress { addr })? else {
                bail!("the broker answered something other than a probe result");
            };
            let answer =
                serde_json::json!({ "type": "probe_egress", "addr": addr, "connected": connected, "error": error });
            output.show(&answer, |out| match &error {
                None if connected => writeln!(out, "the broker connected to {addr}"),
                error => {
                    writeln!(out, "the broker could not connect to {addr}: {}", error.as_deref().unwrap_or("refused"))
                }
            })?;
            return Ok(Exit::ok_or_denied(connected));
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "seb-agent", &mut script);
            let mut out = output::Stdout::lock();
            out.write_all(&script)?;
            out.flush()?;
        }
    }
    Ok(Exit::Success)
}

fn cert(command: CertCommand, output: Output) -> Result<()> {
    match command {
        CertCommand::Ca { dir, name, algorithm } => {
            let files = cli::cert::create_ca(&dir, &name, algorithm)?;
            let (cert, key) = (files.cert.display().to_string(), files.key.display().to_string());
            output.show(&serde_json::json!({ "certificate": cert, "key": key }), |out| {
                writeln!(out, "created SAB CA {cert} (key {key})")?;
                writeln!(out, "trust it with `admission.trust_anchors = \"{cert}\"`")
            })
        }
        CertCommand::Issue { dir, contract, request, ttl, algorithm, out } => {
            let pem = cli::cert::issue(&dir, &contract, request.as_deref(), Duration::from_secs(ttl), algorithm)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, &pem).with_context(|| format!("writing {}", path.display()))?;
                    let written = path.display().to_string();
                    output.show(&serde_json::json!({ "written": written }), |out| writeln!(out, "wrote {written}"))
                }
                None => output.show_text("pem", &pem),
            }
        }
        CertCommand::Inspect { cert } => {
            let inspected = cli::cert::inspect(&cert)?;
            output.show(&inspected, |out| cli::cert::render(out, &inspected))
        }
    }
}

fn sab(command: SabCommand, output: Output) -> Result<Exit> {
    use seb_agent::sab::{self, client::SabClient, pki};
    let call = |client: &SabClientArgs, method: &str, path: &str, body: Option<serde_json::Value>| {
        let sab = SabClient::new(&client.url, &client.cert, &client.key, &client.ca)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(sab.call(method, path, body.as_ref()))
    };
    let answer = |(status, body): (u16, serde_json::Value)| -> Result<Exit> {
        output.show(&body, |out| {
            writeln!(out, "{}", serde_json::to_string_pretty(&body).map_err(std::io::Error::other)?)
        })?;
        Ok(if (200..300).contains(&status) { Exit::Success } else { Exit::Denied })
    };
    match command {
        SabCommand::Serve { config } => {
            let config = sab::SabConfig::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let ledger = runtime.block_on(sab::serve(config))?;
            // Connections still open hold the log's last handles: end them, then let the log close.
            runtime.shutdown_timeout(Duration::from_secs(2));
            ledger.join().map_err(|_| anyhow::anyhow!("the SAB log's thread panicked"))?;
            Ok(Exit::Success)
        }
        SabCommand::Approve { client, id, reason } => {
            let body = serde_json::json!({ "reason": reason });
            answer(call(&client, "POST", &format!("/v1/requests/{id}/approve"), Some(body))?)
        }
        SabCommand::Deny { client, id, reason } => {
            let body = serde_json::json!({ "reason": reason });
            answer(call(&client, "POST", &format!("/v1/requests/{id}/deny"), Some(body))?)
        }
        SabCommand::Pending { client, offset } => {
            answer(call(&client, "GET", &format!("/v1/requests?status=pending&offset={offset}"), None)?)
        }
        SabCommand::Show { client, id } => answer(call(&client, "GET", &format!("/v1/requests/{id}"), None)?),
        SabCommand::Check { policies } => {
            let book = sab::policy::PolicyBook::load_dir(&policies, sab::config::MAX_CERTIFICATE_TTL)?;
            let report = serde_json::json!({"valid": true, "files": book.files, "policies": book.policies, "digest": book.digest});
            output.show(&report, |out| {
                writeln!(out, "{} policies in {} files: valid ({})", book.policies, book.files.len(), book.digest)
            })?;
            Ok(Exit::Success)
        }
        SabCommand::Schema => {
            output.show_text("schema", &sab::schema::text())?;
            Ok(Exit::Success)
        }
        SabCommand::Init { dir, server_names } => {
            let layout = pki::Layout::new(&dir);
            pki::init(&layout, &server_names)?;
            let report = serde_json::json!({
                "issuing_ca": layout.issuing_ca().cert, "tls_ca": layout.tls_ca().cert, "server": layout.server().0,
            });
            output.show(&report, |out| {
                writeln!(out, "created the SAB's CAs and server certificate in {}", dir.display())
            })?;
            Ok(Exit::Success)
        }
        SabCommand::ClientCert { dir, identity, out, days } => {
            let ttl = Duration::from_secs(days * 86_400);
            let (cert, key) = pki::client_certificate(&pki::Layout::new(&dir).tls_ca(), &identity, ttl, &out)?;
            let report = serde_json::json!({"certificate": cert, "key": key, "identity": identity});
            output
                .show(&report, |out| writeln!(out, "wrote {} and {} for {identity}", cert.display(), key.display()))?;
            Ok(Exit::Success)
        }
    }
}

fn audit(command: AuditCommand, output: Output) -> Result<Exit> {
    match command {
        AuditCommand::List { database, kind } => cli::audit::list(&database.path()?, kind.as_deref(), output)?,
        AuditCommand::Follow { database, kind, since } => {
            cli::audit::follow(&database.path()?, kind.as_deref(), since, output)?
        }
        AuditCommand::Show { database, seq } => cli::audit::show(&database.path()?, seq, output)?,
        AuditCommand::Export { database } => cli::audit::export(&database.path()?)?,
        AuditCommand::Verify { database, public_key, head, no_head, expect_key } => {
            let (public_key, head) = match public_key {
                // A key given by hand with no head would quietly skip the check for removed
                // newest records: the operator says which.
                Some(_) if head.is_none() && !no_head => anyhow::bail!(
                    "--public-key needs --head <the head file kept with the key>, or --no-head to verify without \
                     detecting removed newest records"
                ),
                Some(path) => (path, head),
                None if no_head => (keys::public_key_path(&database.config.load()?.audit.signing_key), None),
                None => {
                    let signing_key = database.config.load()?.audit.signing_key;
                    (
                        keys::public_key_path(&signing_key),
                        Some(head.unwrap_or_else(|| audit_head::path_for(&signing_key))),
                    )
                }
            };
            let ok =
                cli::audit::verify(&database.path()?, &public_key, expect_key.as_deref(), head.as_deref(), output)?;
            return Ok(Exit::ok_or_denied(ok));
        }
        AuditCommand::Adopt { config, force } => {
            let audit = config.load()?.audit;
            cli::audit::adopt(&audit.database, &audit.signing_key, force)?;
        }
    }
    Ok(Exit::Success)
}

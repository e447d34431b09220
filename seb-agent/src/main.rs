//! `seb-agent`: the node broker daemon and its command-line tools.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};
use seb_agent::{
    agent,
    config::Config,
    denials,
    enforcement::{PinLayout, loader},
    protocol::{self, Request, Response},
};

const DEFAULT_CONFIG: &str = "/etc/seb/agent.toml";

#[derive(Parser)]
#[command(name = "seb-agent", version, about = "seb node broker: certified mutations in, kernel-enforced egress out")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker: attach (or re-adopt) kernel enforcement and serve the broker socket.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a configuration file and print it with every default filled in.
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print kernel denials from the audit store.
    Denials {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Read this audit database instead of the one named in the config.
        #[arg(long)]
        database: Option<PathBuf>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Keep printing denials as they are recorded.
        #[arg(long)]
        follow: bool,
    },
    /// Detach the kernel programs and remove every pin (enforcement ends).
    Unload {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Ask the running broker to open a TCP connection to ADDR as itself (admin only).
    ProbeEgress {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// host:port, IPv6 as [addr]:port.
        addr: String,
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

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(agent::run(config))?;
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            print!("{}", toml::to_string_pretty(&config)?);
        }
        Command::Denials { config, database, json, follow } => {
            let database = match database {
                Some(database) => database,
                None => Config::load(&config)?.audit.database,
            };
            denials::print(&database, json, follow)?;
        }
        Command::Unload { config } => {
            let config = Config::load(&config)?;
            let removed = loader::unload(&PinLayout::new(&config.bpf.pin_path))?;
            eprintln!("removed {removed} pins from {}", config.bpf.pin_path.display());
        }
        Command::ProbeEgress { config, addr } => {
            let config = Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let response = runtime.block_on(protocol::call(&config.broker.socket, &Request::ProbeEgress { addr }))?;
            println!("{}", serde_json::to_string(&response)?);
            let connected = matches!(response, Response::ProbeEgress { connected: true, .. });
            return Ok(if connected { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
    }
    Ok(ExitCode::SUCCESS)
}

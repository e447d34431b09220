//! Everything `run` checks before it touches the kernel, and all that `check-config`
//! checks: every cgroup the config names exists, every file it names is there and
//! parses, the socket's group resolves, the API server and this node's name are known.
//! `run` attaches nothing until all of it passes.

use std::{path::Path, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use tracing::warn;

use crate::{
    admission::Admission,
    audit::keys,
    cert::{TrustAnchors, ValidityPolicy},
    cgroupfs,
    config::{Config, SyscallTables},
    enforcement::{EndpointSource, Sources, compat_syscalls, judges_fixed_file_writes, judges_uring_sockets, policy},
    execute::broker_http::roots_from_pem_file,
    server,
};

/// What the checks produced, for `run` to use as is.
pub struct Checked {
    /// The cgroup2 mount every configured cgroup was found under.
    pub mount: PathBuf,
    /// The config's share of what is enforced.
    pub sources: Sources,
    pub admission: Admission,
    pub socket_gid: Option<nix::unistd::Gid>,
    /// File descriptors available to the broker (the soft limit, raised to the hard one).
    pub descriptors: u64,
}

pub fn check(config: &Config) -> Result<Checked> {
    check_host_pid_namespace()?;
    let descriptors = server::limits::ensure_descriptors(config.broker.max_connections)?;
    let mount = check_cgroups(config)?;
    let sources = config_sources(config)?;
    let admission = admission_from(config)?;
    let socket_gid = config.broker.socket_group.as_deref().map(server::socket_gid).transpose()?;
    check_state_file("audit.signing_key", &config.audit.signing_key)?;
    if config.audit.signing_key.exists() {
        keys::load(&config.audit.signing_key).context("config field `audit.signing_key`")?;
    }
    check_state_file("audit.database", &config.audit.database)?;
    if let Some(aws) = &config.aws {
        aws.base_credentials()?;
    }
    if let Some(http) = &config.http {
        roots_from_pem_file(&http.trust_anchors, "http.trust_anchors")?;
    }
    if let Some(kubernetes) = &config.kubernetes {
        kubernetes.api_server()?;
        roots_from_pem_file(&kubernetes.ca_file, "kubernetes.ca_file")?;
        let token = std::fs::read_to_string(&kubernetes.token_file).with_context(|| {
            format!("config field `kubernetes.token_file`: cannot read {}", kubernetes.token_file.display())
        })?;
        if token.trim().is_empty() {
            bail!("config field `kubernetes.token_file`: {} is empty", kubernetes.token_file.display());
        }
    }
    if let Some(cluster) = &config.cluster {
        cluster.node_name()?;
    }
    for weakened in weakened(config) {
        warn!("protection turned off by the config: {weakened}");
    }
    if config.enforcement.syscall_tables == SyscallTables::Native && compat_syscalls::run_here() {
        warn!(
            "enforcement.syscall_tables = \"native\" on a kernel that takes 32-bit system calls: a process in the \
             scope can make packet sockets through int 0x80 unseen (boot with ia32_emulation=0, or use \"auto\")"
        );
    }
    if !judges_uring_sockets() {
        warn!(
            "this kernel's io_uring request has a layout the programs do not read: a packet socket made by an \
             io_uring IORING_OP_SOCKET request is not judged"
        );
    }
    if !judges_fixed_file_writes() {
        warn!(
            "this kernel's io_uring fixed-file table has a layout the programs do not read: an io_uring write \
             through a fixed file to another process's memory (/proc/<pid>/mem) or a packet device is not judged"
        );
    }
    Ok(Checked { mount, sources, admission, socket_gid, descriptors })
}

/// `/proc/self/ns/pid` in the initial PID namespace (`PROC_PID_INIT_INO`,
/// `include/linux/proc_ns.h`).
const INITIAL_PID_NAMESPACE: &str = "pid:[4026531836]";

/// The kernel programs name processes by their pid in the initial PID namespace; the
/// agent names itself and its brokers by its own. In a PID namespace of its own (a
/// container without `hostPID`) those are other numbers: the broker's connections would
/// be refused, and the agent's entry would exempt whichever host process has its pid.
fn check_host_pid_namespace() -> Result<()> {
    let namespace = std::fs::read_link("/proc/self/ns/pid").context("reading /proc/self/ns/pid")?;
    if namespace.as_os_str() != INITIAL_PID_NAMESPACE {
        bail!(
            "the agent runs in a PID namespace of its own ({}), not the host's: the kernel programs name \
             processes by their host pid; run it in the host's PID namespace (hostPID: true)",
            namespace.display()
        );
    }
    Ok(())
}

/// Each protection the config turns off, said plainly: every one is on by default, and
/// turning one off is the operator's explicit choice, logged at each start.
pub fn weakened(config: &Config) -> Vec<String> {
    let mut weakened = Vec::new();
    if let Some(cluster) = &config.cluster {
        if !cluster.require_node_binding {
            weakened.push(
                "cluster.require_node_binding = false: a certificate that binds neither a node nor a pod is admitted \
                 on every node, once on each"
                    .to_string(),
            );
        }
        if !cluster.discover_api_server {
            weakened.push(
                "cluster.discover_api_server = false: the API server's own addresses are protected only if the \
                 SebPolicy or enforcement.protected lists them"
                    .to_string(),
            );
        }
    } else if config.enforcement.protected.is_empty() && config.enforcement.protected_hosts.is_empty() {
        weakened.push(
            "enforcement.protected and enforcement.protected_hosts are empty: no endpoint is protected".to_string(),
        );
    }
    let within = |path: &str, ancestor: &str| {
        ancestor == "/" || path == ancestor || path.strip_prefix(ancestor).is_some_and(|rest| rest.starts_with('/'))
    };
    for exempt in &config.enforcement.exempt_cgroups {
        for scope in config.enforcement.scope.iter().filter(|scope| within(scope, exempt)) {
            weakened.push(format!(
                "enforcement.exempt_cgroups holds `{exempt}`: the whole of the scope `{scope}` is exempt"
            ));
        }
    }
    if let Some(endpoint) = config.aws.as_ref().and_then(|aws| aws.endpoint.as_deref())
        && endpoint.get(..7).is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"))
    {
        weakened.push(format!(
            "aws.endpoint = \"{endpoint}\" is plain HTTP: the minted sessions' credentials and every request cross \
             the network readable"
        ));
    }
    weakened
}

/// The cgroup2 mount, once every cgroup the config names is found under it. A missing
/// one is a config error: enforcing less than asked for is not an option.
fn check_cgroups(config: &Config) -> Result<PathBuf> {
    let mount = cgroupfs::cgroup2_mount()?;
    let fields = [
        ("enforcement.scope", &config.enforcement.scope),
        ("enforcement.exempt_cgroups", &config.enforcement.exempt_cgroups),
    ];
    for (field, paths) in fields {
        for (i, relative) in paths.iter().enumerate() {
            cgroupfs::cgroup_id(&cgroupfs::resolve(&mount, relative))
                .with_context(|| format!("config field `{field}[{i}]`"))?;
        }
    }
    Ok(mount)
}

/// The config's share of what is enforced.
fn config_sources(config: &Config) -> Result<Sources> {
    let endpoints = config.endpoints()?;
    policy::compile(&endpoints, &[], &[]).context("config field `enforcement.protected`")?;
    Ok(Sources {
        endpoints: [(EndpointSource::Config, endpoints)].into(),
        scope: config.enforcement.scope.iter().cloned().collect(),
        exempt: config.enforcement.exempt_cgroups.iter().cloned().collect(),
        // Until the cluster state is read, what an earlier run enforced stays enforced.
        keep_previous: config.cluster.is_some(),
        hosts_pending: !config.enforcement.protected_hosts.is_empty(),
        syscall_tables: config.enforcement.syscall_tables,
        ..Default::default()
    })
}

fn admission_from(config: &Config) -> Result<Admission> {
    let anchors = match &config.admission.trust_anchors {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("config field `admission.trust_anchors`: cannot read {}", path.display()))?;
            Some(
                TrustAnchors::from_pem(&pem)
                    .with_context(|| format!("config field `admission.trust_anchors` ({})", path.display()))?,
            )
        }
        None => {
            warn!("admission.trust_anchors is not set: every proposal will be denied");
            None
        }
    };
    let validity = ValidityPolicy {
        max_ttl: Duration::from_secs(config.admission.max_ttl_seconds),
        clock_skew: Duration::from_secs(config.admission.clock_skew_seconds),
    };
    let node_name = match &config.cluster {
        Some(cluster) => cluster.node_name()?,
        None => match &config.admission.node_name {
            Some(name) => name.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("config field `admission.node_name` is not set, and the host name cannot be read")?
                .trim()
                .to_string(),
        },
    };
    let admission = Admission::new(anchors, validity).with_node_name(node_name);
    Ok(match config.admission.max_parallel_verifications {
        Some(limit) => admission.with_parallel_verifications(limit),
        None => admission,
    })
}

/// A file the agent creates on first start (in its state volume): if it is there it must
/// be a file; if not, its directory must be one that can be made.
fn check_state_file(field: &str, path: &Path) -> Result<()> {
    if path.exists() {
        if !path.is_file() {
            bail!("config field `{field}`: {} is not a regular file", path.display());
        }
        return Ok(());
    }
    let existing = path.ancestors().skip(1).find(|dir| dir.exists());
    match existing {
        Some(dir) if dir.is_dir() => Ok(()),
        Some(dir) => bail!("config field `{field}`: {} is not a directory", dir.display()),
        None => bail!("config field `{field}`: no directory of {} exists", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protection_turned_off_is_named() {
        let strong = Config::parse("[[enforcement.protected]]\ncidr = \"10.0.0.0/8\"\n").unwrap();
        assert_eq!(weakened(&strong), Vec::<String>::new());
        let weak = Config::parse(
            "[enforcement]\nscope = [\"/pods/a\", \"/other\"]\nexempt_cgroups = [\"/pods\"]\n\
             [aws]\nendpoint = \"HTTP://127.0.0.1:5000\"\ncredentials_file = \"/c.json\"\n",
        )
        .unwrap();
        let said = weakened(&weak);
        assert_eq!(said.len(), 3, "{said:#?}");
        assert!(said[0].contains("no endpoint is protected"));
        assert!(said[1].contains("the whole of the scope `/pods/a`"));
        assert!(said[2].contains("plain HTTP"));
        // A sibling whose name merely starts the same is not within.
        let sibling = Config::parse(
            "[enforcement]\nscope = [\"/podsx\"]\nexempt_cgroups = [\"/pods\"]\n[[enforcement.protected]]\ncidr = \"10.0.0.0/8\"\n",
        )
        .unwrap();
        assert_eq!(weakened(&sibling), Vec::<String>::new());
    }
}

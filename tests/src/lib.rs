//! Sandboxes for seb's privileged integration tests and benchmarks.
//!
//! A [`Sandbox`] is one isolated world: its own cgroup v2 subtree (never the machine's
//! root cgroup), its own network namespace (loopback only), its own bpffs pin directory,
//! audit database and broker socket. Everything is removed on drop.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

pub mod broker;
pub mod deploy;
pub mod forge;
pub mod kube_standin;
pub mod kube_store;
pub mod kubelet;
pub mod moto;
pub mod mtls;
pub mod poll;
pub mod revocation;
pub mod sab;
pub mod tamper;
pub mod tls_server;

/// The node the sandboxes' node-local SAB serves, and their brokers' `admission.node_name`.
pub const NODE_NAME: &str = "node-a";

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// What [`Sandbox::record_tcp`] received, per connection in accept order.
pub struct TcpRecorder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: thread::JoinHandle<Vec<Vec<u8>>>,
}

impl TcpRecorder {
    pub fn stop(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.reader.join().expect("the TCP recorder panicked")
    }
}

/// The binaries a sandbox runs.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `seb-probe`: places itself in a cgroup and namespace, then acts.
    pub probe: PathBuf,
    /// `seb-agent`.
    pub agent: PathBuf,
}

impl Tools {
    /// Both binaries from one target directory (`target/<profile>`).
    pub fn in_dir(dir: &Path) -> Self {
        Self { probe: dir.join("seb-probe"), agent: dir.join("seb-agent") }
    }

    /// For integration tests: the probe cargo built for them (`CARGO_BIN_EXE_seb-probe`),
    /// and the agent, built once with the same profile.
    pub fn for_tests(probe: &str) -> Self {
        static BUILD: std::sync::Once = std::sync::Once::new();
        let dir = Path::new(probe).parent().expect("target dir").to_path_buf();
        BUILD.call_once(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "--quiet", "-p", "seb-agent", "--bin", "seb-agent"]);
            // What cargo sets for this test crate would mark build scripts that watch
            // it (ring's) changed, and the next `cargo test` would rebuild them.
            for (name, _) in std::env::vars_os() {
                if name.to_str().is_some_and(is_per_crate_cargo_variable) {
                    build.env_remove(&name);
                }
            }
            if dir.ends_with("release") {
                build.arg("--release");
            }
            assert!(build.status().expect("running cargo").success(), "building seb-agent failed");
        });
        Self::in_dir(&dir)
    }
}

/// Variables cargo sets for the crate it is building or running, not for the build.
fn is_per_crate_cargo_variable(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
        )
}

/// Sandboxes load eBPF programs and create cgroups and namespaces: they need root.
/// Tests fail (never skip) without it, so a green run always means they ran.
pub fn require_root() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "seb's sandboxes must run as root (they attach eBPF programs)");
    Ok(())
}

pub struct Sandbox {
    pub tools: Tools,
    pub name: String,
    pub cgroup: PathBuf,
    /// The cgroup path relative to the cgroup2 mount, as the config names it.
    pub cgroup_relative: String,
    pub netns: String,
    pub dir: PathBuf,
    pub pin_path: PathBuf,
    pub config: PathBuf,
    pub database: PathBuf,
    pub socket: PathBuf,
    /// More `[broker]` settings (TOML lines) for the next config written.
    pub broker_settings: String,
    /// A command the agent is started through (`unshare --cgroup`), empty for none.
    pub agent_wrapper: Vec<String>,
    agent: Option<Child>,
    listeners: Vec<Listener>,
}

enum Listener {
    Tcp(#[allow(dead_code)] TcpListener),
    Udp(#[allow(dead_code)] UdpSocket),
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Sandbox {
    /// A fresh sandbox with cgroups `<root>/{broker,workload,exempt}` and a network
    /// namespace with loopback up.
    pub fn new(label: &str, tools: Tools) -> Result<Self> {
        require_root()?;
        let name = format!("seb-sbx-{label}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let mount = seb_agent::cgroupfs::cgroup2_mount()?;
        let cgroup = mount.join(&name);
        for child in ["", "broker", "workload", "exempt"] {
            fs::create_dir_all(cgroup.join(child)).with_context(|| format!("creating cgroup {name}/{child}"))?;
        }
        run(Command::new("ip").args(["netns", "add", &name]))?;
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir)?;
        Ok(Self {
            tools,
            cgroup_relative: format!("/{name}"),
            pin_path: PathBuf::from("/sys/fs/bpf").join(&name),
            config: dir.join("agent.toml"),
            database: dir.join("audit.db"),
            socket: dir.join("broker.sock"),
            netns: name.clone(),
            name,
            cgroup,
            dir,
            broker_settings: String::new(),
            agent_wrapper: Vec::new(),
            agent: None,
            listeners: Vec::new(),
        })
    }

    /// The broker's audit-signing key, and its public half.
    pub fn signing_key(&self) -> PathBuf {
        self.dir.join("broker.key")
    }
    pub fn public_key(&self) -> PathBuf {
        self.dir.join("broker.key.pub")
    }
    /// The head file the broker keeps beside its key.
    pub fn head_file(&self) -> PathBuf {
        self.dir.join("broker.key.head")
    }

    /// The broker's ledger on this sandbox's store, in this process (the agent stopped).
    pub fn start_ledger(&self) -> Result<(seb_agent::audit::Ledger, thread::JoinHandle<()>)> {
        use seb_agent::audit::{Ledger, LedgerFiles, keys};
        let key = keys::load_or_create(&self.signing_key())?;
        let files = LedgerFiles::new(&self.database, &self.signing_key());
        Ledger::start(&files, key, seb_agent::admission::state::DERIVED)
    }

    /// Write the agent config: enforce the sandbox cgroup, exempt `<root>/exempt`.
    /// `extra` is TOML placed after the enforcement table (protected endpoints, an
    /// `[admission]` table).
    pub fn write_config(&self, extra: &str) -> Result<()> {
        self.write_config_scoped(std::slice::from_ref(&self.cgroup_relative), extra)
    }

    /// The same, enforcing only `scope` (cgroup paths relative to the mount).
    pub fn write_config_scoped(&self, scope: &[String], extra: &str) -> Result<()> {
        let scope: Vec<String> = scope.iter().map(|path| format!("\"{path}\"")).collect();
        let text = format!(
            "[bpf]\npin_path = \"{}\"\n\n[enforcement]\nscope = [{}]\nexempt_cgroups = [\"{}/exempt\"]\n\n{extra}\n\
             [audit]\ndatabase = \"{}\"\nsigning_key = \"{}\"\n\n[broker]\nsocket = \"{}\"\n{}\n",
            self.pin_path.display(),
            scope.join(", "),
            self.cgroup_relative,
            self.database.display(),
            self.signing_key().display(),
            self.socket.display(),
            self.broker_settings,
        );
        fs::write(&self.config, text)?;
        Ok(())
    }

    /// Listen on `addr` (TCP and UDP) inside the namespace. An IPv6 wildcard accepts
    /// IPv4 (and IPv4-mapped) connections too.
    pub fn listen(&mut self, addr: SocketAddr) -> Result<()> {
        self.listen_on(addr, None)
    }

    /// The same, the sockets bound to `device` (`SO_BINDTODEVICE`) when given.
    pub fn listen_on(&mut self, addr: SocketAddr, device: Option<&str>) -> Result<()> {
        let device = device.map(|name| name.as_bytes().to_vec());
        let (tcp, udp) = self.in_netns(move || -> Result<(TcpListener, UdpSocket)> {
            let socket = |kind: socket2::Type| -> Result<socket2::Socket> {
                let socket = socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)?;
                if addr.is_ipv6() {
                    socket.set_only_v6(false)?;
                }
                socket.bind_device(device.as_deref())?;
                // As many UDP services do: a socket bound to a broadcast or multicast
                // address may then share the port.
                socket.set_reuse_address(true)?;
                socket.bind(&addr.into())?;
                Ok(socket)
            };
            let tcp = socket(socket2::Type::STREAM)?;
            tcp.listen(128)?;
            Ok((tcp.into(), socket(socket2::Type::DGRAM)?.into()))
        })?;
        self.listeners.push(Listener::Tcp(tcp));
        self.listeners.push(Listener::Udp(udp));
        Ok(())
    }

    /// Accept TCP connections on `addr` inside the namespace and keep what each sends,
    /// until [`TcpRecorder::stop`]: which bytes of a connection got through.
    pub fn record_tcp(&self, addr: SocketAddr) -> Result<TcpRecorder> {
        let listener = self.in_netns(move || Ok(TcpListener::bind(addr)?))?;
        listener.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let reader = thread::spawn(move || {
            let mut connections: Vec<(std::net::TcpStream, Vec<u8>)> = Vec::new();
            loop {
                let last = stopped.load(Ordering::SeqCst);
                while let Ok((stream, _)) = listener.accept() {
                    let _ = stream.set_nonblocking(true);
                    connections.push((stream, Vec::new()));
                }
                for (stream, received) in &mut connections {
                    let mut buffer = [0u8; 4096];
                    while let Ok(n @ 1..) = std::io::Read::read(stream, &mut buffer) {
                        received.extend_from_slice(&buffer[..n]);
                    }
                }
                if last {
                    return connections.into_iter().map(|(_, received)| received).collect();
                }
                thread::sleep(Duration::from_millis(10));
            }
        });
        Ok(TcpRecorder { stop, reader })
    }

    /// Run `make` on a thread inside the sandbox's network namespace: the sockets it
    /// creates belong to the namespace, wherever they are used afterwards.
    fn in_netns<T: Send + 'static>(&self, make: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        let netns = self.netns.clone();
        thread::spawn(move || -> Result<T> {
            let ns = fs::File::open(format!("/run/netns/{netns}"))?;
            // setns(CLONE_NEWNET) moves only this thread.
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            make()
        })
        .join()
        .expect("namespace thread")
    }

    /// Run `ip <args>` in the sandbox's network namespace.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.netns]).args(args))
    }

    /// A name server at `server`, inside the sandbox's network namespace, answering every
    /// question with no records: protected host names count as answered, with no address.
    /// A shipped config's host names are then resolved, rather than timing out.
    pub fn answer_dns_with_no_records(&self, server: std::net::IpAddr) -> Result<()> {
        if !server.is_loopback() {
            let prefix = if server.is_ipv4() { 32 } else { 128 };
            self.ip(&["addr", "add", &format!("{server}/{prefix}"), "dev", "lo"])?;
        }
        let socket = self.in_netns(move || Ok(UdpSocket::bind((server, 53))?))?;
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((len, peer)) = socket.recv_from(&mut buf) {
                if let Some(reply) = no_records(&buf[..len]) {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        Ok(())
    }

    /// Set sysctls inside the sandbox's network namespace (it is the sandbox's own).
    pub fn sysctl(&self, settings: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["netns", "exec", &self.netns, "sysctl", "-qw"]).args(settings))
    }

    /// Drain every listener without waiting: how many connections and datagrams arrived
    /// since the last call. A denied attempt must leave this at zero.
    pub fn received(&self) -> Result<usize> {
        let mut count = 0;
        for listener in &self.listeners {
            match listener {
                Listener::Tcp(tcp) => {
                    tcp.set_nonblocking(true)?;
                    while tcp.accept().is_ok() {
                        count += 1;
                    }
                }
                Listener::Udp(udp) => {
                    udp.set_nonblocking(true)?;
                    let mut buffer = [0u8; 2048];
                    while udp.recv_from(&mut buffer).is_ok() {
                        count += 1;
                    }
                }
            }
        }
        Ok(count)
    }

    /// Start `seb-agent run` inside `<root>/broker` and the namespace; wait until it answers.
    pub fn start_agent(&mut self) -> Result<Vec<Value>> {
        ensure!(self.agent.is_none(), "agent already running");
        let mut child = self.agent_command().stderr(Stdio::piped()).spawn()?;
        // Collect the agent's JSON log lines until it reports readiness.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut logs = Vec::new();
        loop {
            if let Some(status) = child.try_wait()? {
                // Everything it wrote: the reader stops at the end of its stderr.
                let mut lines: Vec<String> = logs.iter().map(Value::to_string).collect();
                lines.extend(rx.iter());
                bail!("the agent exited with {status} before it was ready:\n{}", lines.join("\n"));
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let value: Value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                    let ready = value["fields"]["message"] == "broker ready";
                    logs.push(value);
                    if ready {
                        break;
                    }
                }
                Err(_) if Instant::now() > deadline => bail!("the agent was not ready within 20 s: {logs:?}"),
                Err(_) => {}
            }
        }
        self.agent = Some(child);
        Ok(logs)
    }

    /// `seb-agent run` inside `<root>/broker` and the namespace, not yet started.
    pub fn agent_command(&self) -> Command {
        let mut command = self.exec_in("broker");
        command
            .args(&self.agent_wrapper)
            .arg(&self.tools.agent)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("SEB_LOG_FORMAT", "json");
        command
    }

    /// SIGTERM the agent and wait: a graceful stop.
    pub fn stop_agent(&mut self) -> Result<()> {
        if let Some(mut child) = self.agent.take() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
            let status = child.wait()?;
            ensure!(status.success(), "the agent stopped with {status}");
        }
        Ok(())
    }

    /// SIGTERM the agent and give it `limit` to exit (successfully); past that it is
    /// killed and this is an error. Returns how long it took.
    pub fn stop_agent_within(&mut self, limit: Duration) -> Result<Duration> {
        let Some(mut child) = self.agent.take() else { bail!("no agent running") };
        let started = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(status.success(), "the agent stopped with {status}");
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                child.kill()?;
                child.wait()?;
                bail!("the agent did not exit within {limit:?} of SIGTERM (killed)");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL the agent: no chance to clean anything up.
    pub fn kill_agent(&mut self) -> Result<()> {
        if let Some(mut child) = self.agent.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The agent's pid (it exec'd in place of the probe that placed it).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// GET `path` from the agent's metrics endpoint (default address), inside the
    /// namespace: the status code and the body.
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let request = format!("GET {path} HTTP/1.0\r\nhost: localhost\r\n\r\n");
        let text = moto::in_netns(&self.netns, move || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect("127.0.0.1:9464").await?;
            stream.write_all(request.as_bytes()).await?;
            let mut text = String::new();
            stream.read_to_string(&mut text).await?;
            Ok(text)
        })?;
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok((status, text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()))
    }

    /// Run the probe in `<root>/<cgroup>` and the namespace.
    pub fn probe(&self, cgroup: &str, args: &[&str]) -> Result<Value> {
        self.probe_in(&self.netns, cgroup, args)
    }

    /// The same in another network namespace.
    pub fn probe_in(&self, netns: &str, cgroup: &str, args: &[&str]) -> Result<Value> {
        let output = self.probe_command(netns, cgroup).args(args).output()?;
        parse_json_output(&output, "seb-probe")
    }

    /// The probe, to run in `<root>/<cgroup>` and the network namespace `netns`.
    fn probe_command(&self, netns: &str, cgroup: &str) -> Command {
        let mut command = Command::new(&self.tools.probe);
        command.arg("--cgroup").arg(self.cgroup.join(cgroup)).args(["--netns", netns]);
        command
    }

    /// Start the probe in `<root>/<cgroup>` and the namespace, its stdin and stdout piped:
    /// for a probe that reports, then waits for the test.
    pub fn spawn_probe(&self, cgroup: &str, args: &[&str]) -> Result<Child> {
        Ok(self.probe_command(&self.netns, cgroup).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?)
    }

    /// Run the probe in `<root>/<cgroup>` and the namespace; its raw output and pid, for
    /// a probe that may not live to print anything.
    pub fn probe_raw(&self, cgroup: &str, args: &[&str]) -> Result<(Output, u32)> {
        let child =
            self.probe_command(&self.netns, cgroup).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let pid = child.id();
        Ok((child.wait_with_output()?, pid))
    }

    /// Run a program in `<root>/<cgroup>` and the namespace, with extra environment.
    pub fn run_in(&self, cgroup: &str, program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<Output> {
        let mut command = self.exec_in(cgroup);
        command.arg(program).args(args);
        for (name, value) in env {
            command.env(name, value);
        }
        Ok(command.output()?)
    }

    /// Start a program in `<root>/<cgroup>` and the namespace, without waiting (the child
    /// is the program itself: the probe execs it in place).
    pub fn spawn_in(&self, cgroup: &str, program: &str, args: &[&str]) -> Result<Child> {
        Ok(self.exec_in(cgroup).arg(program).args(args).spawn()?)
    }

    /// The probe, set to exec what follows in `<root>/<cgroup>` and the namespace.
    fn exec_in(&self, cgroup: &str) -> Command {
        let mut command = self.probe_command(&self.netns, cgroup);
        command.args(["exec", "--"]);
        command
    }

    /// Try one egress method from a workload process.
    pub fn attempt(&self, cgroup: &str, method: &str, addr: &str) -> Result<Value> {
        self.probe(cgroup, &["try", method, addr])
    }

    /// Run `seb-agent <args> --config <sandbox config>`.
    pub fn agent_cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(&self.tools.agent).args(args).arg("--config").arg(&self.config).output()?)
    }

    /// Kernel denials recorded so far, from `seb-agent denials --json`.
    pub fn denials(&self) -> Result<Vec<Value>> {
        let output = self.agent_cli(&["denials", "--json"])?;
        ensure!(output.status.success(), "seb-agent denials failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout)?
            .lines()
            .map(|line| serde_json::from_str(line).context("a denial line is not JSON"))
            .collect()
    }

    /// Wait until a denial for this socket cookie is recorded (generously: a loaded CI
    /// machine records thousands of denials from a hammering test more slowly).
    pub fn wait_for_denial(&self, cookie: u64) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(found) = self.denials()?.into_iter().find(|d| d["socket_cookie"] == cookie) {
                return Ok(found);
            }
            ensure!(Instant::now() < deadline, "no denial recorded for socket cookie {cookie}");
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's status, straight from the broker socket (quicker than the CLI).
    pub fn status(&self) -> Result<Value> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let response =
            runtime.block_on(seb_agent::protocol::call(&self.socket, &seb_agent::protocol::Request::Status))?;
        match response {
            seb_agent::protocol::Response::Status(report) => Ok(serde_json::to_value(report)?),
            other => bail!("status answered {other:?}"),
        }
    }

    /// Names of the pinned links.
    pub fn pinned_links(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = fs::read_dir(self.pin_path.join("links"))?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        names.sort();
        Ok(names)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.kill_agent();
        self.listeners.clear();
        let _ = seb_agent::enforcement::loader::unload(&seb_agent::enforcement::PinLayout::new(&self.pin_path));
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
        // Whatever a failed test left running in the sandbox's cgroups ends with it.
        kill_cgroup_tree(&self.cgroup);
        remove_cgroup_tree(&self.cgroup);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// SIGKILL every process in a cgroup and below it (`cgroup.kill`), and wait (up to 2 s)
/// until they are gone, so the directories can be removed.
fn kill_cgroup_tree(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while fs::read_to_string(dir.join("cgroup.events")).is_ok_and(|events| events.contains("populated 1"))
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
}

/// Remove a cgroup and every cgroup below it, deepest first (a cgroup directory holds
/// only kernel files, which go with it).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

pub fn parse_json_output(output: &Output, what: &str) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("{what} printed {stdout:?} (stderr: {})", String::from_utf8_lossy(&output.stderr)))
}

fn run(command: &mut Command) -> Result<()> {
    let output = command.output().with_context(|| format!("running {command:?}"))?;
    ensure!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// A network namespace of its own joined to a sandbox's by a veth pair, like a pod's or
/// a remote host's: `near` (a CIDR address) on `seb-peer0`, the sandbox's side; `far` on
/// `seb-peer1`, this side, whose default route goes through `near`. Removed when dropped
/// (the pair goes with it).
pub struct PeerNamespace {
    pub name: String,
}

impl PeerNamespace {
    /// Named `<netns>-<suffix>`.
    pub fn new(netns: &str, suffix: &str, near: &str, far: &str) -> Result<Self> {
        let peer = PeerNamespace { name: format!("{netns}-{suffix}") };
        run(Command::new("ip").args(["netns", "add", &peer.name]))?;
        let ip = |netns: &str, args: &[&str]| run(Command::new("ip").args(["-n", netns]).args(args));
        ip(netns, &["link", "add", "seb-peer0", "type", "veth", "peer", "name", "seb-peer1", "netns", &peer.name])?;
        ip(netns, &["addr", "add", near, "dev", "seb-peer0"])?;
        ip(netns, &["link", "set", "seb-peer0", "up"])?;
        let gateway = near.split_once('/').map_or(near, |(address, _)| address);
        for args in [
            &["addr", "add", far, "dev", "seb-peer1"][..],
            &["link", "set", "seb-peer1", "up"],
            &["link", "set", "lo", "up"],
            &["route", "add", "default", "via", gateway],
        ] {
            ip(&peer.name, args)?;
        }
        Ok(peer)
    }
}

impl Drop for PeerNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Copy an SQLite store through SQLite (`VACUUM INTO`): committed records may still be
/// in the WAL file beside it (the agent checkpoints once a second), which a copy of the
/// database file alone would leave behind.
pub fn snapshot_store(from: &Path, to: &Path) -> Result<()> {
    let source = rusqlite::Connection::open(from).with_context(|| format!("opening {}", from.display()))?;
    let target = to.to_str().context("a store path that is not UTF-8")?;
    source.execute("VACUUM INTO ?1", [target]).with_context(|| format!("copying {} to {target}", from.display()))?;
    Ok(())
}

/// Wait until `path` no longer exists (a reaped process's /proc entry).
pub fn wait_gone(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while path.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
}

/// The answer to a DNS `query` (RFC 1035): its id and question, no records, NOERROR.
fn no_records(query: &[u8]) -> Option<Vec<u8>> {
    let mut at = 12;
    while *query.get(at)? != 0 {
        at += 1 + usize::from(query[at]);
    }
    let question_end = at + 1 + 4;
    let question = query.get(12..question_end)?;
    let mut reply = query[..2].to_vec();
    // Response, recursion desired and available, NOERROR; one question, nothing else.
    reply.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    Some(reply)
}

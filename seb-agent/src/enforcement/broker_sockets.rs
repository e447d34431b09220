//! The broker's own connections: the only ones the kernel lets through to a protected
//! endpoint.
//!
//! Before connecting, the broker registers the socket's cookie (`SO_COOKIE`, unique for
//! the life of the boot and never reused) with its own tgid. The kernel then allows a
//! connect to a protected endpoint only on a registered socket *and* only from the
//! registering process. Hence:
//! - another process, in the broker's cgroup or anywhere, has no registered socket;
//! - a child the broker forks or execs creates unregistered sockets, and an inherited
//!   registered one fails the tgid check (broker sockets are also close-on-exec);
//! - a process that reuses the broker's PID after it exits gets nothing from a kept
//!   duplicate of a registered socket: each registration carries the broker process's
//!   generation in `SEB_BROKER_PROCESSES`, and the kernel removes that entry the moment
//!   the process exits (the `sched_process_exit` tracepoint).
//!
//! The registration is removed when the connection is dropped. A socket opened while
//! executing a decision carries that decision's [`ExecutionTag`]: revoking its
//! certificate or contract removes the registration at once ([`BrokerSockets::cut`]),
//! and the egress program drops the connection's next packet.

use std::{
    collections::HashMap as StdHashMap,
    future::Future,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, HashMap, MapData};
use seb_common::{BrokerSocket, map_names};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::{PinLayout, integrity::Finding, loader::AttachTargets, processes};
use crate::cgroupfs;

type Registry = HashMap<MapData, u64, BrokerSocket>;

/// The pinned maps: registered sockets, those cut by a revocation (whose packets the
/// egress program drops), the live broker processes, and the processes of the scope.
struct Maps {
    registry: Registry,
    cut: HashMap<MapData, u64, u8>,
    /// Set before the first cut, cleared when none is left (see the egress program).
    cut_pending: Array<MapData, u64>,
    processes: HashMap<MapData, u32, u64>,
    /// The processes of the scope the kernel follows.
    scoped: HashMap<MapData, u32, u64>,
}

/// The decision a socket is opened for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionTag {
    pub decision_id: String,
    pub serial: String,
    pub contract_id: String,
    pub policy_epoch: u64,
    pub revocation_epoch: u64,
}

/// Decisions whose connections must not reach production any more: revoked serials and
/// contracts, and the epochs in force (a decision certified under an older revocation
/// epoch, or another policy epoch, is retired with it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retired {
    pub serials: std::collections::BTreeSet<String>,
    pub contract_ids: std::collections::BTreeSet<String>,
    pub revocation_epoch: Option<u64>,
    pub policy_epoch: Option<u64>,
}

impl Retired {
    pub fn covers(&self, tag: &ExecutionTag) -> bool {
        self.serials.contains(&tag.serial)
            || self.contract_ids.contains(&tag.contract_id)
            || self.revocation_epoch.is_some_and(|active| tag.revocation_epoch < active)
            || self.policy_epoch.is_some_and(|active| tag.policy_epoch != active)
    }

    /// Fold in a newer state: lists grow, the revocation epoch only moves forward, the
    /// policy epoch is replaced when given.
    fn merge(&mut self, newer: &Retired) {
        self.serials.extend(newer.serials.iter().cloned());
        self.contract_ids.extend(newer.contract_ids.iter().cloned());
        self.revocation_epoch = self.revocation_epoch.max(newer.revocation_epoch);
        self.policy_epoch = newer.policy_epoch.or(self.policy_epoch);
    }
}

tokio::task_local! {
    static EXECUTING: Option<ExecutionTag>;
}

impl ExecutionTag {
    /// The decision the current task is executing, if any.
    pub fn current() -> Option<Self> {
        EXECUTING.try_with(Clone::clone).ok().flatten()
    }

    /// Run `work` on behalf of `tag`: every broker socket it opens carries the tag.
    pub fn within<F: Future>(tag: Option<Self>, work: F) -> impl Future<Output = F::Output> {
        EXECUTING.scope(tag, work)
    }
}

/// Handle on the pinned broker-socket map, shared by every connection the broker makes.
#[derive(Clone)]
pub struct BrokerSockets {
    maps: Arc<Mutex<Maps>>,
    /// Open sockets by cookie, with the decision each serves.
    tags: Arc<Mutex<StdHashMap<u64, Option<ExecutionTag>>>>,
    retired: Arc<Mutex<Retired>>,
    tgid: u32,
    generation: u64,
}

impl BrokerSockets {
    /// Open the pinned registry and enter this process as a live broker. Entries of
    /// broker processes that are gone are purged: their sockets died with them, or are
    /// refused by the kernel anyway (their generation is no longer live).
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let open = |name: &str| -> Result<aya::maps::Map> {
            let path = layout.map(name);
            let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            Ok(aya::maps::Map::HashMap(data))
        };
        let mut maps = Maps {
            registry: HashMap::try_from(open(map_names::BROKER_SOCKETS)?)?,
            cut: HashMap::try_from(open(map_names::CUT_SOCKETS)?)?,
            cut_pending: {
                let path = layout.map(map_names::CUT_PENDING);
                let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
                Array::try_from(aya::maps::Map::Array(data))?
            },
            processes: HashMap::try_from(open(map_names::BROKER_PROCESSES)?)?,
            scoped: HashMap::try_from(open(map_names::SCOPED_TASKS)?)?,
        };
        let tgid = std::process::id();
        // One generation per process, however often it opens the registry.
        let generation = match maps.processes.get(&tgid, 0) {
            Ok(generation) => generation,
            Err(aya::maps::MapError::KeyNotFound) => {
                let generation = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
                maps.processes
                    .insert(tgid, generation, 0)
                    .context("entering this process as a live broker (is SEB_BROKER_PROCESSES full?)")?;
                generation
            }
            Err(e) => return Err(e).context("reading the live broker processes"),
        };
        let sockets =
            Self { maps: Arc::new(Mutex::new(maps)), tags: Arc::default(), retired: Arc::default(), tgid, generation };
        sockets.purge_dead_processes()?;
        Ok(sockets)
    }

    /// Open the registry of the agent whose pins are under `pin_path`.
    pub fn open_at(pin_path: &Path) -> Result<Self> {
        Self::open(&PinLayout::new(pin_path))
    }

    fn purge_dead_processes(&self) -> Result<()> {
        let mut maps = self.lock()?;
        // The exit tracepoint removes a process as it dies; an entry left from before it
        // was attached is dropped here once its process is gone.
        let dead: Vec<u32> = maps
            .processes
            .keys()
            .filter_map(Result::ok)
            .filter(|tgid| *tgid != self.tgid && !Path::new(&format!("/proc/{tgid}")).exists())
            .collect();
        for tgid in dead {
            maps.processes.remove(&tgid)?;
        }
        let live: StdHashMap<u32, u64> = maps.processes.iter().filter_map(Result::ok).collect();
        let stale: Vec<u64> = maps
            .registry
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, registered)| live.get(&registered.tgid) != Some(&registered.generation))
            .map(|(cookie, _)| cookie)
            .collect();
        for cookie in stale {
            maps.registry.remove(&cookie)?;
        }
        // Cut sockets died with the processes that opened them; while another broker
        // process lives, its cut sockets stay cut.
        if live.keys().any(|tgid| *tgid != self.tgid) {
            return Ok(());
        }
        let cut: Vec<u64> = maps.cut.keys().filter_map(Result::ok).collect();
        for cookie in cut {
            maps.cut.remove(&cookie)?;
        }
        // Nothing is cut: TCP and UDP packets may skip the lookup again. Cuts are only
        // ever made by this process, after this.
        maps.cut_pending.set(0, 0, 0)?;
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Maps>> {
        self.maps.lock().map_err(|_| anyhow!("broker socket registry poisoned"))
    }

    /// Register a socket this process owns; the registration lasts as long as the guard.
    pub fn register(&self, socket: BorrowedFd<'_>) -> Result<Registration> {
        let tag = ExecutionTag::current();
        if let Some(tag) = &tag
            && self.retired.lock().map_err(|_| anyhow!("retired decisions poisoned"))?.covers(tag)
        {
            bail!("decision {} was revoked while it executed: no further connection is opened for it", tag.decision_id);
        }
        let cookie = socket_cookie(socket)?;
        // Both under the registry's lock: the registration check sees the kernel's entry
        // and this process's record of it together.
        let mut maps = self.lock()?;
        let mut tags = self.tags.lock().map_err(|_| anyhow!("broker socket tags poisoned"))?;
        maps.registry
            .insert(cookie, BrokerSocket { tgid: self.tgid, _pad: 0, generation: self.generation }, 0)
            .context("registering a broker socket (is the registry full?)")?;
        tags.insert(cookie, tag);
        Ok(Registration { sockets: self.clone(), cookie })
    }

    /// Retire decisions: cut every open socket serving one (returning their cookies),
    /// and refuse to register new ones for them. A cut socket is no longer registered,
    /// and the egress program drops each further packet of it: the connection stays
    /// open in user space, but nothing more of it leaves the node.
    pub fn cut(&self, newly: &Retired) -> Result<Vec<u64>> {
        let mut retired = self.retired.lock().map_err(|_| anyhow!("retired decisions poisoned"))?;
        retired.merge(newly);
        let mut maps = self.lock()?;
        let mut tags = self.tags.lock().map_err(|_| anyhow!("broker socket tags poisoned"))?;
        let cookies: Vec<u64> = tags
            .iter()
            .filter(|(_, tag)| tag.as_ref().is_some_and(|tag| retired.covers(tag)))
            .map(|(cookie, _)| *cookie)
            .collect();
        if !cookies.is_empty() {
            // Before the first cut: the egress program only looks cuts up once this is set.
            maps.cut_pending.set(0, 1, 0).context("marking cuts pending")?;
        }
        for cookie in &cookies {
            // Dropped first, deregistered second: no moment in which it is neither.
            maps.cut.insert(cookie, 1, 0).with_context(|| format!("cutting broker socket {cookie}"))?;
            maps.registry.remove(cookie).with_context(|| format!("removing broker socket {cookie}"))?;
            tags.insert(*cookie, None);
        }
        Ok(cookies)
    }

    /// Hold the kernel's registry to the brokers that really exist. Without BPF-LSM, root
    /// with CAP_BPF can write the pinned maps: enter its own process as a live broker and
    /// its socket as registered, and the kernel lets that socket through. A broker is this
    /// process, or a process in its own cgroup (which could take this one over anyway).
    /// Any other process entered as a broker is killed if it is of the scope, and its entry
    /// removed; a socket
    /// registered for it, under another generation, or under this process without its
    /// knowledge is cut (an open connection sends nothing more) and removed. Returns what
    /// was found, and whether the repair succeeded.
    /// `agent_cgroup` is this process's cgroup directory, once the kernel named it and
    /// the agent armed it.
    pub fn check_registrations(
        &self,
        mount: &Path,
        scope: &AttachTargets,
        agent_cgroup: Option<&Path>,
    ) -> (Vec<Finding>, Result<()>) {
        let mut findings = Vec::new();
        let repaired = self.hold_registrations(mount, scope, agent_cgroup, &mut findings);
        (findings, repaired)
    }

    fn hold_registrations(
        &self,
        mount: &Path,
        scope: &AttachTargets,
        agent_cgroup: Option<&Path>,
        findings: &mut Vec<Finding>,
    ) -> Result<()> {
        let mut maps = self.lock()?;
        let tags = self.tags.lock().map_err(|_| anyhow!("broker socket tags poisoned"))?;
        let brokers = self.classify_brokers(&maps, agent_cgroup)?;
        if brokers.own_entry != Some(self.generation) {
            let what = if brokers.own_entry.is_some() { "holds another generation" } else { "was removed" };
            findings.push(Finding::registration(
                map_names::BROKER_PROCESSES,
                format!(
                    "this agent's own entry (tgid {}) {what}: its connections were refused; written again",
                    self.tgid
                ),
            ));
            maps.processes.insert(self.tgid, self.generation, 0).context("entering this process as a broker again")?;
        }
        // Cut first, kill second: nothing of a forged connection leaves in between.
        self.cut_forged_sockets(&mut maps, &tags, &brokers, findings)?;
        let of_the_scope: Vec<u32> = brokers
            .strangers
            .iter()
            .copied()
            .filter(|tgid| processes::of_the_scope(&maps.scoped, mount, scope, *tgid))
            .collect();
        kill_strangers(&mut maps, &brokers.strangers, &of_the_scope, findings)
    }

    /// The entries of `SEB_BROKER_PROCESSES`: this process's, the live brokers beside it
    /// (in its cgroup), and strangers.
    fn classify_brokers(&self, maps: &Maps, agent_cgroup: Option<&Path>) -> Result<Brokers> {
        let processes: Vec<(u32, u64)> = maps
            .processes
            .iter()
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", map_names::BROKER_PROCESSES))?;
        let mut brokers =
            Brokers { live: StdHashMap::from([(self.tgid, self.generation)]), strangers: Vec::new(), own_entry: None };
        let mut beside_me: Option<Vec<u32>> = None;
        for (tgid, generation) in processes {
            if tgid == self.tgid {
                brokers.own_entry = Some(generation);
                continue;
            }
            if beside_me.is_none() {
                // The cgroup the kernel named and the agent armed (inside a cgroup
                // namespace, this process's own /proc entry names its cgroup relative to
                // the namespace). Not armed yet, it holds no live broker: the kernel
                // spares nothing there either.
                beside_me = Some(match agent_cgroup {
                    Some(dir) => cgroupfs::processes_in(dir)?,
                    None => Vec::new(),
                });
            }
            if beside_me.as_ref().is_some_and(|procs| procs.contains(&tgid)) {
                brokers.live.insert(tgid, generation);
            } else {
                brokers.strangers.push(tgid);
            }
        }
        Ok(brokers)
    }

    /// Cut and remove every registration no live broker made; quietly drop those left by
    /// brokers that died (the kernel refuses them already).
    fn cut_forged_sockets(
        &self,
        maps: &mut Maps,
        tags: &StdHashMap<u64, Option<ExecutionTag>>,
        brokers: &Brokers,
        findings: &mut Vec<Finding>,
    ) -> Result<()> {
        let entries: Vec<(u64, BrokerSocket)> = maps
            .registry
            .iter()
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", map_names::BROKER_SOCKETS))?;
        let mut forged = Vec::new();
        for (cookie, registered) in entries {
            let tgid = registered.tgid;
            if brokers.live.get(&tgid) == Some(&registered.generation)
                && (tgid != self.tgid || tags.contains_key(&cookie))
            {
                continue;
            }
            if brokers.live.contains_key(&tgid) || brokers.strangers.contains(&tgid) {
                forged.push((cookie, tgid));
            } else {
                maps.registry.remove(&cookie).with_context(|| format!("removing stale broker socket {cookie}"))?;
            }
        }
        if forged.is_empty() {
            return Ok(());
        }
        let mut owners: Vec<u32> = forged.iter().map(|(_, tgid)| *tgid).collect();
        owners.sort_unstable();
        owners.dedup();
        findings.push(Finding::registration(
            map_names::BROKER_SOCKETS,
            format!(
                "{} sockets registered by no broker, claimed for {}; cut and removed",
                forged.len(),
                processes::describe(&owners)
            ),
        ));
        maps.cut_pending.set(0, 1, 0).context("marking cuts pending")?;
        for (cookie, _) in &forged {
            maps.cut.insert(cookie, 1, 0).with_context(|| format!("cutting forged broker socket {cookie}"))?;
            maps.registry.remove(cookie).with_context(|| format!("removing forged broker socket {cookie}"))?;
        }
        Ok(())
    }

    /// Whether the kernel holds a registration for this socket cookie.
    pub fn is_registered(&self, cookie: u64) -> Result<bool> {
        match self.lock()?.registry.get(&cookie, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Open a TCP connection as the broker.
    pub async fn connect_tcp(&self, addr: SocketAddr) -> Result<BrokerStream> {
        let socket =
            Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).context("creating a socket")?;
        socket.set_nonblocking(true)?;
        // Closed with a reset: the registration goes when the stream is dropped, and a
        // closed socket that went on sending (its FIN, the last ACKs) would be an
        // unregistered connection to a protected endpoint, which the kernel refuses.
        socket.set_linger(Some(std::time::Duration::ZERO))?;
        let registration = self.register(socket.as_fd())?;
        let socket = TcpSocket::from_std_stream(socket.into());
        let stream = socket.connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        Ok(BrokerStream { stream, _registration: registration })
    }
}

/// A registered socket; dropping it removes the registration.
pub struct Registration {
    sockets: BrokerSockets,
    cookie: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let maps = self.sockets.lock();
        if let Ok(mut tags) = self.sockets.tags.lock() {
            tags.remove(&self.cookie);
        }
        if let Ok(mut maps) = maps {
            // One of the two is already gone; the socket is closed, so neither is needed.
            let _ = maps.registry.remove(&self.cookie);
            let _ = maps.cut.remove(&self.cookie);
        }
    }
}

/// A TCP connection the kernel lets through to protected endpoints.
pub struct BrokerStream {
    pub stream: TcpStream,
    _registration: Registration,
}

impl BrokerStream {
    /// The socket's cookie, its key in the kernel's registry.
    pub fn cookie(&self) -> Result<u64> {
        socket_cookie(self.stream.as_fd())
    }

    /// The stream and its registration, for layering (TLS, HTTP); keep the registration
    /// alive as long as the stream.
    pub fn into_parts(self) -> (TcpStream, Registration) {
        (self.stream, self._registration)
    }
}

/// Who `SEB_BROKER_PROCESSES` names.
struct Brokers {
    /// This process and the live brokers beside it, with their generations.
    live: StdHashMap<u32, u64>,
    /// Processes entered as brokers that are neither.
    strangers: Vec<u32>,
    /// This process's own entry, if it is there.
    own_entry: Option<u64>,
}

/// Remove every stranger's entry, and kill those of the scope. Killed, not only removed:
/// whoever wrote the entry could write it again, and each time have until the next
/// check. A process outside the scope gains nothing from an entry (nothing refuses it to
/// begin with), and its tgid may be a victim's that root wrote: it is left alone.
fn kill_strangers(maps: &mut Maps, strangers: &[u32], of_the_scope: &[u32], findings: &mut Vec<Finding>) -> Result<()> {
    if strangers.is_empty() {
        return Ok(());
    }
    // Described before they are killed, while /proc still shows them.
    let described = processes::describe(strangers);
    let killed = of_the_scope.iter().filter(|tgid| kill_holder(&maps.processes, **tgid)).count();
    findings.push(Finding::registration(
        map_names::BROKER_PROCESSES,
        format!(
            "{} processes entered as brokers that are neither this agent nor in its cgroup: {described}; {killed} \
             killed, every entry removed",
            strangers.len(),
        ),
    ));
    for tgid in strangers {
        match maps.processes.remove(tgid) {
            // The exit tracepoint removed a killed process's entry first.
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing broker process {tgid}")),
        }?;
    }
    Ok(())
}

/// SIGKILL the process `tgid` while it still holds its entry in the broker processes (the
/// exit tracepoint removes a dead process's entry). Whether it was killed.
fn kill_holder(processes: &HashMap<MapData, u32, u64>, tgid: u32) -> bool {
    processes::kill_pinned(tgid, || processes.get(&tgid, 0).is_ok()).is_some()
}

/// `SO_COOKIE`: the kernel's unique, never-reused id of a socket.
pub fn socket_cookie(socket: BorrowedFd<'_>) -> Result<u64> {
    socket_u64(socket, libc::SO_COOKIE).context("getsockopt(SO_COOKIE)")
}

/// A 64-bit `SOL_SOCKET` option (`SO_COOKIE`, `SO_NETNS_COOKIE`).
pub fn socket_u64(socket: BorrowedFd<'_>, option: libc::c_int) -> std::io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a u64 buffer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, option, (&mut value as *mut u64).cast(), &mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

//! What one outsider can hold on the broker socket: connections (in all, and per uid),
//! time, and memory for requests still arriving.
//!
//! At the connection limit a new connection displaces the open one that has waited
//! longest for its next request (as nginx reuses idle keep-alive connections): a flood of
//! idle or trickling connections can never lock callers out, and a request being served
//! is never cut. Only when every connection is busy is a new one refused.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::{
    config::BrokerConfig,
    metrics::{Limit, Metrics},
    protocol::MAX_MESSAGE,
};

/// Requests up to this size need no share of `broker.frame_memory_mib` (a ping, most
/// proposals); larger ones get theirs by displacing requests still arriving.
pub const UNMETERED_FRAME: usize = 16 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct SocketLimits {
    pub max_connections: usize,
    pub max_connections_per_uid: usize,
    pub idle_timeout: Duration,
    pub frame_timeout: Duration,
    pub frame_memory: usize,
    pub shutdown_grace: Duration,
}

impl SocketLimits {
    pub fn from_config(config: &BrokerConfig) -> Self {
        Self {
            max_connections: config.max_connections,
            max_connections_per_uid: config.max_connections_per_uid,
            idle_timeout: Duration::from_secs(config.idle_timeout_seconds),
            frame_timeout: Duration::from_secs(config.frame_timeout_seconds),
            frame_memory: config.frame_memory_mib << 20,
            shutdown_grace: Duration::from_secs(config.shutdown_grace_seconds),
        }
    }
}

/// The open connections, and who waits longest for a request.
pub struct Connections {
    limits: SocketLimits,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next: u64,
    open: HashMap<u64, Slot>,
    per_uid: HashMap<u32, usize>,
    /// Waiting connections by when they started waiting (a sequence number) → id.
    waiting: BTreeMap<u64, u64>,
}

struct Slot {
    uid: u32,
    waiting_since: Option<u64>,
    cancel: CancellationToken,
}

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub Limit);

impl State {
    fn sequence(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Forget a connection; its counts are free at once.
    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.open.remove(&id)?;
        if let Some(since) = slot.waiting_since {
            self.waiting.remove(&since);
        }
        if let Some(count) = self.per_uid.get_mut(&slot.uid) {
            *count -= 1;
            if *count == 0 {
                self.per_uid.remove(&slot.uid);
            }
        }
        Some(slot)
    }

    /// Cut the connection (of `uid`, if given) that has waited longest.
    fn displace(&mut self, uid: Option<u32>) -> bool {
        let victim = self.waiting.values().copied().find(|id| uid.is_none_or(|uid| self.open[id].uid == uid));
        match victim.and_then(|id| self.remove(id)) {
            Some(slot) => {
                slot.cancel.cancel();
                true
            }
            None => false,
        }
    }
}

impl Connections {
    pub fn new(limits: SocketLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { limits, metrics, state: Mutex::default() })
    }

    /// Make room for a connection from `uid`: the returned handle is cancelled when it is
    /// displaced or the broker drains (`drain` is cancelled).
    pub fn open(self: &Arc<Self>, uid: u32, drain: &CancellationToken) -> Result<ConnectionSlot, Refused> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.per_uid.get(&uid).copied().unwrap_or(0) >= self.limits.max_connections_per_uid {
            self.metrics.count_limit(Limit::ConnectionsPerUid);
            if !state.displace(Some(uid)) {
                return Err(Refused(Limit::ConnectionsPerUid));
            }
        }
        if state.open.len() >= self.limits.max_connections {
            self.metrics.count_limit(Limit::Connections);
            if !state.displace(None) {
                return Err(Refused(Limit::Connections));
            }
        }
        let (id, since) = (state.sequence(), state.sequence());
        let cancel = drain.child_token();
        state.open.insert(id, Slot { uid, waiting_since: Some(since), cancel: cancel.clone() });
        state.waiting.insert(since, id);
        *state.per_uid.entry(uid).or_default() += 1;
        self.metrics.connections.set(state.open.len() as i64);
        Ok(ConnectionSlot { id, cancel, connections: self.clone() })
    }

    fn set_waiting(&self, id: u64, waiting: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let since = waiting.then(|| state.sequence());
        let Some(slot) = state.open.get_mut(&id) else { return };
        let previous = std::mem::replace(&mut slot.waiting_since, since);
        if let Some(previous) = previous {
            state.waiting.remove(&previous);
        }
        if let Some(since) = since {
            state.waiting.insert(since, id);
        }
    }

    fn close(&self, id: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.remove(id);
        self.metrics.connections.set(state.open.len() as i64);
    }
}

/// One connection's place; released on drop.
pub struct ConnectionSlot {
    id: u64,
    cancel: CancellationToken,
    connections: Arc<Connections>,
}

impl ConnectionSlot {
    /// Waiting for a request: this connection may be displaced.
    pub fn waiting(&self) {
        self.connections.set_waiting(self.id, true);
    }

    /// Serving a request: this connection is not displaced.
    pub fn busy(&self) {
        self.connections.set_waiting(self.id, false);
    }

    /// Displaced, or the broker is draining.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.connections.close(self.id);
    }
}

/// Memory for large requests while they arrive and while they are parsed, shared by
/// every connection. When it is taken, a request that needs some displaces the requests
/// that have been arriving longest (as connections displace the longest idle): a flood
/// of requests announced large and sent slowly (or not finished) cannot hold it while
/// others are refused. A request that has arrived whole is never displaced; its shares go
/// back before its reply is written (a caller that reads no reply holds nothing here).
///
/// Displacement is fair between uids (max-min, as a fair queue shares a link): a request
/// displaces its own uid's requests, or those of a uid that holds at least as much as its
/// own will once it takes its share. So whoever holds least always gets memory from the
/// heaviest holders, and one uid sending large requests without pause, arriving or being
/// parsed, cannot keep displacing another uid's lighter ones.
pub struct FrameMemory {
    total: usize,
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<Budget>,
    /// Woken when memory comes back.
    released: tokio::sync::Notify,
}

#[derive(Default)]
struct Budget {
    free: usize,
    /// Bytes of displaced requests not yet given back.
    promised: usize,
    /// Bytes the requests waiting for memory will take: free or promised memory beyond
    /// this is anyone's, the rest is theirs.
    owed: usize,
    next: u64,
    /// Requests still arriving, oldest first: sequence → (bytes, uid, its displacement).
    arriving: BTreeMap<u64, (usize, u32, CancellationToken)>,
    /// Bytes each uid holds (arriving or being parsed), displaced shares not counted.
    held: HashMap<u32, usize>,
}

/// A request's share of [`FrameMemory`], given back on drop.
pub struct FrameShare {
    inner: Option<Arc<Inner>>,
    bytes: usize,
    uid: u32,
    /// While the request arrives: its place among the displaceable shares.
    arriving: Option<u64>,
    displaced: CancellationToken,
}

/// How long a request waits for the memory the requests it displaced give back.
const DISPLACEMENT_WAIT: Duration = Duration::from_secs(1);

impl FrameMemory {
    pub fn new(bytes: usize) -> Self {
        // At least one largest message fits, whatever the config says.
        let total = bytes.max(MAX_MESSAGE);
        let inner = Inner {
            state: Mutex::new(Budget { free: total, ..Default::default() }),
            released: tokio::sync::Notify::new(),
        };
        Self { total, inner: Arc::new(inner) }
    }

    /// Whether `len` bytes could ever be taken (a request costing more is too large, not
    /// one to retry).
    pub fn could_take(&self, len: usize) -> bool {
        len <= self.total
    }

    /// Take `len` bytes for a request of `uid` still to arrive (displaceable until
    /// [`FrameShare::arrived`]), or for one being parsed; when they are not free,
    /// displace the requests arriving longest that it may displace (see [`FrameMemory`])
    /// until they would be, and wait (at most a second) for them to let go. `None`: not
    /// even so. Small requests take nothing.
    pub async fn take(&self, len: usize, uid: u32, arriving: bool) -> Option<FrameShare> {
        let displaced = CancellationToken::new();
        if len <= UNMETERED_FRAME {
            return Some(FrameShare { inner: None, bytes: 0, uid, arriving: None, displaced });
        }
        if !self.could_take(len) {
            return None;
        }
        let deadline = tokio::time::Instant::now() + DISPLACEMENT_WAIT;
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            // Registered before looking, so that memory given back in between wakes us.
            let released = self.inner.released.notified();
            {
                let mut budget = self.inner.state.lock().expect("not poisoned");
                let unowed = (budget.free + budget.promised).saturating_sub(budget.owed);
                // A waiter takes what it is owed; anyone else only what no waiter is
                // owed (so a waiter holds back no more than its own need).
                let may_take = if waiting.is_some() { budget.free >= len } else { budget.free >= len && unowed >= len };
                if may_take {
                    budget.free -= len;
                    *budget.held.entry(uid).or_default() += len;
                    if let Some(waiting) = waiting.take() {
                        waiting.settle(&mut budget);
                    }
                    let arriving = arriving.then(|| {
                        budget.next += 1;
                        let seq = budget.next;
                        budget.arriving.insert(seq, (len, uid, displaced.clone()));
                        seq
                    });
                    let inner = Some(self.inner.clone());
                    return Some(FrameShare { inner, bytes: len, uid, arriving, displaced });
                }
                if waiting.is_none() {
                    if !budget.displace(len.saturating_sub(unowed), uid, len) {
                        return None;
                    }
                    budget.owed += len;
                    waiting = Some(Waiting { memory: &self.inner, len });
                }
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return None;
            }
        }
    }
}

/// A request waiting for memory it is owed; the debt is cancelled when it takes the
/// memory, gives up, or its task is dropped.
struct Waiting<'a> {
    memory: &'a Inner,
    len: usize,
}

impl Waiting<'_> {
    fn settle(self, budget: &mut Budget) {
        budget.owed -= self.len;
        std::mem::forget(self);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.memory.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).owed -= self.len;
        // What it was owed is anyone's now.
        self.memory.released.notify_waiters();
    }
}

impl Budget {
    fn held_by(&self, uid: u32) -> usize {
        self.held.get(&uid).copied().unwrap_or(0)
    }

    /// Take `bytes` off what `uid` holds.
    fn release(&mut self, uid: u32, bytes: usize) {
        if let Some(held) = self.held.get_mut(&uid) {
            *held -= bytes;
            if *held == 0 {
                self.held.remove(&uid);
            }
        }
    }

    /// Displace the requests arriving longest that a request of `uid` for `len` bytes
    /// may displace (its own, and those of uids holding at least what it will) until
    /// `wanted` bytes more are on their way back; false (displacing none) when all of
    /// them would not be enough.
    fn displace(&mut self, wanted: usize, uid: u32, len: usize) -> bool {
        let will_hold = self.held_by(uid) + len;
        // Chosen on what each victim's uid would still hold, so a heavy holder is
        // displaced down to the requester's level and no further.
        let mut after: HashMap<u32, usize> = HashMap::new();
        let mut victims = Vec::new();
        let mut coming = 0;
        for (&seq, &(bytes, owner, _)) in &self.arriving {
            if coming >= wanted {
                break;
            }
            let owner_holds = after.entry(owner).or_insert_with(|| self.held_by(owner));
            if owner == uid || *owner_holds >= will_hold {
                *owner_holds -= bytes;
                victims.push(seq);
                coming += bytes;
            }
        }
        if coming < wanted {
            return false;
        }
        for seq in victims {
            let (bytes, owner, displaced) = self.arriving.remove(&seq).expect("chosen from the map");
            displaced.cancel();
            self.release(owner, bytes);
            self.promised += bytes;
        }
        true
    }
}

impl FrameShare {
    /// Resolves when another request has taken this one's memory.
    pub async fn displaced(&self) {
        self.displaced.cancelled().await
    }

    /// The request has arrived whole and is no longer displaced, unless it was displaced
    /// first (false: its memory is promised to another, and it must let go).
    pub fn arrived(&mut self) -> bool {
        let (Some(inner), Some(seq)) = (&self.inner, self.arriving) else { return true };
        let mut budget = inner.state.lock().expect("not poisoned");
        if self.displaced.is_cancelled() {
            return false;
        }
        budget.arriving.remove(&seq);
        self.arriving = None;
        true
    }
}

impl Drop for FrameShare {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else { return };
        {
            let mut budget = inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            budget.free += self.bytes;
            if self.displaced.is_cancelled() {
                // Taken off its uid's holding when it was displaced.
                budget.promised -= self.bytes;
            } else {
                budget.release(self.uid, self.bytes);
                if let Some(seq) = self.arriving {
                    budget.arriving.remove(&seq);
                }
            }
        }
        inner.released.notify_waiters();
    }
}

/// What one JSON value of a request may take once parsed, at most: a `serde_json::Value`
/// (with its map entry and key when it is a member), held twice (the parsed request and
/// what the handlers copy from it). A request of `[0,0,...]` is 2 bytes per value on the
/// wire and over a hundred in memory, so its bytes alone would not bound it.
pub const PARSED_VALUE_BYTES: usize = 256;

/// The memory a request's body may take once parsed: its values (counted by their
/// separators and openings outside strings) times [`PARSED_VALUE_BYTES`], and its text
/// twice over (the parsed strings, and the copies the handlers make).
pub fn parsed_cost(body: &[u8]) -> usize {
    crate::cert::ijson::values_in(body).saturating_mul(PARSED_VALUE_BYTES).saturating_add(2 * body.len())
}

/// Descriptors kept for everything but connections: the store, kernel maps and links,
/// executors' and the cluster watchers' sockets.
pub const RESERVED_DESCRIPTORS: u64 = 512;

/// Raise the soft descriptor limit to the hard one, and make sure `max_connections`
/// connections (two descriptors each: the socket and the caller's pidfd) fit under it,
/// so that the connection limit bites before the descriptors run out.
pub fn ensure_descriptors(max_connections: usize) -> anyhow::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
    }
    let needed = 2 * max_connections as u64 + RESERVED_DESCRIPTORS;
    if limit.rlim_cur < needed {
        anyhow::bail!(
            "config field `broker.max_connections`: {max_connections} connections need {needed} file descriptors, \
             and this process may open {} (RLIMIT_NOFILE); lower the field or raise the limit",
            limit.rlim_cur
        );
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_uid: usize) -> SocketLimits {
        SocketLimits {
            max_connections: total,
            max_connections_per_uid: per_uid,
            idle_timeout: Duration::from_secs(60),
            frame_timeout: Duration::from_secs(10),
            frame_memory: 4 << 20,
            shutdown_grace: Duration::from_secs(10),
        }
    }

    #[test]
    fn at_the_limit_the_longest_waiting_connection_makes_room() {
        let metrics = Arc::new(Metrics::new());
        let connections = Connections::new(limits(3, 3), metrics.clone());
        let drain = CancellationToken::new();
        let a = connections.open(1000, &drain).unwrap();
        let b = connections.open(1000, &drain).unwrap();
        let c = connections.open(2000, &drain).unwrap();
        // `a` is serving a request: it is never displaced. `b` has waited longest.
        a.busy();
        let d = connections.open(2000, &drain).unwrap();
        assert!(b.is_cancelled() && !a.is_cancelled() && !c.is_cancelled() && !d.is_cancelled());
        // Everyone busy: a newcomer is refused.
        c.busy();
        d.busy();
        assert_eq!(connections.open(3000, &drain).err(), Some(Refused(Limit::Connections)));
        assert!(metrics.encode().contains(r#"seb_broker_limited_total{limit="connections"} 2"#));
        drop(b);
        assert!(metrics.encode().contains("seb_broker_connections 3"), "{}", metrics.encode());
        // The broker drains: every connection hears it.
        drain.cancel();
        assert!(a.is_cancelled() && c.is_cancelled() && d.is_cancelled());
    }

    #[test]
    fn a_uid_at_its_limit_displaces_only_its_own_connections() {
        let connections = Connections::new(limits(10, 2), Arc::new(Metrics::new()));
        let drain = CancellationToken::new();
        let other = connections.open(2000, &drain).unwrap();
        let first = connections.open(1000, &drain).unwrap();
        let second = connections.open(1000, &drain).unwrap();
        let third = connections.open(1000, &drain).unwrap();
        assert!(first.is_cancelled() && !other.is_cancelled() && !second.is_cancelled() && !third.is_cancelled());
        second.busy();
        third.busy();
        assert_eq!(connections.open(1000, &drain).err(), Some(Refused(Limit::ConnectionsPerUid)));
        // A connection that served its request and waits again is displaceable again.
        second.waiting();
        assert!(connections.open(1000, &drain).is_ok());
        assert!(second.is_cancelled());
    }

    #[tokio::test]
    async fn large_requests_share_the_frame_memory_displacing_the_longest_arriving() {
        let memory = FrameMemory::new(3 << 20);
        let oldest = memory.take(MAX_MESSAGE, 1000, true).await.unwrap();
        let mut whole = memory.take(MAX_MESSAGE, 1000, true).await.unwrap();
        whole.arrived();
        let newest = memory.take(MAX_MESSAGE, 1000, true).await.unwrap();
        assert!(memory.take(UNMETERED_FRAME, 1000, false).await.is_some(), "a small request always gets through");
        // Full: the next displaces the oldest still arriving, and gets its memory once
        // that one lets go.
        let next =
            tokio::spawn(async move { memory.take(MAX_MESSAGE, 1000, false).await.map(|share| (memory, share)) });
        tokio::time::timeout(Duration::from_secs(1), oldest.displaced()).await.expect("the oldest displaced");
        assert!(!newest.displaced.is_cancelled(), "only as many as needed are displaced");
        drop(oldest);
        let (memory, _parsed) = next.await.unwrap().expect("the memory of the displaced request");
        // The one that arrived whole, and the parse, are never displaced: with only
        // `newest` to give, two more do not fit, and nothing is displaced for them.
        assert!(memory.take(2 * MAX_MESSAGE, 1000, false).await.is_none());
        assert!(!newest.displaced.is_cancelled() && !whole.displaced.is_cancelled());
    }

    #[tokio::test]
    async fn displacement_counts_what_is_on_its_way_back_and_queues_no_one() {
        let memory = Arc::new(FrameMemory::new(4 * MAX_MESSAGE));
        let mut arriving: Vec<FrameShare> = Vec::new();
        for _ in 0..4 {
            arriving.push(memory.take(MAX_MESSAGE, 1000, true).await.unwrap());
        }
        // Two requests needing one share's worth each, at once: each displaces one, not
        // the second the same one and a third for good measure.
        let (a, b) = (memory.clone(), memory.clone());
        let first = tokio::spawn(async move { a.take(MAX_MESSAGE, 1000, false).await.is_some() });
        let second = tokio::spawn(async move { b.take(MAX_MESSAGE, 1000, false).await.is_some() });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let displaced: Vec<bool> = arriving.iter().map(|s| s.displaced.is_cancelled()).collect();
        assert_eq!(displaced, [true, true, false, false]);
        // One displaced that had just arrived whole learns it must let go.
        assert!(!arriving[0].arrived());
        assert!(arriving[3].arrived(), "one not displaced arrives");
        // While those two wait, a smaller request that fits is not held behind them.
        drop(arriving.remove(2));
        assert!(memory.take(UNMETERED_FRAME + 1, 1000, false).await.is_some());
        drop(arriving.drain(..2));
        assert!(first.await.unwrap() && second.await.unwrap());
    }

    #[tokio::test]
    async fn a_uid_displaces_its_own_requests_or_heavier_holders_never_a_lighter_one() {
        const HEAVY: u32 = 1000;
        const LIGHT: u32 = 2000;
        let memory = Arc::new(FrameMemory::new(4 * MAX_MESSAGE));
        // The light uid's request has arrived longest; the heavy uid fills the rest.
        let light = memory.take(MAX_MESSAGE, LIGHT, true).await.unwrap();
        let mut heavy: Vec<FrameShare> = Vec::new();
        for _ in 0..3 {
            heavy.push(memory.take(MAX_MESSAGE, HEAVY, true).await.unwrap());
        }
        // The heavy uid parses another: it displaces its own oldest, not the lighter
        // uid's older request.
        let taker = memory.clone();
        let parse = tokio::spawn(async move { taker.take(MAX_MESSAGE, HEAVY, false).await });
        tokio::time::timeout(Duration::from_secs(1), heavy[0].displaced()).await.expect("its own displaced");
        assert!(!light.displaced.is_cancelled(), "a lighter uid's request is not displaced");
        drop(heavy.remove(0));
        let _parsed = parse.await.unwrap().expect("the memory of its own displaced request");
        // With its own arrived whole, it holds 3 and would hold 4: the lighter uid,
        // holding 1, is not displaced for it, and it is refused.
        assert!(heavy.iter_mut().all(FrameShare::arrived));
        assert!(memory.take(MAX_MESSAGE, HEAVY, false).await.is_none());
        assert!(!light.displaced.is_cancelled() && light.inner.is_some());

        // A lighter uid displaces a heavier one's arriving requests, down to its level.
        let memory = FrameMemory::new(4 * MAX_MESSAGE);
        let mut heavy: Vec<FrameShare> = Vec::new();
        for _ in 0..4 {
            heavy.push(memory.take(MAX_MESSAGE, HEAVY, true).await.unwrap());
        }
        let taking = memory.take(MAX_MESSAGE, LIGHT, true);
        tokio::pin!(taking);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut taking).await.is_err(), "waits for the memory");
        let displaced: Vec<bool> = heavy.iter().map(|s| s.displaced.is_cancelled()).collect();
        assert_eq!(displaced, [true, false, false, false]);
        drop(heavy.remove(0));
        let light = taking.await.expect("the heavier uid's memory");
        // Both then hold what they may: the heavy uid, holding 3, no longer displaces
        // the light one (holding 1) but only its own.
        let again = memory.take(MAX_MESSAGE, HEAVY, false);
        tokio::pin!(again);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut again).await.is_err());
        assert!(heavy[0].displaced.is_cancelled() && !light.displaced.is_cancelled());
    }

    #[test]
    fn a_request_costs_what_its_values_take_once_parsed() {
        let text = |body: &[u8]| 2 * body.len();
        assert_eq!(parsed_cost(b"7"), PARSED_VALUE_BYTES + text(b"7"));
        let object = br#"{"a":[1,2]}"#;
        assert_eq!(parsed_cost(object), 5 * PARSED_VALUE_BYTES + text(object));
        // Separators inside strings (escaped quotes included) are text, not values.
        let string = br#"{"a":"x,y:[{\",z"}"#;
        assert_eq!(parsed_cost(string), 3 * PARSED_VALUE_BYTES + text(string));
        let wide = [b"[".as_slice(), &b"0,".repeat(1000), b"0]"].concat();
        assert_eq!(parsed_cost(&wide), 1002 * PARSED_VALUE_BYTES + text(&wide));
    }
}

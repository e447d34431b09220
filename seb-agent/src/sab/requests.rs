//! Certify requests the SAB remembers: pending ones wait for approvals; decided ones are
//! kept for reading back. Bounded: at most `max_pending` pending, `max_requests` in all
//! (the oldest decided are forgotten first; the log keeps everything).

use std::{
    collections::{HashMap, VecDeque},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{evidence::Approval, identity::Agent};
use crate::cert::{ExecutionContract, MutationRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Issued,
    Refused,
    Denied,
    Expired,
}

/// What the agent asked for.
#[derive(Debug, Clone)]
pub struct Draft {
    pub request: MutationRequest,
    pub precondition: String,
    pub live_state: Option<Value>,
    pub live_state_digest: Option<String>,
    pub intent: String,
}

/// A certificate issued for a request.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate: String,
    pub contract: ExecutionContract,
    pub evidence_digest: String,
    pub serial: String,
    pub not_after: String,
}

impl Issued {
    /// About what it holds in memory: the certificate, and the contract it embeds.
    fn bytes(&self) -> usize {
        2 * self.certificate.len()
    }
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub requester: Agent,
    pub draft: Draft,
    /// The bytes its request arrived in (or its pending record was read from): what a
    /// pending entry holds in memory, parsed, is a few times that.
    pub bytes: usize,
    pub expires: SystemTime,
    pub status: Status,
    pub approvals: Vec<Approval>,
    pub approvals_required: u32,
    pub approvers: Vec<String>,
    pub reasons: Vec<String>,
    pub issued: Option<Issued>,
}

impl Entry {
    /// Who may read it: the requester and the approvers named.
    pub fn visible_to(&self, uri: &str) -> bool {
        self.requester.uri == uri || self.approvers.iter().any(|a| a == uri)
    }

    /// Decided, it is kept for reading back without what it carried (the issued
    /// contract holds the request whole): one requester's decided requests of 1 MiB
    /// each, thousands of them, would otherwise fill the SAB's memory.
    pub fn forget_payload(&mut self) {
        self.draft.request.params = Value::Null;
        self.draft.live_state = None;
        if self.status == Status::Refused {
            // Anyone with a client certificate can be refused; kept as its record keeps it.
            let clip = |text: &str| crate::audit::clipped(text, super::records::REFUSED_TEXT_CLIP);
            self.draft.request.target = clip(&self.draft.request.target);
            self.draft.intent = clip(&self.draft.intent);
        }
        self.bytes = self.id.len()
            + self.draft.request.operation.len()
            + self.draft.request.target.len()
            + self.draft.intent.len()
            + self.reasons.iter().map(String::len).sum::<usize>()
            + self.issued.as_ref().map_or(0, Issued::bytes);
    }

    /// Pending past its deadline.
    pub fn overdue(&self, now: SystemTime) -> bool {
        self.status == Status::Pending && now > self.expires
    }

    /// The state as the API shows it; the certificate only when asked for.
    pub fn view(&self, with_certificate: bool) -> Value {
        let mut view = json!({
            "request_id": self.id,
            "status": self.status,
            "requester": self.requester.uri,
            "request": self.draft.request,
            "intent": self.draft.intent,
            "approvals": self.approvals,
            "approvals_required": self.approvals_required,
            "approvers": self.approvers,
            "expires_at": humantime::format_rfc3339_seconds(self.expires).to_string(),
        });
        if !self.reasons.is_empty() {
            view["reasons"] = json!(self.reasons);
        }
        if let Some(issued) = &self.issued {
            view["contract"] = serde_json::to_value(&issued.contract).unwrap_or_default();
            view["evidence_digest"] = json!(issued.evidence_digest);
            view["serial"] = json!(issued.serial);
            view["not_after"] = json!(issued.not_after);
            if with_certificate {
                view["certificate"] = json!(issued.certificate);
            }
        }
        view
    }
}

/// The bytes of all pending requests together (a requester's: an eighth of it).
pub const MAX_PENDING_BYTES: usize = 16 << 20;
/// The bytes of all decided requests kept for reading back (a requester's: an eighth of
/// it): past it, the oldest are forgotten (the requester's own first).
pub const MAX_DECIDED_BYTES: usize = 32 << 20;

pub struct Requests {
    entries: HashMap<String, Entry>,
    order: VecDeque<String>,
    max_requests: usize,
    max_pending: usize,
}

impl Requests {
    pub fn new(max_requests: usize, max_pending: usize) -> Self {
        Self { entries: HashMap::new(), order: VecDeque::new(), max_requests, max_pending }
    }

    pub fn pending(&self) -> usize {
        self.entries.values().filter(|e| e.status == Status::Pending).count()
    }

    /// Room for one more pending request of `bytes`, in all and of `requester` (at most
    /// `per_requester` requests): counted, and in bytes ([`MAX_PENDING_BYTES`] in all, an
    /// eighth of that per requester). Pending requests are kept whole, reloaded whole at a
    /// restart, and expire only while the SAB runs: unbounded in bytes, a few requesters
    /// could fill its memory for good.
    pub fn has_room_for_pending(&self, requester: &str, per_requester: usize, bytes: usize) -> bool {
        let (mut all, mut of_requester, mut all_bytes, mut requester_bytes) = (0, 0, 0, 0);
        for entry in self.entries.values().filter(|e| e.status == Status::Pending) {
            all += 1;
            all_bytes += entry.bytes;
            if entry.requester.uri == requester {
                of_requester += 1;
                requester_bytes += entry.bytes;
            }
        }
        all < self.max_pending
            && of_requester < per_requester
            && all_bytes + bytes <= MAX_PENDING_BYTES
            && requester_bytes + bytes <= MAX_PENDING_BYTES / 8
    }

    /// Keep `entry`, forgetting the oldest decided requests beyond the bounds (in number,
    /// and [`MAX_DECIDED_BYTES`]).
    pub fn insert(&mut self, entry: Entry) {
        let requester = entry.requester.uri.clone();
        self.order.push_back(entry.id.clone());
        self.entries.insert(entry.id.clone(), entry);
        // One requester's large requests push out its own, not everyone's.
        self.forget_oldest_decided(|e| e.requester.uri == requester, MAX_DECIDED_BYTES / 8);
        let mut decided_bytes: usize =
            self.entries.values().filter(|e| e.status != Status::Pending).map(|e| e.bytes).sum();
        let mut kept = VecDeque::with_capacity(self.order.len());
        while (self.entries.len() > self.max_requests || decided_bytes > MAX_DECIDED_BYTES)
            && let Some(id) = self.order.pop_front()
        {
            match self.entries.get(&id) {
                Some(entry) if entry.status == Status::Pending => kept.push_back(id),
                _ => {
                    if let Some(forgotten) = self.entries.remove(&id) {
                        decided_bytes -= forgotten.bytes;
                    }
                }
            }
        }
        while let Some(id) = kept.pop_back() {
            self.order.push_front(id);
        }
    }

    /// Forget the oldest decided requests that `of` selects until theirs take at most
    /// `bound` bytes.
    fn forget_oldest_decided(&mut self, of: impl Fn(&Entry) -> bool, bound: usize) {
        let decided = |e: &Entry| e.status != Status::Pending && of(e);
        let mut bytes: usize = self.entries.values().filter(|e| decided(e)).map(|e| e.bytes).sum();
        let mut passed = VecDeque::new();
        while bytes > bound
            && let Some(id) = self.order.pop_front()
        {
            match self.entries.get(&id) {
                Some(entry) if decided(entry) => {
                    bytes -= entry.bytes;
                    self.entries.remove(&id);
                }
                Some(_) => passed.push_back(id),
                None => {}
            }
        }
        while let Some(id) = passed.pop_back() {
            self.order.push_front(id);
        }
    }

    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Entry> {
        self.entries.get_mut(id)
    }

    /// Pending requests past their deadline.
    pub fn overdue(&self, now: SystemTime) -> Vec<String> {
        self.entries.values().filter(|e| e.overdue(now)).map(|e| e.id.clone()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.order.iter().filter_map(|id| self.entries.get(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: &str, requester: &str, bytes: usize) -> Entry {
        let request = serde_json::from_value(json!({"provider": "http", "operation": "PUT", "target": "https://a/"}));
        Entry {
            id: id.into(),
            requester: serde_json::from_value(json!({"uri": requester, "node": "n", "cgroup": "/"})).unwrap(),
            draft: Draft {
                request: request.unwrap(),
                precondition: String::new(),
                live_state: None,
                live_state_digest: None,
                intent: String::new(),
            },
            bytes,
            expires: SystemTime::now(),
            status: Status::Pending,
            approvals: Vec::new(),
            approvals_required: 1,
            approvers: Vec::new(),
            reasons: Vec::new(),
            issued: None,
        }
    }

    #[test]
    fn pending_requests_are_bounded_in_bytes_per_requester_and_in_all() {
        let mut requests = Requests::new(10_000, 1_000);
        let share = MAX_PENDING_BYTES / 8;
        requests.insert(pending("a1", "spiffe://a", share - 10));
        assert!(requests.has_room_for_pending("spiffe://a", 50, 10));
        assert!(!requests.has_room_for_pending("spiffe://a", 50, 11), "past the requester's share");
        assert!(requests.has_room_for_pending("spiffe://b", 50, share), "another requester's own share");
        for i in 0..7 {
            requests.insert(pending(&format!("b{i}"), &format!("spiffe://b{i}"), share));
        }
        assert!(!requests.has_room_for_pending("spiffe://c", 50, 11), "past the bytes of all");
        assert!(requests.has_room_for_pending("spiffe://c", 50, 10));
    }

    #[test]
    fn decided_requests_are_kept_within_a_bound_of_bytes_and_without_their_payload() {
        let mut requests = Requests::new(10_000, 100);
        requests.insert(pending("waiting", "spiffe://a", 1 << 20));
        let mut decided = pending("d", "spiffe://a", 0);
        decided.draft.request.params = json!({"body": "x".repeat(1 << 20)});
        decided.draft.live_state = Some(json!("y".repeat(1 << 20)));
        decided.status = Status::Refused;
        decided.forget_payload();
        assert_eq!(decided.draft.request.params, Value::Null);
        assert!(decided.draft.live_state.is_none() && decided.bytes < 1024, "{}", decided.bytes);
        let share = MAX_DECIDED_BYTES / 8;
        for i in 0..10 {
            let mut entry = pending(&format!("d{i}"), &format!("spiffe://r{i}"), share);
            entry.status = Status::Refused;
            requests.insert(entry);
        }
        // The oldest decided ones went; the pending one, older still, stays.
        assert!(requests.get("waiting").is_some());
        assert!(requests.get("d0").is_none() && requests.get("d1").is_none());
        assert!((2..10).all(|i| requests.get(&format!("d{i}")).is_some()));
        // One requester's large requests push out its own, not another's.
        let other = |id: &str, uri: &str, bytes: usize| {
            let mut entry = pending(id, uri, bytes);
            entry.status = Status::Issued;
            entry
        };
        let mut requests = Requests::new(10_000, 100);
        requests.insert(other("theirs", "spiffe://b", 1024));
        for i in 0..16 {
            requests.insert(other(&format!("mine{i}"), "spiffe://a", 2 << 20));
        }
        assert!(requests.get("theirs").is_some(), "another requester's certificate was pushed out");
        assert!(requests.get("mine15").is_some() && requests.get("mine0").is_none());
        // A refused request's texts are kept clipped, as its record keeps them.
        let mut refused = pending("r", "spiffe://a", 0);
        refused.draft.intent = "x".repeat(4000);
        refused.status = Status::Refused;
        refused.forget_payload();
        assert!(refused.draft.intent.len() < 400 && refused.bytes < 1024, "{}", refused.bytes);
    }
}

//! The SAB's decisions, independent of HTTP: certify, read, approve or deny, list, and
//! policy loads with their epochs. Every step is in the SAB's log before anyone hears of it.

use std::{
    sync::{Arc, RwLock},
    thread::JoinHandle,
    time::SystemTime,
};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{error, info};

use super::{
    config::SabConfig,
    epochs::{BrokerEpochs, ClusterEpochs, EpochSource},
    evidence::{self, Approval, Evidence, PolicyDecision},
    identity::Caller,
    issuer::Issuer,
    pending,
    policy::{Grant, PolicyBook, Verdict},
    records::{
        self, ApprovalRecord, CertifyRecord, DecisionRecord, ExpiryRecord, IssuanceRecord, PendingRecord, PolicyRecord,
    },
    requests::{Draft, Entry, Issued, Requests, Status},
    schema::Facts,
    token_review::TokenReviewer,
};
use crate::{
    audit::{Ledger, LedgerFiles, is_busy, keys, now_ns, store},
    cert::{
        ExecutionContract, MutationRequest,
        ca::CaFiles,
        contract::{AgentIdentity, digest_of},
        ijson::{self, Numbers},
    },
};

const MAX_INTENT: usize = 4096;
/// A request's operation and target, at most (an ARN, a URL, a Kubernetes path).
const MAX_OPERATION: usize = 128;
const MAX_TARGET: usize = 4096;

/// An answer: HTTP status and JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    fn ok(status: u16, body: Value) -> Self {
        Self { status, body }
    }

    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self { status, body: json!({"error": {"code": code, "message": message.into()}}) }
    }
}

/// The policies in force and their epoch.
pub struct Loaded {
    pub book: PolicyBook,
    pub epoch: u64,
}

pub struct Sab {
    config: SabConfig,
    /// Node-local mode: the one node served.
    node: Option<String>,
    /// Cluster mode: agents' ServiceAccount tokens are checked here.
    reviewer: Option<TokenReviewer>,
    policy: RwLock<Arc<Loaded>>,
    issuer: Issuer,
    ledger: Ledger,
    requests: tokio::sync::Mutex<Requests>,
    epochs: EpochSource,
    /// How many refused certify requests a second each requester has logged in full.
    refusals: crate::record_budget::SharedBudget<records::RefusalKind>,
}

/// The body of `POST /v1/certify`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertifyBody {
    pub request: MutationRequest,
    pub precondition: String,
    #[serde(default)]
    pub live_state: Option<Value>,
    #[serde(default)]
    pub intent: String,
}

/// An approver's answer to a pending request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Approve,
    Deny,
}

impl Answer {
    fn as_str(self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Deny => "deny",
        }
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Whether `uri`, among the approvers named when the request began waiting, still decides
/// it under `now` (the grant the policies in force give it; none: they refuse it, and it
/// is refused at its last approval whoever gives it): named there, or, for an approval,
/// needing none any more (it is issued then). An approver removed from `@approvers`
/// decides nothing.
fn approver_now(now: Option<&Grant>, verdict: Answer, uri: &str) -> bool {
    match now {
        Some(grant) => grant.approvers.iter().any(|a| a == uri) || (grant.approvals == 0 && verdict == Answer::Approve),
        None => true,
    }
}

fn ledger_error(e: anyhow::Error) -> Reply {
    if is_busy(&e) {
        Reply::error(503, "busy", e.to_string())
    } else {
        Reply::error(500, "internal", format!("the SAB log could not be written, so nothing was decided: {e:#}"))
    }
}

impl Sab {
    /// Open the log, the CA and the policies; make the policies' epoch the broker's.
    pub async fn start(config: SabConfig) -> Result<(Arc<Self>, JoinHandle<()>)> {
        let (node, reviewer, epochs) = match (&config.node, &config.cluster) {
            (Some(node), _) => {
                (Some(node.name.clone()), None, EpochSource::Broker(BrokerEpochs::new(node.broker_socket.clone())))
            }
            (None, Some(cluster)) => {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the cluster (in-cluster ServiceAccount or KUBECONFIG)")?;
                let epochs = ClusterEpochs::new(client.clone(), cluster.policy.clone(), cluster.revocation.clone());
                (None, Some(TokenReviewer::new(client, &cluster.token_audience)), EpochSource::Cluster(epochs))
            }
            (None, None) => anyhow::bail!("give [node] or [cluster]"),
        };
        let key = keys::load_or_create(&config.audit.signing_key)?;
        let files = LedgerFiles::new(&config.audit.database, &config.audit.signing_key);
        let (ledger, thread) = Ledger::start(&files, key, pending::DERIVED).context("opening the SAB log")?;
        let issuer = Issuer::load(&CaFiles { cert: config.issuer.ca_cert.clone(), key: config.issuer.ca_key.clone() })?;
        let book = PolicyBook::load_dir(&config.policies, config.certificate_ttl())?;
        let last: Option<PolicyRecord> = ledger
            // As verified at start: a row written into the log since cannot pass for it.
            .run(|batch| store::last_body_at_start(batch.conn(), records::POLICY_KIND))
            .await?
            .map(|body| serde_json::from_str(&body))
            .transpose()
            .context("the SAB log's last policy record")?;
        let active = epochs.policy().await.context("reading the policy epoch in force")?;
        let epoch = match &last {
            // The same policies, still in force at the broker: nothing to invalidate.
            Some(record) if record.policy_set_digest == book.digest && active == Some(record.epoch) => record.epoch,
            _ => {
                let epoch = last.as_ref().map_or(0, |r| r.epoch).max(active.unwrap_or(0)) + 1;
                epochs.publish(epoch).await.context("setting the policy epoch")?;
                write_policy_record(&ledger, &book, epoch).await?;
                epoch
            }
        };
        info!(epoch, policies = book.policies, digest = %book.digest, "SAB policies loaded");
        let mut requests = Requests::new(config.max_requests, config.max_pending);
        let awaiting = ledger.run(|batch| pending::load(batch.conn())).await.context("the pending requests")?;
        if !awaiting.is_empty() {
            info!(requests = awaiting.len(), "requests awaiting approvals resumed from the SAB log");
        }
        for entry in awaiting {
            requests.insert(entry);
        }
        let sab = Self {
            node,
            reviewer,
            policy: RwLock::new(Arc::new(Loaded { book, epoch })),
            issuer,
            ledger,
            requests: tokio::sync::Mutex::new(requests),
            epochs,
            refusals: crate::record_budget::SharedBudget::new(crate::admission::refusals::LIMITS),
            config,
        };
        Ok((Arc::new(sab), thread))
    }

    pub fn config(&self) -> &SabConfig {
        &self.config
    }

    /// Cluster mode: the TokenReview client agents' tokens go to.
    pub fn reviewer(&self) -> Option<&TokenReviewer> {
        self.reviewer.as_ref()
    }

    pub fn loaded(&self) -> Arc<Loaded> {
        self.policy.read().expect("not poisoned").clone()
    }

    /// Load the policy directory again; if it changed and is valid, it becomes the
    /// policy in force under a new epoch, set where brokers read it first. Returns the new epoch.
    pub async fn reload(&self) -> Result<Option<u64>, ReloadError> {
        let book =
            PolicyBook::load_dir(&self.config.policies, self.config.certificate_ttl()).map_err(ReloadError::Invalid)?;
        let current = self.loaded();
        if book.digest == current.book.digest {
            return Ok(None);
        }
        let publish = async {
            let active = self.epochs.policy().await?.unwrap_or(0);
            let epoch = current.epoch.max(active) + 1;
            self.epochs.publish(epoch).await.context("setting the policy epoch")?;
            write_policy_record(&self.ledger, &book, epoch).await?;
            Ok::<_, anyhow::Error>(epoch)
        };
        let epoch = publish.await.map_err(ReloadError::NotPublished)?;
        info!(epoch, policies = book.policies, digest = %book.digest, "SAB policies reloaded");
        *self.policy.write().expect("not poisoned") = Arc::new(Loaded { book, epoch });
        Ok(Some(epoch))
    }

    /// Healthy only while a certificate could be issued: the revocation epoch, which
    /// every certificate carries, can be read (in cluster mode, the SebRevocation).
    pub async fn health(&self, with_details: bool) -> Reply {
        match self.epochs.revocation().await {
            Ok(revocation) if with_details => Reply::ok(
                200,
                json!({"status": "ok", "policy_epoch": self.loaded().epoch, "revocation_epoch": revocation}),
            ),
            Ok(_) => Reply::ok(200, json!({"status": "ok"})),
            Err(e) => Reply::error(
                503,
                "epochs_unavailable",
                if with_details {
                    format!("the revocation epoch could not be read, so nothing can be issued: {e:#}")
                } else {
                    "the revocation epoch could not be read, so nothing can be issued".into()
                },
            ),
        }
    }

    /// `POST /v1/certify`.
    pub async fn certify(&self, caller: &Caller, body: &[u8]) -> Reply {
        let Caller::Agent(agent) = caller else {
            return Reply::error(403, "not_an_agent", format!("{} is not an agent identity", caller.uri()));
        };
        match &self.node {
            Some(node) if *node != agent.node => {
                return Reply::error(
                    403,
                    "wrong_node",
                    format!("this SAB serves node {node}, the caller is on node {}", agent.node),
                );
            }
            // Cluster mode binds a pod, established by TokenReview before this call.
            None if agent.pod_uid.is_none() => {
                return Reply::error(
                    401,
                    "token_required",
                    "in cluster mode an agent presents its ServiceAccount token",
                );
            }
            _ => {}
        }
        let values = crate::cert::ijson::values_in(body);
        if values > MAX_CERTIFY_VALUES {
            return Reply::error(
                413,
                "too_large",
                format!("the body holds about {values} JSON values; at most {MAX_CERTIFY_VALUES}"),
            );
        }
        let draft = match parse_draft(body) {
            Ok(draft) => draft,
            Err(e) => return Reply::error(400, "malformed", format!("{e:#}")),
        };
        let id = uuid::Uuid::new_v4().to_string();
        let loaded = self.loaded();
        let verdict = loaded.book.evaluate(agent, &facts(&draft, SystemTime::now()));
        let mut entry = Entry {
            id: id.clone(),
            requester: agent.clone(),
            draft,
            bytes: body.len(),
            expires: SystemTime::now() + self.config.approval_timeout(),
            status: Status::Refused,
            approvals: Vec::new(),
            approvals_required: 0,
            approvers: Vec::new(),
            reasons: Vec::new(),
            issued: None,
        };
        match verdict {
            Verdict::Refuse { reasons } => {
                // Anyone with a client certificate can be refused as fast as it can ask:
                // past its share of the second, a refusal is counted, not logged whole;
                // and what is logged or kept of it is clipped (a reason can quote the target).
                let clipped: Vec<String> =
                    reasons.iter().map(|r| crate::audit::clipped(r, records::REFUSED_TEXT_CLIP)).collect();
                let kind = records::RefusalKind {
                    requester: agent.uri.clone(),
                    reason: clipped.first().cloned().unwrap_or_default(),
                };
                let logged = self.refusals.admit(requester_group(&agent.uri), kind, now_ns() as u64);
                if logged {
                    let certify = json!(CertifyRecord::of(&id, &agent.uri, &entry.draft, true));
                    let decision = decision_record(&id, "refused", &loaded, &[], &clipped, None);
                    if let Err(e) =
                        self.write(vec![(records::CERTIFY_KIND, certify), (records::DECISION_KIND, decision)]).await
                    {
                        return ledger_error(e);
                    }
                }
                entry.reasons = clipped;
                entry.forget_payload();
                self.requests.lock().await.insert(entry);
                let mut reply = json!({"status": "refused", "request_id": id, "reasons": reasons});
                if !logged {
                    reply["logged"] = json!(format!(
                        "counted in a {} record, not logged one by one: this requester's refusals are past their \
                         per-second budget",
                        records::REFUSALS_SUPPRESSED_KIND
                    ));
                }
                Reply::ok(403, reply)
            }
            Verdict::Permit { policies, grant } if grant.approvals > 0 => {
                let mut requests = self.requests.lock().await;
                // Requests past their deadline hold no room (nothing else expires them).
                if let Err(e) = self.expire_overdue(&mut requests).await {
                    return ledger_error(e);
                }
                if !requests.has_room_for_pending(&agent.uri, self.config.max_pending_per_requester, entry.bytes) {
                    return Reply::error(
                        503,
                        "too_many_pending",
                        format!(
                            "too many requests, or too many bytes of them (of all, or of this requester; {} MiB in \
                             all), await approval; try again later",
                            super::requests::MAX_PENDING_BYTES >> 20
                        ),
                    );
                }
                let decision = decision_record(&id, "pending", &loaded, &policies, &[], Some(&grant));
                entry.status = Status::Pending;
                entry.approvals_required = grant.approvals;
                entry.approvers = grant.approvers.clone();
                let waiting = json!(PendingRecord {
                    request_id: id.clone(),
                    requester: entry.requester.clone(),
                    request: entry.draft.request.clone(),
                    precondition: entry.draft.precondition.clone(),
                    live_state: entry.draft.live_state.clone(),
                    intent: entry.draft.intent.clone(),
                    expires_at: pending::format_deadline(entry.expires),
                    approvals_required: entry.approvals_required,
                    approvers: entry.approvers.clone(),
                });
                let records = vec![
                    (records::CERTIFY_KIND, json!(CertifyRecord::of(&id, &agent.uri, &entry.draft, false))),
                    (records::DECISION_KIND, decision),
                    (records::PENDING_KIND, waiting),
                ];
                if let Err(e) = self.write(records).await {
                    return ledger_error(e);
                }
                requests.insert(entry);
                Reply::ok(
                    202,
                    json!({"status": "pending", "request_id": id, "approvals_required": grant.approvals, "approvers": grant.approvers}),
                )
            }
            Verdict::Permit { policies, grant } => {
                let decision = decision_record(&id, "issued", &loaded, &policies, &[], Some(&grant));
                let (issued, issuance) = match self.issue(&entry, &loaded, &policies, &grant).await {
                    Ok(issued) => issued,
                    Err(reply) => return reply,
                };
                let records = vec![
                    (records::CERTIFY_KIND, json!(CertifyRecord::of(&id, &agent.uri, &entry.draft, false))),
                    (records::DECISION_KIND, decision),
                    (records::ISSUANCE_KIND, issuance),
                ];
                if let Err(e) = self.write(records).await {
                    return ledger_error(e);
                }
                let reply = issued_reply(&id, &issued);
                entry.status = Status::Issued;
                entry.issued = Some(issued);
                entry.forget_payload();
                self.requests.lock().await.insert(entry);
                Reply::ok(200, reply)
            }
        }
    }

    /// A certificate for `entry` under `loaded`, and its issuance record.
    async fn issue(
        &self,
        entry: &Entry,
        loaded: &Loaded,
        policies: &[String],
        grant: &Grant,
    ) -> Result<(Issued, Value), Reply> {
        let revocation = self.epochs.revocation().await.map_err(|e| {
            Reply::error(503, "epochs_unavailable", format!("the revocation epoch could not be read: {e:#}"))
        })?;
        let agent = &entry.requester;
        let evidence = Evidence {
            v: evidence::VERSION,
            request_id: entry.id.clone(),
            requester: serde_json::to_value(agent).unwrap_or_default(),
            intent: entry.draft.intent.clone(),
            request: entry.draft.request.clone(),
            precondition: entry.draft.precondition.clone(),
            live_state: entry.draft.live_state.clone(),
            policy: PolicyDecision {
                epoch: loaded.epoch,
                policy_set_digest: loaded.book.digest.clone(),
                decision: "permit".into(),
                policies: policies.to_vec(),
                approvals_required: grant.approvals,
                approvers: grant.approvers.clone(),
            },
            approvals: entry.approvals.clone(),
        };
        let evidence_digest = evidence.digest();
        let mut contract = ExecutionContract {
            contract_id: entry.id.clone(),
            agent: AgentIdentity {
                cgroup: Some(agent.cgroup.clone()),
                node: Some(agent.node.clone()),
                pod_uid: agent.pod_uid.clone(),
                ..AgentIdentity::default()
            },
            provider: entry.draft.request.provider,
            operation: String::new(),
            target: String::new(),
            request_digest: String::new(),
            precondition: entry.draft.precondition.clone(),
            policy_epoch: loaded.epoch,
            revocation_epoch: revocation,
            evidence_digest: evidence_digest.clone(),
            identity: grant.identity.clone(),
        };
        contract.bind_request(&entry.draft.request);
        let ttl = grant.ttl.map_or(self.config.certificate_ttl(), |ttl| ttl.min(self.config.certificate_ttl()));
        let signed = self
            .issuer
            .sign(&contract, ttl)
            .map_err(|e| Reply::error(500, "internal", format!("signing the certificate: {e:#}")))?;
        let not_after = rfc3339(signed.not_after);
        let record = json!(IssuanceRecord {
            request_id: &entry.id,
            serial: &signed.serial,
            not_after: &not_after,
            contract: &contract,
            evidence_digest: &evidence_digest,
            evidence: &evidence,
        });
        let issued = Issued { certificate: signed.pem, contract, evidence_digest, serial: signed.serial, not_after };
        Ok((issued, record))
    }

    /// `GET /v1/requests/{id}`: for the requester and the approvers only.
    pub async fn get(&self, caller: &Caller, id: &str) -> Reply {
        let mut requests = self.requests.lock().await;
        if let Err(e) = self.expire_overdue(&mut requests).await {
            return ledger_error(e);
        }
        match requests.get(id) {
            Some(entry) if entry.visible_to(caller.uri()) => Reply::ok(200, entry.view(true)),
            _ => not_found(id),
        }
    }

    /// `GET /v1/requests[?status=..]`: those the caller may see, without certificates.
    /// `GET /v1/requests[?status=..][&offset=N]`: oldest first, [`MAX_LISTED`] at a time.
    pub async fn list(&self, caller: &Caller, status: Option<&str>, offset: usize) -> Reply {
        let wanted = match status {
            None => None,
            Some(text) => match serde_json::from_value::<Status>(json!(text)) {
                Ok(status) => Some(status),
                Err(_) => {
                    return Reply::error(
                        400,
                        "malformed",
                        format!("status `{text}` is not pending, issued, refused, denied or expired"),
                    );
                }
            },
        };
        let mut requests = self.requests.lock().await;
        if let Err(e) = self.expire_overdue(&mut requests).await {
            return ledger_error(e);
        }
        // Bounded: each view carries its request (up to a body's size).
        let visible: Vec<&Entry> =
            requests.iter().filter(|e| e.visible_to(caller.uri()) && wanted.is_none_or(|s| e.status == s)).collect();
        let views: Vec<Value> = visible.iter().skip(offset).take(MAX_LISTED).map(|e| e.view(false)).collect();
        let more = visible.len().saturating_sub(offset.saturating_add(MAX_LISTED));
        Reply::ok(200, json!({"requests": views, "more": more}))
    }

    /// `POST /v1/requests/{id}/approve|deny`.
    pub async fn decide(&self, caller: &Caller, id: &str, verdict: Answer, reason: Option<String>) -> Reply {
        let mut requests = self.requests.lock().await;
        if let Err(e) = self.expire_overdue(&mut requests).await {
            return ledger_error(e);
        }
        let Some(entry) = requests.get(id) else { return not_found(id) };
        let uri = caller.uri();
        // What the policies in force now ask of a request still pending.
        let now = (entry.status == Status::Pending).then(|| self.current_grant(entry)).flatten();
        let refusal = if entry.requester.uri == uri {
            Some(Reply::error(403, "self_approval", "the requester cannot approve or deny their own request"))
        } else if !entry.approvers.iter().any(|a| a == uri) {
            Some(Reply::error(403, "not_an_approver", format!("{uri} is not among this request's approvers")))
        } else if entry.status == Status::Expired {
            Some(Reply::error(409, "expired", format!("the request expired at {}", rfc3339(entry.expires))))
        } else if entry.status != Status::Pending {
            Some(Reply::error(409, "already_decided", format!("the request is already {:?}", entry.status)))
        } else if verdict == Answer::Approve && entry.approvals.iter().any(|a| a.approver == uri) {
            Some(Reply::error(409, "already_approved", format!("{uri} has already approved this request")))
        } else if !approver_now(now.as_ref(), verdict, uri) {
            Some(Reply::error(
                403,
                "not_an_approver",
                format!("{uri} is no longer among this request's approvers under the policies in force"),
            ))
        } else {
            None
        };
        let at = rfc3339(SystemTime::now());
        let mut record = ApprovalRecord {
            request_id: id,
            approver: uri,
            verdict: verdict.as_str(),
            accepted: refusal.is_none(),
            refused: None,
            reason: reason.as_deref(),
            at: (refusal.is_none() && verdict == Answer::Approve).then_some(at.as_str()),
        };
        if let Some(refusal) = refusal {
            // Anyone named in no request can be refused as fast as it can ask: within the
            // caller's share of the second the refusal is logged (its reason left out),
            // past it counted; and never while every other call waits for the lock.
            drop(requests);
            let code = refusal.body["error"]["code"].as_str().unwrap_or_default().to_string();
            let kind = records::RefusalKind { requester: uri.to_string(), reason: code };
            if !self.refusals.admit(requester_group(uri), kind, now_ns() as u64) {
                return refusal;
            }
            record.refused = refusal.body["error"]["code"].as_str();
            record.reason = None;
            let record = json!(record);
            return match self.write(vec![(records::APPROVAL_KIND, record)]).await {
                Ok(()) => refusal,
                Err(e) => ledger_error(e),
            };
        }
        let record = json!(record);
        let mut entry = entry.clone();
        let mut writes = vec![(records::APPROVAL_KIND, record)];
        match verdict {
            Answer::Deny => {
                entry.status = Status::Denied;
                entry.reasons = vec![match &reason {
                    Some(reason) => format!("denied_by: {uri}: {reason}"),
                    None => format!("denied_by: {uri}"),
                }];
            }
            Answer::Approve => {
                entry.approvals.push(Approval { approver: uri.into(), at, reason });
                // Enough under the policies it began waiting under, or under those in force.
                let required = now.as_ref().map_or(entry.approvals_required, |g| g.approvals);
                if entry.approvals.len() as u32 >= entry.approvals_required.min(required)
                    && let Err(reply) = self.conclude(&mut entry, &mut writes).await
                {
                    return reply;
                }
            }
        }
        if let Err(e) = self.write(writes).await {
            return ledger_error(e);
        }
        if entry.status != Status::Pending {
            entry.forget_payload();
        }
        let view = entry.view(true);
        if let Some(slot) = requests.get_mut(id) {
            *slot = entry;
        }
        Reply::ok(200, view)
    }

    /// The grant the policies in force now give `entry` (none: they refuse it).
    fn current_grant(&self, entry: &Entry) -> Option<Grant> {
        match self.loaded().book.evaluate(&entry.requester, &facts(&entry.draft, SystemTime::now())) {
            Verdict::Permit { grant, .. } => Some(grant),
            Verdict::Refuse { .. } => None,
        }
    }

    /// Enough approvals: evaluate again under the policies in force now (they may have
    /// changed while the request waited), then issue, wait for more, or refuse.
    async fn conclude(&self, entry: &mut Entry, writes: &mut Vec<(&'static str, Value)>) -> Result<(), Reply> {
        let loaded = self.loaded();
        match loaded.book.evaluate(&entry.requester, &facts(&entry.draft, SystemTime::now())) {
            Verdict::Refuse { reasons } => {
                writes.push((
                    records::DECISION_KIND,
                    decision_record(&entry.id, "refused", &loaded, &[], &reasons, None),
                ));
                entry.status = Status::Refused;
                entry.reasons = reasons;
            }
            Verdict::Permit { policies, grant } => {
                let counted = entry.approvals.iter().filter(|a| grant.approvers.contains(&a.approver)).count() as u32;
                entry.approvals_required = grant.approvals;
                entry.approvers = grant.approvers.clone();
                if counted < grant.approvals {
                    let decision = decision_record(&entry.id, "pending", &loaded, &policies, &[], Some(&grant));
                    writes.push((records::DECISION_KIND, decision));
                    return Ok(());
                }
                let decision = decision_record(&entry.id, "issued", &loaded, &policies, &[], Some(&grant));
                let (issued, issuance) = self.issue(entry, &loaded, &policies, &grant).await?;
                writes.push((records::DECISION_KIND, decision));
                writes.push((records::ISSUANCE_KIND, issuance));
                entry.status = Status::Issued;
                entry.issued = Some(issued);
            }
        }
        Ok(())
    }

    /// Mark pending requests past their deadline expired, recorded.
    async fn expire_overdue(&self, requests: &mut Requests) -> Result<()> {
        let overdue = requests.overdue(SystemTime::now());
        if overdue.is_empty() {
            return Ok(());
        }
        let writes = overdue
            .iter()
            .filter_map(|id| requests.get(id))
            .map(|entry| {
                let record = ExpiryRecord {
                    request_id: &entry.id,
                    approvals: entry.approvals.len(),
                    approvals_required: entry.approvals_required,
                };
                (records::EXPIRY_KIND, json!(record))
            })
            .collect();
        self.write(writes).await?;
        for id in overdue {
            if let Some(entry) = requests.get_mut(&id) {
                entry.status = Status::Expired;
                entry.reasons = vec!["expired: not enough approvals before the deadline".into()];
                entry.forget_payload();
            }
        }
        Ok(())
    }

    /// Append records, in order, in one commit (shared with concurrent writes: the
    /// ledger's group commit), keeping the requests awaiting approvals current with them.
    async fn write(&self, writes: Vec<(&'static str, Value)>) -> Result<()> {
        self.ledger
            .try_run(move |batch| {
                let time_ns = now_ns();
                for (kind, body) in &writes {
                    let record = batch.append_record(kind, time_ns, body)?;
                    (pending::DERIVED.apply)(batch.conn(), &record)?;
                }
                Ok(())
            })
            .await
    }
}

async fn write_policy_record(ledger: &Ledger, book: &PolicyBook, epoch: u64) -> Result<()> {
    let record = PolicyRecord {
        epoch,
        policy_set_digest: book.digest.clone(),
        files: book.files.clone(),
        policies: book.policies,
    };
    ledger.run(move |batch| batch.append(records::POLICY_KIND, now_ns(), &record).map(|_| ())).await
}

fn not_found(id: &str) -> Reply {
    Reply::error(404, "not_found", format!("no request {id} that this caller may see"))
}

fn issued_reply(id: &str, issued: &Issued) -> Value {
    json!({
        "status": "issued",
        "request_id": id,
        "certificate": issued.certificate,
        "contract": issued.contract,
        "evidence_digest": issued.evidence_digest,
        "not_after": issued.not_after,
    })
}

fn decision_record(
    id: &str,
    decision: &str,
    loaded: &Loaded,
    policies: &[String],
    reasons: &[String],
    grant: Option<&Grant>,
) -> Value {
    json!(DecisionRecord {
        request_id: id,
        decision,
        policy_epoch: loaded.epoch,
        policy_set_digest: &loaded.book.digest,
        policies,
        reasons,
        approvals_required: grant.map_or(0, |g| g.approvals),
        approvers: grant.map_or(&[], |g| &g.approvers),
    })
}

fn facts(draft: &Draft, now: SystemTime) -> Facts<'_> {
    Facts {
        request: &draft.request,
        precondition: &draft.precondition,
        intent: &draft.intent,
        live_state_digest: draft.live_state_digest.as_deref(),
        now,
    }
}

/// A requester's group in the refusal budget: the first 8 bytes of its URI's SHA-256.
fn requester_group(uri: &str) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(uri.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

impl Sab {
    /// Record each second's summary of the refusals not logged one by one, until `stop`.
    pub async fn record_suppressed_refusals_each_second(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        self.refusals.record_summaries_each_second(&self.ledger, records::REFUSALS_SUPPRESSED_KIND, &stop).await
    }

    /// Log the seconds closed (and with `all`, the current one: at shutdown).
    pub async fn record_suppressed_refusals(&self, all: bool) {
        self.refusals.record_summaries(&self.ledger, records::REFUSALS_SUPPRESSED_KIND, all).await
    }
}

/// Requests one list answer carries at most (`more` counts those after them).
pub const MAX_LISTED: usize = 100;

/// JSON values a certify body may hold: parsed, each takes a hundred bytes or more, so a
/// 1 MiB body of `[0,0,...]` would take tens of MiB.
pub const MAX_CERTIFY_VALUES: usize = 65_536;

/// The certify body, checked: numbers exact, digests well-formed, intent bounded.
fn parse_draft(body: &[u8]) -> Result<Draft> {
    let body: CertifyBody = serde_json::from_slice(body).context("the body is not a certify request")?;
    body.request.check_numbers()?;
    let hex = body.precondition.strip_prefix("sha256:").unwrap_or("");
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        anyhow::bail!("precondition `{}` is not sha256:<64 lower-case hex digits>", body.precondition);
    }
    if body.intent.len() > MAX_INTENT {
        anyhow::bail!("intent is {} bytes; at most {MAX_INTENT}", body.intent.len());
    }
    // Stored with every refusal, echoed in its reasons and keyed on in the refusal
    // budget: bounded like the intent.
    let (operation, target) = (&body.request.operation, &body.request.target);
    if operation.len() > MAX_OPERATION || target.len() > MAX_TARGET {
        anyhow::bail!(
            "the operation is {} bytes and the target {}; at most {MAX_OPERATION} and {MAX_TARGET}",
            operation.len(),
            target.len()
        );
    }
    if let Some(state) = &body.live_state {
        ijson::check(state, Numbers::Any, "live_state")?;
        // The broker's read names its digest: one for another state is not this draft's
        // evidence. (The rest of the read is the agent's word: the SAB cannot read it again.)
        if let Some(digest) = state.get("state_digest")
            && digest.as_str() != Some(body.precondition.as_str())
        {
            anyhow::bail!(
                "live_state.state_digest {digest} is not the precondition {}: the live state given is not the \
                 one certified",
                body.precondition
            );
        }
    }
    let live_state_digest = body.live_state.as_ref().map(digest_of);
    Ok(Draft {
        request: body.request,
        precondition: body.precondition,
        live_state: body.live_state,
        live_state_digest,
        intent: body.intent,
    })
}

/// Why a policy change did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The files do not validate: nothing to retry until they change.
    #[error("{0:#}")]
    Invalid(anyhow::Error),
    /// Valid, but its epoch could not be set or recorded: retried.
    #[error("{0:#}")]
    NotPublished(anyhow::Error),
}

/// Reload whenever the policy directory's files change (names, or contents: see
/// [`fingerprint`]).
pub async fn watch_policies(sab: Arc<Sab>) {
    let interval = std::time::Duration::from_millis(sab.config.reload_interval_ms);
    let mut seen = fingerprint(&sab.config.policies);
    loop {
        tokio::time::sleep(interval).await;
        let now = fingerprint(&sab.config.policies);
        if now == seen {
            continue;
        }
        match sab.reload().await {
            Ok(Some(epoch)) => info!(epoch, "policy change accepted"),
            Ok(None) => {}
            Err(ReloadError::Invalid(e)) => {
                error!(error = %format!("{e:#}"), "policy change refused; the policies in force stay");
            }
            Err(ReloadError::NotPublished(e)) => {
                error!(error = %format!("{e:#}"), "policy change not yet in force; retrying");
                continue;
            }
        }
        seen = now;
    }
}

/// What the policy files hold, by name: their contents' digests, read through symlinks.
/// A ConfigMap volume changes a file by swapping the `..data` link its entry points
/// through, which leaves the entry's own metadata as it was.
fn fingerprint(dir: &std::path::Path) -> Vec<(String, Option<[u8; 32]>)> {
    use sha2::Digest;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|ext| ext == "cedar"))
                .map(|e| {
                    let contents = std::fs::read(e.path()).ok();
                    (e.file_name().to_string_lossy().into_owned(), contents.map(|c| sha2::Sha256::digest(c).into()))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_target_or_operation_is_malformed() {
        let body = |operation: &str, target: &str| {
            serde_json::to_vec(&json!({
                "request": {"provider": "http", "operation": operation, "target": target, "params": {}},
                "precondition": format!("sha256:{}", "0".repeat(64)),
                "intent": "",
            }))
            .unwrap()
        };
        parse_draft(&body("PUT", "https://api/v1/x")).unwrap();
        let long = format!("https://api/{}", "x".repeat(MAX_TARGET));
        let refused = format!("{:#}", parse_draft(&body("PUT", &long)).unwrap_err());
        assert!(refused.contains("at most 128 and 4096"), "{refused}");
        assert!(parse_draft(&body(&"P".repeat(MAX_OPERATION + 1), "https://api/v1/x")).is_err());
    }

    #[test]
    fn a_live_state_naming_another_digest_than_the_precondition_is_malformed() {
        let precondition = format!("sha256:{}", "0".repeat(64));
        let body = |live_state: Value| {
            serde_json::to_vec(&json!({
                "request": {"provider": "http", "operation": "PUT", "target": "https://api/v1/x", "params": {}},
                "precondition": precondition, "intent": "", "live_state": live_state,
            }))
            .unwrap()
        };
        parse_draft(&body(json!({"status": 200, "state_digest": precondition}))).unwrap();
        parse_draft(&body(json!({"status": 404}))).unwrap();
        let other = format!("sha256:{}", "1".repeat(64));
        let refused = format!("{:#}", parse_draft(&body(json!({"status": 200, "state_digest": other}))).unwrap_err());
        assert!(refused.contains("is not the precondition"), "{refused}");
    }

    #[test]
    fn a_policy_changed_behind_a_configmap_link_changes_the_fingerprint() {
        // A ConfigMap volume: `a.cedar -> ..data/a.cedar`, `..data -> ..v1`; an update
        // writes `..v2` and swaps `..data`. Same length, same entry metadata.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (version, text) in
            [("..v1", "permit(principal, action, resource);"), ("..v2", "forbid(principal, action, resource);")]
        {
            std::fs::create_dir(root.join(version)).unwrap();
            std::fs::write(root.join(version).join("a.cedar"), text).unwrap();
        }
        std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/a.cedar", root.join("a.cedar")).unwrap();
        let before = fingerprint(root);
        std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        let after = fingerprint(root);
        assert_eq!(before.len(), 1);
        assert_ne!(before, after, "the swapped policy went unnoticed");
    }
}

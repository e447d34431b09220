//! Policy as code: Cedar policies from a directory, validated against the SAB's schema,
//! deny by default.
//!
//! A permit policy says, in annotations, what a permitted request gets:
//! - `@identity("<kind>:<value>")` (required): the scoped identity the broker mints:
//!   `aws_role:<role ARN>`, `kubernetes_service_account:<namespace>/<name>`, or
//!   `x509_client:<subject>`. It comes from policy, never from the agent.
//! - `@approvals("N")` and `@approvers("<uri>, <uri>, ...")`: N distinct approvers among
//!   those named must approve before a certificate is issued (N-of-M).
//! - `@ttl("<seconds>")`: a shorter validity than the SAB's default.
//! - `@id("<name>")`: the policy's name in reasons and records (else `<file>:<line>`).
//!
//! When several permits apply they must agree on the identity; the request then needs
//! the largest number of approvals any of them asks, from any approver they name, and
//! gets the shortest validity.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    time::Duration,
};

use anyhow::{Result, bail};
use cedar_policy::{
    ActionConstraint, Authorizer, Decision, Effect, Entities, EntityUid, Policy, PolicyId, PolicySet, Request, Schema,
    ValidationMode, Validator,
};
use sha2::{Digest, Sha256};

use super::{
    identity::{Agent, Caller},
    schema::{self, Facts},
};
use crate::cert::contract::ScopedIdentity;

/// Bounds on what a policy directory may hold.
const MAX_FILES: usize = 10_000;
const MAX_TOTAL_BYTES: u64 = 32 << 20;
const MAX_APPROVALS: u32 = 16;
const ANNOTATIONS: [&str; 6] = ["id", "identity", "approvals", "approvers", "ttl", "description"];

/// What a permit policy grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub identity: ScopedIdentity,
    pub approvals: u32,
    pub approvers: Vec<String>,
    pub ttl: Option<Duration>,
}

/// A loaded, validated policy set, indexed by action.
pub struct PolicyBook {
    /// `sha256:` over the files' names and contents: which policies these are.
    pub digest: String,
    pub files: Vec<String>,
    pub policies: usize,
    schema: Schema,
    actions: Entities,
    /// Per action, the policies whose action scope can match it: evaluation looks at
    /// those alone, so its cost does not grow with policies for other actions.
    by_action: HashMap<EntityUid, PolicySet>,
    grants: HashMap<PolicyId, Grant>,
}

/// The policies' answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Permit { policies: Vec<String>, grant: Grant },
    Refuse { reasons: Vec<String> },
}

impl PolicyBook {
    /// Every `*.cedar` file in `dir`, in name order.
    pub fn load_dir(dir: &Path, max_ttl: Duration) -> Result<Self> {
        let mut sources = Vec::new();
        let mut total = 0;
        let entries = std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_none_or(|ext| ext != "cedar") {
                continue;
            }
            if sources.len() == MAX_FILES {
                bail!("{} holds more than {MAX_FILES} policy files", dir.display());
            }
            total += std::fs::metadata(&path)?.len();
            if total > MAX_TOTAL_BYTES {
                bail!("the policy files in {} exceed {} MiB", dir.display(), MAX_TOTAL_BYTES >> 20);
            }
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let text =
                std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            sources.push((name, text));
        }
        sources.sort();
        Self::from_sources(&sources, max_ttl)
    }

    /// Parse, annotate and validate `(file name, text)` pairs; every problem is reported
    /// as `<file>:<line>: policy <name>: <problem>`.
    pub fn from_sources(sources: &[(String, String)], max_ttl: Duration) -> Result<Self> {
        let schema = schema::load();
        let mut problems = Vec::new();
        let mut policies = Vec::new();
        // Where each policy came from: its file's index and its first line.
        let mut origin: HashMap<PolicyId, (usize, usize)> = HashMap::new();
        let mut grants = HashMap::new();
        let mut hasher = Sha256::new();
        for (index, (file, text)) in sources.iter().enumerate() {
            hasher.update((file.len() as u64).to_be_bytes());
            hasher.update(file.as_bytes());
            hasher.update((text.len() as u64).to_be_bytes());
            hasher.update(text.as_bytes());
            let set = match text.parse::<PolicySet>() {
                Ok(set) => set,
                Err(errors) => {
                    for error in errors.iter() {
                        let line = first_label_line(error, text).unwrap_or(1);
                        problems.push(format!("{file}:{line}: {error}"));
                    }
                    continue;
                }
            };
            if set.templates().next().is_some() {
                problems.push(format!("{file}: policy templates are not supported"));
            }
            let mut cursor = 0;
            for policy in set.policies() {
                let source = policy.to_string();
                let start = text[cursor..].find(&source).map_or(cursor, |at| cursor + at);
                cursor = start + source.len().min(text.len() - start);
                let line = line_of(text, start);
                let name = policy.annotation("id").map_or_else(|| format!("{file}:{line}"), str::to_string);
                let id = PolicyId::new(&name);
                if origin.insert(id.clone(), (index, line)).is_some() {
                    problems.push(format!("{file}:{line}: policy {name}: another policy has the same @id"));
                    continue;
                }
                match grant_of(policy, max_ttl) {
                    Ok(Some(grant)) => {
                        grants.insert(id.clone(), grant);
                    }
                    Ok(None) => {}
                    Err(e) => problems.push(format!("{file}:{line}: policy {name}: {e}")),
                }
                policies.push(policy.new_id(id));
            }
        }
        let set = match PolicySet::from_policies(policies) {
            Ok(set) => set,
            Err(e) => bail!("{e}"),
        };
        let validation = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        for error in validation.validation_errors() {
            let (file, policy_line) = origin.get(error.policy_id()).copied().unwrap_or((0, 0));
            let (name, text) = sources.get(file).map_or(("?", ""), |(n, t)| (n.as_str(), t.as_str()));
            let line = first_label_line(error, text).unwrap_or(policy_line);
            problems.push(format!("{name}:{line}: policy {}: {error}", error.policy_id()));
        }
        if !problems.is_empty() {
            bail!("the policies are not valid:\n{}", problems.join("\n"));
        }
        let actions = schema.action_entities().map_err(|e| anyhow::anyhow!("the schema's actions: {e}"))?;
        let by_action = index(&set, &schema, &actions)?;
        Ok(Self {
            digest: format!("sha256:{}", hex::encode(hasher.finalize())),
            files: sources.iter().map(|(name, _)| name.clone()).collect(),
            policies: set.policies().count(),
            schema,
            actions,
            by_action,
            grants,
        })
    }

    /// Evaluate a certify request from `agent`. Deny by default; a forbid wins; a policy
    /// that fails to evaluate refuses the request (Cedar would skip it: that could skip a forbid).
    pub fn evaluate(&self, agent: &Agent, facts: &Facts<'_>) -> Verdict {
        let refuse = |reason: String| Verdict::Refuse { reasons: vec![reason] };
        let action = schema::action(facts.request);
        let Some(policies) = self.by_action.get(&action) else {
            return refuse(format!(
                "unknown_action: {} is not an action of the schema (provider::operation)",
                action.id().unescaped()
            ));
        };
        let (resource, resource_entity) = match schema::resource(facts.request) {
            Ok(resource) => resource,
            Err(e) => return refuse(format!("malformed_target: {e:#}")),
        };
        let (principal, mut entities) = schema::principal(agent);
        entities.push(resource_entity);
        let context = match schema::context(facts) {
            Ok(context) => context,
            Err(e) => return refuse(format!("internal: {e:#}")),
        };
        let request = match Request::new(principal, action, resource, context, Some(&self.schema)) {
            Ok(request) => request,
            Err(e) => return refuse(format!("invalid_request: {e}")),
        };
        let entities = match self.actions.clone().add_entities(entities, None) {
            Ok(entities) => entities,
            Err(e) => return refuse(format!("internal: {e}")),
        };
        let response = Authorizer::new().is_authorized(&request, policies, &entities);
        let errors: Vec<String> = response.diagnostics().errors().map(ToString::to_string).collect();
        if !errors.is_empty() {
            return Verdict::Refuse { reasons: errors.into_iter().map(|e| format!("policy_error: {e}")).collect() };
        }
        let determining: Vec<PolicyId> = response.diagnostics().reason().cloned().collect();
        if response.decision() == Decision::Deny {
            if determining.is_empty() {
                return refuse("no_permit: no policy permits this request (deny by default)".into());
            }
            return Verdict::Refuse { reasons: determining.iter().map(|id| format!("forbidden_by: {id}")).collect() };
        }
        match self.combine(&determining) {
            Ok(grant) => Verdict::Permit { policies: determining.iter().map(ToString::to_string).collect(), grant },
            Err(e) => refuse(format!("ambiguous_grant: {e}")),
        }
    }

    fn combine(&self, permits: &[PolicyId]) -> Result<Grant> {
        let mut grants = permits.iter().filter_map(|id| self.grants.get(id).map(|grant| (id, grant)));
        let Some((first_id, first)) = grants.next() else { bail!("no permit policy carries a grant") };
        let mut combined = first.clone();
        let mut approvers: BTreeSet<String> = first.approvers.iter().cloned().collect();
        for (id, grant) in grants {
            if grant.identity != combined.identity {
                bail!("permits {first_id} and {id} name different identities to mint");
            }
            combined.approvals = combined.approvals.max(grant.approvals);
            approvers.extend(grant.approvers.iter().cloned());
            combined.ttl = match (combined.ttl, grant.ttl) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        combined.approvers = approvers.into_iter().collect();
        Ok(combined)
    }
}

/// For each action of the schema, the policies that can apply to it.
fn index(set: &PolicySet, schema: &Schema, actions: &Entities) -> Result<HashMap<EntityUid, PolicySet>> {
    let mut by_action = HashMap::new();
    for action in schema.actions() {
        let is_in = |group: &EntityUid| {
            group == action || actions.ancestors(action).is_some_and(|mut ancestors| ancestors.any(|a| a == group))
        };
        let applies = set.policies().filter(|policy| match policy.action_constraint() {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(uid) => &uid == action,
            ActionConstraint::In(groups) => groups.iter().any(is_in),
        });
        let subset = PolicySet::from_policies(applies.cloned()).map_err(|e| anyhow::anyhow!("{e}"))?;
        by_action.insert(action.clone(), subset);
    }
    Ok(by_action)
}

/// A permit's grant from its annotations; a forbid carries none.
fn grant_of(policy: &Policy, max_ttl: Duration) -> Result<Option<Grant>> {
    if let Some((key, _)) = policy.annotations().find(|(key, _)| !ANNOTATIONS.contains(key)) {
        bail!("unknown annotation @{key} (known: @{})", ANNOTATIONS.join(", @"));
    }
    if policy.effect() == Effect::Forbid {
        if let Some(key) =
            ["identity", "approvals", "approvers", "ttl"].into_iter().find(|k| policy.annotation(k).is_some())
        {
            bail!("@{key} belongs on permit policies; a forbid grants nothing");
        }
        return Ok(None);
    }
    let identity = match policy.annotation("identity") {
        Some(text) => parse_identity(text)?,
        None => bail!("a permit policy must name the identity to mint with @identity(\"<kind>:<value>\")"),
    };
    let approvals = match policy.annotation("approvals") {
        Some(text) => text
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_APPROVALS)
            .ok_or_else(|| anyhow::anyhow!("@approvals(\"{text}\") is not a number from 0 to {MAX_APPROVALS}"))?,
        None => 0,
    };
    let approvers: Vec<String> = policy
        .annotation("approvers")
        .map(|text| text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    for approver in &approvers {
        Caller::parse(approver).map_err(|e| anyhow::anyhow!("@approvers: {e}"))?;
    }
    if (approvers.len() as u32) < approvals {
        bail!("@approvals(\"{approvals}\") needs at least {approvals} approvers, @approvers names {}", approvers.len());
    }
    if approvals == 0 && !approvers.is_empty() {
        bail!("@approvers is given but @approvals is 0 or missing");
    }
    let ttl = match policy.annotation("ttl") {
        Some(text) => Some(
            text.trim()
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs)
                .filter(|ttl| !ttl.is_zero() && *ttl <= max_ttl)
                .ok_or_else(|| {
                    anyhow::anyhow!("@ttl(\"{text}\") is not a number of seconds from 1 to {}", max_ttl.as_secs())
                })?,
        ),
        None => None,
    };
    Ok(Some(Grant { identity, approvals, approvers, ttl }))
}

fn parse_identity(text: &str) -> Result<ScopedIdentity> {
    let Some((kind, value)) = text.split_once(':') else {
        bail!("@identity(\"{text}\") is not <kind>:<value>");
    };
    let value = value.trim();
    if value.is_empty() {
        bail!("@identity(\"{text}\") has an empty value");
    }
    Ok(match kind.trim() {
        "aws_role" if value.starts_with("arn:") && value.contains(":role/") => {
            ScopedIdentity::AwsRole { role_arn: value.into() }
        }
        "aws_role" => bail!("@identity: `{value}` is not an IAM role ARN"),
        "kubernetes_service_account" => match value.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
                ScopedIdentity::KubernetesServiceAccount { namespace: namespace.into(), name: name.into() }
            }
            _ => bail!("@identity: a ServiceAccount is <namespace>/<name>, not `{value}`"),
        },
        "x509_client" => ScopedIdentity::X509Client { subject: value.into() },
        other => bail!("@identity kind `{other}` is not aws_role, kubernetes_service_account or x509_client"),
    })
}

/// The 1-based line of a diagnostic's first labelled span in `text`.
fn first_label_line(diagnostic: &dyn miette::Diagnostic, text: &str) -> Option<usize> {
    let span = diagnostic.labels()?.next()?;
    (span.offset() <= text.len()).then(|| line_of(text, span.offset()))
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::cert::MutationRequest;

    const TTL: Duration = Duration::from_secs(600);

    fn book(files: &[(&str, &str)]) -> Result<PolicyBook> {
        let sources: Vec<(String, String)> = files.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect();
        PolicyBook::from_sources(&sources, TTL)
    }

    fn agent() -> Agent {
        let Caller::Agent(agent) = Caller::parse("seb://node/n1/cgroup/agents/a1").unwrap() else { unreachable!() };
        agent
    }

    fn put(target: &str) -> MutationRequest {
        serde_json::from_value(serde_json::json!({"provider": "http", "operation": "PUT", "target": target, "params": {"body": {"replicas": 3}}}))
            .unwrap()
    }

    fn evaluate(book: &PolicyBook, request: &MutationRequest) -> Verdict {
        let facts = Facts {
            request,
            precondition: "sha256:00",
            intent: "test",
            live_state_digest: None,
            now: SystemTime::now(),
        };
        book.evaluate(&agent(), &facts)
    }

    const PERMIT: &str = r#"
@id("config-writes")
@identity("x509_client:seb-executor@config")
permit (principal in Seb::Node::"n1", action == Seb::Action::"http::PUT", resource)
when { resource.host == "127.0.0.3" && resource.path like "/v1/*" };
"#;

    #[test]
    fn a_permit_grants_its_identity_and_anything_else_is_refused() {
        let book = book(&[("a.cedar", PERMIT)]).unwrap();
        let Verdict::Permit { policies, grant } = evaluate(&book, &put("https://127.0.0.3:9443/v1/config")) else {
            panic!("permitted");
        };
        assert_eq!(policies, vec!["config-writes"]);
        assert_eq!(grant.identity, ScopedIdentity::X509Client { subject: "seb-executor@config".into() });
        let Verdict::Refuse { reasons } = evaluate(&book, &put("https://127.0.0.3:9443/admin")) else { panic!() };
        assert!(reasons[0].starts_with("no_permit"), "{reasons:?}");
    }

    #[test]
    fn a_forbid_wins_and_is_named() {
        let forbid = "@id(\"no-admin\")\nforbid (principal, action, resource is Seb::HttpsEndpoint) when { resource.path like \"/v1/secrets*\" };";
        let book = book(&[("a.cedar", PERMIT), ("b.cedar", forbid)]).unwrap();
        let Verdict::Refuse { reasons } = evaluate(&book, &put("https://127.0.0.3:9443/v1/secrets")) else { panic!() };
        assert_eq!(reasons, vec!["forbidden_by: no-admin"]);
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_policy() {
        let typo = "@identity(\"x509_client:s\")\npermit (principal, action == Seb::Action::\"http::PUT\", resource)\nwhen { resource.hots == \"x\" };";
        let error = book(&[("a.cedar", PERMIT), ("b.cedar", typo)]).err().unwrap().to_string();
        assert!(error.contains("b.cedar:3: policy b.cedar:1"), "{error}");
        let syntax = "\n\npermit (principal, action, resource) when { ;";
        let error = book(&[("c.cedar", syntax)]).err().unwrap().to_string();
        assert!(error.contains("c.cedar:3:"), "{error}");
        let no_identity = "permit (principal, action, resource);";
        let error = book(&[("d.cedar", no_identity)]).err().unwrap().to_string();
        assert!(error.contains("d.cedar:1: policy d.cedar:1: a permit policy must name the identity"), "{error}");
        let approvals = "@identity(\"x509_client:s\") @approvals(\"2\") @approvers(\"seb://approver/a\")\npermit (principal, action, resource);";
        let error = book(&[("e.cedar", approvals)]).err().unwrap().to_string();
        assert!(error.contains("needs at least 2 approvers"), "{error}");
        let unknown = "@identity(\"x509_client:s\") @aprovals(\"2\")\npermit (principal, action, resource);";
        assert!(book(&[("f.cedar", unknown)]).err().unwrap().to_string().contains("unknown annotation @aprovals"));
    }

    #[test]
    fn the_strictest_of_the_permits_that_apply_is_kept() {
        let strict = "@id(\"two\") @identity(\"x509_client:seb-executor@config\") @approvals(\"2\") \
                      @approvers(\"seb://approver/a, seb://approver/b, seb://approver/c\") @ttl(\"30\")\n\
                      permit (principal, action == Seb::Action::\"http::PUT\", resource);";
        let book = book(&[("a.cedar", PERMIT), ("b.cedar", strict)]).unwrap();
        let Verdict::Permit { grant, .. } = evaluate(&book, &put("https://127.0.0.3:9443/v1/config")) else { panic!() };
        assert_eq!((grant.approvals, grant.approvers.len(), grant.ttl), (2, 3, Some(Duration::from_secs(30))));
    }
}

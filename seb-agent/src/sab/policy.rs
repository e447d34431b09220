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
//!
//! Evaluation looks only at the policies that can apply: those whose action scope can
//! match the request's action and, among them, those whose resource scope is
//! `resource == <the request's resource>` or does not name one resource (`resource`,
//! `resource in`, `resource is`). Cedar's decision is a function of each policy's own
//! result, so the answer is the one the whole set gives; its cost does not grow with
//! policies about other actions or other resources.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    time::Duration,
};

use anyhow::{Result, bail};
use cedar_policy::{
    ActionConstraint, Authorizer, Decision, Effect, Entities, EntityUid, Policy, PolicyId, PolicySet, Request,
    ResourceConstraint, Schema, ValidationMode, Validator,
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

/// A loaded, validated policy set, indexed by action and resource.
pub struct PolicyBook {
    /// `sha256:` over the files' names and contents: which policies these are.
    pub digest: String,
    pub files: Vec<String>,
    pub policies: usize,
    schema: Schema,
    actions: Entities,
    /// Per action, the policies whose action scope can match it, by resource scope.
    by_action: HashMap<EntityUid, Scoped>,
    grants: HashMap<PolicyId, Grant>,
    /// Every policy, unindexed: what the index must agree with.
    #[cfg(test)]
    all: PolicySet,
}

/// The policies of one action, split by their resource scope.
struct Scoped {
    /// `resource`, `resource in ..`, `resource is ..`: evaluated for every request.
    any_resource: Option<PolicySet>,
    /// `resource == X`: evaluated only for requests on X.
    by_resource: HashMap<EntityUid, PolicySet>,
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
            #[cfg(test)]
            all: set,
        })
    }

    /// Evaluate a certify request from `agent`. Deny by default; a forbid wins; a policy
    /// that fails to evaluate refuses the request (Cedar would skip it: that could skip a forbid).
    pub fn evaluate(&self, agent: &Agent, facts: &Facts<'_>) -> Verdict {
        let action = schema::action(facts.request);
        let Some(scoped) = self.by_action.get(&action) else {
            return refuse(format!(
                "unknown_action: {} is not an action of the schema (provider::operation)",
                action.id().unescaped()
            ));
        };
        let (request, entities) = match self.request(agent, facts, action) {
            Ok(prepared) => prepared,
            Err(verdict) => return verdict,
        };
        let sets = scoped.any_resource.iter().chain(request.resource().and_then(|r| scoped.by_resource.get(r)));
        self.decide(&request, &entities, sets)
    }

    /// The same over every policy, without the index.
    #[cfg(test)]
    fn evaluate_unindexed(&self, agent: &Agent, facts: &Facts<'_>) -> Verdict {
        let action = schema::action(facts.request);
        if !self.by_action.contains_key(&action) {
            return refuse("unknown_action".into());
        }
        match self.request(agent, facts, action) {
            Ok((request, entities)) => self.decide(&request, &entities, std::iter::once(&self.all)),
            Err(verdict) => verdict,
        }
    }

    /// The Cedar request and the entities it is evaluated with.
    fn request(&self, agent: &Agent, facts: &Facts<'_>, action: EntityUid) -> Result<(Request, Entities), Verdict> {
        let (resource, resource_entity) =
            schema::resource(facts.request).map_err(|e| refuse(format!("malformed_target: {e:#}")))?;
        let (principal, mut entities) = schema::principal(agent);
        entities.push(resource_entity);
        let context = schema::context(facts).map_err(|e| refuse(format!("internal: {e:#}")))?;
        let request = Request::new(principal, action, resource, context, Some(&self.schema))
            .map_err(|e| refuse(format!("invalid_request: {e}")))?;
        let entities =
            self.actions.clone().add_entities(entities, None).map_err(|e| refuse(format!("internal: {e}")))?;
        Ok((request, entities))
    }

    /// Cedar's decision over the union of `sets` (disjoint): any error refuses; any
    /// satisfied forbid refuses, naming every one; else the satisfied permits grant.
    fn decide<'a>(&self, request: &Request, entities: &Entities, sets: impl Iterator<Item = &'a PolicySet>) -> Verdict {
        let authorizer = Authorizer::new();
        let (mut errors, mut forbids, mut permits) = (Vec::new(), BTreeSet::new(), BTreeSet::new());
        for set in sets {
            let response = authorizer.is_authorized(request, set, entities);
            errors.extend(response.diagnostics().errors().map(|e| format!("policy_error: {e}")));
            let determining = response.diagnostics().reason().cloned();
            match response.decision() {
                Decision::Deny => forbids.extend(determining),
                Decision::Allow => permits.extend(determining),
            }
        }
        if !errors.is_empty() {
            errors.sort();
            return Verdict::Refuse { reasons: errors };
        }
        if !forbids.is_empty() {
            return Verdict::Refuse { reasons: forbids.iter().map(|id| format!("forbidden_by: {id}")).collect() };
        }
        if permits.is_empty() {
            return refuse("no_permit: no policy permits this request (deny by default)".into());
        }
        let permits: Vec<PolicyId> = permits.into_iter().collect();
        match self.combine(&permits) {
            Ok(grant) => Verdict::Permit { policies: permits.iter().map(ToString::to_string).collect(), grant },
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

fn refuse(reason: String) -> Verdict {
    Verdict::Refuse { reasons: vec![reason] }
}

/// For each action of the schema, the policies that can apply to it, by resource scope.
fn index(set: &PolicySet, schema: &Schema, actions: &Entities) -> Result<HashMap<EntityUid, Scoped>> {
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
        let mut any_resource = Vec::new();
        let mut by_resource: HashMap<EntityUid, Vec<Policy>> = HashMap::new();
        for policy in applies {
            match policy.resource_constraint() {
                ResourceConstraint::Eq(uid) => by_resource.entry(uid).or_default().push(policy.clone()),
                _ => any_resource.push(policy.clone()),
            }
        }
        let set_of = |policies: Vec<Policy>| PolicySet::from_policies(policies).map_err(|e| anyhow::anyhow!("{e}"));
        let scoped = Scoped {
            any_resource: if any_resource.is_empty() { None } else { Some(set_of(any_resource)?) },
            by_resource: by_resource
                .into_iter()
                .map(|(resource, policies)| Ok((resource, set_of(policies)?)))
                .collect::<Result<_>>()?,
        };
        by_action.insert(action.clone(), scoped);
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

    /// Cedar text of one generated policy.
    fn policy_text(index: usize, shape: (u8, u8, u8, u8, u8, u8)) -> String {
        let (effect, principal, action, resource, condition, grant) = shape;
        let endpoint = |i: u8| format!("Seb::HttpsEndpoint::\"https://127.0.0.3:9443/v1/r{}\"", i % 4);
        // Every action but the HTTP ones has resources without a path.
        let condition = if action % 5 == 0 && matches!(condition % 5, 1 | 4) { 2 } else { condition };
        let principal =
            ["principal", "principal in Seb::Node::\"n1\"", "principal in Seb::Node::\"n2\""][principal as usize % 3];
        let action = [
            "action",
            "action == Seb::Action::\"http::PUT\"",
            "action == Seb::Action::\"http::POST\"",
            "action in Seb::Action::\"http\"",
            "action in [Seb::Action::\"http::PUT\", Seb::Action::\"http::PATCH\"]",
        ][action as usize % 5];
        let resource = match resource % 6 {
            0 => "resource".to_string(),
            1 => "resource is Seb::HttpsEndpoint".to_string(),
            2 => format!("resource in {}", endpoint(resource / 6)),
            _ => format!("resource == {}", endpoint(resource / 6)),
        };
        let condition = [
            "",
            "when { resource.path like \"/v1/r1*\" }",
            "when { context.hour_utc >= 0 }",
            // Overflows at evaluation: a policy error, which refuses the request.
            "when { context.now * 9223372036854775807 > 1 }",
            "unless { resource.path == \"/v1/r2\" }",
        ][condition as usize % 5];
        let annotations = if effect % 3 == 0 {
            String::new()
        } else {
            match grant % 4 {
                0 | 1 => "@identity(\"x509_client:a\")".into(),
                2 => "@identity(\"x509_client:a\") @approvals(\"1\") @approvers(\"seb://approver/x\") @ttl(\"30\")"
                    .into(),
                _ => "@identity(\"x509_client:b\")".into(),
            }
        };
        let effect = if effect % 3 == 0 { "forbid" } else { "permit" };
        format!("@id(\"p{index}\") {annotations}\n{effect} ({principal}, {action}, {resource}) {condition};\n")
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 300, ..Default::default() })]

        /// The index by action and resource gives the answer of the whole set: forbids,
        /// errors, permits and their grants (approvals included).
        #[test]
        fn the_index_answers_as_the_whole_set(
            shapes in proptest::collection::vec(proptest::prelude::any::<(u8, u8, u8, u8, u8, u8)>(), 1..12),
            requests in proptest::collection::vec((0u8..4, 0u8..5), 1..8),
        ) {
            let text: String = shapes.iter().enumerate().map(|(i, shape)| policy_text(i, *shape)).collect();
            let book = match book(&[("p.cedar", &text)]) {
                Ok(book) => book,
                Err(e) => panic!("generated policies must validate: {e:#}\n{text}"),
            };
            for (operation, target) in requests {
                let operation = ["PUT", "POST", "PATCH", "DELETE"][operation as usize];
                let request: MutationRequest = serde_json::from_value(serde_json::json!({
                    "provider": "http", "operation": operation,
                    "target": format!("https://127.0.0.3:9443/v1/r{target}"), "params": {"body": 1},
                }))
                .unwrap();
                let facts = Facts { request: &request, precondition: "sha256:00", intent: "t", live_state_digest: None, now: SystemTime::now() };
                let indexed = book.evaluate(&agent(), &facts);
                let whole = book.evaluate_unindexed(&agent(), &facts);
                proptest::prop_assert_eq!(&indexed, &whole, "{} {}\n{}", operation, target, text);
            }
        }
    }

    #[test]
    fn policies_naming_one_resource_are_evaluated_for_that_resource_alone() {
        let text = "@id(\"r1\") @identity(\"x509_client:a\")\n\
                    permit (principal, action == Seb::Action::\"http::PUT\", resource == Seb::HttpsEndpoint::\"https://127.0.0.3:9443/v1/r1\");\n\
                    @id(\"r1-forbid\")\n\
                    forbid (principal, action, resource == Seb::HttpsEndpoint::\"https://127.0.0.3:9443/v1/r1\") when { context.hour_utc > 24 };\n\
                    @id(\"all\") @identity(\"x509_client:a\") @approvals(\"1\") @approvers(\"seb://approver/x\")\n\
                    permit (principal, action == Seb::Action::\"http::PUT\", resource is Seb::HttpsEndpoint) when { resource.path like \"/v1/r*\" };\n";
        let book = book(&[("a.cedar", text)]).unwrap();
        let scoped = &book.by_action[&schema::action(&put("https://127.0.0.3:9443/v1/r1"))];
        assert_eq!(scoped.by_resource.len(), 1);
        assert_eq!(scoped.any_resource.as_ref().map(|s| s.policies().count()), Some(1));
        let Verdict::Permit { policies, grant } = evaluate(&book, &put("https://127.0.0.3:9443/v1/r1")) else {
            panic!()
        };
        assert_eq!((policies, grant.approvals), (vec!["all".to_string(), "r1".to_string()], 1));
        let Verdict::Permit { policies, .. } = evaluate(&book, &put("https://127.0.0.3:9443/v1/r2")) else { panic!() };
        assert_eq!(policies, vec!["all"]);
    }
}

//! The Cedar schema policies are validated against, and the entities and context a
//! certify request is evaluated with.
//!
//! Principal: `Seb::Agent::"<identity URI>"`, in its `Seb::Node` (and, in cluster mode,
//! its `Seb::ServiceAccount`, in its `Seb::Namespace`). Action: `Seb::Action::"<provider>::<operation>"`,
//! in the group `Seb::Action::"<provider>"`. Resource: the parsed target, one entity type
//! per provider. Context: the request's parameters (canonical JSON), digests, time and
//! evidence.

use std::{
    collections::{HashMap, HashSet},
    str::FromStr,
    time::SystemTime,
};

use anyhow::{Context as _, Result, bail};
use cedar_policy::{Context, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression, Schema};

use super::identity::Agent;
use crate::{
    cert::{MutationRequest, Provider, contract::canonical_json},
    execute::{https::target_url, kubernetes::KubeTarget},
};

/// The operations each executor performs: the actions policies may name (for AWS, those
/// with a preset, which clients and MCP offer).
const AWS_OPERATIONS: &[&str] = crate::execute::aws::preset::OPERATIONS;
const KUBERNETES_OPERATIONS: &[&str] = &["create", "patch", "apply", "scale", "delete"];
const HTTP_OPERATIONS: &[&str] = &["PUT", "POST", "PATCH", "DELETE"];

const ENTITIES: &str = r#"
namespace Seb {
  entity Node;
  entity Namespace;
  entity ServiceAccount in [Namespace];
  entity Agent in [Node, ServiceAccount] = {
    "node": String,
    "cgroup": String,
    "pod_uid"?: String,
    "service_account"?: String,
    "namespace"?: String,
  };
  entity AwsResource = {
    "arn": String,
    "partition": String,
    "service": String,
    "region": String,
    "account": String,
    "resource": String,
  };
  entity KubernetesObject = {
    "group": String,
    "version": String,
    "kind": String,
    "namespace": String,
    "name": String,
  };
  entity HttpsEndpoint = {
    "url": String,
    "host": String,
    "port": Long,
    "path": String,
  };
  type Evidence = {
    "intent": String,
    "has_live_state": Bool,
    "live_state_digest": String,
  };
  type Context = {
    "params": String,
    "request_digest": String,
    "precondition": String,
    "now": Long,
    "hour_utc": Long,
    "evidence": Evidence,
  };
  action "aws", "kubernetes", "http";
"#;

/// The schema's text (what `seb-agent sab schema` prints).
pub fn text() -> String {
    let mut text = ENTITIES.to_string();
    for (provider, operations, resource) in [
        ("aws", AWS_OPERATIONS, "AwsResource"),
        ("kubernetes", KUBERNETES_OPERATIONS, "KubernetesObject"),
        ("http", HTTP_OPERATIONS, "HttpsEndpoint"),
    ] {
        let names: Vec<String> = operations.iter().map(|op| format!("\"{provider}::{op}\"")).collect();
        text += &format!(
            "  action {} in [\"{provider}\"] appliesTo {{ principal: [Agent], resource: [{resource}], context: Context }};\n",
            names.join(", ")
        );
    }
    text + "}\n"
}

pub fn load() -> Schema {
    let (schema, _warnings) = Schema::from_cedarschema_str(&text()).expect("the built-in schema is valid");
    schema
}

fn uid(kind: &str, id: &str) -> EntityUid {
    let kind = EntityTypeName::from_str(kind).expect("built-in entity type names are valid");
    EntityUid::from_type_name_and_id(kind, EntityId::new(id))
}

pub fn action(request: &MutationRequest) -> EntityUid {
    uid("Seb::Action", &format!("{}::{}", request.provider, request.operation))
}

fn string(value: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(value.to_string())
}

fn record(pairs: Vec<(&str, RestrictedExpression)>) -> RestrictedExpression {
    RestrictedExpression::new_record(pairs.into_iter().map(|(k, v)| (k.to_string(), v))).expect("distinct keys")
}

/// The principal and the entities it is in.
pub fn principal(agent: &Agent) -> (EntityUid, Vec<Entity>) {
    let node = uid("Seb::Node", &agent.node);
    let mut parents = HashSet::from([node.clone()]);
    let mut entities = vec![Entity::with_uid(node)];
    let mut attrs =
        HashMap::from([("node".to_string(), string(&agent.node)), ("cgroup".to_string(), string(&agent.cgroup))]);
    if let Some(pod) = &agent.pod_uid {
        attrs.insert("pod_uid".into(), string(pod));
    }
    if let (Some(namespace), Some(account)) = (&agent.namespace, &agent.service_account) {
        attrs.insert("namespace".into(), string(namespace));
        attrs.insert("service_account".into(), string(account));
        let ns = uid("Seb::Namespace", namespace);
        let sa = uid("Seb::ServiceAccount", &format!("{namespace}/{account}"));
        entities.push(Entity::with_uid(ns.clone()));
        entities.push(Entity::new_no_attrs(sa.clone(), HashSet::from([ns])));
        parents.insert(sa);
    }
    let me = uid("Seb::Agent", &agent.uri);
    entities.push(Entity::new(me.clone(), attrs, parents).expect("attribute values are literals"));
    (me, entities)
}

/// The resource entity for the request's target; a target the provider cannot name is refused.
pub fn resource(request: &MutationRequest) -> Result<(EntityUid, Entity)> {
    let target = request.target.as_str();
    let (kind, attrs): (&str, Vec<(&str, RestrictedExpression)>) = match request.provider {
        Provider::Aws => {
            let parts: Vec<&str> = target.splitn(6, ':').collect();
            let ["arn", partition, service, region, account, resource] = parts.as_slice() else {
                bail!("an AWS target is an ARN (arn:partition:service:region:account:resource), not `{target}`");
            };
            let attrs = vec![
                ("arn", string(target)),
                ("partition", string(partition)),
                ("service", string(service)),
                ("region", string(region)),
                ("account", string(account)),
                ("resource", string(resource)),
            ];
            ("Seb::AwsResource", attrs)
        }
        Provider::Kubernetes => {
            // As the executor reads it: one spelling per object (no kind in another case,
            // no escaped or queried namespace or name), so each rule sees the object the
            // API server will act on.
            let object = KubeTarget::parse(target)?;
            let attrs = vec![
                ("group", string(&object.gvk.group)),
                ("version", string(&object.gvk.version)),
                ("kind", string(&object.gvk.kind)),
                ("namespace", string(&object.namespace)),
                ("name", string(&object.name)),
            ];
            ("Seb::KubernetesObject", attrs)
        }
        Provider::Http => {
            // As the executor reads it: one spelling (no dot segments, escapes or user
            // info), so a rule on `path` sees the resource the server will act on.
            let url = target_url(target)?;
            let host = url.host().with_context(|| format!("`{target}` names no host"))?;
            let attrs = vec![
                ("url", string(target)),
                ("host", string(host.trim_start_matches('[').trim_end_matches(']'))),
                ("port", RestrictedExpression::new_long(url.port_u16().unwrap_or(443).into())),
                ("path", string(url.path())),
            ];
            ("Seb::HttpsEndpoint", attrs)
        }
    };
    let me = uid(kind, target);
    let attrs = attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    Ok((me.clone(), Entity::new(me, attrs, HashSet::new()).expect("attribute values are literals")))
}

/// What the policy sees of the request beyond principal, action and resource.
pub struct Facts<'a> {
    pub request: &'a MutationRequest,
    pub precondition: &'a str,
    pub intent: &'a str,
    /// `sha256:` of the live state shown to the agent, if it gave one.
    pub live_state_digest: Option<&'a str>,
    pub now: SystemTime,
}

/// The context; `Request::new` checks it against the schema.
pub fn context(facts: &Facts<'_>) -> Result<Context> {
    let seconds = facts.now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let evidence = record(vec![
        ("intent", string(facts.intent)),
        ("has_live_state", RestrictedExpression::new_bool(facts.live_state_digest.is_some())),
        ("live_state_digest", string(facts.live_state_digest.unwrap_or(""))),
    ]);
    let pairs = [
        ("params", string(&canonical_json(&facts.request.params))),
        ("request_digest", string(&facts.request.digest())),
        ("precondition", string(facts.precondition)),
        ("now", RestrictedExpression::new_long(seconds)),
        ("hour_utc", RestrictedExpression::new_long(seconds % 86_400 / 3_600)),
        ("evidence", evidence),
    ];
    Context::from_pairs(pairs.into_iter().map(|(k, v)| (k.to_string(), v)))
        .map_err(|e| anyhow::anyhow!("building the policy context: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(provider: &str, operation: &str, target: &str) -> MutationRequest {
        serde_json::from_value(serde_json::json!({"provider": provider, "operation": operation, "target": target}))
            .unwrap()
    }

    #[test]
    fn the_schema_declares_every_executor_operation() {
        let schema = load();
        let actions: Vec<String> = schema.actions().map(|a| a.id().unescaped().to_string()).collect();
        for expected in ["aws::s3:PutObject", "aws::ec2:TerminateInstances", "kubernetes::scale", "http::PUT", "http"] {
            assert!(actions.contains(&expected.to_string()), "{expected} in {actions:?}");
        }
    }

    #[test]
    fn targets_become_resources_or_are_refused() {
        let (_, entity) = resource(&request("aws", "s3:PutObject", "arn:aws:s3:::bucket/key")).unwrap();
        assert_eq!(entity.attr("service").unwrap().unwrap().to_string(), "\"s3\"");
        let (_, entity) = resource(&request("kubernetes", "scale", "apps/v1/Deployment/prod/web")).unwrap();
        assert_eq!(entity.attr("namespace").unwrap().unwrap().to_string(), "\"prod\"");
        let (_, entity) = resource(&request("http", "PUT", "https://127.0.0.3:9443/v1/config")).unwrap();
        assert_eq!(entity.attr("port").unwrap().unwrap().to_string(), "9443");
        for (provider, target, problem) in [
            ("aws", "s3://bucket/key", "ARN"),
            ("kubernetes", "Deployment/web", "<namespace>"),
            ("http", "http://example/x", "https://"),
        ] {
            let error = resource(&request(provider, "x", target)).unwrap_err().to_string();
            assert!(error.contains(problem), "{target}: {error}");
        }
    }
}

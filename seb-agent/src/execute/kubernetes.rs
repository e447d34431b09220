//! The Kubernetes executor (kube-rs). Per decision, the broker:
//! 1. creates a Secret `seb-token-<decision>` in the ServiceAccount's namespace;
//! 2. mints a token for the contract's ServiceAccount with the TokenRequest API, bound to
//!    that Secret (600 s, the API's floor), and notes its credential id (the JWT's `jti`);
//! 3. reads the target with that token (drift) and keeps its `resourceVersion`;
//! 4. performs the mutation with the `resourceVersion` as precondition, so the drift
//!    check and the write are atomic (a concurrent change makes the API refuse it);
//! 5. reads the resulting state, then deletes the Secret, so the token stops
//!    authenticating well before it expires.
//!
//! Every request goes over the broker's kernel-registered sockets: kube's client is
//! built on a tower service that sends through [`BrokerHttp`].
//!
//! Targets are `<apiVersion>/<Kind>/<namespace>/<name>` (e.g. `apps/v1/Deployment/prod/web`).
//! Operations: `create` (`params.object`), `patch` (JSON merge, `params.patch`),
//! `apply` (server-side apply, `params.object`), `scale` (`params.replicas`), `delete`.
//! Canonical state: the object without `metadata.{resourceVersion, uid,
//! creationTimestamp, generation, managedFields}` and without `status`; `{"exists": false}`
//! when it is absent.

use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use futures::future::BoxFuture;
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Secret, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams, Preconditions},
    core::{ApiResource, GroupVersionKind},
};
use serde_json::{Value, json};

use super::{
    Executor, MintedIdentity, Mutation, Performed, Prepared, Refusal, Timings, broker_http::BrokerHttp,
    identity_mismatch, mint_failed, ms, read_failed, unsupported,
};
pub use crate::kube_api::KubernetesConfig;
use crate::{
    admission::RequestSummary,
    cert::{
        MutationRequest, Provider,
        contract::{ScopedIdentity, canonical_json, digest_of},
    },
    kube_api::{KubeApi, Token},
};

/// The TokenRequest API refuses shorter tokens.
pub const TOKEN_SECONDS: i64 = 600;
const FIELD_MANAGER: &str = "seb-broker";

/// One Kubernetes mutation.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeOperation {
    pub verb: Verb,
    pub target: KubeTarget,
}

/// An object: `<apiVersion>/<Kind>/<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeTarget {
    pub gvk: GroupVersionKind,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verb {
    Create(Value),
    Patch(Value),
    Apply(Value),
    Scale(i64),
    Delete,
}

impl KubeTarget {
    /// A core (group "") Secret.
    /// The target's kind is spelt as the API server spells the object it reached
    /// (`served`, from the drift check's read). A custom resource's kind reaches its
    /// resource in any letter case (the plural is lower-case), and the SAB's rules
    /// compare the target as written: `Authorizationpolicy` would pass a rule forbidding
    /// `AuthorizationPolicy`.
    pub fn spelt_as_served(&self, served: Option<&str>) -> Result<()> {
        match served {
            Some(served) if served != self.gvk.kind => bail!(
                "the API server spells this kind `{served}`, the target `{}`: certify the target as the API \
                 server spells it",
                self.gvk.kind
            ),
            _ => Ok(()),
        }
    }

    pub fn is_core_secret(&self) -> bool {
        self.gvk.group.is_empty() && self.gvk.kind == "Secret"
    }

    pub fn parse(target: &str) -> Result<Self> {
        let usage = || format!("Kubernetes targets are <apiVersion>/<Kind>/<namespace>/<name>, not `{target}`");
        let parts: Vec<&str> = target.split('/').collect();
        let (api_version, kind, namespace, name) = match parts.as_slice() {
            [version, kind, ns, name] => (version.to_string(), *kind, *ns, *name),
            [group, version, kind, ns, name] => (format!("{group}/{version}"), *kind, *ns, *name),
            _ => bail!(usage()),
        };
        let (group, version) = api_version.rsplit_once('/').map_or(("", api_version.as_str()), |(g, v)| (g, v));
        check_api_version(group, version, parts.len() == 5).with_context(|| format!("Kubernetes target `{target}`"))?;
        check_kind(kind).with_context(|| format!("Kubernetes target `{target}`"))?;
        check_namespace(namespace).with_context(|| format!("Kubernetes target `{target}`"))?;
        check_name(name).with_context(|| format!("Kubernetes target `{target}`"))?;
        Ok(Self { gvk: GroupVersionKind::gvk(group, version, kind), namespace: namespace.into(), name: name.into() })
    }

    fn api(&self, client: &Client) -> Api<DynamicObject> {
        Api::namespaced_with(client.clone(), &self.namespace, &ApiResource::from_gvk(&self.gvk))
    }
}

/// Kinds of the core API whose spelling is known: a target must spell them so. The API
/// server finds the resource by the lower-cased kind's plural, so `SECRET` is `secrets`
/// there while a policy comparing `resource.kind == "Secret"` never matches it.
const KNOWN_KINDS: &[&str] = &[
    "ConfigMap",
    "ControllerRevision",
    "CronJob",
    "DaemonSet",
    "Deployment",
    "EndpointSlice",
    "Endpoints",
    "Event",
    "HorizontalPodAutoscaler",
    "Ingress",
    "Job",
    "Lease",
    "LimitRange",
    "NetworkPolicy",
    "PersistentVolumeClaim",
    "Pod",
    "PodDisruptionBudget",
    "PodTemplate",
    "ReplicaSet",
    "ReplicationController",
    "ResourceQuota",
    "Role",
    "RoleBinding",
    "Secret",
    "Service",
    "ServiceAccount",
    "StatefulSet",
];

/// A kind is an identifier in UpperCamelCase (`Deployment`, `CSIStorageCapacity`): it has
/// a lower-case letter, so no all-capitals alias of another, and a known kind is spelt as
/// the API spells it.
fn check_kind(kind: &str) -> Result<()> {
    ensure!(
        kind.starts_with(|c: char| c.is_ascii_uppercase())
            && kind.bytes().all(|b| b.is_ascii_alphanumeric())
            && kind.bytes().any(|b| b.is_ascii_lowercase()),
        "the kind `{kind}` is not an UpperCamelCase identifier"
    );
    if let Some(known) = KNOWN_KINDS.iter().find(|known| known.eq_ignore_ascii_case(kind)) {
        ensure!(*known == kind, "the kind `{kind}` is spelt `{known}`");
    }
    // The URL names the resource by the kind's plural, which other words share
    // (`PodMetrics` and `Pod` are both `pods`; `Endpoint` is `endpoints`).
    let plural = plural_of(kind);
    if let Some((_, known)) =
        KNOWN_PLURALS.iter().find(|(known_plural, known)| *known != kind && *known_plural == plural)
    {
        bail!("the kind `{kind}` names the resource `{plural}`, whose kind is `{known}`");
    }
    Ok(())
}

/// The known kinds' plurals, derived once rather than at each target's parse.
static KNOWN_PLURALS: std::sync::LazyLock<Vec<(String, &'static str)>> =
    std::sync::LazyLock::new(|| KNOWN_KINDS.iter().map(|kind| (plural_of(kind), *kind)).collect());

/// The resource a kind's URL names, as the executor derives it.
fn plural_of(kind: &str) -> String {
    ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", kind)).plural
}

/// A namespace name is a DNS-1123 label (apimachinery `ValidateNamespaceName`,
/// `validation.IsDNS1123Label`): lower-case letters, digits and `-`, at most 63. So no
/// escape (`kube%2Dsystem`) or query (`?`) gives one namespace two spellings.
/// A version as the API serves them (`v1`, `v2beta1`), and in the five-part form a
/// named group, a DNS-1123 subdomain: `/v1/Secret/...` (an empty group) reaches the core
/// `v1/Secret/...` under another spelling.
fn check_api_version(group: &str, version: &str, grouped: bool) -> Result<()> {
    let numbered = |text: &str| !text.is_empty() && !text.starts_with('0') && text.bytes().all(|b| b.is_ascii_digit());
    let stable = version.strip_prefix('v').unwrap_or_default();
    let (major, level) = match stable.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => stable.split_at(at),
        None => (stable, ""),
    };
    let level_ok =
        level.is_empty() || ["alpha", "beta"].iter().any(|name| level.strip_prefix(name).is_some_and(numbered));
    ensure!(numbered(major) && level_ok, "the API version `{version}` is not one the API serves (v1, v2beta1, ...)");
    if grouped {
        let labels_ok = group.len() <= 253
            && group.split('.').all(|label| {
                let bytes = label.as_bytes();
                (1..=63).contains(&bytes.len())
                    && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                    && bytes[0] != b'-'
                    && bytes[bytes.len() - 1] != b'-'
            });
        ensure!(labels_ok, "the API group `{group}` is not a DNS-1123 subdomain (the core group is written `v1/...`)");
    }
    Ok(())
}

fn check_namespace(namespace: &str) -> Result<()> {
    let bytes = namespace.as_bytes();
    ensure!(
        (1..=63).contains(&bytes.len())
            && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-',
        "the namespace `{namespace}` is not a DNS-1123 label"
    );
    Ok(())
}

/// An object name as the URL carries it unescaped: a DNS-1123 subdomain's characters
/// (apimachinery `NameIsDNSSubdomain`) plus `:`, `@`, `+`, `~` and `=`, which RBAC names
/// may use (`path.IsValidPathSegmentName` refuses only `/`, `%`, `.` and `..`); never `.` or `..`, at most 253. No `%`, `/`, `?` or
/// `#`, which would address another object than the name says.
fn check_name(name: &str) -> Result<()> {
    ensure!(
        (1..=253).contains(&name.len())
            && name != "."
            && name != ".."
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:_@+~=".contains(&b)),
        "the name `{name}` is not an object name (letters, digits, `-`, `.`, `_`, `:`, `@`, `+`, `~`, `=`)"
    );
    Ok(())
}

/// `metadata.managedFields` is the API server's record of which manager owns which
/// field; the broker's forced apply (manager `seb-broker`) removes fields its entries say
/// it owns and its object omits. A certified write that planted entries would have a
/// later, unrelated apply remove fields nobody certified removing.
fn check_no_managed_fields(body: &Value, what: &str) -> Result<()> {
    ensure!(
        body.pointer("/metadata/managedFields").is_none(),
        "{what}.metadata.managedFields is the API server's record of field owners, not written through seb"
    );
    Ok(())
}

impl KubeOperation {
    pub fn parse(request: &MutationRequest) -> Result<Self> {
        let target = KubeTarget::parse(&request.target)?;
        let params = &request.params;
        check_params_keys(&request.operation, params)?;
        let core_secret = target.is_core_secret();
        let object = |verb: &str| -> Result<Value> {
            let object = params.get("object").cloned().with_context(|| format!("{verb} needs params.object"))?;
            check_object_names(&object, &target, verb)?;
            check_no_managed_fields(&object, "params.object")?;
            // The token controller fills such a Secret with a token that never expires:
            // a credential beyond any decision, for whoever can read or mount it.
            ensure!(
                !(core_secret && object["type"] == SERVICE_ACCOUNT_TOKEN),
                "a Secret of type kubernetes.io/service-account-token (a ServiceAccount token that never expires) is not made through seb"
            );
            if core_secret {
                check_no_token_annotations(&object)?;
            }
            Ok(object)
        };
        let verb = match request.operation.as_str() {
            "create" => Verb::Create(object("create")?),
            "patch" => {
                let patch = params.get("patch").cloned().context("patch needs params.patch (a JSON merge patch)")?;
                ensure!(patch.is_object(), "params.patch is a JSON merge patch (an object)");
                ensure!(patch.get("metadata").is_none_or(Value::is_object), "params.patch.metadata must be an object");
                check_no_managed_fields(&patch, "params.patch")?;
                if core_secret {
                    check_no_token_annotations(&patch)?;
                }
                Verb::Patch(patch)
            }
            "apply" => Verb::Apply(object("apply")?),
            "scale" => Verb::Scale(params["replicas"].as_i64().context("scale needs params.replicas")?),
            "delete" => Verb::Delete,
            other => bail!("Kubernetes operation `{other}` is not one of create, patch, apply, scale, delete"),
        };
        Ok(Self { verb, target })
    }
}

impl KubeOperation {
    /// Whether the operation can be sent against the target as the drift check found it:
    /// a patch, scale or delete only of an object that existed (its resourceVersion is
    /// the write's precondition; without one, an object made meanwhile would take a write
    /// nobody certified), and nothing but a delete to a ServiceAccount token Secret (the
    /// token controller would fill it with a token of whatever ServiceAccount it names).
    fn applies_to(&self, existed: bool, token_secret: bool) -> Result<()> {
        let needs_existing = matches!(self.verb, Verb::Patch(_) | Verb::Scale(_) | Verb::Delete);
        ensure!(
            !needs_existing || existed,
            "the target did not exist at the drift check: a patch, scale or delete of it is not sent (certify a create or an apply)"
        );
        ensure!(
            !token_secret || self.verb == Verb::Delete,
            "the target is a Secret of type {SERVICE_ACCOUNT_TOKEN}: only its delete is sent through seb"
        );
        Ok(())
    }
}

/// The keys `params` may hold for `operation`.
fn check_params_keys(operation: &str, params: &Value) -> Result<()> {
    let allowed: &[&str] = match operation {
        "create" | "apply" => &["object"],
        "patch" => &["patch"],
        "scale" => &["replicas"],
        _ => &[],
    };
    super::only_params(operation, params, allowed)
}

/// The annotations by which the token controller fills a Secret of type
/// `kubernetes.io/service-account-token` with a token of the ServiceAccount they name
/// (`pkg/controller/serviceaccount/tokens_controller.go`): not written through seb.
fn check_no_token_annotations(object: &Value) -> Result<()> {
    let annotations = object.pointer("/metadata/annotations").and_then(Value::as_object);
    if let Some(key) =
        annotations.into_iter().flatten().map(|(key, _)| key).find(|key| key.starts_with(TOKEN_ANNOTATIONS))
    {
        bail!(
            "the annotation {key} of a Secret (it names the ServiceAccount a token controller mints for) is not written through seb"
        );
    }
    Ok(())
}

const TOKEN_ANNOTATIONS: &str = "kubernetes.io/service-account.";
const SERVICE_ACCOUNT_TOKEN: &str = "kubernetes.io/service-account-token";

/// A created or applied object is the target: its `metadata.name` is the target's name
/// (what the API server creates is the body's name, not the URL's), no `generateName`,
/// and its namespace, if named, the target's.
fn check_object_names(object: &Value, target: &KubeTarget, verb: &str) -> Result<()> {
    let metadata = object
        .get("metadata")
        .and_then(Value::as_object)
        .with_context(|| format!("params.object.metadata must be an object naming `{}` ({verb})", target.name))?;
    ensure!(
        metadata.get("name").and_then(Value::as_str) == Some(target.name.as_str()),
        "params.object.metadata.name must be the target's name `{}`",
        target.name
    );
    ensure!(metadata.get("generateName").is_none(), "params.object.metadata.generateName is not certified");
    if let Some(namespace) = metadata.get("namespace") {
        ensure!(
            namespace.as_str() == Some(target.namespace.as_str()),
            "params.object.metadata.namespace must be the target's `{}`",
            target.namespace
        );
    }
    Ok(())
}

/// The object's state without the fields the API server changes on its own, and with
/// the fields seb's own server-side applies own (`applied_by_seb`, when there are any):
/// an apply removes those of them it leaves out, so a certificate names them too.
pub fn canonical_state(object: Option<&DynamicObject>) -> Value {
    let Some(object) = object else { return json!({"exists": false}) };
    let mut value = serde_json::to_value(object).unwrap_or_default();
    let mut applied_by_seb = Vec::new();
    if let Some(metadata) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        for volatile in ["resourceVersion", "uid", "creationTimestamp", "generation"] {
            metadata.remove(volatile);
        }
        // Other managers' entries and every entry's time change with writes that
        // change nothing an apply of seb's would remove.
        let managed = metadata.remove("managedFields").unwrap_or_default();
        applied_by_seb = managed
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["manager"] == FIELD_MANAGER && entry["operation"] == "Apply")
            .map(|entry| json!({"apiVersion": entry["apiVersion"], "fieldsV1": entry["fieldsV1"]}))
            .collect();
    }
    if let Some(object) = value.as_object_mut() {
        object.remove("status");
    }
    if applied_by_seb.is_empty() {
        json!({"exists": true, "object": canonical_json(&value)})
    } else {
        json!({"exists": true, "object": canonical_json(&value), "applied_by_seb": canonical_json(&json!(applied_by_seb))})
    }
}

/// A minted token, as a client, and what it was bound to.
pub struct KubeSession {
    /// The minted token's client: reads and the mutation.
    client: Client,
    /// Deleting it ends the token.
    bound: BoundSecret,
    pub identity: MintedIdentity,
    /// The target's resourceVersion at the drift check.
    resource_version: Option<String>,
    /// The target, at the drift check, is a Secret of type
    /// `kubernetes.io/service-account-token`.
    live_token_secret: bool,
    /// The kind as the API server spells the target, at the drift check.
    live_kind: Option<String>,
}

/// The Secret a minted token is bound to. Deleted once, as the broker, with connections
/// outside the decision (a revoked decision's are refused, and its token must still
/// end); one dropped undeleted (a stage's deadline, a panic) is deleted on the runtime.
struct BoundSecret {
    client: Client,
    namespace: String,
    name: String,
    deleted: bool,
}

impl BoundSecret {
    async fn delete(&mut self) {
        if !self.deleted {
            delete_secret(self.client.clone(), &self.namespace, &self.name).await;
            // Only now: a delete cut short (a stage's deadline) is sent again on drop.
            self.deleted = true;
        }
    }
}

impl Drop for BoundSecret {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        let (client, namespace, name) = (self.client.clone(), self.namespace.clone(), self.name.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move { delete_secret(client, &namespace, &name).await })),
            Err(_) => tracing::warn!(secret = %name, "a token's Secret was left; the token expires on its own"),
        }
    }
}

async fn delete_secret(client: Client, namespace: &str, name: &str) {
    if let Err(e) = Api::<Secret>::namespaced(client, namespace).delete(name, &DeleteParams::default()).await {
        tracing::warn!(secret = %name, error = %e, "deleting the token's Secret failed; the token expires on its own");
    }
}

pub struct KubernetesExecutor {
    api: KubeApi,
}

impl KubernetesExecutor {
    pub fn new(config: KubernetesConfig, http: BrokerHttp) -> Result<Self> {
        Ok(Self { api: KubeApi::new(&config, http)? })
    }

    /// Secret, then a TokenRequest bound to it, for the contract's ServiceAccount.
    pub async fn mint(&self, namespace: &str, service_account: &str, decision_id: &str) -> Result<KubeSession> {
        let base = self.api.bounded_client(Token::Broker, namespace);
        // The decision's id, and a part of its own: a reconcile after a crash reads again
        // under the same decision, whose first Secret may still be there.
        let secret_name = format!(
            "seb-token-{}-{}",
            decision_id.chars().filter(char::is_ascii_alphanumeric).take(20).collect::<String>().to_lowercase(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                labels: Some([("seb.io/decision".to_string(), decision_id.chars().take(63).collect())].into()),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let secret = Api::<Secret>::namespaced(base.clone(), namespace).create(&PostParams::default(), &secret).await?;
        let mut bound = BoundSecret {
            client: self.api.client_outside_decision(Token::Broker, namespace),
            namespace: namespace.into(),
            name: secret_name.clone(),
            deleted: false,
        };
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(TOKEN_SECONDS),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Secret".into()),
                    name: Some(secret_name.clone()),
                    uid: secret.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let minted = async {
            let token = Api::<ServiceAccount>::namespaced(base, namespace)
                .create_token_request(service_account, &PostParams::default(), &request)
                .await?;
            token.status.context("the TokenRequest has no status")
        };
        let status = match minted.await {
            Ok(status) => status,
            Err(e) => {
                // The Secret was made for a token that never was.
                bound.delete().await;
                return Err(e);
            }
        };
        let identity = MintedIdentity::KubernetesToken {
            namespace: namespace.into(),
            service_account: service_account.into(),
            credential_id: jti(&status.token).unwrap_or_default(),
            expiration: status.expiration_timestamp.0.to_string(),
            bound_secret: secret_name,
        };
        Ok(KubeSession {
            client: self.api.bounded_client(Token::Minted(status.token), namespace),
            bound,
            identity,
            resource_version: None,
            live_token_secret: false,
            live_kind: None,
        })
    }

    /// Read the target; remembers its resourceVersion for the write's precondition.
    pub async fn live_state(&self, target: &KubeTarget, session: &mut KubeSession) -> Result<String> {
        let object = target.api(&session.client).get_opt(&target.name).await?;
        session.resource_version = object.as_ref().and_then(|o| o.metadata.resource_version.clone());
        session.live_token_secret =
            target.is_core_secret() && object.as_ref().is_some_and(|o| o.data["type"] == SERVICE_ACCOUNT_TOKEN);
        session.live_kind = object.as_ref().and_then(|o| o.types.as_ref()).map(|types| types.kind.clone());
        Ok(digest_of(&canonical_state(object.as_ref())))
    }

    /// Mint a token for `namespace/service_account`, get the target with it, and revoke
    /// the token whatever the get did: the minted identity and the object (`None` when it
    /// does not exist).
    pub async fn read_with_fresh_token(
        &self,
        namespace: &str,
        service_account: &str,
        target: &KubeTarget,
        read_id: &str,
    ) -> Result<(MintedIdentity, Option<DynamicObject>)> {
        let mut session = self.mint(namespace, service_account, read_id).await?;
        let object = target.api(&session.client).get_opt(&target.name).await;
        self.revoke(&mut session).await;
        Ok((session.identity, object?))
    }

    /// Perform the mutation with the drift check's resourceVersion as precondition. The
    /// caller revokes the token (`revoke`) once it has read the resulting state.
    pub async fn mutate(&self, operation: &KubeOperation, session: &KubeSession) -> Result<(u16, Option<String>)> {
        match self.write(operation, session).await {
            Ok(()) => Ok((200, None)),
            Err(kube::Error::Api(status)) => Ok((status.code, Some(format!("{}: {}", status.reason, status.message)))),
            Err(e) => Err(e.into()),
        }
    }

    async fn write(&self, operation: &KubeOperation, session: &KubeSession) -> Result<(), kube::Error> {
        let (api, name) = (operation.target.api(&session.client), &operation.target.name);
        let version = session.resource_version.clone();
        let with_version = |mut value: Value| {
            if let Some(object) = value.as_object_mut() {
                let metadata = object.entry("metadata").or_insert_with(|| json!({}));
                metadata["resourceVersion"] = json!(version);
            }
            value
        };
        match &operation.verb {
            Verb::Create(object) => {
                let object: DynamicObject = serde_json::from_value(object.clone()).map_err(kube::Error::SerdeError)?;
                api.create(&PostParams::default(), &object).await.map(drop)
            }
            Verb::Patch(patch) => {
                api.patch(name, &PatchParams::default(), &Patch::Merge(with_version(patch.clone()))).await.map(drop)
            }
            // Certified as absent: created, so that an object made meanwhile is a
            // conflict (an apply without a resourceVersion creates or updates).
            Verb::Apply(object) if version.is_none() => {
                let object: DynamicObject = serde_json::from_value(object.clone()).map_err(kube::Error::SerdeError)?;
                let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
                api.create(&params, &object).await.map(drop)
            }
            Verb::Apply(object) => {
                let params = PatchParams::apply(FIELD_MANAGER).force();
                api.patch(name, &params, &Patch::Apply(with_version(object.clone()))).await.map(drop)
            }
            Verb::Scale(replicas) => {
                let patch = with_version(json!({"spec": {"replicas": replicas}}));
                api.patch_scale(name, &PatchParams::default(), &Patch::Merge(patch)).await.map(drop)
            }
            Verb::Delete => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions { resource_version: version, uid: None }),
                    ..Default::default()
                };
                api.delete(name, &params).await.map(drop)
            }
        }
    }

    /// Delete the bound Secret, as the broker: the token stops authenticating.
    pub async fn revoke(&self, session: &mut KubeSession) {
        session.bound.delete().await
    }
}

/// A minted token and the mutation it may perform.
struct KubeMutation<'a> {
    executor: &'a KubernetesExecutor,
    operation: KubeOperation,
    session: KubeSession,
}

impl<'a> Mutation<'a> for KubeMutation<'a> {
    fn identity(&self) -> &MintedIdentity {
        &self.session.identity
    }

    fn perform(mut self: Box<Self>) -> BoxFuture<'a, Performed> {
        Box::pin(async move {
            let result = self.executor.mutate(&self.operation, &self.session).await;
            let resulting = self.executor.live_state(&self.operation.target, &mut self.session).await.ok();
            // The state is read: the token can stop authenticating now.
            self.executor.revoke(&mut self.session).await;
            (result, resulting)
        })
    }

    fn discard(mut self: Box<Self>) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.executor.revoke(&mut self.session).await })
    }
}

impl Executor for KubernetesExecutor {
    fn prepare<'a: 'r, 'r>(
        &'a self,
        identity: &'r ScopedIdentity,
        request: &'r MutationRequest,
        decision_id: &'r str,
    ) -> BoxFuture<'r, Result<(Prepared<'a>, String, Timings), Refusal>> {
        Box::pin(async move {
            let ScopedIdentity::KubernetesServiceAccount { namespace, name } = identity else {
                return Err(identity_mismatch(Provider::Kubernetes, identity));
            };
            let operation = KubeOperation::parse(request).map_err(unsupported)?;
            let clock = Instant::now();
            let mut session = self.mint(namespace, name, decision_id).await.map_err(mint_failed)?;
            let mint_ms = ms(clock);
            let clock = Instant::now();
            let digest = match self.live_state(&operation.target, &mut session).await {
                Ok(digest) => digest,
                Err(e) => {
                    self.revoke(&mut session).await;
                    return Err(read_failed(e));
                }
            };
            let applies = operation
                .applies_to(session.resource_version.is_some(), session.live_token_secret)
                .and_then(|()| operation.target.spelt_as_served(session.live_kind.as_deref()));
            if let Err(e) = applies {
                self.revoke(&mut session).await;
                return Err(unsupported(e));
            }
            let timings = Timings { mint_ms, drift_check_ms: ms(clock), execute_ms: 0.0 };
            Ok((Box::new(KubeMutation { executor: self, operation, session }) as Prepared<'a>, digest, timings))
        })
    }

    /// Mint, read the target's state, revoke.
    fn read_again<'a>(
        &'a self,
        request: &'a RequestSummary,
        identity: &'a ScopedIdentity,
        decision_id: &'a str,
    ) -> BoxFuture<'a, Result<(MintedIdentity, String)>> {
        Box::pin(async move {
            let ScopedIdentity::KubernetesServiceAccount { namespace, name } = identity else {
                bail!("a Kubernetes target needs a kubernetes_service_account")
            };
            let target = KubeTarget::parse(&request.target)?;
            let (identity, object) = self.read_with_fresh_token(namespace, name, &target, decision_id).await?;
            Ok((identity, digest_of(&canonical_state(object.as_ref()))))
        })
    }
}

/// The `jti` claim of a JWT (its credential id in API audit events).
fn jti(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims["jti"].as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(operation: &str, target: &str, params: Value) -> MutationRequest {
        serde_json::from_value(
            json!({"provider": "kubernetes", "operation": operation, "target": target, "params": params}),
        )
        .unwrap()
    }

    #[test]
    fn targets_name_group_version_kind_namespace_and_name() {
        let op =
            KubeOperation::parse(&request("scale", "apps/v1/Deployment/prod/web", json!({"replicas": 3}))).unwrap();
        assert_eq!(op.target.gvk, GroupVersionKind::gvk("apps", "v1", "Deployment"));
        assert_eq!((op.target.namespace.as_str(), op.target.name.as_str()), ("prod", "web"));
        assert_eq!(op.verb, Verb::Scale(3));
        let core = KubeOperation::parse(&request("delete", "v1/ConfigMap/prod/settings", Value::Null)).unwrap();
        assert_eq!(core.target.gvk, GroupVersionKind::gvk("", "v1", "ConfigMap"));
        assert!(KubeOperation::parse(&request("delete", "Deployment/web", Value::Null)).is_err());
        assert!(KubeOperation::parse(&request("exec", "v1/Pod/prod/x", Value::Null)).is_err());
    }

    #[test]
    fn one_object_has_one_spelling() {
        let refused =
            |target: &str| format!("{:#}", KubeOperation::parse(&request("delete", target, Value::Null)).unwrap_err());
        assert!(refused("v1/SECRET/prod/db").contains("not an UpperCamelCase identifier"));
        assert!(refused("v1/secret/prod/db").contains("not an UpperCamelCase identifier"));
        assert!(refused("v1/SeCret/prod/db").contains("is spelt `Secret`"));
        // Other words with a known kind's plural: the URL would name that resource.
        for (alias, kind) in
            [("PodMetrics", "Pod"), ("Endpoint", "Endpoints"), ("NetworkPolicie", "NetworkPolicy"), ("Leas", "Lease")]
        {
            let e = refused(&format!("v1/{alias}/prod/db"));
            assert!(e.contains(&format!("whose kind is `{kind}`")), "{alias}: {e}");
        }
        // The core group spelt with an empty group, or versions and groups the API never
        // serves under that text.
        assert!(refused("/v1/Secret/prod/db").contains("not a DNS-1123 subdomain"));
        assert!(refused("Apps/v1/Deployment/prod/web").contains("not a DNS-1123 subdomain"));
        assert!(refused("apps./v1/Deployment/prod/web").contains("not a DNS-1123 subdomain"));
        for version in ["V1", "v01", "v1beta", "v1gamma1", "1", "v", "v1beta01"] {
            assert!(refused(&format!("{version}/Secret/prod/db")).contains("is not one the API serves"), "{version}");
        }
        KubeOperation::parse(&request("delete", "batch/v1beta1/CronJob/prod/x", Value::Null)).unwrap();
        assert!(refused("v1/Secret/kube%2Dsystem/db").contains("not a DNS-1123 label"));
        assert!(refused("v1/Secret/Prod/db").contains("not a DNS-1123 label"));
        for name in ["web?x", "web%2F..", "web#x", ".", "..", "a b"] {
            assert!(refused(&format!("v1/Secret/prod/{name}")).contains("is not an object name"), "{name}");
        }
        // What real names look like passes: subdomains, RBAC names with `:`, long kinds.
        for target in [
            "rbac.authorization.k8s.io/v1/Role/prod/system:leader-locking",
            "storage.k8s.io/v1/CSIStorageCapacity/prod/cap-1.a",
            "seb.dev/v1/SebPolicy/prod/default",
        ] {
            KubeOperation::parse(&request("delete", target, Value::Null)).unwrap();
        }
    }

    #[test]
    fn no_write_plants_field_owners() {
        let managed = json!([{"manager": "seb-broker", "operation": "Apply", "fieldsV1": {"f:data": {"f:x": {}}}}]);
        let target = "v1/ConfigMap/prod/settings";
        let patch = json!({"patch": {"metadata": {"managedFields": managed}}});
        let e = format!("{:#}", KubeOperation::parse(&request("patch", target, patch)).unwrap_err());
        assert!(e.contains("params.patch.metadata.managedFields"), "{e}");
        let object = json!({"object": {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "settings", "namespace": "prod", "managedFields": managed}}});
        for verb in ["create", "apply"] {
            let e = format!("{:#}", KubeOperation::parse(&request(verb, target, object.clone())).unwrap_err());
            assert!(e.contains("params.object.metadata.managedFields"), "{verb}: {e}");
        }
        KubeOperation::parse(&request("patch", target, json!({"patch": {"data": {"x": "1"}}}))).unwrap();
    }

    #[test]
    fn no_long_lived_service_account_token_is_made() {
        let secret = |kind: &str, annotations: Value| {
            json!({"object": {"apiVersion": "v1", "kind": "Secret", "type": kind,
                              "metadata": {"name": "s", "annotations": annotations}}})
        };
        let names_admin = json!({"kubernetes.io/service-account.name": "admin"});
        for operation in ["create", "apply"] {
            let refused = KubeOperation::parse(&request(
                operation,
                "v1/Secret/prod/s",
                secret("kubernetes.io/service-account-token", json!({})),
            ));
            assert!(format!("{:#}", refused.unwrap_err()).contains("never expires"), "{operation}");
            KubeOperation::parse(&request(operation, "v1/Secret/prod/s", secret("Opaque", json!({"a": "b"})))).unwrap();
            // The annotations that name the ServiceAccount, on a Secret whose type the
            // body leaves out (an apply to an existing token Secret keeps its type).
            let refused =
                KubeOperation::parse(&request(operation, "v1/Secret/prod/s", secret("Opaque", names_admin.clone())));
            assert!(
                format!("{:#}", refused.unwrap_err()).contains("kubernetes.io/service-account.name"),
                "{operation}"
            );
        }
        // A patch that would turn an existing token Secret into another ServiceAccount's.
        let patch = json!({"patch": {"metadata": {"annotations": {"kubernetes.io/service-account.uid": null}}}});
        let refused = KubeOperation::parse(&request("patch", "v1/Secret/prod/s", patch.clone())).unwrap_err();
        assert!(format!("{refused:#}").contains("kubernetes.io/service-account.uid"), "{refused:#}");
        // Other kinds may carry such annotations (the token controller reads only Secrets).
        KubeOperation::parse(&request("patch", "v1/ConfigMap/prod/s", patch)).unwrap();
        // Whatever the body says, a Secret the drift check found to be a token Secret
        // takes nothing but a delete.
        let patch =
            KubeOperation::parse(&request("patch", "v1/Secret/prod/s", json!({"patch": {"data": {}}}))).unwrap();
        assert!(format!("{:#}", patch.applies_to(true, true).unwrap_err()).contains("only its delete"));
        patch.applies_to(true, false).unwrap();
        KubeOperation::parse(&request("delete", "v1/Secret/prod/s", Value::Null))
            .unwrap()
            .applies_to(true, true)
            .unwrap();
    }

    #[test]
    fn a_kind_spelt_otherwise_than_the_api_server_spells_it_is_refused() {
        let target = KubeTarget::parse("security.example.io/v1/Authorizationpolicy/prod/deny-all").unwrap();
        let refused = format!("{:#}", target.spelt_as_served(Some("AuthorizationPolicy")).unwrap_err());
        assert!(refused.contains("spells this kind `AuthorizationPolicy`"), "{refused}");
        target.spelt_as_served(Some("Authorizationpolicy")).unwrap();
        target.spelt_as_served(None).unwrap();
    }

    #[test]
    fn patch_scale_and_delete_are_sent_only_to_an_object_that_existed() {
        for (operation, params) in
            [("patch", json!({"patch": {"data": {}}})), ("scale", json!({"replicas": 2})), ("delete", Value::Null)]
        {
            let op = KubeOperation::parse(&request(operation, "apps/v1/Deployment/prod/web", params)).unwrap();
            let refused = format!("{:#}", op.applies_to(false, false).unwrap_err());
            assert!(refused.contains("did not exist at the drift check"), "{operation}: {refused}");
            op.applies_to(true, false).unwrap();
        }
        let object = json!({"object": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}});
        for operation in ["create", "apply"] {
            let op = KubeOperation::parse(&request(operation, "apps/v1/Deployment/prod/web", object.clone())).unwrap();
            op.applies_to(false, false).unwrap();
        }
    }

    #[test]
    fn params_hold_only_what_the_operation_reads() {
        let parse = |operation: &str, params: Value| {
            KubeOperation::parse(&request(operation, "apps/v1/Deployment/prod/web", params))
                .map_err(|e| format!("{e:#}"))
        };
        let decoy = parse("scale", json!({"replicas": 2, "approved_by": "cab"})).unwrap_err();
        assert!(decoy.contains("params.approved_by means nothing to scale (it takes params.replicas)"), "{decoy}");
        assert!(parse("delete", json!({"force": true})).unwrap_err().contains("it takes no params"));
        assert!(parse("delete", json!([1])).unwrap_err().contains("params must be an object"));
        parse("delete", json!({})).unwrap();
    }

    #[test]
    fn a_created_or_applied_object_is_the_target() {
        let object =
            |metadata: Value| json!({"object": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}});
        let parse = |operation: &str, params: Value| {
            KubeOperation::parse(&request(operation, "v1/ConfigMap/prod/settings", params))
                .map_err(|e| format!("{e:#}"))
        };
        parse("create", object(json!({"name": "settings"}))).unwrap();
        parse("apply", object(json!({"name": "settings", "namespace": "prod"}))).unwrap();
        assert!(parse("create", object(json!({"name": "other"}))).unwrap_err().contains("the target's name"));
        assert!(
            parse("create", object(json!({"generateName": "s-", "name": "settings"})))
                .unwrap_err()
                .contains("generateName")
        );
        assert!(
            parse("apply", object(json!({"name": "settings", "namespace": "kube-system"})))
                .unwrap_err()
                .contains("the target's `prod`")
        );
        assert!(parse("create", object(json!("settings"))).unwrap_err().contains("must be an object"));
        // A patch whose metadata is not an object would have the executor panic after the
        // decision was recorded.
        let e = parse("patch", json!({"patch": {"metadata": "x"}})).unwrap_err();
        assert!(e.contains("metadata must be an object"), "{e}");
        assert!(parse("patch", json!({"patch": [1]})).unwrap_err().contains("(an object)"));
    }

    #[test]
    fn canonical_state_ignores_what_the_server_changes() {
        let object = |rv: &str, replicas: i64| -> DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "prod", "resourceVersion": rv, "uid": "u", "generation": 4},
                "spec": {"replicas": replicas}, "status": {"readyReplicas": 1}
            }))
            .unwrap()
        };
        assert_eq!(canonical_state(Some(&object("1", 3))), canonical_state(Some(&object("2", 3))));
        assert_ne!(canonical_state(Some(&object("1", 3))), canonical_state(Some(&object("1", 4))));
        assert_eq!(canonical_state(None), json!({"exists": false}));
    }

    /// What seb's applies own is state (an apply that leaves a field out removes it);
    /// other managers' entries and every entry's time are not.
    #[test]
    fn canonical_state_holds_what_sebs_applies_own() {
        const T1: &str = "2026-01-01T00:00:00Z";
        const T2: &str = "2026-01-02T00:00:00Z";
        let object = |entries: Value| -> DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "c", "namespace": "prod", "managedFields": entries},
                "data": {"a": "1", "b": "2"}
            }))
            .unwrap()
        };
        let entry = |manager: &str, operation: &str, fields: Value, time: &str| {
            json!({"manager": manager, "operation": operation, "apiVersion": "v1", "time": time,
                   "fieldsType": "FieldsV1", "fieldsV1": fields})
        };
        let (a, ab) = (json!({"f:data": {"f:a": {}}}), json!({"f:data": {"f:a": {}, "f:b": {}}}));
        let owning = |fields: &Value, time: &str| {
            canonical_state(Some(&object(json!([
                entry(FIELD_MANAGER, "Apply", fields.clone(), time),
                entry("kubectl", "Update", ab.clone(), time)
            ]))))
        };
        assert_ne!(owning(&a, T1), owning(&ab, T1), "seb's applies owning b is part of the state");
        assert_eq!(owning(&a, T1), owning(&a, T2), "an entry's time is not");
        let others_only = canonical_state(Some(&object(json!([entry("kubectl", "Update", ab.clone(), T1)]))));
        assert_eq!(others_only, canonical_state(Some(&object(json!([])))), "nor another manager's entry");
        assert!(others_only.get("applied_by_seb").is_none());
        let seb_update = canonical_state(Some(&object(json!([entry(FIELD_MANAGER, "Update", ab.clone(), T1)]))));
        assert_eq!(seb_update, others_only, "seb's creates (updates) remove nothing later");
    }

    #[test]
    fn the_credential_id_is_the_tokens_jti() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"jti":"abc-123","sub":"x"}"#);
        assert_eq!(jti(&format!("h.{claims}.s")).as_deref(), Some("abc-123"));
        assert_eq!(jti("not-a-jwt"), None);
    }
}

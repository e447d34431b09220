//! A stand-in Kubernetes API server: it speaks the API's wire format for the requests the
//! broker's Kubernetes executor makes (Secrets, TokenRequest, objects, scale), checks
//! bearer tokens the way the real one would for this flow (the broker's own token for
//! Secrets and tokens; a minted token, alive only while its bound Secret exists, for
//! objects), and enforces resourceVersion preconditions. The resources a broker watches
//! (its own CRDs, pods, namespaces, the API server's Service and EndpointSlices) live in
//! [`Store`], with list and watch. It is no Kubernetes: tests that use it show request
//! shapes at the HTTP boundary, not a cluster's behaviour.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Result;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use serde_json::{Value, json};

use crate::{
    kube_store::{self, Store},
    tls_server,
};

/// A ServiceAccount the stand-in does not have: a TokenRequest for it is a 404, as the
/// API server answers for an absent ServiceAccount (after the broker made the Secret).
pub const MISSING_SERVICE_ACCOUNT: &str = "no-such-account";

/// The broker's own ServiceAccount token, as the stand-in knows it.
/// The audience of tokens the API server issues for itself.
pub const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
pub const BROKER_TOKEN: &str = "broker-sa-token";

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    objects: HashMap<String, Value>,
    /// Live Secrets by name, and minted tokens by the Secret they are bound to.
    secrets: HashMap<String, String>,
    tokens: HashMap<String, String>,
    /// Pod-bound ServiceAccount tokens TokenReview knows: namespace, account, pod UID,
    /// node, and the audiences each was issued for.
    pod_tokens: HashMap<String, ([String; 4], Vec<String>)>,
    seen: Vec<Seen>,
}

pub struct KubeStandIn {
    pub ca: PathBuf,
    state: Arc<Mutex<State>>,
    /// The watched resources; tests write them directly, as a cluster's users would.
    pub store: Arc<Mutex<Store>>,
    /// When set, every request gets 503 and open watches end: an unreachable API server.
    offline: Arc<AtomicBool>,
    /// When set, the next GET of an object is followed by a concurrent change to it.
    pub race_after_get: Arc<AtomicBool>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl KubeStandIn {
    pub fn put_object(&self, path: &str, object: Value) {
        self.state.lock().unwrap().objects.insert(path.into(), object);
    }
    pub fn object(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }
    /// A pod-bound ServiceAccount token, issued for `audiences`, that TokenReview will
    /// authenticate for a review naming one of them.
    pub fn add_pod_token(&self, token: &str, pod: [&str; 4], audiences: &[&str]) {
        let audiences = audiences.iter().map(|a| a.to_string()).collect();
        self.state.lock().unwrap().pod_tokens.insert(token.into(), (pod.map(String::from), audiences));
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
    pub fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::SeqCst);
        if offline {
            self.store.lock().unwrap().drop_watches();
        }
    }
    /// Offline after telling every watch `410 Gone`: the clients' lists fail from then on.
    pub fn expire_watches_and_go_offline(&self) {
        self.offline.store(true, Ordering::SeqCst);
        self.store.lock().unwrap().expire_watches();
    }
    pub fn live_secrets(&self) -> Vec<String> {
        self.state.lock().unwrap().secrets.keys().cloned().collect()
    }
}

pub fn start(netns: &str, addr: SocketAddr, dir: &Path) -> Result<KubeStandIn> {
    let (ca, cert, key) = tls_server::server_identity(dir, "kube-apiserver", addr)?;
    let state = Arc::new(Mutex::new(State::default()));
    let store = Arc::new(Mutex::new(Store::default()));
    let race = Arc::new(AtomicBool::new(false));
    let offline = Arc::new(AtomicBool::new(false));
    let (state2, store2, race2, offline2) = (state.clone(), store.clone(), race.clone(), offline.clone());
    let stop = tls_server::spawn(netns, addr, tls_server::config(cert, key, None)?, move |request, _| {
        let response = if offline2.load(Ordering::SeqCst) {
            kube_store::full(503, json!({"kind": "Status", "code": 503, "message": "the API server is unavailable"}))
        } else if Store::serves(request.uri().path()) {
            serve_store(&request, &store2)
        } else {
            handle(request, &state2, &race2).map(BodyExt::boxed)
        };
        async move { response }
    })?;
    Ok(KubeStandIn { ca: ca.cert, state, store, offline, race_after_get: race, _stop: stop })
}

/// The watched resources: only the broker's own token reads or writes them here.
fn serve_store(request: &Request<Bytes>, store: &Mutex<Store>) -> Response<kube_store::Body> {
    let authorization = request.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if authorization != format!("Bearer {BROKER_TOKEN}") {
        return kube_store::full(403, json!({"kind": "Status", "code": 403, "message": "forbidden"}));
    }
    let body: Value = serde_json::from_slice(request.body()).unwrap_or(Value::Null);
    store.lock().unwrap().handle(request.method().as_str(), request.uri().path(), request.uri().query(), &body)
}

fn status(code: u16, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    reply(code, body)
}

fn reply(code: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

fn handle(request: Request<Bytes>, state: &Mutex<State>, race: &AtomicBool) -> Response<Full<Bytes>> {
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let seen = Seen {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
        authorization: header("authorization"),
        content_type: header("content-type"),
        body: serde_json::from_slice(request.body()).unwrap_or(Value::Null),
    };
    let mut state = state.lock().unwrap();
    state.seen.push(seen.clone());
    let token = seen.authorization.strip_prefix("Bearer ").unwrap_or_default().to_string();
    let segments: Vec<&str> = seen.path.trim_start_matches('/').split('/').collect();
    // TokenReview, for the broker's own token (the reviewer's identity here).
    if segments.as_slice() == ["apis", "authentication.k8s.io", "v1", "tokenreviews"] && seen.method == "POST" {
        if token != BROKER_TOKEN {
            return status(403, "Forbidden", "only the reviewer's ServiceAccount may create TokenReviews here");
        }
        let reviewed = seen.body["spec"]["token"].as_str().unwrap_or_default();
        // As the API server does: a review without audiences means its own; a token is
        // authenticated only for an audience it was issued for, which the status names
        // (k8s.io/apiserver pkg/authentication/authenticator `Audiences.Intersect`).
        let wanted: Vec<String> = match seen.body["spec"]["audiences"].as_array() {
            Some(list) if !list.is_empty() => list.iter().filter_map(|a| a.as_str().map(String::from)).collect(),
            _ => vec![API_SERVER_AUDIENCE.to_string()],
        };
        let result = match state.pod_tokens.get(reviewed) {
            Some(([namespace, account, pod_uid, node], issued_for)) => {
                let common: Vec<&String> = wanted.iter().filter(|a| issued_for.contains(a)).collect();
                if common.is_empty() {
                    json!({"authenticated": false, "error": format!(
                        "[invalid bearer token, token audiences {issued_for:?} is invalid for the target audiences {wanted:?}]")})
                } else {
                    json!({"authenticated": true, "audiences": common, "user": {
                        "username": format!("system:serviceaccount:{namespace}:{account}"),
                        "extra": {"authentication.kubernetes.io/pod-uid": [pod_uid], "authentication.kubernetes.io/node-name": [node]}}})
                }
            }
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        return reply(
            201,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {}, "spec": seen.body["spec"], "status": result}),
        );
    }
    // /api/v1/namespaces/<ns>/secrets[/<name>] and /api/v1/namespaces/<ns>/serviceaccounts/<sa>/token
    if let ["api", "v1", "namespaces", namespace, kind @ ("secrets" | "serviceaccounts"), rest @ ..] =
        segments.as_slice()
    {
        if token != BROKER_TOKEN {
            return status(403, "Forbidden", "only the broker's ServiceAccount may manage Secrets and tokens here");
        }
        return match (*kind, seen.method.as_str(), rest) {
            ("secrets", "POST", []) => {
                let name = seen.body["metadata"]["name"].as_str().unwrap_or_default().to_string();
                state.secrets.insert(name.clone(), format!("uid-{name}"));
                reply(
                    201,
                    json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "resourceVersion": "1"}}),
                )
            }
            ("secrets", "DELETE", [name]) => match state.secrets.remove(*name) {
                Some(_) => reply(
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
                ),
                None => status(404, "NotFound", "no such secret"),
            },
            ("serviceaccounts", "POST", [MISSING_SERVICE_ACCOUNT, "token"]) => {
                status(404, "NotFound", &format!("serviceaccounts \"{MISSING_SERVICE_ACCOUNT}\" not found"))
            }
            ("serviceaccounts", "POST", [service_account, "token"]) => {
                let bound = &seen.body["spec"]["boundObjectRef"];
                let secret = bound["name"].as_str().unwrap_or_default().to_string();
                if state.secrets.get(&secret).map(String::as_str) != bound["uid"].as_str() {
                    return status(400, "BadRequest", "the bound Secret does not exist with that uid");
                }
                let jti = format!("jti-{}", state.tokens.len() + 1);
                let claims = json!({"jti": jti, "sub": format!("system:serviceaccount:{namespace}:{service_account}")});
                let encode = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
                let minted = format!("{}.{}.signature", encode(&json!({"alg": "RS256"})), encode(&claims));
                state.tokens.insert(minted.clone(), secret);
                reply(
                    201,
                    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "metadata": {},
                    "spec": seen.body["spec"], "status": {"token": minted, "expirationTimestamp": "2026-11-26T23:59:59Z"}}),
                )
            }
            _ => status(404, "NotFound", "not served by the stand-in"),
        };
    }
    // Objects: only a minted token whose bound Secret still exists authenticates.
    let alive = state.tokens.get(&token).is_some_and(|secret| state.secrets.contains_key(secret));
    if !alive {
        return status(401, "Unauthorized", "the token is unknown or its bound Secret was deleted");
    }
    let scale = seen.path.ends_with("/scale");
    let path = seen.path.trim_end_matches("/scale").to_string();
    match seen.method.as_str() {
        "POST" => {
            let name = seen.body["metadata"]["name"].as_str().unwrap_or_default();
            let path = format!("{path}/{name}");
            if state.objects.contains_key(&path) {
                return status(409, "AlreadyExists", "the object already exists");
            }
            let mut object = seen.body.clone();
            object["metadata"]["resourceVersion"] = json!("1");
            state.objects.insert(path, object.clone());
            reply(201, object)
        }
        "DELETE" => {
            let Some(object) = state.objects.get(&path) else { return status(404, "NotFound", "no such object") };
            let wanted = &seen.body["preconditions"]["resourceVersion"];
            if !wanted.is_null() && wanted != &object["metadata"]["resourceVersion"] {
                return status(409, "Conflict", "the precondition on resourceVersion failed");
            }
            state.objects.remove(&path);
            reply(200, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}))
        }
        "GET" => {
            let Some(object) = state.objects.get(&path).cloned() else {
                return status(404, "NotFound", "no such object");
            };
            if race.swap(false, Ordering::SeqCst) {
                let object = state.objects.get_mut(&path).expect("present");
                object["spec"]["replicas"] = json!(99);
                bump(object);
            }
            reply(200, object)
        }
        "PATCH" => {
            let Some(object) = state.objects.get_mut(&path) else { return status(404, "NotFound", "no such object") };
            if seen.body["metadata"]["resourceVersion"] != object["metadata"]["resourceVersion"] {
                return status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version",
                );
            }
            let mut patch = seen.body.clone();
            patch["metadata"].as_object_mut().map(|m| m.remove("resourceVersion"));
            merge(object, &patch);
            bump(object);
            let object = object.clone();
            if scale {
                reply(
                    200,
                    json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": object["metadata"],
                    "spec": {"replicas": object["spec"]["replicas"]}}),
                )
            } else {
                reply(200, object)
            }
        }
        _ => status(405, "MethodNotAllowed", "not served by the stand-in"),
    }
}

fn bump(object: &mut Value) {
    let version: u64 = object["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0);
    object["metadata"]["resourceVersion"] = json!((version + 1).to_string());
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch.as_object() {
        Some(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (key, value) in fields {
                if value.is_null() {
                    target.as_object_mut().expect("object").remove(key);
                } else {
                    merge(target.as_object_mut().expect("object").entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        None => *target = patch.clone(),
    }
}

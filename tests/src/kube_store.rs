//! The stand-in API server's store for the resources a broker watches and the CLI writes:
//! list, watch (a chunked stream of JSON events, replayed from the resourceVersion the
//! client asks for), get, create, replace (with the resourceVersion precondition) and
//! delete, with field and label selectors. Like the rest of the stand-in it speaks the
//! wire format and is no Kubernetes.

use std::{collections::BTreeMap, convert::Infallible};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Response, body::Frame};
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub type Body = BoxBody<Bytes, Infallible>;

/// Collection paths, with the kind and apiVersion of their objects.
pub const SEB_REVOCATIONS: &str = "/apis/seb.io/v1alpha1/sebrevocations";
pub const SEB_POLICIES: &str = "/apis/seb.io/v1alpha1/sebpolicies";
pub const PODS: &str = "/api/v1/pods";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const SERVICES: &str = "/api/v1/namespaces/default/services";
pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

const COLLECTIONS: [(&str, &str, &str); 6] = [
    (SEB_REVOCATIONS, "SebRevocation", "seb.io/v1alpha1"),
    (SEB_POLICIES, "SebPolicy", "seb.io/v1alpha1"),
    (PODS, "Pod", "v1"),
    (NAMESPACES, "Namespace", "v1"),
    (SERVICES, "Service", "v1"),
    (ENDPOINT_SLICES, "EndpointSlice", "discovery.k8s.io/v1"),
];

struct Event {
    version: u64,
    collection: &'static str,
    kind: &'static str,
    object: Value,
}

struct Watch {
    collection: &'static str,
    selectors: Selectors,
    sender: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
pub struct Store {
    version: u64,
    objects: BTreeMap<(&'static str, String), Value>,
    events: Vec<Event>,
    watches: Vec<Watch>,
    /// Requests seen per collection, with the query (`watch=true&...`).
    pub requests: Vec<(String, String)>,
    /// Objects a GET by name answers with in place of the stored ones, by collection and
    /// name: what a GET served just before a write returns while its client goes on to
    /// see the write through a watch.
    pub stale_reads: BTreeMap<(String, String), Value>,
}

/// `fieldSelector` (`metadata.name=`, `spec.nodeName=`) and `labelSelector` (`k=v,...`).
#[derive(Clone, Default)]
struct Selectors {
    fields: Vec<(String, String)>,
    labels: Vec<(String, String)>,
}

impl Selectors {
    fn parse(query: &BTreeMap<String, String>) -> Self {
        let pairs = |name: &str| -> Vec<(String, String)> {
            query
                .get(name)
                .map(|text| {
                    text.split(',')
                        .filter_map(|pair| pair.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                })
                .unwrap_or_default()
        };
        Self { fields: pairs("fieldSelector"), labels: pairs("labelSelector") }
    }

    fn matches(&self, object: &Value) -> bool {
        self.fields.iter().all(|(path, value)| {
            let pointer = format!("/{}", path.replace('.', "/"));
            object.pointer(&pointer).and_then(Value::as_str) == Some(value)
        }) && self.labels.iter().all(|(key, value)| object["metadata"]["labels"][key].as_str() == Some(value))
    }
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_of(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

pub fn full(code: u16, body: Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

impl Store {
    /// The collection and object name a path addresses, if it is one of the store's.
    fn route(path: &str) -> Option<(&'static str, &'static str, &'static str, Option<String>)> {
        COLLECTIONS.iter().find_map(|(collection, kind, api_version)| {
            if path == *collection {
                return Some((*collection, *kind, *api_version, None));
            }
            let name = path.strip_prefix(collection)?.strip_prefix('/')?;
            (!name.contains('/')).then(|| (*collection, *kind, *api_version, Some(name.to_string())))
        })
    }

    pub fn serves(path: &str) -> bool {
        Self::route(path).is_some()
    }

    /// Create or replace an object (tests' writes); returns its new resourceVersion.
    pub fn put(&mut self, collection: &str, mut object: Value) -> String {
        let (collection, kind, api_version, _) = Self::route(collection).expect("a served collection");
        let name = object["metadata"]["name"].as_str().expect("metadata.name").to_string();
        let event = if self.objects.contains_key(&(collection, name.clone())) { "MODIFIED" } else { "ADDED" };
        object["kind"] = json!(kind);
        object["apiVersion"] = json!(api_version);
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{kind}-{name}"));
        }
        self.commit(collection, event, name, object)
    }

    pub fn delete(&mut self, collection: &str, name: &str) {
        let (collection, ..) = Self::route(collection).expect("a served collection");
        if let Some(mut object) = self.objects.remove(&(collection, name.to_string())) {
            // As the API server does: the deleted object carries the deletion's version.
            self.version += 1;
            object["metadata"]["resourceVersion"] = json!(self.version.to_string());
            self.publish(collection, "DELETED", object);
        }
    }

    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        let (collection, ..) = Self::route(collection)?;
        self.objects.get(&(collection, name.to_string())).cloned()
    }

    /// End every watch: what a restarting API server does to its clients.
    pub fn drop_watches(&mut self) {
        self.watches.clear();
    }

    /// End every watch with `410 Gone` (its resourceVersion too old): the client must
    /// list again.
    pub fn expire_watches(&mut self) {
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Expired", "code": 410, "message": "too old resource version"}});
        let line = Bytes::from(gone.to_string() + "\n");
        for watch in self.watches.drain(..) {
            let _ = watch.sender.send(line.clone());
        }
    }

    fn commit(&mut self, collection: &'static str, event: &'static str, name: String, mut object: Value) -> String {
        self.version += 1;
        let version = self.version.to_string();
        object["metadata"]["resourceVersion"] = json!(version);
        self.objects.insert((collection, name), object.clone());
        self.publish(collection, event, object);
        version
    }

    fn publish(&mut self, collection: &'static str, kind: &'static str, object: Value) {
        let line = Bytes::from(json!({"type": kind, "object": object}).to_string() + "\n");
        self.watches.retain(|watch| {
            watch.collection != collection
                || !watch.selectors.matches(&object)
                || watch.sender.send(line.clone()).is_ok()
        });
        self.events.push(Event { version: self.version, collection, kind, object });
    }

    /// Serve a request for one of the store's paths.
    pub fn handle(&mut self, method: &str, path: &str, query: Option<&str>, body: &Value) -> Response<Body> {
        let Some((collection, kind, api_version, name)) = Self::route(path) else {
            return status(404, "NotFound", "not served by the stand-in");
        };
        self.requests.push((collection.to_string(), query.unwrap_or_default().to_string()));
        let query = query_of(query);
        let selectors = Selectors::parse(&query);
        match (method, name) {
            ("GET", None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
                let (sender, receiver) = mpsc::unbounded_channel();
                for event in self.events.iter().filter(|e| e.version > since && e.collection == collection) {
                    if selectors.matches(&event.object) {
                        let line = json!({"type": event.kind, "object": event.object}).to_string() + "\n";
                        let _ = sender.send(Bytes::from(line));
                    }
                }
                self.watches.push(Watch { collection, selectors, sender });
                let stream = futures::stream::unfold(receiver, |mut receiver| async move {
                    let line = receiver.recv().await?;
                    Some((Ok::<_, Infallible>(Frame::data(line)), receiver))
                });
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(stream).boxed())
                    .expect("response")
            }
            ("GET", None) => {
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((c, _), object)| *c == collection && selectors.matches(object))
                    .map(|(_, object)| object.clone())
                    .collect();
                full(
                    200,
                    json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                           "metadata": {"resourceVersion": self.version.to_string()}, "items": items}),
                )
            }
            ("GET", Some(name)) => match self
                .stale_reads
                .get(&(collection.to_string(), name.clone()))
                .or_else(|| self.objects.get(&(collection, name)))
            {
                Some(object) => full(200, object.clone()),
                None => status(404, "NotFound", &format!("{kind} not found")),
            },
            ("POST", None) => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
                if self.objects.contains_key(&(collection, name.clone())) {
                    return status(409, "AlreadyExists", &format!("{kind} {name} already exists"));
                }
                let version = self.put(collection, body.clone());
                let mut object = self.get(collection, &name).expect("just stored");
                object["metadata"]["resourceVersion"] = json!(version);
                full(201, object)
            }
            ("PUT", Some(name)) => {
                let Some(current) = self.objects.get(&(collection, name.clone())) else {
                    return status(404, "NotFound", &format!("{kind} not found"));
                };
                if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return status(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version",
                    );
                }
                self.put(collection, body.clone());
                full(200, self.get(collection, &name).expect("just stored"))
            }
            ("DELETE", Some(name)) => {
                self.delete(collection, &name);
                full(
                    200,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
                )
            }
            _ => status(405, "MethodNotAllowed", "not served by the stand-in"),
        }
    }
}

//! One execution at a time per target on this broker. Two certificates certified
//! against the same state and proposed at once would otherwise both pass the drift
//! check, and the second write would land on the first's result. Held from the drift
//! read to the outcome, the second proposal reads the first's result and is refused as
//! `drift`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::cert::{MutationRequest, Provider};

/// The targets being executed, each with its lock; an entry lives while anyone holds
/// or waits for it, so the map is bounded by the proposals in flight.
#[derive(Default)]
pub struct TargetLocks {
    targets: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

/// A held target: dropped when the outcome is known. Also a waiter's (its wait may be
/// cancelled): either way its entry goes when nobody else needs it.
pub struct TargetHeld<'a> {
    locks: &'a TargetLocks,
    key: String,
    lock: Option<Arc<AsyncMutex<()>>>,
    guard: Option<OwnedMutexGuard<()>>,
    waited: bool,
}

impl TargetLocks {
    /// Wait until no other execution on `request`'s target runs on this broker.
    pub async fn hold(&self, request: &MutationRequest) -> TargetHeld<'_> {
        let key = lock_key(request);
        let lock = {
            let mut targets = self.targets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            targets.entry(key.clone()).or_default().clone()
        };
        let mut held = TargetHeld { locks: self, key, lock: Some(lock.clone()), guard: None, waited: false };
        held.guard = Some(match lock.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                held.waited = true;
                lock.lock_owned().await
            }
        });
        held
    }

    /// Targets with a holder or a waiter.
    pub fn in_use(&self) -> usize {
        self.targets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }
}

impl TargetHeld<'_> {
    /// Another execution held the target first: what was read before may be old.
    pub fn waited(&self) -> bool {
        self.waited
    }
}

impl Drop for TargetHeld<'_> {
    fn drop(&mut self) {
        let mut targets = self.locks.targets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        drop(self.guard.take());
        drop(self.lock.take());
        // The map's and nobody else's: no holder, no waiter (waiters clone under this lock).
        if targets.get(&self.key).is_some_and(|lock| Arc::strong_count(lock) == 1) {
            targets.remove(&self.key);
        }
    }
}

/// One key per resource, erring towards sharing: ARNs compared without case, Kubernetes
/// objects by group, kind, namespace and name (not version: an object is served at
/// each of its versions), a URL by its host (an address by its value), port and path
/// (not its query), so spellings of one resource wait for each other. Sharing a key
/// only serialises more.
fn lock_key(request: &MutationRequest) -> String {
    let target = request.target.to_ascii_lowercase();
    let resource = match request.provider {
        Provider::Http => http_resource(&target),
        Provider::Kubernetes => kubernetes_object(&request.target).unwrap_or(target),
        Provider::Aws => target,
    };
    format!("{}:{resource}", request.provider.as_str())
}

fn http_resource(url: &str) -> String {
    let Ok(uri) = url.parse::<http::Uri>() else { return url.to_owned() };
    let host = uri.host().unwrap_or_default().trim_end_matches('.');
    let host = match host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
        Ok(address) => address.to_canonical().to_string(),
        Err(_) => host.to_owned(),
    };
    let port = uri.port_u16().unwrap_or(443);
    let path = uri.path().trim_end_matches('/');
    format!("{host}:{port}{path}")
}

/// `group/kind/namespace/name`, without case; core Events are also `events.k8s.io` ones.
fn kubernetes_object(target: &str) -> Option<String> {
    let object = super::kubernetes::KubeTarget::parse(target).ok()?;
    let kind = object.gvk.kind.to_ascii_lowercase();
    let group = match object.gvk.group.as_str() {
        "events.k8s.io" if kind == "event" => "",
        group => group,
    };
    Some(format!("{group}/{kind}/{}/{}", object.namespace, object.name).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn request(provider: Provider, target: &str) -> MutationRequest {
        MutationRequest { provider, operation: "PUT".into(), target: target.into(), params: serde_json::Value::Null }
    }

    #[test]
    fn spellings_of_one_resource_share_a_key() {
        let key = |target| lock_key(&request(Provider::Http, target));
        assert_eq!(key("https://API.example:443/v1/items/7"), key("https://api.example/v1/items/7?x=1"));
        assert_eq!(key("https://api.example./v1/items/7/"), key("https://api.example/v1/items/7"));
        assert_ne!(key("https://api.example/v1/items/7"), key("https://api.example/v1/items/8"));
        assert_ne!(key("https://api.example:8443/v1/items/7"), key("https://api.example/v1/items/7"));
        let arn = |target| lock_key(&request(Provider::Aws, target));
        assert_eq!(arn("arn:aws:s3:::Bucket/Key"), arn("arn:aws:s3:::bucket/key"));
        assert_ne!(arn("arn:aws:s3:::bucket/key"), lock_key(&request(Provider::Http, "arn:aws:s3:::bucket/key")));
        assert_eq!(key("https://[::1]/v1/x"), key("https://[0:0:0:0:0:0:0:1]/v1/x"));
        let object = |target| lock_key(&request(Provider::Kubernetes, target));
        assert_eq!(
            object("autoscaling/v1/HorizontalPodAutoscaler/prod/web"),
            object("autoscaling/v2/HorizontalPodAutoscaler/prod/web")
        );
        assert_eq!(object("v1/Event/prod/e1"), object("events.k8s.io/v1/Event/prod/e1"));
        assert_ne!(object("v1/ConfigMap/prod/a"), object("v1/ConfigMap/prod/b"));
    }

    #[tokio::test]
    async fn a_second_execution_on_a_target_waits_for_the_first() {
        let locks = TargetLocks::default();
        let target = request(Provider::Aws, "arn:aws:s3:::bucket/key");
        let first = locks.hold(&target).await;
        assert!(!first.waited());
        let waiting = tokio::time::timeout(Duration::from_millis(50), locks.hold(&target)).await;
        assert!(waiting.is_err(), "a second holder got the target while the first held it");
        let other = tokio::time::timeout(
            Duration::from_millis(50),
            locks.hold(&request(Provider::Aws, "arn:aws:s3:::bucket/other")),
        )
        .await;
        assert!(other.is_ok(), "another target waited");
        drop(other);
        drop(first);
        let second = tokio::time::timeout(Duration::from_millis(50), locks.hold(&target)).await;
        assert!(second.is_ok(), "the target stayed held after its holder left");
        // One that had to wait says so (what it read before may be old).
        let mut third = Box::pin(locks.hold(&target));
        assert!(futures::poll!(&mut third).is_pending());
        drop(second);
        let third = third.await;
        assert!(third.waited());
        let cancelled = tokio::time::timeout(Duration::from_millis(50), locks.hold(&target)).await;
        assert!(cancelled.is_err());
        drop(third);
        assert_eq!(locks.in_use(), 0, "entries outlive their holders or cancelled waiters");
        // A waiter dropped after its holder left, before it ran again.
        let first = locks.hold(&target).await;
        let mut waiter = Box::pin(locks.hold(&target));
        assert!(futures::poll!(&mut waiter).is_pending());
        drop(first);
        drop(waiter);
        assert_eq!(locks.in_use(), 0, "a cancelled waiter's entry outlived it");
    }
}

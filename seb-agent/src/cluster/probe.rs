//! The probe: both followed objects read every third of the staleness bound, so a quiet
//! cluster still counts as heard from, and a watch that stalled without an error is
//! caught up. What it reads goes through the same ordered path as the watcher's events
//! ([`super::order`]): a GET answered before the watcher applied a newer version is
//! never applied after it.

use std::time::Duration;

use kube::{Api, Client};
use tokio::sync::watch as signal;
use tracing::warn;

use super::{
    config::ClusterConfig,
    crd::{SebPolicy, SebRevocation},
    freshness::Resource,
    order::{Observed, Outcome, Source},
    sync::ClusterSync,
};

pub async fn run(client: Client, config: ClusterConfig, sync: ClusterSync, mut shutdown: signal::Receiver<bool>) {
    let interval = (config.staleness() / 3).max(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let revocation = Api::<SebRevocation>::all(client.clone()).get_opt(&config.revocation).await;
        let policy = Api::<SebPolicy>::all(client.clone()).get_opt(&config.policy).await;
        match (revocation, policy) {
            (Ok(revocation), Ok(policy)) => {
                // Only an object read is a read of it: a deleted one must not stay
                // "current" here while a stalled watcher never reports its deletion.
                if revocation.is_some() {
                    sync.freshness().read(Resource::Revocation);
                }
                if policy.is_some() {
                    sync.freshness().read(Resource::Policy);
                }
                // A missing object is the watcher's to report: a 404 carries no version to
                // order it against what the watcher has seen.
                if let Some(object) = revocation {
                    report(
                        "SebRevocation",
                        &sync,
                        sync.offer_revocation(Source::Probe, Observed::Present(object)).await,
                    );
                }
                if let Some(object) = policy {
                    report("SebPolicy", &sync, sync.offer_policy(Source::Probe, Observed::Present(object)).await);
                }
            }
            (Err(e), _) | (_, Err(e)) => sync.error("probe", &anyhow::Error::new(e)),
        }
        // Pods whose cgroups the kubelet has made since they were listed.
        if let Err(e) = sync.pods_changed() {
            sync.error("Pod", &e);
        }
    }
}

fn report(kind: &str, sync: &ClusterSync, outcome: anyhow::Result<Outcome>) {
    match outcome {
        Ok(Outcome::Applied) => warn!(kind, "the probe applied a version the watcher had not delivered"),
        Ok(Outcome::Stale | Outcome::Gone) => {}
        Err(e) => sync.error(kind, &e),
    }
}

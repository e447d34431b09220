//! Protected host names (`sts.amazonaws.com`): resolved, and resolved again when their
//! records expire. An address stays protected until the last answer that named it has
//! expired (a client may still hold it in its cache), and a failed lookup keeps every
//! address protected (fail closed) and is retried soon.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfigGroup, ResolverConfig},
    name_server::TokioConnectionProvider,
};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use super::{EndpointSource, SharedEnforcer};
use crate::config::{Endpoint, Protocol};

/// Bounds on the refresh interval, whatever the TTLs say.
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(300);
const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProtectedHost {
    /// A DNS name, e.g. `sts.amazonaws.com`.
    pub host: String,
    /// A destination port; omitted means every port.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

/// The addresses of one host name, each with the time it may be dropped.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HostAddresses {
    until: BTreeMap<IpAddr, Instant>,
}

impl HostAddresses {
    /// A fresh answer: its addresses are kept until it expires; older ones until theirs.
    pub fn answer(&mut self, addresses: impl IntoIterator<Item = IpAddr>, valid_until: Instant, now: Instant) {
        for address in addresses {
            let until = self.until.entry(address).or_insert(valid_until);
            *until = (*until).max(valid_until);
        }
        self.until.retain(|_, until| *until > now);
    }

    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.until.keys().copied()
    }
}

/// A resolver: the system's (`/etc/resolv.conf`), or the given name server.
pub fn resolver(name_server: Option<SocketAddr>) -> Result<TokioResolver> {
    let builder = match name_server {
        Some(addr) => {
            let servers = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                TokioConnectionProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()?,
    };
    Ok(builder.build())
}

/// Resolve every host, publish the endpoints, and repeat as the records expire.
pub async fn follow(
    hosts: Vec<ProtectedHost>,
    resolver: TokioResolver,
    enforcer: SharedEnforcer,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut known: Vec<HostAddresses> = vec![HostAddresses::default(); hosts.len()];
    loop {
        let now = Instant::now();
        let mut next = now + MAX_REFRESH;
        for (host, addresses) in hosts.iter().zip(known.iter_mut()) {
            match resolver.lookup_ip(host.host.as_str()).await {
                Ok(lookup) => {
                    let valid_until = Instant::from_std(lookup.valid_until());
                    addresses.answer(lookup.iter(), valid_until, now);
                    next = next.min(valid_until);
                }
                Err(e) => {
                    warn!(host = %host.host, error = %e, "resolving a protected host failed; its known addresses stay protected");
                    next = next.min(now + RETRY);
                }
            }
        }
        let endpoints = endpoints(&hosts, &known);
        match tokio::task::block_in_place(|| enforcer.set_endpoints(EndpointSource::HostNames, endpoints.clone())) {
            Ok(true) => info!(addresses = endpoints.len(), "protected host names resolved"),
            Ok(false) => {}
            Err(e) => warn!(error = %format!("{e:#}"), "applying resolved host names"),
        }
        let wait = next.saturating_duration_since(Instant::now()).clamp(MIN_REFRESH, MAX_REFRESH);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn endpoints(hosts: &[ProtectedHost], known: &[HostAddresses]) -> Vec<Endpoint> {
    hosts
        .iter()
        .zip(known)
        .flat_map(|(host, addresses)| {
            addresses.addresses().map(|address| Endpoint {
                net: address.into(),
                port: host.port,
                protocol: host.protocol,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_outlives_the_answers_that_named_it_only_until_they_expire() {
        let start = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let mut addresses = HostAddresses::default();
        addresses.answer([a], start + Duration::from_secs(60), start);
        // The name moved to b; a may still be cached by clients for up to 60 s.
        addresses.answer([b], start + Duration::from_secs(90), start + Duration::from_secs(30));
        assert_eq!(addresses.addresses().collect::<Vec<_>>(), [a, b]);
        addresses.answer([b], start + Duration::from_secs(150), start + Duration::from_secs(61));
        assert_eq!(addresses.addresses().collect::<Vec<_>>(), [b]);
    }
}

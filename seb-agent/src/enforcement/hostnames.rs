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
    /// Answered in both families at least once.
    resolved: bool,
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

/// A resolver: the system's (`/etc/resolv.conf`), or the given name server. It keeps
/// no cache of its own: each refresh asks again, and the TTL it is told sets the next.
pub fn resolver(name_server: Option<SocketAddr>) -> Result<TokioResolver> {
    let mut builder = match name_server {
        Some(addr) => {
            let servers = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                TokioConnectionProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()?,
    };
    builder.options_mut().cache_size = 0;
    Ok(builder.build())
}

/// The host names and what is known of their addresses.
pub struct Hosts {
    hosts: Vec<ProtectedHost>,
    known: Vec<HostAddresses>,
}

impl Hosts {
    pub fn new(hosts: Vec<ProtectedHost>) -> Self {
        let known = vec![HostAddresses::default(); hosts.len()];
        Self { hosts, known }
    }

    /// Resolve every host once, its A and its AAAA records each (a client takes either);
    /// returns when to resolve again. A family the name has no records of is an empty
    /// answer; any other failure keeps what is known and is retried soon. Whether every
    /// host has been answered in both families at least once: see [`Self::resolved`].
    pub async fn refresh(&mut self, resolver: &TokioResolver) -> Instant {
        let now = Instant::now();
        let mut next = now + MAX_REFRESH;
        for (host, addresses) in self.hosts.iter().zip(self.known.iter_mut()) {
            let name = host.host.as_str();
            let (v4, v6) = tokio::join!(resolver.ipv4_lookup(name), resolver.ipv6_lookup(name));
            let answers = [
                v4.map(|l| (l.iter().map(|a| IpAddr::V4(a.0)).collect::<Vec<_>>(), l.valid_until())),
                v6.map(|l| (l.iter().map(|a| IpAddr::V6(a.0)).collect::<Vec<_>>(), l.valid_until())),
            ];
            let mut answered = 0;
            for answer in answers {
                match answer {
                    Ok((found, valid_until)) => {
                        let valid_until = Instant::from_std(valid_until);
                        addresses.answer(found, valid_until, now);
                        next = next.min(valid_until);
                        answered += 1;
                    }
                    Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
                        addresses.answer([], now, now);
                        answered += 1;
                    }
                    Err(e) => {
                        warn!(host = %host.host, error = %e, "resolving a protected host failed; its known addresses stay protected");
                        next = next.min(now + RETRY);
                    }
                }
            }
            addresses.resolved |= answered == 2;
        }
        next.max(now + MIN_REFRESH).min(now + MAX_REFRESH)
    }

    /// Every host has been answered in both families at least once.
    pub fn resolved(&self) -> bool {
        self.known.iter().all(|addresses| addresses.resolved)
    }

    /// The protected endpoints: every known address with its host's port and protocol.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.hosts
            .iter()
            .zip(&self.known)
            .flat_map(|(host, addresses)| {
                addresses.addresses().map(|address| Endpoint {
                    net: address.into(),
                    port: host.port,
                    protocol: host.protocol,
                })
            })
            .collect()
    }
}

/// Resolve every host, publish the endpoints, and repeat as the records expire.
pub async fn follow(
    hosts: Vec<ProtectedHost>,
    resolver: TokioResolver,
    enforcer: SharedEnforcer,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut hosts = Hosts::new(hosts);
    loop {
        let next = hosts.refresh(&resolver).await;
        let endpoints = hosts.endpoints();
        // Once every name has been answered, the previous run's prefixes kept for them
        // until now may go, in the same update.
        let resolved = hosts.resolved();
        let applied = tokio::task::block_in_place(|| {
            enforcer.update(|sources| {
                sources.endpoints.insert(EndpointSource::HostNames, endpoints.clone());
                sources.hosts_pending &= !resolved;
            })
        });
        match applied {
            Ok(true) => info!(addresses = endpoints.len(), "protected host names resolved"),
            Ok(false) => {}
            Err(e) => warn!(error = %format!("{e:#}"), "applying resolved host names"),
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shutdown.changed() => return,
        }
    }
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

    /// A name server on loopback answering `sts.example.test` with the addresses and TTL
    /// the test sets, and counting the queries.
    async fn name_server(
        answer: std::sync::Arc<std::sync::Mutex<(Vec<IpAddr>, u32)>>,
    ) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use hickory_proto::{
            op::{Message, MessageType},
            rr::{
                RData, Record,
                rdata::{A, AAAA},
            },
        };
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let queries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = queries.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..len]) else { continue };
                let mut reply = Message::new();
                reply.set_id(query.id()).set_message_type(MessageType::Response).set_recursion_available(true);
                reply.add_queries(query.queries().to_vec());
                if let Some(question) = query.queries().first() {
                    let (addresses, ttl) = answer.lock().unwrap().clone();
                    for address in addresses {
                        let rdata = match (question.query_type(), address) {
                            (hickory_proto::rr::RecordType::A, IpAddr::V4(v4)) => RData::A(A(v4)),
                            (hickory_proto::rr::RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
                            _ => continue,
                        };
                        reply.add_answer(Record::from_rdata(question.name().clone(), ttl, rdata));
                    }
                    if question.query_type() == hickory_proto::rr::RecordType::A {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                let _ = socket.send_to(&reply.to_vec().unwrap(), peer).await;
            }
        });
        (addr, queries)
    }

    #[tokio::test]
    async fn a_host_is_resolved_again_when_its_record_expires_and_old_addresses_outlive_their_answer() {
        let answer = std::sync::Arc::new(std::sync::Mutex::new((vec!["192.0.2.7".parse().unwrap()], 2)));
        let (server, queries) = name_server(answer.clone()).await;
        let resolver = resolver(Some(server)).unwrap();
        let host = ProtectedHost { host: "sts.example.test".into(), port: Some(443), protocol: Protocol::Tcp };
        let mut hosts = Hosts::new(vec![host]);
        let started = Instant::now();
        let next = hosts.refresh(&resolver).await;
        let first = hosts.endpoints();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].net.to_string(), "192.0.2.7/32");
        assert!(hosts.resolved(), "no AAAA records is an answer");
        assert_eq!((first[0].port, first[0].protocol), (Some(443), Protocol::Tcp));
        let wait = next.duration_since(started);
        assert!(
            wait >= Duration::from_millis(1500) && wait <= Duration::from_millis(2500),
            "the TTL sets the refresh: {wait:?}"
        );

        // The name moves within the TTL: the old address stays until its answer expires.
        *answer.lock().unwrap() = (vec!["192.0.2.8".parse().unwrap()], 60);
        hosts.refresh(&resolver).await;
        let both: Vec<String> = hosts.endpoints().iter().map(|e| e.net.to_string()).collect();
        assert_eq!(both, ["192.0.2.7/32", "192.0.2.8/32"]);
        tokio::time::sleep_until(next + Duration::from_millis(100)).await;
        hosts.refresh(&resolver).await;
        let moved: Vec<String> = hosts.endpoints().iter().map(|e| e.net.to_string()).collect();
        assert_eq!(moved, ["192.0.2.8/32"]);
        assert!(queries.load(std::sync::atomic::Ordering::SeqCst) >= 3, "each refresh asked the server");
    }

    /// A dual-stack name: its AAAA addresses are protected as well as its A ones. Before
    /// (found by review), only the A answer was asked for, and a client reached the
    /// service over IPv6.
    #[tokio::test]
    async fn a_dual_stack_hosts_ipv6_addresses_are_protected_too() {
        let answer = std::sync::Arc::new(std::sync::Mutex::new((
            vec!["192.0.2.7".parse().unwrap(), "2001:db8::7".parse().unwrap()],
            60,
        )));
        let (server, _) = name_server(answer).await;
        let resolver = resolver(Some(server)).unwrap();
        let host = ProtectedHost { host: "sts.example.test".into(), port: Some(443), protocol: Protocol::Tcp };
        let mut hosts = Hosts::new(vec![host]);
        assert!(!hosts.resolved());
        hosts.refresh(&resolver).await;
        let nets: Vec<String> = hosts.endpoints().iter().map(|e| e.net.to_string()).collect();
        assert_eq!(nets, ["192.0.2.7/32", "2001:db8::7/128"]);
        assert!(hosts.resolved());
    }
}

//! The API server's own addresses, protected without configuration: the `kubernetes`
//! Service's ClusterIP (what in-cluster clients dial) and the addresses in its
//! EndpointSlices (what a pod could dial directly, bypassing the Service).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::config::{Endpoint, Protocol};

/// The namespace and name of the API server's Service, and the label its slices carry.
pub const NAMESPACE: &str = "default";
pub const SERVICE: &str = "kubernetes";
pub const SLICE_LABEL: &str = "kubernetes.io/service-name=kubernetes";

fn protocol(name: Option<&str>) -> Protocol {
    match name {
        Some("UDP") => Protocol::Udp,
        // TCP is the API's default; SCTP and unknown ones protect every protocol.
        None | Some("TCP") => Protocol::Tcp,
        Some(_) => Protocol::Any,
    }
}

fn endpoint(addr: IpAddr, port: Option<i32>, protocol: Protocol) -> Endpoint {
    let port = port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0);
    // A rule without a port protects every port of every protocol.
    let protocol = if port.is_some() { protocol } else { Protocol::Any };
    Endpoint { net: addr.into(), port, protocol }
}

/// Each ClusterIP of the Service, with each of its ports.
pub fn service_endpoints(service: &Service) -> Vec<Endpoint> {
    let Some(spec) = &service.spec else { return Vec::new() };
    let ips = spec.cluster_ips.clone().unwrap_or_else(|| spec.cluster_ip.iter().cloned().collect());
    let ports = spec.ports.clone().unwrap_or_default();
    ips.iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .flat_map(|addr| {
            let ports: Vec<Endpoint> =
                ports.iter().map(|p| endpoint(addr, Some(p.port), protocol(p.protocol.as_deref()))).collect();
            if ports.is_empty() { vec![endpoint(addr, None, Protocol::Any)] } else { ports }
        })
        .collect()
}

/// Each address of the slice, with each of its ports.
pub fn slice_endpoints(slice: &EndpointSlice) -> Vec<Endpoint> {
    let ports = slice.ports.clone().unwrap_or_default();
    slice
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.iter())
        .filter_map(|address| address.parse::<IpAddr>().ok())
        .flat_map(|addr| {
            let ports: Vec<Endpoint> =
                ports.iter().map(|p| endpoint(addr, p.port, protocol(p.protocol.as_deref()))).collect();
            if ports.is_empty() { vec![endpoint(addr, None, Protocol::Any)] } else { ports }
        })
        .collect()
}

/// The discovered addresses, by the object they came from.
#[derive(Debug, Default)]
pub struct ApiServerAddresses {
    by_object: BTreeMap<String, Vec<Endpoint>>,
}

impl ApiServerAddresses {
    pub fn set(&mut self, object: String, endpoints: Vec<Endpoint>) {
        self.by_object.insert(object, endpoints);
    }
    pub fn remove(&mut self, object: &str) {
        self.by_object.remove(object);
    }
    /// Replace every object of one kind (`service/` or `slice/` prefix) after a relist.
    pub fn replace(&mut self, prefix: &str, objects: Vec<(String, Vec<Endpoint>)>) {
        self.by_object.retain(|name, _| !name.starts_with(prefix));
        self.by_object.extend(objects);
    }
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut all: Vec<Endpoint> = self.by_object.values().flatten().copied().collect();
        all.sort_by_key(|e| (e.net, e.port, e.protocol));
        all.dedup();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_and_its_slices_give_every_address_and_port() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00:10:96::1"],
                     "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["172.18.0.2"]}, {"addresses": ["172.18.0.3"]}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]
        }))
        .unwrap();
        let mut addresses = ApiServerAddresses::default();
        addresses.set("service/kubernetes".into(), service_endpoints(&service));
        addresses.set("slice/kubernetes".into(), slice_endpoints(&slice));
        let text: Vec<String> =
            addresses.endpoints().iter().map(|e| format!("{} {:?} {:?}", e.net, e.port, e.protocol)).collect();
        assert_eq!(
            text,
            [
                "10.96.0.1/32 Some(443) Tcp",
                "172.18.0.2/32 Some(6443) Tcp",
                "172.18.0.3/32 Some(6443) Tcp",
                "fd00:10:96::1/128 Some(443) Tcp",
            ]
        );
        addresses.replace("slice/", Vec::new());
        assert_eq!(addresses.endpoints().len(), 2, "a relist without slices drops their addresses");
    }
}

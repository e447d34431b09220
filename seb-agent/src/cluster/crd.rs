//! The custom resources: `SebPolicy` (the active policy epoch, protected endpoints,
//! enforcement scope and exemptions) and `SebRevocation` (the revocation epoch, revoked
//! serials and contract ids). Both are cluster-scoped. The YAML under `deploy/` is
//! generated from these types (`seb-agent crds`), and CI checks that it still matches.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The cluster's admission and enforcement policy.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(group = "seb.io", version = "v1alpha1", kind = "SebPolicy", plural = "sebpolicies", shortname = "sebpol")]
#[kube(printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".spec.policyEpoch"}"#)]
#[serde(rename_all = "camelCase")]
pub struct SebPolicySpec {
    /// The active policy epoch; contracts certified under another one are denied.
    pub policy_epoch: u64,
    /// Production endpoints that only brokers may reach.
    #[serde(default)]
    pub protected: Vec<ProtectedEndpointSpec>,
    /// Which workloads are enforced.
    #[serde(default)]
    pub scope: EnforcementScopeSpec,
    /// Cgroup v2 paths (relative to the cgroup2 mount) never denied: kubelet, CNI, system daemons.
    #[serde(default)]
    pub exempt_cgroups: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtectedEndpointSpec {
    /// An address or CIDR, IPv4 or IPv6.
    pub cidr: String,
    /// A destination port; omitted means every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `tcp`, `udp` or `any` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnforcementScopeSpec {
    /// Cgroup v2 subtrees enforced on every node (`/` is the whole node).
    #[serde(default)]
    pub cgroups: Vec<String>,
    /// Pods with all these labels are enforced.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub pod_selector: std::collections::BTreeMap<String, String>,
    /// Pods in namespaces with all these labels are enforced.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub namespace_selector: std::collections::BTreeMap<String, String>,
}

/// The cluster's revocation state.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(group = "seb.io", version = "v1alpha1", kind = "SebRevocation", plural = "sebrevocations", shortname = "sebrev")]
#[kube(printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".spec.revocationEpoch"}"#)]
#[serde(rename_all = "camelCase")]
pub struct SebRevocationSpec {
    /// The active revocation epoch: only moves forward.
    pub revocation_epoch: u64,
    /// Revoked certificate serials (hex).
    #[serde(default)]
    pub serials: Vec<String>,
    /// Revoked contract ids.
    #[serde(default)]
    pub contract_ids: Vec<String>,
}

/// Both CRDs, as the JSON documents `deploy/` holds, by file name.
pub fn rendered() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt;
    let pretty = |crd| serde_json::to_string_pretty(&crd).expect("a CRD serialises") + "\n";
    vec![("crd-sebpolicies.json", pretty(SebPolicy::crd())), ("crd-sebrevocations.json", pretty(SebRevocation::crd()))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crds_are_cluster_scoped_and_round_trip_their_specs() {
        use kube::CustomResourceExt;
        let crd = SebPolicy::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.plural, "sebpolicies");
        let policy = SebPolicy::new(
            "default",
            SebPolicySpec {
                policy_epoch: 7,
                protected: vec![ProtectedEndpointSpec {
                    cidr: "10.96.0.1/32".into(),
                    port: Some(443),
                    protocol: Some("tcp".into()),
                }],
                ..Default::default()
            },
        );
        let json = serde_json::to_value(&policy).unwrap();
        assert_eq!(json["spec"]["policyEpoch"], 7);
        assert_eq!(json["apiVersion"], "seb.io/v1alpha1");
        let back: SebPolicy = serde_json::from_value(json).unwrap();
        assert_eq!(back.spec, policy.spec);
        assert_eq!(SebRevocation::crd().spec.scope, "Cluster");
    }
}

//! Cluster mode: an agent also presents its pod's ServiceAccount token, and the API
//! server's TokenReview says whose it is. Only a token bound to a pod is accepted: its
//! review names the pod's UID and node, which the certificate then binds.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use kube::{Api, Client, api::PostParams};

use super::identity::Agent;
use crate::kubelet_cgroups::pod_uid_of_caller;

const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const SA_PREFIX: &str = "system:serviceaccount:";
/// Longest token sent for review.
pub const MAX_TOKEN: usize = 16 * 1024;

/// What a review established about a token's holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub service_account: String,
    pub pod_uid: String,
    pub node: String,
}

impl PodIdentity {
    /// The agent the client certificate names, bound to this pod: the certificate's node
    /// must be the pod's, and its cgroup one of the pod's (else one pod's token would
    /// have another pod's certificate judged, and logged, as its ServiceAccount).
    pub fn bind(self, mut agent: Agent) -> Result<Agent, Mismatch> {
        if agent.node != self.node {
            return Err(Mismatch::Node(format!(
                "the client certificate is for node {}, the ServiceAccount token's pod runs on {}",
                agent.node, self.node
            )));
        }
        if pod_uid_of_caller(&agent.cgroup).as_deref() != Some(self.pod_uid.as_str()) {
            return Err(Mismatch::Pod(format!(
                "the client certificate's cgroup {} is not in the ServiceAccount token's pod {}",
                agent.cgroup, self.pod_uid
            )));
        }
        agent.pod_uid = Some(self.pod_uid);
        agent.service_account = Some(self.service_account);
        agent.namespace = Some(self.namespace);
        Ok(agent)
    }
}

/// Why a token and a client certificate do not name one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Node(String),
    Pod(String),
}

pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
}

impl TokenReviewer {
    pub fn new(client: Client, audience: &str) -> Self {
        Self { api: Api::all(client), audience: audience.into() }
    }

    /// Review `token`; anything but an authenticated, pod-bound ServiceAccount token is refused.
    pub async fn review(&self, token: &str) -> Result<PodIdentity> {
        if token.is_empty() || token.len() > MAX_TOKEN {
            bail!("the bearer token is empty or longer than {MAX_TOKEN} bytes");
        }
        let audiences = Some(vec![self.audience.clone()]);
        let review =
            TokenReview { spec: TokenReviewSpec { token: Some(token.into()), audiences }, ..Default::default() };
        let reviewed = self.api.create(&PostParams::default(), &review).await.context("TokenReview")?;
        let status = reviewed.status.context("the TokenReview has no status")?;
        if status.authenticated != Some(true) {
            bail!("the token is not authenticated: {}", status.error.unwrap_or_else(|| "no reason given".into()));
        }
        // A reviewer that sets spec.audiences must find one of them in status.audiences,
        // else the authenticator ignored them (k8s.io/api authentication/v1
        // `TokenReviewStatus.Audiences`).
        if !status.audiences.as_ref().is_some_and(|found| found.contains(&self.audience)) {
            bail!("the token is not issued for the audience `{}` (a projected token for the SAB is)", self.audience);
        }
        identity_of(&status.user.unwrap_or_default())
    }
}

/// The pod identity in a review's user: `system:serviceaccount:<ns>:<sa>`, with the pod's
/// UID and node in `extra`.
pub fn identity_of(user: &UserInfo) -> Result<PodIdentity> {
    let username = user.username.as_deref().unwrap_or_default();
    let Some((namespace, account)) = username.strip_prefix(SA_PREFIX).and_then(|rest| rest.split_once(':')) else {
        bail!("`{username}` is not a ServiceAccount");
    };
    let extra = user.extra.clone().unwrap_or_default();
    let one = |key: &str, extra: &BTreeMap<String, Vec<String>>| -> Result<String> {
        match extra.get(key).map(Vec::as_slice) {
            Some([value]) if !value.is_empty() => Ok(value.clone()),
            _ => bail!("the token is not bound to a pod (no single {key} in its review)"),
        }
    };
    Ok(PodIdentity {
        namespace: namespace.into(),
        service_account: account.into(),
        pod_uid: one(POD_UID, &extra)?,
        node: one(NODE_NAME, &extra)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(username: &str, extra: &[(&str, &str)]) -> UserInfo {
        UserInfo {
            username: Some(username.into()),
            extra: Some(extra.iter().map(|(k, v)| (k.to_string(), vec![v.to_string()])).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn only_pod_bound_service_account_tokens_identify_an_agent() {
        let bound = user("system:serviceaccount:agents:planner", &[(POD_UID, "p-1"), (NODE_NAME, "node-a")]);
        let identity = identity_of(&bound).unwrap();
        assert_eq!((identity.namespace.as_str(), identity.pod_uid.as_str()), ("agents", "p-1"));
        let unbound = user("system:serviceaccount:agents:planner", &[]);
        assert!(identity_of(&unbound).unwrap_err().to_string().contains("not bound to a pod"));
        let person = user("alice@example.com", &[(POD_UID, "p-1"), (NODE_NAME, "node-a")]);
        assert!(identity_of(&person).unwrap_err().to_string().contains("not a ServiceAccount"));
    }
}

//! Where the epochs live: the SAB reads the revocation epoch certificates must carry,
//! and makes each accepted policy load the active policy epoch, so that certificates
//! issued under older policies stop being admitted.
//!
//! Node-local: the broker's socket (`get_epochs`, and `set_epochs` as uid 0). Cluster:
//! the `SebRevocation` and `SebPolicy` every node's broker follows.

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use kube::{Api, Client};

use crate::{
    cluster::crd::{SebPolicy, SebRevocation},
    protocol::{self, Request, Response},
};

/// Where the epochs are read and written.
pub enum EpochSource {
    Broker(BrokerEpochs),
    Cluster(ClusterEpochs),
}

impl EpochSource {
    /// The revocation epoch certificates must carry.
    pub async fn revocation(&self) -> Result<u64> {
        match self {
            Self::Broker(broker) => broker.revocation().await,
            Self::Cluster(cluster) => cluster.revocation().await,
        }
    }

    /// The policy epoch in force.
    pub async fn policy(&self) -> Result<Option<u64>> {
        match self {
            Self::Broker(broker) => broker.policy().await,
            Self::Cluster(cluster) => cluster.policy().await,
        }
    }

    /// Make `epoch` the policy epoch in force.
    pub async fn publish(&self, epoch: u64) -> Result<()> {
        match self {
            Self::Broker(broker) => broker.publish(epoch).await,
            Self::Cluster(cluster) => cluster.publish(epoch).await,
        }
    }
}

pub struct ClusterEpochs {
    client: Client,
    policy: String,
    revocation: String,
    cached: Mutex<Option<(Instant, u64)>>,
}

impl ClusterEpochs {
    pub fn new(client: Client, policy: String, revocation: String) -> Self {
        Self { client, policy, revocation, cached: Mutex::new(None) }
    }

    async fn revocation(&self) -> Result<u64> {
        if let Some((at, epoch)) = *self.cached.lock().expect("not poisoned")
            && at.elapsed() < REVOCATION_CACHE
        {
            return Ok(epoch);
        }
        let api = Api::<SebRevocation>::all(self.client.clone());
        let Some(object) = api.get_opt(&self.revocation).await? else {
            bail!("SebRevocation {} does not exist (seb-agent epoch --cluster --revocation N)", self.revocation);
        };
        let epoch = object.spec.revocation_epoch;
        *self.cached.lock().expect("not poisoned") = Some((Instant::now(), epoch));
        Ok(epoch)
    }

    async fn policy(&self) -> Result<Option<u64>> {
        let api = Api::<SebPolicy>::all(self.client.clone());
        Ok(api.get_opt(&self.policy).await?.map(|object| object.spec.policy_epoch))
    }

    async fn publish(&self, epoch: u64) -> Result<()> {
        crate::cluster::writes::set_policy_epoch(self.client.clone(), &self.policy, epoch).await.map(|_| ())
    }
}

/// How long a revocation epoch read from the broker is used before reading it again.
const REVOCATION_CACHE: Duration = Duration::from_millis(500);

pub struct BrokerEpochs {
    socket: PathBuf,
    revocation: Mutex<Option<(Instant, u64)>>,
}

impl BrokerEpochs {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket, revocation: Mutex::new(None) }
    }

    async fn call(&self, request: Request) -> Result<crate::admission::state::Epochs> {
        let call = protocol::call(&self.socket, &request);
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Err(_) => bail!("the broker at {} did not answer within 5 s", self.socket.display()),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Response::Epochs(epochs))) => Ok(epochs),
            Ok(Ok(Response::Error { code, message })) => bail!("the broker refused ({code:?}): {message}"),
            Ok(Ok(other)) => bail!("the broker answered {other:?}"),
        }
    }

    /// The broker's revocation epoch (read at most every 500 ms). Unset is an error:
    /// the broker would refuse every certificate.
    pub async fn revocation(&self) -> Result<u64> {
        if let Some((at, epoch)) = *self.revocation.lock().expect("not poisoned")
            && at.elapsed() < REVOCATION_CACHE
        {
            return Ok(epoch);
        }
        let Some(epoch) = self.call(Request::GetEpochs).await?.revocation else {
            bail!("the broker has no revocation epoch yet (seb-agent epoch --revocation N)");
        };
        *self.revocation.lock().expect("not poisoned") = Some((Instant::now(), epoch));
        Ok(epoch)
    }

    /// The broker's active policy epoch.
    pub async fn policy(&self) -> Result<Option<u64>> {
        Ok(self.call(Request::GetEpochs).await?.policy)
    }

    /// Make `epoch` the broker's active policy epoch.
    pub async fn publish(&self, epoch: u64) -> Result<()> {
        let epochs = self.call(Request::SetEpochs { policy: Some(epoch), revocation: None }).await?;
        if epochs.policy != Some(epoch) {
            bail!("the broker's policy epoch is {:?} after setting {epoch}", epochs.policy);
        }
        Ok(())
    }
}

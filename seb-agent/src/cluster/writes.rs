//! Writes to the cluster's `SebRevocation` and `SebPolicy`, which every node's broker
//! watches (for `seb-agent revoke --cluster`, `seb-agent epoch --cluster` and the SAB's
//! policy epoch). Every write replaces the object at the resourceVersion it read, so
//! concurrent writers never lose an entry.

use std::fmt::Debug;

use anyhow::{Context, Result, bail};
use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, PostParams},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    admission::state::{self, RevocationTarget},
    cluster::{
        crd::{SebPolicy, SebRevocation, SebRevocationSpec},
        sync::WRITTEN_AT,
    },
};

const ATTEMPTS: usize = 5;

/// What a cluster write left in place.
#[derive(Debug, Serialize)]
pub struct Written {
    pub kind: &'static str,
    pub name: String,
    pub resource_version: Option<String>,
    pub policy_epoch: Option<u64>,
    pub revocation_epoch: Option<u64>,
    pub serials: usize,
    pub contract_ids: usize,
}

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind, self.name)?;
        if let Some(version) = &self.resource_version {
            write!(f, " (resourceVersion {version})")?;
        }
        if let Some(epoch) = self.policy_epoch {
            write!(f, ": policy epoch {epoch}")?;
        }
        if let Some(epoch) = self.revocation_epoch {
            write!(
                f,
                ": revocation epoch {epoch}, {} serials and {} contract ids revoked",
                self.serials, self.contract_ids
            )?;
        }
        Ok(())
    }
}

fn stamp(metadata: &mut ObjectMeta) {
    let now = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    metadata.annotations.get_or_insert_with(Default::default).insert(WRITTEN_AT.into(), now);
}

fn written_revocation(object: &SebRevocation) -> Written {
    Written {
        kind: "SebRevocation",
        name: object.name_any(),
        resource_version: object.resource_version(),
        policy_epoch: None,
        revocation_epoch: Some(object.spec.revocation_epoch),
        serials: object.spec.serials.len(),
        contract_ids: object.spec.contract_ids.len(),
    }
}

/// Read, change, write back at the version read (create if absent); again on a conflict.
async fn write<K>(api: &Api<K>, name: &str, change: impl Fn(Option<K>) -> Result<K>) -> Result<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Serialize + Debug,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    for _ in 0..ATTEMPTS {
        let current = api.get_opt(name).await.with_context(|| format!("reading {kind} {name}"))?;
        let exists = current.is_some();
        let mut object = change(current)?;
        stamp(object.meta_mut());
        let result = if exists {
            api.replace(name, &PostParams::default(), &object).await
        } else {
            api.create(&PostParams::default(), &object).await
        };
        match result {
            Ok(object) => return Ok(object),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(e).with_context(|| format!("writing {kind} {name}")),
        }
    }
    bail!("{kind} {name} kept changing under this write ({ATTEMPTS} attempts)")
}

/// Add a serial or contract id to the `SebRevocation`.
pub async fn revoke(client: Client, name: &str, target: RevocationTarget, value: &str) -> Result<Written> {
    let value = state::normalise(target, value)?;
    let object = write(&Api::<SebRevocation>::all(client), name, |current| {
        let Some(mut object) = current else {
            bail!(
                "SebRevocation {name} does not exist; create it first with `seb-agent epoch --cluster --revocation <N>`"
            );
        };
        let list = match target {
            RevocationTarget::Serial => &mut object.spec.serials,
            RevocationTarget::ContractId => &mut object.spec.contract_ids,
        };
        if !list.contains(&value) {
            list.push(value.clone());
        }
        Ok(object)
    })
    .await?;
    Ok(written_revocation(&object))
}

/// Past what a contract carries, every broker would refuse the epoch, and (epochs only
/// moving forward) it could not be set back.
fn within_a_contract(name: &str, epoch: u64) -> Result<()> {
    let max = crate::cert::ijson::MAX_SAFE_INTEGER;
    anyhow::ensure!(epoch <= max, "the {name} epoch {epoch} is beyond what a contract can carry ({max})");
    Ok(())
}

/// Set the revocation epoch (it only moves forward), creating the object if needed.
pub async fn set_revocation_epoch(client: Client, name: &str, epoch: u64) -> Result<Written> {
    within_a_contract("revocation", epoch)?;
    let object = write(&Api::<SebRevocation>::all(client), name, |current| match current {
        Some(object) if epoch < object.spec.revocation_epoch => bail!(
            "the revocation epoch only moves forward: SebRevocation {name} is at {}, {epoch} was asked",
            object.spec.revocation_epoch
        ),
        Some(mut object) => {
            object.spec.revocation_epoch = epoch;
            Ok(object)
        }
        None => Ok(SebRevocation::new(name, SebRevocationSpec { revocation_epoch: epoch, ..Default::default() })),
    })
    .await?;
    Ok(written_revocation(&object))
}

/// Set the policy epoch of the existing SebPolicy. Never created here: one made with no
/// endpoints, scope or exemptions would lift every node's protection as the newest policy.
pub async fn set_policy_epoch(client: Client, name: &str, epoch: u64) -> Result<Written> {
    within_a_contract("policy", epoch)?;
    let object = write(&Api::<SebPolicy>::all(client), name, |current| match current {
        // Every broker refuses a policy whose epoch went back: one mistake would fail
        // every node closed.
        Some(object) if epoch < object.spec.policy_epoch => bail!(
            "the policy epoch only moves forward: SebPolicy {name} is at {}, {epoch} was asked",
            object.spec.policy_epoch
        ),
        Some(mut object) => {
            object.spec.policy_epoch = epoch;
            Ok(object)
        }
        None => bail!(
            "SebPolicy {name} does not exist: create it with its endpoints and scope (deploy/cluster-state) \
             before epochs are set in it; an empty one would protect nothing"
        ),
    })
    .await?;
    Ok(Written {
        kind: "SebPolicy",
        name: object.name_any(),
        resource_version: object.resource_version(),
        policy_epoch: Some(object.spec.policy_epoch),
        revocation_epoch: None,
        serials: 0,
        contract_ids: 0,
    })
}

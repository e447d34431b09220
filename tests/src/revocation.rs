//! The broker's own pieces, in this process, for showing and timing what a
//! `SebRevocation` does on a node: the kernel programs attached to a sandbox cgroup this
//! process moves into, the broker-socket registry, the ledger, admission and the
//! cluster sync the watchers feed. Only one rig per process: it moves the whole process.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use seb_agent::{
    admission::{
        Admission, Caller, Proposal,
        state::{self},
    },
    audit::Ledger,
    cert::{MutationRequest, TrustAnchors, ValidityPolicy, contract::ScopedIdentity, dev_sab},
    cgroupfs,
    cluster::{
        crd::{SebRevocation, SebRevocationSpec},
        directory::SharedDirectory,
        freshness::Freshness,
        sync::ClusterSync,
    },
    config::{Endpoint, Protocol},
    enforcement::{
        BrokerSockets, EndpointSource, Enforcer, PinLayout, SharedEnforcer, Sources, broker_sockets::ExecutionTag,
        maps::Counters,
    },
    metrics::Metrics,
};

use crate::{
    Sandbox, Tools,
    broker::{certified, this_process},
};

/// The protected endpoint the rig's connections go to (a listener in the sandbox).
pub const ENDPOINT: &str = "127.0.0.91:443";

pub struct Rig {
    pub sandbox: Sandbox,
    pub sync: ClusterSync,
    pub sockets: BrokerSockets,
    pub ledger: Ledger,
    pub admission: Arc<Admission>,
    pub ca: dev_sab::CaFiles,
    /// What arrived at [`ENDPOINT`], per connection.
    endpoint: Option<crate::TcpRecorder>,
    counters: Counters,
    home: PathBuf,
}

/// The cgroup v2 directory this process is in.
fn own_cgroup(mount: &Path) -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let relative = text.lines().find_map(|line| line.strip_prefix("0::")).context("no cgroup v2 line")?;
    Ok(cgroupfs::resolve(mount, relative))
}

fn move_to(cgroup: &Path) -> Result<()> {
    fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving this process to {}", cgroup.display()))
}

impl Rig {
    pub fn new(label: &str, tools: Tools) -> Result<Self> {
        let sandbox = Sandbox::new(label, tools)?;
        let endpoint = Some(sandbox.record_tcp(ENDPOINT.parse()?)?);
        let mount = cgroupfs::cgroup2_mount()?;
        let layout = PinLayout::new(&sandbox.pin_path);
        let mut enforcer = Enforcer::load(layout.clone(), mount.clone(), seb_common::MAX_SCOPED_TASKS)?;
        let sources = Sources {
            endpoints: [(
                EndpointSource::Config,
                vec![Endpoint { net: "127.0.0.91/32".parse()?, port: Some(443), protocol: Protocol::Tcp }],
            )]
            .into(),
            scope: [sandbox.cgroup_relative.clone()].into(),
            // This process plays the broker in `<root>/broker`. Exempt, so entering it
            // does not make this process one the scope follows (it leaves again at the
            // end); the egress program still drops the packets of a cut connection.
            exempt: [format!("{}/broker", sandbox.cgroup_relative)].into(),
            ..Default::default()
        };
        enforcer.apply(&sources)?;
        let counters = Counters::take(enforcer.ebpf_mut())?;
        let enforcer = SharedEnforcer::new(enforcer, sources);
        let sockets = BrokerSockets::open(&layout)?;
        let (ledger, _thread) = sandbox.start_ledger()?;
        ledger.run_blocking(|batch| state::set_epochs(batch, Some(1), Some(1)))?;
        let ca = dev_sab::create_ca(&sandbox.dir.join("sab"), "seb rig SAB", dev_sab::Algorithm::Ed25519)?;
        let anchors = TrustAnchors::from_pem(&fs::read_to_string(&ca.cert)?)?;
        let validity = ValidityPolicy { max_ttl: Duration::from_secs(3600), clock_skew: Duration::from_secs(30) };
        let sync = ClusterSync::new(
            ledger.clone(),
            enforcer,
            sockets.clone(),
            Freshness::new(Duration::from_secs(3600)),
            Arc::new(Metrics::new()),
            SharedDirectory::default(),
            || None,
        );
        // Sockets this process creates from now on are made inside the scope.
        let home = own_cgroup(&mount)?;
        move_to(&sandbox.cgroup.join("broker"))?;
        Ok(Self {
            sandbox,
            sync,
            sockets,
            ledger,
            admission: Arc::new(Admission::new(Some(anchors), validity)),
            ca,
            endpoint,
            counters,
            home,
        })
    }

    /// What each connection to [`ENDPOINT`] delivered, in the order they were accepted;
    /// the endpoint stops listening.
    pub fn received(&mut self) -> Vec<Vec<u8>> {
        self.endpoint.take().map(crate::TcpRecorder::stop).unwrap_or_default()
    }

    /// Kernel denials so far (every hook, this rig's programs).
    pub fn kernel_denials(&self) -> Result<u64> {
        Ok(self.counters.read()?.denials)
    }

    /// What a decision for `contract_id` carries while it executes.
    pub fn tag(decision: &str, serial: &str, contract_id: &str, revocation_epoch: u64) -> ExecutionTag {
        ExecutionTag {
            decision_id: decision.into(),
            serial: serial.into(),
            contract_id: contract_id.into(),
            policy_epoch: 1,
            revocation_epoch,
        }
    }

    /// A fresh certificate for `contract_id` (epochs 1/1) as this process, and its proposal.
    pub fn proposal(&self, contract_id: &str) -> Result<Proposal> {
        let request: MutationRequest = serde_json::from_value(serde_json::json!({
            "provider": "aws", "operation": "s3:PutObject", "target": "arn:aws:s3:::rig/key"
        }))?;
        let role = ScopedIdentity::AwsRole { role_arn: "arn:aws:iam::123456789012:role/rig".into() };
        let contract = certified(contract_id, this_process(), &request, "sha256:none", role);
        let certificate = dev_sab::issue(&self.ca, &contract, &Default::default())?;
        Ok(Proposal { certificate, request })
    }

    /// This process, as the broker identifies a caller.
    pub fn caller() -> Result<Caller> {
        Caller::identify(nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw(), std::process::id() as i32)
    }

    /// The object a cluster's administrator writes to revoke `contract_ids`.
    pub fn revocation(epoch: u64, contract_ids: &[&str]) -> SebRevocation {
        let mut object = SebRevocation::new(
            "default",
            SebRevocationSpec {
                revocation_epoch: epoch,
                contract_ids: contract_ids.iter().map(|id| id.to_string()).collect(),
                ..Default::default()
            },
        );
        object.metadata.resource_version = Some(format!("{epoch}"));
        object
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Back home first, so the sandbox's cgroups can be removed.
        let _ = move_to(&self.home);
    }
}

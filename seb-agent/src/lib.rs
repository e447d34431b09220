//! seb node broker: the agent daemon's library.

pub mod admission;
pub mod agent;
pub mod audit;
pub mod bpffs;
pub mod cert;
pub mod cgroupfs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod denial_budget;
pub mod denial_metric;
pub mod denials;
pub mod enforcement;
pub mod execute;
pub mod kube_api;
pub mod mcp;
pub mod metrics;
pub mod preflight;
pub mod propose;
pub mod protocol;
pub mod record_budget;
pub mod recorder;
pub mod sab;
pub mod server;
pub mod tamper;
pub mod tracefs;

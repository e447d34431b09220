//! Cluster mode: the custom resources a cluster's brokers share.

pub mod crd;
pub mod pods;

//! Cluster mode: the custom resources a cluster's brokers share, watched from the API
//! server and applied to this node's admission state and kernel maps.

pub mod config;
pub mod crd;
pub mod directory;
pub mod discovery;
pub mod freshness;
pub mod order;
pub mod pods;
pub mod probe;
pub mod sync;
pub mod watch;
pub mod writes;

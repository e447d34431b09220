//! Cluster mode: the custom resources a cluster's brokers share, watched from the API
//! server and applied to this node's admission state and kernel maps.

pub mod crd;
pub mod directory;
pub mod discovery;
pub mod freshness;
pub mod pods;
pub mod sync;
pub mod watch;

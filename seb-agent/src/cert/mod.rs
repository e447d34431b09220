//! SAB certificates: the execution contract they bind, verification, and a dev SAB.

pub mod ca;
pub mod contract;
pub mod dev_sab;
pub mod extensions;
pub mod ijson;
pub mod path;
pub mod profile;
pub mod verify;

pub use contract::{ExecutionContract, MutationRequest, Provider};
pub use verify::{Rejection, TrustAnchors, ValidityPolicy, Verified};

//! The kernel enforcement layer, user side: programs, maps and broker registrations.

mod agent_cgroup;
pub mod broker_sockets;
pub mod compat_syscalls;
mod device_link;
pub mod enforcer;
pub mod hostnames;
pub mod integrity;
mod kernel_btf;
pub mod link_info;
pub mod loader;
pub mod local;
pub mod maps;
mod packet_devices;
pub mod policy;
pub mod processes;
mod scope_walk;

pub use broker_sockets::BrokerSockets;
pub use enforcer::{EndpointSource, Enforcer, SharedEnforcer, Sources};
pub use kernel_btf::{judges_fixed_file_writes, judges_uring_sockets};
pub use loader::{LinkOrigin, LinkState, PinLayout};

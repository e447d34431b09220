//! The kernel enforcement layer, user side: programs, maps and broker registrations.

pub mod broker_sockets;
pub mod loader;
pub mod maps;
pub mod policy;

pub use broker_sockets::BrokerSockets;
pub use loader::{LinkOrigin, LinkState, PinLayout};

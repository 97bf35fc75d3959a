//! Procurator's control plane: the gRPC server agents dial into, the state
//! store and the event log that `procurator-ctl watch` follows. The binary
//! (`main.rs`) parses flags and runs [`server::run`]; the checks of what
//! peers send ([`received`], [`rollout`]) are public for the fuzz targets.

mod acceptor;
mod agent_service;
mod api_error;
mod connections;
mod deployment_service;
mod dispatcher;
pub mod enrollment;
mod fanout;
mod liveness;
mod machine_history;
mod metrics;
pub mod open_files;
mod placement;
pub mod received;
mod require_certificate;
mod revocations;
pub mod rollout;
pub mod server;
mod server_tls;
pub mod store;
mod trust_service;
mod watch;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod test_support;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that cannot set up should panic
mod tests;

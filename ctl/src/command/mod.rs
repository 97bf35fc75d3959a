//! One module per subcommand: an `Args` struct (its help is the doc
//! comments) and a `run`.

pub mod artifact;
pub mod cancel;
pub mod ci;
pub mod completions;
pub mod config;
pub mod dashboard;
pub mod deployments;
pub mod logs;
pub mod machine;
pub mod pki;
pub mod plan;
pub mod publish;
pub mod rollback;
pub mod sign;
pub mod status;
pub mod submit;
pub mod trust;
pub mod validate;
pub mod watch;

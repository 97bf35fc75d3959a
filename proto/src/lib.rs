//! Procurator's wire protocol, generated from `proto/procurator/v1/*.proto`.
//!
//! Nothing here is hand-written except small conversions in sibling modules
//! and the codec the generated services use ([`codec::SmallBufferCodec`]).

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("procurator.v1");

    /// The encoded `FileDescriptorSet` for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("procurator_descriptor");
}

pub mod codec;
mod display;

/// Metadata of a `Watch` refused with OUT_OF_RANGE: the revision from which
/// the event log can still be followed (see `deployment.proto`).
pub const RESUME_REVISION_METADATA: &str = "procurator-resume-revision";

//! Compiles `proto/procurator/v1/*.proto` with the pure-Rust `protox`, so no
//! system `protoc` is needed, and writes the descriptor set that server
//! reflection serves.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/");
    let files = [
        "proto/procurator/v1/agent.proto",
        "proto/procurator/v1/deployment.proto",
        "proto/procurator/v1/trust.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("procurator_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // `AgentService.Connect` would clash with the generated
        // `Client::connect(dst)`; clients are built from a `Channel` instead.
        .build_transport(false)
        // prost's codec with 1 KiB stream buffers instead of 8 KiB (src/codec.rs).
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(descriptors)?;
    Ok(())
}

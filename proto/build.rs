//! Compiles the .proto contracts with the vendored protoc (no system protoc needed) and writes
//! one file descriptor set per package, for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for (proto, descriptor) in [
        ("strata/v1/strata.proto", "strata_v1_descriptor.bin"),
        (
            "strata/worker/v1/worker.proto",
            "strata_worker_v1_descriptor.bin",
        ),
    ] {
        let mut config = tonic_prost_build::Config::new();
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
        tonic_prost_build::configure()
            .file_descriptor_set_path(out.join(descriptor))
            .compile_with_config(config, &[proto], &["."])?;
    }
    Ok(())
}

//! Compiles `proto/*.proto` with prost. `protox` parses the files in pure
//! Rust, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/client.proto",
        "proto/bite.proto",
        "proto/store.proto",
        "proto/cluster.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}

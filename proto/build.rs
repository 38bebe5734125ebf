//! Compiles federation.proto with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=federation.proto");
    let descriptors = protox::compile(["federation.proto"], ["."])?;
    // Chunk payloads as `Bytes`: decoded as a slice of the receive buffer, not copied out of it.
    tonic_prost_build::configure()
        .bytes(".mjpfl.v1.TensorChunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}

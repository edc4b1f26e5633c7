// Generates the gRPC code with protox (a protobuf compiler in Rust), so building needs no protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/pdfleet.proto");
    let fds = protox::compile(["proto/pdfleet.proto"], ["proto"])?;
    tonic_prost_build::compile_fds(fds)?;
    Ok(())
}

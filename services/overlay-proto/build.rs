fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = "../../proto";
    let files = [
        "../../proto/overlay/v1/bootstrap.proto",
        "../../proto/overlay/v1/overlay.proto",
        "../../proto/overlay/v1/session.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure().compile_protos(&files, &[dir])?;
    Ok(())
}

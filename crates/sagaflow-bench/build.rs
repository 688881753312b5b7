//! Compiles the booking API and the mock upstreams' protos (client side) with protox: no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["../../examples/booking/proto/booking.proto", "../../examples/booking/proto/upstream.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["../../examples/booking/proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(fds)?;
    Ok(())
}

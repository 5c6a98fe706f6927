//! With the `tunnel` feature, generates the hub–fleet tunnel's gRPC client and server from the
//! committed proto with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "tunnel")]
    {
        println!("cargo:rerun-if-changed=proto/tunnel.proto");
        let descriptors = protox::compile(["proto/tunnel.proto"], ["proto"])?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(descriptors)?;
    }
    Ok(())
}

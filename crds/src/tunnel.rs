//! The hub–fleet tunnel (`proto/tunnel.proto`): how a buyer on the hub reaches the Ray head of a
//! cluster that runs in a fleet, though the hub has no route into the fleet. Both ends pipe a
//! TCP connection through a Relay call with [`pipe`].

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The gRPC API (client and server), generated from `proto/tunnel.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod api {
    tonic::include_proto!("gpumarket.tunnel.v1");
}

pub use api::{Chunk, Hello, Open};

/// Bytes per chunk: a read's worth, well under gRPC's 4 MiB message limit.
const CHUNK_BYTES: usize = 32 * 1024;

/// Copies `socket` to the Relay call both ways until both directions end: what the socket
/// sends goes out through `outbound` (each chunk wrapped by `wrap`: the server's stream carries
/// `Result`s, the client's plain chunks), what comes in is written to the socket. A side that
/// closes its half closes the other's: the socket's end of input ends the outbound stream, the
/// inbound stream's end shuts the socket's write half.
pub async fn pipe<T>(
    socket: TcpStream,
    mut inbound: tonic::Streaming<Chunk>,
    outbound: mpsc::Sender<T>,
    wrap: fn(Chunk) -> T,
) {
    let (mut read, mut write) = socket.into_split();
    let up = async move {
        let mut buffer = vec![0; CHUNK_BYTES];
        while let Ok(n) = read.read(&mut buffer).await {
            let chunk = Chunk { id: String::new(), data: buffer[..n].to_vec() };
            if n == 0 || outbound.send(wrap(chunk)).await.is_err() {
                break;
            }
        }
    };
    let down = async move {
        while let Ok(Some(chunk)) = inbound.message().await {
            if write.write_all(&chunk.data).await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    };
    tokio::join!(up, down);
}

//! A TCP relay in front of a local server: one a test can cut and restore, to make a server
//! unreachable for a while without stopping it (e.g. the validator's RPC port), or one that
//! lets the real node's pods reach a server that listens on loopback only (see
//! [`crate::real_node::RealNode::expose`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// Forwards connections to `target` while open; stops with the value.
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listen on a free loopback port, open.
    pub async fn start(target: SocketAddr) -> Result<Relay> {
        Relay::listen(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// Listen on `address` (port 0: a free one), open.
    pub async fn listen(address: SocketAddr, target: SocketAddr) -> Result<Relay> {
        let listener = TcpListener::bind(address).await?;
        let addr = listener.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = {
            let (open, connections) = (open.clone(), connections.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection closed
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    lock(&connections).push(relay.abort_handle());
                }
            })
        };
        Ok(Relay { addr, open, connections, accept })
    }

    /// Drop every connection and refuse new ones until [`Relay::restore`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for connection in lock(&self.connections).drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

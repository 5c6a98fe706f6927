//! Free loopback ports, so that several environments (parallel test binaries, `up`) coexist.

use std::net::{TcpListener, UdpSocket};

use anyhow::{Context, Result, bail};

/// `n` distinct TCP ports that are free on 127.0.0.1 right now. All listeners are held until
/// every port is chosen, so the same port is never handed out twice.
pub fn free_tcp_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding a free loopback port")?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// A block of `len` consecutive ports, free for TCP and UDP on all interfaces, outside
/// 8000-10000 (the Solana validator's reserved ports) and outside the kernel's ephemeral range
/// (where other tests' `free_tcp_ports` draw from). Used for the validator's gossip/TPU/TVU
/// sockets and its RPC (+1 for PubSub).
pub fn free_port_block(len: u16) -> Result<u16> {
    // Start at a point that differs per process, so parallel environments rarely collide.
    let start = 20_000 + (std::process::id() % 200) as u16 * 50;
    let mut base = start;
    for _ in 0..400 {
        if (base..base + len).all(port_is_free) {
            return Ok(base);
        }
        base = if base + 2 * len >= 32_000 { 20_000 } else { base + len };
    }
    bail!("no block of {len} free ports between 20000 and 32000 (starting at {start})")
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("0.0.0.0", port)).is_ok() && UdpSocket::bind(("0.0.0.0", port)).is_ok()
}

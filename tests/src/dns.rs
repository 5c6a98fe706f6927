//! A minimal DNS client (one A query over UDP), enough to check what the real node's cluster DNS
//! answers, from the host or, through `gpumarket-env resolve` under `nsenter --net`, from a
//! pod's network namespace.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const HEADER_LEN: usize = 12;

/// The IPv4 addresses `server` answers for `name` (empty for NXDOMAIN).
pub fn resolve_a(server: SocketAddr, name: &str, timeout: Duration) -> Result<Vec<Ipv4Addr>> {
    let id = (std::process::id() & 0xffff) as u16;
    let socket = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket")?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(&query_a(id, name)?, server).with_context(|| format!("sending to {server}"))?;
    let mut buf = [0u8; 1500];
    let (len, _) =
        socket.recv_from(&mut buf).with_context(|| format!("no answer from {server}"))?;
    parse_a_answers(id, &buf[..len])
}

/// A recursive A/IN query for `name` with message id `id`.
pub fn query_a(id: u16, name: &str) -> Result<Vec<u8>> {
    let mut msg = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    msg.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.trim_end_matches('.').split('.') {
        ensure!(
            !label.is_empty() && label.len() < 64,
            "bad DNS name {name:?}: empty label or one over 63 bytes"
        );
        msg.push(label.len() as u8);
        msg.extend_from_slice(label.as_bytes());
    }
    msg.push(0);
    msg.extend_from_slice(&TYPE_A.to_be_bytes());
    msg.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(msg)
}

/// The A records of a response to the query with id `id`.
pub fn parse_a_answers(id: u16, msg: &[u8]) -> Result<Vec<Ipv4Addr>> {
    ensure!(msg.len() >= HEADER_LEN, "DNS response of {} bytes is too short", msg.len());
    let u16_at = |at: usize| -> Result<u16> {
        let bytes = msg.get(at..at + 2).context("DNS response truncated")?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    };
    ensure!(u16_at(0)? == id, "DNS response to another query (id {})", u16_at(0)?);
    let flags = u16_at(2)?;
    ensure!(flags & 0x8000 != 0, "not a DNS response");
    match flags & 0x000f {
        0 => {}
        3 => return Ok(Vec::new()),
        rcode => bail!("DNS error response (rcode {rcode})"),
    }
    let (questions, answers) = (u16_at(4)?, u16_at(6)?);
    let mut at = HEADER_LEN;
    for _ in 0..questions {
        at = skip_name(msg, at)? + 4;
    }
    let mut addresses = Vec::new();
    for _ in 0..answers {
        at = skip_name(msg, at)?;
        let (kind, class, len) = (u16_at(at)?, u16_at(at + 2)?, usize::from(u16_at(at + 8)?));
        let data = msg.get(at + 10..at + 10 + len).context("DNS response truncated")?;
        if kind == TYPE_A && class == CLASS_IN && len == 4 {
            addresses.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    Ok(addresses)
}

/// The offset after the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Result<usize> {
    loop {
        let len = *msg.get(at).context("DNS response truncated in a name")?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => return Ok(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A response to `query_a(7, "web.ns.svc.cluster.local")` with a CNAME-like record to skip
    /// and one A record whose name is a compression pointer to the question.
    fn response(rcode: u8) -> Vec<u8> {
        let mut msg = query_a(7, "web.ns.svc.cluster.local").unwrap();
        msg[2] = 0x81;
        msg[3] = 0x80 | rcode;
        msg[7] = 2; // two answers
        msg.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 5, 0, 2, 0xc0, 12]);
        msg.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 96, 0, 17]);
        msg
    }

    #[test]
    fn query_encodes_labels_and_a_question() {
        let msg = query_a(0x1234, "a.bc.").unwrap();
        assert_eq!(msg[..2], [0x12, 0x34]);
        assert_eq!(msg[HEADER_LEN..], [1, b'a', 2, b'b', b'c', 0, 0, 1, 0, 1]);
        assert!(query_a(1, "a..b").is_err());
        assert!(query_a(1, &"x".repeat(64)).is_err());
    }

    #[test]
    fn parses_a_records_and_skips_others() {
        assert_eq!(parse_a_answers(7, &response(0)).unwrap(), vec![Ipv4Addr::new(10, 96, 0, 17)]);
    }

    #[test]
    fn nxdomain_is_no_address_and_other_errors_fail() {
        assert!(parse_a_answers(7, &response(3)).unwrap().is_empty());
        assert!(parse_a_answers(7, &response(2)).is_err());
        assert!(parse_a_answers(8, &response(0)).is_err(), "another query's answer");
        assert!(parse_a_answers(7, &response(0)[..40]).is_err(), "truncated");
    }
}

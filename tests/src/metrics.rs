//! Reading a controller's Prometheus endpoint.

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `/metrics` text served on 127.0.0.1:`port`.
pub async fn scrape(port: u16) -> Result<String> {
    get(port, "/metrics").await
}

/// Whether the controller serving on 127.0.0.1:`port` says it is ready (`/readyz` is 200).
pub async fn ready(port: u16) -> bool {
    let response = get(port, "/readyz").await.unwrap_or_default();
    response.split_whitespace().nth(1) == Some("200")
}

/// The whole HTTP/1.0 response to GET `path`.
async fn get(port: u16, path: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to the metrics port {port}"))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

/// The value of one sample (`name` with its labels, as exposed), if there is one.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

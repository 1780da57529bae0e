//! The server's version, read from the `version` server property of AMQP's
//! `connection.start`.
//!
//! lapin 4 does not expose the server properties it receives, so after a
//! connection is made we open a second, short-lived socket to the same node
//! (through TLS when configured), send the protocol header and read only the
//! `connection.start` frame the server sends before any authentication; then we
//! drop the socket. It costs one round trip per (re)connection and needs no
//! credentials. A node that does not answer in time yields `None` (the
//! validation then applies the rules of RabbitMQ before 4.0). The price: the
//! broker logs one warning per (re)connection for the probe socket ("client
//! unexpectedly closed TCP connection"), since AMQP has no way to leave
//! before authenticating.

use std::time::Duration;

use futures::io::{AsyncReadExt, AsyncWriteExt};
use lapin::tcp::AsyncTcpStream;
use lapin::types::{parsing::parse_field_table, AMQPValue};

use super::tls::Tls;
use crate::topology::ServerVersion;

/// AMQP 0-9-1 protocol header.
const HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";
/// connection.start is small (a few hundred bytes); anything bigger is not it.
const MAX_FRAME: usize = 64 * 1024;

/// The version string of the node at `host:port`, within `limit`.
pub(crate) async fn probe(host: &str, port: u16, tls: &Tls, limit: Duration) -> Option<String> {
    match tokio::time::timeout(limit, read_version(host, port, tls)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::debug!(host, port, error = %e, "could not read the RabbitMQ version");
            None
        }
        Err(_) => {
            tracing::debug!(
                host,
                port,
                "no connection.start in time to read the RabbitMQ version"
            );
            None
        }
    }
}

/// The parsed version of the node, if its `version` property is one.
pub(crate) async fn server_version(
    host: &str,
    port: u16,
    tls: &Tls,
    limit: Duration,
) -> Option<ServerVersion> {
    let raw = probe(host, port, tls, limit).await?;
    let v = ServerVersion::parse(&raw);
    if v.is_none() {
        tracing::debug!(host, port, version = %raw, "unrecognised RabbitMQ version");
    }
    v
}

async fn read_version(host: &str, port: u16, tls: &Tls) -> std::io::Result<Option<String>> {
    let rt = lapin::runtime::default_runtime().map_err(std::io::Error::other)?;
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{host} resolves to no address"),
    );
    for addr in tokio::net::lookup_host((host, port)).await? {
        let plain = match AsyncTcpStream::connect(&rt, addr).await {
            Ok(s) => s,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let mut s = match tls {
            Some(connector) => plain.into_rustls(connector, host).await?,
            None => plain,
        };
        s.write_all(HEADER).await?;
        s.flush().await?;
        // Frame: type (1 = method), channel (2), size (4), payload, 0xCE.
        let mut head = [0u8; 7];
        s.read_exact(&mut head).await?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        if head[0] != 1 || size > MAX_FRAME {
            return Ok(None);
        }
        let mut payload = vec![0u8; size];
        s.read_exact(&mut payload).await?;
        return Ok(version_of_start(&payload));
    }
    Err(last)
}

/// `version` from a connection.start payload: class 10, method 10, protocol
/// major and minor (one byte each), then the server-properties table.
fn version_of_start(payload: &[u8]) -> Option<String> {
    if payload.len() < 6 || payload[..4] != [0, 10, 0, 10] {
        return None;
    }
    let (_, table) = parse_field_table(&payload[6..]).ok()?;
    match table.inner().get("version")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field table as RabbitMQ writes it: u32 size, then key (short string),
    /// type `S` and a long string per entry.
    fn table(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in entries {
            body.push(k.len() as u8);
            body.extend_from_slice(k.as_bytes());
            body.push(b'S');
            body.extend_from_slice(&(v.len() as u32).to_be_bytes());
            body.extend_from_slice(v.as_bytes());
        }
        let mut t = (body.len() as u32).to_be_bytes().to_vec();
        t.extend(body);
        t
    }

    #[test]
    fn version_is_read_from_connection_start() {
        let mut payload = vec![0, 10, 0, 10, 0, 9];
        payload.extend(table(&[("product", "RabbitMQ"), ("version", "3.10.8")]));
        assert_eq!(version_of_start(&payload).as_deref(), Some("3.10.8"));
        let mut other = vec![0, 10, 0, 11, 0, 9];
        other.extend(table(&[("version", "3.10.8")]));
        assert_eq!(version_of_start(&other), None, "not connection.start");
        let mut none = vec![0, 10, 0, 10, 0, 9];
        none.extend(table(&[("product", "RabbitMQ")]));
        assert_eq!(version_of_start(&none), None);
        assert_eq!(version_of_start(&[1, 2]), None);
    }
}

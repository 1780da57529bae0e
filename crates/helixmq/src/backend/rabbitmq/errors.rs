//! lapin errors → helixmq [`Error`]s, and the one place that decides which
//! failures are transient (retry on a new channel or connection) and which are
//! final (a 404, 406 or 403 the caller must fix).

use lapin::ErrorKind;

use crate::error::Error;

/// AMQP reply codes helixmq tells apart.
pub(crate) mod code {
    /// Credentials or a permission refused.
    pub(crate) const ACCESS_REFUSED: u16 = 403;
    /// Queue or exchange missing.
    pub(crate) const NOT_FOUND: u16 = 404;
    /// Inequivalent arguments, unknown delivery tag, message too large.
    pub(crate) const PRECONDITION_FAILED: u16 = 406;
    /// Unknown vhost or no access to it.
    pub(crate) const NOT_ALLOWED: u16 = 530;
}

/// The AMQP reply code and text of a protocol error, if it is one.
pub(crate) fn amqp_reply(e: &lapin::Error) -> Option<(u16, String)> {
    match e.kind() {
        ErrorKind::ProtocolError(a) => Some((a.get_id(), a.get_message().as_str().to_string())),
        _ => None,
    }
}

/// Whether the failure is the connection (or channel) going away rather than
/// the broker refusing this operation: the operation may be sent again on a
/// fresh channel or connection.
pub(crate) fn is_transient(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::ProtocolError(_) => match amqp_reply(e) {
            Some((c, _)) => !matches!(
                c,
                code::ACCESS_REFUSED
                    | code::NOT_FOUND
                    | code::PRECONDITION_FAILED
                    | code::NOT_ALLOWED
            ),
            None => true,
        },
        ErrorKind::IOError(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::ChannelsLimitReached => true,
        _ => false,
    }
}

/// Box a lapin error as a cause.
pub(crate) fn boxed(e: lapin::Error) -> crate::error::BoxError {
    Box::new(e)
}

/// Map an error of the connection handshake to host `host:port`.
pub(crate) fn connect_error(
    e: lapin::Error,
    host: &str,
    port: u16,
    user: &str,
    vhost: &str,
) -> Error {
    if let ErrorKind::IOError(io) = e.kind() {
        if io.kind() == std::io::ErrorKind::ConnectionRefused {
            return Error::ConnectionRefused {
                host: host.to_string(),
                port,
                source: boxed(e),
            };
        }
    }
    match amqp_reply(&e) {
        Some((code::ACCESS_REFUSED, text)) => Error::AccessRefused {
            user: Some(user.to_string()),
            detail: format!("login refused by {host}:{port}: {text}"),
        },
        Some((code::NOT_ALLOWED, _)) => Error::VhostNotAllowed {
            vhost: vhost.to_string(),
        },
        _ => {
            let reason = match e.kind() {
                ErrorKind::IOError(io) if tls_failure(io).is_some() => {
                    let tls = tls_failure(io).expect("checked");
                    format!("TLS handshake failed: {tls}. {}", tls_hint(tls))
                }
                // RabbitMQ closes the socket without a reply when the SASL exchange fails
                // in some versions; name the likely causes.
                // Under TLS 1.3 a client certificate is checked after our side of the
                // handshake is done, so its refusal often arrives as a reset, not an alert.
                ErrorKind::IOError(io)
                    if matches!(
                        io.kind(),
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    format!("the broker closed the connection during the handshake ({e}); wrong credentials, a client certificate it does not trust (rabbitmq.tls.cert_file), TLS expected, or not an AMQP port?")
                }
                _ => e.to_string(),
            };
            Error::Connect {
                endpoint: format!("{host}:{port}"),
                reason,
                source: Some(boxed(e)),
            }
        }
    }
}

/// The rustls error inside an I/O error of the TLS handshake, if that is what it is.
fn tls_failure(io: &std::io::Error) -> Option<&rustls::Error> {
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

/// What to check for a failed TLS handshake: the bare rustls text
/// ("UnknownIssuer", "received fatal alert: UnknownCA") names no setting.
fn tls_hint(e: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer) => {
            "The broker's certificate is not signed by a CA we trust: set rabbitmq.tls.ca_file to the CA that signed it"
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "Connect with a host name the broker's certificate lists (its subjectAltName), or reissue the certificate for this name"
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. }) => {
            "The broker's certificate is expired or not yet valid: check it and this machine's clock"
        }
        E::InvalidCertificate(_) => {
            "The broker's certificate was rejected: check it and rabbitmq.tls.ca_file"
        }
        E::AlertReceived(A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::UnsupportedCertificate | A::CertificateExpired | A::AccessDenied) => {
            "The broker refused our client certificate (rabbitmq.tls.cert_file): it must be valid and signed by a CA the broker trusts (ssl_options.cacertfile)"
        }
        E::AlertReceived(A::CertificateRequired) | E::AlertReceived(A::HandshakeFailure) => {
            "The broker may require a client certificate (set rabbitmq.tls.cert_file and key_file), or no TLS version or cipher is shared"
        }
        _ => "Check the broker's TLS listener and the rabbitmq.tls settings",
    }
}

/// What an operation was acting on, for error messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    /// "queue" or "exchange".
    pub kind: &'static str,
    /// Its name.
    pub name: &'a str,
}

impl<'a> Target<'a> {
    pub(crate) fn queue(name: &'a str) -> Self {
        Target {
            kind: "queue",
            name,
        }
    }
    pub(crate) fn exchange(name: &'a str) -> Self {
        Target {
            kind: "exchange",
            name,
        }
    }
}

/// Map the failure of an operation (`doing`, e.g. "declare queue") on `target`.
pub(crate) fn op_error(e: lapin::Error, doing: &str, target: Target<'_>, user: &str) -> Error {
    match amqp_reply(&e) {
        Some((code::PRECONDITION_FAILED, text)) => Error::PreconditionFailed {
            kind: target.kind,
            name: target.name.to_string(),
            detail: precondition_detail(&text),
        },
        Some((code::NOT_FOUND, text)) => {
            // The 404 may name another object than `target` (binding to a missing exchange).
            let (kind, name) =
                named_object(&text).unwrap_or((target.kind, target.name.to_string()));
            Error::NotFound { kind, name }
        }
        Some((code::ACCESS_REFUSED, text)) => Error::AccessRefused {
            user: Some(user.to_string()),
            detail: format!("{doing} '{}': {text}", target.name),
        },
        Some((code::NOT_ALLOWED, _)) => Error::VhostNotAllowed {
            vhost: String::new(),
        },
        _ => Error::Amqp {
            context: format!("{doing} {} '{}' failed: {e}", target.kind, target.name),
            source: boxed(e),
        },
    }
}

/// The useful part of a 406 text: `PRECONDITION_FAILED - inequivalent arg
/// 'x-max-priority' for queue 'q' in vhost '/': received '5' but current is '10'`
/// → `inequivalent arg 'x-max-priority' …: received '5' but current is '10'`.
pub(crate) fn precondition_detail(text: &str) -> String {
    text.strip_prefix("PRECONDITION_FAILED - ")
        .unwrap_or(text)
        .to_string()
}

/// `("queue", name)` or `("exchange", name)` from a 404 text such as
/// `NOT_FOUND - no exchange 'x' in vhost '/'`.
pub(crate) fn named_object(text: &str) -> Option<(&'static str, String)> {
    for kind in ["queue", "exchange"] {
        let marker = format!("no {kind} '");
        if let Some(start) = text.find(&marker) {
            let rest = &text[start + marker.len()..];
            let end = rest.find("' in vhost").or_else(|| rest.find('\''))?;
            return Some((
                if kind == "queue" { "queue" } else { "exchange" },
                rest[..end].to_string(),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_parsed() {
        assert_eq!(
            named_object("NOT_FOUND - no exchange 'a.b' in vhost '/'"),
            Some(("exchange", "a.b".into()))
        );
        assert_eq!(
            named_object("NOT_FOUND - no queue 'q' in vhost 'v'"),
            Some(("queue", "q".into()))
        );
        assert_eq!(named_object("NOT_FOUND - something"), None);
        assert_eq!(
            precondition_detail(
                "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'q'"
            ),
            "inequivalent arg 'x-max-priority' for queue 'q'"
        );
    }
}

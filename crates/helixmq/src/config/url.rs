//! `RABBITMQ_URL`: AMQP URIs (`amqp://` and `amqps://`), as RabbitMQ documents them.
//!
//! `amqp[s]://user:password@host:port/vhost?heartbeat=10&connection_timeout=30000`.
//! User, password and vhost are percent-decoded (`%2F` is `/`). An empty path
//! (or a lone `/`) means the default vhost `/`. `amqps` turns TLS on and
//! defaults the port to 5671, `amqp` to 5672. Several URLs separated by
//! commas name the nodes of a cluster, tried in turn.
//!
//! Nothing here ever puts the password in an error: a URL shown back to the
//! user goes through [`redact`] first.

use percent_encoding::percent_decode_str;
use std::time::Duration;

/// One parsed AMQP URI.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct AmqpUrl {
    /// `amqps` was used.
    pub tls: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port, explicit or the scheme's default.
    pub port: u16,
    /// Decoded user, when the URL has one.
    pub username: Option<String>,
    /// Decoded password, when the URL has one. Never printed.
    pub password: Option<String>,
    /// Decoded vhost.
    pub vhost: String,
    /// `heartbeat` query parameter (seconds).
    pub heartbeat: Option<Duration>,
    /// `connection_timeout` query parameter (milliseconds).
    pub connect_timeout: Option<Duration>,
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpUrl")
            .field("tls", &self.tls)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("vhost", &self.vhost)
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// A URL with its credentials replaced by `***`, safe to print.
///
/// Works on text that may not even parse: everything between `://` and the
/// last `@` is hidden (a password may hold an unescaped `@` or `/`). Without
/// `@` only the scheme is kept, because `amqp://user:secret` (host forgotten)
/// would otherwise print the secret as a "port".
pub(super) fn redact(text: &str) -> String {
    let text = text.trim();
    match text.split_once("://") {
        Some((scheme, rest)) => match rest.rfind('@') {
            Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
            None if !rest.contains(':') || url_parses_with_port(text) => text.to_string(),
            None => format!("{scheme}://***"),
        },
        None if text.contains('@') || text.contains(':') => "***".to_string(),
        None => text.to_string(),
    }
}

fn url_parses_with_port(text: &str) -> bool {
    url::Url::parse(text)
        .map(|u| u.port().is_some() && u.username().is_empty())
        .unwrap_or(false)
}

fn decode(part: &str, what: &str) -> Result<String, String> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("the {what} is not valid UTF-8 once percent-decoded"))
}

/// Parse one AMQP URI. The error text never contains the password.
pub(super) fn parse(text: &str) -> Result<AmqpUrl, String> {
    let text = text.trim();
    let shown = redact(text);
    let usage = "expected amqp://user:password@host:port/vhost or amqps://… (percent-encode special characters in the user, password and vhost, e.g. `/` as %2F)";
    let parsed = url::Url::parse(text)
        .map_err(|e| format!("`{shown}` is not a valid URL ({e}); {usage}"))?;
    let tls = match parsed.scheme() {
        "amqp" => false,
        "amqps" => true,
        other => {
            return Err(format!(
                "`{shown}` has scheme `{other}`; only `amqp` and `amqps` are supported: {usage}"
            ))
        }
    };
    let host = match parsed.host() {
        Some(url::Host::Ipv6(addr)) => addr.to_string(),
        Some(h) => h.to_string(),
        None => String::new(),
    };
    if host.is_empty() {
        return Err(format!("`{shown}` has no host; {usage}"));
    }
    let port = parsed.port().unwrap_or(if tls { 5671 } else { 5672 });
    if port == 0 {
        return Err(format!(
            "`{shown}` has port 0; use a port between 1 and 65535 (5672 for amqp, 5671 for amqps)"
        ));
    }
    let username = match parsed.username() {
        "" => None,
        u => Some(decode(u, "user name").map_err(|e| format!("`{shown}`: {e}"))?),
    };
    let password = match parsed.password() {
        None => None,
        // Do not quote the decoding failure's input: it is the password.
        Some(p) => Some(decode(p, "password").map_err(|e| format!("`{shown}`: {e}"))?),
    };
    let path = parsed.path();
    let vhost = match path.strip_prefix('/').unwrap_or(path) {
        "" => "/".to_string(),
        v if v.contains('/') => {
            return Err(format!(
                "`{shown}`: the vhost path `{v}` has an unescaped `/`; write it as %2F (e.g. `amqp://host/%2F` for the vhost `/`)"
            ))
        }
        v => decode(v, "vhost").map_err(|e| format!("`{shown}`: {e}"))?,
    };
    let mut heartbeat = None;
    let mut connect_timeout = None;
    for (key, value) in parsed.query_pairs() {
        match key.as_ref() {
            "heartbeat" => {
                let secs: u16 = value.parse().map_err(|_| {
                    format!("`{shown}`: heartbeat=`{value}` must be a whole number of seconds between 0 and 65535")
                })?;
                heartbeat = Some(Duration::from_secs(secs.into()));
            }
            "connection_timeout" => {
                let ms: u64 = value.parse().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                    format!("`{shown}`: connection_timeout=`{value}` must be a positive number of milliseconds")
                })?;
                connect_timeout = Some(Duration::from_millis(ms));
            }
            other => {
                return Err(format!(
                    "`{shown}`: unknown query parameter `{other}`; supported: heartbeat (seconds), connection_timeout (milliseconds)"
                ))
            }
        }
    }
    if parsed.fragment().is_some() {
        return Err(format!(
            "`{shown}` has a `#` fragment: percent-encode `#` as %23"
        ));
    }
    Ok(AmqpUrl {
        tls,
        host,
        port,
        username,
        password,
        vhost,
        heartbeat,
        connect_timeout,
    })
}

/// Parse a comma-separated list of URLs; each error is prefixed with the entry's position.
pub(super) fn parse_list(text: &str) -> (Vec<AmqpUrl>, Vec<String>) {
    let mut urls = Vec::new();
    let mut errors = Vec::new();
    let entries: Vec<&str> = text.split(',').collect();
    let many = entries.len() > 1;
    for (i, entry) in entries.iter().enumerate() {
        let label = if many {
            format!("entry {} ", i + 1)
        } else {
            String::new()
        };
        if entry.trim().is_empty() {
            errors.push(format!("{label}is empty; separate URLs with single commas"));
            continue;
        }
        match parse(entry) {
            Ok(u) => urls.push(u),
            Err(e) => errors.push(format!("{label}{e}")),
        }
    }
    (urls, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url_is_decoded() {
        let u = parse("amqp://us%40er:p%40ss%3Aw%2Frd%25@rabbit.local:5673/my%2Fvhost").unwrap();
        assert!(!u.tls);
        assert_eq!(u.host, "rabbit.local");
        assert_eq!(u.port, 5673);
        assert_eq!(u.username.as_deref(), Some("us@er"));
        assert_eq!(u.password.as_deref(), Some("p@ss:w/rd%"));
        assert_eq!(u.vhost, "my/vhost");
    }

    #[test]
    fn vhost_defaults_and_escaped_slash() {
        assert_eq!(parse("amqp://h").unwrap().vhost, "/");
        assert_eq!(parse("amqp://h/").unwrap().vhost, "/");
        assert_eq!(parse("amqp://h/%2F").unwrap().vhost, "/");
        assert_eq!(parse("amqp://h/%2f").unwrap().vhost, "/");
        assert_eq!(parse("amqp://h/prod").unwrap().vhost, "prod");
    }

    #[test]
    fn scheme_decides_tls_and_default_port() {
        let u = parse("amqps://h").unwrap();
        assert!(u.tls);
        assert_eq!(u.port, 5671);
        let u = parse("amqp://h").unwrap();
        assert!(!u.tls);
        assert_eq!(u.port, 5672);
        assert_eq!(parse("amqps://h:6000").unwrap().port, 6000);
    }

    #[test]
    fn ipv6_host_loses_brackets() {
        let u = parse("amqp://[::1]:5672/").unwrap();
        assert_eq!(u.host, "::1");
    }

    #[test]
    fn query_parameters() {
        let u = parse("amqp://h/?heartbeat=5&connection_timeout=2500").unwrap();
        assert_eq!(u.heartbeat, Some(Duration::from_secs(5)));
        assert_eq!(u.connect_timeout, Some(Duration::from_millis(2500)));
        assert!(parse("amqp://h/?frame_max=1")
            .unwrap_err()
            .contains("frame_max"));
        assert!(parse("amqp://h/?heartbeat=x")
            .unwrap_err()
            .contains("heartbeat"));
    }

    #[test]
    fn bad_urls_are_refused_without_the_password() {
        for bad in [
            "http://u:hunter2@h/",
            "amqp://u:hunter2@h:99999/",
            "amqp://u:hunter2@/",
            "amqp://u:hunter2@h:0/",
            "amqp://u:hunter2@h/a/b",
            "amqp://u:hunter2@h/?x=1",
            "amqp://u:hunter2",
            "amqp://u:hun@ter2@h:abc",
            "not a url hunter2@",
            "amqp://u:hunter2@h/#frag",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(!err.contains("hunter2"), "{bad} -> {err}");
            assert!(!err.contains("ter2"), "{bad} -> {err}");
        }
    }

    #[test]
    fn wrong_scheme_is_named() {
        let err = parse("http://h/").unwrap_err();
        assert!(err.contains("`http`"), "{err}");
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("amqp://u:p@h:1/v"), "amqp://***@h:1/v");
        assert_eq!(redact("amqp://u:p@x@h/v"), "amqp://***@h/v");
        assert_eq!(redact("amqp://h:5672/v"), "amqp://h:5672/v");
        assert_eq!(redact("amqp://u:secret"), "amqp://***");
        assert_eq!(redact("amqp://h/v"), "amqp://h/v");
    }

    #[test]
    fn lists() {
        let (urls, errs) = parse_list("amqp://a:1,amqp://b:2");
        assert!(errs.is_empty());
        assert_eq!(urls.len(), 2);
        let (_, errs) = parse_list("amqp://a:1,,ftp://b");
        assert_eq!(errs.len(), 2);
        assert!(errs[0].starts_with("entry 2"));
        assert!(errs[1].starts_with("entry 3"));
    }

    #[test]
    fn debug_hides_password() {
        let u = parse("amqp://u:hunter2@h/").unwrap();
        assert!(!format!("{u:?}").contains("hunter2"));
    }
}

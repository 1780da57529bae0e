//! Who may use the console, and the CSRF check of every action.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::pages::Root;
use super::Console;
use crate::Secret;

/// Credentials the console asks for (HTTP basic authentication; a token is
/// the password, with any user name, or `Authorization: Bearer TOKEN`).
#[derive(Clone)]
pub enum Auth {
    /// A user name and password.
    Basic {
        /// User name.
        user: String,
        /// Password.
        password: Secret,
    },
    /// A shared token.
    Token(Secret),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Basic { user, .. } => {
                write!(f, "Auth::Basic {{ user: {user:?}, password: <redacted> }}")
            }
            Auth::Token(_) => f.write_str("Auth::Token(<redacted>)"),
        }
    }
}

impl Auth {
    /// `basic:USER:PASS` (the password may contain `:`).
    pub fn parse(spec: &str) -> Result<Auth, String> {
        let bad = || {
            "--auth takes basic:USER:PASSWORD (or use --auth-token-file / HELIXMQ_CONSOLE_TOKEN)"
                .to_string()
        };
        let rest = spec.strip_prefix("basic:").ok_or_else(bad)?;
        let (user, password) = rest.split_once(':').ok_or_else(bad)?;
        if user.is_empty() || password.is_empty() {
            return Err(bad());
        }
        Ok(Auth::Basic {
            user: user.to_string(),
            password: Secret::new(password.to_string()),
        })
    }

    /// Whether an `Authorization` header value carries these credentials.
    fn admits(&self, authorization: &str) -> bool {
        // Compared as digests: equal time whatever the prefix that matches.
        let same = |a: &str, b: &str| Sha256::digest(a) == Sha256::digest(b);
        if let Some(token) = authorization.strip_prefix("Bearer ") {
            return matches!(self, Auth::Token(t) if same(token.trim(), t.expose()));
        }
        let Some(b64) = authorization.strip_prefix("Basic ") else {
            return false;
        };
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
            return false;
        };
        let raw = String::from_utf8_lossy(&raw);
        let Some((u, p)) = raw.split_once(':') else {
            return false;
        };
        match self {
            Auth::Basic { user, password } => same(u, user) & same(p, password.expose()),
            Auth::Token(t) => same(p, t.expose()),
        }
    }
}

/// Ask for credentials when they are required and missing or wrong; refuse
/// every POST in read-only mode, and a POST without the page's CSRF token.
pub(crate) async fn check(State(c): State<Arc<Console>>, mut req: Request, next: Next) -> Response {
    let root = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .and_then(|o| o.path().strip_suffix(req.uri().path()).map(str::to_string))
        .unwrap_or_default();
    req.extensions_mut().insert(Root(root));
    if let Some(auth) = &c.auth {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !given.is_some_and(|g| auth.admits(g)) {
            return (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"helixmq console\", charset=\"UTF-8\"",
                )],
                "helixmq console: credentials required\n",
            )
                .into_response();
        }
    }
    if req.method() == Method::POST && c.read_only {
        return (
            StatusCode::FORBIDDEN,
            "this console runs --read-only: actions are refused\n",
        )
            .into_response();
    }
    next.run(req).await
}

/// The CSRF check of a POSTed form (its `csrf` field).
pub(crate) fn csrf_ok(c: &Console, form: &[(String, String)]) -> bool {
    form.iter()
        .any(|(k, v)| k == "csrf" && Sha256::digest(v) == Sha256::digest(&c.csrf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    }

    #[test]
    fn basic_and_token() {
        let a = Auth::parse("basic:ops:s3cr:et").unwrap();
        assert!(a.admits(&basic("ops", "s3cr:et")));
        assert!(!a.admits(&basic("ops", "wrong")));
        assert!(!a.admits(&basic("other", "s3cr:et")));
        assert!(!a.admits("Bearer s3cr:et"));
        assert!(!format!("{a:?}").contains("s3cr"));
        let t = Auth::Token(Secret::new("tok".to_string()));
        assert!(t.admits("Bearer tok"));
        assert!(t.admits(&basic("anyone", "tok")));
        assert!(!t.admits("Bearer nope"));
        assert!(Auth::parse("ops:pw").is_err());
        assert!(Auth::parse("basic:ops").is_err());
    }
}

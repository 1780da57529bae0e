//! What every page shares: the layout's data, rendering, static files, formats.

use askama::Template;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};

use super::Console;

/// The layout's data (`base.html`).
pub(crate) struct Base<'a> {
    /// Where the console is mounted (`""` at the root, `/console` when nested):
    /// every link starts with it.
    pub(crate) root: String,
    pub(crate) title: &'a str,
    /// Which nav entry is current: "overview" or "dlq".
    pub(crate) nav: &'a str,
    pub(crate) read_only: bool,
    pub(crate) csrf: &'a str,
    pub(crate) prefix: &'a str,
    /// Where the console is connected, without credentials.
    pub(crate) endpoint: String,
}

impl<'a> Base<'a> {
    pub(crate) fn new(c: &'a Console, root: &Root, title: &'a str, nav: &'a str) -> Base<'a> {
        let r = &c.broker.config().rabbitmq;
        let endpoint = match c.broker.backend_kind() {
            crate::BackendKind::RabbitMq => {
                format!("{}@{}:{} vhost {}", r.username, r.host, r.port, r.vhost)
            }
            _ => "embedded broker".to_string(),
        };
        Base {
            root: root.0.clone(),
            title,
            nav,
            read_only: c.read_only,
            csrf: &c.csrf,
            prefix: c.broker.names().prefix(),
            endpoint,
        }
    }
}

/// Where the console is mounted, found by the auth middleware from the
/// request's original URI (a request extension).
#[derive(Debug, Clone, Default)]
pub(crate) struct Root(pub(crate) String);

/// Render a template as an HTML response.
pub(crate) fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => template_error(e),
    }
}

/// A template that failed to render (a bug): 500, logged.
pub(crate) fn template_error(e: askama::Error) -> Response {
    tracing::error!(error = %e, "console template");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "template error (see the console's log)\n",
    )
        .into_response()
}

/// A page saying what went wrong and how to go on.
#[derive(Template)]
#[template(path = "error.html")]
pub(crate) struct ErrorPage<'a> {
    pub(crate) base: Base<'a>,
    pub(crate) message: String,
    pub(crate) back: String,
}

/// An error page with `status`.
pub(crate) fn error(
    c: &Console,
    root: &Root,
    status: StatusCode,
    message: String,
    back: &str,
) -> Response {
    let mut r = render(&ErrorPage {
        base: Base::new(c, root, "Error", ""),
        message,
        back: back.to_string(),
    });
    *r.status_mut() = status;
    r
}

/// `GET /static/htmx.min.js` (htmx 2.0.11, vendored: BSD-0-Clause).
pub(crate) async fn htmx() -> Response {
    static JS: &str = include_str!("static/htmx.min.js");
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        JS,
    )
        .into_response()
}

/// `GET /static/console.css`
pub(crate) async fn css() -> Response {
    static CSS: &str = include_str!("static/console.css");
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        CSS,
    )
        .into_response()
}

/// A rate as shown: `0`, `3.2`, `1,250`.
pub(crate) fn fmt_rate(r: f64) -> String {
    if r == 0.0 {
        "0".into()
    } else if r < 100.0 {
        format!("{r:.1}")
    } else {
        thousands(r.round() as u64)
    }
}

/// `1234567` → `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(fmt_rate(0.0), "0");
        assert_eq!(fmt_rate(3.25), "3.2");
        assert_eq!(fmt_rate(1250.4), "1,250");
    }
}

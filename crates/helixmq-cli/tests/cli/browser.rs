//! The browser-test kit (`helixmq_testkit::browser`) against a real headless
//! chromium, on a page of the test's own: a number the page refreshes from
//! the server every 500 ms (as the console's live parts do) and a form
//! posted back. The console's own browser tests build on what this proves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::Html;
use axum::routing::{get, post};
use axum::{Form, Router};
use helixmq_testkit::browser::{Browser, WINDOW};

/// What the page's server counts.
#[derive(Default)]
struct Counters {
    /// `GET /n`: the number the page shows, one more on every request.
    ticks: AtomicU64,
    /// `POST /greet`: forms received.
    posts: AtomicU64,
}

const PAGE: &str = r#"<!doctype html>
<html><head><title>kit page</title></head><body>
<p>Ticks: <span id="n">0</span></p>
<form method="post" action="/greet">
  <input id="name" name="name" value="placeholder">
  <button id="send" type="submit">Send</button>
</form>
<script>
  setInterval(async () => {
    const r = await fetch("/n");
    document.getElementById("n").textContent = await r.text();
  }, 500);
</script>
</body></html>"#;

async fn serve() -> (String, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/n",
            get(|State(c): State<Arc<Counters>>| async move {
                (c.ticks.fetch_add(1, Ordering::SeqCst) + 1).to_string()
            }),
        )
        .route(
            "/greet",
            post(
                |State(c): State<Arc<Counters>>, Form(form): Form<HashMap<String, String>>| async move {
                    c.posts.fetch_add(1, Ordering::SeqCst);
                    let name = form.get("name").map(String::as_str).unwrap_or_default();
                    let name = name.replace('&', "&amp;").replace('<', "&lt;");
                    Html(format!(r#"<p id="result">Hello, {name}! (POST)</p>"#))
                },
            ),
        )
        .with_state(counters.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Ends with the test's runtime.
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), counters)
}

#[tokio::test]
async fn chromium_sees_a_live_number_posts_a_form_and_takes_a_screenshot() {
    let (url, counters) = serve().await;
    let started = Instant::now();
    let browser = Browser::start().await.unwrap();
    let session = started.elapsed();
    browser.goto(&url).await.unwrap();
    let first_page = started.elapsed();
    eprintln!("chromium session in {session:?}, first page loaded after {first_page:?}");

    // Live: the number moves on while the page stays open (no reload).
    let number = |t: &str| t.trim().parse::<u64>().ok();
    let first = browser
        .wait_for_text_where(
            "#n",
            "a number above 0",
            |t| number(t).is_some_and(|n| n > 0),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let first = number(&first).unwrap();
    let later = browser
        .wait_for_text_where(
            "#n",
            &format!("a number above {first}"),
            |t| number(t).is_some_and(|n| n > first),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(number(&later).unwrap() > first);

    // A form typed into and posted, its answer read.
    browser.fill("#name", "Ada <Lovelace>").await.unwrap();
    browser.click("#send").await.unwrap();
    let result = browser
        .wait_for_text("#result", "Hello", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(result, "Hello, Ada <Lovelace>! (POST)");
    assert_eq!(counters.posts.load(Ordering::SeqCst), 1);
    assert_eq!(
        browser.count("#send").await.unwrap(),
        0,
        "the form's page was left"
    );

    // A timeout names what it waited for and shows the page.
    let err = browser
        .wait_for("#never", Duration::from_millis(200))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("`#never`"), "{err}");
    assert!(err.contains("Hello, Ada <Lovelace>! (POST)"), "{err}");

    // A screenshot: a PNG of the viewport (the window's width; its height
    // less the frame that headless chromium emulates), in a folder it creates.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shots/result.png");
    browser.screenshot(&path).await.unwrap();
    let png = std::fs::read(&path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&png[12..16], b"IHDR", "first chunk");
    let be = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
    let (width, height) = (be(16), be(20));
    assert_eq!(width, WINDOW.0, "width");
    assert!(
        height > WINDOW.1 / 2 && height <= WINDOW.1,
        "height {height}"
    );
    assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND", "last chunk");

    browser.close().await.unwrap();
}

//! `helixmq console` over HTTP: every route and action, the security rules
//! (loopback unless credentials, CSRF, read-only, no secret in pages or logs),
//! against the real RabbitMQ. The browser drives it in `browser_console`.

use std::time::Duration;

use helixmq_testkit::cli::{mgmt_peek, seed_dead_letters, Broker, Console};
use reqwest::blocking::Client;
use reqwest::StatusCode;

fn client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn get(c: &Console, path: &str) -> (StatusCode, String) {
    let r = client().get(c.at(path)).send().unwrap();
    (r.status(), r.text().unwrap())
}

fn post(c: &Console, path: &str, form: &[(&str, &str)]) -> reqwest::blocking::Response {
    client().post(c.at(path)).form(form).send().unwrap()
}

/// The CSRF token of a page's forms.
fn csrf(page: &str) -> String {
    let at = page
        .find(r#"name="csrf" value=""#)
        .expect("a form with a CSRF token");
    let rest = &page[at + r#"name="csrf" value=""#.len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

/// Follow a job page until the job ended; its outcome text.
fn finish(c: &Console, location: &str) -> String {
    let progress = format!("{location}/progress");
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (s, body) = get(c, &progress);
        assert_eq!(s, StatusCode::OK, "{body}");
        if body.contains(r#"data-finished="true""#) {
            return body;
        }
        assert!(
            std::time::Instant::now() < end,
            "job did not finish: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn location(r: &reqwest::blocking::Response) -> String {
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    r.headers()["location"].to_str().unwrap().to_string()
}

#[test]
fn every_route_and_action_over_http() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let llm = b.name("tasks.llm");
    let bg = b.name("tasks.background");
    let timeouts = seed_dead_letters(
        &b,
        &llm,
        "provider timeout after 30s",
        4,
        r#"{"model":"gpt-4","prompt":"hello"}"#,
    );
    let bad = seed_dead_letters(
        &b,
        &bg,
        "invalid input: missing field `user`",
        3,
        "not json <b>",
    );
    let c = Console::start(&b, &[]);

    // Overview, its live part and JSON: every queue of the topology.
    let (s, page) = get(&c, "/");
    assert_eq!(s, StatusCode::OK);
    assert!(
        page.contains(&llm) && page.contains(r#"hx-trigger="every 2s""#),
        "{page}"
    );
    let (s, live) = get(&c, "/overview/live");
    assert_eq!(s, StatusCode::OK);
    assert!(
        live.contains(&b.name("dlq")) && live.contains("Retry tiers"),
        "{live}"
    );
    let j: serde_json::Value = client()
        .get(c.at("/api/overview"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(j["source"], "management API", "{j}");
    assert!(
        j["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == llm.as_str()),
        "{j}"
    );
    let (s, js) = get(&c, "/static/htmx.min.js");
    assert!(s == StatusCode::OK && js.contains("htmx"), "vendored htmx");
    assert_eq!(get(&c, "/static/console.css").0, StatusCode::OK);

    // The workbench: everything, a reason filter, a group, the payload search, paging data.
    let (s, all) = get(&c, "/dlq");
    assert_eq!(s, StatusCode::OK);
    assert!(all.contains(r#"<span id="matching">7</span>"#), "{all}");
    assert!(
        all.contains("provider timeout after #s")
            && all.contains(r#"<span class="count">4</span>"#),
        "groups: {all}"
    );
    let (_, f) = get(&c, "/dlq?reason=TIMEOUT");
    assert!(f.contains(r#"<span id="matching">4</span>"#), "{f}");
    assert!(timeouts.iter().all(|id| f.contains(id.as_str())) && !f.contains(bad[0].as_str()));
    let (_, f) = get(&c, &format!("/dlq?queue={bg}"));
    assert!(f.contains(r#"<span id="matching">3</span>"#), "{f}");
    let (_, f) = get(&c, "/dlq?search=gpt-4");
    assert!(f.contains(r#"<span id="matching">4</span>"#), "{f}");
    let (_, f) = get(&c, "/dlq?type=llm.request&min_attempts=1&max_attempts=1");
    assert!(f.contains(r#"<span id="matching">7</span>"#), "{f}");
    let (_, f) = get(&c, "/dlq?min_attempts=2");
    assert!(f.contains(r#"<span id="matching">0</span>"#), "{f}");
    let (_, f) = get(&c, "/dlq?group=provider+timeout+after+%23s");
    assert!(f.contains(r#"<span id="matching">4</span>"#), "{f}");
    let (_, f) = get(&c, "/dlq?min_age=forever");
    assert!(
        f.contains("min_age &#39;forever&#39; is not a duration"),
        "{f}"
    );
    // Escaped: the payload "<b>" never becomes markup.
    let (s, detail) = get(&c, &format!("/dlq/message/{}", bad[0]));
    assert_eq!(s, StatusCode::OK);
    assert!(
        detail.contains("not json &#60;b&#62;") || detail.contains("not json &lt;b&gt;"),
        "{detail}"
    );
    let (_, detail) = get(&c, &format!("/dlq/message/{}", timeouts[0]));
    assert!(
        detail.contains("&#34;model&#34;: &#34;gpt-4&#34;")
            || detail.contains("&quot;model&quot;: &quot;gpt-4&quot;"),
        "pretty JSON: {detail}"
    );
    assert!(detail.contains(r#"id="traceparent">00-"#), "{detail}");
    assert_eq!(get(&c, "/dlq/message/no-such-id").0, StatusCode::NOT_FOUND);
    assert_eq!(get(&c, "/jobs/999").0, StatusCode::NOT_FOUND);

    // Actions need the page's CSRF token.
    let token = csrf(&all);
    let r = post(
        &c,
        "/dlq/action",
        &[("action", "delete:selected"), ("id", &bad[0])],
    );
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = post(
        &c,
        "/dlq/action",
        &[
            ("csrf", "forged"),
            ("action", "delete:selected"),
            ("id", &bad[0]),
        ],
    );
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = post(
        &c,
        "/dlq/action",
        &[("csrf", &token), ("action", "delete:selected")],
    );
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "nothing selected");

    // Replay a selection of two: confirmed in the origin queue, gone from the DLQ.
    let r = post(
        &c,
        "/dlq/action",
        &[
            ("csrf", &token),
            ("action", "replay:selected"),
            ("id", &timeouts[0]),
            ("id", &timeouts[1]),
        ],
    );
    let out = finish(&c, &location(&r));
    assert!(out.contains("2 replayed"), "{out}");
    b.eventually(Duration::from_secs(20), "2 replayed in tasks.llm", || {
        b.ready(&llm) == 2
    });
    let peeked: Vec<String> = mgmt_peek(&llm, 10)
        .iter()
        .map(|m| m["properties"]["message_id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        peeked.contains(&timeouts[0]) && peeked.contains(&timeouts[1]),
        "{peeked:?}"
    );
    let (_, f) = get(&c, "/dlq");
    assert!(f.contains(r#"<span id="matching">5</span>"#), "{f}");

    // Replay everything matching a filter to another queue.
    let r = post(
        &c,
        "/dlq/action",
        &[
            ("csrf", &token),
            ("action", "replay:matching"),
            ("reason", "timeout"),
            ("to", &bg),
        ],
    );
    let out = finish(&c, &location(&r));
    assert!(out.contains("2 replayed"), "{out}");
    b.eventually(
        Duration::from_secs(20),
        "2 replayed in tasks.background",
        || b.ready(&bg) == 2,
    );
    let r = post(
        &c,
        "/dlq/action",
        &[
            ("csrf", &token),
            ("action", "replay:selected"),
            ("id", &bad[0]),
            ("to", "not-a-queue"),
        ],
    );
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Delete one.
    let r = post(
        &c,
        "/dlq/action",
        &[
            ("csrf", &token),
            ("action", "delete:selected"),
            ("id", &bad[0]),
        ],
    );
    let out = finish(&c, &location(&r));
    assert!(out.contains("1 deleted"), "{out}");
    let (_, f) = get(&c, "/dlq");
    assert!(
        f.contains(r#"<span id="matching">2</span>"#) && !f.contains(bad[0].as_str()),
        "{f}"
    );

    // Purge: refused without the typed name, done with it.
    let dlq = b.name("dlq");
    let r = post(&c, "/dlq/purge", &[("csrf", &token), ("confirm", "yes")]);
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body = r.text().unwrap();
    assert!(
        body.contains("type the DLQ") && body.contains(&dlq),
        "{body}"
    );
    let (_, f) = get(&c, "/dlq");
    assert!(
        f.contains(r#"<span id="matching">2</span>"#),
        "purge refused: {f}"
    );
    let r = post(&c, "/dlq/purge", &[("csrf", &token), ("confirm", &dlq)]);
    let out = finish(&c, &location(&r));
    assert!(out.contains("2 message(s) purged"), "{out}");
    let (_, f) = get(&c, "/dlq");
    assert!(f.contains(r#"<span id="matching">0</span>"#), "{f}");

    // The console stops cleanly on SIGTERM, giving back what it held.
    let mut console = c;
    let out = console.process.terminate(Duration::from_secs(20));
    assert_eq!(out.code, 0, "{}", console.log());
    assert!(!console.log().contains("ERROR"), "{}", console.log());
}

#[test]
fn read_only_shows_and_takes_no_action() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let ids = seed_dead_letters(&b, &b.name("tasks.llm"), "boom", 2, "{}");
    let c = Console::start(&b, &["--read-only"]);
    let (_, page) = get(&c, "/dlq");
    assert!(page.contains(r#"<span id="matching">2</span>"#), "{page}");
    for absent in [
        "csrf",
        "replay-selected",
        "delete-selected",
        "purge-button",
        "type=\"checkbox\"",
    ] {
        assert!(
            !page.contains(absent),
            "read-only page shows {absent}: {page}"
        );
    }
    let (_, detail) = get(&c, &format!("/dlq/message/{}", ids[0]));
    assert!(
        !detail.contains("replay-one") && !detail.contains("delete-one"),
        "{detail}"
    );
    for path in ["/dlq/action", "/dlq/purge"] {
        let r = post(
            &c,
            path,
            &[
                ("action", "delete:selected"),
                ("id", &ids[0]),
                ("confirm", &b.name("dlq")),
            ],
        );
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        assert!(r.text().unwrap().contains("read-only"));
    }
    let (_, page) = get(&c, "/dlq");
    assert!(
        page.contains(r#"<span id="matching">2</span>"#),
        "nothing changed: {page}"
    );
}

#[test]
fn beyond_loopback_only_with_credentials_which_never_show() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    // No credentials: refused before anything starts.
    let out = b.run(&["console", "--listen", "0.0.0.0:0"]).expect_code(64);
    assert!(
        out.stderr.contains("without credentials")
            && out.stderr.contains("--auth basic:USER:PASSWORD"),
        "{}",
        out.stderr
    );
    let out = b.run(&["console", "--auth", "ops:pw"]).expect_code(1);
    assert!(out.stderr.contains("basic:USER:PASSWORD"), "{}", out.stderr);

    let secret = "Zr7-very-secret";
    let c = Console::start(&b, &["--auth", &format!("basic:ops:{secret}")]);
    let r = client().get(c.at("/")).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let r = client()
        .get(c.at("/dlq"))
        .basic_auth("ops", Some("wrong"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client()
        .post(c.at("/dlq/purge"))
        .form(&[("confirm", "x")])
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "actions too");
    for path in ["/", "/dlq", "/overview/live", "/api/overview"] {
        let r = client()
            .get(c.at(path))
            .basic_auth("ops", Some(secret))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let body = r.text().unwrap();
        assert!(
            !body.contains(secret) && !body.contains(":guest"),
            "{path} shows a secret"
        );
    }
    assert!(!c.log().contains(secret), "{}", c.log());

    // A token from a file (any user name, the token as password; or Bearer).
    let token_file = helixmq_testkit::cli::temp_path("token");
    std::fs::write(&token_file, "tok-123\n").unwrap();
    let c = Console::start(&b, &["--auth-token-file", token_file.to_str().unwrap()]);
    assert_eq!(
        client().get(c.at("/")).send().unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        client()
            .get(c.at("/"))
            .bearer_auth("tok-123")
            .send()
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        client()
            .get(c.at("/"))
            .basic_auth("me", Some("tok-123"))
            .send()
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let _ = std::fs::remove_file(token_file);
}

#[test]
fn retry_tiers_show_how_many_wait_and_when_the_next_is_due() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let bg = b.name("tasks.background");
    // A retry copy as the consumer writes it: into the tier, failed just now.
    let failed = helixmq::message::now_unix_millis();
    b.run(&[
        "publish",
        "-e",
        &b.name("retry"),
        "-k",
        &bg,
        "-H",
        &format!("x-helixmq-last-failure-ms={failed}"),
        "-n",
        "3",
        "--payload",
        "{}",
    ])
    .ok();
    let c = Console::start(&b, &[]);
    let j: serde_json::Value = client()
        .get(c.at("/api/overview"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let tier = j["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["queue"] == b.name("retry").as_str())
        .unwrap_or_else(|| panic!("no retry tier in {j}"))
        .clone();
    assert_eq!(tier["waiting"], 3, "{tier}");
    let due = tier["next_due_ms"].as_i64().unwrap();
    assert!(
        (failed + 59_000..=failed + 61_000).contains(&due),
        "due {due} = last failure {failed} + the tier's 60 s"
    );
    let (_, live) = get(&c, "/overview/live");
    let row = live
        .lines()
        .find(|l| l.contains(&format!("<td>{}</td>", b.name("retry"))))
        .unwrap_or_else(|| panic!("{live}"));
    assert!(
        row.contains(r#"<td class="n">3</td>"#) && row.contains("<td>in "),
        "{row}"
    );
    // The peek put the head back: all three still wait.
    let retry = b.name("retry");
    b.eventually(Duration::from_secs(15), "3 ready in the tier", || {
        b.ready(&retry) == 3
    });
}

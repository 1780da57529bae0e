//! The dead-letter workbench: the DLQ listed, filtered, grouped by reason,
//! one message in detail, and the actions — replay (confirmed, then removed),
//! delete, purge behind a typed confirmation — run as jobs whose progress a
//! page follows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::auth::csrf_ok;
use super::overview::{tiers, Tier};
use super::pages::{error, render, thousands, Base, Root};
use super::Console;
use crate::dlq::{rfc3339_ms, short_age, DeadLetter, Filter, Order, Progress, Target};
use crate::message::now_unix_millis;

/// What a message id must escape to be one path segment (UUIDs stay readable).
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.');

/// Letters per page.
const PAGE: usize = 50;

/// Form or query pairs, in order (a key may repeat: `id=a&id=b`).
type Pairs = Vec<(String, String)>;

fn pairs(raw: &[u8]) -> Pairs {
    url::form_urlencoded::parse(raw).into_owned().collect()
}

fn value<'a>(p: &'a Pairs, key: &str) -> Option<&'a str> {
    p.iter()
        .find(|(k, v)| k == key && !v.trim().is_empty())
        .map(|(_, v)| v.trim())
}

/// The filter fields a page and a form carry, by name.
const FILTER_KEYS: [&str; 10] = [
    "queue",
    "reason",
    "group",
    "type",
    "header",
    "search",
    "min_age",
    "max_age",
    "min_attempts",
    "max_attempts",
];

/// The filter the pairs describe; an error names the field and the fix.
fn filter_from(p: &Pairs) -> Result<Filter, String> {
    let dur = |k: &str| -> Result<Option<Duration>, String> {
        value(p, k)
            .map(|v| {
                humantime::parse_duration(v).map_err(|e| {
                    format!("{k} '{v}' is not a duration ({e}); use e.g. 30s, 10m, 2h")
                })
            })
            .transpose()
    };
    let num = |k: &str| -> Result<Option<u32>, String> {
        value(p, k)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("{k} '{v}' is not a whole number"))
            })
            .transpose()
    };
    let header = value(p, "header")
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("header '{h}' is not KEY=VALUE (e.g. tenant=acme)"))
        })
        .transpose()?;
    Ok(Filter {
        ids: p
            .iter()
            .filter(|(k, v)| k == "id" && !v.is_empty())
            .map(|(_, v)| v.clone())
            .collect(),
        origin_queue: value(p, "queue").map(str::to_string),
        reason: value(p, "reason").map(str::to_string),
        group: value(p, "group").map(str::to_string),
        kind: value(p, "type").map(str::to_string),
        header,
        min_age: dur("min_age")?,
        max_age: dur("max_age")?,
        min_attempts: num("min_attempts")?,
        max_attempts: num("max_attempts")?,
        search: value(p, "search").map(str::to_string),
    })
}

/// The filter fields that are set, to carry into links and hidden inputs.
fn carried(p: &Pairs) -> Pairs {
    FILTER_KEYS
        .iter()
        .filter_map(|k| value(p, k).map(|v| (k.to_string(), v.to_string())))
        .collect()
}

fn query(p: &[(String, String)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(p)
        .finish()
}

struct Row {
    id: String,
    link: String,
    origin: String,
    kind: String,
    attempts: u32,
    age: String,
    reason: String,
}

struct GroupRow {
    key: String,
    count: String,
    link: String,
    origins: String,
    active: bool,
}

/// A form field's current value.
struct Field {
    name: &'static str,
    label: &'static str,
    value: String,
    placeholder: &'static str,
}

#[derive(Template)]
#[template(path = "dlq.html")]
struct Workbench<'a> {
    base: Base<'a>,
    dlq: String,
    fields: Vec<Field>,
    hidden: Pairs,
    rows: Vec<Row>,
    groups: Vec<GroupRow>,
    matching: String,
    matching_n: usize,
    held: String,
    page: usize,
    pages: usize,
    prev: Option<String>,
    next: Option<String>,
    targets: Vec<String>,
    tiers: Vec<Tier>,
    error: Option<String>,
    filtered: bool,
    clear: String,
}

/// The work queues a letter can be replayed to (bound to the requeue exchange).
fn targets(c: &Console) -> Vec<String> {
    let requeue = c.broker.names().requeue_exchange();
    c.topology
        .bindings
        .iter()
        .filter(|b| b.exchange == requeue)
        .map(|b| b.queue.clone())
        .collect()
}

/// `GET /dlq`
pub(crate) async fn page(
    State(c): State<Arc<Console>>,
    Extension(root): Extension<Root>,
    RawQuery(q): RawQuery,
) -> Response {
    let p = pairs(q.unwrap_or_default().as_bytes());
    let keep = carried(&p);
    let page_no: usize = value(&p, "page")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let fields = vec![
        field(&p, "queue", "Origin queue", "helixagent.tasks.llm"),
        field(&p, "reason", "Reason contains", "timeout"),
        field(&p, "type", "Type", "llm.request"),
        field(&p, "header", "Header", "tenant=acme"),
        field(&p, "search", "Payload contains", "gpt-4"),
        field(&p, "min_age", "Older than", "1h"),
        field(&p, "max_age", "Newer than", "10m"),
        field(&p, "min_attempts", "Attempts ≥", "3"),
        field(&p, "max_attempts", "Attempts ≤", "5"),
    ];
    let mut view = Workbench {
        base: Base::new(&c, &root, "Dead letters", "dlq"),
        dlq: c.dlq.queue().to_string(),
        fields,
        hidden: keep.clone(),
        rows: vec![],
        groups: vec![],
        matching: "0".into(),
        matching_n: 0,
        held: "0".into(),
        page: page_no,
        pages: 1,
        prev: None,
        next: None,
        targets: targets(&c),
        tiers: tiers(&c.overview.latest().await),
        error: None,
        filtered: !keep.is_empty(),
        clear: format!("{}/dlq", root.0),
    };
    let filter = match filter_from(&p) {
        Ok(f) => f,
        Err(e) => {
            view.error = Some(e);
            return render(&view);
        }
    };
    let listed = c
        .dlq
        .list(&filter, Order::NewestFirst, (page_no - 1) * PAGE, PAGE)
        .await;
    // Groups of everything but the group filter itself, so the other groups stay clickable.
    let groups = c
        .dlq
        .groups(&Filter {
            group: None,
            ..filter.clone()
        })
        .await;
    match (listed, groups) {
        (Ok(page), Ok(groups)) => {
            let now = now_unix_millis();
            let link = |id: &str| {
                format!(
                    "{}/dlq/message/{}",
                    root.0,
                    percent_encoding::utf8_percent_encode(id, PATH_SEGMENT)
                )
            };
            view.rows = page
                .letters
                .iter()
                .map(|l| Row {
                    link: link(&l.id),
                    id: l.id.clone(),
                    origin: l.origin_queue.clone().unwrap_or_else(|| "?".into()),
                    kind: l.kind.clone().unwrap_or_default(),
                    attempts: l.attempts,
                    age: short_age(l.age_secs_at(now)),
                    reason: l.reason.clone(),
                })
                .collect();
            view.groups = groups
                .iter()
                .take(50)
                .map(|g| {
                    let mut q: Pairs = keep.iter().filter(|(k, _)| k != "group").cloned().collect();
                    q.push(("group".into(), g.key.clone()));
                    GroupRow {
                        active: filter.group.as_deref() == Some(g.key.as_str()),
                        key: g.key.clone(),
                        count: thousands(g.count as u64),
                        link: format!("{}/dlq?{}", root.0, query(&q)),
                        origins: g
                            .origins
                            .iter()
                            .map(|(o, n)| format!("{o} {n}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                })
                .collect();
            view.matching = thousands(page.matching as u64);
            view.matching_n = page.matching;
            view.held = thousands(page.held as u64);
            view.pages = page.matching.div_ceil(PAGE).max(1);
            let at = |n: usize| {
                let mut q = keep.clone();
                q.push(("page".into(), n.to_string()));
                format!("{}/dlq?{}", root.0, query(&q))
            };
            view.prev = (page_no > 1).then(|| at(page_no - 1));
            view.next = (page_no < view.pages).then(|| at(page_no + 1));
        }
        (Err(e), _) | (_, Err(e)) => {
            view.error = Some(format!("cannot read {}: {e}", c.dlq.queue()))
        }
    }
    render(&view)
}

fn field(p: &Pairs, name: &'static str, label: &'static str, placeholder: &'static str) -> Field {
    Field {
        name,
        label,
        value: value(p, name).unwrap_or_default().to_string(),
        placeholder,
    }
}

/// One copy of a message, as the detail page shows it.
struct Copy {
    origin: String,
    exchange: String,
    routing_key: String,
    kind: String,
    attempts: u32,
    reason: String,
    first_failure: String,
    last_failure: String,
    age: String,
    correlation_id: String,
    traceparent: String,
    priority: String,
    content_type: String,
    created: String,
    redelivered: bool,
    headers: Vec<(String, String)>,
    payload: String,
    json: bool,
    size: String,
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    base: Base<'a>,
    id: String,
    copies: Vec<Copy>,
    targets: Vec<String>,
}

fn copy_view(l: &DeadLetter) -> Copy {
    let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "–".into());
    let m = &l.message;
    Copy {
        origin: dash(&l.origin_queue),
        exchange: dash(&l.origin_exchange),
        routing_key: dash(&l.origin_routing_key),
        kind: dash(&l.kind),
        attempts: l.attempts,
        reason: l.reason.clone(),
        first_failure: l.first_failure_ms.map_or("–".into(), rfc3339_ms),
        last_failure: l.last_failure_ms.map_or("–".into(), rfc3339_ms),
        age: short_age(l.age_secs()),
        correlation_id: dash(&l.correlation_id),
        traceparent: dash(&l.traceparent),
        priority: l.priority.map_or("–".into(), |p| p.to_string()),
        content_type: dash(&m.content_type),
        created: rfc3339_ms(m.timestamp as i64 * 1000),
        redelivered: l.redelivered,
        headers: l
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        json: serde_json::from_slice::<serde_json::Value>(&m.payload).is_ok(),
        payload: l.payload_pretty(),
        size: format!("{} bytes", thousands(m.payload.len() as u64)),
    }
}

/// `GET /dlq/message/{id}`
pub(crate) async fn message(
    State(c): State<Arc<Console>>,
    Extension(root): Extension<Root>,
    Path(id): Path<String>,
) -> Response {
    match c.dlq.show(&id).await {
        Ok(found) if found.is_empty() => error(
            &c,
            &root,
            StatusCode::NOT_FOUND,
            format!(
                "no message with id '{id}' in {} (replayed or deleted meanwhile?)",
                c.dlq.queue()
            ),
            "dlq",
        ),
        Ok(found) => render(&MessagePage {
            base: Base::new(&c, &root, "Dead letter", "dlq"),
            id,
            copies: found.iter().map(|l| copy_view(l)).collect(),
            targets: targets(&c),
        }),
        Err(e) => error(
            &c,
            &root,
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read {}: {e}", c.dlq.queue()),
            "dlq",
        ),
    }
}

/// A running or finished action.
pub(crate) struct Job {
    what: String,
    progress: Arc<Progress>,
    outcome: Mutex<Option<(bool, String)>>,
    /// The workbench page it was started from.
    back: String,
}

/// Register a job, run `work` in the background (its outcome: ok, and the
/// text shown), and send the browser to the job's page.
fn run_job(
    c: &Console,
    root: &Root,
    what: String,
    back: String,
    progress: Arc<Progress>,
    work: impl std::future::Future<Output = (bool, String)> + Send + 'static,
) -> Response {
    let id = c
        .next_job
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let job = Arc::new(Job {
        what,
        progress,
        outcome: Mutex::new(None),
        back,
    });
    {
        let mut jobs = c.jobs.lock().expect("jobs");
        // Keep the last 100.
        if jobs.len() >= 100 {
            if let Some(&oldest) = jobs.keys().min() {
                jobs.remove(&oldest);
            }
        }
        jobs.insert(id, job.clone());
    }
    tokio::spawn(async move {
        let outcome = work.await;
        tracing::info!(job = id, what = %job.what, outcome = %outcome.1, "console action");
        *job.outcome.lock().expect("job") = Some(outcome);
    });
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, format!("{}/jobs/{id}", root.0))],
    )
        .into_response()
}

/// A POSTed form's fields, or 403 when it lacks the page's CSRF token.
fn posted(c: &Console, root: &Root, body: &[u8]) -> Result<Pairs, Box<Response>> {
    let p = pairs(body);
    if csrf_ok(c, &p) {
        Ok(p)
    } else {
        Err(Box::new(error(
            c,
            root,
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or stale: reload the page and try again".into(),
            "dlq",
        )))
    }
}

/// `POST /dlq/action`: replay or delete the selection, or everything matching.
pub(crate) async fn action(
    State(c): State<Arc<Console>>,
    Extension(root): Extension<Root>,
    body: Bytes,
) -> Response {
    let p = match posted(&c, &root, &body) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let bad = |m: String| error(&c, &root, StatusCode::BAD_REQUEST, m, "dlq");
    let mut filter = match filter_from(&p) {
        Ok(f) => f,
        Err(e) => return bad(e),
    };
    // The button pressed: `replay:selected`, `delete:matching`, …
    let (verb, scope) = value(&p, "action")
        .unwrap_or("")
        .split_once(':')
        .unwrap_or(("", "selected"));
    match scope {
        "selected" if filter.ids.is_empty() => return bad(
            "select at least one message (the boxes in the first column), or act on all matching"
                .into(),
        ),
        "selected" => {}
        "matching" => filter.ids.clear(),
        other => return bad(format!("unknown scope '{other}': selected or matching")),
    }
    let back = format!("{}/dlq?{}", root.0, query(&carried(&p)));
    let progress = Progress::new();
    let dlq = c.dlq.clone();
    match verb {
        "replay" => {
            let to = value(&p, "to").map(str::to_string);
            if let Some(t) = &to {
                if !targets(&c).contains(t) {
                    return bad(format!(
                        "'{t}' is not a work queue of the topology; choose one of the list"
                    ));
                }
            }
            let what = format!(
                "Replay {} to {}",
                describe(scope, &filter),
                to.as_deref().unwrap_or("their origin queues")
            );
            let p2 = progress.clone();
            let work = async move {
                let target = to.as_deref().map_or(Target::Origin, Target::Queue);
                match dlq.replay(&filter, target, None, &p2).await {
                    Ok(r) => {
                        let mut text = format!(
                            "{} replayed (each confirmed in its queue, then removed from the DLQ), {} failed, {} skipped",
                            r.replayed, r.failed, r.skipped
                        );
                        if r.duplicated > 0 {
                            text.push_str(&format!(
                                ", {} replayed but still in the DLQ",
                                r.duplicated
                            ));
                        }
                        if r.interrupted > 0 {
                            text.push_str(&format!(
                                ", {} not tried (still in the DLQ)",
                                r.interrupted
                            ));
                        }
                        for e in &r.errors {
                            text.push_str(&format!("\n{e}"));
                        }
                        (
                            r.failed + r.skipped + r.duplicated + r.interrupted == 0,
                            text,
                        )
                    }
                    Err(e) => (
                        false,
                        format!("replay failed: {e}; nothing was removed that was not replayed"),
                    ),
                }
            };
            run_job(&c, &root, what, back, progress, work)
        }
        "delete" => {
            let what = format!("Delete {}", describe(scope, &filter));
            let p2 = progress.clone();
            let work = async move {
                match dlq.delete(&filter, None, &p2).await {
                    Ok(n) => (
                        p2.failed() == 0,
                        format!("{n} deleted, {} failed", p2.failed()),
                    ),
                    Err(e) => (false, format!("delete failed: {e}")),
                }
            };
            run_job(&c, &root, what, back, progress, work)
        }
        other => bad(format!("unknown action '{other}': replay or delete")),
    }
}

fn describe(scope: &str, f: &Filter) -> String {
    if scope == "selected" {
        format!("{} selected message(s)", f.ids.len())
    } else if f.is_empty() {
        "every message".into()
    } else {
        "every message matching the filter".into()
    }
}

/// `POST /dlq/purge`: everything, once the DLQ's name was typed to confirm.
pub(crate) async fn purge(
    State(c): State<Arc<Console>>,
    Extension(root): Extension<Root>,
    body: Bytes,
) -> Response {
    let p = match posted(&c, &root, &body) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    let name = c.dlq.queue().to_string();
    if value(&p, "confirm") != Some(name.as_str()) {
        return error(
            &c,
            &root,
            StatusCode::BAD_REQUEST,
            format!("purge refused: type the DLQ's name, {name}, in the box to confirm (every message in it is deleted for good)"),
            "dlq",
        );
    }
    let progress = Progress::new();
    let dlq = c.dlq.clone();
    let p2 = progress.clone();
    let work = async move {
        match dlq.purge(&p2).await {
            Ok(n) => (true, format!("{n} message(s) purged")),
            Err(e) => (false, format!("purge failed: {e}")),
        }
    };
    run_job(
        &c,
        &root,
        format!("Purge {name}"),
        format!("{}/dlq", root.0),
        progress,
        work,
    )
}

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage<'a> {
    base: Base<'a>,
    what: String,
    progress: String,
    back: String,
}

#[derive(Template)]
#[template(path = "job_progress.html")]
struct JobProgress {
    url: String,
    done: usize,
    total: usize,
    failed: usize,
    percent: usize,
    finished: bool,
    ok: bool,
    outcome: String,
}

fn job_progress_view(root: &Root, id: u64, job: &Job) -> JobProgress {
    let outcome = job.outcome.lock().expect("job").clone();
    let (done, total) = (job.progress.done(), job.progress.total());
    JobProgress {
        url: format!("{}/jobs/{id}/progress", root.0),
        done,
        total,
        failed: job.progress.failed(),
        percent: (done * 100).checked_div(total).unwrap_or(100),
        finished: outcome.is_some(),
        ok: outcome.as_ref().is_some_and(|o| o.0),
        outcome: outcome.map(|o| o.1).unwrap_or_default(),
    }
}

fn find_job(c: &Console, id: u64) -> Option<Arc<Job>> {
    c.jobs.lock().expect("jobs").get(&id).cloned()
}

/// `GET /jobs/{id}`
pub(crate) async fn job(
    State(c): State<Arc<Console>>,
    Extension(root): Extension<Root>,
    Path(id): Path<u64>,
) -> Response {
    let Some(job) = find_job(&c, id) else {
        return error(
            &c,
            &root,
            StatusCode::NOT_FOUND,
            format!("no job {id} (the console keeps the last 100)"),
            "dlq",
        );
    };
    let progress = match job_progress_view(&root, id, &job).render() {
        Ok(p) => p,
        Err(e) => return super::pages::template_error(e),
    };
    render(&JobPage {
        base: Base::new(&c, &root, "Action", "dlq"),
        what: job.what.clone(),
        progress,
        back: job.back.clone(),
    })
}

/// `GET /jobs/{id}/progress`: the part htmx swaps in until the job ends.
pub(crate) async fn job_progress(
    State(c): State<Arc<Console>>,
    Extension(root): Extension<Root>,
    Path(id): Path<u64>,
) -> Response {
    match find_job(&c, id) {
        Some(job) => render(&job_progress_view(&root, id, &job)),
        None => (StatusCode::NOT_FOUND, "no such job").into_response(),
    }
}

//! The end of a demo run: the table per queue, the priority order, the DLQ,
//! and the verdict (exit 0 only when every delivery is accounted for).

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use helixmq::Names;

use super::tally::Tally;

/// Print the summary; success only if every queue got exactly what was meant
/// for it and the LLM queue served higher priorities first.
pub(super) fn report(
    t: &Tally,
    names: &Names,
    total: u64,
    took: Duration,
) -> anyhow::Result<ExitCode> {
    let strip = format!("{}.", names.prefix());
    outln!();
    outln!(
        "{:<24} {:>9} {:>9} {:>7} {:>6} {:>5} {:>8} {:>8}",
        "QUEUE",
        "PUBLISHED",
        "PROCESSED",
        "RETRIED",
        "DLQ",
        "DUPS",
        "p50 ms",
        "p99 ms"
    );
    let mut ok = true;
    let mut all_lat = Vec::new();
    let (mut sp, mut sproc, mut sr, mut sd, mut sdup) = (0, 0, 0, 0, 0);
    for (name, q) in &t.queues {
        let mut lat = q
            .latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        lat.sort_unstable();
        let (p, pr, r, d, dup) = (
            q.published.load(Ordering::Relaxed),
            q.processed.load(Ordering::Relaxed),
            q.retried.load(Ordering::Relaxed),
            q.dead.load(Ordering::Relaxed),
            q.duplicates.load(Ordering::Relaxed),
        );
        let good = pr == q.expect_processed.load(Ordering::Relaxed)
            && d == q.expect_dead.load(Ordering::Relaxed);
        ok &= good;
        outln!(
            "{:<24} {:>9} {:>9} {:>7} {:>6} {:>5} {:>8.1} {:>8.1}{}",
            name.trim_start_matches(&strip),
            p,
            pr,
            r,
            d,
            dup,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            if good { "" } else { "  ✗ missing messages" }
        );
        all_lat.extend(lat);
        (sp, sproc, sr, sd, sdup) = (sp + p, sproc + pr, sr + r, sd + d, sdup + dup);
    }
    all_lat.sort_unstable();
    outln!(
        "{:<24} {:>9} {:>9} {:>7} {:>6} {:>5} {:>8.1} {:>8.1}",
        "total",
        sp,
        sproc,
        sr,
        sd,
        sdup,
        percentile(&all_lat, 0.5),
        percentile(&all_lat, 0.99)
    );
    outln!();
    outln!(
        "throughput: {} deliveries settled in {:.2}s ({:.0}/s); latency: publish → processed, queueing and retries included",
        sproc + sd,
        took.as_secs_f64(),
        (sproc + sd) as f64 / took.as_secs_f64().max(1e-6)
    );

    // Priority: the first attempts were served in non-increasing priority order.
    let order = t
        .llm_order
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let sorted = order.windows(2).all(|w| w[0] >= w[1]);
    let mut runs: Vec<(u8, usize)> = Vec::new();
    for p in &order {
        match runs.last_mut() {
            Some((q, n)) if q == p => *n += 1,
            _ => runs.push((*p, 1)),
        }
    }
    let shown: Vec<String> = runs
        .iter()
        .take(8)
        .map(|(p, n)| format!("{}×{n}", level(*p)))
        .collect();
    outln!(
        "llm priority order: served {}{} {}",
        shown.join(" → "),
        if runs.len() > 8 { " → …" } else { "" },
        if sorted {
            "✓ higher priority first"
        } else {
            "✗ out of order"
        }
    );
    ok &= sorted && !order.is_empty();
    let reasons = t.dlq_reasons.lock().unwrap_or_else(|p| p.into_inner());
    let r: Vec<String> = reasons.iter().map(|(k, v)| format!("{v} {k}")).collect();
    outln!(
        "dead-letter queue: {sd} message(s) ({})",
        if r.is_empty() {
            "none".into()
        } else {
            r.join(", ")
        }
    );
    let settled = sproc + sd;
    if ok && settled == total {
        outln!("✓ every message accounted for: {sp} delivered = {sproc} processed + {sd} dead-lettered as expected");
        Ok(ExitCode::SUCCESS)
    } else {
        outln!(
            "✗ {} of {total} deliveries not accounted for (or not as expected)",
            total.saturating_sub(settled)
        );
        Ok(ExitCode::FAILURE)
    }
}

/// The `p`-quantile of sorted microseconds, in milliseconds.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn level(p: u8) -> String {
    match p {
        10 => "critical".into(),
        8 => "high".into(),
        5 => "normal".into(),
        1 => "low".into(),
        p => format!("p{p}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_microseconds_in_milliseconds() {
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[1000, 2000, 3000], 0.5), 2.0);
        assert_eq!(percentile(&[1000, 2000, 3000], 0.99), 3.0);
    }
}

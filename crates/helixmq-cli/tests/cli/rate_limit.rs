//! `worker --rate-limit`: four worker processes, as the least-privilege user,
//! share 600 requests/min on a queue kept full for 60 s. Every 10 s window
//! holds 100 ± 5 handler starts, also across the SIGKILL of the refiller (the
//! budget is neither leaked nor doubled); a 429 from one worker pauses all
//! four. And a malformed `--rate-limit` is refused saying what is wrong.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use helixmq_testkit::cli::{self, file_lines, free_port, temp_path, Background, Broker};

const KEY: &str = "shared-key";

/// The binary as helixagent (configure/write/read `helixagent\..*` only).
fn as_helixagent(b: &Broker) -> Command {
    let mut c = b.cmd_as_helixagent();
    c.env("RUST_LOG", "warn");
    c
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Sleep until wall-clock time `t` (the test's timeline is the run itself).
fn sleep_until(t: f64) {
    let left = t - now();
    if left > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(left));
    }
}

/// Permits this worker minted (it held the refiller lease), from its /metrics.
fn minted(port: u16) -> u64 {
    let text = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
        .and_then(|r| r.text())
        .unwrap_or_default();
    let series = format!("rabbitmq_rate_limit_permits_minted_total{{key=\"{KEY}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn four_workers_share_600_per_minute_survive_a_sigkill_and_pause_together() {
    let b = Broker::new();
    let mut c = as_helixagent(&b);
    c.args(["topology", "apply"]);
    cli::run(c, b"").ok();
    let mut c = as_helixagent(&b);
    let tasks = b.name("tasks");
    c.args([
        "publish",
        "--exchange",
        &tasks,
        "--routing-key",
        "background",
        "--payload",
        "work",
        "--count",
        "900",
    ]);
    cli::run(c, b"").ok();

    let starts = temp_path("starts");
    let trigger = temp_path("429");
    // Each start appends its time; the one start that takes the trigger file
    // (rename is atomic: one winner) answers "rate limited, retry after 5 s".
    let handler = format!(
        r#"cat >/dev/null; if mv {t} {t}.taken 2>/dev/null; then echo "$(date +%s.%N) 429" >> {f}; echo 'retry-after: 5' >&2; exit 75; fi; echo "$(date +%s.%N)" >> {f}"#,
        t = trigger.display(),
        f = starts.display()
    );
    let logs = temp_path("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut workers: Vec<(Background, u16)> = (0..4)
        .map(|i| {
            let port = free_port();
            let mut c = as_helixagent(&b);
            c.args([
                "worker",
                "--queue",
                "tasks.background",
                "--exec",
                &handler,
                "--concurrency",
                "4",
                "--retry-delay",
                "1s",
                "--rate-limit",
                &format!("{KEY}=600/min"),
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
            ]);
            // Logs to files: a pipe nobody reads could fill and stall a worker.
            let log = std::fs::File::create(logs.join(format!("w{i}.log"))).unwrap();
            c.stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            let child = c.spawn().expect("spawn helixmq worker");
            (Background { child: Some(child) }, port)
        })
        .collect();

    b.eventually(Duration::from_secs(20), "a first handler start", || {
        !file_lines(&starts).is_empty()
    });
    let s0: f64 = file_lines(&starts)[0].parse().unwrap();

    // 25 s in: SIGKILL the refiller, the one worker minting permits.
    sleep_until(s0 + 25.0);
    let minting: Vec<usize> = (0..4).filter(|i| minted(workers[*i].1) > 0).collect();
    assert_eq!(minting.len(), 1, "one refiller, not {minting:?}");
    let killed = minting[0];
    let t_kill = now();
    workers[killed].0.child.as_mut().unwrap().kill().unwrap();
    let _ = workers[killed].0.child.as_mut().unwrap().wait();

    // 42 s in: one handler answers 429 + retry after 5 s.
    sleep_until(s0 + 42.0);
    std::fs::write(&trigger, b"").unwrap();

    sleep_until(s0 + 60.5);
    let took_over: Vec<usize> = (0..4)
        .filter(|i| *i != killed && minted(workers[*i].1) > 0)
        .collect();
    let started = Instant::now();
    for (i, (w, _)) in workers.iter_mut().enumerate() {
        if i != killed {
            let run = w.terminate(Duration::from_secs(20));
            assert_eq!(run.code, 0, "worker {i} exit");
        }
    }
    eprintln!("workers stopped in {:?}", started.elapsed());

    let lines = file_lines(&starts);
    let t429 = lines
        .iter()
        .find_map(|l| l.strip_suffix(" 429"))
        .map(|t| t.parse::<f64>().unwrap())
        .expect("the 429 was answered");
    let times: Vec<f64> = lines
        .iter()
        .filter(|l| !l.ends_with(" 429"))
        .map(|l| l.parse::<f64>().unwrap())
        .collect();
    let count = |from: f64, to: f64| times.iter().filter(|t| **t >= from && **t < to).count();
    let pause = (t429, t429 + 5.0);
    let mut report = Vec::new();
    let mut checked = 0;
    for k in 0..6 {
        let (from, to) = (s0 + 10.0 * k as f64, s0 + 10.0 * (k + 1) as f64);
        let n = count(from, to);
        let paused = from < pause.1 && to > pause.0;
        report.push(format!(
            "[{:>2}s,{:>2}s) {n}{}{}",
            10 * k,
            10 * (k + 1),
            if paused { " (pause)" } else { "" },
            if (from..to).contains(&t_kill) {
                " (kill)"
            } else {
                ""
            },
        ));
        if !paused {
            checked += 1;
            assert!(
                (95..=105).contains(&n),
                "{n} starts in a 10 s window (want 100 ± 5): {report:?}"
            );
        }
    }
    eprintln!(
        "starts per 10 s window: {report:?}; 429 at +{:.1}s",
        t429 - s0
    );
    assert!(checked >= 4, "{report:?}");
    assert_eq!(
        took_over.len(),
        1,
        "one worker took the lease over: {took_over:?}"
    );
    // Allow 200 ms for the pause to reach the other three workers.
    let during = count(pause.0 + 0.2, pause.1);
    assert_eq!(
        during, 0,
        "{during} starts during the 5 s pause: {report:?}"
    );
    let after = count(pause.1, pause.1 + 2.0);
    assert!(
        (15..=25).contains(&after),
        "{after} starts in the 2 s after the pause (want about 20)"
    );
    let _ = std::fs::remove_file(&starts);
    let _ = std::fs::remove_dir_all(&logs);
}

#[test]
fn a_malformed_rate_limit_is_refused_with_the_right_form() {
    let b = Broker::new();
    for (spec, says) in [
        ("openai-key-1", "no '='"),
        ("openai-key-1=500", "no '/min'"),
        ("openai-key-1=500/day", "unknown period '/day'"),
    ] {
        let run = b
            .run(&[
                "worker",
                "--queue",
                "tasks.llm",
                "--exec",
                "true",
                "--rate-limit",
                spec,
            ])
            .expect_code(64);
        assert!(run.stderr.contains(says), "{spec}: {}", run.stderr);
        assert!(
            run.stderr.contains("openai-key-1=500/min,90000tokens/min"),
            "{}",
            run.stderr
        );
    }
}

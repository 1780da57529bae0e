//! `helixmq bench` with tiny numbers against the local RabbitMQ: the command
//! runs to the end, its JSON has every field, the figures are real (non-zero,
//! consistent with the settings), and it leaves no queue behind.

use std::process::Command;

use serde_json::Value;

fn field<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for k in path.split('.') {
        cur = cur
            .get(k)
            .unwrap_or_else(|| panic!("JSON lacks '{path}' (at '{k}'):\n{v:#}"));
    }
    cur
}

fn positive(v: &Value, path: &str) -> f64 {
    let x = field(v, path)
        .as_f64()
        .unwrap_or_else(|| panic!("'{path}' is not a number"));
    assert!(x > 0.0 && x.is_finite(), "'{path}' = {x}, expected > 0");
    x
}

#[test]
fn bench_json_has_every_field() {
    let dir = std::env::temp_dir().join(format!("helixmq-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("latency.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_helixmq"))
        .args([
            "bench",
            "--json",
            "--messages",
            "200",
            "--rounds",
            "2",
            "--latency-messages",
            "100",
            "--embedded-messages",
            "500",
            "--soak-messages",
            "200",
            "--window",
            "32",
            "--prefetch",
            "20",
            "--plot",
        ])
        .arg(&svg)
        .output()
        .expect("run helixmq bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "helixmq bench failed:\n{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });

    // Settings are echoed as given.
    assert_eq!(field(&v, "settings.messages"), 200);
    assert_eq!(field(&v, "settings.window"), 32);
    assert_eq!(field(&v, "settings.prefetch"), 20);
    assert_eq!(field(&v, "settings.rounds"), 2);
    assert_eq!(field(&v, "settings.latency_messages"), 100);
    assert!(field(&v, "machine.nproc").as_u64().unwrap() >= 1);
    assert!(field(&v, "machine").get("rabbitmq_version").is_some());
    assert!(!field(&v, "machine.broker")
        .as_str()
        .unwrap()
        .contains("guest:guest"));

    for side in [
        "publish.helixmq",
        "publish.helixmq_batch",
        "publish.raw_lapin",
        "consume.helixmq",
        "consume.raw_lapin",
        "consume.helixmq_backend_stream",
        "publish.raw_lapin_4_channels",
        "publish.raw_lapin_helixmq_properties",
    ] {
        positive(&v, &format!("{side}.median_per_sec"));
        positive(&v, &format!("{side}.best_per_sec"));
        assert!(field(&v, &format!("{side}.median_cpu_us_per_msg")).is_f64());
        let runs = field(&v, &format!("{side}.runs")).as_array().unwrap();
        assert_eq!(runs.len(), 2, "{side}: one run per round");
        for r in runs {
            assert_eq!(r["messages"], 200);
            assert!(r["seconds"].as_f64().unwrap() > 0.0);
            assert!(r["cpu_us_per_msg"].as_f64().unwrap() >= 0.0);
        }
    }
    positive(&v, "publish.ratio");
    positive(&v, "publish.batch_ratio");
    positive(&v, "publish.one_at_a_time.per_sec");
    assert_eq!(field(&v, "publish.one_at_a_time.messages"), 20);
    positive(&v, "publish.speedup_over_one_at_a_time");
    positive(&v, "consume.ratio");
    positive(&v, "consume.backend_stream_ratio");

    for run in ["latency.fixed_rate", "latency.saturation"] {
        assert_eq!(field(&v, &format!("{run}.messages")), 100);
        let p50 = positive(&v, &format!("{run}.p50_ms"));
        let p99 = positive(&v, &format!("{run}.p99_ms"));
        let p999 = positive(&v, &format!("{run}.p999_ms"));
        let max = positive(&v, &format!("{run}.max_ms"));
        assert!(
            p50 <= p99 && p99 <= p999 && p999 <= max,
            "{run}: percentiles out of order"
        );
        positive(&v, &format!("{run}.mean_ms"));
        positive(&v, &format!("{run}.achieved_per_sec"));
        positive(&v, &format!("{run}.confirm_p50_ms"));
        positive(&v, &format!("{run}.confirm_p99_ms"));
    }
    assert_eq!(field(&v, "latency.fixed_rate.offered_per_sec"), 1000.0);
    assert!(field(&v, "latency.saturation.offered_per_sec").is_null());

    assert_eq!(field(&v, "embedded.messages"), 500);
    positive(&v, "embedded.publish_and_consume_per_sec");
    let runs = field(&v, "embedded.publish_and_consume_runs")
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(runs.len(), 2, "one per round: {runs:?}");
    assert!(runs.iter().all(|r| r.as_f64().unwrap() > 0.0), "{runs:?}");
    positive(&v, "embedded.publish_only_per_sec");
    positive(&v, "embedded.consume_only_per_sec");

    positive(&v, "memory.peak_rss_kib");
    assert!(!field(&v, "memory.rss_after_phase")
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(field(&v, "memory.soak.messages"), 200);
    let samples = field(&v, "memory.soak.samples").as_array().unwrap();
    assert_eq!(samples.len(), 11, "a sample at start and every tenth");
    assert!(field(&v, "memory.soak.growth_kib").is_i64());
    assert!(field(&v, "memory.soak.flat").is_boolean());
    positive(&v, "memory.soak.per_sec");

    // worker --pipe beside --exec, on both brokers.
    assert_eq!(field(&v, "pipe.concurrency"), 4);
    for side in ["pipe.embedded", "pipe.rabbitmq"] {
        assert_eq!(field(&v, &format!("{side}.pipe.messages")), 200);
        assert_eq!(field(&v, &format!("{side}.exec.messages")), 10);
        positive(&v, &format!("{side}.pipe.per_sec"));
        positive(&v, &format!("{side}.exec.per_sec"));
        positive(&v, &format!("{side}.ratio"));
    }
    assert_eq!(
        field(&v, "machine.load_average").as_array().unwrap().len(),
        2
    );

    let targets = field(&v, "targets").as_array().unwrap();
    let names: Vec<&str> = targets
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "publish_vs_raw",
            "consume_vs_raw",
            "publish_vs_one_at_a_time",
            "p99_at_fixed_rate",
            "rss_flat",
            "embedded_throughput",
            "pipe_python_noop"
        ]
    );
    for t in targets {
        assert!(t["met"].is_boolean() && t["target"].is_string() && t["value"].is_string());
    }

    // The human summary went to stderr, the plot to its file.
    assert!(
        stderr.contains("targets"),
        "summary missing from stderr:\n{stderr}"
    );
    let plot = std::fs::read_to_string(&svg).expect("the --plot file");
    assert!(plot.starts_with("<svg") && plot.contains("p99"));
    std::fs::remove_dir_all(&dir).ok();

    // Nothing left under the bench's prefix on the broker.
    let prefix = stderr
        .split("queues under '")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .expect("the prefix is announced on stderr");
    if let Ok(o) = Command::new("rabbitmqctl")
        .args(["list_queues", "name", "-q"])
        .output()
    {
        if o.status.success() {
            let list = String::from_utf8_lossy(&o.stdout);
            assert!(
                !list.contains(prefix),
                "queues left behind under {prefix}:\n{list}"
            );
        }
    }
}

#[test]
fn bench_refuses_bad_arguments() {
    for args in [
        ["bench", "--size", "4"],
        ["bench", "--window", "0"],
        ["bench", "--prefetch", "0"],
        ["bench", "--plot", "/nonexistent-dir/x.svg"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_helixmq"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(args[1]), "{args:?}: {err}");
    }
}

#[test]
fn bench_names_an_unreachable_broker() {
    let out = Command::new(env!("CARGO_BIN_EXE_helixmq"))
        .args([
            "bench",
            "--messages",
            "10",
            "--url",
            "amqp://guest:s3cret@127.0.0.1:1/%2f",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1"), "{err}");
    assert!(!err.contains("s3cret"), "password leaked: {err}");
}

#[test]
fn bench_request_json_has_its_figures_and_leaves_nothing_behind() {
    let out = Command::new(env!("CARGO_BIN_EXE_helixmq"))
        .args([
            "bench",
            "--request",
            "--json",
            "--rounds",
            "1",
            "--request-messages",
            "300",
            "--request-in-flight",
            "8",
            "--request-latency-messages",
            "100",
            "--request-rate",
            "200",
            "--url",
            "amqp://helixagent:helixagent123@127.0.0.1:5672/%2f",
        ])
        .output()
        .expect("run helixmq bench --request");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "helixmq bench --request failed:\n{stderr}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let per_sec = positive(&v, "throughput_per_sec");
    let rounds = field(&v, "throughput_rounds").as_array().expect("rounds");
    assert_eq!(rounds.len(), 1);
    assert_eq!(rounds[0]["requests"], 300);
    // Consistent: 300 requests in `seconds` is the rate reported.
    let seconds = positive(&rounds[0], "seconds");
    assert!((300.0 / seconds - per_sec).abs() < 1.0, "{v:#}");
    assert_eq!(field(&v, "latency.requests"), 100);
    let p50 = positive(&v, "latency.p50_ms");
    let p99 = positive(&v, "latency.p99_ms");
    assert!(p50 <= p99 && p99 <= positive(&v, "latency.max_ms"), "{v:#}");
    positive(&v, "embedded.per_sec");
    assert!(field(&v, "throughput_target_met").is_boolean());
    assert!(
        stderr.contains("request-reply"),
        "summary missing:\n{stderr}"
    );

    let prefix = stderr
        .split("queues under '")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .expect("the prefix is announced on stderr");
    for what in ["list_queues", "list_exchanges"] {
        let o = Command::new("rabbitmqctl")
            .args([what, "name", "-q"])
            .output()
            .expect("rabbitmqctl runs");
        let list = String::from_utf8_lossy(&o.stdout);
        assert!(
            !list.contains(prefix),
            "{what}: left behind under {prefix}:\n{list}"
        );
    }
}

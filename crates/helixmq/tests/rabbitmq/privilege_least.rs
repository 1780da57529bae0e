//! Least privilege on the shared broker: the spec's user `helixagent`, holding
//! exactly configure/write/read `^helixagent\..*` on `/` (made by
//! `scripts/provision`), runs the whole flow — topology, publish, consume,
//! retry back to the origin, DLQ, DLQ replay — under a unique prefix
//! `helixagent.lp<random>`; a user without those permissions (`hx_noperm`) gets
//! `Error::AccessRefused` with a clear message at each step.

use std::time::{Duration, Instant};

use helixmq::{BoxError, Context, Error, Message, Outcome, SubscribeOptions, Topology};
use helixmq_testkit::broker::*;
use helixmq_testkit::scripts::{rabbitmqctl, random_suffix};

/// The permissions are exactly the spec's (so passing proves they suffice).
fn assert_spec_permissions() {
    let out = rabbitmqctl(None, &["list_user_permissions", "helixagent"]);
    let line = out
        .lines()
        .find(|l| l.starts_with("/\t"))
        .unwrap_or_else(|| {
            panic!("helixagent has no permissions on / (run scripts/provision): {out}")
        });
    let cols: Vec<&str> = line.split('\t').collect();
    assert_eq!(
        cols,
        [
            "/",
            r"^helixagent\..*",
            r"^helixagent\..*",
            r"^helixagent\..*"
        ],
        "helixagent must hold exactly the spec's permissions"
    );
    let tags = rabbitmqctl(None, &["list_users"]);
    assert!(
        !tags
            .lines()
            .any(|l| l.starts_with("helixagent\t") && l.contains("administrator")),
        "helixagent must not be an administrator: {tags}"
    );
}

#[tokio::test]
async fn spec_permissions_run_the_whole_flow_with_dlq_replay() {
    assert_spec_permissions();
    let p = format!("helixagent.lp{}", random_suffix());
    let b = broker(config(HELIXAGENT, &p))
        .await
        .expect("connect as helixagent (run scripts/provision)");
    helixmq_testkit::flow::whole_flow(&b).await;
    cleanup(&b, Some(&Topology::spec(b.names()))).await;
    // Deleting is a configure right: everything under the prefix is gone.
    let left = rabbitmqctl(None, &["list_queues", "name"]);
    assert!(
        !left.lines().any(|l| l.starts_with(&format!("{p}."))),
        "queues left behind: {left}"
    );
    b.close().await.unwrap();
}

#[tokio::test]
async fn a_user_without_the_permissions_is_refused_clearly() {
    let p = format!("helixagent.lp{}", random_suffix());
    // The spec topology exists (declared by helixagent), so the refusals below
    // are about permissions, not about missing objects.
    let owner = broker(config(HELIXAGENT, &p)).await.unwrap();
    let spec = Topology::spec(owner.names());
    owner.declare(&spec).await.unwrap();
    let names = owner.names().clone();

    let b = broker(config(NOPERM, &p))
        .await
        .expect("hx_noperm may log in to / (run scripts/provision)");
    let check = |what: &str, err: Error| {
        assert!(
            matches!(&err, Error::AccessRefused { user: Some(u), .. } if u == "hx_noperm"),
            "{what}: expected AccessRefused for hx_noperm, got {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("access refused for user 'hx_noperm'")
                && msg.contains("permissions")
                && msg.contains("ACCESS_REFUSED"),
            "{what}: unclear message: {msg}"
        );
        msg
    };

    // configure: the whole topology.
    let started = Instant::now();
    let msg = check("declare", b.declare(&spec).await.unwrap_err());
    assert!(msg.contains(&names.dead_letter_exchange()), "{msg}");
    // write: a confirmed publish to an existing exchange.
    let msg = check(
        "publish",
        b.publish(&names.tasks_exchange(), "background", Message::new("x"))
            .await
            .unwrap_err(),
    );
    assert!(msg.contains(&names.tasks_exchange()), "{msg}");
    // read: consuming and basic.get from an existing queue.
    let queue = names.task_queue("background");
    let err = b
        .backend()
        .consume(&queue, 1, &format!("hxt-{}", random_suffix()))
        .await
        .err()
        .expect("consume refused");
    let msg = check("consume", err);
    assert!(msg.contains(&queue), "{msg}");
    let msg = check("get", b.backend().get(&queue).await.unwrap_err());
    assert!(msg.contains(&queue), "{msg}");
    // subscribe declares its retry tier first: refused at that step.
    let err = b
        .subscribe(
            &queue,
            |_m: Message, _c: Context| async { Ok::<_, BoxError>(Outcome::Ack) },
            SubscribeOptions::default(),
        )
        .await
        .unwrap_err();
    check("subscribe", err);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusals come at once, not after timeouts: {:?}",
        started.elapsed()
    );
    // Nothing reached the queue.
    assert_eq!(
        owner.backend().queue_stats(&queue).await.unwrap().messages,
        0
    );

    b.close().await.unwrap();
    cleanup(&owner, Some(&spec)).await;
    owner.close().await.unwrap();
}

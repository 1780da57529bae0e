//! Helpers of the PostgreSQL tests (outbox, inbox): a schema per test, a
//! RabbitMQ prefix per test, and faults aimed only at this test's
//! connections (consumed ids are counted by the kit's one
//! [`crate::ledger::Ledger`]). The schema and the prefix are removed when the
//! guard drops, also when the test panics.
//!
//! The database is `helixmq_test` on 127.0.0.1:5432 (`scripts/provision`
//! creates it); `HELIXMQ_TEST_DATABASE_URL` points elsewhere.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::topology::{Exchange, ExchangeKind, Queue};
use helixmq::{Broker, Config, Metrics, Names, Secret, Topology};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Routing key of the work queue.
pub const WORK: &str = "work";

/// The test database's URL.
pub fn database_url() -> String {
    std::env::var("HELIXMQ_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/helixmq_test".into())
}

/// A unique lowercase tag for names (`hxt<hex>`).
pub fn tag() -> String {
    format!("hxt{:08x}", rand::random::<u32>())
}

/// A schema of its own for one test, with the outbox tables migrated into it;
/// dropped (CASCADE) when this drops.
#[derive(Debug)]
pub struct TestDb {
    /// The schema's name; also the prefix of this test's application names.
    pub schema: String,
    /// A pool on the schema for the test's own checks.
    pub pool: PgPool,
}

impl TestDb {
    /// Create the schema and migrate it.
    pub async fn new(tag: &str) -> TestDb {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot reach the test database {} ({e}): run scripts/provision",
                    database_url()
                )
            });
        sqlx::query(&format!("CREATE SCHEMA {tag}"))
            .execute(&admin)
            .await
            .expect("create schema");
        admin.close().await;
        let pool = named_pool(tag, "check", 4).await;
        // From here on the guard drops the schema, whatever happens.
        let db = TestDb {
            schema: tag.to_string(),
            pool,
        };
        helixmq::outbox::Outbox::migrate(&db.pool)
            .await
            .expect("migrate");
        db
    }

    /// The URL of this schema for a process of its own, named `{schema}-{role}`.
    pub fn url(&self, role: &str) -> String {
        format!(
            "{}?application_name={}-{role}&options=-csearch_path%3D{}",
            database_url(),
            self.schema,
            self.schema
        )
    }

    /// A pool on the schema whose connections are named `{schema}-{role}`
    /// (what [`TestDb::terminate`] aims at).
    pub async fn pool_named(&self, role: &str, max: u32) -> PgPool {
        named_pool(&self.schema, role, max).await
    }

    /// `pg_terminate_backend` every connection named `{schema}-{role}`; how many.
    pub async fn terminate(&self, role: &str) -> usize {
        let name = format!("{}-{role}", self.schema);
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url())
            .await
            .expect("admin connection");
        let rows = sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&name)
        .fetch_all(&admin)
        .await
        .expect("pg_terminate_backend");
        admin.close().await;
        rows.len()
    }

    /// A count on the schema.
    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Synchronous on purpose: it also runs while a failed test unwinds.
        let out = std::process::Command::new("psql")
            .args([
                &database_url(),
                "-qc",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema),
            ])
            .output();
        if let Ok(o) = out {
            if !o.status.success() {
                eprintln!(
                    "drop schema {}: {}",
                    self.schema,
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
    }
}

async fn named_pool(schema: &str, role: &str, max: u32) -> PgPool {
    let opts = PgConnectOptions::from_str(&database_url())
        .unwrap()
        .application_name(&format!("{schema}-{role}"))
        .options([("search_path", schema)]);
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts)
        .await
        .expect("connect to the test database")
}

/// Configuration for the shared RabbitMQ as guest, reconnecting forever from 200 ms.
pub fn rabbit_config(prefix: &str) -> Config {
    let mut c = Config::default();
    c.rabbitmq.host = "127.0.0.1".into();
    c.rabbitmq.port = 5672;
    c.rabbitmq.username = "guest".into();
    c.rabbitmq.password = Secret::new("guest");
    c.rabbitmq.vhost = "/".into();
    c.rabbitmq.connect_timeout = Duration::from_secs(5);
    c.rabbitmq.reconnect_delay = Duration::from_millis(200);
    c.rabbitmq.max_reconnect_attempts = 0;
    c.rabbitmq.publish_timeout = Duration::from_secs(30);
    c.helixmq.prefix = prefix.into();
    c
}

/// This test's RabbitMQ names: prefix `helixagent.<tag>`, and a guard that
/// deletes every queue and exchange under it on drop.
#[derive(Debug)]
pub struct Rabbit {
    /// `helixagent.<tag>`.
    pub prefix: String,
    /// The work queue, `{prefix}.tasks.work`.
    pub queue: String,
    /// The tasks exchange, `{prefix}.tasks`.
    pub exchange: String,
}

impl Rabbit {
    /// Names for `tag`.
    pub fn new(tag: &str) -> Rabbit {
        let prefix = format!("helixagent.{tag}");
        let names = Names::new(&prefix);
        Rabbit {
            queue: names.task_queue(WORK),
            exchange: names.tasks_exchange(),
            prefix,
        }
    }

    /// The name of this test's connections with role `role`.
    pub fn connection_name(&self, role: &str) -> String {
        format!("hxpg-{}-{role}", self.prefix)
    }

    /// A broker on a connection named for `role`, with the work topology declared.
    pub async fn broker(&self, role: &str) -> Broker {
        let config = rabbit_config(&self.prefix);
        let metrics = Metrics::default();
        let backend = RabbitBackend::connect_named(
            &config.rabbitmq,
            metrics.clone(),
            &self.connection_name(role),
        )
        .await
        .unwrap_or_else(|e| panic!("connect to RabbitMQ: {e}"));
        let b = Broker::builder(config)
            .metrics(metrics)
            .custom_backend(Arc::new(backend));
        b.declare(&self.topology()).await.expect("declare");
        b
    }

    /// System queues, the tasks exchange and the work queue.
    pub fn topology(&self) -> Topology {
        let names = Names::new(&self.prefix);
        let mut t = Topology::system(&names);
        t.exchanges.push(Exchange {
            name: self.exchange.clone(),
            kind: ExchangeKind::Direct,
            durable: true,
            alternate_exchange: None,
        });
        t.add_work_queue(Queue::durable(self.queue.clone()), &self.exchange, WORK);
        t
    }

    /// `rabbitmqctl close_connection` on every connection of this test named
    /// for `role`; how many.
    pub fn close_connections(&self, role: &str) -> usize {
        close_connections_named(&self.connection_name(role))
    }
}

/// `rabbitmqctl close_connection` on every connection named `name`; how many.
pub fn close_connections_named(name: &str) -> usize {
    let needle = format!("\"{name}\"");
    let list = ctl(&["list_connections", "pid", "client_properties"]).unwrap_or_default();
    list.lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|pid| {
            ctl(&[
                "close_connection",
                pid,
                "helixmq postgres test: forced close",
            ])
            .is_ok()
        })
        .count()
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let api = "http://127.0.0.1:15672/api";
        for kind in ["queues", "exchanges"] {
            let list = curl(&["-fsS", &format!("{api}/{kind}/%2f?columns=name")]);
            let names: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap_or_default();
            for n in names.iter().filter_map(|v| v["name"].as_str()) {
                if n == self.prefix || n.starts_with(&format!("{}.", self.prefix)) {
                    let enc = percent_encode(n);
                    curl(&["-fsS", "-X", "DELETE", &format!("{api}/{kind}/%2f/{enc}")]);
                }
            }
        }
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn curl(args: &[&str]) -> String {
    std::process::Command::new("curl")
        .args(["-u", "guest:guest"])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn ctl(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

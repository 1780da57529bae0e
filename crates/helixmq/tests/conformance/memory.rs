//! The conformance suite on the embedded broker.

use helixmq::{Broker, Config};

/// A fresh embedded broker under `prefix`.
async fn make_broker(prefix: &str) -> Broker {
    let mut config = Config::default();
    config.helixmq.prefix = prefix.to_string();
    Broker::embedded(config)
}

helixmq_testkit::helixmq_conformance!(make_broker);

//! The conformance suite on RabbitMQ, run as the spec's least-privilege user
//! `helixagent` (configure/write/read `^helixagent\..*`): every case's prefix is
//! `helixagent.t<random>`, so the whole suite also proves the permissions suffice.

use helixmq::Broker;
use helixmq_testkit::broker;

/// A RabbitMQ broker under `prefix`, on a connection named after it.
async fn make_broker(prefix: &str) -> Broker {
    broker::broker(broker::config(broker::HELIXAGENT, prefix))
        .await
        .expect("connect to the local RabbitMQ as helixagent (run scripts/provision)")
}

helixmq_testkit::helixmq_conformance!(make_broker);

//! The RabbitMQ backend on lapin (stub).

use async_trait::async_trait;
use tokio::sync::watch;

use crate::backend::{
    Backend, BackendKind, ConnectionState, Delivery, DeliveryStream, Outgoing, QueueStats,
};
use crate::error::{Error, Result};
use crate::topology::Topology;

/// The embedded broker.
pub struct RabbitBackend {
    state: watch::Sender<ConnectionState>,
}

impl RabbitBackend {
    /// Connect.
    pub async fn connect(
        _cfg: &crate::config::RabbitMqConfig,
        _m: crate::metrics::Metrics,
    ) -> Result<Self> {
        Err(Error::NotConnected)
    }
}

#[async_trait]
impl Backend for RabbitBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::RabbitMq
    }
    async fn declare(&self, _t: &Topology) -> Result<()> {
        Err(Error::NotConnected)
    }
    async fn publish(&self, _o: Outgoing<'_>, _t: std::time::Duration) -> Result<()> {
        Err(Error::NotConnected)
    }
    async fn consume(&self, _q: &str, _p: u16, _t: &str) -> Result<Box<dyn DeliveryStream>> {
        Err(Error::NotConnected)
    }
    async fn get(&self, _q: &str) -> Result<Option<Delivery>> {
        Err(Error::NotConnected)
    }
    async fn queue_stats(&self, _q: &str) -> Result<QueueStats> {
        Err(Error::NotConnected)
    }
    async fn purge(&self, _q: &str) -> Result<u64> {
        Err(Error::NotConnected)
    }
    async fn delete_queue(&self, _q: &str) -> Result<()> {
        Err(Error::NotConnected)
    }
    async fn delete_exchange(&self, _e: &str) -> Result<()> {
        Err(Error::NotConnected)
    }
    fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

//! An async flow over NATS JetStream: the caller gets its answer as soon as the first hop is
//! on the stream, each step travels as its own message, and the outcome arrives at a callback.
//! Needs a NATS server with JetStream (`SAGAFLOW_NATS_URL`, default `nats://127.0.0.1:4222`).
//! Run with `cargo run -p sagaflow-nats --example async_nats`.

use std::sync::Arc;
use std::time::Duration;

use sagaflow::{CallbackReport, CallbackSink, Flow, MemorySagaLog, Node, NodeError, Orchestrator, SagaCallback, Step};
use sagaflow_nats::{NatsBroker, NatsOptions};
use tokio::sync::mpsc;

struct Ship;

#[sagaflow::async_trait]
impl Node<Vec<String>> for Ship {
    fn name(&self) -> &str {
        "Ship"
    }
    async fn action(&self, step: &Step, parcels: &mut Vec<String>) -> Result<(), NodeError> {
        parcels.push(format!("parcel for {}", step.request_id()));
        Ok(())
    }
}

struct Notify;

#[sagaflow::async_trait]
impl Node<Vec<String>> for Notify {
    fn name(&self) -> &str {
        "Notify"
    }
    async fn action(&self, _step: &Step, parcels: &mut Vec<String>) -> Result<(), NodeError> {
        parcels.push("customer notified".into());
        Ok(())
    }
}

/// A callback sink that hands outcomes to this program; a service would POST them (HTTP).
struct Channel(mpsc::UnboundedSender<SagaCallback>);

#[sagaflow::async_trait]
impl CallbackSink for Channel {
    async fn deliver(&self, _url: &str, callback: SagaCallback) -> CallbackReport {
        let delivered = self.0.send(callback).is_ok();
        CallbackReport { delivered, attempts: 1, error: None }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("SAGAFLOW_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let options = NatsOptions::new(url)?.stream_prefix("SAGAFLOW_EXAMPLE")?.max_age(Duration::from_secs(600));
    let broker = Arc::new(NatsBroker::connect(options).await?);
    let (tx, mut outcomes) = mpsc::unbounded_channel();
    let orchestrator = Orchestrator::builder(broker, Arc::new(MemorySagaLog::new()))
        .callbacks(Arc::new(Channel(tx)))
        .asynchronous("Shipping", Flow::new().node(Ship).node(Notify))
        .start()
        .await?;
    let ids: Vec<String> = (0..3).map(|i| format!("shipment-{}-{i}", std::process::id())).collect();
    for id in &ids {
        orchestrator.submit("Shipping", id, Vec::<String>::new(), Some("example://outcomes".into())).await?;
        println!("{id}: accepted");
    }
    for _ in &ids {
        let callback =
            tokio::time::timeout(Duration::from_secs(30), outcomes.recv()).await?.ok_or("the orchestrator stopped")?;
        println!("{}: {:?} with {}", callback.request_id, callback.status, callback.data);
    }
    orchestrator.shutdown().await;
    Ok(())
}

//! A sync flow on the in-memory defaults: reserve stock, then charge; a refused charge
//! releases the stock again. Run with `cargo run -p sagaflow --example sync_flow`.

use std::sync::Arc;

use sagaflow::{Flow, MemoryBroker, MemorySagaLog, Node, NodeError, Orchestrator, Outcome, Step};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    amount: u64,
    reservation: Option<String>,
}

struct ReserveStock;

#[sagaflow::async_trait]
impl Node<Order> for ReserveStock {
    fn name(&self) -> &str {
        "ReserveStock"
    }
    async fn action(&self, step: &Step, order: &mut Order) -> Result<(), NodeError> {
        order.reservation = Some(format!("stock-{}", step.request_id()));
        Ok(())
    }
    async fn compensate(&self, step: &Step, order: &Order) -> Result<(), NodeError> {
        println!("{}: released {:?}", step.request_id(), order.reservation);
        Ok(())
    }
}

struct Charge;

#[sagaflow::async_trait]
impl Node<Order> for Charge {
    fn name(&self) -> &str {
        "Charge"
    }
    async fn action(&self, _step: &Step, order: &mut Order) -> Result<(), NodeError> {
        if order.amount > 100 { Err(NodeError::permanent("over the card's limit")) } else { Ok(()) }
    }
}

#[tokio::main]
async fn main() -> Result<(), sagaflow::Error> {
    let orchestrator = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .sync("Checkout", Flow::new().node(ReserveStock).node(Charge))
        .start()
        .await?;
    for (id, amount) in [("order-1", 40), ("order-2", 400)] {
        match orchestrator.run("Checkout", id, Order { amount, reservation: None }).await? {
            Outcome::Completed(order) => println!("{id}: completed with {:?}", order.reservation),
            Outcome::Compensated(f) => println!("{id}: compensated after {} failed: {}", f.node, f.error),
            Outcome::Stuck { reason, .. } => println!("{id}: stuck: {reason}"),
        }
    }
    orchestrator.shutdown().await;
    Ok(())
}

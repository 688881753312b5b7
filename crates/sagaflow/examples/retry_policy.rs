//! A custom retry policy and error classification: an inventory client whose errors are
//! classified by the node (a flaky network is retried, an unknown product is not).
//! Run with `cargo run -p sagaflow --example retry_policy`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sagaflow::{Flow, MemoryBroker, MemorySagaLog, Node, NodeError, Orchestrator, Outcome, RetryPolicy, Step};

/// What the (pretend) inventory client answers.
enum InventoryError {
    ConnectionReset,
    UnknownProduct(u32),
}

/// Fails with a reset connection on its first two calls for each product, as a flaky network would.
struct Inventory {
    calls: AtomicU32,
}

impl Inventory {
    fn reserve(&self, product: u32) -> Result<(), InventoryError> {
        if product > 100 {
            return Err(InventoryError::UnknownProduct(product));
        }
        if self.calls.fetch_add(1, Ordering::Relaxed) % 3 < 2 { Err(InventoryError::ConnectionReset) } else { Ok(()) }
    }
}

struct Reserve(Arc<Inventory>);

#[sagaflow::async_trait]
impl Node<u32> for Reserve {
    fn name(&self) -> &str {
        "Reserve"
    }
    async fn action(&self, step: &Step, product: &mut u32) -> Result<(), NodeError> {
        println!("  {} attempt {}", step.request_id(), step.attempt());
        // The node decides what is worth another attempt; the flow's policy decides how often.
        self.0.reserve(*product).map_err(|e| match e {
            InventoryError::ConnectionReset => NodeError::retryable("inventory: connection reset"),
            InventoryError::UnknownProduct(p) => NodeError::permanent(format!("inventory: no product {p}")),
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), sagaflow::Error> {
    let inventory = Arc::new(Inventory { calls: AtomicU32::new(0) });
    let retry = RetryPolicy::default().attempts(4).backoff(Duration::from_millis(20), Duration::from_millis(200));
    let flow = Flow::new().node(Reserve(inventory)).retry(retry).step_timeout(Duration::from_secs(1));
    let orchestrator = Orchestrator::builder(Arc::new(MemoryBroker::new()), Arc::new(MemorySagaLog::new()))
        .sync("Reserve", flow)
        .start()
        .await?;
    for (id, product) in [("flaky-network", 7u32), ("unknown-product", 999)] {
        println!("{id}:");
        match orchestrator.run("Reserve", id, product).await? {
            Outcome::Completed(_) => println!("  completed"),
            Outcome::Compensated(f) => println!("  compensated: {}", f.error),
            Outcome::Stuck { reason, .. } => println!("  stuck: {reason}"),
        }
    }
    orchestrator.shutdown().await;
    Ok(())
}

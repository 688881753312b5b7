//! Throughput of a two-step sync flow whose nodes do nothing, on the in-memory
//! broker and log: the engine's own cost per saga, for comparing two builds.
//!
//! `cargo run --release -p sagaflow --example linear_overhead -- [SECONDS] [TAG]`
//! runs 32 callers in a closed loop for SECONDS (default 5) and prints the
//! sagas per second and the median latency, labelled TAG.
use std::sync::Arc;
use std::time::{Duration, Instant};

use sagaflow::log::SagaLog;
use sagaflow::{Flow, MemoryBroker, MemorySagaLog, Node, NodeError, Orchestrator, Outcome, Step};

struct Noop(&'static str);

#[sagaflow::async_trait]
impl Node<Vec<u64>> for Noop {
    fn name(&self) -> &str {
        self.0
    }
    async fn action(&self, _: &Step, d: &mut Vec<u64>) -> Result<(), NodeError> {
        d.push(1);
        Ok(())
    }
    async fn compensate(&self, _: &Step, _: &Vec<u64>) -> Result<(), NodeError> {
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().map(|a| a.parse().unwrap()).unwrap_or(5);
    let tag = args.next().unwrap_or_default();
    let log: Arc<dyn SagaLog> = Arc::new(MemorySagaLog::new());
    let o = Orchestrator::builder(Arc::new(MemoryBroker::new()), log)
        .sync("F", Flow::new().node(Noop("A")).node(Noop("B")))
        .start()
        .await
        .unwrap();
    let o = Arc::new(o);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut workers = Vec::new();
    for w in 0..32 {
        let o = o.clone();
        let tag = tag.clone();
        workers.push(tokio::spawn(async move {
            let mut lat: Vec<Duration> = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until {
                let t = Instant::now();
                let out = o.run("F", &format!("{tag}-{w}-{n}"), Vec::<u64>::new()).await.unwrap();
                assert!(matches!(out, Outcome::Completed(_)));
                lat.push(t.elapsed());
                n += 1;
            }
            lat
        }));
    }
    let mut all: Vec<Duration> = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all.sort();
    let p50 = all[all.len() / 2];
    println!("{tag}: {} sagas/s, p50 {:.1} us", all.len() as u64 / secs, p50.as_secs_f64() * 1e6);
}

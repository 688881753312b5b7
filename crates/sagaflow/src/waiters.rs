//! In-process completions: callers waiting for a saga's end, keyed by request id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::saga::SagaRecord;

/// Who is waiting for which saga. Entries leave when the saga ends or the
/// waiter gives up, so nothing stays behind.
#[derive(Debug, Default)]
pub(crate) struct Completions {
    waiting: Mutex<HashMap<String, Vec<oneshot::Sender<SagaRecord>>>>,
}

impl Completions {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<oneshot::Sender<SagaRecord>>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts waiting; register before the work that may end the saga starts.
    pub(crate) fn register(self: &Arc<Self>, request_id: &str) -> Waiter {
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.lock();
            waiting.entry(request_id.to_owned()).or_default().push(tx);
            metrics::gauge!(crate::metrics::WAITING_CALLERS).set(waiting.len() as f64);
        }
        Waiter { completions: self.clone(), request_id: request_id.to_owned(), rx: Some(rx) }
    }

    /// Hands an ended saga to everyone waiting for it.
    pub(crate) fn complete(&self, record: &SagaRecord) {
        let senders = {
            let mut waiting = self.lock();
            let senders = waiting.remove(&record.request_id);
            if senders.is_some() {
                metrics::gauge!(crate::metrics::WAITING_CALLERS).set(waiting.len() as f64);
            }
            senders
        };
        for tx in senders.into_iter().flatten() {
            let _ = tx.send(record.clone());
        }
    }

    /// Whether somebody in this process waits for the saga.
    pub(crate) fn is_waiting(&self, request_id: &str) -> bool {
        self.lock().contains_key(request_id)
    }

    /// Number of request ids somebody waits for.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// One caller's wait; dropping it removes its entry.
#[derive(Debug)]
pub(crate) struct Waiter {
    completions: Arc<Completions>,
    request_id: String,
    rx: Option<oneshot::Receiver<SagaRecord>>,
}

impl Waiter {
    /// The ended saga; `None` if the completions were dropped.
    pub(crate) async fn wait(&mut self) -> Option<SagaRecord> {
        match self.rx.as_mut() {
            Some(rx) => rx.await.ok(),
            None => None,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
        }
        let mut waiting = self.completions.lock();
        if let Some(senders) = waiting.get_mut(&self.request_id) {
            senders.retain(|tx| !tx.is_closed());
            if senders.is_empty() {
                waiting.remove(&self.request_id);
                metrics::gauge!(crate::metrics::WAITING_CALLERS).set(waiting.len() as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::saga::{Mode, NewSaga};

    fn record(id: &str) -> SagaRecord {
        SagaRecord::new(NewSaga {
            request_id: id.into(),
            facade: "F".into(),
            mode: Mode::Throttling,
            steps: 1,
            data: json!(null),
            deadline_ms: 0,
            callback_url: None,
            owner: None,
            version: None,
        })
    }

    #[tokio::test]
    async fn every_waiter_of_a_request_id_gets_the_outcome() {
        let c = Arc::new(Completions::default());
        let mut a = c.register("r");
        let mut b = c.register("r");
        c.complete(&record("r"));
        assert_eq!(a.wait().await.unwrap().request_id, "r");
        assert_eq!(b.wait().await.unwrap().request_id, "r");
        assert_eq!(c.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_nothing_behind() {
        let c = Arc::new(Completions::default());
        let a = c.register("r");
        let b = c.register("r");
        drop(a);
        assert_eq!(c.len(), 1);
        drop(b);
        assert_eq!(c.len(), 0);
        c.complete(&record("r"));
        assert_eq!(c.len(), 0);
    }
}

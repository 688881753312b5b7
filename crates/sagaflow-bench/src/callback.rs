//! The HTTP receiver of async bookings' callbacks: an async request's latency ends when its
//! callback arrives here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::oneshot;

/// The fields of the orchestrator's callback body this bench reads.
#[derive(Debug, Deserialize)]
struct CallbackBody {
    request_id: String,
    /// `completed`, `compensated` or `stuck`.
    status: String,
}

/// Requests waiting for their callback, by request id.
#[derive(Debug, Default)]
pub(crate) struct CallbackHub {
    waiting: Mutex<HashMap<String, oneshot::Sender<String>>>,
    unexpected: AtomicU64,
}

impl CallbackHub {
    /// Starts waiting for `request_id`'s callback; register before sending the request, since the
    /// callback may arrive before its answer. Dropping the [`Waiting`] stops waiting.
    pub(crate) fn wait_for(self: &Arc<Self>, request_id: &str) -> Waiting {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(request_id.to_owned(), tx);
        Waiting { hub: self.clone(), request_id: request_id.to_owned(), rx: Some(rx) }
    }

    /// Hands a received callback to its waiting request; false when none waits for it.
    pub(crate) fn deliver(&self, request_id: &str, status: String) -> bool {
        let waiting = self.lock().remove(request_id);
        match waiting.map(|tx| tx.send(status)) {
            Some(Ok(())) => true,
            _ => {
                self.unexpected.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Callbacks that arrived for no waiting request (duplicates, or after `--wait`).
    pub(crate) fn unexpected(&self) -> u64 {
        self.unexpected.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<String>>> {
        // Each critical section is a single map operation: a poisoned map is still consistent.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One request waiting for its callback.
#[derive(Debug)]
pub(crate) struct Waiting {
    hub: Arc<CallbackHub>,
    request_id: String,
    rx: Option<oneshot::Receiver<String>>,
}

impl Waiting {
    /// The callback's status, once it arrives.
    pub(crate) async fn status(&mut self) -> Option<String> {
        self.rx.as_mut()?.await.ok()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.hub.lock().remove(&self.request_id);
    }
}

/// Serves `POST /cb` on `listen` until the runtime ends; returns the URL to give as `CallbackURL`.
pub(crate) async fn serve(hub: Arc<CallbackHub>, listen: SocketAddr) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the callback receiver to {listen}"))?;
    let addr = listener.local_addr()?;
    let app = Router::new().route("/cb", post(receive)).with_state(hub);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("sagaflow-bench: callback receiver stopped: {error}");
        }
    });
    Ok(format!("http://{addr}/cb"))
}

async fn receive(State(hub): State<Arc<CallbackHub>>, Json(body): Json<CallbackBody>) -> StatusCode {
    hub.deliver(&body.request_id, body.status);
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_callback_reaches_the_request_waiting_for_it_once() {
        let hub = Arc::new(CallbackHub::default());
        let mut waiting = hub.wait_for("r-1");
        assert!(hub.deliver("r-1", "completed".into()));
        assert_eq!(waiting.status().await.as_deref(), Some("completed"));
        // A duplicate, and one nobody waits for, are counted as unexpected.
        assert!(!hub.deliver("r-1", "completed".into()));
        assert!(!hub.deliver("r-2", "completed".into()));
        assert_eq!(hub.unexpected(), 2);
    }

    #[tokio::test]
    async fn a_request_that_gives_up_stops_waiting() {
        let hub = Arc::new(CallbackHub::default());
        drop(hub.wait_for("r-1"));
        assert!(!hub.deliver("r-1", "completed".into()));
        assert!(hub.lock().is_empty());
    }
}

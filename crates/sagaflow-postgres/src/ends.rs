//! The announcements of saga ends (`NOTIFY sagaflow_ends`), relayed to the
//! orchestrator so callers waiting on one replica learn of an end in another.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// Channel the migrations' trigger announces on.
const CHANNEL: &str = "sagaflow_ends";
/// Pause before listening again after the connection failed.
const RETRY: Duration = Duration::from_secs(1);
/// Ends buffered for slow receivers; a receiver that lags re-reads the log.
const BUFFER: usize = 4096;

/// A listening task; stops when dropped.
#[derive(Debug)]
pub(crate) struct Ends {
    sender: broadcast::Sender<String>,
    task: JoinHandle<()>,
}

impl Ends {
    /// Starts listening for the ends of sagas in `schema`.
    pub(crate) fn listen(pool: PgPool, schema: String, target: String) -> Self {
        let (sender, _) = broadcast::channel(BUFFER);
        let relay = sender.clone();
        let task = tokio::spawn(async move {
            let prefix = format!("{schema} ");
            loop {
                let mut listener = match PgListener::connect_with(&pool).await {
                    Ok(listener) => listener,
                    Err(e) => {
                        tracing::debug!(%target, error = %e, "cannot listen for saga ends yet");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                };
                if let Err(e) = listener.listen(CHANNEL).await {
                    tracing::debug!(%target, error = %e, "cannot listen for saga ends yet");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                // `try_recv` gives `None` when the connection dropped (ends may have been
                // missed then; waiting callers re-read the log) and reconnects on the next call.
                loop {
                    match listener.try_recv().await {
                        Ok(Some(notification)) => {
                            if let Some(id) = notification.payload().strip_prefix(&prefix) {
                                let _ = relay.send(id.to_owned());
                            }
                        }
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::debug!(%target, error = %e, "listening for saga ends failed; listening again");
                            tokio::time::sleep(RETRY).await;
                            break;
                        }
                    }
                }
            }
        });
        Self { sender, task }
    }

    /// A new receiver of ended request ids.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<String> {
        self.sender.subscribe()
    }
}

impl Drop for Ends {
    fn drop(&mut self) {
        self.task.abort();
    }
}

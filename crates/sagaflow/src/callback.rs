//! Where the outcome of an async saga is delivered (the HTTP callback).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// How an async saga ended, as told to its callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackStatus {
    /// Every step succeeded.
    Completed,
    /// A step failed and the completed ones were undone.
    Compensated,
    /// A compensation gave up; an operator must look.
    Stuck,
}

/// The body POSTed to a saga's callback URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaCallback {
    /// The saga's request id.
    pub request_id: String,
    /// Its facade.
    pub facade: String,
    /// How it ended.
    pub status: CallbackStatus,
    /// The flow data at its end.
    pub data: serde_json::Value,
    /// Why it did not complete, if it did not.
    pub error: Option<String>,
}

/// How a callback delivery went; recorded in the saga's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackReport {
    /// Whether the receiver accepted it.
    pub delivered: bool,
    /// Attempts made.
    pub attempts: u32,
    /// The last error, if not delivered.
    pub error: Option<String>,
}

/// Delivers ended sagas' outcomes; the service supplies one (HTTP).
#[async_trait]
pub trait CallbackSink: Send + Sync + 'static {
    /// Delivers one outcome to `url`, retrying a bounded number of times.
    async fn deliver(&self, url: &str, callback: SagaCallback) -> CallbackReport;
}

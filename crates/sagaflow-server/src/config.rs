//! Configuration sections every orchestrator service shares, with their defaults.

use serde::Deserialize;

/// HTTP callbacks of async sagas.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackConfig {
    /// Hosts a callback URL may name (no server-side request forgery through us): `host`
    /// for any port, `host:port` for that port only (IPv6: `::1`, `[::1]:8080`). The
    /// orchestrator's own listeners are refused whatever this allows.
    pub allow: Vec<String>,
    /// Delivery attempts per callback.
    pub attempts: u32,
    /// Timeout of one delivery attempt, in ms.
    pub timeout_ms: u64,
    /// Key of the `Sagaflow-Signature` HMAC; unsigned callbacks when unset.
    pub secret: Option<String>,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        Self {
            allow: vec!["127.0.0.1".into(), "localhost".into(), "::1".into()],
            attempts: 5,
            timeout_ms: 5_000,
            secret: None,
        }
    }
}

impl std::fmt::Debug for CallbackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackConfig")
            .field("allow", &self.allow)
            .field("attempts", &self.attempts)
            .field("timeout_ms", &self.timeout_ms)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .finish()
    }
}

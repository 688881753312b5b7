//! HTTP delivery of async sagas' outcomes, to allowed hosts only.

use std::time::Duration;

use sagaflow::{CallbackReport, CallbackSink, SagaCallback};

use crate::config::CallbackConfig;

/// Which callback URLs a request may give (no request forgery through us).
#[derive(Debug, Clone)]
pub struct CallbackPolicy {
    allow: Vec<String>,
}

impl CallbackPolicy {
    /// A policy allowing the hosts of `config.allow`.
    pub fn new(config: &CallbackConfig) -> Self {
        Self {
            allow: config.allow.iter().map(|h| h.trim_matches(|c| c == '[' || c == ']').to_ascii_lowercase()).collect(),
        }
    }

    /// The URL if it is `http://` to an allowed host, else why not.
    pub fn check(&self, url: &str) -> Result<String, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("CallbackURL `{url}` is not a URL: {e}"))?;
        if parsed.scheme() != "http" {
            return Err(format!("CallbackURL `{url}`: only http:// callbacks are supported"));
        }
        let host = parsed.host_str().unwrap_or("").trim_matches(|c| c == '[' || c == ']').to_ascii_lowercase();
        if !self.allow.contains(&host) {
            return Err(format!("CallbackURL `{url}`: host `{host}` is not in callbacks.allow"));
        }
        Ok(url.to_owned())
    }
}

/// The header carrying a callback's idempotency key: the saga's request id, the same on
/// every attempt, so the receiver can drop a repeat.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// The header carrying a callback's signature when `callbacks.secret` is set:
/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub const SIGNATURE_HEADER: &str = "Sagaflow-Signature";

/// POSTs outcomes as JSON, retrying with backoff; keyed for deduplication, signed when a
/// secret is configured.
#[derive(Clone)]
pub struct HttpCallbacks {
    client: reqwest::Client,
    attempts: u32,
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for HttpCallbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCallbacks")
            .field("attempts", &self.attempts)
            .field("signed", &self.secret.is_some())
            .finish()
    }
}

impl HttpCallbacks {
    /// A sink with the attempts, timeout and secret of `config`.
    pub fn new(config: &CallbackConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let secret = config.secret.as_ref().map(|s| s.as_bytes().to_vec());
        Ok(Self { client, attempts: config.attempts, secret })
    }
}

/// The `Sagaflow-Signature` value of `body` sent at `timestamp` (Unix seconds).
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    use hmac::{KeyInit as _, Mac as _};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What went wrong with a request: its error and their causes, without the URL (it may
/// carry credentials; the saga record names the callback already).
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&crate::redact::url(&cause.to_string()));
        source = cause.source();
    }
    text
}

#[sagaflow::async_trait]
impl CallbackSink for HttpCallbacks {
    async fn deliver(&self, url: &str, callback: SagaCallback) -> CallbackReport {
        let body = match serde_json::to_vec(&callback) {
            Ok(body) => body,
            Err(e) => {
                let error = Some(format!("the callback body could not be encoded: {e}"));
                return CallbackReport { delivered: false, attempts: 0, error };
            }
        };
        let mut last_error = String::new();
        for attempt in 1..=self.attempts {
            let mut request = self
                .client
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(IDEMPOTENCY_KEY_HEADER, &callback.request_id)
                .body(body.clone());
            // Signed per attempt: a retry is not refused as stale by a receiver checking the age.
            if let Some(secret) = &self.secret {
                request = request.header(SIGNATURE_HEADER, signature(secret, unix_seconds(), &body));
            }
            match request.send().await {
                Ok(response) if response.status().is_success() => {
                    return CallbackReport { delivered: true, attempts: attempt, error: None };
                }
                Ok(response) => last_error = format!("HTTP {}", response.status()),
                Err(e) => last_error = describe(e),
            }
            tracing::debug!(url = %crate::redact::url(url), attempt, error = %last_error, "callback attempt failed");
            if attempt < self.attempts {
                tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(attempt.min(6) - 1))).await;
            }
        }
        CallbackReport { delivered: false, attempts: self.attempts, error: Some(last_error) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_http_hosts_pass() {
        let policy = CallbackPolicy::new(&CallbackConfig::default());
        assert!(policy.check("http://127.0.0.1:8080/cb").is_ok());
        assert!(policy.check("http://[::1]:8080/cb").is_ok());
        assert!(policy.check("http://localhost/cb").is_ok());
        assert!(policy.check("http://169.254.169.254/latest").unwrap_err().contains("not in callbacks.allow"));
        assert!(policy.check("file:///etc/passwd").unwrap_err().contains("http://"));
        assert!(policy.check("not a url").is_err());
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Expected value from Python: hmac.new(b"Jefe", b'1700000000.{"request_id":"r1"}', sha256).
        let sig = signature(b"Jefe", 1_700_000_000, br#"{"request_id":"r1"}"#);
        assert_eq!(sig, "t=1700000000,v1=4de70a60f4dd6bbfc5ce099b742347a732a2886c99c1dfab231f80e1b8cc846f");
    }
}

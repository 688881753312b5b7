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

/// POSTs outcomes as JSON, retrying with backoff.
#[derive(Debug, Clone)]
pub struct HttpCallbacks {
    client: reqwest::Client,
    attempts: u32,
}

impl HttpCallbacks {
    /// A sink with the attempts and timeout of `config`.
    pub fn new(config: &CallbackConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { client, attempts: config.attempts })
    }
}

#[sagaflow::async_trait]
impl CallbackSink for HttpCallbacks {
    async fn deliver(&self, url: &str, callback: SagaCallback) -> CallbackReport {
        let mut last_error = String::new();
        for attempt in 1..=self.attempts {
            match self.client.post(url).json(&callback).send().await {
                Ok(response) if response.status().is_success() => {
                    return CallbackReport { delivered: true, attempts: attempt, error: None };
                }
                Ok(response) => last_error = format!("HTTP {}", response.status()),
                Err(e) => last_error = e.to_string(),
            }
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
}

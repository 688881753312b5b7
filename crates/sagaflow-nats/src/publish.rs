//! Publishing: confirmed by JetStream, deduplicated by message id, retried through reconnects.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use sagaflow::ErrorSource;
use sagaflow::broker::{BrokerError, Message};
use tokio::time::Instant;

use crate::connection::{Shared, validate_subject};
use crate::error::Error;

/// The header JetStream deduplicates on, within the stream's duplicate window.
pub const NATS_MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// A transport-neutral message id header; the driver uses it as the JetStream message id.
pub const MESSAGE_ID_HEADER: &str = "x-message-id";
/// Marks a `Nats-Msg-Id` the driver added itself, so it is removed again on delivery.
const DRIVER_ID_MARKER: &str = "Sagaflow-Msg-Id-Added";

/// [`Broker::publish`](sagaflow::broker::Broker::publish): refused once the broker is closed.
pub(crate) async fn publish(shared: &Shared, message: Message) -> Result<(), BrokerError> {
    if shared.closed.is_cancelled() {
        return Err(BrokerError::Closed);
    }
    send(shared, message, None).await
}

/// Publishes `message` and waits for its JetStream ack, retrying until the publish timeout;
/// also used to dead-letter deliveries settled after close.
///
/// Retries are safe because every attempt carries the same message id: the caller's
/// (`Nats-Msg-Id`, else `x-message-id`), else `fallback_id`, else a fresh random one.
pub(crate) async fn send(shared: &Shared, message: Message, fallback_id: Option<String>) -> Result<(), BrokerError> {
    validate_subject(&message.topic).map_err(BrokerError::Invalid)?;
    let headers = to_headers(&message.headers, fallback_id)?;
    let subject = shared.subject(&message.topic);
    let timeout = shared.options.publish_timeout;
    let deadline = Instant::now() + timeout;
    let mut last = Failure::Retry(Cause::new("no confirmation yet", None));
    for attempt in 0u32.. {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let once = try_publish(shared, &message.topic, &subject, headers.clone(), message.payload.clone());
        match tokio::time::timeout(remaining, once).await {
            Ok(Ok(ack)) => {
                if ack.duplicate {
                    tracing::debug!(topic = %message.topic, sequence = ack.sequence, "duplicate publish dropped by the server");
                }
                return Ok(());
            }
            Ok(Err(Failure::Fatal(e))) => return Err(e),
            Ok(Err(failure)) => last = failure,
            Err(_) => break,
        }
        let pause = backoff(attempt).min(deadline.saturating_duration_since(Instant::now()));
        if pause.is_zero() {
            break;
        }
        tracing::debug!(topic = %message.topic, attempt, reason = %last.reason(), "publish not confirmed; retrying");
        tokio::time::sleep(pause).await;
    }
    let state = shared.client.connection_state();
    Err(match last {
        Failure::Refused(cause) if state == async_nats::connection::State::Connected => {
            BrokerError::NotConfirmed { topic: message.topic, reason: cause.reason, source: cause.source }
        }
        Failure::Fatal(e) => e,
        Failure::Retry(cause) | Failure::Refused(cause) => BrokerError::Unavailable {
            context: format!(
                "publish to `{}` not confirmed by NATS within {timeout:?} (connection {state:?}); \
                 it may or may not have been stored; last error: {}",
                message.topic, cause.reason
            ),
            source: cause.source,
        },
    })
}

/// Why one attempt failed.
enum Failure {
    /// Transient (timeout, connection loss, stream missing): try again.
    Retry(Cause),
    /// The server refused while reachable (e.g. stream creation); retried, but reported as such.
    Refused(Cause),
    /// Retrying cannot help.
    Fatal(BrokerError),
}

/// Why an attempt failed, and the client's error behind it.
struct Cause {
    reason: String,
    source: Option<ErrorSource>,
}

impl Cause {
    fn new(reason: impl Into<String>, source: Option<ErrorSource>) -> Self {
        Cause { reason: reason.into(), source }
    }
}

impl From<Error> for Cause {
    fn from(error: Error) -> Self {
        match error {
            Error::Connect { context, source }
            | Error::Unavailable { context, source }
            | Error::JetStream { context, source } => Cause { reason: context, source },
            other => Cause::new(other.to_string(), None),
        }
    }
}

impl Failure {
    fn reason(&self) -> String {
        match self {
            Failure::Retry(cause) | Failure::Refused(cause) => match &cause.source {
                Some(source) => format!("{}: {source}", cause.reason),
                None => cause.reason.clone(),
            },
            Failure::Fatal(e) => e.to_string(),
        }
    }
}

async fn try_publish(
    shared: &Shared,
    topic: &str,
    subject: &str,
    headers: HeaderMap,
    payload: bytes::Bytes,
) -> Result<PublishAck, Failure> {
    shared.ensure_stream(topic).await.map_err(|e| match e {
        refused @ Error::JetStream { .. } => Failure::Refused(refused.into()),
        other => Failure::Retry(other.into()),
    })?;
    let publish = PublishMessage::build().headers(headers).payload(payload);
    let sent = shared.jetstream.send_publish(subject.to_string(), publish).await;
    let result = match sent {
        Ok(ack) => ack.await,
        Err(e) => Err(e),
    };
    result.map_err(|e| match e.kind() {
        PublishErrorKind::StreamNotFound => {
            shared.forget_stream(topic);
            Failure::Retry(Cause::new(format!("no stream for `{subject}` (yet)"), Some(ErrorSource::new(e))))
        }
        PublishErrorKind::MaxPayloadExceeded => Failure::Fatal(BrokerError::Invalid(format!(
            "message to `{topic}` is larger than the server's max_payload ({} bytes): {e}",
            shared.client.max_payload()
        ))),
        // The server answered with an error (limits, a sealed stream): retrying cannot help.
        PublishErrorKind::Other => Failure::Fatal(BrokerError::not_confirmed(topic, "refused by the server", e)),
        _ => Failure::Retry(Cause::new("publish not confirmed", Some(ErrorSource::new(e)))),
    })
}

/// 50 ms doubling up to 1 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64 << attempt.min(5)).min(Duration::from_secs(1))
}

/// The NATS headers of a message, with the message id JetStream deduplicates on.
pub(crate) fn to_headers(
    headers: &BTreeMap<String, String>,
    fallback_id: Option<String>,
) -> Result<HeaderMap, BrokerError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let header_name = (!name.is_empty()).then(|| HeaderName::from_str(name).ok()).flatten().ok_or_else(|| {
            BrokerError::Invalid(format!("header name `{}` is not valid in NATS", name.escape_debug()))
        })?;
        let header_value = HeaderValue::from_str(value).map_err(|_| {
            BrokerError::Invalid(format!("header `{name}` has a value with a line break, not valid in NATS"))
        })?;
        map.insert(header_name, header_value);
    }
    if !headers.contains_key(NATS_MSG_ID_HEADER) {
        let id = headers
            .get(MESSAGE_ID_HEADER)
            .cloned()
            .or(fallback_id)
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let id = HeaderValue::from_str(&id)
            .map_err(|_| BrokerError::Invalid(format!("`{MESSAGE_ID_HEADER}` has a line break")))?;
        map.insert(NATS_MSG_ID_HEADER, id);
        map.insert(DRIVER_ID_MARKER, "1");
    }
    Ok(map)
}

/// The application headers of a delivered message: the driver's own message id removed.
pub(crate) fn from_headers(headers: Option<&HeaderMap>) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let Some(headers) = headers else { return map };
    for (name, values) in headers.iter() {
        if let Some(value) = values.last() {
            map.insert(name.to_string(), value.as_str().to_string());
        }
    }
    if map.remove(DRIVER_ID_MARKER).is_some() {
        map.remove(NATS_MSG_ID_HEADER);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn message_id_comes_from_the_caller_and_round_trips_invisibly() {
        let sent = headers(&[("x-request-id", "r1"), (MESSAGE_ID_HEADER, "r1:step2:action")]);
        let wire = to_headers(&sent, None).unwrap();
        assert_eq!(wire.get(NATS_MSG_ID_HEADER).map(HeaderValue::as_str), Some("r1:step2:action"));
        assert_eq!(from_headers(Some(&wire)), sent);

        let own = headers(&[(NATS_MSG_ID_HEADER, "mine")]);
        let wire = to_headers(&own, Some("fallback".into())).unwrap();
        assert_eq!(wire.get(NATS_MSG_ID_HEADER).map(HeaderValue::as_str), Some("mine"));
        assert_eq!(from_headers(Some(&wire)), own, "a caller's own Nats-Msg-Id is delivered");
    }

    #[test]
    fn message_id_falls_back_then_is_random() {
        let wire = to_headers(&BTreeMap::new(), Some("dlq-S-7".into())).unwrap();
        assert_eq!(wire.get(NATS_MSG_ID_HEADER).map(HeaderValue::as_str), Some("dlq-S-7"));
        let a = to_headers(&BTreeMap::new(), None).unwrap();
        let b = to_headers(&BTreeMap::new(), None).unwrap();
        assert_ne!(a.get(NATS_MSG_ID_HEADER), b.get(NATS_MSG_ID_HEADER));
        assert!(from_headers(Some(&a)).is_empty());
    }

    #[test]
    fn headers_nats_cannot_carry_are_refused() {
        for bad in
            [headers(&[("", "v")]), headers(&[("a:b", "v")]), headers(&[("a b", "v")]), headers(&[("n", "a\r\nb")])]
        {
            assert!(matches!(to_headers(&bad, None), Err(BrokerError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(50));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(40), Duration::from_secs(1));
    }
}

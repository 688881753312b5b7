//! Publishing: persistent, mandatory, confirmed one message at a time, and
//! patient through a reconnection up to the publish timeout.

use std::time::Duration;

use bytes::Bytes;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation};
use sagaflow::broker::{BrokerError, Message};
use tokio::time::Instant;

use crate::connection::{Connector, Live, MAX_QUEUE_NAME, delay_queue_name};
use crate::error::{broker_error, is_connection_error};

/// The header that carries how many times a message was delivered before it
/// was parked in a delay queue (RabbitMQ counts only what happens after).
pub(crate) const DELIVERIES_HEADER: &str = "x-sagaflow-deliveries";

/// AMQP's reply code for a mandatory message no queue is bound for.
const NO_ROUTE: u16 = 312;
/// `delivery_mode` of a message written to disk.
const PERSISTENT: u8 = 2;
/// The longest pause between two attempts at one publish.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Where a message goes.
#[derive(Clone, Copy)]
enum Route<'a> {
    /// To every group's queue of its topic, through the exchange.
    Topic,
    /// To the delay queue in front of `queue`, to come back to it after `delay`.
    Delay { queue: &'a str, deliveries: u32, delay: Duration },
}

/// Publishes `message` to its topic and waits for the broker's confirm.
pub(crate) async fn publish(connector: &Connector, message: &Message) -> Result<(), BrokerError> {
    validate_topic(&message.topic)?;
    send(connector, message, Route::Topic).await
}

/// Parks `message` (delivered `deliveries` times from `queue`) for `delay`,
/// after which the broker moves it back to `queue`.
pub(crate) async fn delay(
    connector: &Connector,
    queue: &str,
    message: &Message,
    deliveries: u32,
    delay: Duration,
) -> Result<(), BrokerError> {
    send(connector, message, Route::Delay { queue, deliveries, delay }).await
}

/// Checks that a topic can name a queue.
pub(crate) fn validate_topic(topic: &str) -> Result<(), BrokerError> {
    if topic.is_empty() {
        return Err(BrokerError::Invalid("empty topic name".into()));
    }
    // Room for `.dead-letter` and a group suffix within AMQP's 255-byte names.
    if topic.len() > MAX_QUEUE_NAME - 64 {
        return Err(BrokerError::Invalid(format!(
            "topic name is {} bytes; at most {} fit",
            topic.len(),
            MAX_QUEUE_NAME - 64
        )));
    }
    Ok(())
}

async fn send(connector: &Connector, message: &Message, route: Route<'_>) -> Result<(), BrokerError> {
    let topic = message.topic.as_str();
    let timeout = connector.options.publish_timeout;
    let deadline = Instant::now() + timeout;
    let properties = properties(message, route);
    let mut declare_route = false;
    let mut failures = 0u32;
    let mut soft_failures = 0u32;
    let mut nacks = 0u32;
    // What went wrong last, for the error once the deadline passes.
    let mut last_failure: Option<lapin::Error> = None;
    let give_up = |nacks: u32, last_failure: &Option<lapin::Error>| match last_failure {
        None if nacks > 0 => BrokerError::not_confirmed_msg(
            topic,
            format!("the broker nacked it {nacks} time(s) within {timeout:?}: it could not take the message"),
        ),
        None => BrokerError::unavailable_msg(format!("publish to `{topic}` not confirmed within {timeout:?}")),
        Some(failure) => BrokerError::unavailable(
            format!("publish to `{topic}` not confirmed within {timeout:?}; last failure"),
            failure.clone(),
        ),
    };
    loop {
        if failures > 0 && Instant::now() >= deadline {
            return Err(give_up(nacks, &last_failure));
        }
        let live = connector.live(Some(deadline)).await.map_err(|e| match e {
            BrokerError::Unavailable { context, source } => BrokerError::Unavailable {
                context: format!("publish to `{topic}` gave up after {timeout:?}: {context}"),
                source,
            },
            other => other,
        })?;
        let attempt = attempt(connector, &live, message, route, declare_route, properties.clone());
        let outcome = tokio::time::timeout_at(deadline, attempt).await.map_err(|_| give_up(nacks, &last_failure))?;
        match outcome {
            Ok(Confirmation::Ack(None)) => return Ok(()),
            Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => {
                if returned.reply_code == NO_ROUTE && !declare_route {
                    // No queue is bound yet (nobody subscribed, or the delay
                    // queue is gone): declare one and send again.
                    declare_route = true;
                    continue;
                }
                return Err(BrokerError::not_confirmed_msg(
                    topic,
                    format!("returned by the broker: {} {}", returned.reply_code, returned.reply_text),
                ));
            }
            Ok(Confirmation::Nack(None)) => {
                // The broker did not take it: a queue without a leader (as
                // just after a restart) or one that rejects when full. Both
                // pass, so try again until the deadline; a queue that already
                // took it may get it twice, which at-least-once allows.
                nacks += 1;
                last_failure = None;
                tracing::debug!(%topic, nacks, "publish nacked by the broker; retrying");
            }
            Ok(Confirmation::NotRequested) => {
                // Unreachable while the publisher channel is put in confirm mode on open.
                return Err(BrokerError::not_confirmed_msg(topic, "the channel is not in confirm mode"));
            }
            Err(error) => {
                if is_connection_error(&error) {
                    connector.report_broken(&live, &error);
                } else {
                    // A channel error: the exchange or a queue may have been
                    // deleted under us. Declare again, but do not insist on a refusal.
                    soft_failures += 1;
                    live.forget_all();
                    if soft_failures >= 3 {
                        return Err(broker_error(&format!("publish to `{topic}`"), &error));
                    }
                }
                tracing::debug!(%topic, %error, attempt = failures + 1, "publish failed; retrying");
                last_failure = Some(error);
            }
        }
        failures += 1;
        let pause = (Duration::from_millis(50) * failures).min(MAX_RETRY_PAUSE);
        tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
    }
}

/// One try: declare what the route needs, publish, wait for the confirm.
async fn attempt(
    connector: &Connector,
    live: &Live,
    message: &Message,
    route: Route<'_>,
    declare_route: bool,
    properties: BasicProperties,
) -> lapin::Result<Confirmation> {
    let options = &connector.options;
    let (exchange, routing_key) = match route {
        Route::Topic => {
            live.ensure_exchange(&options.exchange).await?;
            if declare_route {
                live.declare_holding_queue(options, &message.topic).await?;
            }
            (options.exchange.clone(), message.topic.clone())
        }
        Route::Delay { queue, .. } => {
            if declare_route {
                live.forget(&delay_queue_name(queue));
            }
            live.ensure_delay_queue(options, queue).await?;
            (String::new(), delay_queue_name(queue))
        }
    };
    let channel = live.publisher().await?;
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            &message.payload,
            properties,
        )
        .await?;
    confirm.await
}

/// Persistent, with the message's headers (and, when parked, its delivery count).
fn properties(message: &Message, route: Route<'_>) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in &message.headers {
        headers.insert(name.as_str().into(), AMQPValue::LongString(LongString::from(value.as_str())));
    }
    let properties = BasicProperties::default().with_delivery_mode(PERSISTENT);
    match route {
        Route::Topic => properties.with_headers(headers),
        Route::Delay { deliveries, delay, .. } => {
            headers.insert(DELIVERIES_HEADER.into(), AMQPValue::LongLongInt(deliveries.into()));
            // Expiration 0 would expire at once anyway; keep at least 1 ms.
            let millis = delay.as_millis().clamp(1, u128::from(u32::MAX));
            properties.with_headers(headers).with_expiration(millis.to_string().into())
        }
    }
}

/// The payload and string headers of a delivery, as a sagaflow message of `topic`.
pub(crate) fn to_message(topic: &str, properties: &BasicProperties, payload: Vec<u8>) -> Message {
    let mut message = Message::new(topic, Bytes::from(payload));
    if let Some(headers) = properties.headers() {
        for (name, value) in headers {
            let name = name.as_str();
            if is_broker_header(name) {
                continue;
            }
            let value = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                _ => continue,
            };
            message.headers.insert(name.to_owned(), value);
        }
    }
    message
}

/// Headers the broker or this driver adds for its own bookkeeping.
fn is_broker_header(name: &str) -> bool {
    name.starts_with("x-sagaflow-")
        || name == "x-delivery-count"
        || name == "x-death"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// A header as a number, whichever integer type the sender used.
pub(crate) fn count_header(properties: &BasicProperties, name: &str) -> Option<u32> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    let n: i64 = match value {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).trim().parse().ok()?,
        _ => return None,
    };
    u32::try_from(n.max(0)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_without_bookkeeping() {
        let message = Message::new("t", "body").header("x-request-id", "r-1").header("kind", "hop");
        let mut properties = properties(&message, Route::Delay { queue: "t", deliveries: 3, delay: Duration::ZERO });
        assert_eq!(properties.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(properties.expiration().as_ref().map(|e| e.as_str()), Some("1"));
        assert_eq!(count_header(&properties, DELIVERIES_HEADER), Some(3));
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        headers.insert("x-first-death-reason".into(), AMQPValue::LongString("expired".into()));
        properties = properties.with_headers(headers);
        assert_eq!(count_header(&properties, "x-delivery-count"), Some(2));
        let back = to_message("t", &properties, b"body".to_vec());
        assert_eq!(back, message);
    }

    #[test]
    fn topic_names_are_checked() {
        assert!(matches!(validate_topic(""), Err(BrokerError::Invalid(_))));
        assert!(matches!(validate_topic(&"x".repeat(300)), Err(BrokerError::Invalid(_))));
        assert!(validate_topic("sagaflow.SyncBooking.CreateOrder.pod-1").is_ok());
    }
}

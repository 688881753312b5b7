//! The connection: connecting, following reconnects, and the stream/consumer topology.
//!
//! Topology: one stream per topic, named `<stream_prefix>_<sanitized topic>_<hash>`, with
//! file storage, `Limits` retention and the single subject `<subject_prefix>.<topic>`. One
//! durable pull consumer per (topic, group), named `<sanitized group>_<hash>`.
//!
//! Why one stream per topic: topics are arbitrary dotted names, and a stream per topic never
//! overlaps another stream's subjects, keeps each topic's storage, limits and deletion apart,
//! and lets a dead-letter topic be just another topic.
//!
//! Why `Limits` retention: `WorkQueue` allows a single consumer per subject, so a second
//! group could not read the topic; `Interest` drops a message published while no consumer
//! exists yet, which the first subscriber must still receive. With `Limits`, a message stays
//! until every group has acked it: subscriptions periodically purge the prefix of the stream
//! below the lowest ack floor of its consumers (see [`NatsOptions::purge_interval`]), which
//! gives `Interest` retention's bounded storage without its loss. A stream nobody consumes
//! (a dead-letter topic) keeps its messages, up to `max_age` if one is set. The first group
//! created on a stream starts from its first message, later groups from new messages only,
//! as a new queue bound to an exchange would.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use async_trait::async_trait;
use futures::StreamExt;
use sagaflow::ErrorSource;
use sagaflow::broker::{Broker, BrokerError, Message, SubscribeOptions, Subscription};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::options::NatsOptions;

/// A [`Broker`] over NATS JetStream.
///
/// Cheap to clone: clones share one connection. The connection follows server restarts by
/// itself; subscriptions resume and publishes wait (up to the publish timeout) meanwhile.
#[derive(Clone)]
pub struct NatsBroker {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker")
            .field("url", &self.shared.options.redacted_url())
            .field("state", &self.shared.client.connection_state())
            .field("closed", &self.shared.closed.is_cancelled())
            .finish()
    }
}

/// What every clone of a broker, its subscriptions and its deliveries share.
pub(crate) struct Shared {
    pub(crate) client: Client,
    pub(crate) jetstream: jetstream::Context,
    pub(crate) options: NatsOptions,
    /// Cancelled by [`Broker::close`].
    pub(crate) closed: CancellationToken,
    /// Counts (re)connections, so pullers can renew pull requests the server forgot.
    pub(crate) connections: watch::Receiver<u64>,
    /// Streams known to exist, so a publish does not ask the server every time.
    known_streams: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only plain sets live behind these locks; a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NatsBroker {
    /// Connects to the server and checks that JetStream is enabled there.
    ///
    /// Fails at once if the server is unreachable; after that, reconnects are automatic.
    pub async fn connect(options: NatsOptions) -> Result<Self> {
        let (connected_tx, connections) = watch::channel(0u64);
        let max_delay = options.reconnect_max_delay;
        let redacted = options.redacted_url();
        let (servers, credentials) = split_credentials(options.url())?;
        let connect = match credentials {
            Some(Credentials { user, password: Some(password) }) => {
                ConnectOptions::with_user_and_password(user, password)
            }
            Some(Credentials { user: token, password: None }) => ConnectOptions::with_token(token),
            None => ConnectOptions::new(),
        };
        let client = connect
            .name(&options.connection_name)
            .connection_timeout(options.request_timeout)
            .request_timeout(Some(options.request_timeout))
            .max_reconnects(None)
            .reconnect_delay_callback(move |attempts| {
                let exponent = u32::try_from(attempts.min(16)).unwrap_or(16);
                Duration::from_millis(10u64 << exponent).min(max_delay)
            })
            .event_callback(move |event| {
                let connected_tx = connected_tx.clone();
                async move {
                    match event {
                        Event::Connected => {
                            tracing::info!("NATS connection (re)established");
                            connected_tx.send_modify(|n| *n += 1);
                        }
                        Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
                        other => tracing::debug!(event = %other, "NATS connection event"),
                    }
                }
            })
            .connect(servers)
            .await
            .map_err(|e| Error::Connect { context: redacted.to_string(), source: Some(ErrorSource::new(e)) })?;
        let jetstream = jetstream::ContextBuilder::new().timeout(options.request_timeout).build(client.clone());
        // The raw account-info call: its typed form expects fields only newer servers send.
        let not_enabled = |why: String| Error::JetStream {
            context: format!("JetStream is not available on {redacted} (start nats-server with -js): {why}"),
            source: None,
        };
        let info = client.request("$JS.API.INFO", bytes::Bytes::new()).await.map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => not_enabled("no JetStream API responded".into()),
            _ => Error::Unavailable {
                context: format!("asking {redacted} for JetStream account info"),
                source: Some(ErrorSource::new(e)),
            },
        })?;
        const ERROR_FIELD: &[u8] = b"\"error\"";
        if info.payload.windows(ERROR_FIELD.len()).any(|w| w == ERROR_FIELD) {
            return Err(not_enabled(String::from_utf8_lossy(&info.payload).into_owned()));
        }
        tracing::debug!(url = %redacted, "connected to NATS JetStream");
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                jetstream,
                options,
                closed: CancellationToken::new(),
                connections,
                known_streams: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// The options this broker was connected with.
    pub fn options(&self) -> &NatsOptions {
        &self.shared.options
    }

    /// The JetStream stream that holds `topic`.
    pub fn stream_name(&self, topic: &str) -> String {
        self.shared.stream_name(topic)
    }

    /// Deletes the stream of `topic` with its messages and consumers; `false` if there was none.
    ///
    /// For operators and tests: a topic still in use is recreated by its next publish or subscribe.
    pub async fn delete_topic(&self, topic: &str) -> Result<bool> {
        let name = self.shared.stream_name(topic);
        lock(&self.shared.known_streams).remove(&name);
        match self.shared.jetstream.delete_stream(&name).await {
            Ok(status) => Ok(status.success),
            Err(e) => match e.kind() {
                jetstream::context::DeleteStreamErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(false)
                }
                _ => Err(self.shared.failure(format!("deleting stream `{name}`"), e)),
            },
        }
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn publish(&self, message: Message) -> Result<(), BrokerError> {
        crate::publish::publish(&self.shared, message).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, BrokerError> {
        crate::subscribe::subscribe(&self.shared, options).await
    }

    async fn close(&self) {
        self.shared.closed.cancel();
        // Settles sent so far reach the server; the connection itself stays up for deliveries
        // still being settled and ends when the last clone and delivery are dropped.
        match tokio::time::timeout(self.shared.options.request_timeout, self.shared.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the NATS connection on close failed"),
            Err(_) => tracing::warn!("flushing the NATS connection on close timed out"),
        }
    }

    fn name(&self) -> &'static str {
        "nats"
    }
}

impl Shared {
    /// The stream name of `topic`: readable, valid for JetStream, unique per topic.
    pub(crate) fn stream_name(&self, topic: &str) -> String {
        format!("{}_{}", self.options.stream_prefix, sanitized_with_hash(topic))
    }

    /// The subject messages of `topic` are published on.
    pub(crate) fn subject(&self, topic: &str) -> String {
        if self.options.subject_prefix.is_empty() {
            topic.to_string()
        } else {
            format!("{}.{topic}", self.options.subject_prefix)
        }
    }

    /// An error for `what` failing with `cause`: unavailable when the connection is down.
    pub(crate) fn failure(&self, what: String, cause: impl std::error::Error + Send + Sync + 'static) -> Error {
        let source = Some(ErrorSource::new(cause));
        match self.client.connection_state() {
            State::Connected => Error::JetStream { context: what, source },
            state => Error::Unavailable { context: format!("{what} (connection {state:?})"), source },
        }
    }

    /// Creates the stream of `topic` unless it is known to exist.
    pub(crate) async fn ensure_stream(&self, topic: &str) -> Result<()> {
        let name = self.stream_name(topic);
        if lock(&self.known_streams).contains(&name) {
            return Ok(());
        }
        let subject = self.subject(topic);
        let config = stream::Config {
            name: name.clone(),
            description: Some(format!("sagaflow topic `{topic}`")),
            subjects: vec![subject.clone()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            num_replicas: self.options.replicas,
            duplicate_window: self.options.duplicate_window,
            max_age: self.options.max_age,
            ..Default::default()
        };
        let stream = self
            .jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|e| self.failure(format!("creating stream `{name}` for subject `{subject}`"), e))?;
        if !stream.cached_info().config.subjects.contains(&subject) {
            return Err(Error::JetStream {
                context: format!(
                    "stream `{name}` exists but does not hold subject `{subject}`; delete it or change the stream prefix"
                ),
                source: None,
            });
        }
        lock(&self.known_streams).insert(name);
        Ok(())
    }

    /// Forgets that the stream of `topic` exists (it was deleted or the server lost it).
    pub(crate) fn forget_stream(&self, topic: &str) {
        lock(&self.known_streams).remove(&self.stream_name(topic));
    }

    /// The durable pull consumer of `options.group` on `options.topic`, created or updated.
    ///
    /// The server redelivers up to `max_deliveries + 1` times: the extra delivery never reaches
    /// the application, the driver dead-letters it. That covers a consumer that crashed while
    /// holding the last allowed delivery, which JetStream alone would strand.
    pub(crate) async fn ensure_consumer(&self, options: &SubscribeOptions) -> Result<PullConsumer> {
        self.ensure_stream(&options.topic).await?;
        let stream_name = self.stream_name(&options.topic);
        let durable = sanitized_with_hash(&options.group);
        let max_deliver = i64::from(options.max_deliveries) + 1;
        let wanted_pending =
            i64::try_from(options.concurrency.max(self.options.group_max_ack_pending)).unwrap_or(i64::MAX);
        let config = |deliver_policy, max_ack_pending| pull::Config {
            durable_name: Some(durable.clone()),
            description: Some(format!("sagaflow group `{}` on topic `{}`", options.group, options.topic)),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.options.ack_wait,
            max_deliver,
            max_ack_pending,
            ..Default::default()
        };
        let what = || format!("consumer `{durable}` on stream `{stream_name}`");
        match self.jetstream.get_consumer_from_stream::<pull::Config, _, _>(&durable, &stream_name).await {
            Ok(consumer) => {
                let current = &consumer.cached_info().config;
                let max_ack_pending = current.max_ack_pending.max(wanted_pending);
                if current.max_deliver == max_deliver
                    && current.ack_wait == self.options.ack_wait
                    && current.max_ack_pending == max_ack_pending
                    && current.ack_policy == AckPolicy::Explicit
                {
                    return Ok(consumer);
                }
                tracing::info!(consumer = %durable, stream = %stream_name, "updating consumer settings");
                let updated = config(current.deliver_policy, max_ack_pending);
                self.jetstream
                    .create_consumer_on_stream(updated, &stream_name)
                    .await
                    .map_err(|e| self.failure(format!("updating {}", what()), e))
            }
            Err(e) if is_not_found(&e) => {
                let mut stream = self
                    .jetstream
                    .get_stream(&stream_name)
                    .await
                    .map_err(|e| self.failure(format!("looking up stream `{stream_name}`"), e))?;
                let first = stream
                    .info()
                    .await
                    .map_err(|e| self.failure(format!("looking up stream `{stream_name}`"), e))?
                    .state
                    .consumer_count
                    == 0;
                // The first group takes what was published before anyone subscribed.
                let policy = if first { DeliverPolicy::All } else { DeliverPolicy::New };
                self.jetstream
                    .create_consumer_on_stream(config(policy, wanted_pending), &stream_name)
                    .await
                    .map_err(|e| self.failure(format!("creating {}", what()), e))
            }
            Err(e) => Err(self.failure(format!("looking up {}", what()), e)),
        }
    }
}

impl Shared {
    /// Purges the messages of `topic` that every consumer group has acked; returns how many.
    pub(crate) async fn purge_consumed(&self, topic: &str) -> Result<u64> {
        let name = self.stream_name(topic);
        let stream = self
            .jetstream
            .get_stream(&name)
            .await
            .map_err(|e| self.failure(format!("looking up stream `{name}`"), e))?;
        let mut consumers = stream.consumers();
        let mut floor: Option<u64> = None;
        while let Some(info) = consumers.next().await {
            let info = info.map_err(|e| self.failure(format!("listing the consumers of stream `{name}`"), e))?;
            let acked = info.ack_floor.stream_sequence;
            floor = Some(floor.map_or(acked, |f| f.min(acked)));
        }
        let Some(floor) = floor.filter(|&f| f > 0) else { return Ok(0) };
        if floor < stream.cached_info().state.first_sequence {
            return Ok(0);
        }
        let purged = stream
            .purge()
            .sequence(floor + 1)
            .await
            .map_err(|e| self.failure(format!("purging consumed messages of stream `{name}`"), e))?;
        Ok(purged.purged)
    }
}

/// A user and password, or a token (a user without a password), from a server URL.
#[derive(PartialEq, Eq)]
struct Credentials {
    user: String,
    password: Option<String>,
}

/// The servers of `url` (comma-separated) without user information, and the credentials they
/// carried. async-nats authenticates only with credentials given as options, never with a
/// URL's, and logs the server URLs it dials at debug level: credentials must leave the URLs.
fn split_credentials(url: &str) -> Result<(Vec<ServerAddr>, Option<Credentials>)> {
    let mut servers = Vec::new();
    let mut credentials: Option<Credentials> = None;
    for server in url.split(',').map(str::trim) {
        let addr: ServerAddr = server.parse().map_err(|e| Error::InvalidOptions(format!("{e}")))?;
        if let Some(user) = addr.username() {
            let found = Credentials { user: percent_decoded(user), password: addr.password().map(percent_decoded) };
            if credentials.as_ref().is_some_and(|c| *c != found) {
                return Err(Error::InvalidOptions("every NATS server URL must carry the same credentials".into()));
            }
            credentials = Some(found);
        }
        let mut bare = addr.into_inner();
        // Only fails for URLs that cannot have user information, which then have none.
        let _ = bare.set_username("");
        let _ = bare.set_password(None);
        servers.push(ServerAddr::from_url(bare).map_err(|e| Error::InvalidOptions(format!("{e}")))?);
    }
    Ok((servers, credentials))
}

/// `%XX` escapes of a URL's user information decoded (`p%40ss` → `p@ss`).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_not_found(error: &jetstream::stream::ConsumerError) -> bool {
    matches!(
        error.kind(),
        jetstream::stream::ConsumerErrorKind::JetStream(e)
            if e.error_code() == ErrorCode::CONSUMER_NOT_FOUND || e.error_code() == ErrorCode::STREAM_NOT_FOUND
    )
}

/// Checks that `subject` is a literal NATS subject: dot-separated non-empty tokens, no
/// wildcards, no whitespace or control characters.
pub(crate) fn validate_subject(subject: &str) -> std::result::Result<(), String> {
    if subject.is_empty() {
        return Err("empty topic name".into());
    }
    if let Some(c) = subject.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("topic `{}` contains {c:?}, not allowed in a NATS subject", subject.escape_debug()));
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err(format!("topic `{subject}` has an empty `.`-separated part"));
        }
        if token == "*" || token == ">" {
            return Err(format!("topic `{subject}` contains the wildcard `{token}`"));
        }
    }
    Ok(())
}

/// `name` made safe for a JetStream stream or consumer name, plus a stable hash of the
/// original so that names differing only in replaced characters stay apart.
fn sanitized_with_hash(name: &str) -> String {
    const KEEP: usize = 64;
    let sanitized: String = name
        .chars()
        .take(KEEP)
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    let hash = fnv1a(name.as_bytes());
    // 32 bits (the two halves folded) keep names short; collisions only matter between names
    // that also sanitize alike.
    format!("{sanitized}_{:08x}", (hash ^ (hash >> 32)) as u32)
}

/// FNV-1a, 64 bits: stable across Rust releases, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_stable_and_distinct() {
        let a = sanitized_with_hash("booking.AsyncBooking.CreateOrder");
        assert!(a.starts_with("booking_AsyncBooking_CreateOrder_"), "{a}");
        assert_eq!(a, sanitized_with_hash("booking.AsyncBooking.CreateOrder"));
        assert_ne!(sanitized_with_hash("a.b"), sanitized_with_hash("a_b"));
        let long = sanitized_with_hash(&"x.".repeat(500));
        assert!(long.len() <= 64 + 9, "{long}");
        assert!(long.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    }

    #[test]
    fn credentials_leave_the_server_urls() {
        let (servers, credentials) =
            split_credentials("nats://alice:p%40ss@127.0.0.1:4222, nats://alice:p%40ss@[::1]:4223").unwrap();
        let shown: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
        assert!(shown.iter().all(|s| !s.contains("alice") && !s.contains("p%40ss")), "{shown:?}");
        assert_eq!((servers[0].host(), servers[0].port(), servers[1].host()), ("127.0.0.1", 4222, "::1"));
        let credentials = credentials.unwrap();
        assert_eq!((credentials.user.as_str(), credentials.password.as_deref()), ("alice", Some("p@ss")));

        let (_, token) = split_credentials("nats://s3cr3t-token@localhost:4222").unwrap();
        assert!(token.is_some_and(|t| t.user == "s3cr3t-token" && t.password.is_none()));
        let (_, none) = split_credentials("nats://127.0.0.1:4222").unwrap();
        assert!(none.is_none());
        let err = split_credentials("nats://a:b@h1:4222,nats://c:d@h2:4222").err().unwrap().to_string();
        assert!(err.contains("same credentials") && !err.contains("a:b"), "{err}");
    }

    #[test]
    fn subjects_are_validated() {
        assert!(validate_subject("booking.AsyncBooking.CreateOrder").is_ok());
        assert!(validate_subject("t-xyz.a.dead-letter").is_ok());
        for bad in ["", "a..b", ".a", "a.", "a.*.b", "a.>", "a b", "a\tb"] {
            assert!(validate_subject(bad).is_err(), "{bad:?} accepted");
        }
    }
}

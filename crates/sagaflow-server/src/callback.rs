//! HTTP delivery of async sagas' outcomes, to allowed hosts and ports only, and never to
//! the orchestrator's own listeners.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use sagaflow::{CallbackReport, CallbackSink, SagaCallback};

use crate::config::CallbackConfig;

/// How long resolving one allowed host name may take at start.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// A host as a URL or an allow-list entry names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Host {
    /// An IP address (IPv4-mapped IPv6 addresses as IPv4).
    Ip(IpAddr),
    /// A host name, lower-case.
    Name(String),
}

impl Host {
    /// The host of a parsed `http://` URL (the URL parser lower-cases names and normalizes IPs).
    fn of(url: &reqwest::Url) -> Option<Self> {
        let text = url.host_str()?;
        Some(match text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            Some(v6) => Self::Ip(IpAddr::V6(v6.parse().ok()?).to_canonical()),
            None => match text.parse::<Ipv4Addr>() {
                Ok(v4) => Self::Ip(IpAddr::V4(v4)),
                // `name.` (rooted) is `name`.
                Err(_) => Self::Name(text.strip_suffix('.').unwrap_or(text).to_owned()),
            },
        })
    }

    /// Whether the name is one every resolver maps to loopback (RFC 6761).
    fn is_localhost(&self) -> bool {
        matches!(self, Self::Name(n) if n == "localhost" || n.ends_with(".localhost"))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// One `callbacks.allow` entry: `host` (any port) or `host:port` (that port only).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    host: Host,
    port: Option<u16>,
}

impl Allowed {
    /// Parses `host`, `host:port`, an IPv6 address bare (`::1`, any port) or in brackets
    /// (`[::1]`, `[::1]:8080`).
    fn parse(entry: &str) -> Result<Self, String> {
        let text = entry.trim();
        let bad = |why: &str| format!("callbacks.allow entry `{entry}`: {why}");
        if text.is_empty() {
            return Err(bad("empty; expected `host` or `host:port`"));
        }
        if text.contains(|c: char| c.is_whitespace() || "/?#@\\".contains(c)) {
            return Err(bad("expected `host` or `host:port`, not a URL"));
        }
        let (host, port) = if text.starts_with('[') {
            let close = text.find(']').ok_or_else(|| bad("`[` without `]`"))?;
            let rest = &text[close + 1..];
            let port = match rest.strip_prefix(':') {
                Some(port) => Some(port),
                None if rest.is_empty() => None,
                None => return Err(bad("expected `:port` after `]`")),
            };
            (&text[..=close], port)
        } else if text.matches(':').count() > 1 {
            // A bare IPv6 address; with a port it must be in brackets.
            let ip: Ipv6Addr = text.parse().map_err(|_| bad("an IPv6 address with a port is written `[addr]:port`"))?;
            return Ok(Self { host: Host::Ip(IpAddr::V6(ip).to_canonical()), port: None });
        } else {
            match text.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        let port = match port {
            None => None,
            Some(port) => match port.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad(&format!("`{port}` is not a port (1 to 65535)"))),
                Ok(port) => Some(port),
            },
        };
        let url = reqwest::Url::parse(&format!("http://{host}/")).map_err(|e| bad(&format!("not a host: {e}")))?;
        let host = Host::of(&url).ok_or_else(|| bad("not a host"))?;
        Ok(Self { host, port })
    }

    fn allows(&self, host: &Host, port: u16) -> bool {
        self.host == *host && self.port.is_none_or(|p| p == port)
    }
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => write!(f, "{} (any port)", self.host),
        }
    }
}

/// One of this process's own servers, which no callback may reach.
#[derive(Debug, Clone)]
struct Own {
    addr: SocketAddr,
    what: &'static str,
}

/// Which callback URLs a request may give (no request forgery through us): `http://` to a
/// host and port of `callbacks.allow`, and never one of the orchestrator's own listeners.
#[derive(Debug, Clone)]
pub struct CallbackPolicy {
    allow: Vec<Allowed>,
    own: Vec<Own>,
    /// The addresses the allowed host names had at start.
    resolved: HashMap<String, Vec<IpAddr>>,
}

impl CallbackPolicy {
    /// A policy allowing the entries of `config.allow`: `host` allows any port, `host:port`
    /// that port only, IPv6 as `::1` or `[::1]:8080`. A malformed entry is an error naming it.
    pub fn new(config: &CallbackConfig) -> Result<Self, String> {
        let allow = config.allow.iter().map(|entry| Allowed::parse(entry)).collect::<Result<_, _>>()?;
        Ok(Self { allow, own: Vec::new(), resolved: HashMap::new() })
    }

    /// Refuses callbacks to `addr`, this process's `what` (a listener's bound address): the
    /// address itself, and for a loopback or wildcard bind every address of this machine
    /// that reaches it on that port.
    pub fn deny_own(mut self, addr: SocketAddr, what: &'static str) -> Self {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self.own.push(Own { addr, what });
        self
    }

    /// Looks up the allowed host names (other than `localhost`), so that a name of this
    /// machine cannot reach its own listeners. A name that does not resolve is only logged.
    pub async fn resolve_names(mut self) -> Self {
        for allowed in &self.allow {
            let Host::Name(name) = &allowed.host else { continue };
            if allowed.host.is_localhost() || self.resolved.contains_key(name) {
                continue;
            }
            let lookup = tokio::net::lookup_host((name.as_str(), 0));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(Ok(addrs)) => {
                    let ips = addrs.map(|a| a.ip().to_canonical()).collect();
                    self.resolved.insert(name.clone(), ips);
                }
                Ok(Err(e)) => tracing::warn!(host = %name, error = %e, "callbacks.allow: the host does not resolve"),
                Err(_) => tracing::warn!(host = %name, "callbacks.allow: resolving the host timed out"),
            }
        }
        self
    }

    /// The URL if it is `http://` to an allowed host and port that is not one of this
    /// process's listeners, else why not.
    pub fn check(&self, url: &str) -> Result<String, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("CallbackURL `{url}` is not a URL: {e}"))?;
        if parsed.scheme() != "http" {
            return Err(format!("CallbackURL `{url}`: only http:// callbacks are supported"));
        }
        let host = Host::of(&parsed).ok_or_else(|| format!("CallbackURL `{url}` has no host"))?;
        let port = parsed.port_or_known_default().unwrap_or(80);
        if !self.allow.iter().any(|a| a.allows(&host, port)) {
            let ports: Vec<String> = self.allow.iter().filter(|a| a.host == host).map(ToString::to_string).collect();
            return Err(if ports.is_empty() {
                format!("CallbackURL `{url}`: host `{host}` is not in callbacks.allow")
            } else {
                format!(
                    "CallbackURL `{url}`: port {port} of `{host}` is not in callbacks.allow (allowed: {})",
                    ports.join(", ")
                )
            });
        }
        if let Some(own) = self.own_target(&host, port) {
            return Err(format!(
                "CallbackURL `{url}`: {host}:{port} is this orchestrator's own {}, bound to {}; a callback may not target the orchestrator itself",
                own.what, own.addr
            ));
        }
        Ok(url.to_owned())
    }

    /// The listener of this process that `host:port` reaches, if any.
    fn own_target(&self, host: &Host, port: u16) -> Option<&Own> {
        let ips: Vec<IpAddr> = match host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(_) if host.is_localhost() => vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
            Host::Name(name) => self.resolved.get(name).cloned().unwrap_or_default(),
        };
        self.own.iter().find(|own| own.addr.port() == port && ips.iter().any(|ip| reaches(*ip, own.addr.ip())))
    }
}

/// Whether connecting to `target` may reach a listener bound to `bound` (same port assumed).
/// Errs on the side of yes: a refused callback is an error the caller sees, a wrong one is not.
pub(crate) fn reaches(target: IpAddr, bound: IpAddr) -> bool {
    if target == bound {
        return true;
    }
    // Connecting to 0.0.0.0 or :: goes to this machine.
    let here = target.is_loopback() || target.is_unspecified();
    if bound.is_loopback() {
        here
    } else if bound.is_unspecified() {
        here || is_local(target)
    } else {
        false
    }
}

/// Whether `ip` is an address of this machine: only those can be bound.
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
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

    fn policy(allow: &[&str]) -> CallbackPolicy {
        let config =
            CallbackConfig { allow: allow.iter().map(|h| (*h).to_owned()).collect(), ..CallbackConfig::default() };
        CallbackPolicy::new(&config).unwrap()
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn only_allowed_http_hosts_pass() {
        let policy = CallbackPolicy::new(&CallbackConfig::default()).unwrap();
        assert!(policy.check("http://127.0.0.1:8080/cb").is_ok());
        assert!(policy.check("http://[::1]:8080/cb").is_ok());
        assert!(policy.check("http://localhost/cb").is_ok());
        assert!(policy.check("http://LOCALHOST:9/cb").is_ok());
        assert!(policy.check("http://169.254.169.254/latest").unwrap_err().contains("not in callbacks.allow"));
        assert!(policy.check("file:///etc/passwd").unwrap_err().contains("http://"));
        assert!(policy.check("not a url").is_err());
    }

    #[test]
    fn allow_entries_parse_with_and_without_ports() {
        let parse = |entry: &str| Allowed::parse(entry).map(|a| a.to_string());
        assert_eq!(parse("Example.COM").unwrap(), "example.com (any port)");
        assert_eq!(parse("example.com:8080").unwrap(), "example.com:8080");
        assert_eq!(parse("10.0.0.7:9000").unwrap(), "10.0.0.7:9000");
        assert_eq!(parse("::1").unwrap(), "[::1] (any port)");
        assert_eq!(parse("[::1]").unwrap(), "[::1] (any port)");
        assert_eq!(parse("[::1]:8080").unwrap(), "[::1]:8080");
        assert_eq!(parse("[0:0:0:0:0:0:0:1]:8080").unwrap(), "[::1]:8080");
        assert_eq!(parse("::ffff:127.0.0.1").unwrap(), "127.0.0.1 (any port)");
        // Bare, every group is the address's: a port needs the brackets.
        assert_eq!(parse("::1:8080").unwrap(), "[::1:8080] (any port)");
        for (bad, why) in [
            ("", "empty"),
            ("host:", "is not a port"),
            ("host:0", "is not a port"),
            ("host:70000", "is not a port"),
            ("host:http", "is not a port"),
            ("::1:99999", "[addr]:port"),
            ("[::1", "without `]`"),
            ("[::1]8080", "`:port` after"),
            ("[nonsense]:80", "not a host"),
            ("http://example.com", "not a URL"),
            ("example.com/cb", "not a URL"),
            ("user@example.com", "not a URL"),
        ] {
            let err = Allowed::parse(bad).unwrap_err();
            assert!(err.contains(why) && err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
        let config = CallbackConfig { allow: vec!["ok".into(), "bad:port".into()], ..CallbackConfig::default() };
        assert!(CallbackPolicy::new(&config).unwrap_err().contains("`bad:port`"));
    }

    #[test]
    fn a_port_entry_allows_that_port_only() {
        let policy = policy(&["hooks.example:8080", "[::1]:9000", "127.0.0.1", "any.example"]);
        assert!(policy.check("http://hooks.example:8080/cb").is_ok());
        let err = policy.check("http://hooks.example:8081/cb").unwrap_err();
        assert!(err.contains("port 8081 of `hooks.example`") && err.contains("hooks.example:8080"), "{err}");
        // No port in the URL is port 80.
        assert!(policy.check("http://hooks.example/cb").unwrap_err().contains("port 80 "));
        assert!(policy.check("http://[::1]:9000/cb").is_ok());
        assert!(policy.check("http://[::1]:9001/cb").unwrap_err().contains("port 9001"));
        assert!(policy.check("http://127.0.0.1:1234/cb").is_ok());
        assert!(policy.check("http://any.example:1/cb").is_ok());
        assert!(policy.check("http://any.example/cb").is_ok());
        // A port entry does not allow other hosts, nor another spelling of a name.
        assert!(policy.check("http://hooks.example.evil:8080/cb").unwrap_err().contains("not in callbacks.allow"));
    }

    #[test]
    fn the_orchestrators_own_listeners_are_refused() {
        let policy = policy(&["127.0.0.1", "localhost", "::1", "0.0.0.0"])
            .deny_own(addr("127.0.0.1:10000"), "gRPC API (grpc_listen)")
            .deny_own(addr("127.0.0.1:10090"), "admin HTTP API (http_listen)");
        for url in [
            "http://127.0.0.1:10090/api/sagas/x/retry",
            "http://localhost:10090/",
            "http://[::1]:10090/",
            "http://0.0.0.0:10090/",
            "http://127.0.0.1:10000/pb.BookingService/HandleAsyncBooking",
        ] {
            let err = policy.check(url).unwrap_err();
            assert!(err.contains("own") && err.contains("orchestrator itself"), "{url}: {err}");
        }
        let err = policy.check("http://localhost:10090/").unwrap_err();
        assert!(err.contains("admin HTTP API (http_listen)") && err.contains("127.0.0.1:10090"), "{err}");
        assert!(policy.check("http://127.0.0.1:10000/").unwrap_err().contains("gRPC API"));
        // Other ports on the same hosts stay usable.
        assert!(policy.check("http://127.0.0.1:10091/cb").is_ok());
        assert!(policy.check("http://localhost:8080/cb").is_ok());
    }

    #[test]
    fn a_wildcard_bind_is_refused_on_every_local_address() {
        let policy = policy(&["127.0.0.1", "127.0.0.2", "localhost", "::1", "192.0.2.1"])
            .deny_own(addr("0.0.0.0:10090"), "admin HTTP API (http_listen)")
            .deny_own(addr("[::]:10000"), "gRPC API (grpc_listen)");
        for url in
            ["http://127.0.0.1:10090/", "http://127.0.0.2:10090/", "http://localhost:10090/", "http://[::1]:10000/"]
        {
            assert!(policy.check(url).unwrap_err().contains("orchestrator itself"), "{url}");
        }
        // 192.0.2.1 (TEST-NET-1) is no address of this machine.
        assert!(policy.check("http://192.0.2.1:10090/").is_ok());
        assert!(policy.check("http://127.0.0.1:10091/").is_ok());
    }

    #[test]
    fn a_bind_to_one_address_is_refused_on_that_address() {
        let policy =
            policy(&["192.0.2.1", "192.0.2.2", "127.0.0.1"]).deny_own(addr("192.0.2.1:10090"), "admin HTTP API");
        assert!(policy.check("http://192.0.2.1:10090/").unwrap_err().contains("orchestrator itself"));
        assert!(policy.check("http://192.0.2.2:10090/").is_ok());
        assert!(policy.check("http://127.0.0.1:10090/").is_ok());
    }

    #[test]
    fn reaching_a_listener() {
        let ip = |t: &str| t.parse::<IpAddr>().unwrap();
        assert!(reaches(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(reaches(ip("::1"), ip("127.0.0.1")));
        assert!(reaches(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(reaches(ip("127.0.0.1"), ip("0.0.0.0")));
        assert!(reaches(ip("127.0.0.1"), ip("::")));
        assert!(!reaches(ip("192.0.2.1"), ip("0.0.0.0")));
        assert!(!reaches(ip("127.0.0.1"), ip("192.0.2.1")));
        assert!(is_local(ip("127.0.0.1")));
        assert!(!is_local(ip("192.0.2.1")));
    }

    #[test]
    fn an_allowed_name_of_this_machine_cannot_reach_its_listeners() {
        let mut policy = policy(&["box.internal", "localhost."]).deny_own(addr("0.0.0.0:10090"), "admin HTTP API");
        // As `resolve_names` finds it: the name is this machine.
        policy.resolved.insert("box.internal".into(), vec![Ipv4Addr::LOCALHOST.into()]);
        assert!(policy.check("http://box.internal:10090/").unwrap_err().contains("orchestrator itself"));
        assert!(policy.check("http://BOX.internal.:10090/").unwrap_err().contains("orchestrator itself"));
        assert!(policy.check("http://box.internal:8080/").is_ok());
        assert!(policy.check("http://localhost.:10090/").unwrap_err().contains("orchestrator itself"));
    }

    #[tokio::test]
    async fn allowed_names_are_resolved_at_start() {
        let policy = policy(&["localhost", "no-such-host.invalid"]).resolve_names().await;
        // `localhost` needs no lookup; a name that does not resolve is no listener of ours
        // (its delivery fails later).
        assert!(policy.resolved.is_empty(), "{:?}", policy.resolved);
        assert!(policy.check("http://no-such-host.invalid:10090/").is_ok());
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Expected value from Python: hmac.new(b"Jefe", b'1700000000.{"request_id":"r1"}', sha256).
        let sig = signature(b"Jefe", 1_700_000_000, br#"{"request_id":"r1"}"#);
        assert_eq!(sig, "t=1700000000,v1=4de70a60f4dd6bbfc5ce099b742347a732a2886c99c1dfab231f80e1b8cc846f");
    }
}

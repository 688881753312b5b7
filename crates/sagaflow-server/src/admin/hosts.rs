//! Which `Host` and `Origin` a request to the admin API may carry without the token.
//!
//! A browser on the operator's machine can be made to call the loopback admin API by any
//! page: a cross-site form or `fetch` carries that page's `Origin`, and a DNS-rebound name
//! (`evil.example` resolving to 127.0.0.1) carries its own `Host`. Neither can carry the
//! address this server is bound to as its `Host` together with a matching `Origin`, so
//! that pair is what a request without the token must show.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::uri::Authority;
use axum::http::{HeaderMap, Uri, header};

/// A host as a `Host` header, an `Origin` or an `admin_hosts` entry names it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Name {
    /// An IP address (IPv4-mapped IPv6 addresses as IPv4).
    Ip(IpAddr),
    /// A host name, lower-case, without a root dot.
    Dns(String),
}

impl Name {
    /// `text` as written in an authority: IPv6 in brackets.
    fn parse(text: &str) -> Self {
        let text = text.to_ascii_lowercase();
        let text = text.strip_suffix('.').unwrap_or(&text);
        let ip = match text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            Some(v6) => v6.parse().ok(),
            None => text.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4),
        };
        match ip {
            Some(ip) => Self::Ip(ip.to_canonical()),
            None => Self::Dns(text.to_owned()),
        }
    }

    fn is_localhost(&self) -> bool {
        matches!(self, Self::Dns(n) if n == "localhost" || n.ends_with(".localhost"))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Dns(name) => f.write_str(name),
        }
    }
}

/// `host[:port]`, as in a `Host` header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostPort {
    name: Name,
    /// The port written, if any.
    port: Option<u16>,
}

impl HostPort {
    fn parse(text: &str) -> Option<Self> {
        if text.contains('@') {
            return None;
        }
        let authority = Authority::from_str(text).ok()?;
        Some(Self { name: Name::parse(authority.host()), port: authority.port_u16() })
    }
}

/// The `Host`s (and with them the origins) this admin server answers to without the token.
#[derive(Debug, Clone)]
pub struct AdminHosts {
    bound: SocketAddr,
    extra: Vec<HostPort>,
}

impl AdminHosts {
    /// The hosts of a server bound to `bound`: that address, for a loopback bind also
    /// `localhost`, `127.0.0.1` and `[::1]`, for a wildcard bind any address of this machine
    /// (all on the bound port); and the `extra` names (`admin_hosts`), each `name` (any port)
    /// or `name:port`. An entry that is neither is an error naming it.
    pub fn new(bound: SocketAddr, extra: &[String]) -> anyhow::Result<Self> {
        let extra = extra
            .iter()
            .map(|entry| {
                HostPort::parse(entry.trim())
                    .filter(|h| !matches!(&h.name, Name::Dns(n) if n.is_empty()))
                    .ok_or_else(|| anyhow::anyhow!("admin_hosts entry `{entry}`: expected `name` or `name:port`"))
            })
            .collect::<anyhow::Result<_>>()?;
        let bound = SocketAddr::new(bound.ip().to_canonical(), bound.port());
        Ok(Self { bound, extra })
    }

    /// The same hosts for the address the listener got (a bind to port 0 gets one).
    pub fn bound_to(mut self, addr: SocketAddr) -> Self {
        self.bound = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self
    }

    /// Whether a request for `host` reaches this server by a name it answers to.
    fn allows(&self, host: &HostPort) -> bool {
        let bound_ip = self.bound.ip();
        let ours = host.port.unwrap_or(80) == self.bound.port()
            && match &host.name {
                Name::Ip(ip) => crate::callback::reaches(*ip, bound_ip),
                name => name.is_localhost() && (bound_ip.is_loopback() || bound_ip.is_unspecified()),
            };
        // A `Host` without a port came through the scheme's default one.
        ours || self
            .extra
            .iter()
            .any(|e| e.name == host.name && e.port.is_none_or(|p| host.port.map_or(p == 80 || p == 443, |q| q == p)))
    }

    /// What a refused request could have used instead, for the error message.
    fn expected(&self) -> String {
        let port = self.bound.port();
        let mut names = vec![self.bound.to_string()];
        if self.bound.ip().is_loopback() || self.bound.ip().is_unspecified() {
            names.extend([format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")]);
        }
        if self.bound.ip().is_unspecified() {
            names.push(format!("any address of this machine on port {port}"));
        }
        names.extend(self.extra.iter().map(|e| match e.port {
            Some(p) => format!("{}:{p}", e.name),
            None => e.name.to_string(),
        }));
        let mut seen = std::collections::HashSet::new();
        names.retain(|name| seen.insert(name.clone()));
        names.join(", ")
    }

    /// Accepts a request whose `Host` names this server and whose `Origin`, if any, is that
    /// same host; else says why not.
    pub(super) fn check(&self, headers: &HeaderMap, uri: &Uri) -> Result<(), String> {
        // HTTP/2 carries the host in the URI's authority.
        let text = match headers.get(header::HOST) {
            Some(value) => value.to_str().map_err(|_| "the Host header is not ASCII".to_owned())?,
            None => uri
                .authority()
                .map(Authority::as_str)
                .ok_or_else(|| format!("the request names no Host: send the admin token, or Host: {}", self.bound))?,
        };
        let host = HostPort::parse(text).ok_or_else(|| format!("Host `{text}` is not host[:port]"))?;
        if !self.allows(&host) {
            return Err(format!(
                "Host `{text}` is not an address this server answers to ({}): requests through other \
                 names are refused, as a DNS-rebound name in a browser would send them; use one of \
                 those, list the name in admin_hosts, or send the admin token",
                self.expected()
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("(not ASCII)");
            if !same_origin(origin, &host) {
                return Err(format!(
                    "Origin `{origin}` is not this server's origin (http://{text}): cross-site requests \
                     are refused; send the admin token to call the API from another origin"
                ));
            }
        }
        Ok(())
    }
}

/// Whether the `Origin` header `origin` is `http://` or `https://` and `host`.
fn same_origin(origin: &str, host: &HostPort) -> bool {
    let Ok(url) = reqwest::Url::parse(origin) else { return false };
    let default_port = match url.scheme() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    if !(url.path() == "/" && url.query().is_none() && url.fragment().is_none() && url.username().is_empty()) {
        return false;
    }
    let Some(name) = url.host_str().map(Name::parse) else { return false };
    name == host.name && url.port().unwrap_or(default_port) == host.port.unwrap_or(default_port)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn hosts(bound: &str, extra: &[&str]) -> AdminHosts {
        let extra: Vec<String> = extra.iter().map(|e| (*e).to_owned()).collect();
        AdminHosts::new(bound.parse().unwrap(), &extra).unwrap()
    }

    fn check(hosts: &AdminHosts, host: Option<&str>, origin: Option<&str>) -> Result<(), String> {
        let mut headers = HeaderMap::new();
        if let Some(host) = host {
            headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        }
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        hosts.check(&headers, &Uri::from_static("/api/flows"))
    }

    #[test]
    fn a_loopback_bind_answers_to_its_loopback_names_on_its_port() {
        let h = hosts("127.0.0.1:10090", &[]);
        for host in ["127.0.0.1:10090", "localhost:10090", "LOCALHOST:10090", "localhost.:10090", "[::1]:10090"] {
            assert_eq!(check(&h, Some(host), None), Ok(()), "{host}");
        }
        for host in ["evil.example:10090", "localhost:10091", "127.0.0.1", "10.1.2.3:10090", "127.0.0.1.nip.io:10090"] {
            let err = check(&h, Some(host), None).unwrap_err();
            assert!(err.contains(&format!("Host `{host}`")) && err.contains("127.0.0.1:10090"), "{host}: {err}");
        }
        let err = check(&h, Some("evil.example:10090"), None).unwrap_err();
        assert!(err.contains("(127.0.0.1:10090, localhost:10090, [::1]:10090)"), "{err}");
        assert!(check(&h, None, None).unwrap_err().contains("names no Host"));
        assert!(check(&h, Some("a@127.0.0.1:10090"), None).unwrap_err().contains("host[:port]"));
    }

    #[test]
    fn an_origin_must_be_the_host_asked_for() {
        let h = hosts("127.0.0.1:10090", &[]);
        assert_eq!(check(&h, Some("127.0.0.1:10090"), Some("http://127.0.0.1:10090")), Ok(()));
        assert_eq!(check(&h, Some("localhost:10090"), Some("http://localhost:10090")), Ok(()));
        for origin in [
            "http://evil.example",
            "http://localhost:10090",
            "http://127.0.0.1:10091",
            "http://127.0.0.1",
            "null",
            "file://",
            "http://127.0.0.1:10090/path",
        ] {
            let err = check(&h, Some("127.0.0.1:10090"), Some(origin)).unwrap_err();
            assert!(err.contains(&format!("Origin `{origin}`")) && err.contains("cross-site"), "{origin}: {err}");
        }
    }

    #[test]
    fn a_wildcard_bind_answers_to_any_local_address_and_extra_names() {
        let h = hosts("0.0.0.0:10090", &["admin.example.com", "proxy.internal:8443"]);
        for host in ["127.0.0.1:10090", "localhost:10090", "[::1]:10090", "admin.example.com", "proxy.internal:8443"] {
            assert_eq!(check(&h, Some(host), None), Ok(()), "{host}");
        }
        assert_eq!(check(&h, Some("admin.example.com"), Some("https://admin.example.com")), Ok(()));
        // TEST-NET-1 is no address of this machine.
        for host in ["192.0.2.1:10090", "proxy.internal:8444", "evil.example:10090"] {
            assert!(check(&h, Some(host), None).is_err(), "{host}");
        }
        let err = check(&h, Some("evil.example"), None).unwrap_err();
        assert!(err.contains("admin.example.com") && err.contains("any address of this machine"), "{err}");
        assert!(
            AdminHosts::new("0.0.0.0:1".parse().unwrap(), &["a/b".into()]).unwrap_err().to_string().contains("`a/b`")
        );
    }

    #[test]
    fn a_bind_to_one_address_answers_to_that_address() {
        let h = hosts("192.0.2.1:10090", &[]);
        assert_eq!(check(&h, Some("192.0.2.1:10090"), None), Ok(()));
        assert!(check(&h, Some("localhost:10090"), None).is_err());
        assert!(check(&h, Some("127.0.0.1:10090"), None).is_err());
    }
}

//! Network capability: which destinations a plugin may reach.
//!
//! Grant: a list of `scheme://host[:port]` patterns. `http` and `https`
//! patterns allow outgoing HTTP through `wasi:http`; `tcp` patterns allow raw
//! `wasi:sockets` connections. A host is a name (`api.example.com`), a
//! suffix wildcard (`*.example.com`), an address (`10.1.2.3`, `[::1]`), a
//! CIDR (`10.0.0.0/8`, `[fd00::/8]`) or `*`; a port is a number or `*`
//! (default 80 for `http`, 443 for `https`, required for `tcp`).
//!
//! Enforcement happens in two hooks, both of which deny by default:
//! - the `wasi:sockets` address check (TCP connect; UDP, listening and
//!   accepting are always refused), and
//! - the outgoing-HTTP hook of `wasmtime-wasi-http`, whose default enforces
//!   nothing. A redirect is a new request from the guest, so every hop is
//!   checked here again.
//!
//! Special addresses — link-local (cloud metadata), unspecified, multicast
//! and broadcast — are reached only through a grant that names the special
//! range itself (an address, or a CIDR at least as narrow as the range).
//! Host names are re-checked after resolution, and IP literals the guest
//! writes (`0.0.0.0`, `[::ffff:169.254.169.254]`) are checked the same way,
//! so neither a name, nor `*`, nor a wide CIDR such as `0.0.0.0/0` reaches
//! them. Plain HTTP is
//! then sent to the address that was checked, so a second DNS answer cannot
//! redirect it (DNS rebinding); HTTPS connects by name and relies on the
//! certificate check for the same guarantee.
//!
//! Every denial is written to the stage log and kept, so a stage that fails
//! after one says which destination was refused.
//!
//! Per run: a [`NetPolicy`] over the grant and the run's log, wired into the
//! WASI context by [`configure`] and into `wasi:http` as [`HttpHooks`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi_http::WasiHttpHooks;

use super::output::StageLog;

/// The network part of a plugin's grants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NetworkGrant {
    /// Destinations the plugin may reach.
    #[serde(default)]
    pub allow: Vec<Destination>,
    /// Whether the guest may resolve names itself (`wasi:sockets/ip-name-lookup`).
    /// HTTP requests are resolved by the host and do not need it.
    #[serde(default)]
    pub name_lookup: bool,
}

impl NetworkGrant {
    pub fn allows_tcp(&self) -> bool {
        self.allow.iter().any(|d| d.scheme == Scheme::Tcp)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
    Tcp,
}

impl FromStr for Scheme {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "http" => Ok(Scheme::Http),
            "https" => Ok(Scheme::Https),
            "tcp" => Ok(Scheme::Tcp),
            _ => Err(format!("unknown scheme {s:?}")),
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Tcp => "tcp",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// Lower-case host name, matched exactly.
    Name(String),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
    Net(IpNet),
}

/// One allowed destination, parsed from `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    scheme: Scheme,
    host: HostPattern,
    /// `None` means any port.
    port: Option<u16>,
    text: String,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Destination {
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Whether every connection `other` allows is also allowed by `self`.
    pub fn covers(&self, other: &Destination) -> bool {
        let host = match (&self.host, &other.host) {
            (HostPattern::Any, _) => true,
            (HostPattern::Name(a), HostPattern::Name(b)) => a == b,
            (HostPattern::Suffix(a), HostPattern::Name(b)) => b.ends_with(a.as_str()),
            (HostPattern::Suffix(a), HostPattern::Suffix(b)) => b.ends_with(a.as_str()),
            (HostPattern::Net(a), HostPattern::Net(b)) => a.contains(b),
            _ => false,
        };
        self.scheme == other.scheme && host && (self.port.is_none() || self.port == other.port)
    }
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let fail = |why: &str| {
            Err(format!(
                "invalid network destination {text:?}: {why}; expected scheme://host[:port] \
                 with scheme http, https or tcp, e.g. \"https://api.example.com\", \
                 \"tcp://10.0.0.0/8:5432\", \"http://127.0.0.1:8080\""
            ))
        };
        let Some((scheme, rest)) = text.split_once("://") else {
            return fail("missing scheme");
        };
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            "tcp" => Scheme::Tcp,
            _ => return fail("unknown scheme"),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        // Split host and port; IPv6 hosts are bracketed.
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let Some((host, after)) = inner.split_once(']') else {
                return fail("unclosed '['");
            };
            match after {
                "" => (host, None),
                p if p.starts_with(':') => (host, Some(&p[1..])),
                _ => return fail("unexpected text after ']'"),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        let port = match port {
            Some("*") => None,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => Some(p),
                _ => return fail("port must be 1-65535 or *"),
            },
            None => match scheme {
                Scheme::Http => Some(80),
                Scheme::Https => Some(443),
                Scheme::Tcp => return fail("tcp destinations need a port (or :*)"),
            },
        };
        let host = if host == "*" {
            HostPattern::Any
        } else if let Ok(net) = host.parse::<IpNet>() {
            HostPattern::Net(net)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            HostPattern::Net(IpNet::from(ip))
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if !valid_hostname(suffix) {
                return fail("invalid host name after '*.'");
            }
            HostPattern::Suffix(format!(".{}", suffix.to_ascii_lowercase()))
        } else if valid_hostname(host) {
            HostPattern::Name(host.to_ascii_lowercase())
        } else {
            return fail("invalid host");
        };
        Ok(Destination { scheme, host, port, text: text.to_string() })
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn valid_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The special range `ip` lies in, as its prefix length: link-local (cloud
/// metadata services live there), unspecified, multicast and broadcast.
/// Only a grant that names such a range itself — an address or a CIDR at
/// least as narrow as the range — reaches it; host names, `*` and wide
/// CIDRs (`0.0.0.0/0`) never do.
fn special_range(ip: IpAddr) -> Option<u8> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() || v4.is_unspecified() => Some(32),
        IpAddr::V4(v4) if v4.octets()[0] == 0 => Some(8),
        IpAddr::V4(v4) if v4.is_link_local() => Some(16),
        IpAddr::V4(v4) if v4.is_multicast() => Some(4),
        IpAddr::V6(v6) if v6.is_unspecified() => Some(128),
        IpAddr::V6(v6) if v6.is_multicast() => Some(8),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some(10),
        _ => None,
    }
}

/// Whether `net` reaches `ip`: it contains it, and if `ip` is special,
/// `net` names that special range (or a part of it) itself.
fn net_reaches(net: &IpNet, ip: IpAddr) -> bool {
    let ip4 = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    (net.contains(&ip) || net.contains(&ip4)) && special_range(ip).is_none_or(|len| net.prefix_len() >= len)
}

/// The per-run network policy built from a [`NetworkGrant`].
#[derive(Clone)]
pub struct NetPolicy {
    grant: Arc<NetworkGrant>,
    log: StageLog,
}

/// What an allowed HTTP request should connect to.
#[derive(Debug, PartialEq, Eq)]
pub enum HttpRoute {
    /// Connect to this already-checked address (plain HTTP).
    Pinned(SocketAddr),
    /// Connect by name and let TLS verify the peer (HTTPS).
    ByName,
}

impl NetPolicy {
    pub fn new(grant: Arc<NetworkGrant>, log: StageLog) -> Self {
        Self { grant, log }
    }

    fn matches(&self, scheme: Scheme, host: &str, port: u16) -> Option<&Destination> {
        let ip = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
        let host = host.to_ascii_lowercase();
        self.grant.allow.iter().find(|d| {
            d.scheme == scheme
                && d.port.is_none_or(|p| p == port)
                && match (&d.host, ip) {
                    (HostPattern::Any, None) => true,
                    (HostPattern::Any, Some(ip)) => special_range(ip).is_none(),
                    (HostPattern::Net(net), Some(ip)) => net_reaches(net, ip),
                    (HostPattern::Name(name), None) => *name == host,
                    (HostPattern::Suffix(suffix), None) => host.ends_with(suffix.as_str()),
                    _ => false,
                }
        })
    }

    /// Whether an address pattern (not a name) of `scheme` reaches `addr`.
    fn address_granted(&self, scheme: Scheme, addr: SocketAddr) -> bool {
        self.grant.allow.iter().any(|d| {
            d.scheme == scheme && d.port.is_none_or(|p| p == addr.port()) && matches!(&d.host, HostPattern::Net(net) if net_reaches(net, addr.ip()))
        })
    }

    fn deny(&self, what: String) -> bool {
        self.log.record_denial(what);
        false
    }

    /// Checks an outgoing HTTP request and decides where it connects.
    pub async fn authorize_http(&self, scheme: Scheme, host: &str, port: u16) -> Result<HttpRoute, String> {
        let target = format!("{scheme}://{host}:{port}");
        if self.matches(scheme, host, port).is_none() {
            self.deny(format!("HTTP request to {target}: not in the plugin's network grant"));
            return Err(target);
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(match scheme {
                Scheme::Https => HttpRoute::ByName,
                _ => HttpRoute::Pinned(SocketAddr::new(ip, port)),
            });
        }
        let resolved: Vec<SocketAddr> = match tokio::net::lookup_host((bare, port)).await {
            Ok(addrs) => addrs.collect(),
            Err(e) => {
                self.deny(format!("HTTP request to {target}: cannot resolve {bare}: {e}"));
                return Err(target);
            }
        };
        let allowed: Vec<SocketAddr> = resolved
            .iter()
            .copied()
            .filter(|a| special_range(a.ip()).is_none() || self.address_granted(scheme, *a))
            .collect();
        let Some(first) = allowed.first() else {
            self.deny(format!(
                "HTTP request to {target}: {bare} resolves only to addresses a host-name grant may not reach ({resolved:?})"
            ));
            return Err(target);
        };
        Ok(match scheme {
            Scheme::Https => HttpRoute::ByName,
            _ => HttpRoute::Pinned(*first),
        })
    }

    /// The `wasi:sockets` address check.
    pub async fn check_socket(&self, addr: SocketAddr, usage: SocketAddrUse) -> bool {
        match usage {
            // Connecting binds implicitly to the wildcard address and port 0;
            // that (and only that) is allowed.
            SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0 || {
                self.deny(format!("binding a TCP socket to {addr}: listening is not allowed"))
            },
            SocketAddrUse::TcpConnect => self.check_connect(addr).await,
            SocketAddrUse::TcpListen | SocketAddrUse::TcpAccept => {
                self.deny(format!("listening on {addr}: plugins may not accept connections"))
            }
            SocketAddrUse::UdpBind | SocketAddrUse::UdpSend | SocketAddrUse::UdpReceive => {
                self.deny(format!("UDP with {addr}: UDP is not allowed"))
            }
        }
    }

    async fn check_connect(&self, addr: SocketAddr) -> bool {
        if self.address_granted(Scheme::Tcp, addr) {
            return true;
        }
        if special_range(addr.ip()).is_none() {
            let any = |d: &Destination| d.scheme == Scheme::Tcp && d.host == HostPattern::Any && d.port.is_none_or(|p| p == addr.port());
            if self.grant.allow.iter().any(any) {
                return true;
            }
            for d in &self.grant.allow {
                let name = match &d.host {
                    HostPattern::Name(name) if d.scheme == Scheme::Tcp && d.port.is_none_or(|p| p == addr.port()) => name,
                    _ => continue,
                };
                if let Ok(mut resolved) = tokio::net::lookup_host((name.as_str(), addr.port())).await
                    && resolved.any(|a| a.ip() == addr.ip())
                {
                    return true;
                }
            }
        }
        self.deny(format!("TCP connection to {addr}: not in the plugin's network grant"))
    }
}

/// Wires `policy` into a run's WASI context: TCP only when a `tcp`
/// destination is granted, never UDP, name lookup only when granted, and
/// every socket address checked.
pub fn configure(wasi: &mut WasiCtxBuilder, policy: &NetPolicy) {
    let grant = &policy.grant;
    wasi.allow_tcp(grant.allows_tcp()).allow_udp(false).allow_ip_name_lookup(grant.name_lookup);
    let policy = policy.clone();
    wasi.socket_addr_check(move |addr, usage| {
        let policy = policy.clone();
        Box::pin(async move { policy.check_socket(addr, usage).await })
    });
}

/// HTTP requests of one call that may be in flight at once: each holds a
/// connection and its buffers on the host until its response is dropped.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 16;

/// Bytes of one HTTP `fields` resource (headers or trailers) as the host
/// holds them, well above any proxy's 8 KiB header limit; with
/// `limits.handles` it bounds what fields can make the host hold.
pub const FIELD_SIZE_LIMIT: usize = 32 * 1024;

/// The outgoing-HTTP hook: every request (and so every redirect hop) is
/// checked against the network grant before anything is sent, and at most
/// [`MAX_REQUESTS_IN_FLIGHT`] are alive at once.
pub struct HttpHooks {
    policy: NetPolicy,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl HttpHooks {
    pub fn new(policy: NetPolicy) -> Self {
        Self { policy, in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS_IN_FLIGHT)) }
    }
}

type HttpResponse = http::Response<wasmtime_wasi_http::WasiBody>;
type IoFuture = Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>;

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: IoFuture,
    ) -> Box<dyn Future<Output = wasmtime_wasi_http::Result<(HttpResponse, IoFuture)>> + Send> {
        let policy = self.policy.clone();
        let permit = self.in_flight.clone().try_acquire_owned();
        Box::new(async move {
            use http_body_util::BodyExt;
            let Ok(permit) = permit else {
                policy.deny(format!("an HTTP request beyond {MAX_REQUESTS_IN_FLIGHT} in flight at once (drop finished responses first)"));
                return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
            };
            let uri = request.uri();
            let scheme = match uri.scheme_str() {
                Some("https") => Scheme::Https,
                _ => Scheme::Http,
            };
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(if scheme == Scheme::Https { 443 } else { 80 });
            let route = policy
                .authorize_http(scheme, &host, port)
                .await
                .map_err(|_| wasmtime_wasi_http::Error::HttpRequestDenied)?;
            if let HttpRoute::Pinned(addr) = route {
                // Connect to the address that was checked; the Host header
                // still carries the name the guest asked for.
                let mut parts = request.uri().clone().into_parts();
                parts.authority = Some(addr.to_string().parse().map_err(|_| wasmtime_wasi_http::Error::HttpRequestUriInvalid)?);
                *request.uri_mut() = http::Uri::from_parts(parts).map_err(|_| wasmtime_wasi_http::Error::HttpRequestUriInvalid)?;
            }
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            let io = async move {
                let _permit = permit;
                io.await
            };
            Ok((response.map(BodyExt::boxed_unsync), Box::new(io) as IoFuture))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> NetPolicy {
        let grant = NetworkGrant { allow: allow.iter().map(|a| a.parse().unwrap()).collect(), name_lookup: false };
        NetPolicy::new(Arc::new(grant), StageLog::detached())
    }

    #[test]
    fn parses_patterns() {
        for ok in ["http://127.0.0.1:8080", "https://api.example.com", "tcp://10.0.0.0/8:5432", "http://[::1]:80", "tcp://[fd00::/8]:*", "https://*.example.com", "http://*:*"] {
            ok.parse::<Destination>().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["example.com", "ftp://x", "tcp://db", "http://a b", "http://x:0", "http://x:99999", "http://[::1"] {
            let err = bad.parse::<Destination>().unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[tokio::test]
    async fn http_matching_is_exact() {
        let p = policy(&["http://127.0.0.1:8080", "https://*.example.com"]);
        assert_eq!(p.authorize_http(Scheme::Http, "127.0.0.1", 8080).await, Ok(HttpRoute::Pinned("127.0.0.1:8080".parse().unwrap())));
        assert!(p.authorize_http(Scheme::Http, "127.0.0.1", 8081).await.is_err());
        assert!(p.authorize_http(Scheme::Https, "127.0.0.1", 8080).await.is_err());
        assert!(p.matches(Scheme::Https, "example.com.evil", 443).is_none());
        assert!(p.matches(Scheme::Https, "evilexample.com", 443).is_none());
        assert!(p.matches(Scheme::Https, "API.example.com", 443).is_some());
        assert!(p.matches(Scheme::Https, "api.example.com", 8443).is_none());
        // A granted name that does not resolve is refused, not guessed.
        assert!(p.authorize_http(Scheme::Https, "nowhere.invalid.example.com", 443).await.is_err());
    }

    #[tokio::test]
    async fn hostname_grant_never_reaches_link_local() {
        // `localhost` resolves to loopback, which is fine; a name that resolves to
        // link-local would be refused, simulated here with a literal check.
        assert_eq!(special_range("169.254.169.254".parse().unwrap()), Some(16));
        assert_eq!(special_range("::ffff:169.254.169.254".parse().unwrap()), Some(16));
        assert_eq!(special_range("0.0.0.0".parse().unwrap()), Some(32));
        assert_eq!(special_range("127.0.0.1".parse().unwrap()), None);
        let p = policy(&["http://localhost:8080"]);
        assert!(matches!(p.authorize_http(Scheme::Http, "localhost", 8080).await, Ok(HttpRoute::Pinned(a)) if a.ip().is_loopback()));
    }

    /// Wildcards and wide CIDRs never reach special addresses, whether the
    /// guest names them as literals (`0.0.0.0`, `[::ffff:0.0.0.0]`) or not;
    /// only a grant that names the special range itself does.
    #[tokio::test]
    async fn wildcards_never_reach_special_literals() {
        let wide = policy(&["http://*:8080", "http://0.0.0.0/0:9090", "tcp://*:5432", "tcp://[::/0]:6432"]);
        for host in ["0.0.0.0", "[::ffff:0.0.0.0]", "169.254.169.254", "[::ffff:169.254.169.254]", "224.0.0.1", "255.255.255.255", "[::]", "[fe80::1]"] {
            assert!(wide.authorize_http(Scheme::Http, host, 8080).await.is_err(), "http://{host}:8080");
            assert!(wide.authorize_http(Scheme::Http, host, 9090).await.is_err(), "http://{host}:9090");
        }
        for addr in ["0.0.0.0:5432", "169.254.169.254:5432", "[::ffff:0.0.0.0]:5432", "[::]:6432", "[fe80::1]:6432"] {
            assert!(!wide.check_socket(addr.parse().unwrap(), SocketAddrUse::TcpConnect).await, "tcp {addr}");
        }
        assert!(wide.authorize_http(Scheme::Http, "127.0.0.1", 8080).await.is_ok());
        assert!(wide.check_socket("10.1.2.3:5432".parse().unwrap(), SocketAddrUse::TcpConnect).await);
        assert!(wide.check_socket("[2001:db8::1]:6432".parse().unwrap(), SocketAddrUse::TcpConnect).await);
        let named = policy(&["http://169.254.169.254:80", "tcp://169.254.0.0/16:80"]);
        assert!(named.authorize_http(Scheme::Http, "169.254.169.254", 80).await.is_ok());
        assert!(named.check_socket("169.254.1.1:80".parse().unwrap(), SocketAddrUse::TcpConnect).await);
    }

    #[tokio::test]
    async fn sockets_deny_by_default() {
        let p = policy(&["tcp://10.0.0.0/8:5432", "http://127.0.0.1:80"]);
        assert!(p.check_socket("10.1.2.3:5432".parse().unwrap(), SocketAddrUse::TcpConnect).await);
        assert!(!p.check_socket("10.1.2.3:5433".parse().unwrap(), SocketAddrUse::TcpConnect).await);
        // An HTTP grant is not a raw TCP grant.
        assert!(!p.check_socket("127.0.0.1:80".parse().unwrap(), SocketAddrUse::TcpConnect).await);
        assert!(p.check_socket("0.0.0.0:0".parse().unwrap(), SocketAddrUse::TcpBind).await);
        assert!(!p.check_socket("0.0.0.0:8080".parse().unwrap(), SocketAddrUse::TcpBind).await);
        assert!(!p.check_socket("0.0.0.0:0".parse().unwrap(), SocketAddrUse::TcpListen).await);
        assert!(!p.check_socket("10.1.2.3:5432".parse().unwrap(), SocketAddrUse::UdpSend).await);
    }
}

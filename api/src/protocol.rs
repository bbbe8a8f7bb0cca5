//! Which application protocol a port carries: declared (Istio's port-name convention,
//! Kubernetes `appProtocol`, Consul service meta) or detected from a connection's first
//! bytes.
//!
//! Istio's rules, kept as they are so that users' port names mean the same thing here: a
//! port named `<protocol>[-<suffix>]` declares that protocol (`http`, `http-web`,
//! `grpc-api`, `tcp-db`), matched case-insensitively; Kubernetes `appProtocol` (and Consul's
//! `protocol` meta) wins over the name; anything else is undeclared and the client side
//! sniffs the first bytes (an HTTP/1.x request line or the HTTP/2 preface), falling back to
//! opaque TCP. Declared beats detected. Beyond Istio, `http2*` and `grpc*` names without a
//! dash (`http2api`, `grpcweb`) are HTTP/2 too, as the issue's interface asks.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An application protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Plaintext HTTP/1.1.
    Http,
    /// Plaintext HTTP/2 (h2c, prior knowledge).
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// gRPC-Web (HTTP/1.1 or HTTP/2).
    GrpcWeb,
    /// TLS carrying HTTP: opaque to the mesh, like `tls`.
    Https,
    /// TLS: opaque.
    Tls,
    /// Opaque TCP: never parsed.
    Tcp,
    /// MongoDB wire protocol (opaque here).
    Mongo,
    /// MySQL (opaque here).
    Mysql,
    /// Redis (opaque here).
    Redis,
    /// UDP (not proxied).
    Udp,
    /// Undeclared: detected per connection by sniffing.
    Auto,
}

impl Protocol {
    /// Every protocol, in declaration order.
    pub const ALL: [Protocol; 12] = [
        Protocol::Http,
        Protocol::Http2,
        Protocol::Grpc,
        Protocol::GrpcWeb,
        Protocol::Https,
        Protocol::Tls,
        Protocol::Tcp,
        Protocol::Mongo,
        Protocol::Mysql,
        Protocol::Redis,
        Protocol::Udp,
        Protocol::Auto,
    ];

    /// The name used in port names, configs and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
            Protocol::Https => "https",
            Protocol::Tls => "tls",
            Protocol::Tcp => "tcp",
            Protocol::Mongo => "mongo",
            Protocol::Mysql => "mysql",
            Protocol::Redis => "redis",
            Protocol::Udp => "udp",
            Protocol::Auto => "auto",
        }
    }

    /// A protocol value as written in `appProtocol`, Consul's `protocol` meta or a config:
    /// Istio's names (any case), plus Kubernetes' standard `kubernetes.io/h2c` (HTTP/2
    /// cleartext), `kubernetes.io/ws` (WebSocket, HTTP/1.1 upgrade) and
    /// `kubernetes.io/wss`. `None` for anything else.
    pub fn parse(value: &str) -> Option<Protocol> {
        let v = value.trim().to_ascii_lowercase();
        Some(match v.as_str() {
            "http" | "kubernetes.io/ws" => Protocol::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            "https" | "kubernetes.io/wss" => Protocol::Https,
            "tls" => Protocol::Tls,
            "tcp" => Protocol::Tcp,
            "mongo" => Protocol::Mongo,
            "mysql" => Protocol::Mysql,
            "redis" => Protocol::Redis,
            "udp" => Protocol::Udp,
            _ => return None,
        })
    }

    /// What a port name declares: `<protocol>[-<suffix>]` (Istio), `grpc-web[-suffix]`, and
    /// `http2*` / `grpc*` prefixes; [`Protocol::Auto`] when it declares nothing.
    pub fn from_port_name(name: &str) -> Protocol {
        let lower = name.to_ascii_lowercase();
        if lower == "grpc-web" || lower.starts_with("grpc-web-") {
            return Protocol::GrpcWeb;
        }
        let head = lower.split('-').next().unwrap_or("");
        if let Some(p) = Protocol::parse(head)
            && !head.contains('/')
        {
            return p;
        }
        if lower.starts_with("http2") {
            Protocol::Http2
        } else if lower.starts_with("grpc") {
            Protocol::Grpc
        } else {
            Protocol::Auto
        }
    }

    /// The protocol of a port: an explicit declaration (`appProtocol`, Consul meta) wins
    /// over the name; an explicit value that is not a known protocol is ignored (the name
    /// decides), as Istio does.
    pub fn declared(port_name: &str, explicit: Option<&str>) -> Protocol {
        explicit
            .and_then(Protocol::parse)
            .unwrap_or_else(|| Protocol::from_port_name(port_name))
    }

    /// Whether the agents parse this protocol as HTTP (HTTP/1.1, HTTP/2, gRPC).
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }

    /// Whether the client side detects the protocol per connection.
    pub fn sniffs(self) -> bool {
        self == Protocol::Auto
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest HTTP/1.x request line the sniffer reads before calling it opaque TCP.
pub const MAX_SNIFF_LINE: usize = 8 * 1024;

/// The longest method token the sniffer accepts (the longest registered method is 17).
const MAX_METHOD: usize = 32;

/// What the first bytes of a client connection are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1,
    /// The HTTP/2 preface (prior knowledge).
    Http2,
    /// Not HTTP: splice as opaque TCP.
    Opaque,
    /// Consistent with HTTP so far; read more (or, on timeout, treat as opaque).
    NeedMore,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies the first bytes a client sent. Pure and bounded: looks at most at
/// [`MAX_SNIFF_LINE`] bytes; never panics on any input (fuzzed).
pub fn sniff(buf: &[u8]) -> Sniffed {
    if buf.is_empty() {
        return Sniffed::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Sniffed::Http2
        } else {
            Sniffed::NeedMore
        };
    }
    // request-line = method SP request-target SP HTTP-version CRLF (RFC 9112 §3).
    let buf = &buf[..buf.len().min(MAX_SNIFF_LINE)];
    let mut i = 0;
    while i < buf.len() && is_tchar(buf[i]) {
        i += 1;
    }
    if i >= MAX_METHOD {
        return Sniffed::Opaque;
    }
    if i == buf.len() {
        return Sniffed::NeedMore;
    }
    if i == 0 || buf[i] != b' ' {
        return Sniffed::Opaque;
    }
    i += 1;
    let target_start = i;
    while i < buf.len() && buf[i] > b' ' && buf[i] != 0x7f {
        i += 1;
    }
    if i == buf.len() {
        return if buf.len() < MAX_SNIFF_LINE {
            Sniffed::NeedMore
        } else {
            Sniffed::Opaque
        };
    }
    if i == target_start || buf[i] != b' ' {
        return Sniffed::Opaque;
    }
    i += 1;
    let rest = &buf[i..];
    for version in [&b"HTTP/1.1\r\n"[..], &b"HTTP/1.0\r\n"[..]] {
        let n = rest.len().min(version.len());
        if rest[..n] == version[..n] {
            return if rest.len() >= version.len() {
                Sniffed::Http1
            } else {
                Sniffed::NeedMore
            };
        }
    }
    // Bare LF line endings are tolerated by servers; accept them as HTTP too.
    for version in [&b"HTTP/1.1\n"[..], &b"HTTP/1.0\n"[..]] {
        if rest.starts_with(version) {
            return Sniffed::Http1;
        }
    }
    Sniffed::Opaque
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_follow_istio() {
        for (name, want) in [
            ("http", Protocol::Http),
            ("HTTP", Protocol::Http),
            ("http-web", Protocol::Http),
            ("http2", Protocol::Http2),
            ("http2-api", Protocol::Http2),
            ("http2api", Protocol::Http2),
            ("grpc", Protocol::Grpc),
            ("grpc-api", Protocol::Grpc),
            ("grpcapi", Protocol::Grpc),
            ("grpc-web", Protocol::GrpcWeb),
            ("grpc-web-ui", Protocol::GrpcWeb),
            ("https", Protocol::Https),
            ("tls-db", Protocol::Tls),
            ("tcp", Protocol::Tcp),
            ("tcp-web", Protocol::Tcp),
            ("tcp-iperf", Protocol::Tcp),
            ("mongo", Protocol::Mongo),
            ("mysql-main", Protocol::Mysql),
            ("redis", Protocol::Redis),
            ("udp-dns", Protocol::Udp),
            ("web", Protocol::Auto),
            ("httpbin", Protocol::Auto),
            ("", Protocol::Auto),
            ("-http", Protocol::Auto),
            ("kubernetes.io/h2c", Protocol::Auto),
        ] {
            assert_eq!(Protocol::from_port_name(name), want, "{name:?}");
        }
    }

    #[test]
    fn explicit_protocol_wins_and_unknown_values_fall_back_to_the_name() {
        assert_eq!(Protocol::declared("web", Some("http")), Protocol::Http);
        assert_eq!(Protocol::declared("tcp-x", Some("grpc")), Protocol::Grpc);
        assert_eq!(
            Protocol::declared("web", Some("kubernetes.io/h2c")),
            Protocol::Http2
        );
        assert_eq!(
            Protocol::declared("http-web", Some("example.com/custom")),
            Protocol::Http
        );
        assert_eq!(Protocol::declared("web", None), Protocol::Auto);
    }

    #[test]
    fn names_round_trip_and_http_family() {
        for p in Protocol::ALL {
            if p != Protocol::Auto {
                assert_eq!(Protocol::parse(p.as_str()), Some(p));
            }
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(serde_json::from_str::<Protocol>(&json).unwrap(), p);
        }
        let http: Vec<_> = Protocol::ALL.into_iter().filter(|p| p.is_http()).collect();
        assert_eq!(
            http,
            [
                Protocol::Http,
                Protocol::Http2,
                Protocol::Grpc,
                Protocol::GrpcWeb
            ]
        );
        assert!(!Protocol::Tcp.is_http() && !Protocol::Tcp.sniffs());
        assert!(Protocol::Auto.sniffs());
    }

    #[test]
    fn sniffs_request_lines_and_the_h2_preface() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Sniffed::Http1);
        assert_eq!(sniff(b"POST /x?y=1 HTTP/1.0\r\n"), Sniffed::Http1);
        assert_eq!(sniff(b"GET / HTTP/1.1\n"), Sniffed::Http1);
        assert_eq!(sniff(b"M-SEARCH * HTTP/1.1\r\n"), Sniffed::Http1);
        assert_eq!(sniff(H2_PREFACE), Sniffed::Http2);
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(&[0, 0, 0, 4]);
        assert_eq!(sniff(&more), Sniffed::Http2);
    }

    #[test]
    fn partial_input_asks_for_more() {
        for partial in [
            &b""[..],
            b"G",
            b"GET",
            b"GET ",
            b"GET /index",
            b"GET / ",
            b"GET / HTTP/1.",
            b"GET / HTTP/1.1\r",
            b"PRI * HTTP/2.0\r\n",
            b"PRI",
        ] {
            assert_eq!(sniff(partial), Sniffed::NeedMore, "{partial:?}");
        }
    }

    #[test]
    fn other_protocols_are_opaque() {
        for opaque in [
            &b"\x16\x03\x01\x02\x00\x01"[..], // TLS ClientHello
            b"SSH-2.0-OpenSSH_9.2\r\n",       // an SSH banner
            b"*1\r\n$4\r\nPING\r\n",          // Redis RESP
            b"\x00\x00\x00\x01",              // binary
            b"GET  / HTTP/1.1\r\n",           // two spaces
            b"GET / HTTP/2.0\r\n",            // not 1.x
            b"GET / FTP/1.1\r\n",
            b" GET / HTTP/1.1\r\n",
            b"GET /a\tb HTTP/1.1\r\n",
        ] {
            assert_eq!(sniff(opaque), Sniffed::Opaque, "{opaque:?}");
        }
        // A method-like token that never ends is opaque after 32 bytes, and stays so.
        assert_eq!(sniff(&[b'A'; 40]), Sniffed::Opaque);
        assert_eq!(sniff(&[b'A'; 32]), Sniffed::Opaque);
        let mut long_method = vec![b'A'; 32];
        long_method.extend_from_slice(b" / HTTP/1.1\r\n");
        assert_eq!(sniff(&long_method), Sniffed::Opaque);
        // A request line longer than the cap is opaque, not an endless wait.
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_SNIFF_LINE));
        assert_eq!(sniff(&long), Sniffed::Opaque);
    }
}

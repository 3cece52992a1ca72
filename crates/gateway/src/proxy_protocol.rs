//! The PROXY protocol (v1 and v2) on the device listener, for devices behind an L4 load
//! balancer: `[proxy_protocol]` in the configuration, off without it.
//!
//! A connection from one of `proxies` must open with a PROXY header, read within
//! `header_timeout_secs` and `max_header_bytes`; the address it names is the device's from
//! then on (logs, the per-address caps, `X-Forwarded-For` / `Forwarded` to the endpoint). A
//! connection from any other address is served as it is, unless it opens with a PROXY header:
//! then it is refused, since only the listed proxies may say where a device is. Either refusal
//! closes the connection before TLS and logs why (at most one line a second of each kind).
//!
//! Everything arriving on `listen` is judged so, connectors' channels included (a connector
//! behind the same load balancer is told apart by ALPN after the header, as a direct one is).
//! `channel_listen` takes no PROXY header: connectors dial it directly.
//!
//! The header is parsed by the `ppp` crate; this module only reads its bytes off the socket,
//! exactly as many as the header has, so that the TLS bytes after it stay unread.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// `[proxy_protocol]`: which PROXY versions are taken, and from where.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocol {
    /// "v1" (text, haproxy's `send-proxy`), "v2" (binary, `send-proxy-v2`, what cloud load
    /// balancers send) or "any" (default "v2").
    #[serde(default)]
    pub version: ProxyVersion,
    /// The addresses the load balancers connect from, each an address or a range
    /// ("10.0.0.0/8", "fd00::/8"). Required: no one else may send a PROXY header.
    pub proxies: Vec<String>,
    /// Seconds a proxy's connection has to send its whole PROXY header (default 5). A proxy
    /// sends it at once on connecting; the device's handshake time starts after it.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// The largest PROXY header taken, in bytes (default 512; at least 107, a v1 header's
    /// longest). A v2 header's address block is 12 to 216 bytes, and its TLVs (TLS details,
    /// cloud link ids) add to it.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    V1,
    #[default]
    V2,
    Any,
}

fn default_header_timeout() -> u64 {
    5
}

fn default_max_header_bytes() -> usize {
    512
}

/// A v1 header's longest (its specification's 107 bytes).
const V1_MAX: usize = 107;
/// A v2 header's fixed part: the signature, version and command, family, length.
const V2_FIXED: usize = 16;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// What is read first: no valid header is shorter (v1's "PROXY UNKNOWN\r\n").
const FIRST_READ: usize = 15;

impl ProxyProtocol {
    /// Takes proxies at `proxies` with the defaults.
    pub fn new(version: ProxyVersion, proxies: Vec<String>) -> ProxyProtocol {
        ProxyProtocol {
            version,
            proxies,
            header_timeout_secs: default_header_timeout(),
            max_header_bytes: default_max_header_bytes(),
        }
    }

    /// What is wrong with these settings, if anything: the key and why.
    pub(crate) fn problem(&self) -> Option<(&'static str, String)> {
        if self.proxies.is_empty() {
            return Some((
                "proxy_protocol.proxies",
                "list the load balancers' addresses (or ranges, \"10.0.0.0/8\"): only they may send a PROXY header".into(),
            ));
        }
        for entry in &self.proxies {
            if let Err(reason) = parse_range(entry) {
                return Some(("proxy_protocol.proxies", reason));
            }
        }
        if !(1..=60).contains(&self.header_timeout_secs) {
            return Some((
                "proxy_protocol.header_timeout_secs",
                "must be between 1 and 60".into(),
            ));
        }
        let most = V2_FIXED + usize::from(u16::MAX);
        if !(V1_MAX..=most).contains(&self.max_header_bytes) {
            return Some((
                "proxy_protocol.max_header_bytes",
                format!("must be between {V1_MAX} (a v1 header's longest) and {most}"),
            ));
        }
        None
    }
}

/// An address range: its first address and prefix length.
type Range = (IpAddr, u8);

fn parse_range(entry: &str) -> Result<Range, String> {
    let entry = entry.trim();
    let (addr, len) = match entry.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (entry, None),
    };
    let bad = || {
        // Debug's quoting escapes control characters.
        format!("{entry:?} is not an address or range (\"10.0.0.5\", \"10.0.0.0/8\", \"fd00::/8\")")
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let addr = addr.to_canonical();
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(len) => len.parse::<u8>().map_err(|_| bad())?,
        None => bits,
    };
    if len > bits {
        return Err(bad());
    }
    Ok((addr, len))
}

fn in_range((net, len): Range, ip: IpAddr) -> bool {
    match (net, ip.to_canonical()) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

/// The settings as the listener uses them, with the rate of its refusal lines.
pub(crate) struct Proxies {
    version: ProxyVersion,
    ranges: Vec<Range>,
    pub(crate) header_time: Duration,
    max_header_bytes: usize,
    /// One line a second at most: refused from an unlisted address, refused from a proxy.
    logged: [LogEvery; 2],
    /// Refusals since start, for `/status`: the same two kinds.
    refused: [std::sync::atomic::AtomicU64; 2],
}

impl Proxies {
    /// From settings `problem` found nothing wrong with (an entry that does not parse is
    /// left out).
    pub(crate) fn new(settings: &ProxyProtocol) -> Proxies {
        Proxies {
            version: settings.version,
            ranges: settings
                .proxies
                .iter()
                .filter_map(|e| parse_range(e).ok())
                .collect(),
            header_time: Duration::from_secs(settings.header_timeout_secs),
            max_header_bytes: settings.max_header_bytes,
            logged: Default::default(),
            refused: Default::default(),
        }
    }

    /// Whether `ip` is one of the proxies.
    pub(crate) fn trusts(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|&r| in_range(r, ip))
    }

    /// What the log says of the settings at start.
    pub(crate) fn describe(&self) -> String {
        let version = match self.version {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
            ProxyVersion::Any => "v1 or v2",
        };
        let ranges: Vec<String> = self
            .ranges
            .iter()
            .map(|(ip, len)| format!("{ip}/{len}"))
            .collect();
        format!(
            "PROXY protocol {version} from {} (header within {} s and {} bytes); a PROXY header from any other address is refused",
            ranges.join(", "),
            self.header_time.as_secs(),
            self.max_header_bytes
        )
    }

    /// For `/status`: connections refused for a PROXY header from an address not listed, and
    /// from a listed proxy for no valid header.
    pub(crate) fn status(&self) -> serde_json::Value {
        let n = |i: usize| self.refused[i].load(std::sync::atomic::Ordering::Relaxed);
        serde_json::json!({
            "refused_header_from_unlisted_address": n(0),
            "refused_no_valid_header_from_proxy": n(1),
        })
    }

    /// Logs a connection from `peer`, not a proxy, refused for opening with a PROXY header.
    pub(crate) fn refused_unlisted(&self, peer: SocketAddr, log: &logs::Log) {
        self.refused[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(more) = self.logged[0].due() {
            log.warn(&format!(
                "Refused a connection from {peer}: it sent a PROXY protocol header, and {} is not in proxy_protocol.proxies (only the load balancers listed there may say where a device is){}",
                peer.ip(),
                since(more)
            ));
        }
    }

    /// Reads a proxy's PROXY header off `io` within `header_timeout_secs`: the device's
    /// address, or `peer` itself when the header names none (a LOCAL command: the proxy's
    /// own health check; or UNKNOWN / UNSPEC). On refusal, logs why and returns None.
    pub(crate) async fn read<R: AsyncRead + Unpin>(
        &self,
        io: &mut R,
        peer: SocketAddr,
        log: &logs::Log,
    ) -> Option<SocketAddr> {
        let read = tokio::time::timeout(self.header_time, self.read_header(io, peer));
        let why = match read.await {
            Ok(Ok(addr)) => return Some(addr),
            Ok(Err(why)) => why,
            Err(_) => format!(
                "no complete PROXY header within proxy_protocol.header_timeout_secs ({} s)",
                self.header_time.as_secs()
            ),
        };
        self.refused[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(more) = self.logged[1].due() {
            log.warn(&format!(
                "Refused a connection from load balancer {peer} (in proxy_protocol.proxies): {why}{}",
                since(more)
            ));
        }
        None
    }

    async fn read_header<R: AsyncRead + Unpin>(
        &self,
        io: &mut R,
        peer: SocketAddr,
    ) -> Result<SocketAddr, String> {
        let closed = |_| "it closed before its PROXY header was complete".to_string();
        let mut buf = vec![0u8; FIRST_READ];
        io.read_exact(&mut buf).await.map_err(closed)?;
        match kind(&buf, self.version)? {
            Kind::V2 => {
                // The length is in the 15th and 16th bytes: one more read of one byte.
                buf.push(io.read_u8().await.map_err(closed)?);
                let total = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
                if total > self.max_header_bytes {
                    return Err(format!(
                        "its PROXY v2 header is {total} bytes, over proxy_protocol.max_header_bytes ({})",
                        self.max_header_bytes
                    ));
                }
                buf.resize(total, 0);
                io.read_exact(&mut buf[V2_FIXED..]).await.map_err(closed)?;
            }
            Kind::V1 => {
                // To its CRLF, a byte at a time: what follows is the device's TLS.
                let most = V1_MAX.min(self.max_header_bytes);
                while !buf.ends_with(b"\r\n") {
                    if buf.len() >= most {
                        return Err(format!(
                            "its PROXY v1 header has no end (CRLF) within {most} bytes"
                        ));
                    }
                    buf.push(io.read_u8().await.map_err(closed)?);
                }
            }
        }
        source(&buf, peer)
    }
}

/// A header's version, as its first bytes tell.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    V1,
    V2,
}

/// What the first `FIRST_READ` bytes of a proxy's connection say of its header, or why it is
/// refused.
fn kind(first: &[u8], version: ProxyVersion) -> Result<Kind, String> {
    let wanted = |got: &str| {
        let want = match version {
            ProxyVersion::V1 => "v1",
            _ => "v2",
        };
        format!("it sent a PROXY {got} header, and proxy_protocol.version is \"{want}\"")
    };
    if first.starts_with(V2_SIGNATURE) {
        if version == ProxyVersion::V1 {
            return Err(wanted("v2"));
        }
        return Ok(Kind::V2);
    }
    if first.starts_with(b"PROXY ") {
        if version == ProxyVersion::V2 {
            return Err(wanted("v1"));
        }
        return Ok(Kind::V1);
    }
    Err(not_a_header(first))
}

/// Why the first bytes of a proxy's connection are no PROXY header.
fn not_a_header(first: &[u8]) -> String {
    if first.first() == Some(&0x16) {
        "it sent no PROXY header but a TLS handshake (a device or connector reaching the gateway from that address directly, or a load balancer not configured to send the PROXY protocol)".into()
    } else {
        "it sent no PROXY header (nor a TLS handshake)".into()
    }
}

/// The source address a complete header names, `peer` when it names none.
fn source(header: &[u8], peer: SocketAddr) -> Result<SocketAddr, String> {
    let invalid = |e: &dyn std::fmt::Display| format!("its PROXY header is not valid: {e}");
    if header.starts_with(V2_SIGNATURE) {
        let parsed = ppp::v2::Header::try_from(header).map_err(|e| invalid(&e))?;
        if parsed.command == ppp::v2::Command::Local {
            return Ok(peer);
        }
        return Ok(match parsed.addresses {
            ppp::v2::Addresses::IPv4(a) => SocketAddr::from((a.source_address, a.source_port)),
            ppp::v2::Addresses::IPv6(a) => SocketAddr::from((a.source_address, a.source_port)),
            ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => peer,
        });
    }
    let parsed = ppp::v1::Header::try_from(header).map_err(|e| invalid(&e))?;
    Ok(match parsed.addresses {
        ppp::v1::Addresses::Tcp4(a) => SocketAddr::from((a.source_address, a.source_port)),
        ppp::v1::Addresses::Tcp6(a) => SocketAddr::from((a.source_address, a.source_port)),
        ppp::v1::Addresses::Unknown => peer,
    })
}

/// Whether the first bytes a client sent are (the start of) a PROXY header, v1 or v2.
pub(crate) fn looks_like_header(first: &[u8]) -> bool {
    let starts = |signature: &[u8]| {
        let n = first.len().min(signature.len());
        n > 0 && first[..n] == signature[..n]
    };
    starts(V2_SIGNATURE) || starts(b"PROXY ")
}

fn since(more: u64) -> String {
    match more {
        0 => String::new(),
        n => format!(" ({n} more such since the last such line)"),
    }
}

/// At most one line a second of a kind; the ones left out are counted for the next.
#[derive(Default)]
struct LogEvery {
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogEvery {
    /// Some(left out since the last line) when a line is due now.
    fn due(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;

    fn proxies(version: ProxyVersion) -> Proxies {
        Proxies::new(&ProxyProtocol::new(version, vec!["10.0.0.0/8".into()]))
    }

    const PEER: &str = "10.1.2.3:40000";

    /// `bytes` sent by a proxy (all at once, then the rest of its connection `after`): what
    /// `read` makes of them, and what is left unread.
    fn read(proxies: &Proxies, bytes: &[u8]) -> (Option<SocketAddr>, Vec<u8>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (mut ours, mut theirs) = tokio::io::duplex(1 << 17);
            theirs.write_all(bytes).await.unwrap();
            drop(theirs);
            let log = logs::Logger::new("TEST").into_log();
            let got = proxies.read(&mut ours, PEER.parse().unwrap(), &log).await;
            let mut rest = Vec::new();
            ours.read_to_end(&mut rest).await.unwrap();
            (got, rest)
        })
    }

    fn v2(source: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
        let addresses: ppp::v2::Addresses =
            (source, "10.9.9.9:443".parse::<SocketAddr>().unwrap()).into();
        let mut header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            addresses,
        )
        .build()
        .unwrap();
        if !tlvs.is_empty() {
            // One NOOP TLV holding `tlvs`, the length fixed up.
            header.push(0x04);
            header.extend_from_slice(&(tlvs.len() as u16).to_be_bytes());
            header.extend_from_slice(tlvs);
            let len = (header.len() - V2_FIXED) as u16;
            header[14..16].copy_from_slice(&len.to_be_bytes());
        }
        header
    }

    #[test]
    fn a_v2_header_names_the_device_and_leaves_the_tls_unread() {
        let mut bytes = v2("203.0.113.7:5555".parse().unwrap(), &[]);
        bytes.extend_from_slice(b"\x16\x03\x01rest");
        let (got, rest) = read(&proxies(ProxyVersion::V2), &bytes);
        assert_eq!(got, Some("203.0.113.7:5555".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01rest");
    }

    #[test]
    fn a_v1_header_names_the_device_and_leaves_the_tls_unread() {
        let bytes = b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 443\r\n\x16\x03";
        let (got, rest) = read(&proxies(ProxyVersion::Any), bytes);
        assert_eq!(got, Some("[2001:db8::7]:5555".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03");
        // UNKNOWN (and v2's LOCAL): the connection's own address.
        let (got, rest) = read(&proxies(ProxyVersion::V1), b"PROXY UNKNOWN\r\nx");
        assert_eq!(got, Some(PEER.parse().unwrap()));
        assert_eq!(rest, b"x");
    }

    #[test]
    fn the_wrong_version_no_header_or_one_too_long_is_refused() {
        let v2 = v2("203.0.113.7:5555".parse().unwrap(), &[]);
        assert_eq!(read(&proxies(ProxyVersion::V1), &v2).0, None);
        let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n";
        assert_eq!(read(&proxies(ProxyVersion::V2), v1).0, None);
        assert_eq!(
            read(
                &proxies(ProxyVersion::Any),
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefgh"
            )
            .0,
            None
        );
        // max_header_bytes (default 512): a v2 header of 513 bytes is refused unread.
        let long = super::tests::v2("203.0.113.7:5555".parse().unwrap(), &[0u8; 513 - 28 - 3]);
        assert_eq!(long.len(), 513);
        let (got, rest) = read(&proxies(ProxyVersion::V2), &long);
        assert_eq!(got, None);
        assert_eq!(rest.len(), 513 - V2_FIXED, "read past the fixed part");
        let fits = super::tests::v2("203.0.113.7:5555".parse().unwrap(), &[0u8; 512 - 28 - 3]);
        assert!(read(&proxies(ProxyVersion::V2), &fits).0.is_some());
        // v1 without its CRLF within 107 bytes.
        let mut endless = b"PROXY TCP4 ".to_vec();
        endless.resize(300, b'1');
        let (got, rest) = read(&proxies(ProxyVersion::V1), &endless);
        assert_eq!((got, rest.len()), (None, 300 - V1_MAX));
    }

    #[test]
    fn settings_are_checked_and_ranges_matched() {
        let mut settings = ProxyProtocol::new(ProxyVersion::V2, vec!["10.0.0.0/8".into()]);
        assert_eq!(settings.problem(), None);
        assert_eq!(
            (settings.header_timeout_secs, settings.max_header_bytes),
            (5, 512)
        );
        settings.max_header_bytes = 100;
        assert_eq!(
            settings.problem().unwrap().0,
            "proxy_protocol.max_header_bytes"
        );
        settings.max_header_bytes = 512;
        settings.header_timeout_secs = 61;
        assert_eq!(
            settings.problem().unwrap().0,
            "proxy_protocol.header_timeout_secs"
        );
        settings.header_timeout_secs = 5;
        for bad in ["10.0.0.0/33", "ten", "", "fd00::/129"] {
            settings.proxies = vec![bad.into()];
            assert_eq!(
                settings.problem().unwrap().0,
                "proxy_protocol.proxies",
                "{bad}"
            );
        }
        settings.proxies = vec![];
        assert!(settings.problem().is_some());
        settings.proxies = vec!["10.0.0.0/8".into(), "fd00::/8".into(), "192.0.2.1".into()];
        let p = Proxies::new(&settings);
        for (ip, trusted) in [
            ("10.200.0.1", true),
            ("11.0.0.1", false),
            ("::ffff:10.0.0.1", true),
            ("fd12::1", true),
            ("fe80::1", false),
            ("192.0.2.1", true),
            ("192.0.2.2", false),
        ] {
            assert_eq!(p.trusts(ip.parse().unwrap()), trusted, "{ip}");
        }
        assert!(looks_like_header(b"PRO") && looks_like_header(b"\r\n\r\n\0"));
        assert!(!looks_like_header(b"\x16\x03") && !looks_like_header(b""));
    }

    proptest! {
        /// Whatever a proxy sends, `read` takes no more than `max_header_bytes` (v1: 107) of
        /// it, and a header it takes leaves what follows unread.
        #[test]
        fn reads_no_more_than_the_header(
            prefix in prop_oneof![
                Just(b"PROXY ".to_vec()),
                Just(V2_SIGNATURE.to_vec()),
                Just(Vec::new()),
            ],
            body in proptest::collection::vec(any::<u8>(), 0..700),
        ) {
            let proxies = proxies(ProxyVersion::Any);
            let mut bytes = prefix;
            bytes.extend_from_slice(&body);
            let (got, rest) = read(&proxies, &bytes);
            let taken = bytes.len() - rest.len();
            prop_assert!(taken <= 512);
            prop_assert_eq!(&bytes[taken..], &rest[..]);
            if got.is_some() {
                let header = &bytes[..taken];
                prop_assert!(header.ends_with(b"\r\n") || header.starts_with(V2_SIGNATURE));
            }
        }
    }
}

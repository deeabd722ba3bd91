//! The allowlisting HTTP proxy of one fetch step.
//!
//! It accepts on the listener the helper created in the step's network namespace
//! ([`super::listener`]) and understands two requests, one per connection:
//! - `CONNECT host:port HTTP/1.1` (what clients send for `https://` URLs through `HTTPS_PROXY`):
//!   after the checks, `200 Connection Established` and the bytes are relayed both ways (TLS stays
//!   end-to-end between the step and the server; kilnd never sees plaintext);
//! - a plain-HTTP request with an absolute URI (`GET http://host:port/path HTTP/1.1`): forwarded
//!   in origin form with `Host` set from the URI and `Connection: close`.
//!
//! The checks, in order: the destination (`host:port`, lowercased) must be in the step's
//! allowlist (already capped by the node policy); a name is resolved by kilnd, and addresses in
//! loopback, private, link-local, CGNAT, multicast or other special ranges are refused (a name
//! could otherwise be pointed at the node's own services or the cloud metadata endpoint); such an
//! address is reachable only as an IP literal that the *node policy's* `[fetch] allow_hosts`
//! names (kilnd connects as root from the host's network namespace: the node operator opens
//! local destinations, not the pipeline author). For IPv6 only global unicast (`2000::/3`) is a
//! destination, minus its special blocks; an IPv4 address embedded in a 6to4, Teredo or NAT64
//! address is judged by the IPv4 rules. kilnd then connects to the address it checked (no second
//! resolution). Every attempt, allowed or denied, is recorded with its time, destination,
//! decision, reason and bytes each way, and announced in the step log
//! (`kiln: fetch: CONNECT evil.example:443 denied (not in allow_hosts)`).
//!
//! The step controls what it sends, so nothing it sends grows the record without bound: request
//! text quoted in a reason is cut at [`super::MAX_QUOTED_BYTES`], a reason at
//! [`MAX_REASON_BYTES`], and the record keeps at most [`MAX_RECORDS`] attempts and
//! [`MAX_RECORD_BYTES`] bytes (later attempts are only counted, and not announced in the log).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kiln_common::intoto::FetchConnection;
use kiln_common::spec::HostPort;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::quoted;

/// Longest request head (request line + headers) accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for resolving a name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for connecting to one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections relayed at once; more wait in the listener's backlog.
const MAX_CONNECTIONS: usize = 64;
/// Connection attempts itemised in the record; later ones are only counted.
pub const MAX_RECORDS: usize = 4096;
/// Size (see [`record_size`]) of the itemised record; attempts beyond it are only counted. An
/// ordinary attempt takes about 300 bytes by that measure, so [`MAX_RECORDS`] of them fit; a
/// step that makes every reason as long as it can gets about 600 itemised. The
/// [`MAX_CONNECTIONS`] attempts in flight may each still grow by a reason and an address.
pub const MAX_RECORD_BYTES: usize = 2 << 20;
/// Longest reason recorded for one attempt.
pub const MAX_REASON_BYTES: usize = 512;
/// Longest method accepted (the longest registered HTTP method has 17 letters).
const MAX_METHOD_BYTES: usize = 24;
/// Longest `host:port` accepted: a 253-byte DNS name or a bracketed IPv6 literal, and a port.
const MAX_AUTHORITY_BYTES: usize = 253 + 6;
/// What an attempt's JSON takes besides its strings (names, punctuation, numbers: 157 bytes).
const RECORD_OVERHEAD_BYTES: usize = 192;

/// The connection log of one step.
#[derive(Debug, Default)]
struct Recorder {
    connections: Vec<FetchConnection>,
    not_itemised: u64,
    /// [`record_size`] of `connections`.
    bytes: usize,
}

/// What the proxy admits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    /// Destinations: the step's `allow_hosts`, capped by the node policy.
    pub hosts: Vec<HostPort>,
    /// The node policy's `[fetch] allow_hosts` (empty without a policy): a special-range IP
    /// literal is a destination only if it is named here.
    pub node_named: Vec<HostPort>,
}

/// The size an attempt adds to the record: an upper bound of its JSON form (its strings as JSON
/// escapes them, plus a fixed overhead for names, punctuation and numbers).
fn record_size(entry: &FetchConnection) -> usize {
    let json = |text: &str| -> usize {
        text.bytes()
            .map(|b| match b {
                b'"' | b'\\' => 2,
                0..0x20 => 6,
                _ => 1,
            })
            .sum()
    };
    RECORD_OVERHEAD_BYTES
        + json(&entry.time)
        + json(&entry.method)
        + json(&entry.host)
        + entry.address.as_deref().map_or(0, json)
        + entry.reason.as_deref().map_or(0, json)
}

impl Recorder {
    /// Records `entry` (its reason cut to [`MAX_REASON_BYTES`]); returns its index, `None` once
    /// the record holds [`MAX_RECORDS`] attempts or [`MAX_RECORD_BYTES`] bytes.
    fn record(&mut self, mut entry: FetchConnection) -> Option<usize> {
        entry.reason = entry.reason.map(|r| super::truncated(r, MAX_REASON_BYTES));
        let size = record_size(&entry);
        if self.connections.len() >= MAX_RECORDS || self.bytes + size > MAX_RECORD_BYTES {
            self.not_itemised += 1;
            return None;
        }
        self.bytes += size;
        self.connections.push(entry);
        Some(self.connections.len() - 1)
    }

    /// Changes the attempt at `index` (its reason cut again), keeping the size up to date.
    fn update(&mut self, index: usize, change: impl FnOnce(&mut FetchConnection)) {
        if let Some(entry) = self.connections.get_mut(index) {
            let before = record_size(entry);
            change(entry);
            entry.reason = entry
                .reason
                .take()
                .map(|r| super::truncated(r, MAX_REASON_BYTES));
            self.bytes = self.bytes - before + record_size(entry);
        }
    }
}

/// A running proxy; [`Proxy::stop`] ends it and returns what it recorded.
#[derive(Debug)]
pub struct Proxy {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    recorder: Arc<Mutex<Recorder>>,
}

struct Context {
    allow: Allowlist,
    recorder: Arc<Mutex<Recorder>>,
    log: mpsc::Sender<Bytes>,
}

impl Proxy {
    /// Starts serving the listener `listener` delivers (nothing happens if it never comes),
    /// admitting `allow`, announcing each decision on `log` (the step log).
    pub fn start(
        allow: Allowlist,
        listener: oneshot::Receiver<TcpListener>,
        log: mpsc::Sender<Bytes>,
    ) -> Self {
        let cancel = CancellationToken::new();
        let recorder = Arc::new(Mutex::new(Recorder::default()));
        let context = Arc::new(Context {
            allow,
            recorder: recorder.clone(),
            log,
        });
        let task = tokio::spawn(serve(listener, context, cancel.clone()));
        Self {
            cancel,
            task,
            recorder,
        }
    }

    /// Stops accepting, ends every relayed connection (the step is gone by now), and returns the
    /// connection log and the number of attempts beyond [`MAX_RECORDS`]. The proxy's handle on
    /// the step log is dropped before this returns.
    pub async fn stop(self) -> (Vec<FetchConnection>, u64) {
        self.cancel.cancel();
        if let Err(err) = self.task.await {
            tracing::warn!(%err, "fetch proxy task failed");
        }
        match self.recorder.lock() {
            Ok(mut recorder) => (
                std::mem::take(&mut recorder.connections),
                recorder.not_itemised,
            ),
            Err(_) => (Vec::new(), 0),
        }
    }
}

async fn serve(
    listener: oneshot::Receiver<TcpListener>,
    context: Arc<Context>,
    cancel: CancellationToken,
) {
    let listener = tokio::select! {
        listener = listener => match listener {
            Ok(listener) => listener,
            // The helper failed before creating it: its outcome says why.
            Err(_) => return,
        },
        () = cancel.cancelled() => return,
    };
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = cancel.cancelled() => break,
        };
        let client = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(err) => {
                    tracing::warn!(%err, "fetch proxy: accept failed");
                    // EMFILE and friends: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => break,
        };
        let context = context.clone();
        let cancel = cancel.clone();
        connections.spawn(async move {
            handle(client, &context, &cancel).await;
            drop(permit);
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// A parsed proxy request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    /// `CONNECT`, `GET`, …
    pub method: String,
    /// Destination.
    pub target: HostPort,
    /// For plain HTTP: the head to send upstream (origin form, `Host` from the URI,
    /// `Connection: close`); `None` for `CONNECT`.
    pub forward_head: Option<Vec<u8>>,
}

/// Parses a request head (without the final blank line). `Err` is the reason shown to the client.
pub(crate) fn parse_head(head: &str) -> Result<Request, String> {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {}", quoted(request_line)));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol version {}", quoted(version)));
    }
    if method.is_empty()
        || method.len() > MAX_METHOD_BYTES
        || !method.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Err(format!("malformed method {}", quoted(method)));
    }
    if method == "CONNECT" {
        return Ok(Request {
            method: method.to_owned(),
            target: authority(target, None)?,
            forward_head: None,
        });
    }
    let lower = target.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err("https:// URLs go through CONNECT (set HTTPS_PROXY)".into());
    }
    let Some(rest) = lower
        .strip_prefix("http://")
        .map(|_| &target["http://".len()..])
    else {
        return Err(format!(
            "{} is not an absolute http:// URI (this is a proxy: use CONNECT or an absolute URI)",
            quoted(target)
        ));
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (host, path) = rest.split_at(end);
    let path = match path {
        "" => "/".to_owned(),
        p if p.starts_with('/') => p.to_owned(),
        p => format!("/{p}"),
    };
    let target = authority(host, Some(80))?;
    let mut forward = format!("{method} {path} {version}\r\n");
    for line in lines {
        let Some((name, _)) = line.split_once(':') else {
            return Err(format!("malformed header line {}", quoted(line)));
        };
        let name = name.trim().to_ascii_lowercase();
        // Hop-by-hop and proxy headers stay here; Host comes from the URI, so a request cannot
        // name one server and be routed to another.
        if matches!(
            name.as_str(),
            "host" | "connection" | "proxy-connection" | "proxy-authorization" | "keep-alive"
        ) {
            continue;
        }
        forward.push_str(line);
        forward.push_str("\r\n");
    }
    let host_header = if target.port == 80 {
        host_only(&target)
    } else {
        target.to_string()
    };
    let _ = write!(forward, "Host: {host_header}\r\nConnection: close\r\n\r\n");
    Ok(Request {
        method: method.to_owned(),
        target,
        forward_head: Some(forward.into_bytes()),
    })
}

fn host_only(target: &HostPort) -> String {
    if target.host.contains(':') {
        format!("[{}]", target.host)
    } else {
        target.host.clone()
    }
}

/// `host:port`, `[v6]:port`, or (with a default port) `host` / `[v6]`.
fn authority(text: &str, default_port: Option<u16>) -> Result<HostPort, String> {
    // Checked here, so that HostPort's messages (which quote all of it) stay short.
    if text.len() > MAX_AUTHORITY_BYTES
        || !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    {
        return Err(format!(
            "{}: not a host name or IP address (wildcards and URLs are not accepted)",
            quoted(text)
        ));
    }
    let has_port = match text.strip_prefix('[') {
        Some(rest) => rest.contains("]:"),
        None => text.contains(':'),
    };
    let full = match (has_port, default_port) {
        (true, _) => text.to_owned(),
        (false, Some(port)) => format!("{text}:{port}"),
        (false, None) => return Err(format!("CONNECT target {} has no port", quoted(text))),
    };
    HostPort::parse(&full)
}

/// Why an address is never a destination, even when allowlisted as a literal.
fn never_a_destination(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("unspecified"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("multicast"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("unspecified"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("multicast"),
        _ => None,
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The special range `ip` is in (not a globally reachable unicast address), if any.
pub(crate) fn special_range(ip: IpAddr) -> Option<Cow<'static, str>> {
    match canonical(ip) {
        IpAddr::V4(v4) => v4_class(v4).map(Cow::Borrowed),
        IpAddr::V6(v6) => never_a_destination(IpAddr::V6(v6))
            .map(Cow::Borrowed)
            .or_else(|| special_v6(v6)),
    }
}

/// Every IPv4 rule: never a destination, or a special range.
fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    never_a_destination(IpAddr::V4(ip)).or_else(|| special_v4(ip))
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared address space")
    } else if a == 0 {
        Some("this network")
    } else if a >= 240 {
        Some("reserved")
    } else if a == 192 && b == 0 && c == 0 {
        Some("IETF protocol assignments")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("benchmarking")
    } else if ip.is_documentation() {
        Some("documentation")
    } else {
        None
    }
}

/// The IPv4 address in two 16-bit segments.
fn v4_of(high: u16, low: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(high) << 16) | u32::from(low))
}

/// An address that carries IPv4 address `v4` (6to4, Teredo, NAT64) is judged by the IPv4 rules:
/// kilnd's packets end up at `v4`.
fn embedded(what: &str, v4: Ipv4Addr) -> Option<Cow<'static, str>> {
    v4_class(v4).map(|class| Cow::Owned(format!("{what} of {v4}: {class}")))
}

/// IPv6: only global unicast (`2000::/3`) minus its special blocks.
fn special_v6(ip: Ipv6Addr) -> Option<Cow<'static, str>> {
    let s = ip.segments();
    if s[0] & 0xe000 != 0x2000 {
        return outside_global_unicast(ip);
    }
    if s[0] == 0x2002 {
        // 6to4 (RFC 3056): 2002:VVVV:VVVV::/48, the site's IPv4 address in bits 16-47; a host
        // with a 6to4 tunnel sends the packet to that IPv4 address.
        return embedded("6to4", v4_of(s[1], s[2]));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        // Teredo (RFC 4380): 2001:0:SSSS:SSSS:flags:port:CCCC:CCCC, the server's IPv4 address in
        // clear, the client's inverted ("obfuscated").
        return embedded("Teredo server", v4_of(s[2], s[3]))
            .or_else(|| embedded("Teredo client", v4_of(!s[6], !s[7])));
    }
    let class = if s[0] == 0x2001 && s[1] < 0x0200 {
        // 2001::/23 (RFC 2928): benchmarking, ORCHID, AMT, …; none of it a mirror.
        "IETF protocol assignments"
    } else if (s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] == 0x3fff && s[1] < 0x1000) {
        // 2001:db8::/32 (RFC 3849), 3fff::/20 (RFC 9637).
        "documentation"
    } else {
        return None;
    };
    Some(Cow::Borrowed(class))
}

/// IPv6 outside `2000::/3`: never a destination, but NAT64 of a global IPv4 address.
fn outside_global_unicast(ip: Ipv6Addr) -> Option<Cow<'static, str>> {
    let s = ip.segments();
    let class = if ip.is_loopback() {
        "loopback"
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052; DNS64 answers on IPv6-only hosts).
        return embedded("NAT64", v4_of(s[6], s[7]));
    } else if s[..3] == [0x64, 0xff9b, 1] {
        return local_use_nat64(ip.octets());
    } else if s[..6] == [0; 6] {
        "IPv4-compatible (deprecated)"
    } else if s[..4] == [0x0100, 0, 0, 0] {
        "discard-only (RFC 6666)"
    } else if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        "IPv4-translated (SIIT, RFC 2765)"
    } else if s[0] & 0xfe00 == 0xfc00 {
        "unique local"
    } else if s[0] & 0xffc0 == 0xfe80 {
        "link-local"
    } else if s[0] & 0xffc0 == 0xfec0 {
        "site-local"
    } else {
        "not global unicast (outside 2000::/3)"
    };
    Some(Cow::Borrowed(class))
}

/// Local-use NAT64, 64:ff9b:1::/48 (RFC 8215). Where the IPv4 address sits depends on the
/// operator's prefix length (RFC 6052: /48, /56, /64 or /96 inside this block; bits 64-71 zero,
/// and zero after the IPv4 address). Every layout the address fits must carry a global IPv4
/// address, and it must fit one.
fn local_use_nat64(octets: [u8; 16]) -> Option<Cow<'static, str>> {
    let mut fits = false;
    for prefix_bytes in [6, 7, 8, 12] {
        let mut at = (prefix_bytes..16).filter(|&i| i != 8);
        let mut v4 = [0_u8; 4];
        for (slot, i) in v4.iter_mut().zip(&mut at) {
            *slot = octets[i];
        }
        let suffix_zero = at.all(|i| octets[i] == 0);
        if octets[8] != 0 || !suffix_zero {
            continue;
        }
        fits = true;
        if let Some(class) = embedded("local-use NAT64", Ipv4Addr::from(v4)) {
            return Some(class);
        }
    }
    (!fits).then_some(Cow::Borrowed(
        "local-use NAT64 without an IPv4 address (RFC 6052)",
    ))
}

/// Decides `target` against `allow`; `Ok` holds the addresses kilnd may connect to.
pub(crate) async fn admit(allow: &Allowlist, target: &HostPort) -> Result<Vec<SocketAddr>, String> {
    if !allow.hosts.contains(target) {
        return Err("not in allow_hosts".into());
    }
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        if let Some(class) = never_a_destination(ip) {
            return Err(format!("{ip} is a {class} address, never a destination"));
        }
        // A special-range literal (a local mirror) is the node operator's choice: kilnd connects
        // as root from the host's network namespace, where firewall rules may trust root.
        if let Some(class) = special_range(ip)
            && !allow.node_named.contains(target)
        {
            return Err(format!(
                "{ip} is in a special range ({class}): reachable only when the node policy's [fetch] allow_hosts names {target}"
            ));
        }
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    let resolved = tokio::time::timeout(
        RESOLVE_TIMEOUT,
        tokio::net::lookup_host((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| format!("resolving {} timed out", target.host))?
    .map_err(|err| format!("cannot resolve {}: {err}", target.host))?;
    let mut usable = Vec::new();
    let mut refused = Vec::new();
    for address in resolved {
        match special_range(address.ip()) {
            Some(class) => refused.push(format!("{} ({class})", address.ip())),
            None => usable.push(address),
        }
    }
    if usable.is_empty() {
        return Err(if refused.is_empty() {
            format!("{} resolves to no address", target.host)
        } else {
            format!(
                "{} resolves to {}; such addresses are reachable only as an IP literal the node policy's [fetch] allow_hosts names",
                target.host,
                refused.join(", ")
            )
        });
    }
    Ok(usable)
}

/// Reads until the blank line ending the head; returns the head (without it) and what followed.
async fn read_head(client: &mut TcpStream) -> Result<(String, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0_u8; 4096];
    loop {
        let n = client
            .read(&mut chunk)
            .await
            .map_err(|err| format!("reading the request: {err}"))?;
        if n == 0 {
            return Err("connection closed before a complete request".into());
        }
        let searched_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf[searched_from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
        {
            let end = searched_from + at;
            let rest = buf.split_off(end + 4);
            buf.truncate(end);
            let head =
                String::from_utf8(buf).map_err(|_| "request head is not UTF-8".to_owned())?;
            return Ok((head, rest));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(format!("request head longer than {MAX_HEAD_BYTES} bytes"));
        }
    }
}

impl Context {
    /// Records an attempt; returns its index (`None` past the record's limits).
    fn record(&self, entry: FetchConnection) -> Option<usize> {
        self.recorder.lock().ok()?.record(entry)
    }

    fn update(&self, index: Option<usize>, change: impl FnOnce(&mut FetchConnection)) {
        if let (Some(index), Ok(mut recorder)) = (index, self.recorder.lock()) {
            recorder.update(index, change);
        }
    }

    async fn announce(&self, index: Option<usize>, line: String) {
        // Past the record limit the log stays quiet too (a step must not flood it).
        if index.is_some() {
            let _ = self
                .log
                .send(Bytes::from(format!("kiln: fetch: {line}\n")))
                .await;
        }
    }
}

async fn handle(mut client: TcpStream, context: &Context, cancel: &CancellationToken) {
    let time = crate::pipeline::now();
    let head = tokio::select! {
        head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)) => {
            head.unwrap_or_else(|_| Err("no complete request within 30 s".into()))
        }
        () = cancel.cancelled() => return,
    };
    let parsed = head.and_then(|(head, rest)| parse_head(&head).map(|r| (r, rest)));
    let (request, rest) = match parsed {
        Ok(parsed) => parsed,
        Err(reason) => {
            let reason = super::truncated(reason, MAX_REASON_BYTES);
            let index = context.record(FetchConnection {
                time,
                method: String::new(),
                host: String::new(),
                port: 0,
                address: None,
                allowed: false,
                reason: Some(reason.clone()),
                bytes_sent: 0,
                bytes_received: 0,
            });
            context
                .announce(index, format!("request refused ({reason})"))
                .await;
            respond(&mut client, "400 Bad Request", &reason).await;
            return;
        }
    };
    let what = format!("{} {}", request.method, request.target);
    let index = context.record(FetchConnection {
        time,
        method: request.method.clone(),
        host: request.target.host.clone(),
        port: request.target.port,
        address: None,
        allowed: false,
        reason: None,
        bytes_sent: 0,
        bytes_received: 0,
    });
    let addresses = match admit(&context.allow, &request.target).await {
        Ok(addresses) => addresses,
        Err(reason) => {
            let reason = super::truncated(reason, MAX_REASON_BYTES);
            context.update(index, |e| e.reason = Some(reason.clone()));
            context
                .announce(index, format!("{what} denied ({reason})"))
                .await;
            respond(
                &mut client,
                "403 Forbidden",
                &format!("kiln fetch proxy: {what} denied ({reason})"),
            )
            .await;
            return;
        }
    };
    context.update(index, |e| e.allowed = true);
    let upstream = tokio::select! {
        upstream = connect(&addresses) => upstream,
        () = cancel.cancelled() => return,
    };
    let mut upstream = match upstream {
        Ok(upstream) => upstream,
        Err(reason) => {
            let reason = super::truncated(reason, MAX_REASON_BYTES);
            context.update(index, |e| e.reason = Some(reason.clone()));
            context
                .announce(index, format!("{what} allowed, but {reason}"))
                .await;
            respond(
                &mut client,
                "502 Bad Gateway",
                &format!("kiln fetch proxy: {what}: {reason}"),
            )
            .await;
            return;
        }
    };
    let address = upstream.peer_addr().map(|a| a.to_string()).ok();
    context.update(index, |e| e.address.clone_from(&address));
    context
        .announce(
            index,
            format!(
                "{what} allowed ({})",
                address.as_deref().unwrap_or("connected")
            ),
        )
        .await;
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let opened = match &request.forward_head {
        None => client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .is_ok(),
        Some(head) => {
            let written = upstream.write_all(head).await.is_ok();
            if written {
                sent.fetch_add(head.len() as u64, Ordering::Relaxed);
            }
            written
        }
    };
    if opened && (rest.is_empty() || upstream.write_all(&rest).await.is_ok()) {
        sent.fetch_add(rest.len() as u64, Ordering::Relaxed);
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        tokio::select! {
            _ = async {
                tokio::join!(
                    pump(client_read, upstream_write, &sent),
                    pump(upstream_read, client_write, &received),
                )
            } => {}
            () = cancel.cancelled() => {}
        }
    }
    context.update(index, |e| {
        e.bytes_sent = sent.load(Ordering::Relaxed);
        e.bytes_received = received.load(Ordering::Relaxed);
    });
}

/// Connects to the first address that answers.
async fn connect(addresses: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut errors = Vec::new();
    for address in addresses {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(err)) => errors.push(format!("{address}: {err}")),
            Err(_) => errors.push(format!("{address}: timed out")),
        }
    }
    Err(format!("connect failed ({})", errors.join("; ")))
}

/// Copies until EOF or an error, counting the bytes delivered; then half-closes `to`.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    count: &AtomicU64,
) {
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}

async fn respond(client: &mut TcpStream, status: &str, message: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{message}\n",
        message.len() + 1
    );
    let _ = client.write_all(response.as_bytes()).await;
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(text: &str) -> HostPort {
        HostPort::parse(text).unwrap()
    }

    #[test]
    fn connect_and_absolute_uri_requests_parse() {
        let r = parse_head("CONNECT Crates.IO:443 HTTP/1.1\r\nHost: crates.io:443").unwrap();
        assert_eq!(
            (r.method.as_str(), r.target),
            ("CONNECT", hp("crates.io:443"))
        );
        assert!(r.forward_head.is_none());

        let r = parse_head(
            "GET http://127.0.0.1:8080/dl/a.crate?x=1 HTTP/1.1\r\nHost: evil.example\r\nUser-Agent: curl\r\nProxy-Connection: Keep-Alive\r\nProxy-Authorization: Basic eA==",
        )
        .unwrap();
        assert_eq!(r.target, hp("127.0.0.1:8080"));
        let head = String::from_utf8(r.forward_head.unwrap()).unwrap();
        assert_eq!(
            head,
            "GET /dl/a.crate?x=1 HTTP/1.1\r\nUser-Agent: curl\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\n\r\n"
        );
        let r = parse_head("HEAD http://[::1] HTTP/1.0").unwrap();
        assert_eq!(r.target, hp("[::1]:80"));
        assert!(
            String::from_utf8(r.forward_head.unwrap())
                .unwrap()
                .starts_with("HEAD / HTTP/1.0\r\nHost: [::1]\r\n")
        );
    }

    #[test]
    fn malformed_or_non_proxy_requests_are_refused() {
        for (head, why) in [
            ("GET /index.html HTTP/1.1", "not an absolute http:// URI"),
            ("GET https://x.org/ HTTP/1.1", "through CONNECT"),
            ("CONNECT x.org HTTP/1.1", "has no port"),
            ("CONNECT *.x.org:443 HTTP/1.1", "not a host name"),
            ("GET http://user@x.org/ HTTP/1.1", "not a host name"),
            ("GET http://x.org/ HTTP/2", "unsupported protocol"),
            ("GET http://x.org/ HTTP/1.1 extra", "malformed request line"),
            ("GET http://x.org/ HTTP/1.1\r\nno colon", "malformed header"),
        ] {
            let err = parse_head(head).unwrap_err();
            assert!(err.contains(why), "{head:?}: {err}");
        }
    }

    #[test]
    fn special_ranges_are_recognised() {
        for (ip, class) in [
            ("127.0.0.1", Some("loopback")),
            ("10.1.2.3", Some("private")),
            ("172.16.0.1", Some("private")),
            ("192.168.1.1", Some("private")),
            ("169.254.169.254", Some("link-local")),
            ("100.64.0.1", Some("shared address space")),
            ("0.0.0.0", Some("unspecified")),
            ("224.0.0.1", Some("multicast")),
            ("::1", Some("loopback")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.0.0.1", Some("private")),
            ("fd00::1", Some("unique local")),
            ("fe80::1", Some("link-local")),
            ("93.184.216.34", None),
            ("2606:4700::6810:84e5", None),
        ] {
            assert_eq!(special_range(ip.parse().unwrap()).as_deref(), class, "{ip}");
        }
    }

    /// One case per IPv6 block the review found missing, plus the blocks around them; an address
    /// that embeds IPv4 is judged by the IPv4 address it carries.
    #[test]
    fn ipv6_is_only_global_unicast_and_embedded_ipv4_is_judged_as_ipv4() {
        for (ip, class) in [
            // 6to4, 2002::/16: 2002:a9fe:a9fe:: carries 169.254.169.254 (cloud metadata).
            (
                "2002:a9fe:a9fe::",
                Some("6to4 of 169.254.169.254: link-local"),
            ),
            ("2002:7f00:1::1", Some("6to4 of 127.0.0.1: loopback")),
            ("2002:0a00:0001:1::1", Some("6to4 of 10.0.0.1: private")),
            ("2002:e000:0001::", Some("6to4 of 224.0.0.1: multicast")),
            ("2002:5db8:d822::1", None),
            // Teredo, 2001::/32: server in clear, client inverted (5601:5601 = !a9fe:a9fe).
            (
                "2001:0:a9fe:a9fe::5db8:d822",
                Some("Teredo server of 169.254.169.254: link-local"),
            ),
            (
                "2001:0:5db8:d822:0:0:5601:5601",
                Some("Teredo client of 169.254.169.254: link-local"),
            ),
            (
                "2001:0:5db8:d822:0:0:80ff:fffe",
                Some("Teredo client of 127.0.0.1: loopback"),
            ),
            ("2001:0:5db8:d822:0:0:a247:27dd", None),
            // The rest of 2001::/23, documentation, SRv6.
            ("2001:2::1", Some("IETF protocol assignments")),
            ("2001:10::1", Some("IETF protocol assignments")),
            ("2001:db8::1", Some("documentation")),
            ("3fff::1", Some("documentation")),
            // SRv6 SIDs, 5f00::/16 (RFC 9602), are outside 2000::/3 too.
            ("5f00::1", Some("not global unicast (outside 2000::/3)")),
            // NAT64 well-known prefix 64:ff9b::/96.
            (
                "64:ff9b::a9fe:a9fe",
                Some("NAT64 of 169.254.169.254: link-local"),
            ),
            ("64:ff9b::a00:1", Some("NAT64 of 10.0.0.1: private")),
            ("64:ff9b::5db8:d822", None),
            // Local-use NAT64 64:ff9b:1::/48, in each layout RFC 6052 allows there.
            (
                "64:ff9b:1::a9fe:a9fe",
                Some("local-use NAT64 of 169.254.169.254: link-local"),
            ),
            (
                "64:ff9b:1:0:a9:fea9:fe00:0",
                Some("local-use NAT64 of 169.254.169.254: link-local"),
            ),
            (
                "64:ff9b:1:a9fe:a9:fe00::",
                Some("local-use NAT64 of 169.254.169.254: link-local"),
            ),
            (
                "64:ff9b:1:a9fe:ff00:a9fe::",
                Some("local-use NAT64 without an IPv4 address (RFC 6052)"),
            ),
            ("64:ff9b:1::5db8:d822", None),
            // Discard-only, SIIT, IPv4-compatible, and anything else outside 2000::/3.
            ("100::1", Some("discard-only (RFC 6666)")),
            (
                "::ffff:0:a9fe:a9fe",
                Some("IPv4-translated (SIIT, RFC 2765)"),
            ),
            ("::a9fe:a9fe", Some("IPv4-compatible (deprecated)")),
            ("4000::1", Some("not global unicast (outside 2000::/3)")),
            ("1000::1", Some("not global unicast (outside 2000::/3)")),
            ("e000::1", Some("not global unicast (outside 2000::/3)")),
            ("fec0::1", Some("site-local")),
            ("ff02::1", Some("multicast")),
            ("::", Some("unspecified")),
            ("2a00:1450:4001:82b::200e", None),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(special_range(ip).as_deref(), class, "{ip}");
        }
    }

    #[tokio::test]
    async fn only_allowlisted_destinations_and_public_addresses_pass() {
        let hosts = vec![
            hp("127.0.0.1:8080"),
            hp("localhost:8080"),
            hp("0.0.0.0:80"),
            hp("93.184.216.34:80"),
        ];
        let node_named = vec![hp("127.0.0.1:8080"), hp("0.0.0.0:80")];
        let allow = Allowlist { hosts, node_named };
        // A special-range IP literal the node policy names is reachable (a local mirror).
        assert_eq!(
            admit(&allow, &hp("127.0.0.1:8080")).await.unwrap(),
            vec!["127.0.0.1:8080".parse().unwrap()]
        );
        // Another port of the same host is not.
        assert_eq!(
            admit(&allow, &hp("127.0.0.1:8081")).await.unwrap_err(),
            "not in allow_hosts"
        );
        // A name that resolves to loopback is refused even though it is allowlisted.
        let err = admit(&allow, &hp("localhost:8080")).await.unwrap_err();
        assert!(
            err.starts_with("localhost resolves to") && err.contains("(loopback)"),
            "{err}"
        );
        let err = admit(&allow, &hp("0.0.0.0:80")).await.unwrap_err();
        assert!(err.contains("never a destination"), "{err}");
        // A public literal needs no node policy.
        assert!(admit(&allow, &hp("93.184.216.34:80")).await.is_ok());
    }

    /// Review finding: with no node policy the pipeline's allow_hosts alone opened loopback and
    /// the metadata endpoint (kilnd connects as root from the host's namespace).
    #[tokio::test]
    async fn a_special_range_literal_needs_the_node_policy_not_just_the_pipeline() {
        for literal in [
            "127.0.0.1:8080",
            "169.254.169.254:80",
            "10.0.0.5:8080",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:8080",
            "[2002:a9fe:a9fe::]:80",
        ] {
            let target = hp(literal);
            let pipeline_only = Allowlist {
                hosts: vec![target.clone()],
                node_named: Vec::new(),
            };
            let err = admit(&pipeline_only, &target).await.unwrap_err();
            assert!(
                err.contains("is in a special range (")
                    && err.ends_with(&format!(
                        "reachable only when the node policy's [fetch] allow_hosts names {target}"
                    )),
                "{literal}: {err}"
            );
            // Naming another port of it does not count either.
            let other_port = Allowlist {
                hosts: vec![target.clone()],
                node_named: vec![HostPort {
                    host: target.host.clone(),
                    port: target.port + 1,
                }],
            };
            assert!(admit(&other_port, &target).await.is_err(), "{literal}");
            let node_named = Allowlist {
                hosts: vec![target.clone()],
                node_named: vec![target.clone()],
            };
            assert!(admit(&node_named, &target).await.is_ok(), "{literal}");
        }
    }

    /// Review finding: a 16 KB request line of \x01 bytes became an 80 KB reason, in the record,
    /// the step log and the answer. Every refusal quotes at most a bounded excerpt.
    #[test]
    fn refusal_reasons_quote_a_bounded_excerpt_of_the_request() {
        let junk = "\u{1}".repeat(16 * 1024);
        let long_method = "A".repeat(16 * 1024);
        let long_host = "a".repeat(16 * 1024);
        let wide = "é".repeat(8 * 1024);
        for (head, why) in [
            (junk.clone(), "malformed request line \"\\u{1}"),
            (
                format!("GET {junk} HTTP/1.1"),
                "is not an absolute http:// URI",
            ),
            (
                format!("GET http://x.org/ {junk}"),
                "unsupported protocol version",
            ),
            (
                format!("{long_method} http://x.org/ HTTP/1.1"),
                "malformed method \"AAAA",
            ),
            (
                format!("GET http://x.org/ HTTP/1.1\r\nX: y\r\n{junk}"),
                "malformed header line",
            ),
            (
                format!("CONNECT {long_host}:443 HTTP/1.1"),
                "not a host name",
            ),
            (format!("CONNECT {junk}:443 HTTP/1.1"), "not a host name"),
            (
                format!("GET http://{long_host}/ HTTP/1.1"),
                "not a host name",
            ),
            (format!("GET http://x{junk}/ HTTP/1.1"), "not a host name"),
            (wide.clone(), "malformed request line \"éé"),
        ] {
            let err = parse_head(&head).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
            assert!(err.len() <= 300, "{why}: {} bytes: {err}", err.len());
            assert!(err.contains("\"… ("), "{why}: no cut marker: {err}");
        }
        // A short method is still a method (the longest registered one has 17 letters).
        assert!(parse_head("UPDATEREDIRECTREF http://x.org/ HTTP/1.1").is_ok());
        assert!(parse_head(&format!("{} http://x.org/ HTTP/1.1", "A".repeat(25))).is_err());
    }

    fn attempt(reason: &str) -> FetchConnection {
        FetchConnection {
            time: "2026-01-01T00:00:00.000000000Z".into(),
            method: String::new(),
            host: String::new(),
            port: 0,
            address: None,
            allowed: false,
            reason: Some(reason.into()),
            bytes_sent: 0,
            bytes_received: 0,
        }
    }

    /// The record is capped in bytes as well as in attempts; what is not itemised is counted.
    #[test]
    fn the_record_is_capped_in_bytes_and_counts_what_it_drops() {
        let mut recorder = Recorder::default();
        let huge = "\u{1}".repeat(80 * 1024);
        let attempts = MAX_RECORDS + 100;
        for _ in 0..attempts {
            recorder.record(attempt(&huge));
        }
        let itemised = recorder.connections.len();
        assert!(itemised < MAX_RECORDS, "the byte cap never applied");
        assert_eq!(itemised as u64 + recorder.not_itemised, attempts as u64);
        assert!(
            recorder
                .connections
                .iter()
                .all(|c| c.reason.as_ref().unwrap().len() <= MAX_REASON_BYTES)
        );
        let json = serde_json::to_vec(&recorder.connections).unwrap();
        assert!(
            json.len() <= MAX_RECORD_BYTES,
            "{} bytes of JSON for {itemised} attempts",
            json.len()
        );
        assert_eq!(
            recorder.bytes,
            recorder.connections.iter().map(record_size).sum::<usize>()
        );

        // Ordinary attempts: the count cap binds first.
        let mut recorder = Recorder::default();
        for _ in 0..attempts {
            let mut entry = attempt("not in allow_hosts");
            entry.method = "CONNECT".into();
            entry.host = "static.crates.io".into();
            entry.address = Some("[2a00:1450:4001:82b::200e]:443".into());
            recorder.record(entry);
        }
        assert_eq!(recorder.connections.len(), MAX_RECORDS);
        assert_eq!(recorder.not_itemised, 100);
        let json = serde_json::to_vec(&recorder.connections).unwrap();
        assert!(json.len() <= MAX_RECORD_BYTES, "{}", json.len());

        // A reason set later is cut too, and the size follows it.
        let mut recorder = Recorder::default();
        let index = recorder.record(attempt("x")).unwrap();
        recorder.update(index, |e| e.reason = Some(huge.clone()));
        assert_eq!(
            recorder.connections[0].reason.as_ref().unwrap().len(),
            MAX_REASON_BYTES
        );
        assert_eq!(recorder.bytes, record_size(&recorder.connections[0]));
    }

    /// The whole path through a real proxy on a real socket: junk requests of 16 KB each leave
    /// short reasons in the record, the step log and the answer.
    #[tokio::test]
    async fn junk_requests_through_the_proxy_leave_short_records_and_log_lines() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (listener_tx, listener_rx) = oneshot::channel();
        let (log_tx, mut log_rx) = mpsc::channel(64);
        let proxy = Proxy::start(Allowlist::default(), listener_rx, log_tx);
        listener_tx.send(listener).unwrap();
        let junk = "\u{1}".repeat(16 * 1024 - 8);
        let heads = [
            format!("{junk}\r\n\r\n"),
            format!(
                "{} http://x.org/ HTTP/1.1\r\n\r\n",
                "A".repeat(16 * 1024 - 32)
            ),
            format!(
                "GET http://x.org/ HTTP/1.1\r\n{}\r\n\r\n",
                &junk[..16 * 1024 - 64]
            ),
        ];
        for head in &heads {
            let mut client = TcpStream::connect(address).await.unwrap();
            client.write_all(head.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            let answer = String::from_utf8(answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");
            assert!(answer.len() < 512, "{} bytes", answer.len());
        }
        let (connections, not_itemised) = proxy.stop().await;
        assert_eq!((connections.len(), not_itemised), (heads.len(), 0));
        for c in &connections {
            let reason = c.reason.as_deref().unwrap();
            assert!(
                reason.len() <= 300 && reason.contains("\"… (16"),
                "{reason}"
            );
        }
        let mut lines = Vec::new();
        while let Ok(line) = log_rx.try_recv() {
            lines.push(String::from_utf8(line.to_vec()).unwrap());
        }
        assert_eq!(lines.len(), heads.len(), "{lines:?}");
        assert!(lines.iter().all(|l| l.len() < 400), "{lines:?}");
    }
}

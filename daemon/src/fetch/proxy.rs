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
//! address is reachable only when that exact IP literal is allowlisted. kilnd then connects to
//! the address it checked (no second resolution). Every attempt, allowed or denied, is recorded
//! with its time, destination, decision, reason and bytes each way, and announced in the step log
//! (`kiln: fetch: CONNECT evil.example:443 denied (not in allow_hosts)`).

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

/// The connection log of one step.
#[derive(Debug, Default)]
struct Recorder {
    connections: Vec<FetchConnection>,
    not_itemised: u64,
}

/// A running proxy; [`Proxy::stop`] ends it and returns what it recorded.
#[derive(Debug)]
pub struct Proxy {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    recorder: Arc<Mutex<Recorder>>,
}

struct Context {
    allow: Vec<HostPort>,
    recorder: Arc<Mutex<Recorder>>,
    log: mpsc::Sender<Bytes>,
}

impl Proxy {
    /// Starts serving the listener `listener` delivers (nothing happens if it never comes),
    /// admitting `allow`, announcing each decision on `log` (the step log).
    pub fn start(
        allow: Vec<HostPort>,
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
        return Err(format!("malformed request line {request_line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol version {version:?}"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("malformed method {method:?}"));
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
            "{target:?} is not an absolute http:// URI (this is a proxy: use CONNECT or an absolute URI)"
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
            return Err(format!("malformed header line {line:?}"));
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
    let has_port = match text.strip_prefix('[') {
        Some(rest) => rest.contains("]:"),
        None => text.contains(':'),
    };
    let full = match (has_port, default_port) {
        (true, _) => text.to_owned(),
        (false, Some(port)) => format!("{text}:{port}"),
        (false, None) => return Err(format!("CONNECT target {text:?} has no port")),
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

/// The special range `ip` is in (not globally reachable), if any.
pub(crate) fn special_range(ip: IpAddr) -> Option<&'static str> {
    if let Some(never) = never_a_destination(ip) {
        return Some(never);
    }
    match canonical(ip) {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
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

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if segments[0] & 0xfe00 == 0xfc00 {
        Some("unique local")
    } else if segments[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if segments[0] & 0xffc0 == 0xfec0 {
        Some("site-local")
    } else if segments[0] == 0x2001 && segments[1] == 0x0db8 {
        Some("documentation")
    } else if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64: judge the IPv4 address it translates to.
        let [_, _, _, _, _, _, hi, lo] = segments;
        let v4 = Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
        special_v4(v4).map(|_| "NAT64 of a special IPv4 range")
    } else if segments[..6] == [0; 6] {
        Some("IPv4-compatible (deprecated)")
    } else {
        None
    }
}

/// Decides `target` against `allow`; `Ok` holds the addresses kilnd may connect to.
pub(crate) async fn admit(
    allow: &[HostPort],
    target: &HostPort,
) -> Result<Vec<SocketAddr>, String> {
    if !allow.contains(target) {
        return Err("not in allow_hosts".into());
    }
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        // An IP literal the allowlist names exactly: even a private or loopback one was chosen
        // deliberately (a local mirror).
        if let Some(class) = never_a_destination(ip) {
            return Err(format!("{ip} is a {class} address, never a destination"));
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
                "{} resolves to {}; such addresses are reachable only when allow_hosts names the IP literal",
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
    /// Records an attempt; returns its index (`None` beyond [`MAX_RECORDS`]).
    fn record(&self, entry: FetchConnection) -> Option<usize> {
        let mut recorder = self.recorder.lock().ok()?;
        if recorder.connections.len() >= MAX_RECORDS {
            recorder.not_itemised += 1;
            return None;
        }
        recorder.connections.push(entry);
        Some(recorder.connections.len() - 1)
    }

    fn update(&self, index: Option<usize>, change: impl FnOnce(&mut FetchConnection)) {
        if let (Some(index), Ok(mut recorder)) = (index, self.recorder.lock())
            && let Some(entry) = recorder.connections.get_mut(index)
        {
            change(entry);
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
            ("64:ff9b::a00:1", Some("NAT64 of a special IPv4 range")),
            ("93.184.216.34", None),
            ("2606:4700::6810:84e5", None),
            ("64:ff9b::5db8:d822", None),
        ] {
            assert_eq!(special_range(ip.parse().unwrap()), class, "{ip}");
        }
    }

    #[tokio::test]
    async fn only_allowlisted_destinations_and_public_addresses_pass() {
        let allow = vec![hp("127.0.0.1:8080"), hp("localhost:8080"), hp("0.0.0.0:80")];
        // An allowlisted IP literal is reachable even in a special range.
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
    }
}

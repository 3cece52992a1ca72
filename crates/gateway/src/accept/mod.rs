//! A connection from accept to close: the ClientHello read and judged against the caps, a
//! channel placed on the shard driving fewest, the TLS handshake, then a connector's channel
//! handed to the registry or a device served over HTTP/1.1 or HTTP/2 until it is idle, stalls
//! or the gateway stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use channel::refusal::{Cause, Refusal};
use channel::tunnel;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use runtime::shards::{Held, Shards};
use time::OffsetDateTime;
use tokio::io::AsyncBufReadExt;
use tokio_rustls::server::StartHandshake;
use tokio_rustls::LazyConfigAcceptor;

use crate::device::{Device, DeviceState};
use crate::forward::handle;
use crate::{channels, idle, limits, Shared};

mod lifetime;

use lifetime::{Counted, Drainable, Idle, OpenStream};

/// How long an HTTP/1.1 device has for a request's headers (slow-loris), counted from the end
/// of the answer before (hyper's header read timeout starts as the connection turns idle).
const HEADER_TIME: Duration = Duration::from_secs(30);

/// How long a device has to answer an HTTP/2 PING before its connection is closed.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// What an HTTP/1.1 device connection's read buffer may hold beyond the header budget (body
/// reads).
const H1_BODY_READ: usize = 64 * 1024;

impl Shared {
    /// The shard a new channel goes to: the one driving fewest (this one on a tie), counted
    /// as on its way there until the returned guard is dropped (registered or failed).
    fn place_channel(&self) -> Held {
        let here = Shards::here();
        let shard = (0..self.shards.len())
            .min_by_key(|&i| {
                (
                    self.registry.channels_on(i) + self.placing.get(i),
                    i != here,
                )
            })
            .unwrap_or(here);
        self.placing.hold(shard)
    }
}

/// How a connection came to the listener.
pub(crate) enum Arrival {
    /// From the device (or connector) itself, its slot taken at accept (None: over the caps
    /// with no room left). With `refuse_proxy_header`, one opening with a PROXY header is
    /// refused: its address is not a configured proxy's.
    Direct {
        slot: Option<limits::Slot>,
        refuse_proxy_header: bool,
    },
    /// From a configured load balancer: its PROXY header names the device, whose slot of
    /// these limits it then takes.
    Proxied(Arc<limits::Limits>),
}

pub(crate) async fn connection(
    tls: Arc<rustls::ServerConfig>,
    mut tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    arrival: Arrival,
) {
    let (peer, slot, refuse_proxy_header) = match arrival {
        Arrival::Direct {
            slot,
            refuse_proxy_header,
        } => (peer, slot, refuse_proxy_header),
        Arrival::Proxied(limits) => {
            let Some(proxies) = &shared.proxies else {
                return;
            };
            let Some(device) = proxies.read(&mut tcp, peer, &shared.log).await else {
                return;
            };
            (device, limits.admit(device, &shared.log), false)
        }
    };
    // Over the caps with no room left: closed now, refusal logged by `admit`. (Kept as the
    // Option it came as: a binding of its own would be one more copy in this future.)
    let Some(over) = slot.as_ref().map(limits::Slot::over) else {
        return;
    };
    let now = tokio::time::Instant::now();
    let deadline = now + shared.handshake;
    // The ClientHello is read and judged in a block of its own: a local moved away still keeps
    // its room in an async fn's future until its scope ends, and the handshake's state would
    // ride along, dead, for as long as the connection is served.
    let (start, placed) = {
        // Let in over a cap only to show a connector's ClientHello, which comes at once.
        let hello_deadline = match over {
            Some(_) => deadline.min(now + limits::ROOM_HELLO_TIME),
            None => deadline,
        };
        if refuse_proxy_header && sent_proxy_header(&tcp, hello_deadline).await {
            if let Some(proxies) = &shared.proxies {
                proxies.refused_unlisted(peer, &shared.log);
            }
            return;
        }
        let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
        // Boxed, as the handshake and a channel's accept below: a future has room for the
        // largest of its states for as long as it lives, and these passing ones were larger
        // than serving a device, so every device connection carried their room (1.6 KiB in a
        // debug build) after they were done with.
        let start = match Box::pin(tokio::time::timeout_at(hello_deadline, hello)).await {
            Ok(Ok(start)) => start,
            // Failed handshakes are the client's business (and very common on the internet).
            Ok(Err(_)) => return shared.metrics.handshake(false),
            Err(_) => {
                match (over, &slot) {
                    (Some(cap), Some(slot)) => slot.refused(cap, peer, &shared.log),
                    _ => {
                        let counts = &shared.limits.counts;
                        counts
                            .closed_handshake_timeout
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                return;
            }
        };
        let offers = offers_channel(&start.client_hello());
        if let (Some(cap), false, Some(slot)) = (over, offers, &slot) {
            // Over a cap and not a connector: a device refused, before any handshake.
            slot.refused(cap, peer, &shared.log);
            return;
        }
        let mut placed = None;
        if shared.shards.len() > 1 && offers {
            let place = shared.place_channel();
            if place.shard() != Shards::here() {
                // The channel moves before its handshake: its socket leaves this shard's event
                // loop for the other's, with the ClientHello already read.
                let StartHandshake { accepted, io, .. } = start;
                let target = place.shard();
                let Ok(io) = shared.shards.adopt(target, io) else {
                    return;
                };
                let moved_shared = shared.clone();
                shared.shards.spawn_on(target, async move {
                    let start = Box::new(StartHandshake::from_parts(accepted, io));
                    handshake_and_serve(
                        start,
                        tls,
                        deadline,
                        peer,
                        moved_shared,
                        Some(place),
                        slot,
                    )
                    .await;
                });
                return;
            }
            placed = Some(place);
        }
        (Box::new(start), placed)
    };
    handshake_and_serve(start, tls, deadline, peer, shared, placed, slot).await
}

/// Whether a direct connection opens with a PROXY header, as far as its first bytes within
/// `deadline` tell (none in time: no; the handshake's deadline then closes it).
async fn sent_proxy_header(tcp: &tokio::net::TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut first = [0u8; 12];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(n)) => crate::proxy_protocol::looks_like_header(&first[..n]),
        _ => false,
    }
}

/// The value, its box freed on return.
#[allow(clippy::boxed_local)] // taking the box is the point: it is freed here
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// Whether a ClientHello offers the channel protocol (a connector dialling in).
fn offers_channel(hello: &rustls::server::ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| p == tunnel::ALPN))
}

/// Finishes the TLS handshake and serves the connection: a channel or a device. The handshake
/// comes boxed and the stream is boxed once made: an async fn keeps room for its arguments,
/// and for a local moved away until its scope ends, and every idle device connection would
/// carry a dead copy of them beside the live one.
async fn handshake_and_serve(
    start: Box<StartHandshake<tokio::net::TcpStream>>,
    config: Arc<rustls::ServerConfig>,
    deadline: tokio::time::Instant,
    peer: SocketAddr,
    shared: Arc<Shared>,
    placed: Option<Held>,
    slot: Option<limits::Slot>,
) {
    // Taken out of its box by a call of its own, so that the box is freed now: moved out of
    // in place, the box's memory would stay allocated until this fn returns, that is for as
    // long as the device stays. The handshake's own state is boxed and freed with it.
    let tls = match Box::pin(tokio::time::timeout_at(
        deadline,
        unbox(start).into_stream(config),
    ))
    .await
    {
        Ok(Ok(tls)) => {
            shared.metrics.handshake(true);
            Box::new(tls)
        }
        Ok(Err(_)) => return shared.metrics.handshake(false),
        Err(_) => {
            shared
                .limits
                .counts
                .closed_handshake_timeout
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let is_channel = session.alpn_protocol() == Some(tunnel::ALPN);
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let now = OffsetDateTime::now_utc();
    if is_channel {
        let cert = match shared.connectors.load().judge(leaf.as_deref(), now) {
            Ok(cert) => cert,
            Err(why) => {
                shared
                    .log
                    .error(&format!("Refused a connector channel from {peer}: {why}"));
                return;
            }
        };
        let dialled = channels::Dialled {
            peer: cert.label(),
            peer_cert: leaf.unwrap_or_default(),
            addr: peer,
        };
        // Boxed: a device connection needs no room for a channel's accept.
        let accepted = Box::pin(channels::accept(
            tls,
            dialled,
            shared.registry.clone(),
            &shared.channel_settings,
            |hello| shared.connectors.load().admits(&cert, hello),
        ))
        .await;
        // Registered (or failed): the registry now counts it on its shard, and it holds no
        // device slot.
        drop(placed);
        drop(slot);
        match accepted {
            Ok(ch) => {
                let (opened, smaller_budget) =
                    channel_opened(&ch.hello, ch.id, peer, shared.max_request_header_bytes);
                shared.log.info(&opened);
                if let Some(warning) = smaller_budget {
                    shared.log.warn(&warning);
                }
                let ours = shared.timeout.as_secs();
                if let Some(theirs) = ch.hello.endpoint_timeout_secs.filter(|&t| t >= ours) {
                    shared.log.warn(&format!(
                        "Connector {} waits up to {theirs} s for its endpoints (endpoint_timeout_secs), and this gateway waits {ours} s for the connector (request_timeout_secs): a slow endpoint gets devices this gateway's 504 CMGService_Connectortimeout instead of the connector's 504 CMGConnector_Endpointtimeout, which names the endpoint; raise request_timeout_secs above {theirs} or lower the connector's endpoint_timeout_secs",
                        ch.hello.connector_id
                    ));
                }
            }
            Err(channels::AcceptError::Refused(why)) => shared
                .log
                .error(&format!("Refused a connector channel from {peer}: {why}")),
            Err(e) => shared
                .log
                .error(&format!("Channel from {peer} failed: {e}")),
        }
        return;
    }

    // Offered the channel protocol but chose a device one: nothing was placed.
    drop(placed);
    let judgement = shared.auth.load().judge(leaf.as_deref(), now);
    let state = DeviceState::new(judgement, leaf.as_deref(), peer, &shared);
    drop(leaf);
    let device = Arc::new(Device {
        addr: peer,
        state: std::sync::Mutex::new(Arc::new(state)),
        streams: std::sync::atomic::AtomicUsize::new(0),
        last_stream_end: std::sync::atomic::AtomicU64::new(0),
        in_flight: std::sync::atomic::AtomicUsize::new(0),
        write_stalled: std::sync::atomic::AtomicBool::new(false),
    });
    let watched = device.clone();
    let first_deadline = tokio::time::Instant::now() + shared.first_request;
    let drain_shared = shared.clone();
    let idle_device = device.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let device = device.clone();
        // Boxed: hyper keeps room for one request's future in every HTTP/1.1
        // connection for as long as it is open, so each idle keep-alive device paid for it.
        Box::pin(
            async move { Ok::<_, std::convert::Infallible>(handle(req, &shared, &device).await) },
        )
    });
    // hyper's connection state is made once the device has sent something: until then an
    // idle connection holds only its TLS stream. A stop meanwhile closes it at once.
    let mut tls = tls;
    let stop = drain_shared.stop.clone().notified_owned();
    if drain_shared
        .stopping
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return;
    }
    let sent = tokio::select! {
        first = tokio::time::timeout_at(first_deadline, tls.fill_buf()) => match first {
            Ok(first) => matches!(first, Ok(bytes) if !bytes.is_empty()),
            Err(_) => {
                drain_shared
                    .limits
                    .counts
                    .closed_first_request_timeout
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }
        },
        () = stop => false,
    };
    if !sent {
        return;
    }
    // The protocol is the one ALPN chose: HTTP/2 only as "h2" (RFC 9113 3.2: over TLS it is
    // never spoken without it), else HTTP/1.1. Not hyper-util's auto server, which reads the
    // first bytes itself to tell them apart and hands them on through a rewinding wrapper,
    // after which hyper doubled its read buffer to 16 KiB on every connection.
    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    // A device that takes nothing of what is written to it is cut (and logged below).
    let device_idle = drain_shared.device_idle;
    let tls = idle::StallGuard::new(tls, device_idle, watched.clone());
    if is_h2 {
        // Boxed: HTTP/2's state (hyper's h2 connection, the idle watch and its timer, the
        // streams' executor) is larger than HTTP/1.1's, and every HTTP/1.1 device's task
        // carried its room.
        let drain_shared = drain_shared.clone();
        Box::pin(async move {
            // Each stream is counted open until its answer's body is done with, so that the
            // connection is idle only with none open.
            let (epoch, counted_device) = (drain_shared.epoch, idle_device.clone());
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let open = OpenStream::new(&counted_device, epoch);
                let served = hyper::service::Service::call(&service, req);
                async move {
                    let response = served.await?;
                    Ok::<_, std::convert::Infallible>(
                        response.map(|body| Counted { body, _open: open }),
                    )
                }
            });
            // Twice the device's share of streams in flight: the streams over it are answered
            // 429 with a status text, rather than refused by HTTP/2 without one.
            let streams = u32::try_from(drain_shared.max_streams_per_device.saturating_mul(2))
                .unwrap_or(u32::MAX);
            // Each stream's task is watched for a device that stops taking that stream's answer.
            let executor = idle::DeviceStreams {
                limit: device_idle,
                log: drain_shared.log.clone(),
                peer,
            };
            // h2 answers a header block over the budget with 431 itself (one over four times it
            // closes that device's connection); one within it that the metadata pushes over is
            // refused by `route_request`, with the status text.
            let header_list =
                u32::try_from(drain_shared.max_request_header_bytes).unwrap_or(u32::MAX);
            let served = hyper::server::conn::http2::Builder::new(executor)
                .timer(hyper_util::rt::TokioTimer::new())
                // PINGs find a device gone without a word; hyper sends one only after a quiet
                // interval.
                .keep_alive_interval(drain_shared.http2_keepalive)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .max_header_list_size(header_list)
                .max_concurrent_streams(streams)
                .serve_connection(TokioIo::new(tls), service);
            let served = Idle {
                served,
                sleep: tokio::time::sleep_until(first_deadline),
                device: idle_device,
                shared: drain_shared.clone(),
                first_deadline,
                closing: false,
                drain: |served| served.graceful_shutdown(),
            };
            Drainable::new(served, drain_shared.clone(), |idle| idle.shut()).await;
        })
        .await;
    } else {
        let served = device_http1(drain_shared.max_request_header_bytes, drain_shared.idle)
            .serve_connection(TokioIo::new(tls), service);
        let counts = drain_shared.limits.clone();
        let served = Drainable::new(served, drain_shared.clone(), |served| {
            served.graceful_shutdown()
        })
        .await;
        if served.is_err_and(|e| e.is_timeout()) {
            counts
                .counts
                .closed_idle
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    if watched
        .write_stalled
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        let refusal = Refusal::new(Cause::DeviceStalled {
            what: "stopped reading the answer".into(),
            seconds: device_idle.as_secs(),
        });
        drain_shared.log.warn(&format!(
            "Cut the connection of device {peer}: {refusal}; its requests' channel streams are reset"
        ));
    }
}

/// What the log says of a channel opened with `hello`: the connector, where from and the
/// endpoints it serves; and a warning when it takes smaller request headers than the gateway's
/// `max_request_header_bytes`.
pub(crate) fn channel_opened(
    hello: &tunnel::Hello,
    id: u64,
    peer: SocketAddr,
    max_request_header_bytes: usize,
) -> (String, Option<String>) {
    let endpoints: Vec<String> = hello
        .endpoints
        .iter()
        .map(|e| format!("{} ({})", e.id, e.name))
        .collect();
    let opened = format!(
        "Connector {} opened channel {id} from {peer}, serving endpoints {}",
        hello.connector_id,
        endpoints.join(", ")
    );
    let smaller_budget = hello
        .max_request_header_bytes
        .filter(|&theirs| (theirs as usize) < max_request_header_bytes)
        .map(|theirs| format!(
            "Connector {} takes request headers up to {theirs} bytes, less than this gateway's max_request_header_bytes ({max_request_header_bytes}): devices get 431 over {theirs} on its channels; raise the connector's max_request_header_bytes to match",
            hello.connector_id
        ));
    (opened, smaller_budget)
}

/// hyper's HTTP/1.1 server as a device connection gets it.
pub(crate) fn device_http1(
    max_request_header_bytes: usize,
    idle: Duration,
) -> hyper::server::conn::http1::Builder {
    // With a timer, hyper drops an HTTP/1.1 client that takes over 30 s to send its request
    // headers (slow-loris). Its timer starts when the connection turns idle, so it also
    // closes a kept-alive connection with no request: idle_timeout_secs, when that is
    // shorter.
    // The read buffer holds a request's head whole: hyper's default (~400 KiB) took heads far
    // over what the channel carries. Room for the budget and a body's reads beyond it; a head
    // over that gets hyper's own 431, one under it `route_request`'s.
    let buffer = (max_request_header_bytes + H1_BODY_READ).max(8192);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(idle.min(HEADER_TIME))
        .max_buf_size(buffer);
    builder
}

#[cfg(test)]
mod tests {
    /// The size of what `f` returns, found from its type alone: an async fn's future is never
    /// made.
    fn returned_size<F, A, B, C, D, E, R>(_: &F) -> usize
    where
        F: Fn(A, B, C, D, E) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// A device connection's future is held for as long as the device stays; the task holding
    /// it is most of an idle connection's memory. Dead copies (an argument or a local moved
    /// away keeps its room until its scope ends) once made it twice as large, and the room of
    /// passing states (the ClientHello, the handshake, a channel's accept, HTTP/2) once made
    /// it 3,088 bytes where serving HTTP/1.1 needs 1,424 (debug build); this catches their
    /// return.
    #[test]
    fn a_device_connection_future_stays_small() {
        // Room above today's size (1,424 bytes) in a debug build, under any of those states
        // unboxed (ARCHITECTURE.md, gateway).
        const LIMIT: usize = 1600;
        let size = returned_size(&super::connection);
        assert!(size <= LIMIT, "{size} bytes");
    }
}

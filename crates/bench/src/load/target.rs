//! A device's side of the wire: the server it calls ([`Target`]), how one device connects
//! ([`Identity`]: its certificate and source address), its kept-alive connection ([`Sender`])
//! and one request on it ([`exchange`]), and a fleet connected before the clock starts.

use super::*;

/// A server devices call: where it is and how a device's TLS reaches it. The load generator
/// and the fault drill (`crate::faults`) connect through it.
pub struct Target {
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    host: String,
    port: u16,
    /// The server's IPv4 loopback address when its name resolves to one: connections from
    /// chosen source addresses go there.
    loopback: Option<SocketAddr>,
    /// The `Host` header: `host` or `host:port`.
    pub authority: String,
}

/// How one connection reaches the server: its device's TLS, and the source address it binds.
#[derive(Clone, Default)]
pub struct Identity {
    pub tls: Option<tokio_rustls::TlsConnector>,
    pub source: Option<Ipv4Addr>,
}

impl Target {
    /// The server of `url` (`https://host:port/...`), reached with `tls`.
    pub fn new(url: &str, tls: rustls::ClientConfig) -> Result<Target, LoadError> {
        let (name, host, port) = probe::server_name_of(url)?;
        let loopback = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .ok()
            .and_then(|mut all| all.find(|a| a.is_ipv4() && a.ip().is_loopback()));
        Ok(Target {
            loopback,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            name,
            authority: if port == 443 {
                host.clone()
            } else {
                format!("{host}:{port}")
            },
            host,
            port,
        })
    }

    /// A new kept-alive HTTP/1.1 connection: TCP, the device's TLS handshake, HTTP.
    pub async fn connect(&self) -> Result<Sender, String> {
        self.connect_as(&Identity::default()).await
    }

    /// [`Target::connect`] as a device of its own: its TLS, from its source address (when the
    /// server is on IPv4 loopback).
    pub async fn connect_as(&self, identity: &Identity) -> Result<Sender, String> {
        let tcp = match (identity.source, self.loopback) {
            (Some(source), Some(to)) => {
                let socket =
                    tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {}", e.kind()))?;
                socket
                    .bind(SocketAddr::from((source, 0)))
                    .map_err(|e| format!("bind {source}: {}", e.kind()))?;
                socket.connect(to).await
            }
            _ => TcpStream::connect((self.host.as_str(), self.port)).await,
        }
        .map_err(|e| format!("connect: {}", e.kind()))?;
        let _ = tcp.set_nodelay(true);
        let tls = identity
            .tls
            .as_ref()
            .unwrap_or(&self.tls)
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("http: {e}"))?;
        tokio::spawn(connection);
        Ok(sender)
    }
}

/// A device's kept-alive connection.
pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An answer as a device sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The status line's text (the reason phrase) when not 2xx: a Portcullis status text such
    /// as `CMGService_Noconnectorchannel`, or the standard reason.
    pub text: String,
    /// Bytes of body read (all of it).
    pub body_bytes: u64,
}

/// One request on `sender`, its answer's body read to the end.
pub async fn exchange(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
) -> Result<Answer, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection: {e}"))?;
    send(sender, request).await
}

/// `request` on a `sender` that is ready, its answer's body read to the end.
pub async fn send(sender: &mut Sender, request: Request<Full<Bytes>>) -> Result<Answer, String> {
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("connection: {e}"))?;
    let status = response.status().as_u16();
    let text = if (200..300).contains(&status) {
        String::new()
    } else {
        response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).to_string())
            .unwrap_or_else(|| {
                response
                    .status()
                    .canonical_reason()
                    .unwrap_or("")
                    .to_string()
            })
    };
    let mut body = response.into_body();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        if let Some(data) = frame.data_ref() {
            body_bytes += data.len() as u64;
        }
    }
    Ok(Answer {
        status,
        text,
        body_bytes,
    })
}

/// Devices per source address in a fleet: under the gateway's default per-address cap.
const FLEET_PER_SOURCE: usize = 500;

/// Fleet device `n`'s source address: 127.0.2.1 for the first 500, then 127.0.2.2, ...
pub(super) fn fleet_source(n: usize) -> Ipv4Addr {
    let k = (n / FLEET_PER_SOURCE) as u32 + 1;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 2, 0)) + k + k / 255)
}

/// Every connection opened, 256 handshakes at a time, each bounded; one that fails is
/// opened again at its first request (and its latency holds the handshake).
pub(super) async fn connect_all(
    target: &Arc<Target>,
    identities: &[Identity],
    progress: bool,
) -> Vec<Option<Sender>> {
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let done = Arc::new(AtomicUsize::new(0));
    let total = identities.len();
    let mut tasks = Vec::with_capacity(total);
    for identity in identities {
        let Ok(permit) = gate.clone().acquire_owned().await else {
            break;
        };
        let (target, identity, done) = (target.clone(), identity.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let sender =
                tokio::time::timeout(Duration::from_secs(30), target.connect_as(&identity))
                    .await
                    .ok()
                    .and_then(Result::ok);
            drop(permit);
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            if progress && total >= 1000 && n % 1000 == 0 {
                eprintln!(
                    "{:>6.1} s  {n} of {total} devices connected",
                    started.elapsed().as_secs_f64()
                );
            }
            sender
        }));
    }
    let mut senders = Vec::with_capacity(total);
    for task in tasks {
        senders.push(task.await.ok().flatten());
    }
    senders.resize_with(total, || None);
    senders
}

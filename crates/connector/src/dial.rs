//! The dialler: N channels to each gateway, each in a loop that dials, serves the channel until
//! it ends or is drained, and dials again with backoff and jitter; more channels when a
//! gateway's hello says it runs more worker threads. Each loop serves one gateway instance
//! (`crate::instances`) and ends when the connector stops or the instance is let go.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channel::tunnel;
use ring::rand::SecureRandom;
use runtime::shards::Shards;
use rustls_pki_types::ServerName;
use tokio::sync::watch;

use crate::channel_server::{self, Served};
use crate::instances::Instance;
use crate::lock;
use crate::run::Log;
use crate::service::{PerChannel, Service};

/// The most channels a connector holds to one gateway, however many threads it announces.
const MAX_CHANNELS_PER_GATEWAY: usize = 64;

/// Starts dial loops round the shards and keeps their tasks, for `stop`.
#[derive(Clone)]
pub(crate) struct Dialer {
    pub(crate) shards: Shards,
    pub(crate) tasks: Arc<Mutex<Tasks>>,
    pub(crate) stopped: watch::Receiver<bool>,
}

#[derive(Default)]
pub(crate) struct Tasks {
    /// Dial loops started so far: the next goes to the shard after the last one's.
    pub(crate) dials: usize,
    /// Dial loops running now (each holds or dials one channel).
    pub(crate) live: Arc<AtomicUsize>,
    pub(crate) handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Tasks {
    /// Keeps the handles of the tasks still running (a let-go instance's end), so that the
    /// list stays as long as what runs.
    fn prune(&mut self) {
        self.handles.retain(|h| !h.is_finished());
    }
}

/// A running dial loop, counted in [`Tasks::live`] until dropped (also when aborted).
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Dialer {
    pub(crate) fn start(&self, dial: Dial) {
        let mut tasks = lock(&self.tasks);
        tasks.prune();
        let shard = tasks.dials;
        tasks.dials += 1;
        tasks.live.fetch_add(1, Ordering::Relaxed);
        let live = Live(tasks.live.clone());
        let stopped = self.stopped.clone();
        let handle = self.shards.spawn_on(shard, async move {
            let _live = live;
            dial.run(stopped).await;
        });
        tasks.handles.push(handle);
    }

    /// Runs `task` on the current runtime until the connector stops (it must end then).
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.tasks);
        tasks.prune();
        tasks.handles.push(tokio::spawn(task));
    }
}

/// Opens more channels to a gateway when its hello says it runs more worker threads than
/// there are channels to it, so that every gateway thread drives a channel of its own (a device
/// on a thread without one is served through another thread's, at the cost of a cross-thread
/// wake per message). Channels are never closed for a gateway announcing fewer.
pub(crate) async fn widen(
    dialer: Dialer,
    first: Dial,
    mut open: usize,
    mut announced: watch::Receiver<usize>,
) {
    let mut ending = Ending {
        stopped: dialer.stopped.clone(),
        released: first.released.clone(),
    };
    loop {
        tokio::select! {
            changed = announced.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = ending.requested() => return,
        }
        let threads = *announced.borrow_and_update();
        let wanted = threads.min(MAX_CHANNELS_PER_GATEWAY);
        if wanted <= open {
            continue;
        }
        first.log.info(&format!(
            "Gateway {} runs {threads} worker threads: opening {} more channel(s) to it, {wanted} in all",
            first.instance.label(),
            wanted - open
        ));
        while open < wanted {
            open += 1;
            dialer.start(first.numbered(open));
        }
    }
}

#[derive(Clone)]
pub(crate) struct Dial {
    /// The gateway instance dialled, and its channels' count.
    pub(crate) instance: Arc<Instance>,
    /// Becomes true when the instance is let go (gone from its name's answer): the channel
    /// drains as at a stop and the loop ends.
    pub(crate) released: watch::Receiver<bool>,
    /// The name the gateway's certificate must carry.
    pub(crate) server_name: String,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) service: Arc<Service>,
    /// The most worker threads this gateway has said it runs (at first the configured channel
    /// count): the hello sets it, [`widen`] reads it.
    pub(crate) announced: Arc<watch::Sender<usize>>,
    pub(crate) log: Log,
    pub(crate) number: usize,
    pub(crate) max_request_header_bytes: u32,
}

/// How far apart a connector's channels to one gateway are drained and dialled again after its
/// hello changed, so that the gateway always holds the others meanwhile.
pub(crate) const REOPEN_STAGGER: Duration = Duration::from_secs(1);

/// When a dial loop ends: the connector stops, or its instance is let go.
#[derive(Clone)]
pub(crate) struct Ending {
    stopped: watch::Receiver<bool>,
    released: watch::Receiver<bool>,
}

impl Ending {
    /// Resolves once the connector is stopping (or gone) or the instance is let go.
    async fn requested(&mut self) {
        let Ending { stopped, released } = self;
        let let_go = async {
            // The instance's keeper gone without letting it go: the stop ends the loop.
            if released.wait_for(|gone| *gone).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => {}
            () = let_go => {}
        }
    }

    fn now(&self) -> bool {
        *self.stopped.borrow() || *self.released.borrow()
    }

    fn let_go(&self) -> bool {
        *self.released.borrow() && !*self.stopped.borrow()
    }
}

/// The longest a let-go instance's channel answers the requests under way after its drain
/// notice before it is closed (as at a stop, `portcullis connector`'s 10 s).
pub(crate) const LET_GO_LIMIT: Duration = Duration::from_secs(10);

/// How long a channel's answers say it is draining before its GOAWAY.
pub(crate) const DRAIN_NOTICE: Duration = Duration::from_millis(300);

/// Backoff bounds for redialling a gateway.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A channel that lived this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// A channel counts as back once it has lasted this long after the gateway asked for its hello
/// (a gateway that refuses the hello's endpoints closes the channel at once).
const BACK_AFTER: Duration = Duration::from_secs(1);

/// A channel to a gateway down: since when, and how many dials have failed since.
struct Outage {
    since: Instant,
    failed: u32,
}

/// How one dial went.
struct Outcome {
    ended: Result<Served, ChannelError>,
    /// The gateway's id for the channel, once it asked for the hello (0: it did not say).
    greeted: Option<u64>,
    /// Whether the channel lasted [`BACK_AFTER`] past its hello.
    settled: bool,
}

/// The longest a dial loop can wait before it dials a gateway again, once that gateway is back
/// after refusing connections for `outage`: the backoff it can have reached by then (each
/// failed dial waits at least half its backoff), doubled once more for a loop whose last
/// channel had not lived [`HEALTHY_AFTER`] (its backoff was not reset), at most
/// [`BACKOFF_MAX`]. The fault drill (`portcullis bench faults`) holds the connector to it.
pub fn redial_bound(outage: Duration) -> Duration {
    // The wait under way when the gateway comes back is the last one that started before:
    // wait i starts at the earliest after the half-backoffs of the waits before it.
    let mut backoff = BACKOFF_FIRST;
    let mut started = Duration::ZERO;
    // Bounded: the backoff stops doubling at BACKOFF_MAX within 8 steps.
    for _ in 0..1_000 {
        let next = started + backoff / 2;
        if next >= outage {
            break;
        }
        started = next;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    (backoff * 2).min(BACKOFF_MAX)
}

impl Dial {
    pub(crate) fn numbered(&self, number: usize) -> Dial {
        Dial {
            number,
            ..self.clone()
        }
    }

    async fn run(self, stopped: watch::Receiver<bool>) {
        let mut ending = Ending {
            stopped,
            released: self.released.clone(),
        };
        let random = ring::rand::SystemRandom::new();
        let mut backoff = BACKOFF_FIRST;
        let mut outage: Option<Outage> = None;
        let gateway = self.instance.label();
        loop {
            let started = Instant::now();
            // A stop or a let-go drains the channel (see `once`), and the loop ends.
            let outcome = self.once(ending.clone(), &mut outage).await;
            if ending.let_go() {
                let how = match &outcome.ended {
                    Ok(Served::Drained) => "drained".to_string(),
                    Ok(Served::Closed) => "closed by the gateway".to_string(),
                    Err(why) => why.to_string(),
                };
                self.log.info(&format!(
                    "Channel {} to gateway {gateway} let go: {how}",
                    self.number
                ));
                return;
            }
            if ending.now() {
                return;
            }
            // The gateway's id for the channel, so that the two logs can be read together.
            let named = match outcome.greeted {
                Some(id) if id > 0 => format!(" (its channel {id})"),
                _ => String::new(),
            };
            // Asked for no hello: the gateway closed the channel once it saw who dialled.
            let unheard = match outcome.greeted {
                None => ", as a gateway does at once to a connector it does not trust or allow (its log says why: \"Refused a connector channel from ...\")",
                Some(_) => "",
            };
            match outcome.ended {
                Ok(Served::Drained) => {
                    // Drained to say a new hello: dialled again at once.
                    self.log.info(&format!(
                        "Channel {} to gateway {gateway}{named} drained to give it the new hello; dialling again",
                        self.number
                    ));
                    backoff = BACKOFF_FIRST;
                    continue;
                }
                Ok(Served::Closed) if outcome.greeted.is_none() => self.log.error(&format!(
                    "Channel {} to gateway {gateway}: channel lost before the gateway asked for the hello: the gateway closed it{unheard}; retrying",
                    self.number
                )),
                Ok(Served::Closed) => self.log.warn(&format!(
                    "Channel {} to gateway {gateway}{named} closed by the gateway; reconnecting",
                    self.number
                )),
                Err(ChannelError::Ended(e)) if outcome.greeted.is_none() => {
                    self.log.error(&format!(
                        "Channel {} to gateway {gateway}: channel lost before the gateway asked for the hello: {}{unheard}; retrying",
                        self.number,
                        ChannelError::text(&e)
                    ))
                }
                Err(why) => self.log.error(&format!(
                    "Channel {} to gateway {gateway}{named}: {why}; retrying",
                    self.number
                )),
            }
            if outcome.settled {
                // It was up: the outage starts now.
                outage = Some(Outage {
                    since: Instant::now(),
                    failed: 0,
                });
            } else {
                outage
                    .get_or_insert(Outage {
                        since: started,
                        failed: 0,
                    })
                    .failed += 1;
            }
            if started.elapsed() >= HEALTHY_AFTER {
                backoff = BACKOFF_FIRST;
            }
            // Full jitter in [backoff/2, backoff], so many connectors do not redial in step.
            let mut byte = [0u8; 1];
            let _ = random.fill(&mut byte);
            let wait = backoff / 2 + backoff.mul_f64(f64::from(byte[0]) / 510.0);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                () = ending.requested() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Dials the gateway and serves the channel until it ends, or until it has been drained:
    /// when the hello changed (its turn come) or when the connector stops. A channel back
    /// after an `outage` says so in the log once it has lasted [`BACK_AFTER`] past its hello.
    async fn once(&self, ending: Ending, outage: &mut Option<Outage>) -> Outcome {
        let (greeted, mut greeting) = watch::channel(None);
        let serving = self.dial_and_serve(ending, greeted);
        tokio::pin!(serving);
        let settled = async {
            if greeting.wait_for(Option::is_some).await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(BACK_AFTER).await;
        };
        let (ended, settled) = tokio::select! {
            ended = &mut serving => (ended, false),
            () = settled => {
                if let Some(outage) = outage.take() {
                    let id = greeting.borrow().unwrap_or(0);
                    self.log.info(&format!(
                        "Channel {} to gateway {}{} back after {} attempt(s) (down for {:.1} s)",
                        self.number,
                        self.instance.label(),
                        if id > 0 { format!(" (its channel {id})") } else { String::new() },
                        outage.failed + 1,
                        outage.since.elapsed().as_secs_f64()
                    ));
                }
                (serving.await, true)
            }
        };
        let greeted = *greeting.borrow();
        Outcome {
            ended,
            greeted,
            settled,
        }
    }

    /// Dials the gateway and serves the channel: see [`Dial::once`].
    async fn dial_and_serve(
        &self,
        mut ending: Ending,
        greeted: watch::Sender<Option<u64>>,
    ) -> Result<Served, ChannelError> {
        // Changes of the hello from now on: made before dialling, so none is missed.
        let mut hello_changes = self.service.hello_changes.subscribe();
        let tls = tokio::select! {
            tls = self.connect() => tls?,
            () = ending.requested() => return Ok(Served::Drained),
        };
        let _held = self.instance.held();
        let mut let_go = ending.clone();
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let frames = Arc::new(tunnel::SmallFrames::default());
        let channel = Arc::new(PerChannel {
            service: self.service.clone(),
            announced: self.announced.clone(),
            draining: draining.clone(),
            frames,
            greeted,
        });
        let hyper_service = hyper::service::service_fn(move |req| {
            let channel = channel.clone();
            let fut = async move { Ok::<_, std::convert::Infallible>(channel.answer(req).await) };
            // Boxed: hyper spawns each request's future as a task and it is moved whole
            // several times on the way; boxed, only a pointer moves.
            Box::pin(fut)
        });
        let turn = REOPEN_STAGGER * u32::try_from(self.number.saturating_sub(1)).unwrap_or(0);
        let drain = async move {
            let hello_changed = async {
                if hello_changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(turn).await;
            };
            tokio::select! {
                () = hello_changed => {}
                () = ending.requested() => {}
            }
            draining.store(true, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(DRAIN_NOTICE).await;
        };
        let serving =
            channel_server::serve(tls, hyper_service, drain, self.max_request_header_bytes);
        // A let-go instance's channel answers what it took for at most LET_GO_LIMIT (a stop
        // has its own limit, in `RunningConnector::stop_gracefully`).
        let cut = async {
            let_go.requested().await;
            if !let_go.let_go() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(DRAIN_NOTICE + LET_GO_LIMIT).await;
        };
        tokio::select! {
            served = serving => served.map_err(ChannelError::Ended),
            () = cut => Err(ChannelError::Cut),
        }
    }

    async fn connect(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, DialError> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(self.instance.address),
        )
        .await
        .map_err(|_| DialError::TcpTimeout)?
        .map_err(DialError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.server_name.clone()).map_err(DialError::ServerName)?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(DialError::Tls)?;
        if tls.get_ref().1.alpn_protocol() != Some(tunnel::ALPN) {
            return Err(DialError::NotChannelProtocol);
        }
        Ok(tls)
    }
}

/// Why a channel to a gateway could not be opened: the text after "Channel {n} to gateway
/// {instance}: " in the log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("TCP connect timed out")]
    TcpTimeout,
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("bad server name: {0}")]
    ServerName(rustls_pki_types::InvalidDnsNameError),
    #[error("TLS failed: {0}")]
    Tls(std::io::Error),
    /// The gateway chose no ALPN, or another one than [`tunnel::ALPN`].
    #[error("the gateway does not speak the channel protocol (ALPN)")]
    NotChannelProtocol,
}

/// Why a channel to a gateway ended other than by a close or a drain.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChannelError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("channel lost: {}", ChannelError::text(.0))]
    Ended(hyper::Error),
    /// A let-go instance's channel still had requests under way after [`LET_GO_LIMIT`].
    #[error("requests still under way after {} s were cut", LET_GO_LIMIT.as_secs())]
    Cut,
}

impl ChannelError {
    /// Why a channel ended, named (hyper alone says "http2 error").
    fn text(e: &hyper::Error) -> String {
        channel::ended::error_text(e, "the gateway", "this connector")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redial_bound_follows_the_backoff_and_stops_at_its_cap() {
        // No outage: the first step, doubled for a loop not yet healthy.
        assert_eq!(redial_bound(Duration::ZERO), BACKOFF_FIRST * 2);
        // 1 s down: dials after at least 0.1, 0.2, 0.4 s (0.7 s), then a wait of up to 1.6 s.
        assert_eq!(
            redial_bound(Duration::from_secs(1)),
            Duration::from_millis(3_200)
        );
        assert_eq!(redial_bound(Duration::from_secs(3_600)), BACKOFF_MAX);
    }
}

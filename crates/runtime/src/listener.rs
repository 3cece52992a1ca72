//! The accept loop every Portcullis server runs: bind, accept until told to stop, hand each
//! connection to its own task.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::shards::{Held, ShardCounts, Shards};

/// A server accepting in the background. Dropping it does not stop it; call [`Listening::stop`].
pub struct Listening {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    open: ShardCounts,
}

impl Listening {
    /// Stops accepting. Connections already open finish on their own.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Connections open now on each shard.
    pub fn open_per_shard(&self) -> Vec<usize> {
        self.open.all()
    }

    /// The live count of open connections per shard, to read after [`Listening::stop`].
    pub fn open_counts(&self) -> ShardCounts {
        self.open.clone()
    }
}

/// Binds `addr` and calls `handle` in a new task for every accepted connection.
pub async fn listen<F, Fut>(addr: SocketAddr, handle: F) -> std::io::Result<Listening>
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    listen_on(addr, &Shards::current(), handle).await
}

/// Binds `addr` once and accepts on every shard: each shard watches the same listening socket
/// (a duplicate of its descriptor in its own event loop). A connection is served in a new task
/// on the shard that accepted it, unless that shard holds two connections more than another:
/// then it moves there before its first byte is read. (Left to whichever shard accepts first,
/// a burst of connections piled onto one shard: the other was asleep.)
pub async fn listen_on<F, Fut>(
    addr: SocketAddr,
    shards: &Shards,
    handle: F,
) -> std::io::Result<Listening>
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    // Bound here (tokio's defaults: address reuse, a backlog of 1024), watched by the shards.
    let shared = listener.into_std()?;
    let mut listeners = Vec::with_capacity(shards.len());
    for index in 0..shards.len() {
        let copy = shared.try_clone()?;
        listeners.push(shards.enter(index, || TcpListener::from_std(copy))?);
    }
    let open = ShardCounts::new(shards.len());
    let spread = Arc::new(Spread {
        shards: shards.clone(),
        open: open.clone(),
        handle,
    });
    let tasks = listeners
        .into_iter()
        .enumerate()
        .map(|(index, listener)| {
            shards.spawn_on(
                index,
                accept_loop(index, listener, stopped.clone(), spread.clone()),
            )
        })
        .collect();
    Ok(Listening {
        addr: bound,
        stop,
        tasks,
        open,
    })
}

/// What every shard's accept loop shares: where connections are open, and what serves one.
struct Spread<F> {
    shards: Shards,
    open: ShardCounts,
    handle: F,
}

pin_project_lite::pin_project! {
    /// A connection's future with its count. Not `async move { served.await; drop(open) }`:
    /// such a block keeps room for the future it captured beside the one it awaits, and a
    /// connection's future is large, and every idle connection would pay for it twice.
    struct Counted<F> {
        #[pin]
        served: F,
        open: Held,
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.project().served.poll(cx)
    }
}

impl<F, Fut> Spread<F>
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    /// Serves `tcp` here, or on the shard with the fewest open connections when this one has
    /// two more than it: moving costs two system calls and a wake-up on the other thread,
    /// worth it for a connection that stays, not for a spread off by one.
    fn serve(&self, here: usize, tcp: TcpStream, peer: SocketAddr) {
        let open = |i: usize| self.open.get(i);
        let fewest = (0..self.shards.len())
            .min_by_key(|&i| open(i))
            .unwrap_or(here);
        let target = if open(here) > open(fewest) + 1 {
            fewest
        } else {
            here
        };
        let tcp = if target == here {
            tcp
        } else {
            match self.shards.adopt(target, tcp) {
                Ok(tcp) => tcp,
                Err(_) => return,
            }
        };
        let open = self.open.hold(target);
        let served = (self.handle)(tcp, peer);
        self.shards.spawn_on(target, Counted { served, open });
    }
}

async fn accept_loop<F, Fut>(
    index: usize,
    listener: TcpListener,
    mut stopped: watch::Receiver<bool>,
    spread: Arc<Spread<F>>,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                spread.serve(index, tcp, peer);
            }
            // Out of file descriptors and the like: pause, keep serving the others.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Raises this process's limit on open files to its hard limit (every connection is one) and
/// returns the limit now in force. Servers call it at start, as nginx's
/// `worker_rlimit_nofile` does.
pub fn raise_fd_limit() -> u64 {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return 0;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        // rlim_t is u64 on Linux but not on every platform.
        #[allow(clippy::unnecessary_cast)]
        let current = limit.rlim_cur as u64;
        current
    }
    #[cfg(not(unix))]
    {
        0
    }
}

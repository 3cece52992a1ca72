//! The accept loop every Portcullis server runs: bind, accept until told to stop, hand each
//! connection to its own task.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A server accepting in the background. Dropping it does not stop it; call [`Listening::stop`].
pub struct Listening {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Listening {
    /// Stops accepting. Connections already open finish on their own.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Binds `addr` and calls `handle` in a new task for every accepted connection.
pub async fn listen<F, Fut>(addr: SocketAddr, handle: F) -> std::io::Result<Listening>
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stopped.changed() => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(handle(tcp, peer));
                }
                // Out of file descriptors and the like: pause, keep serving the others.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    Ok(Listening {
        addr: bound,
        stop,
        task,
    })
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

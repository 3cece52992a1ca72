//! Thread per core: a service's work split over shards, each a single-threaded runtime on its
//! own thread. A device connection, the channel its requests ride and the connector's call to
//! the endpoint each stay on one thread, so a request wakes no other thread and its memory
//! stays in one core's cache. (A work-stealing runtime spent a fifth more CPU per request
//! here: idle workers are woken to steal, and a request's wake-ups crossed threads.)
//!
//! Placement is the caller's: the gateway accepts on every shard and moves each new channel
//! to the shard holding fewest; the connector dials its channels round the shards. Work for
//! another shard goes there with [`Shards::spawn_on`]; anything may still be used from any
//! shard (it is all `Send`), only with cross-thread wake-ups.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::watch;

thread_local! {
    static HERE: Cell<usize> = const { Cell::new(0) };
}

/// The shards of this process, or one shard: the runtime a library caller runs on.
#[derive(Clone)]
pub struct Shards {
    handles: Arc<Vec<Handle>>,
}

/// The shards' threads: dropping this stops them and waits for them.
pub struct ShardThreads {
    stop: Option<watch::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for ShardThreads {
    fn drop(&mut self) {
        self.stop.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Shards {
    /// One shard: the runtime this is called on, whatever its kind.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn current() -> Shards {
        Shards {
            handles: Arc::new(vec![Handle::current()]),
        }
    }

    /// `count` single-threaded runtimes, each on its own thread `portcullis-shard-N`, until
    /// the returned [`ShardThreads`] is dropped. The calling thread is none of them: it keeps
    /// what it was doing (a service's main thread: signals, the admin surface).
    pub fn spawn(count: usize) -> std::io::Result<(Shards, ShardThreads)> {
        let (stop, stopped) = watch::channel(());
        let mut threads = ShardThreads {
            stop: Some(stop),
            threads: Vec::new(),
        };
        let mut handles = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            let thread = std::thread::Builder::new()
                .name(format!("portcullis-shard-{index}"))
                .spawn(move || {
                    HERE.with(|here| here.set(index));
                    // Runs the shard's tasks until told to stop (the sender dropped).
                    runtime.block_on(async move { while stopped.changed().await.is_ok() {} });
                })?;
            threads.threads.push(thread);
        }
        Ok((
            Shards {
                handles: Arc::new(handles),
            },
            threads,
        ))
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The shard whose thread this is (0 on any thread that is not a shard's).
    pub fn here() -> usize {
        HERE.with(Cell::get)
    }

    /// Runs `future` on shard `index` (modulo the count).
    pub fn spawn_on<F>(&self, index: usize, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[index % self.handles.len()].spawn(future)
    }

    /// Runs `make` inside shard `index`'s runtime, so that what it creates (sockets, timers)
    /// is driven by that shard.
    pub fn enter<T>(&self, index: usize, make: impl FnOnce() -> T) -> T {
        let _inside = self.handles[index % self.handles.len()].enter();
        make()
    }

    /// Moves a socket out of the event loop that drives it into shard `index`'s; what it had
    /// not read yet stays in the kernel and is read there.
    pub fn adopt(
        &self,
        index: usize,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let std = tcp.into_std()?;
        self.enter(index, || tokio::net::TcpStream::from_std(std))
    }
}

/// A count per shard of what it holds (connections, channels on their way), each unit held
/// by a [`Held`] that gives it back when dropped, whatever ends its holder.
#[derive(Clone)]
pub struct ShardCounts(Arc<[AtomicUsize]>);

impl ShardCounts {
    pub fn new(shards: usize) -> ShardCounts {
        ShardCounts((0..shards).map(|_| AtomicUsize::new(0)).collect())
    }

    pub fn get(&self, shard: usize) -> usize {
        self.0[shard].load(Ordering::Relaxed)
    }

    pub fn all(&self) -> Vec<usize> {
        (0..self.0.len()).map(|shard| self.get(shard)).collect()
    }

    /// Counts one more on `shard` until the returned guard is dropped.
    pub fn hold(&self, shard: usize) -> Held {
        self.0[shard].fetch_add(1, Ordering::Relaxed);
        Held {
            counts: self.clone(),
            shard,
        }
    }
}

/// One unit of a [`ShardCounts`], given back on drop.
pub struct Held {
    counts: ShardCounts,
    shard: usize,
}

impl Held {
    pub fn shard(&self) -> usize {
        self.shard
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.counts.0[self.shard].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::Shards;

    #[test]
    fn each_shard_runs_its_tasks_on_its_own_thread() {
        let (shards, threads) = Shards::spawn(3).expect("shards");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let seen = runtime.block_on(async {
            let mut seen = Vec::new();
            for index in 0..4 {
                let ran = shards
                    .spawn_on(index, async {
                        (Shards::here(), std::thread::current().id())
                    })
                    .await
                    .expect("task");
                seen.push(ran);
            }
            seen
        });
        let here: Vec<usize> = seen.iter().map(|(here, _)| *here).collect();
        assert_eq!(here, [0, 1, 2, 0], "placed modulo the count");
        let main = std::thread::current().id();
        assert!(seen.iter().all(|(_, thread)| *thread != main));
        assert!(seen[0].1 != seen[1].1 && seen[1].1 != seen[2].1 && seen[0].1 == seen[3].1);
        drop(threads);
    }
}

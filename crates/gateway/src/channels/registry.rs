//! The channels that end at this gateway, by endpoint, and the queue of requests waiting for
//! a stream slot on one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use channel::refusal::{Cause, Refusal};
use channel::tunnel::Body;
use hyper::{Request, Response};
use runtime::shards::Shards;

use super::send::SendError;
use super::{Channel, ChannelBody};

/// Requests waiting for a stream slot, across every channel of the gateway, and how many may.
pub struct Queue {
    waiting: AtomicUsize,
    limit: AtomicUsize,
}

/// `max_queued_requests` unless the gateway sets another.
pub const DEFAULT_MAX_QUEUED_REQUESTS: usize = 4096;

impl Default for Queue {
    fn default() -> Queue {
        Queue {
            waiting: AtomicUsize::new(0),
            limit: AtomicUsize::new(DEFAULT_MAX_QUEUED_REQUESTS),
        }
    }
}

impl Queue {
    /// A place in the queue, held until dropped; none when it is full.
    pub(super) fn enter(&self) -> Option<Queued<'_>> {
        let limit = self.limit.load(Ordering::Relaxed);
        let before = self.waiting.fetch_add(1, Ordering::Relaxed);
        let place = Queued(&self.waiting);
        (before < limit).then_some(place)
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// One request counted in [`Queue::waiting`] until dropped.
pub(super) struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The channels that end at this gateway instance, by endpoint id.
#[derive(Default)]
pub struct Registry {
    channels: RwLock<Vec<Arc<Channel>>>,
    /// Endpoints some connector has announced since start, with their names.
    known: RwLock<HashMap<u64, String>>,
    pub(super) next_id: AtomicU64,
    /// Requests waiting for a stream slot on some channel.
    pub queue: Queue,
}

impl Registry {
    /// How many requests may wait for a stream slot at once (`max_queued_requests`).
    pub fn set_max_queued(&self, limit: usize) {
        self.queue.limit.store(limit, Ordering::Relaxed);
    }

    pub(super) fn add(&self, channel: Arc<Channel>) {
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        for e in &channel.hello.endpoints {
            known.insert(e.id, e.name.clone());
        }
        drop(known);
        self.channels
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(channel);
    }

    /// Takes the channel out, if it was in.
    pub(super) fn remove(&self, id: u64) -> Option<Arc<Channel>> {
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        let at = channels.iter().position(|c| c.id == id)?;
        Some(channels.remove(at))
    }

    /// The channel for `endpoint` with the fewest requests in flight, among those driven by
    /// the calling shard if it has any (a request then wakes no other thread). A channel whose
    /// connector has left a keep-alive PING unanswered too long is passed by: when every
    /// channel for the endpoint is so, the refusal says that the connector is unresponsive.
    pub fn pick(&self, endpoint: u64) -> Result<Arc<Channel>, Refusal> {
        let here = Shards::here();
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        let mut silent_ms = None;
        let best = channels
            .iter()
            .filter(|c| !c.is_closing() && c.hello.endpoints.iter().any(|e| e.id == endpoint))
            .filter(|c| match c.silent_ms() {
                Some(ms) => {
                    silent_ms = silent_ms.max(Some(ms));
                    false
                }
                None => true,
            })
            .min_by_key(|c| (c.shard != here, c.outstanding()))
            .cloned();
        match (best, silent_ms) {
            (Some(channel), _) => Ok(channel),
            (None, Some(silent_ms)) => Err(Refusal::new(Cause::ConnectorUnresponsive {
                endpoint,
                silent_ms,
            })),
            (None, None)
                if self
                    .known
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&endpoint) =>
            {
                Err(Refusal::new(Cause::NoChannel { endpoint }))
            }
            (None, None) => Err(Refusal::new(Cause::UnknownEndpoint { endpoint })),
        }
    }

    /// Sends `request` on `channel` (picked for `endpoint`). Should the channel take no new
    /// requests before it took this one (drained by its connector, or broken), the request,
    /// not sent, goes once more on the channel `pick` chooses now (which passes that one by).
    pub async fn send(
        &self,
        channel: &Channel,
        endpoint: u64,
        request: Request<Body>,
    ) -> Result<Response<ChannelBody>, Refusal> {
        match channel.send(request, endpoint, &self.queue).await {
            Err(SendError::Closing(request)) => self
                .pick(endpoint)?
                .send(*request, endpoint, &self.queue)
                .await
                .map_err(SendError::into_refusal),
            sent => sent.map_err(SendError::into_refusal),
        }
    }

    /// Every endpoint announced since start, whether a channel serves it now, and how many.
    pub fn endpoints(&self) -> Vec<(u64, String, usize)> {
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<(u64, String, usize)> = known
            .iter()
            .map(|(id, name)| {
                let live = channels
                    .iter()
                    .filter(|c| c.hello.endpoints.iter().any(|e| e.id == *id))
                    .count();
                (*id, name.clone(), live)
            })
            .collect();
        list.sort();
        list
    }

    /// Every connector holding a channel now: its id, its channels, and whether it has a
    /// client authentication certificate for its endpoints, from the hello of its newest
    /// channel (a connector that re-selected its certificate reopens its channels one by
    /// one, and the newest says what it has now).
    pub fn connectors(&self) -> Vec<(String, usize, bool)> {
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        // Id, channels, has a certificate, and the id of the channel that said so.
        let mut list: Vec<(String, usize, bool, u64)> = Vec::new();
        for c in channels.iter() {
            match list.iter_mut().find(|(id, ..)| *id == c.hello.connector_id) {
                Some(entry) => {
                    entry.1 += 1;
                    if c.id > entry.3 {
                        entry.2 = c.hello.has_client_certificate;
                        entry.3 = c.id;
                    }
                }
                None => list.push((
                    c.hello.connector_id.clone(),
                    1,
                    c.hello.has_client_certificate,
                    c.id,
                )),
            }
        }
        let mut list: Vec<(String, usize, bool)> = list
            .into_iter()
            .map(|(id, channels, has_certificate, _)| (id, channels, has_certificate))
            .collect();
        list.sort();
        list
    }

    /// Every channel now.
    pub fn all(&self) -> Vec<Arc<Channel>> {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Channels driven by `shard` now.
    pub fn channels_on(&self, shard: usize) -> usize {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|c| c.shard == shard)
            .count()
    }

    pub fn channel_count(&self) -> usize {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

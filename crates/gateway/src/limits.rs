//! Caps on device connections, in total and per source address, with room kept for connector
//! channels; refusals counted and logged at a bounded rate; closes counted.
//!
//! Every connection the listener accepts takes a device slot at once, before any TLS: whoever
//! has not shown a ClientHello yet may be a device. Over a cap it is let in only to the room
//! kept for channels (`reserved_for_channels`), where its ClientHello must offer the channel
//! ALPN; else, or when that room is full too, it is closed (no handshake is spent on it). A
//! channel gives its slot back once registered, so channels never use up device slots, and a
//! flood of device connections can fill the device slots but not the room.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use channel::refusal::{Cause, Refusal};
use logs::Log;

/// At most one log line per this long for each kind of refusal.
const LOG_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Limits {
    /// `channel_listen`'s: no device is served there, every connection is in the room.
    channels_only: bool,
    max_total: usize,
    max_per_address: usize,
    reserved: usize,
    state: Mutex<State>,
    /// One rate-limited log line per cap: `max_connections`, `max_connections_per_address`.
    logged: [RateLog; 2],
    pub(crate) counts: Counts,
}

#[derive(Default)]
struct State {
    devices: usize,
    by_address: HashMap<IpAddr, FromAddress>,
    /// Connections over a device cap let in to show a channel ClientHello.
    room: usize,
}

#[derive(Default)]
struct FromAddress {
    devices: usize,
    room: usize,
}

/// Of the room kept for channels, what one address may take at once: a flood from one
/// address (over its cap, sending nothing) cannot fill it. A connector's channels from behind
/// one address that come while the device slots are full open a few at a time, the others
/// dialling again after their backoff.
const ROOM_PER_ADDRESS: usize = 8;

/// How long a connection let into the room has to show its ClientHello: a client sends it
/// as soon as it has connected, so this is one trip across the network, not a handshake.
pub(crate) const ROOM_HELLO_TIME: Duration = Duration::from_secs(3);

/// What `/status` shows: refusals and closes since start.
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) refused_total: AtomicU64,
    pub(crate) refused_per_address: AtomicU64,
    pub(crate) closed_handshake_timeout: AtomicU64,
    pub(crate) closed_first_request_timeout: AtomicU64,
    pub(crate) closed_idle: AtomicU64,
}

/// Which cap a connection met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cap {
    Total,
    PerAddress,
}

/// A connection's place: a device slot, or one in the room kept for channels (over `cap`).
/// Given back when dropped.
pub(crate) struct Slot {
    limits: Arc<Limits>,
    address: IpAddr,
    over: Option<Cap>,
}

impl Slot {
    /// The cap this connection was over when let into the room for channels, if it was.
    pub(crate) fn over(&self) -> Option<Cap> {
        self.over
    }

    /// Counts and logs this connection refused for being over `cap` (not a channel).
    pub(crate) fn refused(&self, cap: Cap, peer: SocketAddr, log: &Log) {
        self.limits.refused(cap, peer, log);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.limits.lock();
        let room = self.over.is_some();
        if room {
            state.room = state.room.saturating_sub(1);
        } else {
            state.devices = state.devices.saturating_sub(1);
        }
        if let Some(from) = state.by_address.get_mut(&self.address) {
            let n = if room {
                &mut from.room
            } else {
                &mut from.devices
            };
            *n = n.saturating_sub(1);
            if from.devices == 0 && from.room == 0 {
                state.by_address.remove(&self.address);
            }
        }
    }
}

/// The address a cap counts by: IPv4 as it is, IPv6 by its /64 (one subscriber's usual
/// share: counted per address, one host would have 2^64 of them).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !((1u128 << 64) - 1),
        )),
        v4 => v4,
    }
}

impl Limits {
    pub(crate) fn new(max_total: usize, max_per_address: usize, reserved: usize) -> Limits {
        Limits {
            channels_only: false,
            max_total,
            max_per_address,
            reserved,
            state: Mutex::new(State::default()),
            logged: [RateLog::default(), RateLog::default()],
            counts: Counts::default(),
        }
    }

    /// For `channel_listen`: no device slots, only the room for channels' handshakes.
    pub(crate) fn channels_only(reserved: usize) -> Limits {
        Limits {
            channels_only: true,
            ..Limits::new(0, 0, reserved)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection just accepted from `peer`, or the cap it is over when the room
    /// for channels is full too (then it is closed, and the refusal counted and logged).
    pub(crate) fn admit(self: &Arc<Self>, peer: SocketAddr, log: &Log) -> Option<Slot> {
        let address = address_key(peer.ip());
        let over = {
            let mut state = self.lock();
            let state = &mut *state;
            let room_free = state.room < self.reserved;
            let from = state.by_address.entry(address).or_default();
            let over = if state.devices >= self.max_total {
                Some(Cap::Total)
            } else if from.devices >= self.max_per_address {
                Some(Cap::PerAddress)
            } else {
                None
            };
            match over {
                None => {
                    from.devices += 1;
                    state.devices += 1;
                    return Some(Slot {
                        limits: self.clone(),
                        address,
                        over: None,
                    });
                }
                Some(cap) if room_free && from.room < ROOM_PER_ADDRESS => {
                    from.room += 1;
                    state.room += 1;
                    return Some(Slot {
                        limits: self.clone(),
                        address,
                        over: Some(cap),
                    });
                }
                Some(cap) => {
                    if from.devices == 0 && from.room == 0 {
                        state.by_address.remove(&address);
                    }
                    cap
                }
            }
        };
        self.refused(over, peer, log);
        None
    }

    /// Counts and logs (at a bounded rate) a device connection refused for being over `cap`:
    /// the first line at once, then at most one a second per cap with the count since the
    /// last (a task per line, not per refusal).
    pub(crate) fn refused(self: &Arc<Self>, cap: Cap, peer: SocketAddr, log: &Log) {
        let (counter, index) = match cap {
            Cap::Total => (&self.counts.refused_total, 0),
            Cap::PerAddress => (&self.counts.refused_per_address, 1),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let at = {
            let mut pending = self.logged[index].lock();
            pending.count += 1;
            pending.latest = Some(peer);
            if pending.due {
                return;
            }
            pending.due = true;
            let now = tokio::time::Instant::now();
            pending
                .last_line
                .map_or(now, |last| (last + LOG_EVERY).max(now))
        };
        let limits = self.clone();
        let log = log.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let (count, latest) = {
                let mut pending = limits.logged[index].lock();
                pending.due = false;
                pending.last_line = Some(tokio::time::Instant::now());
                (std::mem::take(&mut pending.count), pending.latest.take())
            };
            let Some(latest) = latest else { return };
            if limits.channels_only {
                log.warn(&format!(
                    "Refused {count} connection(s) on the channel listener since the last such line, the latest from {latest}: no connector's ClientHello (the channel ALPN) within {} s, or more at once than reserved_for_channels ({}) or {ROOM_PER_ADDRESS} from one address",
                    ROOM_HELLO_TIME.as_secs(),
                    limits.reserved
                ));
                return;
            }
            let (scope, limit) = match cap {
                Cap::Total => ("in total".to_string(), limits.max_total),
                Cap::PerAddress => (
                    format!("from {}", address_key(latest.ip())),
                    limits.max_per_address,
                ),
            };
            let refusal = Refusal::new(Cause::TooManyConnections { scope, limit });
            log.warn(&format!(
                "Refused {count} device connection(s) before TLS since the last such line, the latest from {latest}: {refusal}"
            ));
        });
    }

    /// For `/status`.
    pub(crate) fn status(&self) -> serde_json::Value {
        let (devices, addresses, room) = {
            let state = self.lock();
            (state.devices, state.by_address.len(), state.room)
        };
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counts;
        serde_json::json!({
            "devices": devices,
            "addresses": addresses,
            "max_connections": self.max_total,
            "max_connections_per_address": self.max_per_address,
            "reserved_for_channels": self.reserved,
            "in_room_for_channels": room,
            "refused": {
                "max_connections": n(&c.refused_total),
                "max_connections_per_address": n(&c.refused_per_address),
            },
            "closed": {
                "handshake_timeout": n(&c.closed_handshake_timeout),
                "first_request_timeout": n(&c.closed_first_request_timeout),
                "idle_timeout": n(&c.closed_idle),
            },
        })
    }
}

/// Refusals of one kind not yet told in the log.
#[derive(Default)]
struct RateLog {
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    count: u64,
    latest: Option<SocketAddr>,
    /// A line is due: its task waits for its time.
    due: bool,
    last_line: Option<tokio::time::Instant>,
}

impl RateLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

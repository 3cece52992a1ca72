//! Instance sets: each `gateways` entry and the gateway instances it stands for. An IP address
//! stands for itself; a DNS name for every address it resolves to, resolved again every
//! `gateway_resolve_secs` ([`keep`]). The connector holds `channels_per_gateway` channels to
//! each instance, the TLS server name checked against the entry's name; a new instance gets
//! its channels at the resolution that finds it, and one gone from the answer is let go: its
//! channels drain as at a stop (the requests under way are answered). A failed resolution, or
//! an empty answer, keeps the instances last known and says so in the log.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{split_host_port, ConnectorConfig};
use crate::dial::{widen, Dial, Dialer};
use crate::lock;
use crate::run::Log;
use crate::service::Service;

/// The most instances one entry stands for: the addresses after these (in sorted order) are
/// left out, and the log says so. The original product runs up to 16 instances per gateway.
pub(crate) const MAX_INSTANCES_PER_ENTRY: usize = 64;

/// One gateway instance: an address an entry stands for now, and the channels held to it.
pub(crate) struct Instance {
    /// The entry, as the configuration names it ("host:port").
    pub(crate) gateway: String,
    pub(crate) address: SocketAddr,
    /// Whether the entry is this address itself (not a name).
    literal: bool,
    held: AtomicUsize,
}

impl Instance {
    /// How logs and the readiness name it: the entry alone when it is the address, else the
    /// entry and the address ("gw.contoso.com:443@10.0.0.5"): one word, as the doctor's rules
    /// read the "Channel N to gateway G: ..." lines.
    pub(crate) fn label(&self) -> String {
        if self.literal {
            self.gateway.clone()
        } else {
            format!("{}@{}", self.gateway, self.address.ip())
        }
    }

    /// A channel to this instance is up until the returned guard is dropped.
    pub(crate) fn held(self: &Arc<Self>) -> HeldChannel {
        self.held.fetch_add(1, Ordering::Relaxed);
        HeldChannel(self.clone())
    }
}

/// A channel held to an instance, counted until dropped.
pub(crate) struct HeldChannel(Arc<Instance>);

impl Drop for HeldChannel {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One `gateways` entry and what it stands for now.
pub(crate) struct Entry {
    /// As the configuration names it: "host:port".
    pub(crate) gateway: String,
    host: String,
    port: u16,
    /// The entry is an IP address: one instance, never resolved.
    literal: Option<IpAddr>,
    known: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    instances: Vec<Arc<Instance>>,
    /// Why no instance is known yet (the first resolution failed); None once one succeeded.
    unresolved: Option<String>,
}

/// An entry as the admin surface shows it now.
pub(crate) struct EntryNow {
    pub(crate) gateway: String,
    /// Each instance, its label, address and channels held now.
    pub(crate) instances: Vec<InstanceNow>,
    /// Why it stands for no instance yet.
    pub(crate) unresolved: Option<String>,
}

pub(crate) struct InstanceNow {
    pub(crate) label: String,
    pub(crate) address: SocketAddr,
    pub(crate) channels: usize,
}

/// Every entry of the configuration (those `load` accepted).
pub(crate) struct Entries(pub(crate) Vec<Arc<Entry>>);

impl Entries {
    pub(crate) fn new(config: &ConnectorConfig) -> Entries {
        Entries(
            config
                .gateways
                .iter()
                .filter_map(|g| {
                    let (host, port) = split_host_port(g)?;
                    Some(Arc::new(Entry {
                        gateway: g.clone(),
                        literal: host.parse().ok(),
                        host,
                        port,
                        known: Mutex::new(Known {
                            instances: Vec::new(),
                            unresolved: Some("not resolved yet".into()),
                        }),
                    }))
                })
                .collect(),
        )
    }

    pub(crate) fn now(&self) -> Vec<EntryNow> {
        self.0
            .iter()
            .map(|entry| {
                let known = lock(&entry.known);
                EntryNow {
                    gateway: entry.gateway.clone(),
                    instances: known
                        .instances
                        .iter()
                        .map(|i| InstanceNow {
                            label: i.label(),
                            address: i.address,
                            channels: i.held.load(Ordering::Relaxed),
                        })
                        .collect(),
                    unresolved: known.unresolved.clone(),
                }
            })
            .collect()
    }
}

/// What every instance's dial loops are made from.
#[derive(Clone)]
pub(crate) struct Kit {
    pub(crate) dialer: Dialer,
    /// `gateway_server_name`, if set: else each entry's host.
    pub(crate) server_name: Option<String>,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) service: Arc<Service>,
    pub(crate) log: Log,
    pub(crate) channels: usize,
    pub(crate) follow_threads: bool,
    pub(crate) max_request_header_bytes: u32,
    /// How often a name is resolved again (and the longest a resolution may take).
    pub(crate) every: Duration,
}

/// An instance whose dial loops run, and the switch that lets it go.
struct Running {
    instance: Arc<Instance>,
    let_go: watch::Sender<bool>,
}

/// Keeps `entry`'s instances until the connector stops: resolves it (a name, every
/// `kit.every`), starts the dial loops of a new instance and lets a vanished one go.
pub(crate) async fn keep(kit: Kit, entry: Arc<Entry>) {
    let mut stopped = kit.dialer.stopped.clone();
    let mut running: Vec<Running> = Vec::new();
    // Bounded by the stop: one resolution per `every`.
    loop {
        let answer = tokio::select! {
            answer = resolve(&entry, kit.every) => answer,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        match answer {
            Ok(addresses) => follow(&kit, &entry, &mut running, addresses),
            Err(why) => {
                let known = lock(&entry.known).instances.len();
                let kept = if known == 0 {
                    lock(&entry.known).unresolved = Some(why.clone());
                    "no instance of it is known yet, so no channel is held to it".to_string()
                } else {
                    let listed: Vec<String> = running
                        .iter()
                        .map(|r| r.instance.address.ip().to_string())
                        .collect();
                    format!(
                        "keeping the last known {known} instance(s) ({}) and their channels",
                        listed.join(", ")
                    )
                };
                kit.log.error(&format!(
                    "Cannot resolve gateway {}: {why}; {kept}; trying again in {} s",
                    entry.gateway,
                    kit.every.as_secs()
                ));
            }
        }
        if entry.literal.is_some() {
            // An address: nothing to resolve again. Held until the stop, so its loops run on.
            let _ = stopped.wait_for(|stop| *stop).await;
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(kit.every) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}

/// The addresses `entry` stands for now, sorted, at most [`MAX_INSTANCES_PER_ENTRY`]; an
/// empty answer is an error that names the entry.
async fn resolve(entry: &Entry, limit: Duration) -> Result<Vec<SocketAddr>, String> {
    if let Some(ip) = entry.literal {
        return Ok(vec![SocketAddr::new(ip, entry.port)]);
    }
    // getaddrinfo, on a blocking thread: /etc/hosts, then DNS, as nsswitch.conf says.
    let answer = tokio::time::timeout(
        limit,
        tokio::net::lookup_host((entry.host.as_str(), entry.port)),
    )
    .await
    .map_err(|_| format!("no answer within {} s", limit.as_secs()))?
    .map_err(|e| e.to_string())?;
    addresses_of(&entry.host, answer.collect())
}

/// An answer's addresses, sorted and each once; an empty one is an error naming `host`.
fn addresses_of(host: &str, mut addresses: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, String> {
    addresses.sort();
    addresses.dedup();
    if addresses.is_empty() {
        return Err(format!("the name {host} resolved to no address"));
    }
    Ok(addresses)
}

/// Starts the dial loops of each address new in `addresses` and lets go each instance not in
/// it; the entry then lists `addresses`.
fn follow(kit: &Kit, entry: &Entry, running: &mut Vec<Running>, mut addresses: Vec<SocketAddr>) {
    if addresses.len() > MAX_INSTANCES_PER_ENTRY {
        kit.log.warn(&format!(
            "Gateway {} resolves to {} addresses: holding channels to the first {MAX_INSTANCES_PER_ENTRY} only",
            entry.gateway,
            addresses.len()
        ));
        addresses.truncate(MAX_INSTANCES_PER_ENTRY);
    }
    let first = running.is_empty() && lock(&entry.known).unresolved.is_some();
    running.retain(|r| {
        if addresses.contains(&r.instance.address) {
            return true;
        }
        kit.log.info(&format!(
            "Gateway instance {} is no longer in the answer for {}: letting it go, its channels draining (the requests under way are answered)",
            r.instance.address, entry.gateway
        ));
        let _ = r.let_go.send(true);
        false
    });
    let new: Vec<SocketAddr> = addresses
        .iter()
        .filter(|a| !running.iter().any(|r| r.instance.address == **a))
        .copied()
        .collect();
    for address in &new {
        running.push(start(kit, entry, *address));
    }
    if !new.is_empty() && entry.literal.is_none() {
        let listed: Vec<String> = new.iter().map(|a| a.ip().to_string()).collect();
        kit.log.info(&format!(
            "Gateway {} {} {}: holding {} channel(s) to each ({} instance(s) in all)",
            entry.gateway,
            if first {
                "resolves to"
            } else {
                "has a new instance"
            },
            listed.join(", "),
            kit.channels,
            running.len()
        ));
    }
    let mut known = lock(&entry.known);
    known.instances = running.iter().map(|r| r.instance.clone()).collect();
    known.unresolved = None;
}

/// Starts the dial loops of the instance at `address` (and its widening).
fn start(kit: &Kit, entry: &Entry, address: SocketAddr) -> Running {
    let instance = Arc::new(Instance {
        gateway: entry.gateway.clone(),
        address,
        literal: entry.literal.is_some(),
        held: AtomicUsize::new(0),
    });
    let (let_go, released) = watch::channel(false);
    let (announced, announcements) = watch::channel(kit.channels);
    // The template each channel's dial loop is numbered from.
    let first = Dial {
        instance: instance.clone(),
        released,
        server_name: kit
            .server_name
            .clone()
            .unwrap_or_else(|| entry.host.clone()),
        tls: kit.tls.clone(),
        service: kit.service.clone(),
        announced: Arc::new(announced),
        log: kit.log.clone(),
        number: 1,
        max_request_header_bytes: kit.max_request_header_bytes,
    };
    for n in 1..=kit.channels {
        kit.dialer.start(first.numbered(n));
    }
    if kit.follow_threads {
        let widening = widen(kit.dialer.clone(), first, kit.channels, announcements);
        kit.dialer.spawn(widening);
    }
    Running { instance, let_go }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_answer_is_an_error_naming_the_entry() {
        assert_eq!(
            addresses_of("gw.contoso.com", Vec::new()),
            Err("the name gw.contoso.com resolved to no address".to_string())
        );
        let a: SocketAddr = "127.0.0.3:443".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:443".parse().unwrap();
        assert_eq!(addresses_of("gw", vec![a, b, a]), Ok(vec![b, a]));
    }
}

//! Prometheus metrics for the admin surface's `GET /metrics`: what the gateway and the
//! connector both need to expose their series (`portcullis_*`).
//!
//! The exposition is the `metrics` crate's recorder from `metrics-exporter-prometheus`, built
//! without its HTTP listener (the admin surface serves the text). Chosen over
//! `prometheus-client` because it writes the Prometheus text format (0.0.4), which
//! `promtool check metrics` reads and every Prometheus scrapes; `prometheus-client` writes
//! OpenMetrics only, whose counter samples (`_total` under a family named without it) Debian's
//! promtool 2.42 rejects ("no help text"). Each component holds a recorder of its own, never
//! the process-wide one: `portcullis dev` and the tests run a gateway and a connector in one
//! process, and their series must not mix.
//!
//! What the request path pays: one [`Tally::add`] per request, a lookup in the calling shard's
//! own small map (a key of a few integers, no string, no allocation once seen), a relaxed
//! add to a count only that shard writes, and one histogram sample. Counts reach the recorder
//! only when scraped ([`Tally::totals`], `Counter::absolute`). Gauges (channels, connections,
//! certificates) are read from the component's state at scrape time into a recorder made for
//! that scrape ([`Registry::new`] again), so a series whose subject went away goes with it.
//!
//! Label values come from bounded sets: routes, endpoint ids a connector announced or the
//! configuration names ("other" for the rest), HTTP statuses, the status texts of the refusal
//! table or a status's standard reason ([`StatusText`]), connector and gateway names from
//! configuration. Nothing a device sends (identity, path) becomes a label.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};

use metrics::{Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use time::OffsetDateTime;

pub use metrics::{Counter, Gauge, Histogram};

use crate::shards::Shards;

/// Buckets of the request duration histograms, in seconds: from a kept-alive request on
/// loopback (under a millisecond) to `request_timeout_secs`' default (120 s).
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The Content-Type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A recorder of this component's series, rendered as Prometheus text.
pub struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Registry {
    /// A recorder whose histograms named in `histograms` have [`DURATION_BUCKETS`] (any other
    /// histogram would be rendered as a summary).
    pub fn new(histograms: &[&str]) -> Registry {
        let mut builder = PrometheusBuilder::new();
        for name in histograms {
            // Only a bad bucket list fails, and this one is fixed and sorted.
            builder = match builder
                .set_buckets_for_metric(Matcher::Full((*name).to_string()), DURATION_BUCKETS)
            {
                Ok(builder) => builder,
                Err(_) => PrometheusBuilder::new(),
            };
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        Registry { recorder, handle }
    }

    fn metadata() -> Metadata<'static> {
        Metadata::new("portcullis", metrics::Level::INFO, None)
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        Key::from_parts(
            name,
            labels
                .iter()
                .map(|(k, v)| Label::new(*k, v.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    /// The counter `name` with `labels`, described by `help` (the `# HELP` line).
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Counter {
        self.recorder
            .describe_counter(KeyName::from(name), None, SharedString::from(help));
        self.recorder
            .register_counter(&Self::key(name, labels), &Self::metadata())
    }

    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Gauge {
        self.recorder
            .describe_gauge(KeyName::from(name), None, SharedString::from(help));
        self.recorder
            .register_gauge(&Self::key(name, labels), &Self::metadata())
    }

    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Histogram {
        self.recorder
            .describe_histogram(KeyName::from(name), None, SharedString::from(help));
        self.recorder
            .register_histogram(&Self::key(name, labels), &Self::metadata())
    }

    /// The series in the Prometheus text format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds the histogram samples taken since the last render into their buckets: the
    /// recorder holds each sample until then, so a component nobody scrapes calls this now
    /// and then ([`UPKEEP_EVERY`]).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// How often a component folds its histogram samples into buckets when nobody scrapes.
pub const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A small, fast hasher for the tallies' keys (a few integers): SipHash, the default, is made
/// for keys an attacker chooses, and these are from bounded sets.
#[derive(Default)]
pub struct SmallKeyHasher(u64);

impl Hasher for SmallKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        // FxHash's step.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type Counts<K> = HashMap<K, Counted, BuildHasherDefault<SmallKeyHasher>>;

struct Counted {
    count: AtomicU64,
    histogram: Histogram,
}

/// Requests counted by a small key (its labels, as integers), one map per shard: a shard's
/// thread reads and adds to its own map only, so the request path shares no cache line with
/// another thread. The scrape sums the shards.
pub struct Tally<K> {
    shards: Box<[RwLock<Counts<K>>]>,
}

impl<K: Copy + Eq + Hash> Tally<K> {
    /// A tally for `shards` shards (any shard index is taken modulo the count).
    pub fn new(shards: usize) -> Tally<K> {
        Tally {
            shards: (0..shards.max(1))
                .map(|_| RwLock::new(Counts::default()))
                .collect(),
        }
    }

    /// Counts one under `key` and records `seconds` in its histogram, which `histogram` makes
    /// (registers) the first time this shard sees the key.
    pub fn add(&self, key: K, seconds: f64, histogram: impl FnOnce(&K) -> Histogram) {
        let shard = &self.shards[Shards::here() % self.shards.len()];
        if let Some(counted) = shard.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
            counted.count.fetch_add(1, Ordering::Relaxed);
            counted.histogram.record(seconds);
            return;
        }
        let made = histogram(&key);
        let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
        let counted = map.entry(key).or_insert_with(|| Counted {
            count: AtomicU64::new(0),
            histogram: made,
        });
        counted.count.fetch_add(1, Ordering::Relaxed);
        counted.histogram.record(seconds);
    }

    /// Each key's count, summed over the shards.
    pub fn totals(&self) -> Vec<(K, u64)> {
        let mut totals: HashMap<K, u64, BuildHasherDefault<SmallKeyHasher>> = HashMap::default();
        for shard in self.shards.iter() {
            for (key, counted) in shard.read().unwrap_or_else(|p| p.into_inner()).iter() {
                *totals.entry(*key).or_default() += counted.count.load(Ordering::Relaxed);
            }
        }
        totals.into_iter().collect()
    }
}

/// The `status_text` label of an answer: the Portcullis status text it carries
/// (`x-portcullis-status-text`, when it is one of the refusal table's), or its status's
/// standard reason phrase ("OK", "Not Found"; "Unknown" for a code with none). Kept as an
/// index: a tally's key holds no string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusText(u8);

/// Index meaning "the status's standard reason".
const STANDARD: u8 = u8::MAX;

/// Every status text of the refusal table, in its order.
pub fn status_texts() -> &'static [&'static str] {
    static TEXTS: OnceLock<Vec<&'static str>> = OnceLock::new();
    TEXTS.get_or_init(|| {
        let mut texts: Vec<&'static str> = Vec::new();
        for cause in channel::refusal::Cause::examples() {
            let text = channel::refusal::Refusal::new(cause).text;
            if !texts.contains(&text) {
                texts.push(text);
            }
        }
        texts.truncate(usize::from(STANDARD) - 1);
        texts
    })
}

impl StatusText {
    /// The label for an answer carrying `header` (its status text header, if any).
    pub fn of(header: Option<&[u8]>) -> StatusText {
        header
            .and_then(|h| status_texts().iter().position(|t| t.as_bytes() == h))
            .and_then(|i| u8::try_from(i).ok())
            .map_or(StatusText(STANDARD), StatusText)
    }

    /// A refusal's own status text.
    pub fn of_text(text: &str) -> StatusText {
        StatusText::of(Some(text.as_bytes()))
    }

    /// The label's text, for an answer with `status`.
    pub fn label(self, status: u16) -> &'static str {
        match status_texts().get(usize::from(self.0)) {
            Some(text) => text,
            None => hyper::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Unknown"),
        }
    }

    /// Whether it is a Portcullis refusal's status text.
    pub fn is_refusal(self) -> bool {
        usize::from(self.0) < status_texts().len()
    }
}

/// A certificate (or CRL) whose end `portcullis_certificate_expiry_timestamp_seconds` shows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Expiry {
    /// Which: `server`, `channel`, `client`, `trusted_root`, `connector_root`,
    /// `allowed_root`, `gateway_root`, `endpoint_root`, `crl`.
    pub role: &'static str,
    pub subject: String,
    /// SHA-1, upper-case hex; for a CRL, empty.
    pub thumbprint: String,
    /// `not_after`; for a CRL, its next update.
    #[serde(with = "time::serde::rfc3339")]
    pub expires: OffsetDateTime,
}

impl Expiry {
    pub fn of(role: &'static str, cert: &pki::Certificate) -> Expiry {
        Expiry {
            role,
            subject: cert.subject.clone(),
            thumbprint: cert.thumbprint.clone(),
            expires: cert.not_after,
        }
    }

    /// Whole days from `now` to the end (negative once past).
    pub fn days_left(&self, now: OffsetDateTime) -> i64 {
        (self.expires - now).whole_days()
    }
}

/// Each root of `roots`, as `role`.
pub fn roots_expiry(role: &'static str, roots: &pki::RootSet) -> Vec<Expiry> {
    roots.certs.iter().map(|c| Expiry::of(role, c)).collect()
}

/// The series every component has: `portcullis_certificate_expiry_timestamp_seconds`,
/// `portcullis_log_lines_lost_total`, `portcullis_build_info`; in a recorder of their own.
pub fn common(certificates: &[Expiry], log: &logs::Logger) -> String {
    let now = Registry::new(&[]);
    for c in certificates {
        now.gauge(
            "portcullis_certificate_expiry_timestamp_seconds",
            "When a certificate this component uses or trusts expires (a CRL: its next update), as a Unix time; role names which.",
            &[
                ("role", c.role),
                ("subject", &c.subject),
                ("thumbprint", &c.thumbprint),
            ],
        )
        .set(c.expires.unix_timestamp() as f64);
    }
    now.counter(
        "portcullis_log_lines_lost_total",
        "Log lines the log file lost since start (the disk full and the held lines at their limit).",
        &[],
    )
    .absolute(log.lines_lost());
    now.gauge(
        "portcullis_build_info",
        "Always 1; the version label says which build runs.",
        &[("version", env!("CARGO_PKG_VERSION"))],
    )
    .set(1.0);
    now.render()
}

/// What `GET /readyz` answers: ready (200), or not (503) with what is missing; `detail` is the
/// rest of the JSON body either way.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    pub missing: Vec<String>,
    pub detail: serde_json::Map<String, serde_json::Value>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.missing.is_empty()
    }

    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::Map::new();
        body.insert("ready".into(), self.is_ready().into());
        body.insert("missing".into(), self.missing.clone().into());
        for (k, v) in &self.detail {
            body.insert(k.clone(), v.clone());
        }
        serde_json::Value::Object(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_texts_are_the_refusal_tables_and_the_rest_standard_reasons() {
        let text = StatusText::of(Some(b"CMGConnector_Clientcertificaterequired"));
        assert!(text.is_refusal());
        assert_eq!(text.label(403), "CMGConnector_Clientcertificaterequired");
        // Anything else an answer carries is not a label value.
        let other = StatusText::of(Some(b"Hello <b>world</b>"));
        assert!(!other.is_refusal());
        assert_eq!(other.label(403), "Forbidden");
        assert_eq!(StatusText::of(None).label(200), "OK");
        assert_eq!(StatusText::of(None).label(799), "Unknown");
    }

    #[test]
    fn a_tally_sums_its_shards_and_renders_through_the_recorder() {
        let registry = Registry::new(&["test_duration_seconds"]);
        let tally: Tally<(u16, u8)> = Tally::new(2);
        for _ in 0..3 {
            tally.add((200, 1), 0.002, |_| {
                registry.histogram("test_duration_seconds", "d", &[("endpoint", "1")])
            });
        }
        tally.add((404, 1), 0.5, |_| {
            registry.histogram("test_duration_seconds", "d", &[("endpoint", "1")])
        });
        let mut totals = tally.totals();
        totals.sort();
        assert_eq!(totals, vec![((200, 1), 3), ((404, 1), 1)]);
        for ((status, _), n) in totals {
            registry
                .counter("test_total", "t", &[("status", &status.to_string())])
                .absolute(n);
        }
        let text = registry.render();
        assert!(text.contains("test_total{status=\"200\"} 3"), "{text}");
        assert!(
            text.contains("test_duration_seconds_bucket{endpoint=\"1\",le=\"0.0025\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("test_duration_seconds_count{endpoint=\"1\"} 4"),
            "{text}"
        );
    }
}

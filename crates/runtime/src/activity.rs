//! What the status page shows of a component's recent work: request and refusal counts by
//! status text over the last minutes ([`History`], sampled from the request tallies every few
//! seconds), the last refusals ([`Recent`]), and the doctor's cause and fix for a status text
//! ([`explain`], from `crates/logs/rules.toml`, the rules `portcullis doctor logs` uses).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::metrics::StatusText;

/// A status and its status text: what rates are kept by.
pub type RateKey = (u16, StatusText);

/// How far back the samples go.
pub const KEPT: Duration = Duration::from_secs(5 * 60);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Totals by status and status text, sampled now and then (`UPKEEP_EVERY`), for as far back
/// as [`KEPT`] (and one sample older, so a full window has a start).
pub struct History {
    started: Instant,
    samples: Mutex<VecDeque<(Instant, HashMap<RateKey, u64>)>>,
}

impl Default for History {
    fn default() -> Self {
        History {
            started: Instant::now(),
            samples: Mutex::new(VecDeque::new()),
        }
    }
}

/// Requests with one status and status text over the last minute, the last five, and since
/// start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    pub status: u16,
    pub text: &'static str,
    /// A Portcullis refusal (the refusal table's status text), not an endpoint's answer.
    pub refusal: bool,
    pub last_minute: u64,
    pub last_five_minutes: u64,
    pub since_start: u64,
}

/// Totals by status and status text, summed over whatever else a tally's keys hold: what
/// [`History::sample`] keeps.
pub fn totals_by_status<K>(
    totals: Vec<(K, u64)>,
    key: impl Fn(&K) -> RateKey,
) -> HashMap<RateKey, u64> {
    let mut by_status = HashMap::new();
    for (k, n) in totals {
        *by_status.entry(key(&k)).or_default() += n;
    }
    by_status
}

impl History {
    /// Keeps `totals` as the totals of now.
    pub fn sample(&self, totals: HashMap<RateKey, u64>) {
        let now = Instant::now();
        let mut samples = lock(&self.samples);
        samples.push_back((now, totals));
        // Drop a sample once the next one is old enough to start the longest window.
        while samples.len() > 2 && now.duration_since(samples[1].0) >= KEPT {
            samples.pop_front();
        }
    }

    /// The rates, given the totals of now: each window starts at the newest sample at least
    /// that old (the start of the process while none is: counts from zero).
    pub fn rates(&self, totals: &HashMap<RateKey, u64>) -> Vec<Rate> {
        let now = Instant::now();
        let samples = lock(&self.samples);
        let at_least = |age: Duration| {
            samples
                .iter()
                .rev()
                .find(|(at, _)| now.duration_since(*at) >= age)
                .map(|(_, totals)| totals)
        };
        let (minute, five) = (
            at_least(Duration::from_secs(60)),
            at_least(Duration::from_secs(300)),
        );
        let since = |start: Option<&HashMap<RateKey, u64>>, key: &RateKey, total: u64| {
            total.saturating_sub(start.and_then(|s| s.get(key)).copied().unwrap_or(0))
        };
        let mut rates: Vec<Rate> = totals
            .iter()
            .map(|(key, total)| Rate {
                status: key.0,
                text: key.1.label(key.0),
                refusal: key.1.is_refusal(),
                last_minute: since(minute, key, *total),
                last_five_minutes: since(five, key, *total),
                since_start: *total,
            })
            .collect();
        rates.sort_by(|a, b| {
            (b.last_five_minutes, b.since_start, a.status, a.text).cmp(&(
                a.last_five_minutes,
                a.since_start,
                b.status,
                b.text,
            ))
        });
        rates
    }

    /// How long the process has been counting.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

/// One refusal, as the status page lists it. `reason` and `from` may quote outside text: the
/// page escapes every field.
#[derive(Debug, Clone)]
pub struct RecentRefusal {
    pub at: OffsetDateTime,
    pub status: u16,
    pub text: &'static str,
    pub endpoint: String,
    /// Who asked: the device's address (gateway), the message id (connector).
    pub from: String,
    /// Why, when this component refused it; for an answer passed on from the next hop, where
    /// that hop says why.
    pub reason: String,
}

/// The last refusals, newest first.
#[derive(Default)]
pub struct Recent {
    list: Mutex<VecDeque<RecentRefusal>>,
}

/// How many refusals the page lists.
pub const RECENT_REFUSALS: usize = 20;

/// The longest reason kept, in characters (a reason may quote a long certificate subject).
const REASON_CHARS: usize = 600;

impl Recent {
    pub fn push(&self, mut refusal: RecentRefusal) {
        if refusal.reason.chars().count() > REASON_CHARS {
            refusal.reason = refusal
                .reason
                .chars()
                .take(REASON_CHARS)
                .collect::<String>()
                + "...";
        }
        let mut list = lock(&self.list);
        list.push_front(refusal);
        list.truncate(RECENT_REFUSALS);
    }

    pub fn list(&self) -> Vec<RecentRefusal> {
        lock(&self.list).iter().cloned().collect()
    }
}

/// What `portcullis doctor logs` says of a status text: its finding's title, cause and fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explained {
    pub rule: String,
    pub title: String,
    pub cause: String,
    pub resolution: String,
}

/// The doctor's finding for a device that got `status` `text`: the rules read the line a
/// Configuration Manager client logs for it (`[CCMHTTP] ERROR INFO: StatusCode= 403
/// StatusText= ...`), which every refusal's rule recognises. Remembered per status text.
pub fn explain(status: u16, text: &str) -> Option<Explained> {
    type Known = HashMap<(u16, String), Option<Explained>>;
    static KNOWN: OnceLock<Mutex<Known>> = OnceLock::new();
    let known = KNOWN.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (status, text.to_string());
    if let Some(found) = lock(known).get(&key) {
        return found.clone();
    }
    let found = diagnose(status, text);
    let mut known = lock(known);
    // Status texts come from the refusal table: few. Bounded all the same.
    if known.len() < 256 {
        known.insert(key, found.clone());
    }
    found
}

fn diagnose(status: u16, text: &str) -> Option<Explained> {
    // Loaded once: the table compiles every rule's regexes.
    static RULES: OnceLock<Option<logs::diagnose::Rules>> = OnceLock::new();
    let rules = RULES
        .get_or_init(|| logs::diagnose::Rules::builtin().ok())
        .as_ref()?;
    let message = format!("[CCMHTTP] ERROR INFO: StatusCode= {status} StatusText= {text}");
    let line = logs::cmtrace::Line {
        message: &message,
        component: "CcmMessaging",
        severity: logs::cmtrace::Severity::Error,
        thread: 1,
        at: OffsetDateTime::now_utc(),
    }
    .format()
        + "\r\n";
    let mut diagnosis = logs::diagnose::Diagnosis::new(rules);
    diagnosis
        .read_from(line.as_bytes(), "CcmMessaging.log")
        .ok()?;
    diagnosis
        .finish()
        .findings
        .into_iter()
        .next()
        .map(|f| Explained {
            rule: f.id,
            title: f.title,
            cause: f.cause,
            resolution: f.resolution,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_doctor_explains_every_refusal_text() {
        for cause in channel::refusal::Cause::examples() {
            let refusal = channel::refusal::Refusal::new(cause);
            let explained = explain(refusal.status, refusal.text)
                .unwrap_or_else(|| panic!("{} not explained", refusal.text));
            assert!(explained.title.contains(refusal.text), "{explained:?}");
            assert!(!explained.resolution.is_empty());
        }
        assert_eq!(explain(200, "OK"), None);
    }

    #[test]
    fn rates_count_from_the_sample_a_window_old() {
        let history = History::default();
        let ok = (200, StatusText::of(None));
        history.sample(HashMap::from([(ok, 5)]));
        let rates = history.rates(&HashMap::from([(ok, 8)]));
        // No sample is a minute old yet: everything since start.
        assert_eq!(rates[0].last_minute, 8);
        assert_eq!(rates[0].since_start, 8);
        assert_eq!(rates[0].text, "OK");
        assert!(!rates[0].refusal);
    }

    #[test]
    fn recent_keeps_the_newest_and_cuts_long_reasons() {
        let recent = Recent::default();
        for n in 0..30 {
            recent.push(RecentRefusal {
                at: OffsetDateTime::now_utc(),
                status: 403,
                text: "CMGService_Untrustedclientcertificate",
                endpoint: n.to_string(),
                from: "127.0.0.1:1".into(),
                reason: "x".repeat(1000),
            });
        }
        let list = recent.list();
        assert_eq!(list.len(), RECENT_REFUSALS);
        assert_eq!(list[0].endpoint, "29");
        assert_eq!(list[0].reason.chars().count(), REASON_CHARS + 3);
    }
}

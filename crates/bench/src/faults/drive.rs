//! The drill's devices: each with its own certificate and kept-alive connection, at a steady
//! rate, GETs and POSTs with bodies, every request carrying a unique id (`?drill=ID`) that the
//! management point's W3C log records. A device's home is one of the two gateways; when a new
//! connection to it cannot be made, it takes the other, as a client given both instances'
//! addresses (a DNS-based instance set) does. Nothing is retried: a request that fails is
//! recorded as it failed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;

use super::lab::{DrillLab, HANG_ENDPOINT, MP_ENDPOINT};
use super::FaultsOptions;
use crate::load::{self, Answer, Sender, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Get,
    Post,
    /// A GET to the endpoint that never answers.
    Hang,
    /// A GET whose answer's body trickles.
    Trickle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    Ok,
    /// A non-2xx answer: its status and status text.
    Status(u16, String),
    /// The connection failed: what failed.
    Transport(String),
    /// No answer within the deadline.
    Hung,
}

#[derive(Debug, Clone)]
pub(super) struct Record {
    pub(super) id: u64,
    pub(super) kind: Kind,
    /// The gateway instance (0 or 1) the request went to.
    pub(super) instance: usize,
    pub(super) started: Instant,
    pub(super) took: Duration,
    pub(super) outcome: Outcome,
}

impl Record {
    pub(super) fn answered(&self) -> Instant {
        self.started + self.took
    }
}

/// What part of the load is not plain GETs and POSTs: every fourth request of each device.
pub(super) const SPECIAL_NONE: u8 = 0;
pub(super) const SPECIAL_HANG: u8 = 1;
pub(super) const SPECIAL_TRICKLE: u8 = 2;

/// The trickling body: chunks of bytes, one every so often.
pub(super) const TRICKLE_CHUNKS: u64 = 4;
const TRICKLE_BYTES: u64 = 1024;
pub(super) const TRICKLE_EVERY: Duration = Duration::from_millis(500);
/// A POST's body: a client inventory report's size.
const POST_BYTES: usize = 16 * 1024;
/// The most requests one device makes in a run, whatever the run's length.
const MAX_REQUESTS_PER_DEVICE: u64 = 10_000_000;

/// What the devices share with the drill.
struct Control {
    stop: AtomicBool,
    /// Milliseconds a request may take before it is recorded as hung.
    deadline_ms: AtomicU64,
    special: AtomicU8,
    /// Raised to make every device take a new connection to its home gateway.
    rehome: AtomicU64,
    next_id: AtomicU64,
    records: Mutex<Vec<Record>>,
    /// Requests under way: id -> when started.
    in_flight: Mutex<HashMap<u64, Instant>>,
}

pub(super) struct Driver {
    control: Arc<Control>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Driver {
    pub(super) fn start(
        runtime: &tokio::runtime::Runtime,
        lab: &DrillLab,
        options: &FaultsOptions,
    ) -> Result<Driver, String> {
        let control = Arc::new(Control {
            stop: AtomicBool::new(false),
            deadline_ms: AtomicU64::new(5_000),
            special: AtomicU8::new(SPECIAL_NONE),
            rehome: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            records: Mutex::new(Vec::new()),
            in_flight: Mutex::new(HashMap::new()),
        });
        let interval = Duration::from_secs_f64(options.devices as f64 / options.rate);
        let certificates = options.devices.min(16);
        let mut tasks = Vec::new();
        for n in 0..options.devices {
            let name = format!("device-{:03}", n % certificates + 1);
            let devices = lab.pki.join(pki::lab::layout::DEVICES);
            let tls = probe::device_tls(
                &[lab.pki.join(pki::lab::layout::ROOT_CERT)],
                Some(&devices.join(format!("{name}.crt"))),
                Some(&devices.join(format!("{name}.key"))),
                false,
            )
            .map_err(|e| format!("device {name}: {e}"))?;
            let targets = lab
                .gateway_ports
                .iter()
                .map(|port| Target::new(&format!("https://localhost:{port}/"), tls.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("device {name}: {e}"))?;
            let device = Device {
                control: control.clone(),
                targets,
                home: n % 2,
                interval,
                // Spread over one interval, so the load is steady from the start.
                offset: interval.mul_f64(n as f64 / options.devices as f64),
            };
            tasks.push(runtime.spawn(device.run()));
        }
        Ok(Driver { control, tasks })
    }

    /// The deadline of requests started from now on.
    pub(super) fn set_deadline(&self, deadline: Duration) {
        self.control
            .deadline_ms
            .store(deadline.as_millis() as u64, Ordering::Relaxed);
    }

    pub(super) fn deadline(&self) -> Duration {
        Duration::from_millis(self.control.deadline_ms.load(Ordering::Relaxed))
    }

    pub(super) fn set_special(&self, special: u8) {
        self.control.special.store(special, Ordering::Relaxed);
    }

    /// Every device takes a new connection to its home gateway for its next request.
    pub(super) fn rehome(&self) {
        self.control.rehome.fetch_add(1, Ordering::Relaxed);
    }

    /// The records of requests started before `until`, once each has ended (bounded by the
    /// longest deadline and a second: each request ends by its own deadline), removed from
    /// what is kept. Requests started later stay for the next call.
    pub(super) fn take_until(&self, until: Instant) -> Vec<Record> {
        let wait = Duration::from_secs(2) + self.deadline().max(Duration::from_secs(15));
        let give_up = Instant::now() + wait;
        while Instant::now() < give_up
            && lock(&self.control.in_flight)
                .values()
                .any(|&started| started < until)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut records = lock(&self.control.records);
        let (taken, kept): (Vec<Record>, Vec<Record>) =
            records.drain(..).partition(|r| r.started < until);
        *records = kept;
        taken
    }

    /// Stops every device, bounded: each ends its request under way by its deadline.
    pub(super) fn stop(self, runtime: &tokio::runtime::Runtime) {
        self.control.stop.store(true, Ordering::Relaxed);
        let wait = self.deadline() + Duration::from_secs(2);
        runtime.block_on(async {
            for task in self.tasks {
                let abort = task.abort_handle();
                if tokio::time::timeout(wait, task).await.is_err() {
                    abort.abort();
                }
            }
        });
    }
}

struct Device {
    control: Arc<Control>,
    /// One per gateway instance.
    targets: Vec<Target>,
    home: usize,
    interval: Duration,
    offset: Duration,
}

impl Device {
    async fn run(self) {
        let control = &self.control;
        let mut connection: Option<(Sender, usize)> = None;
        let mut rehomed = control.rehome.load(Ordering::Relaxed);
        let mut due = tokio::time::Instant::now() + self.offset;
        for n in 0..MAX_REQUESTS_PER_DEVICE {
            tokio::time::sleep_until(due).await;
            // At a steady rate; a late device does not catch up in a burst.
            due = (due + self.interval).max(tokio::time::Instant::now());
            if control.stop.load(Ordering::Relaxed) {
                return;
            }
            let rehome = control.rehome.load(Ordering::Relaxed);
            if rehome != rehomed {
                rehomed = rehome;
                connection = None;
            }
            let special = control.special.load(Ordering::Relaxed);
            let kind = match (n % 4, special) {
                (3, SPECIAL_HANG) => Kind::Hang,
                (3, SPECIAL_TRICKLE) => Kind::Trickle,
                _ if n % 3 == 2 => Kind::Post,
                _ => Kind::Get,
            };
            let id = control.next_id.fetch_add(1, Ordering::Relaxed);
            let deadline = Duration::from_millis(control.deadline_ms.load(Ordering::Relaxed));
            let started = Instant::now();
            lock(&control.in_flight).insert(id, started);
            let mut instance = connection.as_ref().map_or(self.home, |c| c.1);
            let attempt = self.attempt(&mut connection, &mut instance, kind, id);
            let outcome = match tokio::time::timeout(deadline, attempt).await {
                Ok(Ok(answer)) => judge(kind, id, &answer),
                Ok(Err(e)) => Outcome::Transport(e),
                Err(_) => Outcome::Hung,
            };
            if matches!(outcome, Outcome::Transport(_) | Outcome::Hung) {
                // A device opens another; after an answer (a refusal too) it keeps the
                // connection, unless the gateway closed it.
                connection = None;
            }
            let record = Record {
                id,
                kind,
                instance,
                started,
                took: started.elapsed(),
                outcome,
            };
            lock(&control.records).push(record);
            lock(&control.in_flight).remove(&id);
        }
    }

    /// One request: on the kept connection when it is still open, else on a new one (home
    /// first, then the other instance).
    async fn attempt(
        &self,
        connection: &mut Option<(Sender, usize)>,
        instance: &mut usize,
        kind: Kind,
        id: u64,
    ) -> Result<Answer, String> {
        let mut kept = match connection.take() {
            Some((sender, at)) if !sender.is_closed() => Some((sender, at)),
            _ => None,
        };
        // A kept connection the gateway closed before this request went out is no failure:
        // a device opens another.
        if let Some((sender, _)) = &mut kept {
            if sender.ready().await.is_err() {
                kept = None;
            }
        }
        let (mut sender, at) = match kept {
            Some(kept) => kept,
            None => self.connect().await?,
        };
        *instance = at;
        if sender.is_closed() {
            return Err("connection: closed before the request".into());
        }
        sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let request = self.request(kind, id, at)?;
        let answer = load::send(&mut sender, request).await?;
        if !sender.is_closed() {
            *connection = Some((sender, at));
        }
        Ok(answer)
    }

    async fn connect(&self) -> Result<(Sender, usize), String> {
        let other = 1 - self.home;
        match self.targets[self.home].connect().await {
            Ok(sender) => Ok((sender, self.home)),
            Err(home) => match self.targets[other].connect().await {
                Ok(sender) => Ok((sender, other)),
                Err(e) => Err(format!("{e} (and at the home gateway: {home})")),
            },
        }
    }

    fn request(&self, kind: Kind, id: u64, at: usize) -> Result<Request<Full<Bytes>>, String> {
        let (method, path, body) = match kind {
            Kind::Get => (
                "GET",
                format!("/CCM_PROXY_MUTUALAUTH/{MP_ENDPOINT}/portcullis/echo?drill={id}"),
                Bytes::new(),
            ),
            Kind::Post => (
                "POST",
                format!("/CCM_PROXY_MUTUALAUTH/{MP_ENDPOINT}/portcullis/echo?drill={id}"),
                Bytes::from(vec![b'p'; POST_BYTES]),
            ),
            Kind::Hang => (
                "GET",
                format!("/CCM_PROXY_MUTUALAUTH/{HANG_ENDPOINT}/portcullis/echo?drill={id}"),
                Bytes::new(),
            ),
            Kind::Trickle => (
                "GET",
                format!(
                    "/CCM_PROXY_MUTUALAUTH/{MP_ENDPOINT}/portcullis/trickle?chunks={TRICKLE_CHUNKS}&bytes={TRICKLE_BYTES}&every_ms={}&drill={id}",
                    TRICKLE_EVERY.as_millis()
                ),
                Bytes::new(),
            ),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.targets[at].authority.as_str())
            .header(hyper::header::USER_AGENT, "SMS CCM 5.0");
        if !body.is_empty() {
            builder = builder.header(hyper::header::CONTENT_LENGTH, body.len());
        }
        builder
            .body(Full::new(body))
            .map_err(|e| format!("request: {e}"))
    }
}

/// A 2xx counts only with the whole body it should have.
fn judge(kind: Kind, id: u64, answer: &Answer) -> Outcome {
    if !(200..300).contains(&answer.status) {
        return Outcome::Status(answer.status, answer.text.clone());
    }
    let expected = match kind {
        Kind::Get => format!("drill={id}").len() as u64,
        Kind::Post => POST_BYTES as u64,
        Kind::Trickle => TRICKLE_CHUNKS * TRICKLE_BYTES,
        // A 2xx from the endpoint that never answers is no answer of its.
        Kind::Hang => return Outcome::Transport("a 2xx from the hanging endpoint".into()),
    };
    if answer.body_bytes == expected {
        Outcome::Ok
    } else {
        Outcome::Transport(format!("body: {} of {expected} bytes", answer.body_bytes))
    }
}

/// POST ids the management point's W3C log has recorded, and how often: read as the log
/// grows (from where the last read ended; across a roll-over to `.lo_`).
pub(super) struct PostIds {
    path: std::path::PathBuf,
    offset: u64,
    seen: HashMap<u64, u32>,
}

impl PostIds {
    pub(super) fn new(path: &std::path::Path) -> PostIds {
        PostIds {
            path: path.to_path_buf(),
            offset: 0,
            seen: HashMap::new(),
        }
    }

    /// Reads what the log has gained since the last call.
    pub(super) fn read(&mut self) {
        let len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Rolled over: the rest of the old file, then the new one from its start.
            let rolled = self.path.with_extension("lo_");
            self.read_from(&rolled, self.offset);
            self.offset = 0;
        }
        let path = self.path.clone();
        self.offset = self.read_from(&path, self.offset);
    }

    fn read_from(&mut self, path: &std::path::Path, offset: u64) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = std::fs::File::open(path) else {
            return offset;
        };
        if file.seek(SeekFrom::Start(offset)).is_err() {
            return offset;
        }
        let mut text = Vec::new();
        // Bounded: a minute of the drill's load is a few MiB.
        if file.take(256 * 1024 * 1024).read_to_end(&mut text).is_err() {
            return offset;
        }
        // Only whole lines; a line being written is read next time.
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in String::from_utf8_lossy(&text[..whole]).lines() {
            let mut fields = line.split(' ');
            if !fields.any(|f| f == "POST") {
                continue;
            }
            if let Some(id) = line
                .split(' ')
                .find_map(|f| f.strip_prefix("drill="))
                .and_then(|v| v.split('&').next()?.parse::<u64>().ok())
            {
                *self.seen.entry(id).or_default() += 1;
            }
        }
        offset + whole as u64
    }

    /// How many times the log has recorded POST `id`; forgets it.
    pub(super) fn take(&mut self, id: u64) -> u32 {
        self.seen.remove(&id).unwrap_or(0)
    }
}

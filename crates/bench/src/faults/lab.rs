//! The drill's lab: a lab PKI, two gateway instances, two connectors each holding channels to
//! both, the reference management point (its W3C log records every request's id), and a TCP
//! listener that accepts and never answers (the hanging endpoint). Every process is one of
//! this binary, stopped when dropped ([`Proc`]); the faults kill, stop and restart them here.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use connector::config::{ConnectorConfig, EndpointConfig};
use gateway::GatewayConfig;
use logs::logger::ConsoleSetting;

use super::FaultsOptions;
use crate::compare::free_ports;
use crate::compare::procs::Proc;

/// The endpoint id the connectors serve the management point under.
pub(super) const MP_ENDPOINT: u64 = 72057594037927939;
/// The endpoint id pointing at the listener that never answers.
pub(super) const HANG_ENDPOINT: u64 = 72057594037927940;
/// An endpoint a connector's reload adds and removes (its hello changes: channels reopen).
pub(super) const SPARE_ENDPOINT: u64 = 72057594037927941;
/// The connectors' `endpoint_timeout_secs`: the hanging endpoint's 504 comes after it.
pub(super) const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(3);
/// Channels each connector holds to each gateway.
pub(super) const CHANNELS_PER_GATEWAY: usize = 2;
/// The tmpfs under gateway-1's log (the log-disk-full fault).
const LOG_DISK_BYTES: u64 = 4 * 1024 * 1024;

/// One process of the lab, and how to start it again.
pub(super) struct Component {
    pub(super) name: String,
    args: Vec<OsString>,
    logs: Vec<PathBuf>,
    pub(super) proc: Option<Proc>,
    starts: u32,
}

impl Component {
    fn new(name: &str, args: &[&std::ffi::OsStr], logs: Vec<PathBuf>) -> Component {
        Component {
            name: name.to_string(),
            args: args.iter().map(|a| a.to_os_string()).collect(),
            logs,
            proc: None,
            starts: 0,
        }
    }

    pub(super) fn start(&mut self, program: &Path, dir: &Path) -> Result<(), String> {
        if let Some(mut old) = self.proc.take() {
            old.stop();
        }
        self.starts += 1;
        let label = if self.starts == 1 {
            self.name.clone()
        } else {
            format!("{}-start-{}", self.name, self.starts)
        };
        let mut command = Command::new(program);
        command.args(&self.args);
        self.proc = Some(Proc::spawn(&label, command, dir, self.logs.clone())?);
        Ok(())
    }

    /// `kill -9`: no graceful stop.
    pub(super) fn kill(&mut self) {
        if let Some(proc) = &mut self.proc {
            proc.kill();
        }
    }

    pub(super) fn signal(&mut self, signal: rustix::process::Signal) {
        if let Some(proc) = &mut self.proc {
            proc.signal(signal);
        }
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// `Some(why)` when it is not running.
    fn down(&mut self) -> Option<String> {
        match &mut self.proc {
            None => Some(format!("{} is not started", self.name)),
            Some(proc) => proc.exited().map(|why| format!("{why}{}", proc.tail())),
        }
    }

    /// Its standard output and error so far (of its current start).
    pub(super) fn said(&self) -> String {
        self.proc
            .as_ref()
            .and_then(|p| std::fs::read_to_string(&p.output).ok())
            .unwrap_or_default()
    }
}

/// A tmpfs mounted for gateway-1's log; unmounted (lazily) when dropped.
pub(super) struct Disk {
    pub(super) mount: PathBuf,
}

impl Drop for Disk {
    fn drop(&mut self) {
        // Its files go with it: the logs are copied out first (for --keep).
        let kept = self.mount.with_extension("kept");
        if std::fs::create_dir_all(&kept).is_ok() {
            for entry in std::fs::read_dir(&self.mount)
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = entry.file_name();
                if name != "filler" {
                    let _ = std::fs::copy(entry.path(), kept.join(name));
                }
            }
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// A listener that accepts connections and never answers; holds at most 1,024 of them.
struct Hang {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hang {
    fn start() -> Result<Hang, String> {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding a listener: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("binding a listener: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            for stream in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(stream) = stream {
                    held.push_back(stream);
                    if held.len() > 1_024 {
                        held.pop_front();
                    }
                }
            }
        });
        Ok(Hang {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Hang {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub(super) struct DrillLab {
    pub(super) dir: PathBuf,
    program: PathBuf,
    /// The lab PKI.
    pub(super) pki: PathBuf,
    pub(super) gateways: Vec<Component>,
    pub(super) connectors: Vec<Component>,
    pub(super) mp: Component,
    pub(super) gateway_ports: Vec<u16>,
    gateway_admin: Vec<u16>,
    pub(super) gateway_configs: Vec<(GatewayConfig, PathBuf)>,
    pub(super) connector_configs: Vec<(ConnectorConfig, PathBuf)>,
    /// Each gateway's CMTrace log.
    pub(super) gateway_logs: Vec<PathBuf>,
    /// The management point's W3C log: one line per request, with its id.
    pub(super) w3c_log: PathBuf,
    _hang: Hang,
    /// The tmpfs under gateway-1's log, or why there is none. Last: unmounted after every
    /// process is stopped.
    pub(super) disk: Result<Disk, String>,
}

impl DrillLab {
    pub(super) fn start(
        dir: &Path,
        options: &FaultsOptions,
        want_disk: bool,
    ) -> Result<DrillLab, String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let pki = dir.join("lab");
        // One certificate per device, up to 16; more devices share them in turn.
        pki::lab::LabPki::issue(&pki::lab::LabOptions {
            devices: options.devices.min(16),
            ..Default::default()
        })
        .and_then(|lab| lab.write(&pki, false))
        .map_err(|e| format!("making the lab PKI: {e}"))?;
        let hang = Hang::start()?;
        let ports = free_ports(5).map_err(|e| err(&e))?;
        let (gateway_ports, gateway_admin, mp_port) =
            (vec![ports[0], ports[1]], vec![ports[2], ports[3]], ports[4]);

        let disk = if want_disk {
            mount_tmpfs(&dir.join("gateway-1-logs"))
        } else {
            Err("log-disk-full was not asked for".into())
        };
        let mut gateway_configs = Vec::new();
        let mut gateway_logs = Vec::new();
        let mut gateways = Vec::new();
        for (i, (&port, &admin)) in gateway_ports.iter().zip(&gateway_admin).enumerate() {
            let name = format!("gateway-{}", i + 1);
            let logs = dir.join(format!("{name}-logs"));
            std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
            let log = logs.join("SMS_Cloud_ProxyGateway.log");
            let mut config = GatewayConfig::lab();
            config.resolve_paths(&pki);
            config.listen = SocketAddr::from(([127, 0, 0, 1], port));
            config.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], admin)));
            config.worker_threads = Some(1);
            config.log.file = Some(log.clone());
            config.log.console = ConsoleSetting::Off;
            let path = dir.join(format!("{name}.toml"));
            config.write(&path).map_err(|e| err(&e))?;
            gateways.push(Component::new(
                &name,
                &["gateway".as_ref(), "--config".as_ref(), path.as_os_str()],
                vec![log.clone()],
            ));
            gateway_logs.push(log);
            gateway_configs.push((config, path));
        }
        let mut connector_configs = Vec::new();
        let mut connectors = Vec::new();
        for i in 0..2 {
            let name = format!("connector-{}", i + 1);
            let log = dir.join(format!("{name}.log"));
            let mut config = ConnectorConfig::lab(
                format!("drill-{name}"),
                gateway_ports
                    .iter()
                    .map(|p| format!("127.0.0.1:{p}"))
                    .collect(),
                vec![
                    EndpointConfig {
                        id: MP_ENDPOINT,
                        name: "SMS_MP".into(),
                        url: format!("https://localhost:{mp_port}"),
                    },
                    EndpointConfig {
                        id: HANG_ENDPOINT,
                        name: "SMS_MP".into(),
                        url: format!("https://localhost:{}", hang.addr.port()),
                    },
                ],
            );
            config.resolve_paths(&pki);
            // By address, its certificate checked against "localhost": where localhost also
            // resolves to ::1 the name would be an instance nobody serves (connector::instances).
            config.gateway_server_name = Some("localhost".into());
            config.channels_per_gateway = CHANNELS_PER_GATEWAY;
            config.channels_follow_gateway_threads = false;
            config.endpoint_timeout_secs = ENDPOINT_TIMEOUT.as_secs();
            config.worker_threads = Some(1);
            config.log.file = Some(log.clone());
            config.log.console = ConsoleSetting::Off;
            let path = dir.join(format!("{name}.toml"));
            config.write(&path).map_err(|e| err(&e))?;
            connectors.push(Component::new(
                &name,
                &["connector".as_ref(), "--config".as_ref(), path.as_os_str()],
                vec![log],
            ));
            connector_configs.push((config, path));
        }
        let w3c_log = dir.join("mp-logs").join("u_ex.log");
        let mut mp_config = mp::MpConfig::lab();
        mp_config.resolve_paths(&pki);
        mp_config.listen = SocketAddr::from(([127, 0, 0, 1], mp_port));
        mp_config.w3c_log = Some(w3c_log.clone());
        let mp_path = dir.join("mp.toml");
        mp_config.write(&mp_path).map_err(|e| err(&e))?;
        let mp = Component::new(
            "mp",
            &["mp".as_ref(), "--config".as_ref(), mp_path.as_os_str()],
            vec![],
        );
        let mut lab = DrillLab {
            dir: dir.to_path_buf(),
            program: options.program.clone(),
            pki,
            gateways,
            connectors,
            mp,
            gateway_ports,
            gateway_admin,
            gateway_configs,
            connector_configs,
            gateway_logs,
            w3c_log,
            _hang: hang,
            disk,
        };
        lab.start_mp(options.ready_timeout)?;
        for i in 0..2 {
            lab.start_gateway(i, options.ready_timeout)?;
        }
        for i in 0..2 {
            lab.start_connector(i)?;
        }
        Ok(lab)
    }

    /// (Re)starts the management point and waits until it says it listens.
    pub(super) fn start_mp(&mut self, timeout: Duration) -> Result<(), String> {
        self.mp.start(&self.program, &self.dir)?;
        let deadline = Instant::now() + timeout;
        while !self.mp.said().contains("listening on https://") {
            if let Some(why) = self.mp.down() {
                return Err(format!("the management point did not start: {why}"));
            }
            if Instant::now() > deadline {
                return Err("the management point did not say it listens".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// (Re)starts gateway `i` and waits until its admin surface answers.
    pub(super) fn start_gateway(&mut self, i: usize, timeout: Duration) -> Result<(), String> {
        self.gateways[i].start(&self.program, &self.dir)?;
        let deadline = Instant::now() + timeout;
        loop {
            if self.channels(i).is_ok() {
                return Ok(());
            }
            if let Some(why) = self.gateways[i].down() {
                return Err(format!("{} did not start: {why}", self.gateways[i].name));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}'s admin surface did not answer",
                    self.gateways[i].name
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(super) fn start_connector(&mut self, i: usize) -> Result<(), String> {
        self.connectors[i].start(&self.program, &self.dir)
    }

    /// Channels gateway `i` holds now, over its worker threads (its admin `GET /status`).
    pub(super) fn channels(&self, i: usize) -> Result<usize, String> {
        let status = admin(self.gateway_admin[i], "GET", "/status", "")?;
        let json: serde_json::Value =
            serde_json::from_str(&status).map_err(|e| format!("status: {e}"))?;
        Ok(json
            .get("shards")
            .and_then(|s| s.as_array())
            .map(|shards| {
                shards
                    .iter()
                    .filter_map(|s| s.get("channels")?.as_u64())
                    .sum::<u64>() as usize
            })
            .unwrap_or(0))
    }

    /// Channels a whole lab holds at each gateway.
    pub(super) fn whole_channels(&self) -> usize {
        self.connectors.len() * CHANNELS_PER_GATEWAY
    }

    /// Turns gateway `i`'s verbose logging on or off (its admin `PUT /verbose`).
    pub(super) fn set_gateway_verbose(&self, i: usize, on: bool) -> Result<(), String> {
        admin(
            self.gateway_admin[i],
            "PUT",
            "/verbose",
            if on { "on" } else { "off" },
        )
        .map(|_| ())
    }

    /// Waits, bounded, until every process runs and each gateway holds every channel.
    pub(super) fn wait_whole(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            for component in self
                .gateways
                .iter_mut()
                .chain(&mut self.connectors)
                .chain(std::iter::once(&mut self.mp))
            {
                if let Some(why) = component.down() {
                    return Err(why);
                }
            }
            let counts: Vec<Result<usize, String>> =
                (0..self.gateways.len()).map(|i| self.channels(i)).collect();
            if counts
                .iter()
                .all(|c| c.as_ref().is_ok_and(|&n| n == self.whole_channels()))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let last = format!("channels at each gateway: {counts:?}");
                return Err(format!(
                    "not whole within {:.0} s ({last}, {} wanted)",
                    timeout.as_secs_f64(),
                    self.whole_channels()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrites gateway `i`'s configuration file after `change`.
    pub(super) fn rewrite_gateway(
        &mut self,
        i: usize,
        change: impl FnOnce(&mut GatewayConfig),
    ) -> Result<(), String> {
        let (config, path) = &mut self.gateway_configs[i];
        change(config);
        config.write(path).map_err(|e| e.to_string())
    }

    /// Rewrites connector `i`'s configuration file after `change`.
    pub(super) fn rewrite_connector(
        &mut self,
        i: usize,
        change: impl FnOnce(&mut ConnectorConfig),
    ) -> Result<(), String> {
        let (config, path) = &mut self.connector_configs[i];
        change(config);
        config.write(path).map_err(|e| e.to_string())
    }

    /// The gateways' and connectors' processes: (name, pid).
    pub(super) fn watched(&self) -> Vec<(String, Option<u32>)> {
        self.gateways
            .iter()
            .chain(&self.connectors)
            .map(|c| (c.name.clone(), c.pid()))
            .collect()
    }
}

/// Mounts a small tmpfs at `at` (needs root, or a container that allows it).
fn mount_tmpfs(at: &Path) -> Result<Disk, String> {
    std::fs::create_dir_all(at).map_err(|e| format!("{}: {e}", at.display()))?;
    let output = Command::new("mount")
        .args(["-t", "tmpfs", "-o"])
        .arg(format!("size={LOG_DISK_BYTES}"))
        .arg("tmpfs")
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if output.status.success() {
        Ok(Disk {
            mount: at.to_path_buf(),
        })
    } else {
        Err(format!(
            "mount -t tmpfs failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// One call to a component's admin surface on 127.0.0.1 (plain HTTP/1.1, bounded in time):
/// the body of a 2xx answer.
fn admin(port: u16, method: &str, path: &str, body: &str) -> Result<String, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("admin {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(3)));
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("admin {addr}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .take(1024 * 1024)
        .read_to_end(&mut answer)
        .map_err(|e| format!("admin {addr}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("admin {addr}: no answer"))?;
    let ok = head
        .split_whitespace()
        .nth(1)
        .is_some_and(|s| s.starts_with('2'));
    if !ok {
        return Err(format!(
            "admin {addr}: {}",
            head.lines().next().unwrap_or("")
        ));
    }
    Ok(body.to_string())
}

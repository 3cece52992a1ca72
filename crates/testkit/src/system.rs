//! A whole system on loopback: a lab PKI, the reference management point, a gateway and a
//! connector, in one runtime, with their log lines recorded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connector::run::{self as conn, ConnectorConfig, EndpointConfig};
use gateway::{AllowedConnector, GatewayConfig};
use mp::{self, MpConfig};
use pki::lab::layout;
use probe::{self, ProbeOptions, DEFAULT_KEPT_BODY};
use runtime::shards::{ShardThreads, Shards};

pub const ENDPOINT: u64 = 72057594037927939;

pub struct System {
    pub dir: tempfile::TempDir,
    pub runtime: tokio::runtime::Runtime,
    pub mp: Option<mp::RunningMp>,
    pub gateway: Option<gateway::RunningGateway>,
    pub connector: Option<conn::RunningConnector>,
    pub connector_log: Arc<Mutex<Vec<String>>>,
    pub gateway_log: Arc<Mutex<Vec<String>>>,
    /// The gateway's configuration as written at the start (paths relative to the lab), for
    /// reloads.
    gateway_config: GatewayConfig,
    /// The gateway's and the connector's shards, when they run on their own.
    shard_threads: Vec<ShardThreads>,
    /// The gateway's and the connector's admin surfaces, once [`System::admin`] started them.
    admin: Option<[runtime::listener::Listening; 2]>,
}

/// Asserts that a recorded log has a line containing `text` (the whole log shown if not).
pub fn assert_logged(lines: &Arc<Mutex<Vec<String>>>, text: &str) {
    let log = lines.lock().unwrap().join("\n");
    assert!(log.contains(text), "{text:?} not in:\n{log}");
}

pub fn recorder(lines: &Arc<Mutex<Vec<String>>>) -> gateway::Log {
    let lines = lines.clone();
    logs::Logger::new("TEST")
        .with_sink(move |_, line: &str| lines.lock().unwrap().push(line.to_string()))
        .into_log()
}

/// What a [`System`] starts with, set through [`System::builder`]: the usual lab (the
/// connector's store `connector/store`, the lab's channel certificate allowed, the lab root
/// trusted everywhere), changed where a test says so. Configurations are typed values written to
/// the lab's `gateway.toml` and `connector.toml`, as the commands read them.
pub struct SystemBuilder {
    store: String,
    allowed_roots: Vec<PathBuf>,
    gateway: GatewayConfig,
    connector: Box<ConnectorChange>,
    prepare: Box<dyn FnOnce(&Path)>,
    shards: Option<usize>,
    hold_connector: bool,
}

/// A change to the connector's configuration, given the lab directory (to start an endpoint
/// in, say) once the gateway's and the management point's ports are known.
type ConnectorChange = dyn FnOnce(&mut ConnectorConfig, &Path);

impl SystemBuilder {
    /// The connector's client-certificate store, relative to the lab.
    pub fn store(mut self, store: &str) -> Self {
        self.store = store.into();
        self
    }

    /// The one connector the gateway allows (a CN or a thumbprint).
    pub fn allow(mut self, connector: &str) -> Self {
        self.gateway.allowed_connectors = vec![AllowedConnector::Name(connector.into())];
        self
    }

    /// The roots the connector's filter chain allows, relative to the lab.
    pub fn allowed_roots(mut self, roots: &[&str]) -> Self {
        self.allowed_roots = roots.iter().map(PathBuf::from).collect();
        self
    }

    /// Changes the gateway's configuration (its settings from the start).
    pub fn gateway(mut self, change: impl FnOnce(&mut GatewayConfig)) -> Self {
        change(&mut self.gateway);
        self
    }

    /// Changes the connector's configuration before it is written.
    pub fn connector(mut self, change: impl FnOnce(&mut ConnectorConfig, &Path) + 'static) -> Self {
        self.connector = Box::new(change);
        self
    }

    /// Runs on the lab directory after the configuration files are written, before the
    /// connector starts (to issue certificates, say).
    pub fn prepare(mut self, prepare: impl FnOnce(&Path) + 'static) -> Self {
        self.prepare = Box::new(prepare);
        self
    }

    /// The gateway and the connector each on `count` shards of their own (threads, as
    /// `portcullis gateway` and `portcullis connector` run) instead of the test's runtime.
    pub fn shards(mut self, count: usize) -> Self {
        self.shards = Some(count);
        self
    }

    /// Writes the connector's configuration but does not start it: the test starts it with
    /// [`System::start_connector`] (a gateway that starts before its connectors).
    pub fn hold_connector(mut self) -> Self {
        self.hold_connector = true;
        self
    }

    pub fn start(self) -> System {
        System::launch(self)
    }
}

impl System {
    /// The usual system, to be changed before it starts. Its gateway has no startup grace (an
    /// endpoint nobody announced is 404 at once; see `startup_grace_secs`), and waits 20 s for
    /// the connector, which waits 15 s for its endpoints.
    pub fn builder() -> SystemBuilder {
        let mut gateway = GatewayConfig::lab();
        gateway.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        gateway.request_timeout_secs = 20;
        gateway.startup_grace_secs = 0;
        SystemBuilder {
            store: "connector/store".into(),
            allowed_roots: vec![layout::ROOT_CERT.into()],
            gateway,
            connector: Box::new(|_, _| {}),
            prepare: Box::new(|_| {}),
            shards: None,
            hold_connector: false,
        }
    }

    /// Starts all three; `store` is the connector's client-cert store relative to the lab.
    pub fn start(store: &str, allowed_connectors: &str) -> System {
        System::builder()
            .store(store)
            .allow(allowed_connectors)
            .start()
    }

    /// The usual system on `count` shards of their own; see [`SystemBuilder::shards`].
    pub fn start_on_shards(count: usize) -> System {
        System::builder().shards(count).start()
    }

    fn launch(setup: SystemBuilder) -> System {
        let mut shard_threads = Vec::new();
        let mut shards = || match setup.shards {
            Some(count) => {
                let (shards, threads) = Shards::spawn(count).unwrap();
                shard_threads.push(threads);
                Some(shards)
            }
            None => None,
        };
        let gateway_shards = shards();
        let connector_shards = shards();
        let dir = crate::lab::Lab::new().dir;
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let p = |rel: &str| dir.path().join(rel);
        let mut mp_config = MpConfig::lab();
        mp_config.w3c_log = Some("logs/u_ex.log".into());
        // c-ip is the device's, as the connector forwards it.
        mp_config.w3c_client_ip_forwarded = true;
        mp_config.write(&p("mp.toml")).unwrap();
        let mp = runtime
            .block_on(mp::start(MpConfig::load(&p("mp.toml")).unwrap()))
            .unwrap();
        let mut gateway_config = setup.gateway;
        gateway_config.write(&p("gateway.toml")).unwrap();
        let gateway_log = Arc::new(Mutex::new(Vec::new()));
        let gateway = runtime
            .block_on(async {
                let shards = gateway_shards.unwrap_or_else(Shards::current);
                gateway::start_on(
                    GatewayConfig::load(&p("gateway.toml")).unwrap(),
                    recorder(&gateway_log),
                    shards,
                )
                .await
            })
            .unwrap();
        // Reloads write the same settings with the port the gateway got.
        gateway_config.listen = gateway.addr;
        // The gateway by the address it listens on (a name stands for every address it
        // resolves to: where localhost is ::1 too, that would be an instance nobody serves),
        // its certificate checked against "localhost".
        let mut connector_config = ConnectorConfig::lab(
            "lab-connector",
            vec![gateway.addr.to_string()],
            vec![EndpointConfig {
                id: ENDPOINT,
                name: "SMS_MP".into(),
                url: format!("https://localhost:{}", mp.addr.port()),
            }],
        );
        connector_config.client_cert_store = setup.store.into();
        connector_config.gateway_server_name = Some("localhost".into());
        connector_config.allowed_roots = setup.allowed_roots;
        connector_config.verbose = true;
        // Below the gateway's request_timeout_secs, as they should be.
        connector_config.endpoint_timeout_secs = 15;
        (setup.connector)(&mut connector_config, dir.path());
        connector_config.write(&p("connector.toml")).unwrap();
        (setup.prepare)(dir.path());
        let connector_log = Arc::new(Mutex::new(Vec::new()));
        let connector = (!setup.hold_connector).then(|| {
            runtime.block_on(async {
                let shards = connector_shards.unwrap_or_else(Shards::current);
                conn::start_on(
                    ConnectorConfig::load(&p("connector.toml")).unwrap(),
                    recorder(&connector_log),
                    shards,
                )
                .await
                .unwrap()
            })
        });
        System {
            dir,
            runtime,
            mp: Some(mp),
            gateway: Some(gateway),
            connector,
            connector_log,
            gateway_log,
            gateway_config,
            shard_threads,
            admin: None,
        }
    }

    /// The gateway's and the connector's admin surfaces (`GET /metrics`, `/readyz`, `/` ...)
    /// on free loopback ports, as `admin_listen` serves them, reloading from the lab's
    /// `gateway.toml` and `connector.toml`; started on the first call. Their addresses.
    pub fn admin(&mut self) -> [SocketAddr; 2] {
        if self.admin.is_none() {
            let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
            let gateway = self
                .gateway
                .as_ref()
                .expect("the gateway runs")
                .control(self.path("gateway.toml"));
            let connector = self
                .connector
                .as_ref()
                .expect("the connector runs")
                .control(self.path("connector.toml"));
            self.admin = Some(self.runtime.block_on(async {
                [
                    runtime::admin::serve(loopback, Arc::new(gateway))
                        .await
                        .unwrap(),
                    runtime::admin::serve(loopback, Arc::new(connector))
                        .await
                        .unwrap(),
                ]
            }));
        }
        match &self.admin {
            Some([gateway, connector]) => [gateway.addr, connector.addr],
            None => unreachable!("started above"),
        }
    }

    /// Rewrites the gateway's configuration file, its settings from the start changed by
    /// `change`, and reloads the running gateway from it, as SIGHUP does.
    pub fn reload_gateway(
        &self,
        change: impl FnOnce(&mut GatewayConfig),
    ) -> Result<String, String> {
        let mut config = self.gateway_config.clone();
        change(&mut config);
        let file = self.path("gateway.toml");
        config.write(&file).map_err(|e| e.to_string())?;
        self.reload_gateway_from_file()
    }

    /// Reloads the running gateway from its configuration file as it is now (a test may
    /// have written it by hand).
    pub fn reload_gateway_from_file(&self) -> Result<String, String> {
        let config = GatewayConfig::load(&self.path("gateway.toml")).map_err(|e| e.to_string())?;
        self.gateway
            .as_ref()
            .unwrap()
            .reload(&config)
            .map_err(|e| e.to_string())
    }

    /// Changes the connector's configuration file (as written at the start, or since); the
    /// running connector sees it at its next reload or start.
    pub fn edit_connector(&self, change: impl FnOnce(&mut ConnectorConfig)) {
        let file = self.path("connector.toml");
        let mut config = ConnectorConfig::load(&file).unwrap();
        change(&mut config);
        config.write(&file).unwrap();
    }

    /// device-001's TLS client configuration (HTTP/1.1), trusting the lab root.
    /// Starts the connector again from its configuration file (after a test stopped it or
    /// edited the file).
    pub fn start_connector(&mut self) {
        let config = ConnectorConfig::load(&self.path("connector.toml")).unwrap();
        let log = recorder(&self.connector_log);
        self.connector = Some(
            self.runtime
                .block_on(connector::run::start(config, log))
                .unwrap(),
        );
    }

    /// How many of the connector's log lines start with `prefix` (`"Forwarding"`: requests
    /// that reached it).
    pub fn connector_lines_starting(&self, prefix: &str) -> usize {
        self.connector_log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// The gateway's device port.
    pub fn gateway_port(&self) -> u16 {
        self.gateway.as_ref().expect("the gateway runs").addr.port()
    }

    /// The ids of the gateway's channels now, in order: a channel that closed and came back
    /// has a new id.
    pub fn channel_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .gateway
            .as_ref()
            .expect("the gateway runs")
            .registry
            .all()
            .iter()
            .map(|c| c.id)
            .collect();
        ids.sort();
        ids
    }

    pub fn device_tls(&self) -> Arc<rustls::ClientConfig> {
        Arc::new(
            probe::device_tls(
                &[self.path("ca/root.crt")],
                Some(&self.path("devices/device-001.crt")),
                Some(&self.path("devices/device-001.key")),
                false,
            )
            .unwrap(),
        )
    }

    /// The lab's root CA, to issue more certificates with.
    pub fn lab_root(&self) -> pki::lab::LabCa {
        pki::lab::LabCa::from_pem(
            &std::fs::read_to_string(self.path("ca/root.crt")).unwrap(),
            &std::fs::read_to_string(self.path("ca/root.key")).unwrap(),
        )
        .unwrap()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn base(&self) -> String {
        format!(
            "https://localhost:{}",
            self.gateway.as_ref().unwrap().addr.port()
        )
    }

    /// Waits (bounded) until the gateway holds `n` channels.
    pub fn wait_for_channels(&self, n: usize) -> bool {
        self.wait_for_channels_within(n, Duration::from_secs(10))
    }

    pub fn wait_for_channels_within(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.gateway.as_ref().unwrap().registry.channel_count() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn probe(&self, path: &str, device: Option<&str>) -> probe::ProbeReport {
        self.probe_with(path, device, None)
    }

    /// A request with a device certificate (`devices/<device>.crt`) and/or a bearer token.
    pub fn probe_with(
        &self,
        path: &str,
        device: Option<&str>,
        token: Option<&str>,
    ) -> probe::ProbeReport {
        let options = ProbeOptions {
            url: format!("{}{path}", self.base()),
            ca: vec![self.path("ca/root.crt")],
            cert: device.map(|d| self.path(&format!("devices/{d}.crt"))),
            key: device.map(|d| self.path(&format!("devices/{d}.key"))),
            token: token.map(str::to_string),
            timeout: Duration::from_secs(20),
            http2: false,
            keep_body: DEFAULT_KEPT_BODY,
        };
        self.runtime.block_on(probe::probe(&options)).unwrap()
    }

    pub fn stop(mut self) {
        self.runtime.block_on(async {
            for admin in self.admin.take().into_iter().flatten() {
                admin.stop().await;
            }
            if let Some(c) = self.connector.take() {
                c.stop().await;
            }
            if let Some(g) = self.gateway.take() {
                g.stop().await;
            }
            if let Some(m) = self.mp.take() {
                m.stop().await;
            }
        });
        // The shards' threads end (and are waited for) as they are dropped.
        self.shard_threads.clear();
    }
}

/// `GET path` over HTTP/1.1 on loopback `addr` (an admin surface), with `Host: 127.0.0.1`:
/// the status and the body (chunks joined). Bounded: 10 s for the whole answer.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{addr}: {e}"));
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
        addr.port()
    )
    .unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer)
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
    let answer = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    if !chunked {
        return (status, body.to_string());
    }
    // Chunks: a hex size line, the data, CR LF; a size of 0 ends them.
    let (mut rest, mut whole) = (body, String::new());
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("a bad chunk size in {body:?}"));
        if size == 0 || after.len() < size {
            break;
        }
        whole.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    (status, whole)
}

pub fn curl(system: &System, path: &str, extra: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(system.path("ca/root.crt"))
        .arg("--cert")
        .arg(system.path("devices/device-001.crt"))
        .arg("--key")
        .arg(system.path("devices/device-001.key"))
        .args(extra)
        .arg(format!("{}{path}", system.base()))
        .output()
        .expect("curl must be installed (apt-get install curl)")
}

//! A whole system on loopback: a lab PKI, the reference management point, a gateway and a
//! connector, in one runtime, with their log lines recorded.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connector::run::{self as conn, ConnectorConfig};
use gateway::GatewayConfig;
use mp::{self, MpConfig};
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
    /// The gateway's configuration without `listen`, for reloads.
    gateway_toml: String,
    /// The gateway's and the connector's shards, when they run on their own.
    shard_threads: Vec<ShardThreads>,
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

/// Puts `extra` into the connector's configuration (before its endpoint table).
pub fn connector_keys(dir: &std::path::Path, extra: &str) {
    let file = dir.join("connector.toml");
    let toml = std::fs::read_to_string(&file).unwrap();
    let toml = toml.replacen("verbose = true\n", &format!("verbose = true\n{extra}"), 1);
    std::fs::write(&file, toml).unwrap();
}

impl System {
    /// Starts all three; `store` is the connector's client-cert store relative to the lab.
    pub fn start(store: &str, allowed_connectors: &str) -> System {
        System::start_with(store, allowed_connectors, "\"ca/root.crt\"", |_| {})
    }

    /// `prepare` runs on the lab directory before the connector starts; `allowed_roots` is the
    /// connector's TOML list of allowed root CA files.
    pub fn start_with(
        store: &str,
        allowed_connectors: &str,
        allowed_roots: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> System {
        System::launch(store, allowed_connectors, allowed_roots, prepare, None, "")
    }

    /// The usual system, with the gateway and the connector each on `count` shards of their
    /// own (threads, as `portcullis gateway` and `portcullis connector` run) instead of the
    /// test's runtime.
    pub fn start_on_shards(count: usize) -> System {
        System::start_on_shards_with(count, |_| {})
    }

    /// [`System::start_on_shards`], with `prepare` run on the lab directory before the
    /// connector starts (to edit `connector.toml`, say).
    pub fn start_on_shards_with(count: usize, prepare: impl FnOnce(&std::path::Path)) -> System {
        System::launch(
            "connector/store",
            "Portcullis Connector Channel",
            "\"ca/root.crt\"",
            prepare,
            Some(count),
            "",
        )
    }

    /// The usual system, with `gateway_extra` TOML after the gateway's usual keys from its
    /// start (for settings a reload does not change), and `prepare` run on the lab directory
    /// before the connector starts.
    pub fn start_with_gateway(
        gateway_extra: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> System {
        System::launch(
            "connector/store",
            "Portcullis Connector Channel",
            "\"ca/root.crt\"",
            prepare,
            None,
            gateway_extra,
        )
    }

    fn launch(
        store: &str,
        allowed_connectors: &str,
        allowed_roots: &str,
        prepare: impl FnOnce(&std::path::Path),
        shard_count: Option<usize>,
        gateway_extra: &str,
    ) -> System {
        let mut shard_threads = Vec::new();
        let mut shards = || match shard_count {
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
        std::fs::write(
            p("mp.toml"),
            "listen = \"127.0.0.1:0\"\ncert = \"mp/server.crt\"\nkey = \"mp/server.key\"\ntrusted_roots = [\"ca/root.crt\"]\nw3c_log = \"logs/u_ex.log\"\n",
        )
        .unwrap();
        let mp = runtime
            .block_on(mp::start(MpConfig::load(&p("mp.toml")).unwrap()))
            .unwrap();
        let gateway_toml = format!("cert = \"gateway/server.crt\"\nkey = \"gateway/server.key\"\ntrusted_roots = [\"ca/root.crt\"]\nconnector_roots = [\"ca/connector-roots.crt\"]\nallowed_connectors = [\"{allowed_connectors}\"]\nrequest_timeout_secs = 20\n{gateway_extra}");
        std::fs::write(
            p("gateway.toml"),
            format!("listen = \"127.0.0.1:0\"\n{gateway_toml}"),
        )
        .unwrap();
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
        std::fs::write(
            p("connector.toml"),
            format!(
                "connector_id = \"lab-connector\"\ngateways = [\"localhost:{}\"]\ngateway_roots = [\"ca/root.crt\"]\nchannel_cert = \"connector/channel.crt\"\nchannel_key = \"connector/channel.key\"\nclient_cert_store = \"{store}\"\nallowed_roots = [{allowed_roots}]\nendpoint_roots = [\"ca/root.crt\"]\nverbose = true\n\n[[endpoints]]\nid = {ENDPOINT}\nname = \"SMS_MP\"\nurl = \"https://localhost:{}\"\n",
                gateway.addr.port(),
                mp.addr.port()
            ),
        )
        .unwrap();
        prepare(dir.path());
        let connector_log = Arc::new(Mutex::new(Vec::new()));
        let connector = runtime
            .block_on(async {
                let shards = connector_shards.unwrap_or_else(Shards::current);
                conn::start_on(
                    ConnectorConfig::load(&p("connector.toml")).unwrap(),
                    recorder(&connector_log),
                    shards,
                )
                .await
            })
            .unwrap();
        System {
            dir,
            runtime,
            mp: Some(mp),
            gateway: Some(gateway),
            connector: Some(connector),
            connector_log,
            gateway_log,
            gateway_toml,
            shard_threads,
        }
    }

    /// Rewrites the gateway's configuration with `extra` TOML after its usual keys and
    /// reloads the running gateway from it, as SIGHUP does.
    pub fn reload_gateway(&self, extra: &str) -> Result<String, String> {
        self.reload_gateway_replacing(("", ""), extra)
    }

    /// [`System::reload_gateway`], with `from` replaced by `to` in the usual keys first.
    pub fn reload_gateway_replacing(
        &self,
        (from, to): (&str, &str),
        extra: &str,
    ) -> Result<String, String> {
        let port = self.gateway.as_ref().unwrap().addr.port();
        let file = self.path("gateway.toml");
        let usual = if from.is_empty() {
            self.gateway_toml.clone()
        } else {
            self.gateway_toml.replace(from, to)
        };
        std::fs::write(
            &file,
            format!("listen = \"127.0.0.1:{port}\"\n{usual}{extra}"),
        )
        .unwrap();
        let config = GatewayConfig::load(&file).map_err(|e| e.to_string())?;
        self.gateway
            .as_ref()
            .unwrap()
            .reload(&config)
            .map_err(|e| e.to_string())
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

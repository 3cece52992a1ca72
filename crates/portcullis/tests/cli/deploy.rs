//! deploy/kubernetes: the configurations in its ConfigMaps are ones portcullis loads, their
//! paths are where the Deployments mount the Secrets, and, run as processes with the lab PKI's
//! files laid out as the Secrets put them, they make a working system whose probes answer on
//! `metrics_listen` (the port the probes and the Prometheus annotations name) and which stops
//! within the pods' grace period.
//! (The manifests' schema is checked by scripts/deploy-check.sh with kubernetes-validate.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use connector::run::ConnectorConfig;
use gateway::GatewayConfig;

use crate::common::{p, portcullis, text, Child};
use crate::support::{admin_call, free_port, spawn_mp, spawn_until};

fn manifest(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/kubernetes")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The text of the block scalar `key: |` (a ConfigMap's data entry) in a manifest.
fn block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let head = lines
        .next()
        .unwrap_or_else(|| panic!("no `{key}: |` in the manifest"));
    let indent = head.len() - head.trim_start().len() + 2;
    let mut text = String::new();
    for line in lines {
        if !line.trim().is_empty() && line.len() - line.trim_start().len() < indent {
            break;
        }
        text.push_str(line.get(indent..).unwrap_or(""));
        text.push('\n');
    }
    text
}

/// The `mountPath`s of a manifest's containers (not its init and sidecar containers').
fn mount_paths(yaml: &str) -> Vec<String> {
    yaml.lines()
        .skip_while(|l| l.trim() != "containers:")
        .filter_map(|l| {
            l.trim()
                .strip_prefix("- mountPath: ")
                .or(l.trim().strip_prefix("mountPath: "))
        })
        .map(str::to_string)
        .collect()
}

fn assert_mounted(path: &Path, mounts: &[String], what: &str) {
    assert!(
        mounts.iter().any(|m| path.starts_with(m)),
        "{what} {} is under none of the container's mounts {mounts:?}",
        path.display()
    );
}

/// The port the probes (httpGet) and the Prometheus annotation of a manifest name: one, and
/// the one `metrics_listen` takes on every address of the pod.
fn probed_port(yaml: &str, metrics_listen: Option<SocketAddr>) -> u16 {
    let metrics = metrics_listen.expect("metrics_listen: the probes and the scrape reach it");
    assert!(
        metrics.ip().is_unspecified(),
        "metrics_listen {metrics}: the kubelet and Prometheus come to the pod's address"
    );
    // Each `httpGet:` block's `port:` (within its path and port lines).
    let lines: Vec<&str> = yaml.lines().map(str::trim).collect();
    let ports: Vec<u16> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| **l == "httpGet:")
        .filter_map(|(at, _)| {
            lines[at + 1..]
                .iter()
                .take(2)
                .find_map(|l| l.strip_prefix("port: "))
        })
        .map(|port| port.parse().expect("a probe's port is a number"))
        .collect();
    assert!(!ports.is_empty(), "no httpGet probe");
    assert!(
        ports.iter().all(|&port| port == metrics.port()),
        "probes on {ports:?}, metrics_listen {metrics}"
    );
    assert!(yaml.contains(&format!("prometheus.io/port: \"{}\"", metrics.port())));
    assert!(yaml.contains(&format!("containerPort: {}", metrics.port())));
    assert!(!yaml.contains("initContainers"), "no sidecar is needed");
    metrics.port()
}

#[test]
fn the_configmaps_are_configurations_portcullis_loads_with_the_mounted_paths() {
    let yaml = manifest("gateway.yaml");
    let gateway = GatewayConfig::parse(
        &block(&yaml, "gateway.toml"),
        Path::new("/etc/portcullis/config/gateway.toml"),
    )
    .unwrap_or_else(|e| panic!("deploy/kubernetes/gateway.yaml: {e}"));
    let mounts = mount_paths(&yaml);
    for (what, path) in [("cert", &gateway.cert), ("key", &gateway.key)]
        .into_iter()
        .chain(gateway.trusted_roots.iter().map(|r| ("trusted_roots", r)))
        .chain(
            gateway
                .connector_roots
                .iter()
                .map(|r| ("connector_roots", r)),
        )
        .chain(gateway.log.file.iter().map(|f| ("[log] file", f)))
    {
        assert_mounted(path, &mounts, what);
    }
    // The containerPorts the Services target, and the probes' and the scrape's.
    assert!(yaml.contains(&format!("containerPort: {}", gateway.listen.port())));
    let channels = gateway.channel_listen.expect("channel_listen").port();
    assert!(yaml.contains(&format!("containerPort: {channels}")));
    probed_port(&yaml, gateway.metrics_listen);
    // The load balancer's PROXY protocol, taken from the listed range only.
    let proxy = gateway.proxy_protocol.expect("[proxy_protocol]");
    assert!(!proxy.proxies.is_empty(), "{proxy:?}");

    let yaml = manifest("connector.yaml");
    let connector = ConnectorConfig::parse(
        &block(&yaml, "connector.toml"),
        Path::new("/etc/portcullis/config/connector.toml"),
    )
    .unwrap_or_else(|e| panic!("deploy/kubernetes/connector.yaml: {e}"));
    let mounts = mount_paths(&yaml);
    for (what, path) in [
        ("channel_cert", &connector.channel_cert),
        ("channel_key", &connector.channel_key),
        ("client_cert_store", &connector.client_cert_store),
    ]
    .into_iter()
    .chain(connector.gateway_roots.iter().map(|r| ("gateway_roots", r)))
    .chain(connector.allowed_roots.iter().map(|r| ("allowed_roots", r)))
    .chain(
        connector
            .endpoint_roots
            .iter()
            .map(|r| ("endpoint_roots", r)),
    )
    .chain(connector.log.file.iter().map(|f| ("[log] file", f)))
    {
        assert_mounted(path, &mounts, what);
    }
    probed_port(&yaml, connector.metrics_listen);
    // The connectors dial the headless Service's port.
    assert_eq!(
        connector.gateways,
        [format!("{CHANNELS_NAME}:{channels}")],
        "the connector's gateways"
    );
}

/// The headless Service's name, which the gateway's server certificate must carry.
const CHANNELS_NAME: &str = "portcullis-gateway-channels.portcullis.svc.cluster.local";

/// What the Secrets hold (README.md, "Deploy": the `kubectl create secret` lines), from the
/// lab PKI's files: (mount directory, file name, lab file).
const SECRETS: &[(&str, &str, &str)] = &[
    ("tls", "server.crt", "gateway/server.crt"),
    ("tls", "server.key", "gateway/server.key"),
    ("ca", "root.crt", "ca/root.crt"),
    ("ca", "connector-roots.crt", "ca/connector-roots.crt"),
    ("channel", "channel.crt", "connector/channel.crt"),
    ("channel", "channel.key", "connector/channel.key"),
    (
        "store",
        "client-auth.crt",
        "connector/store/client-auth.crt",
    ),
    (
        "store",
        "client-auth.key",
        "connector/store/client-auth.key",
    ),
];

/// A pod's paths under `root`, its ports on loopback: the configuration's text rewritten.
fn in_root(text: &str, root: &Path, ports: &[(&str, String)]) -> String {
    let mut text = text
        .replace(
            "/etc/portcullis/",
            &format!("{}/etc/portcullis/", root.display()),
        )
        .replace(
            "/var/log/portcullis/",
            &format!("{}/var/log/portcullis/", root.display()),
        );
    for (from, to) in ports {
        assert!(text.contains(from), "{from} not in {text}");
        text = text.replace(from, to);
    }
    text
}

/// GET on a metrics_listen until it answers `code` (at most 30 s); the last answer.
fn wait_for(url: &str, code: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (body, got) = admin_call("GET", url, None);
        if got == code || Instant::now() > deadline {
            return (body, got);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGTERM, then how the process ended (None: still running after `limit`).
fn stop_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let pid = libc::pid_t::try_from(child.0.id()).expect("a pid fits pid_t");
    // SAFETY: signals a child process this test started and still holds.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0, "SIGTERM to {pid}");
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.0.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The value of `key: N` in a manifest (the first one).
fn seconds(yaml: &str, key: &str) -> u64 {
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the manifest"))
}

#[test]
fn the_manifests_configurations_serve_a_device_and_answer_their_probes_on_metrics_listen() {
    let tmp = tempfile::tempdir().unwrap();
    // `pki init` as README.md's "Deploy" runs it: the channels' name in the server certificate.
    let lab = tmp.path().join("site");
    let out = portcullis(&[
        "pki",
        "init",
        "--out",
        p(&lab),
        "--hosts",
        &format!("localhost,127.0.0.1,{CHANNELS_NAME}"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let root = tmp.path().join("pod");
    for (dir, name, from) in SECRETS {
        let made = format!("--from-file={name}=site/{from}");
        assert!(
            readme.contains(&made),
            "README.md's Deploy section makes no secret with {made}"
        );
        let dir = root.join("etc/portcullis").join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(lab.join(from), dir.join(name)).unwrap();
    }
    std::fs::create_dir_all(root.join("var/log/portcullis")).unwrap();
    std::fs::create_dir_all(root.join("etc/portcullis/config")).unwrap();
    let (_mp, mp_port) = spawn_mp(&lab);

    let (devices, channels, gateway_admin, connector_admin) =
        (free_port(), free_port(), free_port(), free_port());
    let (gateway_metrics, connector_metrics) = (free_port(), free_port());
    let (admin, metrics) = ("127.0.0.1:9441", "0.0.0.0:9100");
    let gateway_yaml = manifest("gateway.yaml");
    let gateway_toml = root.join("etc/portcullis/config/gateway.toml");
    std::fs::write(
        &gateway_toml,
        in_root(
            &block(&gateway_yaml, "gateway.toml"),
            &root,
            &[
                ("0.0.0.0:8443", format!("127.0.0.1:{devices}")),
                ("0.0.0.0:9443", format!("127.0.0.1:{channels}")),
                (admin, format!("127.0.0.1:{gateway_admin}")),
                (metrics, format!("127.0.0.1:{gateway_metrics}")),
            ],
        ),
    )
    .unwrap();
    let connector_yaml = manifest("connector.yaml");
    let connector_toml = root.join("etc/portcullis/config/connector.toml");
    std::fs::write(
        &connector_toml,
        in_root(
            &block(&connector_yaml, "connector.toml"),
            &root,
            &[
                // The headless Service's name is not in this machine's DNS: its address, and
                // the name the certificate is checked against.
                (
                    &format!("gateways = [\"{CHANNELS_NAME}:9443\"]"),
                    format!("gateways = [\"127.0.0.1:{channels}\"]\ngateway_server_name = \"{CHANNELS_NAME}\""),
                ),
                (admin, format!("127.0.0.1:{connector_admin}")),
                (metrics, format!("127.0.0.1:{connector_metrics}")),
                ("https://internalmp.contoso.com", format!("https://localhost:{mp_port}")),
            ],
        ),
    )
    .unwrap();

    let (mut gateway, started) = spawn_until(
        &["gateway", "--config", p(&gateway_toml)],
        "Admin surface on",
    );
    assert!(
        !started.is_empty(),
        "the gateway did not start: its error is above"
    );
    let gateway_url = |path: &str| format!("http://127.0.0.1:{gateway_metrics}{path}");

    // Alive, and not ready before a connector's channel serves ready_endpoints: the load
    // balancer sends it no device yet.
    let (body, code) = wait_for(&gateway_url("/healthz"), "200");
    assert_eq!(code, "200", "liveness on metrics_listen: {body}");
    let (body, code) = admin_call("GET", &gateway_url("/readyz"), None);
    assert_eq!(code, "503", "readiness with no connector: {body}");
    // Only the probes' and the scrape's paths answer there, and only to read.
    let (body, code) = admin_call("GET", &gateway_url("/status"), None);
    assert_eq!(code, "404", "{body}");
    let (body, code) = admin_call("POST", &gateway_url("/reload"), None);
    assert_eq!(code, "404", "{body}");
    let (body, code) = admin_call("POST", &gateway_url("/readyz"), None);
    assert_eq!(code, "405", "{body}");

    let (mut connector, started) = spawn_until(
        &["connector", "--config", p(&connector_toml)],
        "Admin surface on",
    );
    assert!(
        !started.is_empty(),
        "the connector did not start: its error is above"
    );
    let (body, code) = wait_for(&gateway_url("/readyz"), "200");
    assert_eq!(
        code, "200",
        "the gateway's readiness once the connector holds its channels: {body}"
    );
    let (body, code) = wait_for(
        &format!("http://127.0.0.1:{connector_metrics}/readyz"),
        "200",
    );
    assert_eq!(code, "200", "the connector's readiness: {body}");
    let (body, code) = admin_call("GET", &gateway_url("/metrics"), None);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("portcullis_gateway_channels"), "{body}");
    let (body, code) = admin_call(
        "GET",
        &format!("http://127.0.0.1:{connector_metrics}/metrics"),
        None,
    );
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("portcullis_connector_channels"), "{body}");

    // A device's request, end to end, by the configurations of the manifests.
    let out = portcullis(&[
        "probe",
        &format!("https://localhost:{devices}/CCM_PROXY_MUTUALAUTH/72057594037927939/SMS_MP/.sms_aut?MPLIST"),
        "--cert",
        p(&lab.join("devices/device-001.crt")),
        "--key",
        p(&lab.join("devices/device-001.key")),
        "--ca",
        p(&lab.join("ca/root.crt")),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    for log in ["SMS_Cloud_ProxyGateway.log", "SMS_Cloud_ProxyConnector.log"] {
        let path: PathBuf = root.join("var/log/portcullis").join(log);
        assert!(
            path.exists(),
            "{} is written where the logs volume is mounted",
            path.display()
        );
    }

    // SIGTERM ends each well within its pod's grace period (after the gateway's preStop).
    let grace =
        seconds(&gateway_yaml, "terminationGracePeriodSeconds") - seconds(&gateway_yaml, "seconds");
    let status = stop_within(
        &mut connector,
        Duration::from_secs(seconds(&connector_yaml, "terminationGracePeriodSeconds")),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the connector after SIGTERM: {status:?}"
    );
    let status = stop_within(&mut gateway, Duration::from_secs(grace));
    assert!(
        status.is_some_and(|s| s.success()),
        "the gateway after SIGTERM: {status:?}"
    );
}

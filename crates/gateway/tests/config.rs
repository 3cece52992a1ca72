//! The gateway's configuration file: what the typed builder writes loads back as it was built,
//! its defaults are the file's, and bad configurations are refused at load, naming the file and
//! the key.

use std::path::Path;

use gateway::token;
use gateway::{AllowedConnector, BoundConnector, GatewayConfig};
use logs::logger::ConsoleSetting;
use pki::crl::CrlPolicy;
use pki::tls::TlsVersion;
use runtime::config;

#[test]
fn gateway_configuration_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    let ok = "cert = \"g.crt\"\nkey = \"g.key\"\ntrusted_roots = [\"r.crt\"]\nconnector_roots = [\"c.crt\"]\nallowed_connectors = [\"Portcullis Connector Channel\"]\n";
    std::fs::write(&file, ok).unwrap();
    let cfg = GatewayConfig::load(&file).expect("the baseline loads");
    assert_eq!(cfg.listen.port(), 443, "443 by default");
    assert_eq!(cfg.worker_threads, None, "one per CPU by default");
    assert_eq!(
        (cfg.max_request_header_bytes, cfg.max_response_header_bytes),
        (32 * 1024, 64 * 1024)
    );
    // Above the connectors' 30 s longest redial backoff; a refused body's drain bounds.
    assert_eq!(cfg.startup_grace_secs, 35);
    assert_eq!(
        (
            cfg.refused_body_drain_bytes,
            cfg.refused_body_drain_timeout_secs
        ),
        (1024 * 1024, 5)
    );
    std::fs::write(&file, format!("{ok}worker_threads = 1\n")).unwrap();
    assert_eq!(GatewayConfig::load(&file).unwrap().worker_threads, Some(1));
    let cases = [
        (
            ok.replace("[\"Portcullis Connector Channel\"]", "[]"),
            "key `allowed_connectors`",
        ),
        (
            ok.replace("trusted_roots = [\"r.crt\"]", "trusted_roots = []"),
            "key `trusted_roots`",
        ),
        (
            format!("{ok}request_timeout_secs = 0\n"),
            "key `request_timeout_secs`",
        ),
        (format!("{ok}listen = \"everywhere\"\n"), "listen"),
        (
            format!("{ok}worker_threads = 5000\n"),
            "key `worker_threads`: 5000 is not a thread count",
        ),
        (format!("{ok}worker_threads = -1\n"), "worker_threads"),
        (
            format!("{ok}max_request_header_bytes = 100\n"),
            "key `max_request_header_bytes`: must be between 4096 and 1048576",
        ),
        (
            format!("{ok}max_response_header_bytes = 2000000\n"),
            "key `max_response_header_bytes`: must be between 4096 and 1048576",
        ),
        (
            format!("{ok}startup_grace_secs = 3601\n"),
            "key `startup_grace_secs`: must be between 0 (none) and 3600",
        ),
        (
            format!("{ok}refused_body_drain_bytes = 2000000000\n"),
            "key `refused_body_drain_bytes`: must be between 0",
        ),
        (
            format!("{ok}[proxy_protocol]\nproxies = []\n"),
            "key `proxy_protocol.proxies`: list the load balancers' addresses",
        ),
        (
            format!("{ok}[proxy_protocol]\nproxies = [\"10.0.0.0/33\"]\n"),
            "key `proxy_protocol.proxies`: \"10.0.0.0/33\" is not an address or range",
        ),
        (
            format!("{ok}[proxy_protocol]\nversion = \"v3\"\nproxies = [\"10.0.0.1\"]\n"),
            "unknown variant `v3`, expected one of `v1`, `v2`, `any`",
        ),
        (
            format!("{ok}[proxy_protocol]\nproxies = [\"10.0.0.1\"]\nheader_timeout_secs = 0\n"),
            "key `proxy_protocol.header_timeout_secs`: must be between 1 and 60",
        ),
        (
            format!("{ok}[proxy_protocol]\nproxies = [\"10.0.0.1\"]\nmax_header_bytes = 64\n"),
            "key `proxy_protocol.max_header_bytes`: must be between 107",
        ),
        (
            format!("{ok}refused_body_drain_timeout_secs = 0\n"),
            "key `refused_body_drain_timeout_secs`: must be between 1 and 300",
        ),
    ];
    for (text, needle) in cases {
        std::fs::write(&file, &text).unwrap();
        let err = GatewayConfig::load(&file).unwrap_err().to_string();
        assert!(err.starts_with(&file.display().to_string()), "{err}");
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}

#[test]
fn a_written_configuration_loads_as_it_was_built() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = GatewayConfig::lab();
    config.listen = "127.0.0.1:8443".parse().unwrap();
    config.channel_listen = Some("127.0.0.1:8444".parse().unwrap());
    config.cert = "other/server.crt".into();
    config.key = "/etc/portcullis/server.key".into();
    config.trusted_roots.push("ca/second-root.crt".into());
    config
        .connector_roots
        .push("/etc/portcullis/connectors.crt".into());
    config
        .allowed_connectors
        .push(AllowedConnector::Bound(BoundConnector {
            name: "Branch Connector".into(),
            endpoints: vec![3456, 72057594037927939],
        }));
    config.request_timeout_secs = 30;
    config.verbose = true;
    config.log.file = Some("logs/SMS_Cloud_ProxyGateway.log".into());
    config.log.max_size_kib = 2048;
    config.log.console = ConsoleSetting::Off;
    config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    config.ready_endpoints = vec![3456];
    let mut probe = gateway::ProbeSettings::new(
        "probe/device.crt".into(),
        "probe/device.key".into(),
        vec!["ca/root.crt".into()],
    );
    probe.url = Some("https://cmg.contoso.com".into());
    probe.endpoints = vec![3456];
    probe.interval_secs = 30;
    config.probe = Some(probe);
    config.worker_threads = Some(3);
    config.verify_client_revocation = true;
    config.crls = vec!["ca/root.crl".into()];
    config.crl_policy = CrlPolicy::AllowAndWarn;
    let mut tokens = token::TokenSettings::new(vec!["site/token.pub".into()]);
    tokens.revoked = Some("site/revoked.txt".into());
    tokens.leeway_secs = 5;
    config.tokens = Some(tokens);
    config.tls.min_version = TlsVersion::Tls13;
    config.tls.cipher_suites = vec!["TLS13_AES_256_GCM_SHA384".into()];
    config.client_cert_header = Some("X-ARR-ClientCert".into());
    config.handshake_timeout_secs = 5;
    config.first_request_timeout_secs = 86_400;
    config.idle_timeout_secs = 600;
    config.http2_keepalive_secs = 0;
    config.max_connections = 100;
    config.max_connections_per_address = 10;
    config.reserved_for_channels = 8;
    config.max_request_header_bytes = 16 * 1024;
    config.max_response_header_bytes = 128 * 1024;
    config.max_streams_per_device = 4;
    config.max_queued_requests = 0;
    config.device_idle_timeout_secs = 5;
    config.connector_idle_timeout_secs = 7;
    config.startup_grace_secs = 0;
    config.refused_body_drain_bytes = 64 * 1024;
    config.refused_body_drain_timeout_secs = 2;
    config.channel_unresponsive_after_ms = 400;
    config.channel_keepalive_timeout_secs = 3;
    let mut proxy = gateway::ProxyProtocol::new(
        gateway::ProxyVersion::Any,
        vec!["10.0.0.0/8".into(), "fd00::1".into()],
    );
    proxy.header_timeout_secs = 2;
    proxy.max_header_bytes = 4096;
    config.proxy_protocol = Some(proxy);
    let unchanged = config::keys_with_equal_values(&config, &GatewayConfig::lab());
    assert!(
        unchanged.is_empty(),
        "set these keys too, so that the round trip covers them: {unchanged:?}"
    );

    let path = dir.path().join("gateway.toml");
    config.write(&path).unwrap();
    let loaded = GatewayConfig::load(&path).unwrap();
    config.resolve_paths(dir.path());
    assert_eq!(loaded, config);
    assert!(loaded.log.file.as_ref().unwrap().starts_with(dir.path()));
    assert_eq!(loaded.key, Path::new("/etc/portcullis/server.key"));
}

#[test]
fn the_lab_gateway_writes_only_what_it_sets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    GatewayConfig::lab().write(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    // Options left out are not written (TOML has no null), enums in the file's spelling.
    assert!(
        !text.contains("tokens") && !text.contains("admin_listen"),
        "{text}"
    );
    // Keys added since, left at their defaults, are not written: a lab file still loads in
    // an earlier build (bench compare --baseline runs one on it).
    assert!(
        !text.contains("ready_endpoints") && !text.contains("probe"),
        "{text}"
    );
    assert!(text.contains("crl_policy = \"refuse\""), "{text}");
    assert!(text.contains("min_version = \"1.2\""), "{text}");
    assert!(
        text.contains("allowed_connectors = [\"Portcullis Connector Channel\"]"),
        "{text}"
    );
    let mut expected = GatewayConfig::lab();
    expected.resolve_paths(dir.path());
    assert_eq!(GatewayConfig::load(&path).unwrap(), expected);
}

#[test]
fn new_has_the_defaults_of_a_file_with_only_the_required_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "cert = \"server.crt\"\nkey = \"server.key\"\ntrusted_roots = [\"root.crt\"]\n\
         connector_roots = [\"connectors.crt\"]\nallowed_connectors = [\"Branch\"]\n\
         \n[tokens]\nkeys = [\"token.pub\"]\n\n[proxy_protocol]\nproxies = [\"10.0.0.5\"]\n",
    )
    .unwrap();
    let mut built = GatewayConfig::new(
        "server.crt".into(),
        "server.key".into(),
        vec!["root.crt".into()],
        vec!["connectors.crt".into()],
        vec![AllowedConnector::Name("Branch".into())],
    );
    built.tokens = Some(token::TokenSettings::new(vec!["token.pub".into()]));
    built.proxy_protocol = Some(gateway::ProxyProtocol::new(
        gateway::ProxyVersion::V2,
        vec!["10.0.0.5".into()],
    ));
    built.resolve_paths(dir.path());
    assert_eq!(GatewayConfig::load(&path).unwrap(), built);
}

/// `[probe]` presents a device certificate (`device_cert` and `device_key`) or a token
/// (`token` or `token_command`): one of them, named when both or neither are given.
#[test]
fn probe_credentials_are_a_certificate_or_a_token_never_both_nor_neither() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    let ok = "cert = \"g.crt\"\nkey = \"g.key\"\ntrusted_roots = [\"r.crt\"]\nconnector_roots = [\"c.crt\"]\nallowed_connectors = [\"Portcullis Connector Channel\"]\n[probe]\nca = [\"r.crt\"]\n";
    let cert = "device_cert = \"d.crt\"\ndevice_key = \"d.key\"\n";
    let load = |probe: &str| {
        std::fs::write(&file, format!("{ok}{probe}")).unwrap();
        GatewayConfig::load(&file)
    };
    let probe = load(cert).unwrap().probe.unwrap();
    assert_eq!(probe.device_cert, Some(dir.path().join("d.crt")));
    let probe = load("token = \"a.b.c\"\n").unwrap().probe.unwrap();
    assert_eq!(probe.token.as_deref(), Some("a.b.c"));
    assert_eq!(probe.device_cert, None);
    let probe = load("token_command = \"vault read -field=token x\"\n")
        .unwrap()
        .probe
        .unwrap();
    assert_eq!(
        probe.token_command.as_deref(),
        Some("vault read -field=token x")
    );
    // The token never shows in the settings' Debug form.
    let probe = load("token = \"secret.secret.secret\"\n")
        .unwrap()
        .probe
        .unwrap();
    assert!(!format!("{probe:?}").contains("secret"), "{probe:?}");
    for (probe, needle) in [
        (
            format!("{cert}token = \"a.b.c\"\n"),
            "key `probe.token`: give device_cert and device_key, or token or token_command, not both",
        ),
        (
            "device_key = \"d.key\"\ntoken_command = \"true\"\n".to_string(),
            "key `probe.token`: give device_cert and device_key, or token or token_command, not both",
        ),
        (
            String::new(),
            "key `probe.device_cert`: give device_cert and device_key (a device certificate), or token or token_command (a device token)",
        ),
        (
            "device_cert = \"d.crt\"\n".to_string(),
            "key `probe.device_key`: device_cert and device_key go together",
        ),
        (
            "token = \"a.b.c\"\ntoken_command = \"true\"\n".to_string(),
            "key `probe.token_command`: give token or token_command, not both",
        ),
        ("token = \" \"\n".to_string(), "key `probe.token`: is empty"),
    ] {
        let err = load(&probe).unwrap_err().to_string();
        assert!(err.contains(needle), "{probe:?}: {needle:?} not in {err}");
    }
}

//! Bad gateway and connector configurations are refused at load, naming the file and the key.

use connector::run::ConnectorConfig;
use gateway::GatewayConfig;

const CONNECTOR_OK: &str = "connector_id = \"c\"\ngateways = [\"gw:443\"]\ngateway_roots = [\"r.crt\"]\nchannel_cert = \"c.crt\"\nchannel_key = \"c.key\"\nclient_cert_store = \"store\"\nallowed_roots = [\"r.crt\"]\nendpoint_roots = [\"r.crt\"]\n\n[[endpoints]]\nid = 1\nname = \"SMS_MP\"\nurl = \"https://mp\"\n";

#[test]
fn connector_configuration_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("connector.toml");
    std::fs::write(&file, CONNECTOR_OK).unwrap();
    let cfg = ConnectorConfig::load(&file).expect("the baseline loads");
    assert_eq!(cfg.channels_per_gateway, 2);
    assert!(cfg.channels_follow_gateway_threads);
    assert_eq!(cfg.max_request_header_bytes, 64 * 1024);
    assert!(
        cfg.client_cert_store.starts_with(dir.path()),
        "relative paths resolve against the file"
    );
    let cases = [
        (
            CONNECTOR_OK.replace("[\"gw:443\"]", "[\"gw\"]"),
            "key `gateways`: \"gw\" is not \"host:port\"",
        ),
        (CONNECTOR_OK.replace("[\"gw:443\"]", "[]"), "key `gateways`"),
        (
            CONNECTOR_OK.replace("https://mp", "http://mp"),
            "key `endpoints`: endpoint 1: \"http://mp\" is not an https:// URL",
        ),
        (
            format!(
                "{CONNECTOR_OK}\n[[endpoints]]\nid = 1\nname = \"SUP\"\nurl = \"https://sup\"\n"
            ),
            "endpoint id 1 is listed twice",
        ),
        (
            CONNECTOR_OK.replace("allowed_roots = [\"r.crt\"]", "allowed_roots = []"),
            "key `allowed_roots`",
        ),
        (
            format!("{CONNECTOR_OK}channels_per_gateway = 0\n"),
            "unknown field",
        ),
        (
            CONNECTOR_OK.replace(
                "connector_id = \"c\"\n",
                "connector_id = \"c\"\nchannels_per_gateway = 0\n",
            ),
            "key `channels_per_gateway`",
        ),
        (
            CONNECTOR_OK.replace(
                "connector_id = \"c\"\n",
                "connector_id = \"c\"\nworker_threads = 0\n",
            ),
            "key `worker_threads`: 0 is not a thread count",
        ),
        (
            CONNECTOR_OK.replace("channel_key = \"c.key\"\n", ""),
            "missing field `channel_key`",
        ),
        (
            CONNECTOR_OK.replace(
                "connector_id = \"c\"\n",
                "connector_id = \"c\"\nmax_request_header_bytes = 100\n",
            ),
            "key `max_request_header_bytes`: must be between 4096 and 1048576",
        ),
    ];
    for (text, needle) in cases {
        std::fs::write(&file, &text).unwrap();
        let err = ConnectorConfig::load(&file).unwrap_err().to_string();
        assert!(err.starts_with(&file.display().to_string()), "{err}");
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}

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
    ];
    for (text, needle) in cases {
        std::fs::write(&file, &text).unwrap();
        let err = GatewayConfig::load(&file).unwrap_err().to_string();
        assert!(err.starts_with(&file.display().to_string()), "{err}");
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}

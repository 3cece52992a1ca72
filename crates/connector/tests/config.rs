//! Bad connector configurations are refused at load, naming the file and the key.

use connector::run::ConnectorConfig;

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

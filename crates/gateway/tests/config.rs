//! Bad gateway configurations are refused at load, naming the file and the key.

use gateway::GatewayConfig;

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

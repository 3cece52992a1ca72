//! Only the right connector gets a device's traffic: the allowed list, names read from
//! parsed attributes, connector roots of their own, connector certificates checked for Client
//! Authentication and revocation, endpoints bound to connectors. Real TLS on loopback, the lab
//! PKI, a real connector and management point.

use std::time::{Duration, Instant};

use crate::support::*;
use connector::run::{self as conn, ConnectorConfig};
use gateway::GatewayConfig;
use pki::lab::{DnType, LeafSpec};
use probe::Outcome;
use testkit::*;

#[test]
fn a_connector_the_gateway_does_not_allow_cannot_open_a_channel() {
    let system = System::start("connector/store", "someone-else");
    assert!(!system.wait_for_channels_within(1, Duration::from_secs(2)));
    let log = system.gateway_log.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l.contains("Refused a connector channel")
            && l.contains("not in allowed_connectors")),
        "{log:#?}"
    );
    let report = system.probe(
        &format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST"),
        Some("device-001"),
    );
    assert!(
        matches!(report.outcome, Outcome::HttpError { status: 404, .. }),
        "{:?}",
        report.lines
    );
    system.stop();
}

/// Waits (at most 10 s) until the gateway holds no channel.
fn wait_no_channels(system: &System) -> bool {
    let registry = &system.gateway.as_ref().unwrap().registry;
    let deadline = Instant::now() + Duration::from_secs(10);
    while registry.channel_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    registry.channel_count() == 0
}

/// A second connector, `id`, dialling the system's gateway with the channel certificate in
/// `dir/channel.crt` (and `.key`), serving the system's endpoint (the same management point).
fn start_connector(system: &System, dir: &str, id: &str) -> conn::RunningConnector {
    let file = system.path(&format!("{dir}/connector.toml"));
    let mut config = ConnectorConfig::load(&system.path("connector.toml")).unwrap();
    config.connector_id = id.into();
    config.channel_cert = system.path(&format!("{dir}/channel.crt"));
    config.channel_key = system.path(&format!("{dir}/channel.key"));
    config.verbose = false;
    config.write(&file).unwrap();
    let config = ConnectorConfig::load(&file).unwrap();
    system
        .runtime
        .block_on(conn::start(config, recorder(&system.connector_log)))
        .unwrap()
}

/// The lab connector's channel certificate.
fn channel_cert(system: &System) -> pki::Certificate {
    pki::RootSet::load(&[system.path("connector/channel.crt")])
        .unwrap()
        .certs
        .remove(0)
}

/// Writes `issued` as `dir/channel.crt` and `dir/channel.key` under the lab.
fn put_channel_cert(system: &System, dir: &str, issued: &pki::lab::Issued) {
    std::fs::create_dir_all(system.path(dir)).unwrap();
    std::fs::write(system.path(&format!("{dir}/channel.crt")), &issued.cert_pem).unwrap();
    std::fs::write(system.path(&format!("{dir}/channel.key")), &issued.key_pem).unwrap();
}

/// Item 7: a certificate whose O reads `Contoso, CN=Portcullis Connector Channel` printed
/// has that text in its O attribute, not a CN: its connector is refused a channel, and
/// devices go on reaching the genuine connector.
#[test]
fn a_connector_whose_organization_spells_an_allowed_cn_is_refused_a_channel() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let crafted = system
        .lab_root()
        .issue_with_subject(
            &LeafSpec::client_auth("Evil Connector", 30),
            &[
                (DnType::CommonName, "Evil Connector"),
                (
                    DnType::OrganizationName,
                    "Contoso, CN=Portcullis Connector Channel",
                ),
            ],
        )
        .unwrap();
    put_channel_cert(&system, "crafted", &crafted);
    let evil = start_connector(&system, "crafted", "evil-connector");
    assert!(
        wait_logged(
            &system,
            &[
                "Refused a connector channel from ",
                "O=Contoso, CN=Portcullis Connector Channel, CN=Evil Connector",
                "is not in allowed_connectors",
            ]
        ),
        "{:?}",
        system.gateway_log.lock().unwrap()
    );
    let registry = &system.gateway.as_ref().unwrap().registry;
    // Redials included: the crafted connector never holds a channel.
    for _ in 0..5 {
        let report = system.probe(&mp_path(), Some("device-001"));
        assert!(report.succeeded(), "{:?}", report.lines);
        let ids: Vec<String> = registry
            .all()
            .iter()
            .map(|c| c.hello.connector_id.clone())
            .collect();
        assert!(ids.iter().all(|id| id == "lab-connector"), "{ids:?}");
    }
    system.runtime.block_on(evil.stop());
    system.stop();
}

/// Item 8: connector roots are named, not taken from the device roots; a configuration
/// without them loads only when every connector is pinned by thumbprint; a binding needs a
/// name and endpoints.
#[test]
fn connector_roots_are_required_unless_every_connector_is_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    let base = "cert = \"c\"\nkey = \"k\"\ntrusted_roots = [\"r\"]\n";
    let load = |text: &str| {
        std::fs::write(&file, format!("{base}{text}")).unwrap();
        GatewayConfig::load(&file).map_err(|e| e.to_string())
    };
    let err = load("allowed_connectors = [\"Portcullis Connector Channel\"]\n").unwrap_err();
    assert!(
        err.contains("key `connector_roots`") && err.contains("thumbprint"),
        "{err}"
    );
    let thumbprint = "0123456789ABCDEF0123456789abcdef01234567";
    let pinned = load(&format!(
        "allowed_connectors = [\"{thumbprint}\", {{ name = \"{thumbprint}\", endpoints = [7] }}]\n"
    ))
    .unwrap();
    assert!(pinned.connector_roots.is_empty());
    assert!(load(&format!(
        "allowed_connectors = [\"{thumbprint}\", \"Portcullis Connector Channel\"]\n"
    ))
    .unwrap_err()
    .contains("key `connector_roots`"));
    let named = load(
        "connector_roots = [\"cr\"]\nallowed_connectors = [\"A\", { name = \"B\", endpoints = [3456, 3457] }]\n",
    )
    .unwrap();
    assert_eq!(named.allowed_connectors.len(), 2);
    let err = load(
        "connector_roots = [\"cr\"]\nallowed_connectors = [{ name = \"B\", endpoints = [] }]\n",
    )
    .unwrap_err();
    assert!(
        err.contains("key `allowed_connectors`") && err.contains("at least one endpoint"),
        "{err}"
    );
    let err = load(
        "connector_roots = [\"cr\"]\nallowed_connectors = [{ name = \"B\", endpoint = [1] }]\n",
    )
    .unwrap_err();
    assert!(err.contains("allowed_connectors"), "{err}");
}

/// Item 8: the lab connector, issued by the device CA, loses its channels when
/// connector_roots names another root, and gets them back pinned by its thumbprint with no
/// connector_roots at all.
#[test]
fn a_connector_from_the_device_ca_is_refused_when_connector_roots_names_another_root() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let other = pki::lab::LabCa::new_root("Connector Only Root", 1).unwrap();
    std::fs::write(
        system.path("connector-only-root.crt"),
        &other.cert().cert_pem,
    )
    .unwrap();
    let summary = system
        .reload_gateway(|g| g.connector_roots = vec!["connector-only-root.crt".into()])
        .unwrap();
    assert!(summary.contains("2 channel(s) closed"), "{summary}");
    assert!(wait_no_channels(&system));
    assert!(wait_logged(
        &system,
        &["Refused a connector channel from ", "is not trusted"]
    ));
    let report = system.probe(&mp_path(), Some("device-001"));
    assert!(
        matches!(report.outcome, Outcome::HttpError { status: 503, .. }),
        "{:?}",
        report.lines
    );
    // Without connector_roots a name is refused at load...
    let err = system
        .reload_gateway(|g| g.connector_roots.clear())
        .unwrap_err();
    assert!(err.contains("key `connector_roots`"), "{err}");
    // ...and a pin is the trust.
    let thumbprint = channel_cert(&system).thumbprint;
    system
        .reload_gateway(|g| {
            g.connector_roots.clear();
            g.allowed_connectors = vec![AllowedConnector::Name(thumbprint.clone())];
        })
        .unwrap();
    assert!(system.wait_for_channels_within(2, Duration::from_secs(40)));
    assert!(system.probe(&mp_path(), Some("device-001")).succeeded());
    // Pinned, a certificate is named by its thumbprint only: one whose CN spells the pinned
    // thumbprint (anyone can make it: no roots are checked) is refused.
    let mimic = pki::lab::LabCa::new_root("Anyone", 1)
        .unwrap()
        .issue(&LeafSpec::client_auth(&thumbprint, 30))
        .unwrap();
    put_channel_cert(&system, "mimic", &mimic);
    let mimic = start_connector(&system, "mimic", "mimic-connector");
    assert!(wait_logged(
        &system,
        &[
            "Refused a connector channel from ",
            &format!("CN={thumbprint}, O=Portcullis Lab"),
            "is not in allowed_connectors",
        ]
    ));
    let registry = &system.gateway.as_ref().unwrap().registry;
    assert!(registry
        .all()
        .iter()
        .all(|c| c.hello.connector_id == "lab-connector"));
    system.runtime.block_on(mimic.stop());
    system.stop();
}

/// Item 8: a connector channel certificate without Client Authentication (a server
/// certificate with the allowed CN) is refused.
#[test]
fn a_connector_certificate_without_client_authentication_is_refused() {
    let system = System::builder()
        .prepare(|lab| {
            let root = pki::lab::LabCa::from_pem(
                &std::fs::read_to_string(lab.join("ca/root.crt")).unwrap(),
                &std::fs::read_to_string(lab.join("ca/root.key")).unwrap(),
            )
            .unwrap();
            let server = root
                .issue(&LeafSpec::server_auth(
                    "Portcullis Connector Channel",
                    &["localhost".to_string()],
                    30,
                ))
                .unwrap();
            std::fs::write(lab.join("connector/channel.crt"), &server.cert_pem).unwrap();
            std::fs::write(lab.join("connector/channel.key"), &server.key_pem).unwrap();
        })
        .start();
    assert!(
        wait_logged(
            &system,
            &[
                "Refused a connector channel from ",
                "without Client Authentication (1.3.6.1.5.5.7.3.2)",
            ]
        ),
        "{:?}",
        system.gateway_log.lock().unwrap()
    );
    assert_eq!(system.gateway.as_ref().unwrap().registry.channel_count(), 0);
    system.stop();
}

/// Item 8: with revocation checked, a revoked connector loses its channels at the reload and
/// its redials are refused; a connector whose issuer has no CRL here is refused too, whatever
/// crl_policy says for devices.
#[test]
fn a_revoked_connector_is_refused() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let root = system.lab_root();
    let crl = root.crl(&[channel_cert(&system).der()], 7).unwrap();
    std::fs::write(system.path("ca/root.crl"), crl).unwrap();
    let summary = system
        .reload_gateway(|g| {
            g.verify_client_revocation = true;
            g.crls = vec!["ca/root.crl".into()];
        })
        .unwrap();
    assert!(summary.contains("2 channel(s) closed"), "{summary}");
    assert!(wait_no_channels(&system));
    assert!(wait_logged(
        &system,
        &[
            "Refused a connector channel from ",
            "is revoked by",
            "root.crl"
        ]
    ));
    // A CRL from another CA only: the connector's status is unknown, and it stays out.
    let other = pki::lab::LabCa::new_root("Other Root", 1).unwrap();
    std::fs::write(system.path("other.crt"), &other.cert().cert_pem).unwrap();
    std::fs::write(system.path("other.crl"), other.crl(&[], 7).unwrap()).unwrap();
    system
        .reload_gateway(|g| {
            g.trusted_roots.push("other.crt".into());
            g.verify_client_revocation = true;
            g.crls = vec!["other.crl".into()];
            g.crl_policy = CrlPolicy::AllowAndWarn;
        })
        .unwrap();
    assert!(wait_logged(
        &system,
        &[
            "Refused a connector channel from ",
            "revocation status of",
            "is unknown"
        ]
    ));
    assert_eq!(system.gateway.as_ref().unwrap().registry.channel_count(), 0);
    // An empty CRL from the lab root: good again.
    std::fs::write(system.path("ca/root.crl"), root.crl(&[], 7).unwrap()).unwrap();
    system
        .reload_gateway(|g| {
            g.verify_client_revocation = true;
            g.crls = vec!["ca/root.crl".into()];
        })
        .unwrap();
    assert!(system.wait_for_channels_within(2, Duration::from_secs(40)));
    assert!(system.probe(&mp_path(), Some("device-001")).succeeded());
    system.stop();
}

/// Item 8: an endpoint bound to another connector is refused to this one: its channels close
/// at the reload, its hellos are refused and logged with the endpoint ids, devices get no
/// channel for the endpoint; bound to it, it serves again.
#[test]
fn a_connector_announcing_an_endpoint_bound_to_another_gets_no_traffic_for_it() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let bound = |name: &str, endpoint: u64| {
        AllowedConnector::Bound(BoundConnector {
            name: name.into(),
            endpoints: vec![endpoint],
        })
    };
    let summary = system
        .reload_gateway(|g| {
            g.allowed_connectors = vec![
                AllowedConnector::Name("Portcullis Connector Channel".into()),
                bound("Branch Connector", ENDPOINT),
            ]
        })
        .unwrap();
    assert!(summary.contains("2 channel(s) closed"), "{summary}");
    assert!(wait_no_channels(&system));
    // Its redials: the hello is refused, naming the connector, the endpoint and the fix.
    assert!(
        wait_logged(
            &system,
            &[
                "Refused a connector channel from ",
                "connector lab-connector (CN=Portcullis Connector Channel, O=Portcullis Lab",
                &format!("announced endpoint(s) {ENDPOINT} (SMS_MP) that allowed_connectors does not bind to it"),
                "endpoints = [...] }",
            ]
        ),
        "{:?}",
        system.gateway_log.lock().unwrap()
    );
    let report = system.probe(&mp_path(), Some("device-001"));
    assert!(
        matches!(report.outcome, Outcome::HttpError { status: 503, .. }),
        "{:?}",
        report.lines
    );
    assert_eq!(system.gateway.as_ref().unwrap().registry.channel_count(), 0);

    // Bound to it (by name, beside another binding): it serves again.
    system
        .reload_gateway(|g| {
            g.allowed_connectors = vec![
                bound("Portcullis Connector Channel", ENDPOINT),
                bound("Branch Connector", 3456),
            ]
        })
        .unwrap();
    assert!(system.wait_for_channels_within(2, Duration::from_secs(40)));
    assert!(system.probe(&mp_path(), Some("device-001")).succeeded());
    system.stop();
}

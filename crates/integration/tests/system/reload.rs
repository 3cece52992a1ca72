//! Reloads, as SIGHUP does: what a connector's reload adds and what waits for a restart, a
//! renewed server certificate for new connections, a connector disallowed losing its channels,
//! and a connector certificate given by a reload with no request refused meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use http_body_util::BodyExt;
use pki::lab::LeafSpec;
use probe::Outcome;
use testkit::*;

/// A connector reloaded with a new endpoint serves it once its channels have reopened, and
/// says which of the changed settings wait for a restart.
#[test]
fn a_connector_reload_adds_an_endpoint_and_names_what_waits_for_a_restart() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let path = |endpoint: u64| format!("/CCM_PROXY_MUTUALAUTH/{endpoint}/SMS_MP/.sms_aut?MPLIST");
    let before = system.probe(&path(8), Some("device-001"));
    assert_eq!(
        before.outcome,
        Outcome::HttpError {
            status: 404,
            text: "CMGService_Unknownendpoint".into()
        },
        "{:?}",
        before.lines
    );

    system.edit_connector(|c| {
        c.worker_threads = Some(1);
        let url = c.endpoints[0].url.clone();
        c.endpoints.push(EndpointConfig {
            id: 8,
            name: "SMS_MP_2".into(),
            url,
        });
    });
    let config = ConnectorConfig::load(&system.path("connector.toml")).unwrap();
    let summary = system.connector.as_ref().unwrap().reload(&config).unwrap();
    for part in [
        "endpoints now 72057594037927939 (SMS_MP) https://localhost:",
        "8 (SMS_MP_2) https://localhost:",
        "channels reopen one at a time",
        "not applied until the connector restarts: worker_threads",
    ] {
        assert!(summary.contains(part), "{part}: {summary}");
    }
    // Both channels have reopened when the gateway routes endpoint 8 on two.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let gateway = system.gateway.as_ref().unwrap();
    while !gateway
        .registry
        .endpoints()
        .contains(&(8, "SMS_MP_2".into(), 2))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        gateway
            .registry
            .endpoints()
            .contains(&(8, "SMS_MP_2".into(), 2)),
        "{:?}",
        gateway.registry.endpoints()
    );
    let after = system.probe(&path(8), Some("device-001"));
    assert!(after.succeeded(), "{:?}", after.lines);
    system.stop();
}

/// The gateway's own certificate renewed in place and reloaded, as SIGHUP does: new
/// connections get the new one (devices are answered through it), and a reload whose key does
/// not match its certificate is refused, the running one kept.
#[test]
fn a_reload_gives_new_connections_the_renewed_server_certificate() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let port = system.gateway_port();
    let tls = system.device_tls();
    let served_certificate = || {
        system.runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .unwrap();
            let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
            pki::cert::Certificate::from_der(leaf.as_ref())
                .unwrap()
                .label()
        })
    };
    assert!(served_certificate().starts_with("CN=Portcullis Gateway,"));

    let root = system.lab_root();
    let server_certificate = |name: &str| {
        root.issue(&LeafSpec::server_auth(name, &["localhost".to_string()], 30))
            .unwrap()
    };
    let renewed = server_certificate("Portcullis Gateway Renewed");
    std::fs::write(system.path("gateway/server.crt"), &renewed.cert_pem).unwrap();
    std::fs::write(system.path("gateway/server.key"), &renewed.key_pem).unwrap();
    let summary = system.reload_gateway(|_| {}).unwrap();
    assert!(
        summary.contains("server certificate for new connections: CN=Portcullis Gateway Renewed"),
        "{summary}"
    );
    assert!(served_certificate().starts_with("CN=Portcullis Gateway Renewed,"));
    let report = system.probe(
        &format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST"),
        Some("device-001"),
    );
    assert!(report.succeeded(), "{:?}", report.lines);

    // A key that is not the certificate's: refused, and the renewed one still served.
    let other = server_certificate("Other");
    std::fs::write(system.path("gateway/server.key"), &other.key_pem).unwrap();
    assert!(system.reload_gateway(|_| {}).is_err());
    assert!(served_certificate().starts_with("CN=Portcullis Gateway Renewed,"));
    system.stop();
}

/// A connector taken out of allowed_connectors by a reload loses its channels at once (its
/// redials are refused, devices get 503), and gets them back when it is allowed again.
#[test]
fn a_reload_that_disallows_a_connector_closes_its_channels() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let summary = system
        .reload_gateway(|g| {
            g.allowed_connectors = vec![AllowedConnector::Name("Someone Else".into())]
        })
        .unwrap();
    assert!(
        summary.contains("connectors: 2 channel(s) closed, no longer allowed"),
        "{summary}"
    );
    let registry = &system.gateway.as_ref().unwrap().registry;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while registry.channel_count() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(registry.channel_count(), 0);
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    let report = system.probe(&path, Some("device-001"));
    assert!(
        matches!(report.outcome, Outcome::HttpError { status: 503, .. }),
        "{:?}",
        report.lines
    );
    // Its redials are refused, and say why.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refused = || {
        system.gateway_log.lock().unwrap().iter().any(|l| {
            l.starts_with("Refused a connector channel from ")
                && l.ends_with("is not in allowed_connectors")
        })
    };
    while !refused() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused(), "{:?}", system.gateway_log.lock().unwrap());
    assert_eq!(registry.channel_count(), 0);

    let summary = system.reload_gateway(|_| {}).unwrap();
    assert!(
        summary.contains("connectors: every open channel still allowed"),
        "{summary}"
    );
    assert!(system.wait_for_channels_within(2, Duration::from_secs(40)));
    assert!(system.probe(&path, Some("device-001")).succeeded());
    system.stop();
}

/// The seed failure mended while running: the connector's store gets its client certificate
/// and the connector reloads. Its channels then drain and reopen one at a time, so the
/// gateway's ServiceMetadata (what `portcullis analyze` reads) says it has one now, and eight
/// devices sending all the while get every answer: a request the draining channel no longer
/// takes goes on the other.
#[test]
fn a_certificate_given_by_a_reload_reaches_the_gateway_with_no_request_refused() {
    let system = System::builder()
        .shards(2)
        .store("connector/later")
        .prepare(|lab| {
            // As in the seed: a server certificate, nothing for client authentication.
            std::fs::create_dir_all(lab.join("connector/later")).unwrap();
            for file in ["server.crt", "server.key"] {
                std::fs::copy(
                    lab.join(format!("gateway/{file}")),
                    lab.join(format!("connector/later/{file}")),
                )
                .unwrap();
            }
        })
        .start();
    assert!(system.wait_for_channels(2));
    let gateway = system.gateway.as_ref().unwrap();
    assert_eq!(
        gateway.registry.connectors(),
        [("lab-connector".to_string(), 2, false)]
    );
    let tls = system.device_tls();
    let port = gateway.addr.port();
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    let mut sender = system.runtime.block_on(connect(port, tls.clone()));
    assert_eq!(system.runtime.block_on(get(&mut sender, &path)).0, 403);

    for file in ["client-auth.crt", "client-auth.key"] {
        std::fs::copy(
            system.path(&format!("connector/store/{file}")),
            system.path(&format!("connector/later/{file}")),
        )
        .unwrap();
    }
    let drained = || {
        system
            .connector_log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("drained to give it the new hello"))
            .count()
    };
    let statuses = system.runtime.block_on(async {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let devices: Vec<_> = (0..8)
            .map(|_| {
                let (tls, path, stop) = (tls.clone(), path.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut sender: Sender = connect(port, tls).await;
                    let mut statuses = std::collections::BTreeMap::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let request = hyper::Request::get(path.as_str())
                            .header(hyper::header::HOST, "localhost")
                            .body(http_body_util::Empty::new())
                            .unwrap();
                        let response = sender.send_request(request).await.unwrap();
                        // The channel's draining notice is the gateway's, not the device's.
                        assert!(!response.headers().contains_key("x-portcullis-draining"));
                        let status = response.status().as_u16();
                        response.into_body().collect().await.unwrap();
                        *statuses.entry(status).or_insert(0) += 1;
                    }
                    statuses
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let config = connector::run::ConnectorConfig::load(&system.path("connector.toml")).unwrap();
        let summary = system.connector.as_ref().unwrap().reload(&config).unwrap();
        assert!(
            summary.contains("channels reopen one at a time"),
            "{summary}"
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while (drained() < 2 || gateway.registry.channel_count() < 2) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = std::collections::BTreeMap::new();
        for device in devices {
            for (status, n) in device.await.unwrap() {
                *all.entry(status).or_insert(0) += n;
            }
        }
        all
    });
    assert_eq!(drained(), 2, "{:?}", system.connector_log.lock().unwrap());
    assert!(system.wait_for_channels(2));
    assert_eq!(
        gateway.registry.connectors(),
        [("lab-connector".to_string(), 2, true)]
    );
    // Before the reload 403 (no client certificate), after it 200: nothing else.
    assert!(
        statuses.keys().all(|s| [200, 403].contains(s)) && statuses.get(&200) > Some(&0),
        "{statuses:?} {:?}",
        system
            .gateway_log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| !l.contains("Message "))
            .collect::<Vec<_>>()
    );
    drop(sender);
    system.stop();
}

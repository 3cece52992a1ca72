//! A channel's health, as the fault drill of issue 16 found it wanting: a connector that
//! freezes is passed by once its keep-alive PING is overdue and dropped with the cause named;
//! channels lost and back are told in both logs, with the real cause.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway::AllowedConnector;
use testkit::*;

use crate::support::*;

/// An endpoint only the frozen connector serves.
const FROZEN_ONLY: u64 = 99;

/// A connector of the test's own over real TLS with the lab's channel certificate: it answers
/// the hello (serving the usual endpoint and `FROZEN_ONLY`), and on the first device request
/// it stops: it never reads its connection again (a SIGSTOPped or hung process looks so from
/// the gateway), holding the request and the connection open. Says on `frozen` when it stops.
async fn freezing_connector(
    system: &System,
    port: u16,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Receiver<String>,
) {
    let identity = pki::tls::Identity::load(
        &system.path("connector/channel.crt"),
        &system.path("connector/channel.key"),
    )
    .unwrap();
    let roots = pki::RootSet::load(&[system.path("ca/root.crt")]).unwrap();
    let mut tls = pki::tls::client_config(&roots)
        .unwrap()
        .with_client_auth_cert(identity.chain, identity.key)
        .unwrap();
    tls.alpn_protocols = vec![channel::tunnel::ALPN.to_vec()];
    let stream = tls_to(port, Arc::new(tls)).await;
    let (tell, frozen) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut connection = h2::server::handshake(stream).await.unwrap();
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            let path = request.uri().path().to_string();
            if path != channel::tunnel::HELLO_PATH {
                let _ = tell.send(path);
                // Frozen: the connection, the request and its stream stay as they are.
                let _held = (connection, request, respond);
                std::future::pending::<()>().await;
                return;
            }
            let hello = channel::tunnel::Hello {
                connector_id: "frozen-connector".into(),
                version: "0".into(),
                endpoints: vec![
                    channel::tunnel::EndpointInfo {
                        id: ENDPOINT,
                        name: "SMS_MP".into(),
                    },
                    channel::tunnel::EndpointInfo {
                        id: FROZEN_ONLY,
                        name: "FROZEN".into(),
                    },
                ],
                has_client_certificate: true,
                max_request_header_bytes: None,
                endpoint_timeout_secs: None,
            };
            let body = Bytes::from(serde_json::to_vec(&hello).unwrap());
            if let Ok(mut stream) = respond.send_response(hyper::Response::new(()), false) {
                let _ = stream.send_data(body, true);
            }
        }
    });
    (task, frozen)
}

fn frozen_path() -> String {
    format!("/CCM_PROXY_MUTUALAUTH/{FROZEN_ONLY}/SMS_MP/.sms_aut?MPLIST")
}

/// Waits (bounded) for a line of `lines` holding every one of `words`; the line, or the
/// whole log in the panic.
fn wait_for_line(lines: &std::sync::Mutex<Vec<String>>, words: &[&str], limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let found = lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| words.iter().all(|w| l.contains(w)))
            .cloned();
        if let Some(line) = found {
            return line;
        }
        if Instant::now() > deadline {
            panic!(
                "no line with {words:?} within {limit:?}:\n{}",
                lines.lock().unwrap().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 16 item 3. A connector that stops reading its channel (frozen) beside a healthy one:
/// once its keep-alive PING is overdue (`channel_unresponsive_after_ms`, 1 s) the gateway
/// says so in its log, naming the connector, and sends it nothing new: requests for the
/// endpoint both serve go to the healthy channel, and one for an endpoint only the frozen
/// connector serves gets 503 `CMGService_Connectorunresponsive` at once. After
/// `channel_keepalive_timeout_secs` the channel is dropped, the log naming the cause and the
/// connector, and the request that was on it gets 502 saying the PINGs went unanswered.
///
/// Before: no line said anything until the channel was dropped (5-10 s, by h2's PING every
/// 5 s), new requests were still sent to the frozen channel meanwhile, and the request on it
/// was refused as "broken pipe".
#[test]
fn a_frozen_connector_is_passed_by_once_its_ping_is_overdue_and_dropped_with_the_cause_named() {
    let system = System::builder()
        // Long enough that the unresponsive channel is still held while this test looks.
        .gateway(|g| g.channel_keepalive_timeout_secs = 10)
        .connector(|c, _| c.channels_per_gateway = 1)
        .start();
    assert!(system.wait_for_channels(1));
    let healthy = system.channel_ids();
    let port = system.gateway_port();
    let tls = system.device_tls();
    system.runtime.block_on(async {
        let (fake, frozen) = freezing_connector(&system, port).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while system.channel_ids().len() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ids = system.channel_ids();
        assert_eq!(ids.len(), 2, "{ids:?}");
        let frozen_id = *ids.iter().find(|id| !healthy.contains(id)).unwrap();

        // A request only the frozen connector serves: it is on the channel when it freezes.
        let mut caught = Raw::connect(port, tls.clone()).await;
        caught
            .send(format!("GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n", frozen_path()).as_bytes())
            .await;
        let caught_answer = tokio::spawn(async move { caught.answer().await });
        let path = tokio::time::timeout(Duration::from_secs(10), frozen)
            .await
            .expect("the request reached the frozen connector")
            .unwrap();
        assert!(path.ends_with("/SMS_MP/.sms_aut"), "{path}");

        // The gateway notices its PING unanswered, and says whose.
        let line = wait_for_line(
            &system.gateway_log,
            &["frozen-connector", "keep-alive PING unanswered"],
            Duration::from_secs(8),
        );
        assert!(
            line.contains(&format!("channel {frozen_id} from 127.0.0.1:")),
            "{line}"
        );

        // From now on nothing new goes to it: for the endpoint only it serves, a named 503
        // at once...
        let mut raw = Raw::connect(port, tls.clone()).await;
        raw.send(format!("GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n", frozen_path()).as_bytes())
            .await;
        let refused = tokio::time::timeout(Duration::from_secs(3), raw.answer())
            .await
            .expect("refused at once, not left to wait on the frozen connector");
        assert_eq!(
            (refused.status, refused.reason.as_str()),
            (503, "CMGService_Connectorunresponsive"),
            "{}",
            String::from_utf8_lossy(&refused.body)
        );
        assert!(
            String::from_utf8_lossy(&refused.body).contains("keep-alive PING unanswered"),
            "{}",
            String::from_utf8_lossy(&refused.body)
        );
        // ... and for the endpoint both serve, the healthy channel takes every request, eight
        // at a time (least-outstanding picking sent some to the frozen one).
        for round in 0..3 {
            let requests: Vec<_> = (0..8)
                .map(|_| {
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let mut sender = connect(port, tls).await;
                        tokio::time::timeout(Duration::from_secs(5), get(&mut sender, &mp_path()))
                            .await
                    })
                })
                .collect();
            for request in requests {
                let answered = request.await.unwrap();
                let (status, body) = answered.unwrap_or_else(|_| {
                    panic!("round {round}: a request waited on the frozen channel")
                });
                assert_eq!(
                    status,
                    200,
                    "round {round}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        assert!(system.channel_ids().contains(&frozen_id), "not dropped yet");

        // Dropped within the keep-alive timeout (a generous bound here), the cause named.
        let line = wait_for_line(
            &system.gateway_log,
            &[
                "Connector frozen-connector lost channel",
                "keep-alive PINGs unanswered for",
            ],
            Duration::from_secs(30),
        );
        assert!(
            line.contains(&format!("lost channel {frozen_id} from 127.0.0.1:")),
            "{line}"
        );
        assert!(line.contains("1 request(s) were on it"), "{line}");
        assert_eq!(system.channel_ids(), healthy);
        let answer = tokio::time::timeout(Duration::from_secs(10), caught_answer)
            .await
            .expect("the request on the dropped channel is answered")
            .unwrap();
        let body = String::from_utf8_lossy(&answer.body).into_owned();
        assert_eq!(
            (answer.status, answer.reason.as_str()),
            (502, "CMGService_Channelbroken"),
            "{body}"
        );
        assert!(
            body.contains("keep-alive PINGs unanswered for")
                && body.contains("connector frozen-connector"),
            "{body}"
        );
        fake.abort();
    });
    system.stop();
}

/// Issue 16 item 5. A channel closed by a reload of the gateway (the connector no longer
/// allowed) is told at both ends with its cause; the connector's re-dials are refused and told
/// so; once allowed again, the connector says the channel is back, after how many attempts
/// and how long down.
///
/// Before: the connector said "closed; reconnecting" and never that the channel was back.
#[test]
fn a_channel_closed_and_back_is_told_at_both_ends() {
    let system = System::builder()
        .connector(|c, _| c.channels_per_gateway = 1)
        .start();
    assert!(system.wait_for_channels(1));
    let first = system.channel_ids()[0];
    system
        .reload_gateway(|g| {
            g.allowed_connectors = vec![AllowedConnector::Name("Some Other Connector".into())]
        })
        .unwrap();
    let closed = wait_for_line(
        &system.gateway_log,
        &[&format!(
            "Closed channel {first} of connector lab-connector"
        )],
        Duration::from_secs(10),
    );
    assert!(closed.contains("allowed_connectors"), "{closed}");
    let lost = wait_for_line(
        &system.connector_log,
        &[
            "Channel 1 to gateway 127.0.0.1:",
            &format!("(its channel {first}) closed by the gateway; reconnecting"),
        ],
        Duration::from_secs(10),
    );
    assert!(!lost.contains("http2 error"), "{lost}");
    // Dialled again, it is refused before any hello, and the connector says what that means.
    let refused = wait_for_line(
        &system.connector_log,
        &[
            "Channel 1 to gateway 127.0.0.1:",
            ": channel lost before the gateway asked for the hello: ",
        ],
        Duration::from_secs(10),
    );
    assert!(
        refused.contains("Refused a connector channel from"),
        "{refused}"
    );
    wait_for_line(
        &system.gateway_log,
        &["Refused a connector channel from", "allowed_connectors"],
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(500));
    system.reload_gateway(|_| {}).unwrap();
    let back = wait_for_line(
        &system.connector_log,
        &["Channel 1 to gateway 127.0.0.1:", " back after "],
        Duration::from_secs(40),
    );
    assert!(
        back.contains(" attempt(s) (down for ") && back.contains("(its channel "),
        "{back}"
    );
    let attempts: u32 = back
        .split(" back after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        attempts >= 2,
        "at least one refused dial and the one that worked: {back}"
    );
    assert!(system.wait_for_channels(1));
    system.stop();
}

/// Issue 16 item 5, the gateway's side: a channel its connector drains (its hello changed) and
/// one lost with the connector gone are each logged with the connector, the channel and why.
///
/// Before: the gateway said nothing when a channel ended.
#[test]
fn the_gateway_says_why_it_lost_a_channel() {
    let mut system = System::builder()
        .connector(|c, _| c.channels_per_gateway = 1)
        .start();
    assert!(system.wait_for_channels(1));
    let first = system.channel_ids()[0];
    // A new endpoint changes the hello: the channel drains and is dialled again.
    system.edit_connector(|c| {
        let mut more = c.endpoints[0].clone();
        more.id = 3456;
        more.name = "SMS_SUP".into();
        c.endpoints.push(more);
    });
    let config = connector::run::ConnectorConfig::load(&system.path("connector.toml")).unwrap();
    system.connector.as_ref().unwrap().reload(&config).unwrap();
    let drained = wait_for_line(
        &system.gateway_log,
        &[&format!(
            "Connector lab-connector lost channel {first} from 127.0.0.1:"
        )],
        Duration::from_secs(15),
    );
    assert!(
        drained.contains(": the connector closed it: GOAWAY NO_ERROR")
            || drained.contains(": the connector drained it: GOAWAY NO_ERROR"),
        "{drained}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while system.channel_ids() == [first] || system.channel_ids().is_empty() {
        assert!(Instant::now() < deadline, "no new channel");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = system.channel_ids()[0];
    // The connector gone at once (its tasks cut, no GOAWAY).
    let connector = system.connector.take().unwrap();
    system.runtime.block_on(connector.stop());
    let gone = wait_for_line(
        &system.gateway_log,
        &[&format!(
            "Connector lab-connector lost channel {second} from 127.0.0.1:"
        )],
        Duration::from_secs(15),
    );
    assert!(
        gone.contains("the connection ended without a GOAWAY or TLS close_notify"),
        "{gone}"
    );
    system.stop();
}

/// The two keep-alive limits have defaults, and values out of range (or the unresponsive
/// bound not under the timeout) are refused at load naming the key.
#[test]
fn the_channel_keepalive_limits_have_defaults_and_bad_values_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    let usual = "cert = \"server.crt\"\nkey = \"server.key\"\ntrusted_roots = [\"root.crt\"]\nconnector_roots = [\"root.crt\"]\nallowed_connectors = [\"Portcullis Connector Channel\"]\n";
    std::fs::write(&file, usual).unwrap();
    let config = gateway::GatewayConfig::load(&file).unwrap();
    assert_eq!(config.channel_unresponsive_after_ms, 1000);
    assert_eq!(config.channel_keepalive_timeout_secs, 5);
    for (bad, key) in [
        (
            "channel_unresponsive_after_ms = 5",
            "channel_unresponsive_after_ms",
        ),
        (
            "channel_unresponsive_after_ms = 5000",
            "channel_unresponsive_after_ms",
        ),
        (
            "channel_keepalive_timeout_secs = 0",
            "channel_keepalive_timeout_secs",
        ),
        (
            "channel_keepalive_timeout_secs = 3601",
            "channel_keepalive_timeout_secs",
        ),
    ] {
        std::fs::write(&file, format!("{usual}{bad}\n")).unwrap();
        let error = gateway::GatewayConfig::load(&file).unwrap_err().to_string();
        assert!(error.contains(key), "{bad}: {error}");
    }
}

//! The gateway and the connector on shards of their own, as their commands run them: channels
//! are spread over the gateway's shards, device connections too, and every device is served
//! whichever shard took it.

use std::time::{Duration, Instant};

use crate::support::*;
use http_body_util::BodyExt;
use testkit::*;

#[test]
fn channels_and_devices_are_spread_over_the_shards_and_all_served() {
    let system = System::start_on_shards(2);
    assert!(
        system.wait_for_channels(2),
        "channels: {:?}",
        system.gateway_log.lock().unwrap()
    );
    let gateway = system.gateway.as_ref().unwrap();
    // Both channels arrive at once; each goes to the shard driving fewer, so each shard's
    // devices have one on their own thread.
    assert_eq!(
        (
            gateway.registry.channels_on(0),
            gateway.registry.channels_on(1)
        ),
        (1, 1)
    );

    let tls = system.device_tls();
    let port = gateway.addr.port();
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    let mut devices = system.runtime.block_on(async {
        // Seven devices connect at once and stay; then each sends two requests.
        let connecting: Vec<_> = (0..7)
            .map(|_| tokio::spawn(connect(port, tls.clone())))
            .collect();
        let mut senders = Vec::new();
        for device in connecting {
            senders.push(device.await.unwrap());
        }
        settle(gateway, 7).await;
        let mut spread = gateway.connections_per_shard();
        spread.sort();
        assert_eq!(spread, [3, 4], "device connections per shard");
        for round in 0..2 {
            for (device, sender) in senders.iter_mut().enumerate() {
                let (status, body) = get(sender, &path).await;
                assert!(
                    status == 200 && body.starts_with(b"<MPList>"),
                    "device {device}, round {round}: {status} {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        drop(senders);
        settle(gateway, 0).await;
        // Now one at a time, noting the shard each lands on.
        let mut devices = Vec::new();
        for n in 1..=8 {
            let before = gateway.connections_per_shard();
            let sender = connect(port, tls.clone()).await;
            settle(gateway, n).await;
            let after = gateway.connections_per_shard();
            let shard = (0..2).find(|&i| after[i] > before[i]).unwrap();
            devices.push((shard, sender));
        }
        devices
    });

    // The devices of shard 0 leave; shard 1 keeps at least three (a shard takes a new
    // connection unless it holds two more than the other).
    devices.retain(|(shard, _)| *shard == 1);
    let left = devices.len();
    assert!(left >= 3, "{left} devices on shard 1 of 8");
    system
        .runtime
        .block_on(settle(system.gateway.as_ref().unwrap(), left));
    assert_eq!(
        system.gateway.as_ref().unwrap().connections_per_shard(),
        [0, left]
    );

    // The connector restarts: both new channels are accepted by shard 0, the one with fewer
    // connections (or moved there); they still end one on each shard.
    let mut system = system;
    let connector = system.connector.take().unwrap();
    system.runtime.block_on(connector.stop());
    let deadline = Instant::now() + Duration::from_secs(10);
    while system.gateway.as_ref().unwrap().registry.channel_count() > 0 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (shards, threads) = runtime::shards::Shards::spawn(2).unwrap();
    let config = connector::run::ConnectorConfig::load(&system.path("connector.toml")).unwrap();
    let log = recorder(&system.connector_log);
    system.connector = Some(
        system
            .runtime
            .block_on(connector::run::start_on(config, log, shards))
            .unwrap(),
    );
    assert!(system.wait_for_channels(2));
    let gateway = system.gateway.as_ref().unwrap();
    assert_eq!(
        (
            gateway.registry.channels_on(0),
            gateway.registry.channels_on(1)
        ),
        (1, 1)
    );
    system.runtime.block_on(async {
        for (_, sender) in &mut devices {
            assert_eq!(get(sender, &path).await.0, 200);
        }
    });
    drop(devices);
    system.stop();
    drop(threads);
}

/// One channel for two gateway shards (a connector told to hold one): the devices of the shard
/// without one send over the other's, bodies both ways included.
#[test]
fn devices_on_a_shard_without_a_channel_use_another_shards() {
    let system = System::builder()
        .shards(2)
        .connector(|c, _| {
            c.channels_per_gateway = 1;
            c.channels_follow_gateway_threads = false;
        })
        .start();
    assert!(system.wait_for_channels(1));
    let gateway = system.gateway.as_ref().unwrap();
    assert_eq!(gateway.registry.channel_count(), 1);
    let tls = system.device_tls();
    let port = gateway.addr.port();
    let echo = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/portcullis/echo");
    let body: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    system.runtime.block_on(async {
        let connecting: Vec<_> = (0..6)
            .map(|_| {
                tokio::spawn(connect::<http_body_util::Full<bytes::Bytes>>(
                    port,
                    tls.clone(),
                ))
            })
            .collect();
        let mut senders = Vec::new();
        for device in connecting {
            senders.push(device.await.unwrap());
        }
        settle(gateway, 6).await;
        assert!(
            gateway.connections_per_shard().iter().all(|&n| n >= 2),
            "{:?}",
            gateway.connections_per_shard()
        );
        for (device, sender) in senders.iter_mut().enumerate() {
            let request = hyper::Request::post(echo.as_str())
                .header(hyper::header::HOST, "localhost")
                .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let status = response.status();
            let back = response.into_body().collect().await.unwrap().to_bytes();
            assert!(
                status == 200 && back == body,
                "device {device}: {status}, {} bytes back",
                back.len()
            );
        }
    });
    system.stop();
}

/// A connector told to hold one channel to a gateway running three worker threads opens one
/// for each, as the gateway's hello says how many it runs; they end one on each shard.
#[test]
fn the_connector_opens_a_channel_for_each_gateway_thread() {
    let system = System::builder()
        .shards(3)
        .connector(|c, _| c.channels_per_gateway = 1)
        .start();
    assert!(
        system.wait_for_channels(3),
        "{:?}",
        system.connector_log.lock().unwrap()
    );
    let gateway = system.gateway.as_ref().unwrap();
    let per_shard: Vec<usize> = (0..3).map(|s| gateway.registry.channels_on(s)).collect();
    assert_eq!(per_shard, [1, 1, 1]);
    assert_eq!(system.connector.as_ref().unwrap().dial_loops(), 3);
    assert_logged(
        &system.connector_log,
        "runs 3 worker threads: opening 2 more channel(s) to it, 3 in all",
    );
    system.stop();
}

/// Waits (at most 10 s) until the gateway counts `open` connections.
async fn settle(gateway: &gateway::RunningGateway, open: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway.connections_per_shard().iter().sum::<usize>() != open && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

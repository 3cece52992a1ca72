//! Bodies in many small pieces never close the channel, and methods the gateway does not
//! forward get 405 and leave the channels alone. Every attack bounded in count and time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use testkit::*;

/// A device connection's body sent as the test says: `pieces` written one by one with
/// `pause` between, over HTTP/2 (one DATA frame each), to the echo; its answer.
async fn h2_trickle(
    h2: &mut h2::client::SendRequest<Bytes>,
    pieces: usize,
    piece: &'static [u8],
    pause: Duration,
) -> (u16, Vec<u8>) {
    let request = hyper::Request::post(h2_uri("/portcullis/echo"))
        .body(())
        .unwrap();
    let (response, mut body) = h2.send_request(request, false).unwrap();
    for _ in 0..pieces {
        // An early answer (a refusal) ends the stream: then the answer says why.
        if body.send_data(Bytes::from_static(piece), false).is_err() {
            break;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    let _ = body.send_data(Bytes::new(), true);
    h2_answer(response)
        .await
        .unwrap_or_else(|e| panic!("the stream failed: {e}"))
}

/// Item 3: bodies in many small pieces (a byte per HTTP/2 DATA frame, a byte per HTTP/1.1
/// chunk, many streams of a few bytes) reach the endpoint whole and the channel stays.
#[test]
fn bodies_in_many_small_pieces_never_close_the_channel() {
    // Every one of the 150 streams below goes on the channel: one device's share of streams
    // (64 by default, 429 beyond) would otherwise keep most of them off it.
    let system = one_channel_with(|g| g.max_streams_per_device = 200);
    let ids = system.channel_ids();
    let port = system.gateway_port();
    let tls = system.device_tls();
    let h2_tls = h2_tls(&system);
    let started = Instant::now();
    system.runtime.block_on(async {
        // Another device, busy meanwhile: every one of its requests answered.
        let others_tls = tls.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let others_stop = stop.clone();
        let others = tokio::spawn(async move {
            let mut raw = Raw::connect(port, others_tls).await;
            let mut answered = Vec::new();
            while !others_stop.load(std::sync::atomic::Ordering::Relaxed) {
                raw.send(
                    format!(
                        "GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                        proxied(MPLIST)
                    )
                    .as_bytes(),
                )
                .await;
                answered.push(raw.answer().await.status);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answered
        });

        // 300 one-byte DATA frames on one HTTP/2 stream, at once (before: the channel
        // closed after ~200, 502 CMGService_Channelbroken), then paced (a piece every 2 ms:
        // still answered whole, no piece held for good).
        let mut h2 = h2_device(port, h2_tls.clone()).await;
        for pause in [Duration::ZERO, Duration::from_millis(2)] {
            let (status, echoed) = h2_trickle(&mut h2, 300, b"x", pause).await;
            assert_eq!((status, &echoed[..]), (200, &[b'x'; 300][..]), "{pause:?}");
        }

        // 300 one-byte chunks over HTTP/1.1, in one write.
        let mut raw = Raw::connect(port, tls.clone()).await;
        raw.send(
            format!(
                "POST {} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n",
                proxied("/portcullis/echo")
            )
            .as_bytes(),
        )
        .await;
        raw.send(&b"1\r\ny\r\n".repeat(300)).await;
        raw.send(b"0\r\n\r\n").await;
        let answer = raw.answer().await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, vec![b'y'; 300]);

        // 150 streams at once with 5 bytes each (and their END_STREAM in a frame of its own).
        let streams: Vec<_> = (0..150)
            .map(|_| {
                let mut h2 = h2.clone();
                tokio::spawn(async move {
                    h2 = h2.ready().await.unwrap();
                    h2_trickle(&mut h2, 1, b"12345", Duration::ZERO).await
                })
            })
            .collect();
        for stream in streams {
            let (status, echoed) = stream.await.unwrap();
            assert_eq!((status, &echoed[..]), (200, &b"12345"[..]));
        }

        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let answered = others.await.unwrap();
        assert!(!answered.is_empty());
        assert!(answered.iter().all(|s| *s == 200), "{answered:?}");
    });
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(system.channel_ids(), ids);
    assert_eq!(channels_opened(&system), 1);
    system.stop();
}

/// Item 5: methods the gateway does not forward get 405 with `Allow`, 10,000 of them leave the
/// channels as they were; devices cancelling requests by the hundred do not close them either.
#[test]
fn methods_not_forwarded_get_405_and_ten_thousand_leave_the_channels_alone() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let ids = system.channel_ids();
    let port = system.gateway_port();
    let tls = system.device_tls();
    let h2_tls = h2_tls(&system);
    system.runtime.block_on(async {
        let devices: Vec<_> = (0..4)
            .map(|_| {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let mut raw = Raw::connect(port, tls).await;
                    for _ in 0..50 {
                        let mut batch = String::new();
                        for i in 0..50 {
                            let method = ["CONNECT", "TRACE", "SEARCH"][i % 3];
                            batch.push_str(&format!(
                                "{method} {} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                                proxied(MPLIST)
                            ));
                        }
                        raw.send(batch.as_bytes()).await;
                        for _ in 0..50 {
                            let answer = raw.answer().await;
                            assert_eq!(
                                (answer.status, answer.reason.as_str()),
                                (405, "CMGService_Methodnotallowed"),
                                "{}",
                                String::from_utf8_lossy(&answer.body)
                            );
                            let allow = answer.header("allow").unwrap_or_default();
                            assert!(allow.contains("GET") && allow.contains("CCM_POST"));
                        }
                    }
                })
            })
            .collect();
        let all = async {
            for device in devices {
                device.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(120), all)
            .await
            .expect("10,000 answered within 120 s");

        // A CONNECT in authority form, as a proxy client sends it, and one over HTTP/2.
        let mut raw = Raw::connect(port, tls.clone()).await;
        raw.send(b"CONNECT internal-mp.contoso.com:443 HTTP/1.1\r\nHost: internal-mp.contoso.com:443\r\n\r\n")
            .await;
        assert_eq!(raw.answer().await.status, 405);
        let mut h2 = h2_device(port, h2_tls.clone()).await;
        let request = hyper::Request::builder()
            .method(hyper::Method::CONNECT)
            .uri("localhost:443")
            .body(())
            .unwrap();
        let (response, _) = h2.send_request(request, true).unwrap();
        assert_eq!(h2_answer(response).await.unwrap().0, 405);

        // Devices that give up on their requests at once: each cancel resets a stream on a
        // channel.
        for _ in 0..20 {
            let h2 = h2_device(port, h2_tls.clone()).await;
            let mut bodies = Vec::new();
            for _ in 0..25 {
                let mut h2 = h2.clone().ready().await.unwrap();
                let request = hyper::Request::post(h2_uri("/portcullis/echo"))
                    .body(())
                    .unwrap();
                let (_, mut body) = h2.send_request(request, false).unwrap();
                body.send_data(Bytes::from_static(b"abandoned"), false)
                    .unwrap();
                bodies.push(body);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            for mut body in bodies {
                body.send_reset(h2::Reason::CANCEL);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A forwarded method still goes through.
        let mut raw = Raw::connect(port, tls.clone()).await;
        raw.send(
            format!(
                "GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                proxied(MPLIST)
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(raw.answer().await.status, 200);
    });
    assert_eq!(system.channel_ids(), ids);
    assert_eq!(channels_opened(&system), 2);
    system.stop();
}

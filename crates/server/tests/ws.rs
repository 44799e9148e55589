//! The native WebSocket transport over real sockets on 127.0.0.1:0, driven by our own Rust
//! client: fan-out order, recovery across reconnects, heartbeat (in paused time), slow
//! consumers and graceful shutdown.

use std::time::Duration;

use ferrocast_client::{Client, ConnectOptions, Event, Position};

mod transports;
use transports::TestServer;

async fn next_msg(client: &mut Client) -> ferrocast_client::Message {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), client.next_event()).await {
            Ok(Some(Event::Msg(m))) => return m,
            Ok(Some(Event::Closed(c))) => panic!("closed while waiting for a message: {c}"),
            Ok(Some(_)) => continue,
            Ok(None) => panic!("connection ended"),
            Err(_) => panic!("no message within 5 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_reach_every_subscriber_in_offset_order() {
    let server = TestServer::start(&[]).await;
    let mut a = Client::connect(&server.ws_url()).await.unwrap();
    let mut b = Client::connect(&server.ws_url()).await.unwrap();
    let ack = a.subscribe(&["chat.order"]).await.unwrap();
    assert!(ack.is_ok(), "{ack:?}");
    b.subscribe(&["chat.order"]).await.unwrap();
    let mut publisher = Client::connect(&server.ws_url()).await.unwrap();
    for i in 0..200 {
        let p = publisher.publish("chat.order", serde_json::json!({ "i": i })).await.unwrap();
        assert_eq!(p.offset, i + 1);
    }
    for client in [&mut a, &mut b] {
        for i in 0..200u64 {
            let m = next_msg(client).await;
            assert_eq!((m.channel.as_str(), m.offset), ("chat.order", i + 1));
            assert_eq!(m.data_value()["i"], i);
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_client_recovers_exactly_what_it_missed() {
    let server = TestServer::start(&[]).await;
    let mut publisher = Client::connect(&server.ws_url()).await.unwrap();
    let mut client = Client::connect(&server.ws_url()).await.unwrap();
    let ack = client.subscribe(&["chat.rec"]).await.unwrap();
    let epoch = ack.get("chat.rec").unwrap().epoch.clone();
    for i in 0..3 {
        publisher.publish("chat.rec", serde_json::json!(i)).await.unwrap();
    }
    let mut last = 0;
    for _ in 0..3 {
        last = next_msg(&mut client).await.offset;
    }
    client.close().await.unwrap();
    for i in 3..10 {
        publisher.publish("chat.rec", serde_json::json!(i)).await.unwrap();
    }
    let mut client = Client::connect(&server.ws_url()).await.unwrap();
    let recover =
        [("chat.rec".to_string(), Position { epoch: epoch.clone(), offset: last })].into();
    let ack = client.subscribe_recover(&["chat.rec"], &recover).await.unwrap();
    assert!(ack.get("chat.rec").unwrap().recovered);
    publisher.publish("chat.rec", serde_json::json!(10)).await.unwrap();
    let offsets: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(next_msg(&mut client).await.offset);
        }
        v
    };
    assert_eq!(offsets, (4..=11).collect::<Vec<_>>());
    server.shutdown().await;
}

/// Heartbeat in paused time: a ping every interval; no pong within the timeout closes 4009.
#[tokio::test(start_paused = true)]
async fn missing_pong_closes_with_4009_in_paused_time() {
    let server =
        TestServer::start(&["server.ping_interval_ms=25000", "server.pong_timeout_ms=10000"]).await;
    let opts = ConnectOptions::default().auto_pong(false).timeout(Duration::from_secs(3600));
    let mut client = Client::connect_with(&server.ws_url(), opts).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut pings = 0;
    let close = loop {
        match client.next_event().await.expect("event") {
            Event::Ping => pings += 1,
            Event::Closed(c) => break c,
            _ => {}
        }
    };
    assert_eq!(close.code, 4009, "{close}");
    assert_eq!(pings, 1);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(35) && elapsed < Duration::from_secs(36),
        "closed after {elapsed:?}, expected ping interval + pong timeout"
    );
    server.shutdown().await;
}

/// A client that answers every ping stays connected for as long as it likes.
#[tokio::test(start_paused = true)]
async fn answered_pings_keep_the_connection_open_in_paused_time() {
    let server =
        TestServer::start(&["server.ping_interval_ms=25000", "server.pong_timeout_ms=10000"]).await;
    let opts = ConnectOptions::default().timeout(Duration::from_secs(3600));
    let mut client = Client::connect_with(&server.ws_url(), opts).await.unwrap();
    let mut pings = 0;
    while pings < 10 {
        match client.next_event().await.expect("event") {
            Event::Ping => pings += 1,
            Event::Closed(c) => panic!("closed after {pings} pings: {c}"),
            _ => {}
        }
    }
    // Ten heartbeats answered: over four minutes of (paused) time without a close.
    assert!(client.ping().await.is_ok());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_that_stops_reading_is_closed_4008_and_others_are_unaffected() {
    let server = TestServer::start(&["server.queue_max_bytes=16384"]).await;
    let mut healthy = Client::connect(&server.ws_url()).await.unwrap();
    healthy.subscribe(&["ticks.SLOW"]).await.unwrap();
    let mut stalled = Client::connect(&server.ws_url()).await.unwrap();
    stalled.subscribe(&["ticks.SLOW"]).await.unwrap();
    // Publish straight into the hub; the stalled client never reads, so the kernel buffers
    // fill, then its queue, and the disconnect policy of ticks.* closes it.
    let payload = format!("\"{}\"", "x".repeat(1000));
    let hub = server.app.hub.clone();
    let mut published = 0u64;
    let mut healthy_seen = 0u64;
    while hub.metrics().slow_consumer_disconnects.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        // Bursts smaller than the queue budget, so a subscriber that reads keeps up.
        for _ in 0..8 {
            hub.publish("ticks.SLOW", payload.as_bytes(), ferrocast_hub::PublishKind::Retained)
                .unwrap();
            published += 1;
        }
        while healthy_seen < published {
            let m = next_msg(&mut healthy).await;
            healthy_seen += 1;
            assert_eq!(m.offset, healthy_seen, "healthy subscriber saw a gap");
        }
        assert!(published < 200_000, "no slow-consumer close after {published} messages");
    }
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled.next_event())
            .await
            .expect("close within 10 s")
        {
            Some(Event::Closed(c)) => break c,
            Some(_) => continue,
            None => panic!("ended without a close event"),
        }
    };
    assert_eq!(close.code, 4008, "{close}");
    // The healthy subscriber goes on receiving.
    hub.publish("ticks.SLOW", b"1", ferrocast_hub::PublishKind::Retained).unwrap();
    assert_eq!(next_msg(&mut healthy).await.offset, published + 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_every_client_with_1001_and_a_jittered_hint() {
    let server =
        TestServer::start(&["server.reconnect_after_ms=1000", "server.shutdown_grace_ms=5000"])
            .await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(&server.ws_url()).await.unwrap();
        c.subscribe(&["chat.drain"]).await.unwrap();
        clients.push(c);
    }
    let app = server.app.clone();
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                loop {
                    match c.next_event().await {
                        Some(Event::Closed(close)) => return close,
                        Some(_) => continue,
                        None => panic!("no close event"),
                    }
                }
            })
        })
        .collect();
    server.shutdown().await;
    assert!(app.shutdown.is_draining());
    let mut delays = std::collections::BTreeSet::new();
    for w in waiters {
        let close = w.await.unwrap();
        assert_eq!(close.code, 1001, "{close}");
        let hint: serde_json::Value = serde_json::from_str(&close.reason).unwrap();
        assert_eq!(hint["reconnect"], true);
        let after = hint["after_ms"].as_u64().unwrap();
        assert!((1000..=2000).contains(&after), "after_ms {after}");
        delays.insert(after);
    }
    assert!(delays.len() > 1, "reconnect hints are not jittered: {delays:?}");
    assert_eq!(app.shutdown.active_connections(), 0);
}

//! Hub behaviour through its public API: offsets, fan-out, recovery and snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ferrocast_hub::{
    ConnQueue, Hub, HubOptions, NamespaceConfig, Namespaces, OverflowPolicy, PublishKind,
    SnapshotMode,
};
use ferrocast_protocol::StreamPosition;
use ferrocast_protocol::server::{ChannelResult, SnapshotSent};
use proptest::prelude::*;

fn hub_with(ns: &[(&str, NamespaceConfig)]) -> Hub {
    let named: BTreeMap<String, NamespaceConfig> =
        ns.iter().map(|(n, c)| (n.to_string(), c.clone())).collect();
    Hub::new(Namespaces::new(named, NamespaceConfig::default()), HubOptions::default())
}

/// Offsets of everything queued, draining until the queue is empty (replays come in chunks).
fn offsets(q: &ConnQueue) -> Vec<u64> {
    let mut out = Vec::new();
    loop {
        let frames = q.drain().frames;
        if frames.is_empty() {
            return out;
        }
        out.extend(frames.iter().map(|f| {
            let v: serde_json::Value = serde_json::from_slice(&f.bytes).unwrap();
            v["offset"].as_u64().unwrap()
        }));
    }
}

fn subscribed(r: &ChannelResult) -> (String, u64, Option<bool>) {
    match r {
        ChannelResult::Subscribed { epoch, offset, recovered, .. } => {
            (epoch.clone(), *offset, *recovered)
        }
        other => panic!("not subscribed: {other:?}"),
    }
}

#[test]
fn fan_out_reaches_every_subscriber_once() {
    let hub = hub_with(&[]);
    let queues: Vec<_> = (1..=3).map(|i| Arc::new(ConnQueue::new(i, 1 << 20))).collect();
    for q in &queues {
        hub.subscribe("news.a", q, None);
    }
    for i in 0..5 {
        hub.publish("news.a", format!("{i}").as_bytes(), PublishKind::Retained).unwrap();
    }
    hub.publish("news.b", b"1", PublishKind::Retained).unwrap();
    for q in &queues {
        assert_eq!(offsets(q), vec![1, 2, 3, 4, 5]);
    }
    assert_eq!(hub.metrics().messages_in.load(std::sync::atomic::Ordering::Relaxed), 6);
}

#[test]
fn recovery_replays_exactly_the_gap() {
    let hub = hub_with(&[]);
    let q = Arc::new(ConnQueue::new(1, 1 << 20));
    let r = hub.subscribe("t.x", &q, None);
    let (epoch, _, _) = subscribed(&r.result);
    for _ in 0..3 {
        hub.publish("t.x", b"{}", PublishKind::Retained).unwrap();
    }
    assert_eq!(offsets(&q), vec![1, 2, 3]);
    assert!(hub.unsubscribe("t.x", 1));
    for _ in 0..4 {
        hub.publish("t.x", b"{}", PublishKind::Retained).unwrap();
    }
    let r = hub.subscribe("t.x", &q, Some(&StreamPosition { epoch: epoch.clone(), offset: 3 }));
    assert_eq!(subscribed(&r.result), (epoch.clone(), 7, Some(true)));
    hub.publish("t.x", b"{}", PublishKind::Retained).unwrap();
    assert_eq!(offsets(&q), vec![4, 5, 6, 7, 8]);

    // A wrong epoch cannot recover.
    hub.unsubscribe("t.x", 1);
    let r = hub.subscribe("t.x", &q, Some(&StreamPosition { epoch: "other".into(), offset: 3 }));
    assert_eq!(subscribed(&r.result).2, Some(false));
    assert!(offsets(&q).is_empty(), "no snapshot configured, so nothing is sent");
}

#[test]
fn recovery_fails_when_history_no_longer_covers_the_gap() {
    let ns = NamespaceConfig {
        history_size: 3,
        snapshot: SnapshotMode::Last,
        snapshot_size: 2,
        ..Default::default()
    };
    let hub = hub_with(&[("c", ns)]);
    let q = Arc::new(ConnQueue::new(1, 1 << 20));
    for _ in 0..10 {
        hub.publish("c.x", b"0", PublishKind::Retained).unwrap();
    }
    let epoch = hub.channels()[0].epoch.clone();
    let r = hub.subscribe("c.x", &q, Some(&StreamPosition { epoch, offset: 5 }));
    match r.result {
        ChannelResult::Subscribed { recovered, snapshot, .. } => {
            assert_eq!(recovered, Some(false));
            assert_eq!(snapshot, Some(SnapshotSent::Last { count: 2 }));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(offsets(&q), vec![9, 10]);
}

#[test]
fn latest_snapshot_prefers_the_forming_value() {
    let ns = NamespaceConfig { snapshot: SnapshotMode::Latest, ..Default::default() };
    let hub = hub_with(&[("q", ns)]);
    hub.publish("q.a", b"1", PublishKind::Retained).unwrap();
    hub.publish("q.a", b"2", PublishKind::Retained).unwrap();
    let q = Arc::new(ConnQueue::new(1, 1 << 20));
    hub.subscribe("q.a", &q, None);
    assert_eq!(offsets(&q), vec![2]);
    hub.publish("q.a", b"3", PublishKind::Ephemeral).unwrap();
    let q2 = Arc::new(ConnQueue::new(2, 1 << 20));
    hub.subscribe("q.a", &q2, None);
    let frames = q2.drain().frames;
    assert_eq!(frames.len(), 1);
    let v: serde_json::Value = serde_json::from_slice(&frames[0].bytes).unwrap();
    assert_eq!(
        (v["offset"].as_u64(), v["ephemeral"].as_bool(), v["data"].as_u64()),
        (Some(2), Some(true), Some(3))
    );
}

#[test]
fn slow_consumer_on_a_no_drop_namespace_is_marked_for_4008() {
    let ns = NamespaceConfig { overflow: OverflowPolicy::Disconnect, ..Default::default() };
    let hub = hub_with(&[("ticks", ns)]);
    let q = Arc::new(ConnQueue::new(1, 200));
    hub.subscribe("ticks.A", &q, None);
    for _ in 0..10 {
        hub.publish(
            "ticks.A",
            b"\"0123456789012345678901234567890123456789\"",
            PublishKind::Retained,
        )
        .unwrap();
    }
    let d = q.drain();
    assert!(d.overflowed);
    assert!(
        hub.metrics().slow_consumer_disconnects.load(std::sync::atomic::Ordering::Relaxed) >= 1
    );
}

#[test]
fn replay_and_live_meet_without_gap_or_duplicate_under_concurrent_publishing() {
    let ns = NamespaceConfig { history_size: 100_000, max_replay: 100_000, ..Default::default() };
    let hub = Arc::new(hub_with(&[("r", ns)]));
    let publisher = {
        let hub = hub.clone();
        std::thread::spawn(move || {
            for _ in 0..20_000 {
                hub.publish("r.x", b"0", PublishKind::Retained).unwrap();
            }
        })
    };
    // A client that reconnects over and over while publishing goes on: each connection has
    // a fresh queue (what was queued on the old one is lost with it) and recovers from the
    // last offset it actually received.
    let mut conn_id = 1;
    let mut q = Arc::new(ConnQueue::new(conn_id, usize::MAX));
    let first = hub.subscribe("r.x", &q, None);
    let (epoch, mut last, _) = subscribed(&first.result);
    let mut rounds = 0;
    let check = |q: &ConnQueue, last: &mut u64| {
        for o in offsets(q) {
            assert_eq!(o, *last + 1, "gap or duplicate at {o} after {last}");
            *last = o;
        }
    };
    while !publisher.is_finished() || rounds < 3 {
        check(&q, &mut last);
        hub.unsubscribe("r.x", conn_id);
        conn_id += 1;
        q = Arc::new(ConnQueue::new(conn_id, usize::MAX));
        let r =
            hub.subscribe("r.x", &q, Some(&StreamPosition { epoch: epoch.clone(), offset: last }));
        assert_eq!(subscribed(&r.result).2, Some(true));
        rounds += 1;
    }
    publisher.join().unwrap();
    check(&q, &mut last);
    // The loop stops once publishing is over and three rounds were made: on a busy machine
    // the publisher may finish during the third.
    assert!(rounds >= 3);
    assert_eq!(last, 20_000);
}

#[test]
fn idle_channels_expire_and_come_back_with_a_new_epoch() {
    let ns = NamespaceConfig { channel_ttl_ms: 0, ..Default::default() };
    let hub = hub_with(&[("e", ns)]);
    hub.publish("e.x", b"1", PublishKind::Retained).unwrap();
    let before = hub.channels()[0].epoch.clone();
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert_eq!(hub.sweep(Instant::now()), 1);
    assert!(hub.channels().is_empty());
    let p = hub.publish("e.x", b"1", PublishKind::Retained).unwrap();
    assert_eq!(p.offset, 1);
    assert_ne!(&*p.epoch, before.as_str());
}

proptest! {
    /// Offsets grow by one per channel, independently across channels, whatever the mix.
    #[test]
    fn offsets_grow_by_one_per_channel(ops in proptest::collection::vec((0usize..4, proptest::bool::ANY), 1..300)) {
        let hub = hub_with(&[]);
        let mut expected = [0u64; 4];
        for (ch, ephemeral) in ops {
            let name = format!("p.c{ch}");
            let kind = if ephemeral { PublishKind::Ephemeral } else { PublishKind::Retained };
            let p = hub.publish(&name, b"0", kind).unwrap();
            if !ephemeral {
                expected[ch] += 1;
            }
            prop_assert_eq!(p.offset, expected[ch]);
        }
    }
}

#[test]
fn channels_never_published_are_forgotten_when_their_last_subscriber_leaves() {
    let hub = hub_with(&[]);
    let q = Arc::new(ConnQueue::new(1, 1 << 20));
    for i in 0..10_000 {
        let channel = format!("churn.c{i}");
        assert!(hub.subscribe(&channel, &q, None).added);
        assert!(hub.unsubscribe(&channel, 1));
    }
    assert_eq!(hub.channels().len(), 0);
    assert_eq!(hub.metrics().channels.load(std::sync::atomic::Ordering::Relaxed), 0);

    // A subscriber that arrived before the first message still recovers exactly after the
    // empty channel was forgotten and then published to.
    let r = hub.subscribe("churn.early", &q, None);
    let (epoch, offset, _) = subscribed(&r.result);
    hub.unsubscribe("churn.early", 1);
    hub.publish("churn.early", b"1", PublishKind::Retained).unwrap();
    hub.publish("churn.early", b"2", PublishKind::Retained).unwrap();
    let r = hub.subscribe("churn.early", &q, Some(&StreamPosition { epoch, offset }));
    assert_eq!(subscribed(&r.result).2, Some(true));
    assert_eq!(offsets(&q), vec![1, 2]);
}

#[test]
fn the_channel_limit_refuses_creation_by_publish_and_subscribe() {
    let hub = Hub::new(
        Namespaces::new(BTreeMap::new(), NamespaceConfig::default()),
        HubOptions { max_channels: 3, ..HubOptions::default() },
    );
    for i in 0..3 {
        hub.publish(&format!("lim.c{i}"), b"1", PublishKind::Retained).unwrap();
    }
    let err = hub.publish("lim.c3", b"1", PublishKind::Retained).unwrap_err();
    assert!(matches!(err, ferrocast_hub::PublishError::ChannelLimit(3)), "{err}");
    // Existing channels still take messages.
    assert_eq!(hub.publish("lim.c0", b"2", PublishKind::Retained).unwrap().offset, 2);
    let q = Arc::new(ConnQueue::new(1, 1 << 20));
    let r = hub.subscribe("lim.c9", &q, None);
    assert!(!r.added);
    assert!(
        matches!(&r.result, ChannelResult::Failed { error } if error.code.as_str() == "channel_limit"),
        "{:?}",
        r.result
    );
    assert_eq!(hub.metrics().channels_refused.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn a_namespace_may_forbid_subscribes_that_create_channels() {
    let ns = NamespaceConfig { create_on_subscribe: false, ..Default::default() };
    let hub = hub_with(&[("closed", ns)]);
    let q = Arc::new(ConnQueue::new(1, 1 << 20));
    let r = hub.subscribe("closed.x", &q, None);
    assert!(!r.added);
    assert!(
        matches!(&r.result, ChannelResult::Failed { error } if error.code.as_str() == "unknown_channel"),
        "{:?}",
        r.result
    );
    hub.publish("closed.x", b"1", PublishKind::Retained).unwrap();
    assert!(hub.subscribe("closed.x", &q, None).added);
}

#[test]
fn channel_pages_cover_every_channel_once_in_order() {
    let hub = hub_with(&[]);
    for i in 0..250 {
        hub.publish(&format!("page.c{i:03}"), b"1", PublishKind::Retained).unwrap();
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = hub.channels_page(after.as_deref(), 100);
        assert_eq!(page.total, 250);
        seen.extend(page.channels.iter().map(|c| c.channel.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let expected: Vec<String> = (0..250).map(|i| format!("page.c{i:03}")).collect();
    assert_eq!(seen, expected);
}

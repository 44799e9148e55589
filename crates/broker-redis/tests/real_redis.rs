//! The Redis broker against a real `redis-server` started on a free port (Debian's
//! `redis-server` package; scripts/test installs it): two hubs stand for two nodes.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrocast_broker_redis::{RedisBroker, RedisOptions};
use ferrocast_hub::{Broker, ConnQueue, Hub, HubOptions, NamespaceConfig, Namespaces, PublishKind};
use ferrocast_protocol::StreamPosition;
use ferrocast_protocol::server::ChannelResult;

/// A redis-server without persistence, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port }
    }

    fn node(&self) -> (Arc<Hub>, Arc<RedisBroker>) {
        let ns = NamespaceConfig { history_size: 1000, ..NamespaceConfig::default() };
        let hub =
            Arc::new(Hub::new(Namespaces::new(Default::default(), ns), HubOptions::default()));
        let options = RedisOptions {
            url: format!("redis://127.0.0.1:{}/0", self.port),
            prefix: "test".into(),
            timeout: Duration::from_secs(2),
            position_check: Duration::from_secs(60),
            meta_ttl: Duration::from_secs(3600),
            ready_grace: Duration::from_secs(1),
            tls_ca: None,
            cluster_urls: Vec::new(),
            sentinels: Vec::new(),
            sentinel_master: String::new(),
        };
        let broker = RedisBroker::start(hub.clone(), options).unwrap();
        (hub, broker)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Offsets of the messages a queue holds now.
fn drained_offsets(q: &ConnQueue) -> Vec<u64> {
    q.drain()
        .frames
        .iter()
        .filter(|f| f.is_message())
        .map(|f| {
            serde_json::from_slice::<serde_json::Value>(&f.bytes).unwrap()["offset"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

async fn wait_for_offsets(q: &ConnQueue, count: usize) -> Vec<u64> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < count {
        assert!(Instant::now() < deadline, "only {} of {count} messages: {got:?}", got.len());
        got.extend(drained_offsets(q));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    got
}

async fn subscribe(
    hub: &Hub,
    broker: &RedisBroker,
    channel: &str,
    conn: u64,
    recover: Option<&StreamPosition>,
) -> (Arc<ConnQueue>, ChannelResult) {
    broker.prepare_subscribe(channel, recover).expect("redis prepares").await.unwrap();
    let q = Arc::new(ConnQueue::new(conn, 1 << 24));
    let sub = hub.subscribe(channel, &q, recover);
    (q, sub.result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unawaited_publishes_from_one_node_keep_their_order_across_nodes() {
    let redis = Redis::start();
    let (_hub_a, a) = redis.node();
    let (hub_b, b) = redis.node();
    let (q, result) = subscribe(&hub_b, &b, "chat.order", 1, None).await;
    let ChannelResult::Subscribed { epoch, offset: 0, .. } = result else { panic!("{result:?}") };

    // Fire-and-forget, as feeds publish: only the last answer is awaited.
    let mut last = None;
    for i in 0..300 {
        last = Some(a.publish("chat.order", i.to_string().as_bytes(), PublishKind::Retained));
    }
    let published = last.unwrap().wait().await.unwrap();
    assert_eq!(published.offset, 300);
    assert_eq!(*published.epoch, epoch, "the epoch b saw on subscribe is the shared one");
    assert_eq!(wait_for_offsets(&q, 300).await, (1..=300).collect::<Vec<_>>());
    let page = b.history("chat.order", 295, 10).wait().await.unwrap().unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![296, 297, 298, 299, 300]
    );
    assert_eq!(&page.messages[0].1[..], b"295");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_held_a_channel_recovers_it_from_redis() {
    let redis = Redis::start();
    let (_hub_a, a) = redis.node();
    let (hub_c, c) = redis.node();
    let mut epoch = String::new();
    for i in 1..=50u64 {
        let p = a.publish("chat.rec", b"{}", PublishKind::Retained).wait().await.unwrap();
        assert_eq!(p.offset, i);
        epoch = p.epoch.to_string();
    }
    assert!(c.history("chat.none", 0, 10).wait().await.unwrap().is_none());
    let pos = StreamPosition { epoch: epoch.clone(), offset: 20 };
    let (q, result) = subscribe(&hub_c, &c, "chat.rec", 7, Some(&pos)).await;
    let ChannelResult::Subscribed { recovered: Some(true), replayed: Some(30), offset: 50, .. } =
        result
    else {
        panic!("{result:?}")
    };
    assert_eq!(wait_for_offsets(&q, 30).await, (21..=50).collect::<Vec<_>>());
    let stale = StreamPosition { epoch: "other".into(), offset: 20 };
    let (_q, result) = subscribe(&hub_c, &c, "chat.rec", 8, Some(&stale)).await;
    assert!(
        matches!(result, ChannelResult::Subscribed { recovered: Some(false), .. }),
        "{result:?}"
    );
}

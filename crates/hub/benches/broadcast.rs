//! Criterion benches for the hub's hot path: one publish fanned out to many subscriber queues.

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::collections::BTreeMap;
use std::time::Instant;

use ferrocast_hub::{
    ConnQueue, Hub, HubOptions, NamespaceConfig, Namespaces, OverflowPolicy, PublishKind,
};

fn broadcast(c: &mut Criterion) {
    let data = br#"{"sym":"AAPL","price":189.52,"size":100,"ts":1732230000123,"src":"sim","pad":"xxxxxxxxxxxx"}"#;
    let mut g = c.benchmark_group("broadcast");
    for subscribers in [1usize, 100, 1000] {
        let hub = Hub::new(Namespaces::default(), HubOptions::default());
        let queues: Vec<_> =
            (1..=subscribers as u64).map(|i| Arc::new(ConnQueue::new(i, 1 << 30))).collect();
        for q in &queues {
            hub.subscribe("bench.0", q, None);
        }
        g.throughput(Throughput::Elements(subscribers as u64));
        g.bench_with_input(
            BenchmarkId::new("publish_fanout", subscribers),
            &subscribers,
            |b, _| {
                let mut n = 0u32;
                b.iter(|| {
                    hub.publish("bench.0", data, PublishKind::Retained).unwrap();
                    n += 1;
                    // Writers drain in the real server; keep queues short so memory stays flat.
                    if n.is_multiple_of(64) {
                        for q in &queues {
                            drop(q.drain());
                        }
                    }
                })
            },
        );
    }
    // A batch of 16 to one channel as one run: one lock hold, one wake-up per writer.
    let subscribers = 1000usize;
    let hub = Hub::new(Namespaces::default(), HubOptions::default());
    let queues: Vec<_> =
        (1..=subscribers as u64).map(|i| Arc::new(ConnQueue::new(i, 1 << 30))).collect();
    for q in &queues {
        hub.subscribe("bench.0", q, None);
    }
    let run: Vec<&[u8]> = vec![&data[..]; 16];
    g.throughput(Throughput::Elements((subscribers * run.len()) as u64));
    g.bench_function(BenchmarkId::new("publish_run_16", subscribers), |b| {
        let mut n = 0u32;
        b.iter(|| {
            let (_, stopped) = hub.publish_run("bench.0", &run, PublishKind::Retained);
            assert!(stopped.is_none());
            n += 1;
            if n.is_multiple_of(4) {
                for q in &queues {
                    drop(q.drain());
                }
            }
        })
    });
    g.finish();
}

/// A publish into a subscriber queue that is already full (a client that stopped reading),
/// for each overflow policy that keeps the subscriber: the cost must not grow with what the
/// queue holds (no scan of the queue under the channel lock).
fn publish_into_full_queue(c: &mut Criterion) {
    let data = br#"{"sym":"AAPL","bid":189.52,"ask":189.54,"ts":1732230000123}"#;
    let mut g = c.benchmark_group("publish_into_full_queue");
    for policy in [OverflowPolicy::Conflate, OverflowPolicy::DropOldest] {
        for queued in [1_000usize, 10_000, 100_000] {
            let ns = NamespaceConfig { overflow: policy, ..Default::default() };
            let named = BTreeMap::from([("q".to_string(), ns)]);
            let hub =
                Hub::new(Namespaces::new(named, NamespaceConfig::default()), HubOptions::default());
            // A budget that holds `queued` messages, filled by 1,000 other channels first.
            let frame_cost = ferrocast_hub::queue::ENTRY_COST + 110;
            let queue = Arc::new(ConnQueue::new(1, queued * frame_cost));
            let now = Instant::now();
            for i in 0..queued as u64 {
                queue.push(bytes::Bytes::from(vec![b'x'; 110]), 1_000_000 + i % 1_000, now, policy);
            }
            hub.subscribe("q.AAPL", &queue, None);
            g.bench_with_input(BenchmarkId::new(policy.as_str(), queued), &queued, |b, _| {
                b.iter(|| hub.publish("q.AAPL", data, PublishKind::Retained).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, broadcast, publish_into_full_queue);
criterion_main!(benches);

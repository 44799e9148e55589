//! Criterion benches for the hub's hot path: one publish fanned out to many subscriber queues.

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferrocast_hub::{ConnQueue, Hub, HubOptions, Namespaces, PublishKind};

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
    g.finish();
}

criterion_group!(benches, broadcast);
criterion_main!(benches);

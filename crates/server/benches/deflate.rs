//! permessage-deflate's cost per message: what one compression costs ferrocast once per
//! message, and what a server that compresses per connection (Centrifugo, most others) pays
//! once per subscriber. Shapes: the simulator's trade (`msg` frame of ~190 bytes) and a 2 KiB
//! JSON document.
//!
//! `cargo bench -p ferrocast-server --bench deflate`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferrocast_server::ws::deflate::{DeflateMetrics, compress, inflate};

fn tick() -> String {
    r#"{"type":"msg","channel":"ticks.AAPL","offset":1234,"epoch":"vsa7qoff","data":{"sym":"AAPL","price":230.03,"size":1000.0,"ts":1796470871358,"exchange":4,"id":"1234","seq":1234,"src":"sim"}}"#.to_owned()
}

fn doc() -> String {
    let levels: Vec<String> = (0..48)
        .map(|k| {
            format!(
                r#"{{"price":{:.2},"size":{},"orders":{}}}"#,
                180.0 + k as f64 * 0.01,
                100 * (1 + k % 17),
                1 + (k * 7) % 9
            )
        })
        .collect();
    format!(
        r#"{{"type":"msg","channel":"books.AAPL","offset":77,"epoch":"vsa7qoff","data":{{"sym":"AAPL","ts":1796470871358,"side":"bid","levels":[{}]}}}}"#,
        levels.join(",")
    )
}

fn bench(c: &mut Criterion) {
    let metrics = DeflateMetrics::default();
    let mut group = c.benchmark_group("deflate");
    for (name, frame) in [("tick", tick()), ("doc_2k", doc())] {
        let z = compress(frame.as_bytes(), &metrics);
        eprintln!("{name}: {} bytes -> {} compressed", frame.len(), z.len());
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(format!("compress_{name}"), |b| {
            b.iter(|| compress(std::hint::black_box(frame.as_bytes()), &metrics))
        });
        group.bench_function(format!("inflate_{name}"), |b| {
            b.iter(|| inflate(std::hint::black_box(&z), 1 << 20).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

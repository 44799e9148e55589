//! Criterion benches for the native codec: the hot `msg` encoder and the client-frame parser.

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use ferrocast_protocol::{parse_client_frame, server::encode_msg};

fn codec(c: &mut Criterion) {
    let data = br#"{"sym":"AAPL","price":189.52,"size":100,"ts":1732230000123,"src":"sim","pad":"xxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_msg_100B", |b| {
        b.iter(|| encode_msg(black_box("ticks.AAPL"), black_box(123_456), "k3x9p2qa", data, false))
    });
    let publish =
        r#"{"op":"publish","id":3,"channel":"chat.lobby","data":{"text":"hello","n":[1,2,3]}}"#;
    g.bench_function("parse_publish", |b| {
        b.iter(|| parse_client_frame(black_box(publish)).unwrap())
    });
    let sub = r#"{"op":"subscribe","id":1,"channels":["ticks.AAPL","quotes.AAPL","candles.AAPL.1m"],"recover":{"ticks.AAPL":{"epoch":"e","offset":41}}}"#;
    g.bench_function("parse_subscribe", |b| b.iter(|| parse_client_frame(black_box(sub)).unwrap()));
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);

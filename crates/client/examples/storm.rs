//! Reconnect-storm participant: N clients of this crate subscribe to one channel, drop their
//! connections at random points, reconnect with recovery, and check that they end with every
//! message exactly once and in order. Used by the end-to-end reconnect-storm test together
//! with clients of another library.
//!
//! Usage: `storm URL CHANNEL CLIENTS EXPECTED [DROPS_PER_CLIENT]`. Prints `ready` once every
//! client is subscribed, then one JSON line per client when it has seen EXPECTED messages:
//! `{"client":i,"received":N,"in_order":true,"reconnects":K,"recovered":true}`.

use std::collections::BTreeMap;
use std::time::Duration;

use ferrocast_client::{Client, Event, Position};
use rand::Rng;

struct Args {
    url: String,
    channel: String,
    clients: usize,
    expected: u64,
    drops: usize,
}

fn args() -> Args {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        eprintln!("usage: storm URL CHANNEL CLIENTS EXPECTED [DROPS_PER_CLIENT]");
        std::process::exit(2);
    }
    Args {
        url: a[1].clone(),
        channel: a[2].clone(),
        clients: a[3].parse().expect("CLIENTS"),
        expected: a[4].parse().expect("EXPECTED"),
        drops: a.get(5).map_or(3, |d| d.parse().expect("DROPS_PER_CLIENT")),
    }
}

#[tokio::main]
async fn main() {
    let args = args();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(args.clients);
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let (url, channel, ready) = (args.url.clone(), args.channel.clone(), ready_tx.clone());
        let (expected, drops) = (args.expected, args.drops);
        tasks.push(tokio::spawn(async move {
            participant(i, url, channel, expected, drops, ready).await
        }));
    }
    drop(ready_tx);
    for _ in 0..args.clients {
        ready_rx.recv().await.expect("a client failed before subscribing");
    }
    println!("ready");
    let mut ok = true;
    for t in tasks {
        let line = t.await.expect("client task panicked");
        ok &= line["in_order"] == true && line["received"] == args.expected;
        println!("{line}");
    }
    std::process::exit(if ok { 0 } else { 1 });
}

async fn participant(
    id: usize,
    url: String,
    channel: String,
    expected: u64,
    drops: usize,
    ready: tokio::sync::mpsc::Sender<()>,
) -> serde_json::Value {
    // Drop points: after how many received messages this client cuts its connection.
    let mut drop_at: Vec<u64> = {
        let mut rng = rand::rng();
        (0..drops).map(|_| rng.random_range(1..expected)).collect()
    };
    drop_at.sort_unstable();
    drop_at.reverse();
    let mut last = 0u64;
    let mut epoch = String::new();
    let mut in_order = true;
    let mut reconnects = 0;
    let mut all_recovered = true;
    let mut ready = Some(ready);
    while last < expected {
        let mut client = match Client::connect(&url).await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ack = if epoch.is_empty() {
            client.subscribe(&[channel.as_str()]).await
        } else {
            let recover: BTreeMap<String, Position> =
                [(channel.clone(), Position { epoch: epoch.clone(), offset: last })].into();
            client.subscribe_recover(&[channel.as_str()], &recover).await
        };
        let Ok(ack) = ack else { continue };
        let Some(sub) = ack.get(&channel) else { continue };
        if epoch.is_empty() {
            epoch = sub.epoch.clone();
            last = sub.offset;
        } else {
            all_recovered &= sub.recovered;
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(()).await;
        }
        loop {
            match client.next_event().await {
                Some(Event::Msg(m)) => {
                    in_order &=
                        m.offset == last + 1 && m.data_value() == serde_json::json!(m.offset);
                    last = m.offset;
                    if last >= expected {
                        break;
                    }
                    if drop_at.last().is_some_and(|d| last >= *d) {
                        drop_at.pop();
                        break;
                    }
                }
                Some(Event::Closed(_)) | None => break,
                Some(_) => {}
            }
        }
        if last < expected {
            reconnects += 1;
            // Abrupt: drop the socket without a close handshake, like a network failure.
            drop(client);
        } else {
            let _ = client.close().await;
        }
    }
    serde_json::json!({
        "client": id,
        "received": last,
        "in_order": in_order,
        "reconnects": reconnects,
        "recovered": all_recovered,
    })
}

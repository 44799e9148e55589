//! `ferrocast bench --recovery N`: how fast one reconnecting client catches up.
//!
//! Publishes N messages on a fresh channel while no one listens, then connects one client
//! that subscribes with `recover` from the channel's start and times how long the replay of
//! all N missed messages takes to arrive (from sending the subscribe to the last message).
//! With several `--url`s (a cluster), the channel is opened and published through the first
//! node and recovered on the last: the replay comes from the broker, not from a node that
//! saw the messages.
//! The channel's namespace must retain at least N messages and allow replaying them, e.g.
//! `--set namespaces.bench.history_size=100000 --set namespaces.bench.max_replay=100000`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use ferrocast_client::{Client, ConnectOptions, HttpClient, LeanConn, LeanFrame};
use serde_json::json;

use super::{BenchArgs, http_base, scan_messages, servers_stats};

pub async fn run(args: &BenchArgs, messages: u64) -> anyhow::Result<ExitCode> {
    let channel = format!("{}.recovery-{}", args.channel_prefix, std::process::id());
    let (first_url, recover_url) = match (args.url.first(), args.url.last()) {
        (Some(first), Some(last)) => (first, last),
        _ => bail!("--url must name at least one server"),
    };
    let mut first = Client::connect(first_url).await.context("connecting")?;
    let ack = first.subscribe(&[channel.as_str()]).await?;
    let start = ack.get(&channel).with_context(|| format!("subscribe refused: {ack:?}"))?.clone();
    first.close().await?;

    // Fill the history while nobody is connected.
    let base = match args.publish_url.first() {
        Some(url) => url.clone(),
        None => http_base(first_url)?,
    };
    let mut http = HttpClient::new(&base)?;
    if let Some(key) = &args.api_key {
        http = http.with_api_key(key);
    }
    let pad = "x".repeat(args.payload.saturating_sub(40));
    let mut published = 0;
    while published < messages {
        let n = (messages - published).min(1000);
        let batch: Vec<_> = (0..n)
            .map(|i| json!({"channel": channel, "data": {"s": published + i, "p": pad}}))
            .collect();
        let body = serde_json::to_vec(&json!({ "messages": batch }))?;
        let resp = http.post_json("/api/publish", &body).await?;
        if resp.status != 200 {
            bail!("publish answered {}: {}", resp.status, String::from_utf8_lossy(&resp.body));
        }
        published += n;
    }

    let cpu_before = servers_stats(&args.server_pid)?;
    let (mut conn, _welcome) = LeanConn::connect(recover_url, &ConnectOptions::default()).await?;
    let t0 = Instant::now();
    let subscribe = json!({
        "op": "subscribe", "id": 1, "channels": [channel],
        "recover": { channel.clone(): { "epoch": start.epoch, "offset": start.offset } },
    });
    conn.send_text(&subscribe.to_string()).await?;
    let (mut received, mut next, mut recovered, mut out_of_order) =
        (0u64, start.offset + 1, None, 0u64);
    while received < messages {
        conn.read_batch(|frame| {
            let LeanFrame::Text(text) = frame else { return };
            let is_ack = text.windows(12).any(|w| w == br#""type":"ack""#);
            if recovered.is_none() && is_ack {
                recovered = Some(text.windows(16).any(|w| w == br#""recovered":true"#));
                return;
            }
            received += scan_messages(text, |offset, _| {
                out_of_order += u64::from(offset != next);
                next = offset + 1;
            });
        })
        .await?;
        if recovered == Some(false) {
            bail!(
                "the server could not replay {messages} messages (recovered: false): raise \
                 namespaces.{}.history_size and max_replay",
                args.channel_prefix
            );
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = match (servers_stats(&args.server_pid)?, cpu_before) {
        (Some(after), Some(before)) => Some(after.cpu_secs - before.cpu_secs),
        _ => None,
    };
    let report = json!({
        "mode": "recovery",
        "messages": messages,
        "payload_bytes": args.payload,
        "seconds": elapsed,
        "messages_per_sec": messages as f64 / elapsed,
        "out_of_order": out_of_order,
        "server_cpu_secs": cpu,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "recovery  {messages} missed messages replayed to one client in {:.3} s: {:.0} msgs/s{}{}",
            elapsed,
            messages as f64 / elapsed,
            if out_of_order == 0 { ", in order" } else { ", OUT OF ORDER" },
            cpu.map(|c| format!(", server {c:.2} cpu-s")).unwrap_or_default()
        );
    }
    Ok(if out_of_order == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

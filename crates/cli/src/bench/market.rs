//! `ferrocast bench --market`: the market-data shape. Nothing is published by the bench: a
//! server's Massive feed reads `ferrocast simulate massive` and publishes one `ticks.SYM`
//! message per trade, and the server builds `candles.SYM.1s` from them (a retained bar per
//! closed second, an ephemeral forming bar per trade). Subscriber `i` watches
//! `--symbols-per-subscriber` symbols of `MKT0 .. MKT{N-1}` drawn by a generator seeded with
//! `i` (the same draw every run): their trade and 1-second candle channels, in one subscribe.
//!
//! What it counts, per subscriber and channel (no JSON parsing on the hot path):
//! * the subscribe ack's offset is the channel's base: retained messages at or below it are
//!   the snapshot (candle history, backfilled bars), not deliveries;
//! * a retained message above the last one seen by more than one is a gap (lost messages);
//! * a forming bar (`"ephemeral":true`) carries the offset of the last retained message: equal
//!   to the last one seen is normal, above it means retained messages were missed (a gap);
//! * a message for a channel whose ack has not been read yet is counted as `before_ack` (the
//!   server queues the ack ahead of every message of the channels it subscribes, so this
//!   must stay 0).
//!
//! Trades published are read from the server (`GET /api/channels`: the `ticks.*` offsets at
//! the start and end of the window); after the window the bench waits (up to `--drain`) for
//! every subscriber to reach the offsets the channels had at its end, and what is still
//! missing then is lost. Latency is the trade's own timestamp (`ts`, whole milliseconds, set
//! by the simulator) to receipt: it spans simulator, connector, hub and socket.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferrocast_client::frame::{ServerFrame, decode_text};
use ferrocast_client::{HttpClient, LeanConn, LeanFrame};
use rand::SeedableRng;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};

use super::{
    BenchArgs, PONG, Plan, STATE_CONNECTING, STATE_FAILED, STATE_LIVE, STATS, SetupOutcome,
    collect_setup, connect_options, drain, human_report, latency_json, lock, merged_stats, pace,
    parse_u64, proc_stats, server_json, servers_stats, setup_json, unix_ns,
};
use crate::progress::{Progress, human_rate};

/// Symbols are `MKT0`, `MKT1`, ...: the simulator trades whatever the feed subscribes to.
const SYMBOL_PREFIX: &str = "MKT";
/// The candle interval every subscriber watches.
const CANDLE_SUFFIX: &str = ".1s";
/// Offset not known yet (before the subscribe ack).
const UNKNOWN: u64 = u64::MAX;
/// Longest wait for the subscribe ack once connected.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// What `--market` subscribers received, by kind (kept with the other per-thread counters).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counts {
    trades: u64,
    closed_candles: u64,
    forming_candles: u64,
    /// Retained messages at or below the ack's offset: the subscribe snapshot.
    snapshot: u64,
    /// Messages of a channel whose subscribe ack had not been read.
    before_ack: u64,
    /// Messages of channels the subscriber did not ask for.
    unexpected: u64,
}

impl Counts {
    pub(super) fn merge(&mut self, other: &Counts) {
        self.trades += other.trades;
        self.closed_candles += other.closed_candles;
        self.forming_candles += other.forming_candles;
        self.snapshot += other.snapshot;
        self.before_ack += other.before_ack;
        self.unexpected += other.unexpected;
    }
}

/// Channel ids: symbol `s` has its trades on id `2s` and its candles on id `2s + 1`.
fn channel_name(id: u32) -> String {
    let sym = id / 2;
    if id.is_multiple_of(2) {
        format!("ticks.{SYMBOL_PREFIX}{sym}")
    } else {
        format!("candles.{SYMBOL_PREFIX}{sym}{CANDLE_SUFFIX}")
    }
}

/// The id of a channel of the bench's universe of `symbols`, from its name.
fn channel_id(name: &[u8], symbols: usize) -> Option<u32> {
    let (digits, kind) = if let Some(rest) = name.strip_prefix(b"ticks.MKT") {
        (rest, 0)
    } else {
        let rest = name.strip_prefix(b"candles.MKT")?;
        (rest.strip_suffix(CANDLE_SUFFIX.as_bytes())?, 1)
    };
    let (sym, end) = parse_u64(digits, 0)?;
    (end == digits.len() && (sym as usize) < symbols).then(|| sym as u32 * 2 + kind)
}

/// One subscriber as the coordinator sees it.
struct Watcher {
    /// Channel ids watched, ascending.
    channels: Vec<u32>,
    /// Per watched channel: the offset in the subscribe ack (`UNKNOWN` until read).
    base: Vec<AtomicU64>,
    /// Per watched channel: the highest retained offset received or acknowledged.
    last: Vec<AtomicU64>,
    /// `STATE_*`, or the close code (≥ 1000) once the connection ended.
    state: AtomicU32,
    source: Option<std::net::IpAddr>,
}

impl Watcher {
    /// Subscriber `index`'s draw of `per` symbols out of `symbols`.
    fn new(index: usize, symbols: usize, per: usize, plan: &Plan) -> Watcher {
        let mut rng = rand::rngs::StdRng::seed_from_u64(index as u64);
        let mut channels: Vec<u32> = rand::seq::index::sample(&mut rng, symbols, per)
            .into_iter()
            .flat_map(|sym| [sym as u32 * 2, sym as u32 * 2 + 1])
            .collect();
        channels.sort_unstable();
        let unknown = || channels.iter().map(|_| AtomicU64::new(UNKNOWN)).collect();
        Watcher {
            base: unknown(),
            last: unknown(),
            channels,
            state: AtomicU32::new(STATE_CONNECTING),
            source: (!plan.source_ips.is_empty())
                .then(|| plan.source_ips[index % plan.source_ips.len()]),
        }
    }

    fn local(&self, id: u32) -> Option<usize> {
        self.channels.binary_search(&id).ok()
    }
}

/// What every subscriber task shares.
struct MarketCtx {
    plan: Arc<Plan>,
    symbols: usize,
    watchers: Vec<Watcher>,
    /// Measurement window in UNIX ns (`u64::MAX`: not yet), as in the other modes.
    window_start: AtomicU64,
    window_end: AtomicU64,
    unsubscribed: AtomicU64,
    server_errors: AtomicU64,
}

/// Runs the market-data bench against the server at `--url` (one node, one process).
pub async fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let plan = Arc::new(Plan::new(args)?);
    if plan.ws_urls.len() != 1 {
        bail!("--market measures one server: give one --url");
    }
    if plan.processes != 1 {
        bail!(
            "--market runs its {} subscribers in one process: raise the open-file limit (ulimit -n) or use fewer",
            plan.subscribers
        );
    }
    if args.symbols == 0 || !(1..=args.symbols).contains(&args.symbols_per_subscriber) {
        bail!("--symbols-per-subscriber must be between 1 and --symbols ({})", args.symbols);
    }
    let progress = Progress::new(plan.json);
    let mut api = HttpClient::new(&plan.http_urls[0])?.with_timeout(Duration::from_secs(60));
    if let Some(key) = &plan.api_key {
        api = api.with_api_key(key);
    }
    let ctx = Arc::new(MarketCtx {
        watchers: (0..plan.subscribers)
            .map(|i| Watcher::new(i, args.symbols, args.symbols_per_subscriber, &plan))
            .collect(),
        plan: Arc::clone(&plan),
        symbols: args.symbols,
        window_start: AtomicU64::new(u64::MAX),
        window_end: AtomicU64::new(u64::MAX),
        unsubscribed: AtomicU64::new(0),
        server_errors: AtomicU64::new(0),
    });

    let started = Instant::now();
    let (stop, stop_rx) = watch::channel(false);
    let (setup_tx, mut setup_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(plan.connect_concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..ctx.watchers.len() {
        let (ctx, gate, setup_tx, stop_rx) =
            (Arc::clone(&ctx), Arc::clone(&gate), setup_tx.clone(), stop_rx.clone());
        tasks.spawn(subscriber(ctx, index, gate, setup_tx, stop_rx));
    }
    drop(setup_tx);
    let total = ctx.watchers.len() as u64;
    let setup = collect_setup(&mut setup_rx, total, started, Some(&progress)).await;
    if setup.connected == 0 {
        progress.clear();
        eprintln!(
            "bench: no subscriber could connect and subscribe at {}: {}",
            plan.ws_urls[0],
            setup.errors.first().map_or("unknown error", String::as_str)
        );
        return Ok(ExitCode::FAILURE);
    }

    let mut live = live_line();
    pace(&progress, plan.warmup, "warmup", setup.connected, &mut live).await;
    let tops_start = channel_tops(&mut api, ctx.symbols).await?;
    // When the server answered: under load its HTTP answers come late, so the trades between
    // the two reads are counted over the time between the answers, not the window's.
    let tops_start_at = Instant::now();
    let start_ns = unix_ns();
    ctx.window_start.store(start_ns, Relaxed);
    let server_start = servers_stats(&plan.server_pids)?;
    let bench_cpu0 = proc_stats("self").map_or(0.0, |s| s.cpu_secs);
    let window_started = Instant::now();
    pace(&progress, plan.duration, "measuring", setup.connected, &mut live).await;
    ctx.window_end.store(unix_ns(), Relaxed);
    let elapsed = window_started.elapsed().as_secs_f64();
    let server_end = servers_stats(&plan.server_pids)?;
    let tops_end = channel_tops(&mut api, ctx.symbols).await?;
    let trades_secs = tops_start_at.elapsed().as_secs_f64();

    progress.show("draining");
    let behind = || {
        ctx.watchers
            .iter()
            .filter(|w| w.state.load(Relaxed) == STATE_LIVE)
            .filter(|w| {
                w.channels.iter().zip(&w.last).any(|(&c, last)| {
                    let last = last.load(Relaxed);
                    last == UNKNOWN || last < tops_end[c as usize]
                })
            })
            .count()
    };
    drain(behind, plan.drain).await;
    let bench_cpu_secs = proc_stats("self").map_or(0.0, |s| s.cpu_secs - bench_cpu0);
    let mut tally = Tally::default();
    for w in &ctx.watchers {
        let state = w.state.load(Relaxed);
        if state == STATE_FAILED || state == STATE_CONNECTING {
            continue;
        }
        if state >= 1000 {
            *tally.closes.entry(state.to_string()).or_default() += 1;
        }
        for ((&c, base), last) in w.channels.iter().zip(&w.base).zip(&w.last) {
            let (base, last) = (base.load(Relaxed), last.load(Relaxed));
            if base == UNKNOWN {
                continue;
            }
            let target = tops_end[c as usize];
            tally.expected += target.saturating_sub(base);
            tally.never_received += target.saturating_sub(last.max(base));
        }
    }
    let _ = stop.send(true);
    let close_all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), close_all).await.is_err() {
        tasks.abort_all();
    }
    progress.clear();

    let moved = |kind: u32| -> u64 {
        tops_end
            .iter()
            .zip(&tops_start)
            .enumerate()
            .filter(|(c, _)| *c as u32 % 2 == kind)
            .map(|(_, (end, start))| end.saturating_sub(*start))
            .sum()
    };
    let stats = merged_stats();
    let m = stats.market;
    let lost = stats.gaps + tally.never_received;
    let mut report = json!({
        "config": {
            "market": true,
            "url": plan.ws_urls,
            "subscribers": plan.subscribers,
            "symbols": ctx.symbols,
            "symbols_per_subscriber": args.symbols_per_subscriber,
            "channels": ctx.symbols * 2,
            "duration_secs": plan.duration.as_secs_f64(),
            "warmup_secs": plan.warmup.as_secs_f64(),
            "processes": 1,
        },
        "setup": setup_json(&setup),
        "measured_secs": elapsed,
        "bench_cpu_secs": bench_cpu_secs,
        "feed": {
            "trades": moved(0),
            "trades_per_sec": moved(0) as f64 / trades_secs.max(1e-9),
            "trades_secs": trades_secs,
            "closed_candles": moved(1),
        },
        "delivery": {
            "delivered": stats.delivered_total,
            "delivered_in_window": stats.delivered_window,
            "per_sec": stats.delivered_window as f64 / elapsed.max(1e-9),
            "expected": tally.expected,
            "lost": lost,
            "lost_gaps": stats.gaps,
            "lost_never_received": tally.never_received,
            "duplicates": stats.duplicates,
            "unsubscribed": ctx.unsubscribed.load(Relaxed),
            "server_errors": ctx.server_errors.load(Relaxed),
            "disconnects": tally.closes,
            "by_kind": {
                "trades": m.trades,
                "closed_candles": m.closed_candles,
                "forming_candles": m.forming_candles,
                "snapshot": m.snapshot,
                "before_ack": m.before_ack,
                "unexpected": m.unexpected,
            },
        },
    });
    report["latency_ms"] = latency_json(&stats.latency);
    report["latency_ms"]["clock"] =
        json!("trades only: the trade's ts (whole ms, set by the simulator) to receipt");
    if let (Some(start), Some(end)) = (&server_start, &server_end) {
        report["server"] =
            server_json(&plan.server_pids, start, end, elapsed, stats.delivered_window);
    }
    if plan.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", human_report(&report));
    }
    Ok(if stats.delivered_total > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// End-of-run bookkeeping over every watcher.
#[derive(Default)]
struct Tally {
    expected: u64,
    never_received: u64,
    closes: BTreeMap<String, u64>,
}

/// The live status line: deliveries per second since the previous call, and losses.
fn live_line() -> impl FnMut() -> (f64, String) {
    let mut previous: Option<(Instant, u64)> = None;
    move || {
        let stats = merged_stats();
        let now = Instant::now();
        let rate = previous.map_or(0.0, |(at, delivered)| {
            (stats.delivered_total - delivered) as f64
                / now.duration_since(at).as_secs_f64().max(1e-9)
        });
        previous = Some((now, stats.delivered_total));
        let trades = stats.market.trades;
        (rate, format!("trades received {} | lost {}", human_rate(trades as f64), stats.gaps))
    }
}

/// The retained top offset of every channel of the universe (0 for channels not held),
/// from `GET /api/channels`, page by page.
async fn channel_tops(api: &mut HttpClient, symbols: usize) -> anyhow::Result<Vec<u64>> {
    let mut tops = vec![0; symbols * 2];
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(name) => format!("/api/channels?limit=10000&after={}", urlencode(name)),
            None => "/api/channels?limit=10000".to_owned(),
        };
        let page: Value = api
            .get(&path)
            .await
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .context("reading the channels' offsets (GET /api/channels)")?;
        for info in page["channels"].as_array().into_iter().flatten() {
            let name = info["channel"].as_str().unwrap_or_default();
            if let Some(id) = channel_id(name.as_bytes(), symbols) {
                tops[id as usize] = info["offset"].as_u64().unwrap_or(0);
            }
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return Ok(tops),
        }
    }
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// One subscriber: connect, subscribe to its channels in one request, then count.
async fn subscriber(
    ctx: Arc<MarketCtx>,
    index: usize,
    gate: Arc<Semaphore>,
    setup_tx: mpsc::UnboundedSender<SetupOutcome>,
    stop: watch::Receiver<bool>,
) {
    let w = &ctx.watchers[index];
    let names: Vec<String> = w.channels.iter().map(|&c| channel_name(c)).collect();
    let connect = async {
        let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
        let started = Instant::now();
        let opts = connect_options(w.source, false);
        let (mut conn, _welcome) =
            LeanConn::connect(&ctx.plan.ws_urls[0], &opts).await.map_err(|e| e.to_string())?;
        let handshake = started.elapsed();
        let op = json!({"op": "subscribe", "id": 1, "channels": names}).to_string();
        conn.send_text(&op).await.map_err(|e| format!("subscribe: {e}"))?;
        Ok::<_, String>((conn, handshake))
    };
    match connect.await {
        Ok((conn, handshake)) => {
            receive(&ctx, w, &names, conn, Pending { setup_tx, handshake }, stop).await;
        }
        Err(error) => {
            w.state.store(STATE_FAILED, Relaxed);
            let _ = setup_tx.send(SetupOutcome::Failed(error));
        }
    }
}

/// A subscriber's setup outcome, reported once its subscribe ack is read.
struct Pending {
    setup_tx: mpsc::UnboundedSender<SetupOutcome>,
    handshake: Duration,
}

/// Everything learned from one socket read, folded into the thread's stats at once.
#[derive(Default)]
struct ReadTally {
    delivered: u64,
    gaps: u64,
    duplicates: u64,
    counts: Counts,
    latencies: Vec<u64>,
    pongs_owed: u32,
    /// The subscribe ack, when it was in this read: `Err` if a channel was refused.
    ack: Option<Result<(), String>>,
}

/// The hot loop of one subscriber (see the module docs for what is counted).
async fn receive(
    ctx: &MarketCtx,
    w: &Watcher,
    names: &[String],
    mut conn: LeanConn,
    pending: Pending,
    mut stop: watch::Receiver<bool>,
) {
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    let ack_deadline = tokio::time::sleep(ACK_TIMEOUT);
    tokio::pin!(ack_deadline);
    let mut pending = Some(pending);
    let mut tally = ReadTally::default();
    loop {
        let mut now = 0;
        let mut window = (u64::MAX, u64::MAX);
        let read = tokio::select! {
            biased;
            _ = &mut stopped => None,
            () = &mut ack_deadline, if pending.is_some() => {
                fail(w, pending.take(), "timed out waiting for the subscribe ack".into());
                return;
            }
            read = conn.read_batch(|frame| {
                let LeanFrame::Text(text) = frame else { return };
                if now == 0 {
                    now = unix_ns();
                    window = (ctx.window_start.load(Relaxed), ctx.window_end.load(Relaxed));
                }
                let found = scan_market(text, |m| on_message(ctx, w, &m, now, window, &mut tally));
                if found == 0 {
                    on_control(ctx, w, names, text, &mut tally);
                }
            }) => Some(read),
        };
        let Some(read) = read else {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.send_close(1000)).await;
            return;
        };
        if tally.delivered > 0 || tally.counts.snapshot > 0 || tally.counts.before_ack > 0 {
            let in_window = now >= window.0 && now < window.1;
            STATS.with(|stats| {
                let mut stats = lock(stats);
                for &latency in &tally.latencies {
                    stats.latency.record(latency);
                }
                stats.delivered_total += tally.delivered;
                if in_window {
                    stats.delivered_window += tally.delivered;
                }
                stats.gaps += tally.gaps;
                stats.duplicates += tally.duplicates;
                stats.market.merge(&tally.counts);
            });
        }
        for _ in 0..tally.pongs_owed {
            let _ = conn.send_text(PONG).await;
        }
        match tally.ack.take() {
            Some(Ok(())) => {
                w.state.store(STATE_LIVE, Relaxed);
                if let Some(p) = pending.take() {
                    let _ = p.setup_tx.send(SetupOutcome::Ok { handshake: p.handshake });
                }
            }
            Some(Err(refused)) => {
                fail(w, pending.take(), refused);
                return;
            }
            None => {}
        }
        // Keep the latency buffer's allocation for the next read.
        let mut latencies = std::mem::take(&mut tally.latencies);
        latencies.clear();
        tally = ReadTally { latencies, ..ReadTally::default() };
        if read.is_err() {
            if pending.is_some() {
                fail(w, pending.take(), "closed before the subscribe ack".into());
                return;
            }
            let code = conn.close_info().map_or(1006, |c| c.code);
            w.state.store(u32::from(code).max(1000), Relaxed);
            return;
        }
    }
}

/// Marks a subscriber failed during setup and reports why.
fn fail(w: &Watcher, pending: Option<Pending>, error: String) {
    w.state.store(STATE_FAILED, Relaxed);
    if let Some(p) = pending {
        let _ = p.setup_tx.send(SetupOutcome::Failed(error));
    }
}

/// Counts one channel message (see the module docs).
fn on_message(
    ctx: &MarketCtx,
    w: &Watcher,
    m: &Msg<'_>,
    now: u64,
    window: (u64, u64),
    tally: &mut ReadTally,
) {
    let Some(local) = channel_id(m.channel, ctx.symbols).and_then(|id| w.local(id)) else {
        tally.counts.unexpected += 1;
        return;
    };
    let is_trade = w.channels[local].is_multiple_of(2);
    let (base, last) = (w.base[local].load(Relaxed), w.last[local].load(Relaxed));
    if last == UNKNOWN {
        tally.counts.before_ack += 1;
        if !m.ephemeral {
            w.last[local].store(m.offset, Relaxed);
        }
        return;
    }
    if m.ephemeral {
        // A forming bar carries the offset of the last retained bar.
        if m.offset > last {
            tally.gaps += m.offset - last;
            w.last[local].store(m.offset, Relaxed);
        } else if m.offset < last {
            tally.duplicates += 1;
        }
        tally.counts.forming_candles += 1;
        tally.delivered += 1;
        return;
    }
    if base != UNKNOWN && m.offset <= base {
        tally.counts.snapshot += 1;
        return;
    }
    if m.offset > last {
        tally.gaps += m.offset - last - 1;
        w.last[local].store(m.offset, Relaxed);
    } else {
        tally.duplicates += 1;
    }
    tally.delivered += 1;
    if is_trade {
        tally.counts.trades += 1;
        if let Some(ts_ns) = m.ts_ms.map(|ms| ms.saturating_mul(1_000_000))
            && ts_ns >= window.0
            && ts_ns < window.1
        {
            tally.latencies.push(now.saturating_sub(ts_ns));
        }
    } else {
        tally.counts.closed_candles += 1;
    }
}

/// Handles a frame without channel messages: the subscribe ack (read in place, so that the
/// messages after it in the same read are counted against its offsets), heartbeats,
/// notices and errors.
fn on_control(ctx: &MarketCtx, w: &Watcher, names: &[String], text: &[u8], tally: &mut ReadTally) {
    let Ok(frames) = decode_text(&String::from_utf8_lossy(text)) else {
        ctx.server_errors.fetch_add(1, Relaxed);
        return;
    };
    for frame in frames {
        match frame {
            ServerFrame::Ack { id: Some(1), frame } => {
                tally.ack = Some(apply_ack(w, names, &frame["result"]));
            }
            ServerFrame::Error(e) if e.id == Some(1) => {
                tally.ack = Some(Err(format!("subscribe refused: {e}")));
            }
            ServerFrame::Ping => tally.pongs_owed += 1,
            ServerFrame::Unsubscribed { .. } => {
                ctx.unsubscribed.fetch_add(1, Relaxed);
            }
            ServerFrame::Error(_) => {
                ctx.server_errors.fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }
}

/// Takes each channel's base offset from the subscribe ack's per-channel results.
fn apply_ack(w: &Watcher, names: &[String], results: &Value) -> Result<(), String> {
    for (i, name) in names.iter().enumerate() {
        let result = &results[name];
        if let Some(err) = result.get("error") {
            return Err(format!("subscribe {name} refused: {err}"));
        }
        let offset = result["offset"]
            .as_u64()
            .ok_or_else(|| format!("subscribe ack without an offset for {name}: {result}"))?;
        w.base[i].store(offset, Relaxed);
        let last = w.last[i].load(Relaxed);
        if last == UNKNOWN || last < offset {
            w.last[i].store(offset, Relaxed);
        }
    }
    Ok(())
}

/// One channel message as the scanner sees it.
#[derive(Debug, PartialEq)]
struct Msg<'a> {
    channel: &'a [u8],
    offset: u64,
    ephemeral: bool,
    /// `ts` inside the data (a trade's time, Unix ms), if any.
    ts_ms: Option<u64>,
}

/// How the server starts every channel message (`ferrocast_protocol::server::encode_msg`).
const MSG_START: &[u8] = br#"{"type":"msg","channel":""#;
const OFFSET_KEY: &[u8] = br#"","offset":"#;
const EPOCH_KEY: &[u8] = br#","epoch":""#;
const EPHEMERAL_MARK: &[u8] = br#"","ephemeral":true,"#;
const TS_KEY: &[u8] = br#""ts":"#;

/// Calls `each` for every channel message in a frame (one message or a batch array) and
/// returns how many it found, relying on the server's fixed key order instead of parsing.
fn scan_market(frame: &[u8], mut each: impl FnMut(Msg<'_>)) -> u64 {
    let mut found = 0;
    let mut next = find(frame, 0, MSG_START);
    while let Some(start) = next {
        let Some(msg) = scan_one(frame, start + MSG_START.len()) else { break };
        let (channel, offset, ephemeral, data_from) = msg;
        next = find(frame, data_from, MSG_START);
        let data = &frame[data_from..next.unwrap_or(frame.len())];
        let ts_ms = find(data, 0, TS_KEY).and_then(|i| parse_u64(data, i + TS_KEY.len()));
        each(Msg { channel, offset, ephemeral, ts_ms: ts_ms.map(|(ts, _)| ts) });
        found += 1;
    }
    found
}

/// Channel, offset, ephemeral flag and where the rest starts, for the message whose channel
/// name starts at `at`.
fn scan_one(frame: &[u8], at: usize) -> Option<(&[u8], u64, bool, usize)> {
    let channel_len = frame.get(at..)?.iter().position(|&b| b == b'"')?;
    let channel = &frame[at..at + channel_len];
    let rest = at + channel_len;
    let offset_at = rest + OFFSET_KEY.len();
    if !frame[rest..].starts_with(OFFSET_KEY) {
        return None;
    }
    let (offset, after_offset) = parse_u64(frame, offset_at)?;
    let epoch_at = after_offset + EPOCH_KEY.len();
    if !frame[after_offset..].starts_with(EPOCH_KEY) {
        return None;
    }
    let epoch_end = epoch_at + frame.get(epoch_at..)?.iter().position(|&b| b == b'"')?;
    let ephemeral = frame[epoch_end..].starts_with(EPHEMERAL_MARK);
    Some((channel, offset, ephemeral, epoch_end))
}

/// Where `needle` first occurs in `hay` at or after `from`.
fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut pos = from;
    while let Some(i) = hay.get(pos..)?.iter().position(|&b| b == first) {
        let at = pos + i;
        if hay[at..].starts_with(needle) {
            return Some(at);
        }
        pos = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_and_ids_round_trip() {
        for id in [0, 1, 2, 3, 998, 999] {
            assert_eq!(channel_id(channel_name(id).as_bytes(), 500), Some(id), "{id}");
        }
        assert_eq!(channel_name(7), "candles.MKT3.1s");
        assert_eq!(channel_id(b"ticks.MKT500", 500), None);
        assert_eq!(channel_id(b"candles.MKT3.1m", 500), None);
        assert_eq!(channel_id(b"quotes.MKT3", 500), None);
        assert_eq!(channel_id(b"ticks.MKT3x", 500), None);
    }

    #[test]
    fn scans_trades_forming_bars_and_batches() {
        let trade = br#"{"type":"msg","channel":"ticks.MKT7","offset":41,"epoch":"e1","data":{"sym":"MKT7","price":10.5,"size":100.0,"ts":1733400000123,"src":"massive"}}"#;
        let forming = br#"{"type":"msg","channel":"candles.MKT7.1s","offset":3,"epoch":"e2","ephemeral":true,"data":{"sym":"MKT7","interval":"1s","start":1733400000000,"forming":true}}"#;
        let mut seen = Vec::new();
        assert_eq!(
            scan_market(trade, |m| seen.push((m.channel.to_vec(), m.offset, m.ephemeral, m.ts_ms))),
            1
        );
        assert_eq!(seen, [(b"ticks.MKT7".to_vec(), 41, false, Some(1_733_400_000_123))]);
        let batch = [b"[".as_slice(), forming, b",", trade, b"]"].concat();
        seen.clear();
        let n = scan_market(&batch, |m| {
            seen.push((m.channel.to_vec(), m.offset, m.ephemeral, m.ts_ms))
        });
        assert_eq!(n, 2);
        assert_eq!(seen[0], (b"candles.MKT7.1s".to_vec(), 3, true, None));
        assert_eq!(seen[1].3, Some(1_733_400_000_123));
        assert_eq!(scan_market(br#"{"type":"ack","id":1,"result":{}}"#, |_| {}), 0);
        assert_eq!(scan_market(br#"{"type":"ping"}"#, |_| {}), 0);
    }

    #[test]
    fn each_subscriber_draws_the_same_distinct_symbols_every_run() {
        let plan = Plan::new(&BenchArgs {
            market: true,
            subscribers: 3,
            ..crate::bench::tests::args_for_tests()
        })
        .unwrap();
        let a = Watcher::new(5, 50, 20, &plan);
        let b = Watcher::new(5, 50, 20, &plan);
        assert_eq!(a.channels, b.channels);
        assert_eq!(a.channels.len(), 40);
        assert!(a.channels.windows(2).all(|p| p[0] < p[1]));
        assert!(a.channels.chunks(2).all(|p| p[0] % 2 == 0 && p[1] == p[0] + 1));
        assert_ne!(Watcher::new(6, 50, 20, &plan).channels, a.channels);
    }
}

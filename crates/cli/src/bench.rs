//! `ferrocast bench`: the whole-system load generator.
//!
//! It opens N WebSocket subscribers (subscriber `i` listens to channel `bench.{i % K}`), publishes
//! through `POST /api/publish` batches at a fixed rate or closed-loop (`--rate max`), and reports
//! connection setup rate, delivery rate, end-to-end latency percentiles, lost messages, and the
//! server's CPU and memory cost read from `/proc/PID`. `--idle` holds subscribed connections
//! without traffic and reports server memory per connection. `--market` measures the
//! market-data shape instead (a feed publishes, subscribers watch random symbols' trades and
//! candles: [`market`]); `--recovery N` one reconnecting client ([`recovery`]).
//!
//! Design notes:
//! * Receivers share the machine with the server, so they never parse message JSON: they find
//!   `"offset":` and the payload's `"t":` (publish time, ns since the UNIX epoch) with a substring
//!   search, which also handles batched frames (a JSON array of messages).
//! * Counters and latency histograms live in one mutex-protected block per runtime thread (so
//!   recording is an uncontended lock per frame) and are merged when reporting.
//! * One process is capped by its open-file limit, so `--processes P` re-executes this binary
//!   with `--shard i/P`: each child owns a contiguous share of the subscribers and talks to the
//!   parent through JSON lines (stdout: `ready` then `result`; stdin: `window`, `window_end`,
//!   `stop`). The parent runs shard 0, the publishers and the measurement clock.
//!
//! Typical runs (the server must be running; `--server-pid` adds its CPU and RSS):
//!
//! ```text
//! ferrocast bench --subscribers 10000 --channels 100 --rate 50000 --duration 30 --server-pid PID
//! ferrocast bench --subscribers 2000 --channels 20 --rate max --json > result.json
//! ferrocast bench --subscribers 20000 --idle --duration 60 --source-ip-count 2 --server-pid PID
//! ```
//!
//! The last one needs more than one process under a 20,000 open-file limit; `--processes 0`
//! (the default) picks enough automatically.
//!
//! For a cluster (nodes sharing a Redis broker), repeat `--url` (and `--server-pid`):
//! subscribers are spread over the nodes and the publishers publish through each in turn, so
//! most deliveries cross nodes; `--publish-url` picks the publishing nodes instead:
//!
//! ```text
//! ferrocast bench --url ws://10.0.0.1:8080/ws --url ws://10.0.0.2:8080/ws --subscribers 1000 \
//!     --channels 1 --rate max --server-pid PID1 --server-pid PID2
//! ```
//!
//! On a terminal a live status line (phase, elapsed, connections, messages/s) is redrawn on
//! stderr and cleared before the report; with `--json` or stderr redirected nothing is drawn.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use ferrocast_client::frame::{ServerFrame, decode_text};
use ferrocast_client::{ConnectOptions, HttpClient, LeanConn, LeanFrame};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use histogram::Histogram;

use crate::progress::{Progress, human_rate, status_line};

mod market;
mod recovery;

/// Load-test a running server: connection setup, delivery throughput, latency, loss, CPU, RSS.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// WebSocket URL of the server. Repeat it for the nodes of a cluster: subscriber i
    /// connects to URL i % N.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: Vec<String>,
    /// HTTP base URL for publishing (default: derived from each --url, same host and port).
    /// Repeat it to publish through several nodes: publisher p uses URL p % N.
    #[arg(long)]
    pub publish_url: Vec<String>,
    /// API key for `POST /api/publish` (not needed from loopback).
    #[arg(long, env = "FERROCAST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Number of subscriber connections.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Number of channels; subscriber i subscribes to `bench.{i % K}`.
    #[arg(long, default_value_t = 10)]
    pub channels: usize,
    /// Total publish rate in messages/s, or `max` for closed-loop publishing.
    #[arg(long, default_value = "1000")]
    pub rate: Rate,
    /// Size of each message's data object in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Measurement length in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of publishing before measurement starts (not reported).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Longest wait, in seconds, for in-flight messages after publishing stops.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Comma-separated source addresses to bind client sockets to, round-robin.
    #[arg(long, value_delimiter = ',', conflicts_with = "source_ip_count")]
    pub source_ips: Vec<IpAddr>,
    /// Use 127.0.0.1 ..= 127.0.0.M as source addresses (each has ~28k ephemeral ports).
    #[arg(long)]
    pub source_ip_count: Option<u8>,
    /// Server process id: report its CPU-seconds and RSS from /proc. Repeat it for the nodes
    /// of a cluster (their figures are summed).
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// Print one JSON object on stdout instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// Open and subscribe the connections, publish nothing, hold for --duration, and report
    /// server RSS per connection.
    #[arg(long)]
    pub idle: bool,
    /// Processes to spread subscribers over (0: enough to stay under the open-file limit).
    #[arg(long, default_value_t = 0)]
    pub processes: usize,
    /// Concurrent publishers, each one keep-alive HTTP connection sending one request at a
    /// time (the next once the previous is answered).
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Largest number of messages in one publish request (1: one message per request, as
    /// most applications publish).
    #[arg(long = "publish-batch", visible_alias = "batch", default_value_t = 256)]
    pub batch: usize,
    /// With `--rate max`: messages published but not yet seen by the per-channel probe
    /// subscriber before the publisher waits (0: about 50,000 deliveries' worth, i.e.
    /// 50,000 / (subscribers per channel), within 16..=4096).
    #[arg(long, default_value_t = 0)]
    pub max_in_flight: u64,
    /// Connection handshakes in progress at once during setup.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Channel name prefix (channels are PREFIX.0 .. PREFIX.K-1).
    #[arg(long, default_value = "bench")]
    pub channel_prefix: String,
    /// Measure recovery instead: publish N messages with no one listening, then time how fast
    /// one client that subscribes with `recover` receives all N (the namespace must retain N).
    #[arg(long, value_name = "N")]
    pub recovery: Option<u64>,
    /// Subscribers offer permessage-deflate and inflate what arrives compressed (the server
    /// compresses only for namespaces with `compress = true`, e.g.
    /// `--set namespaces.bench.compress=true`).
    #[arg(long)]
    pub compress: bool,
    /// Measure the market-data shape instead: the server's Massive feed (reading `ferrocast
    /// simulate massive`) publishes trades on `ticks.SYM` and the server builds
    /// `candles.SYM.1s` from them; each subscriber watches --symbols-per-subscriber random
    /// symbols of --symbols (trades and 1-second candles). The feed's rate is the simulator's
    /// `--rate`; --rate, --channels, --payload and the publisher options do not apply. See
    /// `deploy/examples/bench-market.toml` and docs/benchmarks.md for the commands.
    #[arg(long, conflicts_with_all = ["recovery", "idle"])]
    pub market: bool,
    /// With --market: symbols the simulator trades (named MKT0 .. MKT{N-1}).
    #[arg(long, default_value_t = 500, requires = "market")]
    pub symbols: usize,
    /// With --market: symbols each subscriber watches, chosen at random (the same choice on
    /// every run: subscriber i's generator is seeded with i).
    #[arg(long, default_value_t = 20, requires = "market")]
    pub symbols_per_subscriber: usize,
    /// Internal: run as child shard I of P (set by --processes).
    #[arg(long, hide = true)]
    pub shard: Option<String>,
}

/// Publish rate: messages per second, or closed-loop maximum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Open-loop: this many messages per second in total.
    PerSec(f64),
    /// Closed-loop: as fast as delivery keeps up (bounded in-flight window).
    Max,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("max") {
            return Ok(Rate::Max);
        }
        match s.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerSec(r)),
            _ => Err(format!("expected a positive number or `max`, got {s:?}")),
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::PerSec(r) => write!(f, "{r}/s"),
            Rate::Max => f.write_str("max"),
        }
    }
}

/// Validated settings shared by the parent and the child shards.
#[derive(Debug)]
struct Plan {
    /// One per node; subscriber i connects to `ws_urls[i % N]`.
    ws_urls: Vec<String>,
    /// Publisher p publishes through `http_urls[p % N]`.
    http_urls: Vec<String>,
    api_key: Option<String>,
    subscribers: usize,
    channels: usize,
    rate: Rate,
    payload: usize,
    duration: Duration,
    warmup: Duration,
    drain: Duration,
    source_ips: Vec<IpAddr>,
    server_pids: Vec<u32>,
    json: bool,
    idle: bool,
    processes: usize,
    publishers: usize,
    batch: usize,
    max_in_flight: u64,
    /// Subscribers offer permessage-deflate.
    compress: bool,
    connect_concurrency: usize,
    channel_names: Vec<String>,
}

impl Plan {
    fn new(args: &BenchArgs) -> anyhow::Result<Plan> {
        if args.subscribers == 0 {
            bail!("--subscribers must be at least 1");
        }
        if args.channels == 0 {
            bail!("--channels must be at least 1");
        }
        if !args.idle && !args.market && args.channels > args.subscribers {
            bail!(
                "--channels ({}) must not exceed --subscribers ({}): messages to channels without subscribers measure nothing",
                args.channels,
                args.subscribers
            );
        }
        for (name, secs) in
            [("--duration", args.duration), ("--warmup", args.warmup), ("--drain", args.drain)]
        {
            if !(secs.is_finite() && secs >= 0.0) {
                bail!("{name} must be a non-negative number of seconds");
            }
        }
        let source_ips = match args.source_ip_count {
            Some(0) => bail!("--source-ip-count must be at least 1"),
            Some(m) => (1..=m).map(|x| IpAddr::from([127, 0, 0, x])).collect(),
            None => args.source_ips.clone(),
        };
        if args.url.is_empty() {
            bail!("--url must name at least one server");
        }
        let http_urls = if args.publish_url.is_empty() {
            args.url.iter().map(|u| http_base(u)).collect::<anyhow::Result<_>>()?
        } else {
            args.publish_url.clone()
        };
        let fd_limit = open_file_limit().unwrap_or(1024);
        // Leave headroom for publishers, stdio, the runtime and the child pipes.
        let per_process = fd_limit.saturating_sub(args.publishers as u64 + 128).max(1) as usize;
        let processes = match args.processes {
            0 => args.subscribers.div_ceil(per_process),
            p => p,
        }
        .clamp(1, args.subscribers);
        if args.shard.is_none() && args.subscribers.div_ceil(processes) > per_process {
            bail!(
                "{} subscribers in {processes} process(es) exceed the open-file limit of {fd_limit} per process; use --processes {} or more",
                args.subscribers,
                args.subscribers.div_ceil(per_process)
            );
        }
        Ok(Plan {
            ws_urls: args.url.clone(),
            http_urls,
            api_key: args.api_key.clone(),
            subscribers: args.subscribers,
            channels: args.channels,
            rate: args.rate,
            payload: args.payload,
            duration: Duration::from_secs_f64(args.duration),
            warmup: Duration::from_secs_f64(args.warmup),
            drain: Duration::from_secs_f64(args.drain),
            source_ips,
            server_pids: args.server_pid.clone(),
            json: args.json,
            idle: args.idle,
            processes,
            publishers: args.publishers.max(1),
            batch: args.batch.max(1),
            max_in_flight: match args.max_in_flight {
                // Every message in flight is `fan-out` deliveries queued somewhere; bounding
                // deliveries keeps queues (and so latency) bounded whatever the fan-out.
                0 => (50_000 / (args.subscribers / args.channels).max(1) as u64).clamp(16, 4096),
                n => n,
            },
            compress: args.compress,
            connect_concurrency: args.connect_concurrency.max(1),
            channel_names: (0..args.channels)
                .map(|c| format!("{}.{c}", args.channel_prefix))
                .collect(),
        })
    }

    /// Global subscriber indices owned by shard `index` of `count` (contiguous, so each shard
    /// covers every channel when it has at least K subscribers).
    fn shard_range(&self, index: usize, count: usize) -> std::ops::Range<usize> {
        let n = self.subscribers;
        (index * n / count)..((index + 1) * n / count)
    }
}

/// The HTTP base (`http://host:port`) of the server behind a WebSocket URL.
fn http_base(ws_url: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(ws_url).with_context(|| format!("invalid --url {ws_url:?}"))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        other => bail!("--url must be ws://..., got scheme {other:?}"),
    };
    url.set_scheme(scheme)
        .map_err(|()| anyhow::anyhow!("cannot derive the HTTP URL from {ws_url:?}"))?;
    url.set_path("");
    url.set_query(None);
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Entry point: a child shard when `--shard` is set, otherwise the coordinating parent.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(messages) = args.recovery {
        return recovery::run(&args, messages).await;
    }
    if args.market {
        return market::run(&args).await;
    }
    let plan = Arc::new(Plan::new(&args)?);
    if let Some(spec) = &args.shard {
        let (index, count) = spec
            .split_once('/')
            .and_then(|(i, p)| Some((i.parse::<usize>().ok()?, p.parse::<usize>().ok()?)))
            .filter(|(i, p)| i < p)
            .with_context(|| format!("bad --shard {spec:?}"))?;
        return run_child(plan, index, count).await;
    }
    run_parent(plan).await
}

// ---------------------------------------------------------------------------------------------
// Receiving side: one shard of subscribers in this process.
// ---------------------------------------------------------------------------------------------

/// Per-thread counters and histogram (see module docs).
#[derive(Default)]
struct LocalStats {
    latency: Histogram,
    delivered_total: u64,
    delivered_window: u64,
    gaps: u64,
    duplicates: u64,
    /// What `--market` subscribers received, by kind.
    market: market::Counts,
}

static REGISTRY: Mutex<Vec<Arc<Mutex<LocalStats>>>> = Mutex::new(Vec::new());

thread_local! {
    static STATS: Arc<Mutex<LocalStats>> = {
        let stats = Arc::new(Mutex::new(LocalStats::default()));
        lock(&REGISTRY).push(Arc::clone(&stats));
        stats
    };
}

/// Locks, ignoring poisoning: a panicked recorder leaves counters that are still meaningful.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Merges every thread's stats.
fn merged_stats() -> LocalStats {
    let mut out = LocalStats::default();
    for stats in lock(&REGISTRY).iter() {
        let s = lock(stats);
        out.latency.merge(&s.latency);
        out.delivered_total += s.delivered_total;
        out.delivered_window += s.delivered_window;
        out.gaps += s.gaps;
        out.duplicates += s.duplicates;
        out.market.merge(&s.market);
    }
    out
}

/// Slot states beyond close codes.
const STATE_CONNECTING: u32 = 0;
const STATE_LIVE: u32 = 1;
const STATE_FAILED: u32 = 2;

/// One local subscriber as seen by the shard's bookkeeping.
struct Slot {
    channel: usize,
    /// Index of the node (`--url`) it connects to.
    node: usize,
    source: Option<IpAddr>,
    /// Channel offset from the subscribe ack: messages after it are expected.
    base: AtomicU64,
    /// Highest offset received.
    last: AtomicU64,
    /// `STATE_*`, or the close code (≥ 1000) once the connection ended.
    state: AtomicU32,
    /// True for the first local subscriber of each channel in the parent (`--rate max` flow).
    probe: bool,
}

/// Closed-loop flow control: messages sent to probed channels vs. progress seen by the probes.
#[derive(Default)]
struct Flow {
    sent_to_probed: AtomicU64,
    progress: AtomicU64,
    notify: Notify,
    probed: Vec<bool>,
}

/// What every subscriber task shares.
struct ShardCtx {
    plan: Arc<Plan>,
    slots: Vec<Slot>,
    flow: Arc<Flow>,
    /// Measurement window in UNIX ns; latency is recorded for messages published inside it and
    /// deliveries are counted when received inside it. `u64::MAX` means "not yet".
    window_start: AtomicU64,
    window_end: AtomicU64,
    unsubscribed: AtomicU64,
    server_errors: AtomicU64,
}

/// Result of one subscriber's connection setup.
enum SetupOutcome {
    Ok { handshake: Duration },
    Failed(String),
}

/// Connection-setup summary of one shard (also the `ready` line of a child).
#[derive(Debug, Default, Serialize, Deserialize)]
struct SetupReport {
    requested: u64,
    connected: u64,
    failed: u64,
    secs: f64,
    errors: Vec<String>,
    handshake_ns: Vec<[u64; 2]>,
}

/// Final report of one shard (the `result` line of a child).
#[derive(Debug, Default, Serialize, Deserialize)]
struct ShardReport {
    setup: SetupReport,
    delivered_total: u64,
    delivered_window: u64,
    expected: u64,
    gaps: u64,
    tail_lost: u64,
    duplicates: u64,
    unsubscribed: u64,
    server_errors: u64,
    /// Close code -> connections that ended with it before the bench stopped them.
    closes: BTreeMap<u16, u64>,
    latency_ns: Vec<[u64; 2]>,
    bench_cpu_secs: f64,
}

/// A running shard of subscribers.
struct Shard {
    ctx: Arc<ShardCtx>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    setup_rx: mpsc::UnboundedReceiver<SetupOutcome>,
    started: Instant,
}

impl Shard {
    /// Spawns one task per local subscriber; each connects, subscribes, then receives.
    fn start(plan: Arc<Plan>, index: usize, count: usize, with_probes: bool) -> Shard {
        let range = plan.shard_range(index, count);
        let mut probed = vec![false; plan.channels];
        let slots: Vec<Slot> = range
            .map(|global| {
                let channel = global % plan.channels;
                let probe = with_probes && !probed[channel];
                probed[channel] |= probe;
                Slot {
                    channel,
                    node: global % plan.ws_urls.len(),
                    source: (!plan.source_ips.is_empty())
                        .then(|| plan.source_ips[global % plan.source_ips.len()]),
                    base: AtomicU64::new(0),
                    last: AtomicU64::new(0),
                    state: AtomicU32::new(STATE_CONNECTING),
                    probe,
                }
            })
            .collect();
        let flow = Arc::new(Flow { probed, ..Flow::default() });
        let ctx = Arc::new(ShardCtx {
            plan: Arc::clone(&plan),
            slots,
            flow,
            window_start: AtomicU64::new(u64::MAX),
            window_end: AtomicU64::new(u64::MAX),
            unsubscribed: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let (setup_tx, setup_rx) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(plan.connect_concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for local in 0..ctx.slots.len() {
            tasks.spawn(subscriber(
                Arc::clone(&ctx),
                local,
                Arc::clone(&gate),
                setup_tx.clone(),
                stop_rx.clone(),
            ));
        }
        Shard { ctx, stop, tasks, setup_rx, started: Instant::now() }
    }

    /// Waits until every subscriber is connected and subscribed (or failed).
    async fn wait_setup(&mut self, progress: Option<&Progress>) -> SetupReport {
        let total = self.ctx.slots.len() as u64;
        collect_setup(&mut self.setup_rx, total, self.started, progress).await
    }

    fn set_window_start(&self, ns: u64) {
        self.ctx.window_start.store(ns, Relaxed);
    }

    fn set_window_end(&self, ns: u64) {
        self.ctx.window_end.store(ns, Relaxed);
    }

    /// Waits for in-flight messages (up to `--drain`), closes every connection and reports.
    /// `published[c]` is the last offset the publishers got for channel `c` (0: none).
    async fn finish(mut self, published: &[u64], setup: SetupReport, cpu0: f64) -> ShardReport {
        let ctx = Arc::clone(&self.ctx);
        let behind = || {
            ctx.slots
                .iter()
                .filter(|s| s.state.load(Relaxed) == STATE_LIVE)
                .filter(|s| s.last.load(Relaxed) < published[s.channel])
                .count()
        };
        drain(behind, ctx.plan.drain).await;
        let bench_cpu_secs = proc_stats("self").map_or(0.0, |s| s.cpu_secs - cpu0);

        let mut report = ShardReport { setup, bench_cpu_secs, ..ShardReport::default() };
        for slot in &ctx.slots {
            let state = slot.state.load(Relaxed);
            if state == STATE_FAILED || state == STATE_CONNECTING {
                continue;
            }
            if state >= 1000 {
                *report.closes.entry(state as u16).or_default() += 1;
            }
            let target = published[slot.channel];
            let base = slot.base.load(Relaxed);
            report.expected += target.saturating_sub(base);
            report.tail_lost += target.saturating_sub(slot.last.load(Relaxed).max(base));
        }
        let _ = self.stop.send(true);
        let close_all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), close_all).await.is_err() {
            self.tasks.abort_all();
        }
        let stats = merged_stats();
        report.delivered_total = stats.delivered_total;
        report.delivered_window = stats.delivered_window;
        report.gaps = stats.gaps;
        report.duplicates = stats.duplicates;
        report.latency_ns = stats.latency.to_sparse();
        report.unsubscribed = ctx.unsubscribed.load(Relaxed);
        report.server_errors = ctx.server_errors.load(Relaxed);
        report
    }
}

/// Waits, at most `limit`, until `behind()` (subscribers still missing messages) is zero, or
/// until no message arrived for a second: what is missing then is lost, not late.
async fn drain(behind: impl Fn() -> usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last_total = merged_stats().delivered_total;
    let mut last_progress = Instant::now();
    while behind() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let total = merged_stats().delivered_total;
        if total != last_total {
            last_total = total;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
}

/// Collects the setup outcomes of `total` subscribers started at `started`, redrawing the
/// progress line meanwhile.
async fn collect_setup(
    setup_rx: &mut mpsc::UnboundedReceiver<SetupOutcome>,
    total: u64,
    started: Instant,
    progress: Option<&Progress>,
) -> SetupReport {
    let mut report = SetupReport { requested: total, ..SetupReport::default() };
    let mut handshakes = Histogram::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while report.connected + report.failed < total {
        tokio::select! {
            outcome = setup_rx.recv() => match outcome {
                Some(SetupOutcome::Ok { handshake }) => {
                    report.connected += 1;
                    handshakes.record(handshake.as_nanos() as u64);
                }
                Some(SetupOutcome::Failed(error)) => {
                    report.failed += 1;
                    if report.errors.len() < 5 && !report.errors.contains(&error) {
                        report.errors.push(error);
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                if let Some(p) = progress {
                    let elapsed = started.elapsed();
                    p.show(&status_line(
                        "connecting",
                        elapsed,
                        None,
                        report.connected,
                        0.0,
                        &format!(
                            "of {total} ({:.0}/s) | failed {}",
                            report.connected as f64 / elapsed.as_secs_f64().max(1e-9),
                            report.failed
                        ),
                    ));
                }
            }
        }
    }
    report.secs = started.elapsed().as_secs_f64();
    report.handshake_ns = handshakes.to_sparse();
    report
}

/// One subscriber: connect, subscribe, then count and time messages until told to stop.
async fn subscriber(
    ctx: Arc<ShardCtx>,
    local: usize,
    gate: Arc<Semaphore>,
    setup_tx: mpsc::UnboundedSender<SetupOutcome>,
    stop: watch::Receiver<bool>,
) {
    let slot = &ctx.slots[local];
    let channel = &ctx.plan.channel_names[slot.channel];
    let setup = async {
        let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
        let started = Instant::now();
        let opts = connect_options(slot.source, ctx.plan.compress);
        let (mut conn, _welcome) = LeanConn::connect(&ctx.plan.ws_urls[slot.node], &opts)
            .await
            .map_err(|e| e.to_string())?;
        let handshake = started.elapsed();
        let subscribed = subscribe(&mut conn, channel, opts.connect_timeout).await?;
        Ok::<_, String>((conn, handshake, subscribed))
    };
    let (conn, Subscribed { base, after_ack }) = match setup.await {
        Ok((conn, handshake, subscribed)) => {
            let base = subscribed.base;
            slot.base.store(base, Relaxed);
            slot.last.store(base, Relaxed);
            slot.state.store(STATE_LIVE, Relaxed);
            let _ = setup_tx.send(SetupOutcome::Ok { handshake });
            (conn, subscribed)
        }
        Err(error) => {
            slot.state.store(STATE_FAILED, Relaxed);
            let _ = setup_tx.send(SetupOutcome::Failed(error));
            return;
        }
    };
    drop(setup_tx);
    receive(&ctx, slot, conn, base, after_ack, stop).await;
}

/// A subscription as its ack left it.
#[derive(Debug)]
struct Subscribed {
    /// The channel's offset in the ack: messages after it are expected.
    base: u64,
    /// Text frames that came in the same socket read as the ack, after it: messages
    /// published right after the subscribe, to be counted like any other.
    after_ack: Vec<Vec<u8>>,
}

/// How every bench subscriber connects: from `source` if given, offering permessage-deflate
/// when `compress`.
fn connect_options(source: Option<IpAddr>, compress: bool) -> ConnectOptions {
    ConnectOptions {
        bind: source,
        // Small initial buffer (it grows on demand): the bench may hold 20,000 connections.
        read_buffer_size: 4096,
        headers: if compress {
            vec![(
                "Sec-WebSocket-Extensions".to_owned(),
                "permessage-deflate; client_max_window_bits".to_owned(),
            )]
        } else {
            Vec::new()
        },
        connect_timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    }
}

/// Sends the subscribe op and returns the channel offset from the ack, with whatever was
/// read after the ack.
async fn subscribe(
    conn: &mut LeanConn,
    channel: &str,
    timeout: Duration,
) -> Result<Subscribed, String> {
    let op = json!({"op": "subscribe", "id": 1, "channels": [channel]}).to_string();
    conn.send_text(&op).await.map_err(|e| format!("subscribe: {e}"))?;
    let wait = async {
        loop {
            let mut texts = Vec::new();
            let read = conn
                .read_batch(|frame| {
                    if let LeanFrame::Text(t) = frame {
                        texts.push(t.to_vec());
                    }
                })
                .await;
            let mut texts = texts.into_iter();
            while let Some(text) = texts.next() {
                let text = String::from_utf8_lossy(&text).into_owned();
                for frame in decode_text(&text).map_err(|e| e.to_string())? {
                    match frame {
                        ServerFrame::Ack { id: Some(1), frame } => {
                            let result = &frame["result"][channel];
                            if let Some(err) = result.get("error") {
                                return Err(format!("subscribe {channel} refused: {err}"));
                            }
                            let base = result["offset"].as_u64().unwrap_or(0);
                            return Ok(Subscribed { base, after_ack: texts.collect() });
                        }
                        ServerFrame::Error(e) if e.id == Some(1) => {
                            return Err(format!("subscribe {channel} refused: {e}"));
                        }
                        ServerFrame::Ping => {
                            conn.send_text(PONG).await.map_err(|e| e.to_string())?;
                        }
                        _ => {}
                    }
                }
            }
            read.map_err(|e| format!("while subscribing: {e}"))?;
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| "timed out waiting for the subscribe ack".to_owned())?
}

const PONG: &str = r#"{"op":"pong"}"#;

/// The hot loop: count messages, detect offset gaps, record latency, answer heartbeats.
///
/// Everything learned from one socket read is accumulated locally and folded into the
/// thread's stats under a single lock.
async fn receive(
    ctx: &ShardCtx,
    slot: &Slot,
    mut conn: LeanConn,
    base: u64,
    after_ack: Vec<Vec<u8>>,
    mut stop: watch::Receiver<bool>,
) {
    // Resolve to `()` so the watch guard (not `Send`) is dropped inside the future.
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    let mut last = base;
    let mut latencies: Vec<u64> = Vec::new();
    let mut control: Vec<Vec<u8>> = Vec::new();
    // What came with the ack is counted first, as if it were the first read.
    let mut carried = Some(after_ack).filter(|texts| !texts.is_empty());
    loop {
        let mut now = 0;
        let mut window = (u64::MAX, u64::MAX);
        let mut found = 0u64;
        let mut gaps = 0u64;
        let mut duplicates = 0u64;
        let previous = last;
        let mut on_text = |text: &[u8]| {
            if now == 0 {
                // Once per socket read: the receive time of everything in it.
                now = unix_ns();
                window = (ctx.window_start.load(Relaxed), ctx.window_end.load(Relaxed));
            }
            let n = scan_messages(text, |offset, published_ns| {
                if offset > last {
                    gaps += offset - last - 1;
                    last = offset;
                } else {
                    duplicates += 1;
                }
                if let Some(t) = published_ns.filter(|t| *t >= window.0 && *t < window.1) {
                    latencies.push(now.saturating_sub(t));
                }
            });
            if n == 0 {
                control.push(text.to_vec());
            }
            found += n;
        };
        let read = match carried.take() {
            Some(texts) => {
                texts.iter().for_each(|text| on_text(text));
                Some(Ok(()))
            }
            None => tokio::select! {
                biased;
                _ = &mut stopped => None,
                read = conn.read_batch(|frame| {
                    if let LeanFrame::Text(text) = frame {
                        on_text(text);
                    }
                }) => Some(read),
            },
        };
        let Some(read) = read else {
            // Told to stop: say goodbye properly so the server logs a normal closure.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.send_close(1000)).await;
            return;
        };
        if found > 0 || !latencies.is_empty() {
            let in_window = now >= window.0 && now < window.1;
            STATS.with(|stats| {
                let mut stats = lock(stats);
                for &latency in &latencies {
                    stats.latency.record(latency);
                }
                stats.delivered_total += found;
                if in_window {
                    stats.delivered_window += found;
                }
                stats.gaps += gaps;
                stats.duplicates += duplicates;
            });
            latencies.clear();
            slot.last.store(last, Relaxed);
            if slot.probe && last > previous {
                ctx.flow.progress.fetch_add(last - previous, Relaxed);
                ctx.flow.notify.notify_one();
            }
        }
        // Not messages: heartbeats, notices and errors are rare enough to decode properly.
        for text in control.drain(..) {
            let Ok(frames) = decode_text(&String::from_utf8_lossy(&text)) else {
                ctx.server_errors.fetch_add(1, Relaxed);
                continue;
            };
            for frame in frames {
                match frame {
                    ServerFrame::Ping => {
                        // A failed pong shows up as a close on the next read.
                        let _ = conn.send_text(PONG).await;
                    }
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
        if read.is_err() {
            let code = conn.close_info().map_or(1006, |c| c.code);
            slot.state.store(u32::from(code).max(1000), Relaxed);
            return;
        }
    }
}

/// Calls `each(offset, publish_ns)` for every message in a `msg` frame (an object or a batch
/// array) and returns how many it found, without parsing JSON.
///
/// One pass visits every `:`; a key ending in `"offset"` or `"t"` is followed by the number we
/// want. An offset is paired with the timestamp of the same message whichever comes first;
/// messages without a timestamp (not published by the bench) get `None`.
fn scan_messages(frame: &[u8], mut each: impl FnMut(u64, Option<u64>)) -> u64 {
    let mut found = 0;
    let mut pos = 0;
    let mut pending_offset: Option<u64> = None;
    let mut pending_t: Option<u64> = None;
    while let Some(i) = frame[pos..].iter().position(|&b| b == b':') {
        let colon = pos + i;
        pos = colon + 1;
        let key = &frame[..colon];
        if key.ends_with(b"\"offset\"") {
            let Some((offset, end)) = parse_u64(frame, pos) else {
                continue;
            };
            pos = end;
            if let Some(previous) = pending_offset.take() {
                each(previous, None);
                found += 1;
            }
            match pending_t.take() {
                Some(t) => {
                    each(offset, Some(t));
                    found += 1;
                }
                None => pending_offset = Some(offset),
            }
        } else if key.ends_with(b"\"t\"") {
            let Some((t, end)) = parse_u64(frame, pos) else {
                continue;
            };
            pos = end;
            match pending_offset.take() {
                Some(offset) => {
                    each(offset, Some(t));
                    found += 1;
                }
                None => pending_t = Some(t),
            }
        }
    }
    if let Some(offset) = pending_offset {
        each(offset, pending_t);
        found += 1;
    }
    found
}

/// Parses an unsigned integer at `pos` (after optional spaces); returns it and the end index.
fn parse_u64(bytes: &[u8], mut pos: usize) -> Option<(u64, usize)> {
    while bytes.get(pos) == Some(&b' ') {
        pos += 1;
    }
    let start = pos;
    let mut value: u64 = 0;
    while let Some(d) = bytes.get(pos).filter(|b| b.is_ascii_digit()) {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        pos += 1;
    }
    (pos > start).then_some((value, pos))
}

fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

// ---------------------------------------------------------------------------------------------
// Publishing side.
// ---------------------------------------------------------------------------------------------

/// State shared by the publisher tasks.
struct PubShared {
    plan: Arc<Plan>,
    flow: Arc<Flow>,
    seq: AtomicU64,
    /// Highest offset the server assigned per channel.
    published_max: Vec<AtomicU64>,
    published: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    stop: AtomicBool,
    /// Set once (per run) when the closed loop had to stop waiting for a stalled probe.
    stall_warned: AtomicBool,
    /// Round trips of the publish requests (sent to answered), in ns.
    round_trips: Mutex<Histogram>,
}

impl PubShared {
    fn note_error(&self, error: String) {
        self.errors.fetch_add(1, Relaxed);
        lock(&self.first_error).get_or_insert(error);
    }
}

/// Builds the padded payload of one message: `{"t":NS,"s":SEQ,"p":"xxx…"}`.
fn write_message(body: &mut Vec<u8>, channel: &str, t: u64, seq: u64, payload: usize) {
    const PADDING: [u8; 256] = [b'x'; 256];
    let start = body.len();
    let _ = write!(body, r#"{{"channel":"{channel}","data":{{"t":{t},"s":{seq},"p":""#);
    let data_so_far = body.len() - start - r#"{"channel":"","data":"#.len() - channel.len();
    // Two closing bytes (`"}`) end the data object.
    let mut pad = payload.saturating_sub(data_so_far + 2);
    while pad > 0 {
        let n = pad.min(PADDING.len());
        body.extend_from_slice(&PADDING[..n]);
        pad -= n;
    }
    body.extend_from_slice(b"\"}}");
}

/// One keep-alive HTTP connection (to node `index % N`) publishing batches until `stop`.
async fn publisher(shared: Arc<PubShared>, index: usize, rate: Option<f64>) {
    let plan = &shared.plan;
    let mut http = match HttpClient::new(&plan.http_urls[index % plan.http_urls.len()]) {
        Ok(h) => h.with_timeout(Duration::from_secs(10)),
        Err(e) => {
            shared.note_error(e.to_string());
            return;
        }
    };
    if let Some(key) = &plan.api_key {
        http = http.with_api_key(key);
    }
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut body = Vec::with_capacity(plan.batch * (plan.payload + 64) + 32);
    let mut channels_in_batch = Vec::with_capacity(plan.batch);
    while !shared.stop.load(Relaxed) {
        let n = match rate {
            Some(rate) => {
                let due = (rate * started.elapsed().as_secs_f64()) as u64;
                if due <= sent {
                    // Sleep until the next message is due (timer resolution is ~1 ms).
                    let next = Duration::from_secs_f64((sent + 1) as f64 / rate);
                    tokio::time::sleep(next.saturating_sub(started.elapsed())).await;
                    continue;
                }
                (due - sent).min(plan.batch as u64)
            }
            None => {
                let flow = &shared.flow;
                let in_flight =
                    flow.sent_to_probed.load(Relaxed).saturating_sub(flow.progress.load(Relaxed));
                if in_flight >= plan.max_in_flight {
                    let waited =
                        tokio::time::timeout(Duration::from_secs(2), flow.notify.notified()).await;
                    if waited.is_err() && !shared.stop.load(Relaxed) {
                        // A probe stopped seeing messages (lost or disconnected): resynchronise
                        // the window instead of stalling the run; losses are reported anyway.
                        flow.sent_to_probed.store(flow.progress.load(Relaxed), Relaxed);
                        if !shared.stall_warned.swap(true, Relaxed) {
                            eprintln!("\nbench: closed-loop probe stalled for 2 s; window reset");
                        }
                    }
                    continue;
                }
                (plan.max_in_flight - in_flight).min(plan.batch as u64)
            }
        };
        let first_seq = shared.seq.fetch_add(n, Relaxed);
        body.clear();
        channels_in_batch.clear();
        body.extend_from_slice(br#"{"messages":["#);
        let mut to_probed = 0;
        for k in 0..n {
            let seq = first_seq + k;
            let channel = (seq % plan.channels as u64) as usize;
            if k > 0 {
                body.push(b',');
            }
            write_message(&mut body, &plan.channel_names[channel], unix_ns(), seq, plan.payload);
            channels_in_batch.push(channel);
            to_probed += u64::from(shared.flow.probed[channel]);
        }
        body.extend_from_slice(b"]}");
        shared.flow.sent_to_probed.fetch_add(to_probed, Relaxed);
        sent += n;
        shared.requests.fetch_add(1, Relaxed);
        let sent_at = Instant::now();
        let ok = match http.post_json("/api/publish", &body).await {
            Ok(resp) if resp.status == 200 => {
                let round_trip = sent_at.elapsed().as_nanos() as u64;
                lock(&shared.round_trips).record(round_trip);
                record_offsets(&shared, &channels_in_batch, &resp.body)
            }
            Ok(resp) => {
                shared.note_error(format!("HTTP {}: {}", resp.status, resp.text()));
                false
            }
            Err(e) => {
                shared.note_error(e.to_string());
                false
            }
        };
        if !ok {
            // Those messages will never be delivered; do not let them hold the window shut.
            shared.flow.sent_to_probed.fetch_sub(to_probed, Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Records the offsets of a successful publish response; false when it reports no success.
fn record_offsets(shared: &PubShared, channels: &[usize], body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    let mut offsets = Vec::with_capacity(channels.len());
    scan_messages(body, |offset, _| offsets.push(offset));
    if offsets.len() != channels.len() {
        // Some results are errors (or the shape is unexpected): fall back to a real parse.
        let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let results = parsed["results"].as_array().cloned().unwrap_or_default();
        offsets.clear();
        let mut failures = 0;
        for (i, result) in results.iter().enumerate().take(channels.len()) {
            match result["offset"].as_u64() {
                Some(offset) => {
                    note_offset(shared, channels[i], offset);
                    shared.published.fetch_add(1, Relaxed);
                }
                None => failures += 1,
            }
        }
        if failures > 0 || results.len() != channels.len() {
            shared.note_error(format!(
                "publish response has {} results for {} messages ({failures} failed): {}",
                results.len(),
                channels.len(),
                text.chars().take(300).collect::<String>()
            ));
        }
        return failures < channels.len();
    }
    for (&channel, offset) in channels.iter().zip(offsets) {
        note_offset(shared, channel, offset);
    }
    shared.published.fetch_add(channels.len() as u64, Relaxed);
    true
}

fn note_offset(shared: &PubShared, channel: usize, offset: u64) {
    shared.published_max[channel].fetch_max(offset, Relaxed);
}

// ---------------------------------------------------------------------------------------------
// Coordination: the parent process and child shards.
// ---------------------------------------------------------------------------------------------

/// A child shard process and its JSON-lines pipes.
struct ChildShard {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl ChildShard {
    fn spawn(index: usize, count: usize) -> anyhow::Result<ChildShard> {
        let exe = std::env::current_exe().context("cannot find this executable to re-run it")?;
        let mut child = tokio::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .arg("--shard")
            .arg(format!("{index}/{count}"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a bench child process")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = child.stdout.take().context("child stdout")?;
        Ok(ChildShard { child, stdin, lines: BufReader::new(stdout).lines() })
    }

    async fn send(&mut self, command: &Value) -> anyhow::Result<()> {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The next line whose `event` is `event`, parsed.
    async fn expect<T: serde::de::DeserializeOwned>(&mut self, event: &str) -> anyhow::Result<T> {
        while let Some(line) = self.lines.next_line().await? {
            let Ok(mut value) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if value["event"] == event {
                return Ok(serde_json::from_value(value["data"].take())?);
            }
        }
        let status = self.child.wait().await?;
        bail!("bench child exited ({status}) before sending {event:?}")
    }
}

/// A child: run one shard, obey the parent's commands, print `ready` and `result` lines.
async fn run_child(plan: Arc<Plan>, index: usize, count: usize) -> anyhow::Result<ExitCode> {
    let mut shard = Shard::start(Arc::clone(&plan), index, count, false);
    let setup = shard.wait_setup(None).await;
    emit("ready", &setup)?;
    let mut cpu0 = proc_stats("self").map_or(0.0, |s| s.cpu_secs);
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = commands.next_line().await? {
        let command: Value = serde_json::from_str(&line).context("bad command from parent")?;
        match command["cmd"].as_str() {
            Some("window") => {
                shard.set_window_start(command["start_ns"].as_u64().unwrap_or(u64::MAX));
                cpu0 = proc_stats("self").map_or(0.0, |s| s.cpu_secs);
            }
            Some("window_end") => shard.set_window_end(command["end_ns"].as_u64().unwrap_or(0)),
            Some("stop") => {
                let published: Vec<u64> =
                    serde_json::from_value(command["published"].clone()).unwrap_or_default();
                let mut published = published;
                published.resize(plan.channels, 0);
                let report = shard.finish(&published, setup, cpu0).await;
                emit("result", &report)?;
                return Ok(ExitCode::SUCCESS);
            }
            _ => bail!("unknown command from parent: {line}"),
        }
    }
    // The parent went away: nothing to report to.
    Ok(ExitCode::FAILURE)
}

fn emit(event: &str, data: &impl Serialize) -> anyhow::Result<()> {
    let line = json!({"event": event, "data": data});
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// The parent: children, own shard, publishers, the measurement clock and the report.
async fn run_parent(plan: Arc<Plan>) -> anyhow::Result<ExitCode> {
    let progress = Progress::new(plan.json);
    let server_before = servers_stats(&plan.server_pids)?;
    let tcp_before = tcp_counters();

    let mut children = Vec::new();
    for index in 1..plan.processes {
        children.push(ChildShard::spawn(index, plan.processes)?);
    }
    let mut shard = Shard::start(Arc::clone(&plan), 0, plan.processes, true);
    let mut setups = vec![shard.wait_setup(Some(&progress)).await];
    for child in &mut children {
        progress.show("waiting for child processes to connect");
        setups.push(child.expect::<SetupReport>("ready").await?);
    }
    let setup = merge_setup(&setups);
    let tcp_setup = tcp_before.zip(tcp_counters()).map(|(a, b)| TcpCounters {
        listen_overflows: b.listen_overflows - a.listen_overflows,
        syn_retransmits: b.syn_retransmits - a.syn_retransmits,
    });
    if setup.connected == 0 {
        progress.clear();
        eprintln!(
            "bench: no subscriber could connect to {}: {}",
            plan.ws_urls.join(", "),
            setup.errors.first().map_or("unknown error", String::as_str)
        );
        return Ok(ExitCode::FAILURE);
    }

    let sample_server = || servers_stats(&plan.server_pids);
    let mut idle = None;
    let flow = Arc::clone(&shard.ctx.flow);
    let pubs = Arc::new(PubShared {
        plan: Arc::clone(&plan),
        flow,
        seq: AtomicU64::new(0),
        published_max: (0..plan.channels).map(|_| AtomicU64::new(0)).collect(),
        published: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        stop: AtomicBool::new(false),
        stall_warned: AtomicBool::new(false),
        round_trips: Mutex::new(Histogram::default()),
    });
    let mut publishers = tokio::task::JoinSet::new();

    if plan.idle {
        // Let the server finish per-connection allocations before sampling memory.
        pace(&progress, Duration::from_secs(2), "settling", setup.connected, || live_rates(&pubs))
            .await;
        idle = Some(sample_server()?);
    } else {
        let per_publisher = match plan.rate {
            Rate::PerSec(r) => Some(r / plan.publishers as f64),
            Rate::Max => None,
        };
        for index in 0..plan.publishers {
            publishers.spawn(publisher(Arc::clone(&pubs), index, per_publisher));
        }
        pace(&progress, plan.warmup, "warmup", setup.connected, || live_rates(&pubs)).await;
    }

    // Measurement window.
    let start_ns = unix_ns();
    shard.set_window_start(start_ns);
    for child in &mut children {
        child.send(&json!({"cmd": "window", "start_ns": start_ns})).await?;
    }
    let published_at_start = pubs.published.load(Relaxed);
    let server_start = sample_server()?;
    let bench_cpu0 = proc_stats("self").map_or(0.0, |s| s.cpu_secs);
    let window_started = Instant::now();
    let label = if plan.idle { "holding" } else { "measuring" };
    pace(&progress, plan.duration, label, setup.connected, || live_rates(&pubs)).await;
    let end_ns = unix_ns();
    let elapsed = window_started.elapsed().as_secs_f64();
    shard.set_window_end(end_ns);
    for child in &mut children {
        child.send(&json!({"cmd": "window_end", "end_ns": end_ns})).await?;
    }
    let server_end = sample_server()?;
    let published_in_window = pubs.published.load(Relaxed) - published_at_start;

    pubs.stop.store(true, Relaxed);
    pubs.flow.notify.notify_waiters();
    while publishers.join_next().await.is_some() {}
    let published: Vec<u64> = pubs.published_max.iter().map(|a| a.load(Relaxed)).collect();

    progress.show("draining");
    for child in &mut children {
        child.send(&json!({"cmd": "stop", "published": published})).await?;
    }
    let mut reports = vec![shard.finish(&published, setups.remove(0), bench_cpu0).await];
    for (child, setup) in children.iter_mut().zip(setups) {
        let mut report: ShardReport = child.expect("result").await?;
        report.setup = setup;
        reports.push(report);
        let _ = child.child.wait().await;
    }
    progress.clear();

    let report = build_report(
        &plan,
        setup,
        &reports,
        &pubs,
        Measured {
            tcp_setup,
            elapsed,
            published_in_window,
            server_before,
            idle,
            server_start,
            server_end,
        },
    );
    if plan.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", human_report(&report));
    }
    let delivered = report["delivery"]["delivered"].as_u64().unwrap_or(0);
    Ok(if plan.idle || delivered > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Sleeps `total`, refreshing the live line every second with what `live` reports
/// (received messages per second and the rest of the line).
async fn pace(
    progress: &Progress,
    total: Duration,
    label: &str,
    connections: u64,
    mut live: impl FnMut() -> (f64, String),
) {
    let started = Instant::now();
    while started.elapsed() < total {
        let left = total.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        if progress.active() {
            let (received_per_sec, extra) = live();
            progress.show(&status_line(
                label,
                started.elapsed(),
                Some(total),
                connections,
                received_per_sec,
                &extra,
            ));
        }
    }
}

/// Received messages per second since the previous call, and the rest of the live line.
fn live_rates(pubs: &PubShared) -> (f64, String) {
    static PREVIOUS: Mutex<Option<(Instant, u64, u64)>> = Mutex::new(None);
    let stats = merged_stats();
    let published = pubs.published.load(Relaxed);
    let now = Instant::now();
    let mut previous = lock(&PREVIOUS);
    let (delivered_rate, published_rate) = match *previous {
        Some((at, delivered, pubd)) => {
            let secs = now.duration_since(at).as_secs_f64().max(1e-9);
            ((stats.delivered_total - delivered) as f64 / secs, (published - pubd) as f64 / secs)
        }
        None => (0.0, 0.0),
    };
    *previous = Some((now, stats.delivered_total, published));
    let mut line = format!(
        "published {}/s | lost {} | errors {}",
        human_rate(published_rate),
        stats.gaps,
        pubs.errors.load(Relaxed)
    );
    if stats.latency.count() > 0 {
        let _ = write!(line, " | p99 {}", fmt_ns(stats.latency.value_at_quantile(0.99)));
    }
    (delivered_rate, line)
}

fn merge_setup(setups: &[SetupReport]) -> SetupReport {
    let mut out = SetupReport::default();
    let mut handshakes = Histogram::default();
    for s in setups {
        out.requested += s.requested;
        out.connected += s.connected;
        out.failed += s.failed;
        // Shards connect concurrently, so the slowest one bounds the setup phase.
        out.secs = out.secs.max(s.secs);
        for e in &s.errors {
            if out.errors.len() < 5 && !out.errors.contains(e) {
                out.errors.push(e.clone());
            }
        }
        handshakes.merge(&Histogram::from_sparse(&s.handshake_ns));
    }
    out.handshake_ns = handshakes.to_sparse();
    out
}

/// Server and timing samples taken by the parent.
struct Measured {
    tcp_setup: Option<TcpCounters>,
    elapsed: f64,
    published_in_window: u64,
    server_before: Option<ProcStats>,
    idle: Option<Option<ProcStats>>,
    server_start: Option<ProcStats>,
    server_end: Option<ProcStats>,
}

fn build_report(
    plan: &Plan,
    setup: SetupReport,
    shards: &[ShardReport],
    pubs: &PubShared,
    m: Measured,
) -> Value {
    let sum = |f: fn(&ShardReport) -> u64| shards.iter().map(f).sum::<u64>();
    let mut latency = Histogram::default();
    let mut closes: BTreeMap<String, u64> = BTreeMap::new();
    for s in shards {
        latency.merge(&Histogram::from_sparse(&s.latency_ns));
        for (code, n) in &s.closes {
            *closes.entry(code.to_string()).or_default() += n;
        }
    }
    let delivered_window = sum(|s| s.delivered_window);
    let gaps = sum(|s| s.gaps);
    let tail = sum(|s| s.tail_lost);
    let ms = |ns: u64| ns as f64 / 1e6;
    let pct = |h: &Histogram, q: f64| ms(h.value_at_quantile(q));

    let mut report = json!({
        "config": {
            "url": plan.ws_urls,
            "publish_url": plan.http_urls,
            "subscribers": plan.subscribers,
            "channels": plan.channels,
            "rate": plan.rate.to_string(),
            "payload_bytes": plan.payload,
            "duration_secs": plan.duration.as_secs_f64(),
            "warmup_secs": plan.warmup.as_secs_f64(),
            "processes": plan.processes,
            "publishers": plan.publishers,
            "max_in_flight": (plan.rate == Rate::Max).then_some(plan.max_in_flight),
            "compress": plan.compress,
            "source_ips": plan.source_ips.len().max(1),
            "idle": plan.idle,
        },
        "setup": setup_json(&setup),
        "measured_secs": m.elapsed,
        "bench_cpu_secs": shards.iter().map(|s| s.bench_cpu_secs).sum::<f64>(),
    });
    if let Some(tcp) = &m.tcp_setup {
        // System-wide counters: accept-queue overflows make clients retransmit SYNs after 1 s.
        report["setup"]["tcp_listen_overflows"] = json!(tcp.listen_overflows);
        report["setup"]["tcp_syn_retransmits"] = json!(tcp.syn_retransmits);
    }
    if !plan.idle {
        let per_sec = m.published_in_window as f64 / m.elapsed.max(1e-9);
        let round_trips = lock(&pubs.round_trips);
        report["publish"] = json!({
            "batch": plan.batch,
            "round_trip_ms": {
                "p50": pct(&round_trips, 0.5),
                "p99": pct(&round_trips, 0.99),
                "max": ms(round_trips.max()),
            },
            "published": pubs.published.load(Relaxed),
            "published_in_window": m.published_in_window,
            "per_sec": per_sec,
            "requests": pubs.requests.load(Relaxed),
            "errors": pubs.errors.load(Relaxed),
            "first_error": *lock(&pubs.first_error),
        });
        if let Rate::PerSec(target) = plan.rate {
            report["publish"]["target_per_sec"] = json!(target);
            report["publish"]["below_target"] = json!(per_sec < 0.95 * target);
        }
        report["delivery"] = json!({
            "delivered": sum(|s| s.delivered_total),
            "delivered_in_window": delivered_window,
            "per_sec": delivered_window as f64 / m.elapsed.max(1e-9),
            "expected": sum(|s| s.expected),
            "lost": gaps + tail,
            "lost_gaps": gaps,
            "lost_never_received": tail,
            "duplicates": sum(|s| s.duplicates),
            "unsubscribed": sum(|s| s.unsubscribed),
            "server_errors": sum(|s| s.server_errors),
            "disconnects": closes,
        });
        report["latency_ms"] = latency_json(&latency);
    } else {
        report["delivery"] = json!({"disconnects": closes});
    }
    if let (Some(start), Some(end)) = (&m.server_start, &m.server_end) {
        let deliveries = if plan.idle { 0 } else { delivered_window };
        let mut server = server_json(&plan.server_pids, start, end, m.elapsed, deliveries);
        if let (Some(before), Some(Some(after))) = (&m.server_before, &m.idle) {
            let per_conn =
                (after.rss_kb as f64 - before.rss_kb as f64) * 1024.0 / setup.connected as f64;
            server["rss_kb_before_connect"] = json!(before.rss_kb);
            server["rss_kb_after_connect"] = json!(after.rss_kb);
            server["rss_bytes_per_connection"] = json!(per_conn);
        }
        report["server"] = server;
    }
    report
}

/// The setup section of a report.
fn setup_json(setup: &SetupReport) -> Value {
    let handshakes = Histogram::from_sparse(&setup.handshake_ns);
    let ms = |ns: u64| ns as f64 / 1e6;
    json!({
        "connected": setup.connected,
        "failed": setup.failed,
        "secs": setup.secs,
        "handshakes_per_sec": setup.connected as f64 / setup.secs.max(1e-9),
        "handshake_ms": {
            "p50": ms(handshakes.value_at_quantile(0.5)),
            "p99": ms(handshakes.value_at_quantile(0.99)),
            "max": ms(handshakes.max()),
        },
        "errors": setup.errors,
    })
}

/// The latency section of a report, in ms.
fn latency_json(latency: &Histogram) -> Value {
    let ms = |ns: u64| ns as f64 / 1e6;
    let pct = |q: f64| ms(latency.value_at_quantile(q));
    json!({
        "samples": latency.count(),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "p999": pct(0.999),
        "max": ms(latency.max()),
        "mean": latency.mean() / 1e6,
    })
}

/// The server section of a report: CPU and RSS of the servers between `start` and `end`
/// (`elapsed` seconds apart), and CPU per million of the `deliveries` made meanwhile.
fn server_json(
    pids: &[u32],
    start: &ProcStats,
    end: &ProcStats,
    elapsed: f64,
    deliveries: u64,
) -> Value {
    let cpu = end.cpu_secs - start.cpu_secs;
    let mut server = json!({
        "pid": pids,
        "cpu_secs": cpu,
        "cpu_cores": cpu / elapsed.max(1e-9),
        "rss_kb_start": start.rss_kb,
        "rss_kb_end": end.rss_kb,
    });
    if deliveries > 0 {
        server["cpu_secs_per_million_deliveries"] = json!(cpu / (deliveries as f64 / 1e6));
    }
    server
}

/// Renders the JSON report for people.
fn human_report(r: &Value) -> String {
    let c = &r["config"];
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mut out = String::new();
    let traffic = if c["idle"] == true {
        "idle (no publishing)".to_owned()
    } else if c["market"] == true {
        format!(
            "market data from the server's feed, {} symbols, {} per subscriber",
            c["symbols"], c["symbols_per_subscriber"]
        )
    } else {
        format!("rate {}, payload {} B", c["rate"].as_str().unwrap_or_default(), c["payload_bytes"])
    };
    let _ = writeln!(
        out,
        "ferrocast bench: {} subscribers on {} channels, {traffic}, {} s, {} process(es)",
        c["subscribers"],
        c["channels"],
        f(&c["duration_secs"]),
        c["processes"],
    );
    let s = &r["setup"];
    let _ = writeln!(
        out,
        "setup     {} connected, {} failed in {:.2} s: {:.0} handshakes/s (p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms)",
        s["connected"],
        s["failed"],
        f(&s["secs"]),
        f(&s["handshakes_per_sec"]),
        f(&s["handshake_ms"]["p50"]),
        f(&s["handshake_ms"]["p99"]),
        f(&s["handshake_ms"]["max"]),
    );
    if s["tcp_listen_overflows"].as_u64().is_some_and(|n| n > 0) {
        let _ = writeln!(
            out,
            "          {} accept-queue overflows and {} SYN retransmits (system-wide) during setup: slow accepts cost clients a 1 s retry",
            s["tcp_listen_overflows"], s["tcp_syn_retransmits"],
        );
    }
    if let Some(errors) = s["errors"].as_array().filter(|e| !e.is_empty()) {
        for e in errors {
            let _ = writeln!(out, "          error: {}", e.as_str().unwrap_or_default());
        }
    }
    if let Some(p) = r.get("publish") {
        let _ = writeln!(
            out,
            "publish   {} messages ({:.0}/s in the window), {} requests of up to {}, {} errors{}",
            p["published"],
            f(&p["per_sec"]),
            p["requests"],
            p["batch"],
            p["errors"],
            p["first_error"].as_str().map(|e| format!(" (first: {e})")).unwrap_or_default(),
        );
        let rt = &p["round_trip_ms"];
        let _ = writeln!(
            out,
            "          request round trip p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            f(&rt["p50"]),
            f(&rt["p99"]),
            f(&rt["max"]),
        );
        if p["below_target"] == true {
            let _ = writeln!(
                out,
                "          below the target of {}/s: the publishers or the server could not keep up (try --publishers, --publish-batch)",
                p["target_per_sec"],
            );
        }
    }
    if let Some(feed) = r.get("feed") {
        let _ = writeln!(
            out,
            "feed      {:.0} trades/s published on ticks.* ({} trades, {} closed candles, between two reads of /api/channels {:.1} s apart)",
            f(&feed["trades_per_sec"]),
            feed["trades"],
            feed["closed_candles"],
            f(&feed["trades_secs"]),
        );
    }
    let d = &r["delivery"];
    if let Some(kinds) = d.get("by_kind") {
        let _ = writeln!(
            out,
            "          delivered trades {}, closed candles {}, forming candles {}; snapshot {}, before the ack {}",
            kinds["trades"],
            kinds["closed_candles"],
            kinds["forming_candles"],
            kinds["snapshot"],
            kinds["before_ack"],
        );
    }
    if d.get("delivered").is_some() {
        let _ = writeln!(
            out,
            "delivery  {} delivered ({:.0}/s), lost {} (gaps {}, never received {}), duplicates {}, expected {}",
            d["delivered"],
            f(&d["per_sec"]),
            d["lost"],
            d["lost_gaps"],
            d["lost_never_received"],
            d["duplicates"],
            d["expected"],
        );
        let l = &r["latency_ms"];
        let _ = writeln!(
            out,
            "latency   p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} samples)",
            f(&l["p50"]),
            f(&l["p90"]),
            f(&l["p99"]),
            f(&l["p999"]),
            f(&l["max"]),
            l["samples"],
        );
        if let Some(clock) = l["clock"].as_str() {
            let _ = writeln!(out, "          ({clock})");
        }
    }
    if d["disconnects"].as_object().is_some_and(|o| !o.is_empty()) {
        let _ = writeln!(out, "closed    by the server (code: count): {}", d["disconnects"]);
    }
    if let Some(srv) = r.get("server") {
        let _ = write!(
            out,
            "server    pid {}: {:.2} cpu-s ({:.0}% of a core), RSS {:.1} -> {:.1} MiB",
            srv["pid"],
            f(&srv["cpu_secs"]),
            f(&srv["cpu_cores"]) * 100.0,
            f(&srv["rss_kb_start"]) / 1024.0,
            f(&srv["rss_kb_end"]) / 1024.0,
        );
        if let Some(v) = srv["cpu_secs_per_million_deliveries"].as_f64() {
            let _ = write!(out, ", {v:.2} cpu-s per million deliveries");
        }
        if let Some(v) = srv["rss_bytes_per_connection"].as_f64() {
            let _ = write!(out, ", {v:.0} bytes RSS per connection");
        }
        out.push('\n');
    }
    let _ = writeln!(out, "bench     {:.2} cpu-s", f(&r["bench_cpu_secs"]));
    out
}

fn fmt_ns(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.1}ms", ns as f64 / 1e6)
    } else {
        format!("{:.0}µs", ns as f64 / 1e3)
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readers.
// ---------------------------------------------------------------------------------------------

/// CPU time and resident memory of a process.
#[derive(Debug, Clone, Copy)]
struct ProcStats {
    cpu_secs: f64,
    rss_kb: u64,
}

/// The summed CPU time and RSS of every server process (the nodes of a cluster), or `None`
/// when none is given.
fn servers_stats(pids: &[u32]) -> anyhow::Result<Option<ProcStats>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut sum = ProcStats { cpu_secs: 0.0, rss_kb: 0 };
    for pid in pids {
        let s = proc_stats(&pid.to_string())?;
        sum.cpu_secs += s.cpu_secs;
        sum.rss_kb += s.rss_kb;
    }
    Ok(Some(sum))
}

/// Linux reports utime/stime in clock ticks; USER_HZ is 100 on every mainstream architecture.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status` (`pid` may be `self`).
fn proc_stats(pid: &str) -> anyhow::Result<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat (is the server pid right?)"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    parse_proc(&stat, &status).with_context(|| format!("unexpected /proc/{pid} format"))
}

fn parse_proc(stat: &str, status: &str) -> Option<ProcStats> {
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcStats { cpu_secs: (utime + stime) as f64 / CLOCK_TICKS_PER_SEC, rss_kb })
}

/// System-wide TCP counters that explain slow connection setup.
#[derive(Debug, Clone, Copy)]
struct TcpCounters {
    listen_overflows: u64,
    syn_retransmits: u64,
}

/// Reads `ListenOverflows` and `TCPSynRetrans` from `/proc/net/netstat`.
fn tcp_counters() -> Option<TcpCounters> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    parse_netstat(&text)
}

fn parse_netstat(text: &str) -> Option<TcpCounters> {
    // Pairs of lines: "TcpExt: Name1 Name2 ..." then "TcpExt: 1 2 ...".
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?.split_whitespace();
    let values = lines.next()?.split_whitespace();
    let mut counters = TcpCounters { listen_overflows: 0, syn_retransmits: 0 };
    for (name, value) in names.zip(values).skip(1) {
        match name {
            "ListenOverflows" => counters.listen_overflows = value.parse().ok()?,
            "TCPSynRetrans" => counters.syn_retransmits = value.parse().ok()?,
            _ => {}
        }
    }
    Some(counters)
}

/// The soft open-file limit of this process, from `/proc/self/limits`.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Latency histogram.
// ---------------------------------------------------------------------------------------------

mod histogram {
    //! A log-linear (HDR-style) histogram of `u64` values: 128 linear sub-buckets per power of
    //! two, so any recorded value is reported within 1/128 (< 0.8%) of its true value.

    const SUB_BITS: u32 = 7;
    const SUB: u64 = 1 << SUB_BITS;
    /// Enough buckets for every `u64`.
    const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

    /// Counts per bucket plus exact count, sum and max.
    #[derive(Clone, Debug)]
    pub struct Histogram {
        counts: Vec<u64>,
        count: u64,
        sum: u128,
        max: u64,
    }

    impl Default for Histogram {
        fn default() -> Self {
            Histogram { counts: vec![0; BUCKETS], count: 0, sum: 0, max: 0 }
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let exponent = 63 - v.leading_zeros(); // >= SUB_BITS
        let shift = exponent - SUB_BITS;
        let sub = (v >> shift) - SUB;
        (((shift + 1) as u64) * SUB + sub) as usize
    }

    /// The highest value that maps to bucket `i`.
    fn highest_in(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let shift = (i / SUB - 1) as u32;
        let low = (SUB + i % SUB) << shift;
        low.saturating_add((1u64 << shift) - 1)
    }

    impl Histogram {
        pub fn record(&mut self, v: u64) {
            self.counts[index(v)] += 1;
            self.count += 1;
            self.sum += u128::from(v);
            self.max = self.max.max(v);
        }

        pub fn count(&self) -> u64 {
            self.count
        }

        pub fn max(&self) -> u64 {
            self.max
        }

        pub fn mean(&self) -> f64 {
            if self.count == 0 { 0.0 } else { self.sum as f64 / self.count as f64 }
        }

        /// The value at quantile `q` (0..=1), 0 when empty.
        pub fn value_at_quantile(&self, q: f64) -> u64 {
            if self.count == 0 {
                return 0;
            }
            let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, &c) in self.counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return highest_in(i).min(self.max);
                }
            }
            self.max
        }

        pub fn merge(&mut self, other: &Histogram) {
            for (a, b) in self.counts.iter_mut().zip(&other.counts) {
                *a += b;
            }
            self.count += other.count;
            self.sum += other.sum;
            self.max = self.max.max(other.max);
        }

        /// Non-empty buckets as `[representative value, count]` pairs (for child reports).
        pub fn to_sparse(&self) -> Vec<[u64; 2]> {
            let mut out: Vec<[u64; 2]> = self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &c)| [highest_in(i), c])
                .collect();
            // Carry the exact maximum so merged reports keep it.
            if let Some(last) = out.last_mut() {
                last[0] = last[0].min(self.max);
            }
            out
        }

        pub fn from_sparse(pairs: &[[u64; 2]]) -> Histogram {
            let mut h = Histogram::default();
            for &[value, count] in pairs {
                h.counts[index(value)] += count;
                h.count += count;
                h.sum += u128::from(value) * u128::from(count);
                h.max = h.max.max(value);
            }
            h
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn buckets_round_trip_within_precision() {
            for v in [0, 1, 127, 128, 129, 255, 256, 1000, 123_456, 1 << 40, u64::MAX] {
                let hi = highest_in(index(v));
                assert!(hi >= v, "{v}: {hi}");
                assert!((hi - v) as f64 <= v as f64 / 128.0 + 1.0, "{v}: {hi}");
                assert_eq!(index(hi), index(v));
            }
        }

        #[test]
        fn quantiles() {
            let mut h = Histogram::default();
            for v in 1..=10_000u64 {
                h.record(v * 1000);
            }
            let p50 = h.value_at_quantile(0.5) as f64;
            assert!((p50 / 5_000_000.0 - 1.0).abs() < 0.01, "{p50}");
            let p99 = h.value_at_quantile(0.99) as f64;
            assert!((p99 / 9_900_000.0 - 1.0).abs() < 0.01, "{p99}");
            assert_eq!(h.value_at_quantile(1.0), 10_000_000);
            assert_eq!(h.max(), 10_000_000);
            assert!((h.mean() - 5_000_500.0).abs() < 1.0);
            assert_eq!(Histogram::default().value_at_quantile(0.5), 0);
        }

        #[test]
        fn sparse_round_trip_and_merge() {
            let mut a = Histogram::default();
            for v in [5, 500, 50_000, 5_000_000] {
                a.record(v);
            }
            let b = Histogram::from_sparse(&a.to_sparse());
            assert_eq!(b.count(), 4);
            assert_eq!(b.max(), 5_000_000);
            assert_eq!(b.value_at_quantile(0.5), a.value_at_quantile(0.5));
            let mut m = a.clone();
            m.merge(&b);
            assert_eq!(m.count(), 8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_single_and_batched_frames() {
        let mut seen = Vec::new();
        let n = scan_messages(
            br#"{"type":"msg","channel":"bench.3","offset":58,"data":{"t":1732230000123456789,"s":17,"p":"xx"}}"#,
            |o, t| seen.push((o, t)),
        );
        assert_eq!(n, 1);
        assert_eq!(seen, [(58, Some(1_732_230_000_123_456_789))]);

        seen.clear();
        let n = scan_messages(
            br#"[{"type":"msg","channel":"a","data":{"t":10,"s":1,"p":""},"offset":1},{"type":"msg","channel":"a","offset": 2,"data":{"t":20,"s":2,"p":"x"}}]"#,
            |o, t| seen.push((o, t)),
        );
        assert_eq!(n, 2);
        assert_eq!(seen, [(1, Some(10)), (2, Some(20))]);
    }

    #[test]
    fn messages_without_timestamps_still_count() {
        let mut seen = Vec::new();
        let n = scan_messages(
            br#"[{"type":"msg","channel":"a:b","offset":4,"data":{"x":1}},{"type":"msg","channel":"a:b","offset":5,"data":{"t":7,"p":"x:y"}}]"#,
            |o, t| seen.push((o, t)),
        );
        assert_eq!(n, 2);
        assert_eq!(seen, [(4, None), (5, Some(7))]);
    }

    #[test]
    fn control_frames_have_no_messages() {
        assert_eq!(scan_messages(br#"{"type":"ping"}"#, |_, _| {}), 0);
        assert_eq!(
            scan_messages(br#"{"type":"unsubscribed","channel":"a","reason":"x"}"#, |_, _| {}),
            0
        );
    }

    #[test]
    fn publish_results_scan_in_order() {
        let mut offsets = Vec::new();
        scan_messages(
            br#"{"results":[{"channel":"bench.0","offset":7,"epoch":"e"},{"channel":"bench.1","offset":3,"epoch":"e"}]}"#,
            |o, _| offsets.push(o),
        );
        assert_eq!(offsets, [7, 3]);
    }

    #[test]
    fn payload_has_the_requested_size() {
        for payload in [0, 10, 60, 100, 1000, 4096] {
            let mut body = Vec::new();
            write_message(&mut body, "bench.12", 1_732_230_000_123_456_789, 17, payload);
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["channel"], "bench.12");
            assert_eq!(v["data"]["s"], 17);
            // Payloads below the unpadded size (39 bytes here) come out at that size.
            let data_len = v["data"].to_string().len();
            assert_eq!(data_len, payload.max(39), "{payload}");
            // The receiver's scanner finds the timestamp in what the server will echo.
            let frame =
                format!(r#"{{"type":"msg","channel":"bench.12","offset":1,"data":{}}}"#, v["data"]);
            let mut t = None;
            scan_messages(frame.as_bytes(), |_, ts| t = ts);
            assert_eq!(t, Some(1_732_230_000_123_456_789));
        }
    }

    /// A message published right after a subscribe can reach the client in the same socket
    /// read as the ack. It used to be dropped with the rest of that read, so the first
    /// message counted was the second one: "ack offset 0, first message offset 2", a gap.
    #[tokio::test]
    async fn messages_read_together_with_the_ack_are_kept() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let welcome =
                r#"{"type":"welcome","session":"s","version":1,"ping_interval_ms":25000}"#;
            ws.send(Message::text(welcome)).await.unwrap();
            let _subscribe = ws.next().await.unwrap().unwrap();
            // Ack and the channel's first message in one write, as a busy server sends them.
            let ack = r#"{"type":"ack","id":1,"result":{"ticks.A":{"epoch":"e","offset":0}}}"#;
            let first = r#"{"type":"msg","channel":"ticks.A","offset":1,"epoch":"e","data":{}}"#;
            ws.feed(Message::text(ack)).await.unwrap();
            ws.feed(Message::text(first)).await.unwrap();
            ws.flush().await.unwrap();
            ws
        });
        let (mut conn, _welcome) =
            LeanConn::connect(&url, &connect_options(None, false)).await.unwrap();
        let subscribed = subscribe(&mut conn, "ticks.A", Duration::from_secs(5)).await.unwrap();
        let _server_side = server.await.unwrap();
        assert_eq!(subscribed.base, 0);
        let mut offsets = Vec::new();
        for text in &subscribed.after_ack {
            scan_messages(text, |offset, _| offsets.push(offset));
        }
        assert_eq!(offsets, [1], "the message read with the ack is counted");
    }

    #[test]
    fn proc_parsing() {
        let stat = "1234 (my (weird) srv) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 1000000 500 18446744073709551615";
        let status = "Name:\tsrv\nVmRSS:\t  20480 kB\nThreads:\t4\n";
        let s = parse_proc(stat, status).unwrap();
        assert!((s.cpu_secs - 3.0).abs() < 1e-9);
        assert_eq!(s.rss_kb, 20480);
        assert!(proc_stats("self").unwrap().rss_kb > 0);
        let netstat = "TcpExt: SyncookiesSent ListenOverflows TCPSynRetrans\nTcpExt: 0 243 17\nIpExt: InNoRoutes\nIpExt: 0\n";
        let tcp = parse_netstat(netstat).unwrap();
        assert_eq!((tcp.listen_overflows, tcp.syn_retransmits), (243, 17));
        assert!(open_file_limit().unwrap() > 0);
    }

    #[test]
    fn rates_and_urls() {
        assert_eq!("max".parse::<Rate>().unwrap(), Rate::Max);
        assert_eq!("2500".parse::<Rate>().unwrap(), Rate::PerSec(2500.0));
        assert!("0".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
        assert_eq!(http_base("ws://127.0.0.1:8080/ws").unwrap(), "http://127.0.0.1:8080");
        assert_eq!(http_base("ws://localhost/ws?x=1").unwrap(), "http://localhost");
    }

    /// Arguments for tests that build a [`Plan`].
    pub(super) fn args_for_tests() -> BenchArgs {
        BenchArgs {
            url: vec!["ws://127.0.0.1:1/ws".into(), "ws://127.0.0.1:2/ws".into()],
            publish_url: vec![],
            api_key: None,
            subscribers: 10,
            channels: 3,
            rate: Rate::Max,
            payload: 100,
            duration: 1.0,
            warmup: 0.0,
            drain: 1.0,
            source_ips: vec![],
            source_ip_count: Some(3),
            server_pid: vec![],
            json: true,
            idle: false,
            processes: 3,
            publishers: 1,
            batch: 10,
            max_in_flight: 10,
            connect_concurrency: 4,
            channel_prefix: "bench".into(),
            recovery: None,
            compress: false,
            market: false,
            symbols: 500,
            symbols_per_subscriber: 20,
            shard: None,
        }
    }

    #[test]
    fn shards_partition_subscribers() {
        let args = args_for_tests();
        let plan = Plan::new(&args).unwrap();
        assert_eq!(plan.source_ips.len(), 3);
        let ranges: Vec<_> = (0..3).map(|i| plan.shard_range(i, 3)).collect();
        assert_eq!(ranges, [0..3, 3..6, 6..10]);
        // Two nodes: publishing through each, by default.
        assert_eq!(plan.http_urls, ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        let too_many_channels = BenchArgs { channels: 11, ..args };
        assert!(Plan::new(&too_many_channels).is_err());
    }
}

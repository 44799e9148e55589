//! `ferrocast simulate massive|binance|coinbase --listen ADDR`: a local stand-in for an
//! upstream market-data service, to try feeds without an account and to test failure
//! handling (rejected keys, evictions, stalls, malformed frames, a silent upstream).
//!
//! The simulator logs every connection, authentication and subscription on stderr, prints
//! one `listening on ...` line on stdout once it accepts connections, and answers the
//! control API described in `ferrocast_feeds::simulate` on the same port
//! (`GET /debug/subscriptions`, `POST /debug/stall`, ...). The Massive one also answers
//! Massive's REST aggregates (`GET /v2/aggs/ticker/...`) for candle backfill. It runs until
//! SIGINT or SIGTERM. Its log filter is `RUST_LOG` (default `info`), checked as strictly as
//! `log.level`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use ferrocast_feeds::simulate::{Eviction, Protocol, SimOptions, Simulator};

/// Flags of `ferrocast simulate`.
#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Which upstream to simulate.
    #[arg(value_enum)]
    pub protocol: SimProtocol,
    /// Address to listen on (WebSocket, control API and, for Massive, REST aggregates).
    #[arg(long, default_value = "127.0.0.1:9100", value_name = "HOST:PORT")]
    pub listen: String,
    /// Data events per second per connection, spread over its subscriptions.
    #[arg(long, default_value_t = 20.0, value_name = "N")]
    pub rate: f64,
    /// Massive: the only API key accepted (default: any non-empty key).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Massive: which connection is closed with max_connections when a key exceeds
    /// --max-connections on a cluster.
    #[arg(long, value_enum, default_value_t = SimEviction::Old)]
    pub eviction: SimEviction,
    /// Massive: authenticated connections allowed per key and cluster.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub max_connections: usize,
    /// Massive: interval of AM (minute) bars, in ms; shorten it for tests.
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    pub minute_bar_every_ms: u64,
    /// Every connection stops sending (without closing) this many ms after it opened.
    #[arg(long, value_name = "MS")]
    pub stall_after_ms: Option<u64>,
    /// Replace every Nth data frame with a malformed one.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub malformed_every: u64,
    /// Send no market data at all (authentication, pings, heartbeats and acks go on): a
    /// connected but silent upstream. POST /debug/silent?on=0 resumes data.
    #[arg(long)]
    pub silent: bool,
    /// Binance: interval of server pings, in ms.
    #[arg(long, default_value_t = 20_000, value_name = "MS")]
    pub ping_interval_ms: u64,
}

/// `ferrocast simulate` protocols.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SimProtocol {
    /// Massive (Polygon.io) stocks/options clusters at /stocks and /options, and REST
    /// aggregates at /v2/aggs/ticker/... (candle backfill).
    Massive,
    /// Binance spot combined streams at /stream.
    Binance,
    /// Coinbase Exchange ticker and heartbeat channels at /.
    Coinbase,
}

/// `--eviction` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SimEviction {
    /// The older connection is closed.
    Old,
    /// The newer connection is closed right after it authenticates.
    New,
}

/// Runs the simulator until SIGINT or SIGTERM.
pub async fn run(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    // RUST_LOG sets the simulator's log filter; an invalid one is refused, as `log.level` is.
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    if let Err(reason) = ferrocast_server::config::check_log_filter(&level) {
        eprintln!("ferrocast simulate: RUST_LOG: {reason}");
        return Ok(ExitCode::from(2));
    }
    let filter = tracing_subscriber::EnvFilter::new(&level);
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    if !(args.rate > 0.0 && args.rate <= 100_000.0) {
        eprintln!("ferrocast simulate: --rate {} must be above 0 and at most 100000", args.rate);
        return Ok(ExitCode::from(2));
    }
    let (protocol, paths) = match args.protocol {
        SimProtocol::Massive => (Protocol::Massive, "/stocks, /options"),
        SimProtocol::Binance => (Protocol::Binance, "/stream, /ws"),
        SimProtocol::Coinbase => (Protocol::Coinbase, "/"),
    };
    let opts = SimOptions {
        rate: args.rate,
        api_key: args.api_key,
        eviction: match args.eviction {
            SimEviction::Old => Eviction::Old,
            SimEviction::New => Eviction::New,
        },
        max_connections: args.max_connections.max(1),
        minute_bar_every: Duration::from_millis(args.minute_bar_every_ms.max(100)),
        stall_after: args.stall_after_ms.map(Duration::from_millis),
        malformed_every: args.malformed_every,
        silent: args.silent,
        ping_interval: Duration::from_millis(args.ping_interval_ms.max(100)),
        ..SimOptions::default()
    };
    let sim = match Simulator::bind(protocol, &args.listen, opts).await {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("ferrocast simulate: cannot listen on {}: {e}", args.listen);
            return Ok(ExitCode::from(2));
        }
    };
    println!(
        "ferrocast simulate {}: listening on ws://{} ({paths}); control: http://{}/debug/subscriptions",
        format!("{:?}", args.protocol).to_lowercase(),
        sim.addr(),
        sim.addr()
    );
    wait_for_signal().await;
    sim.shutdown();
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

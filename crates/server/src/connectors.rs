//! Upstream market-data connectors (`[[feeds]]`) wired to the hub, the feed board and the
//! metrics.
//!
//! Each configured feed becomes a task running its connector (Massive or generic) while this
//! node holds the ingest lease (always, with the memory broker; with the Redis broker one
//! node runs the cluster's feeds and the others stand by, state `standby`), until the server
//! drains. Connectors publish through [`HubSink`], report their state to the
//! [`FeedBoard`](crate::feedboard::FeedBoard) (so `/readyz` follows `required` feeds and
//! `/api/feeds` shows the reason when a feed is down), and register their counters for
//! `/metrics`.
//!
//! A [`DemandRouter`] fans demand out: a market channel (`ticks.SYM`, `quotes.SYM`,
//! `candles.SYM.*`) goes to the first feed, in configuration order, whose symbols match
//! (options `O:…` to the options feed, plain tickers to the stocks feed). Demand is this
//! node's subscribers and, with a cluster, every node's ([`Broker::cluster_demand`]): a
//! symbol watched only by a client on another node is subscribed upstream here. The router
//! also answers the hub's admission check, which is how a subscribe beyond an upstream limit
//! (Massive's 1,000 option contracts with quotes) is refused with `upstream_rejected` instead
//! of silently getting no data.
//!
//! The router also starts candle backfill on the node running the feeds: when a candle
//! channel of a feed that offers history ([`Feed::backfill`], Massive's REST aggregates)
//! gets its first subscriber, the bars are fetched in a task of their own (live data never
//! waits for them) and published if the channel still has no history, at most once per
//! channel per run. A feed's named `always` symbols are backfilled when it starts, since
//! their channels fill with live bars before anyone subscribes.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use ferrocast_feeds::config::FeedConfig;
use ferrocast_feeds::feed::{Feed, FeedContext, FeedStats, LinkState, MarketChannel, now_ms};
use ferrocast_feeds::generic::{GenericConfig, GenericFeed};
use ferrocast_feeds::market::{CANDLES_NAMESPACE, QUOTES_NAMESPACE, TRADES_NAMESPACE};
use ferrocast_feeds::massive::{MassiveConfig, MassiveFeed};
use ferrocast_hub::hub::DemandListener;
use ferrocast_hub::{Broker, Lease};
use parking_lot::{Mutex, RwLock};

use crate::AppState;
use crate::sources::{BackfillStats, HubSink, STANDBY, publish_backfill};

/// Routes hub demand to the feed serving each channel.
pub struct DemandRouter {
    feeds: Vec<Arc<dyn Feed>>,
    backfill: Option<Backfiller>,
}

/// What the router needs to backfill candle channels.
struct Backfiller {
    /// Weak: the Redis broker holds the hub, which holds the router.
    broker: Weak<dyn Broker>,
    stats: Arc<BackfillStats>,
    /// Backfill runs where the feeds run.
    ingest: Lease,
    /// Channels already backfilled (or tried) in this run.
    attempted: Mutex<HashSet<String>>,
}

impl Backfiller {
    fn start(
        &self,
        feed: &Arc<dyn Feed>,
        channel: &str,
        sym: &str,
        interval: ferrocast_feeds::market::Interval,
    ) {
        let Some((source, count)) = feed.backfill() else { return };
        if !self.ingest.is_held() || !self.attempted.lock().insert(channel.to_owned()) {
            return;
        }
        let (broker, stats) = (self.broker.clone(), self.stats.clone());
        let (channel, sym, name) = (channel.to_owned(), sym.to_owned(), feed.name().to_owned());
        tokio::spawn(async move {
            match source.bars(&sym, interval, count, now_ms()).await {
                Ok(bars) => {
                    let Some(broker) = broker.upgrade() else { return };
                    let published = publish_backfill(&*broker, &channel, &bars, &stats).await;
                    tracing::info!(feed = %name, channel, bars = published, "candles backfilled");
                }
                Err(e) => {
                    stats.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(feed = %name, channel, "candle backfill failed: {e}");
                }
            }
        });
    }
}

impl std::fmt::Debug for DemandRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.feeds.iter().map(|feed| feed.name())).finish()
    }
}

impl DemandRouter {
    /// A router over `feeds`, in priority order.
    pub fn new(feeds: Vec<Arc<dyn Feed>>) -> Self {
        DemandRouter { feeds, backfill: None }
    }

    /// Starts the backfill of `channel` (a candle channel) if its feed offers history.
    fn backfill_channel(&self, channel: &str) {
        if let (Some(backfill), Some(feed), Some(MarketChannel::Candles(sym, interval))) =
            (&self.backfill, self.route(channel), MarketChannel::parse(channel))
        {
            backfill.start(feed, channel, sym, interval);
        }
    }

    /// Backfills the candle channels of the `always` symbols of feed `cfg`.
    fn backfill_always(&self, cfg: &FeedConfig) {
        for sym in cfg.always.iter().filter(|s| ferrocast_feeds::market::is_valid_symbol(s)) {
            for interval in ferrocast_feeds::market::Interval::ALL {
                let channel = ferrocast_feeds::market::channel_for_candle(sym, interval);
                // Only where this feed is the one serving the channel.
                if self.route(&channel).is_some_and(|f| f.name() == cfg.name) {
                    self.backfill_channel(&channel);
                }
            }
        }
    }

    /// Also backfills candle channels through `broker` while `ingest` is held, counting in
    /// `stats`.
    pub fn with_backfill(
        mut self,
        broker: &Arc<dyn Broker>,
        stats: Arc<BackfillStats>,
        ingest: Lease,
    ) -> Self {
        self.backfill = Some(Backfiller {
            broker: Arc::downgrade(broker),
            stats,
            ingest,
            attempted: Mutex::new(HashSet::new()),
        });
        self
    }

    /// The feed serving `channel`, if it is a market channel some feed claims.
    pub fn route(&self, channel: &str) -> Option<&Arc<dyn Feed>> {
        let mc = MarketChannel::parse(channel)?;
        self.feeds.iter().find(|f| f.claims(&mc))
    }
}

impl DemandListener for DemandRouter {
    fn demand_changed(&self, channel: &str, wanted: bool) {
        if let Some(feed) = self.route(channel) {
            feed.demand(channel, wanted);
            if wanted {
                self.backfill_channel(channel);
            }
        }
    }

    fn admit(&self, channel: &str) -> Result<(), String> {
        match self.route(channel) {
            Some(feed) => feed.admit(channel),
            None => Ok(()),
        }
    }
}

/// A feed's connection loop, run until the future it is given completes.
type Runner = Box<
    dyn Fn(Pin<Box<dyn Future<Output = ()> + Send>>) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Starts every configured feed under the ingest lease and installs the demand router.
/// Feeds stop when the server drains. Does nothing without `[[feeds]]`.
pub fn start(app: &Arc<AppState>, ingest: &Lease) {
    if app.config.feeds.is_empty() {
        return;
    }
    let env: Vec<(String, String)> = std::env::vars().collect();
    // Every node's demand, kept current by the broker (empty without a cluster).
    let cluster_wants: Arc<RwLock<Arc<BTreeSet<String>>>> = Arc::default();
    let mut feeds: Vec<Arc<dyn Feed>> = Vec::new();
    let mut runners: Vec<(FeedConfig, Arc<FeedStats>, Runner)> = Vec::new();
    for cfg in &app.config.feeds {
        let stats = Arc::new(FeedStats::new(&cfg.name, &cfg.kind));
        // A weak reference: the board lives in `AppState`, which must not be kept alive by
        // its own feeds' callbacks.
        let board = Arc::downgrade(app);
        let (name, kind, required) = (cfg.name.clone(), cfg.kind.clone(), cfg.required);
        stats.set_observer(Box::new(move |state, reason| {
            if let Some(app) = board.upgrade() {
                app.feeds.set(&name, &kind, required, state, reason.map(str::to_owned));
            }
        }));
        app.feeds.register(&stats);
        let (hub, wants) = (app.hub.clone(), cluster_wants.clone());
        let ctx = FeedContext {
            sink: Arc::new(HubSink(app.clone())),
            probe: Arc::new(move |channel: &str| {
                hub.subscriber_count(channel) > 0 || wants.read().contains(channel)
            }),
            bars: app.feeds.upstream_bars.clone(),
            stats: stats.clone(),
        };
        match cfg.kind.as_str() {
            "massive" => {
                let feed = MassiveFeed::new(MassiveConfig::from_feed(cfg, &env), ctx);
                feeds.push(feed.clone());
                let run: Runner = Box::new(move |stop| Box::pin(feed.clone().run(stop)));
                runners.push((cfg.clone(), stats, run));
            }
            "generic" => match GenericConfig::from_feed(cfg, &env) {
                Ok(generic) => {
                    let feed = GenericFeed::new(generic, ctx);
                    feeds.push(feed.clone());
                    let run: Runner = Box::new(move |stop| Box::pin(feed.clone().run(stop)));
                    runners.push((cfg.clone(), stats, run));
                }
                // Validated at load time, so this is a bug rather than a user error; the feed
                // shows as failed instead of taking the server down.
                Err(problems) => ctx.stats.set_state(
                    LinkState::Failed,
                    Some(format!("invalid configuration: {problems:?}")),
                ),
            },
            other => tracing::error!(feed = %cfg.name, "unknown feed kind {other:?}"),
        }
    }
    let router = Arc::new(DemandRouter::new(feeds).with_backfill(
        &app.broker,
        app.candles.backfill.clone(),
        ingest.clone(),
    ));
    app.hub.add_demand_listener(router.clone());
    for (cfg, stats, run) in runners {
        tracing::info!(feed = %cfg.name, kind = %cfg.kind, url = %cfg.url, required = cfg.required, "upstream feed starting");
        tokio::spawn(run_under_lease(app.clone(), ingest.clone(), router.clone(), cfg, stats, run));
    }
    // Replayed after installing the router, so no subscription falls in between; a channel
    // reported twice is simply wanted.
    for channel in app.hub.demanded_channels() {
        router.demand_changed(&channel, true);
    }
    let patterns =
        [TRADES_NAMESPACE, QUOTES_NAMESPACE, CANDLES_NAMESPACE].map(|ns| format!("{ns}.*"));
    let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
    if let Some(mut demand) = app.broker.cluster_demand(&patterns) {
        let shutdown = app.shutdown.clone();
        tokio::spawn(async move {
            let mut held: Arc<BTreeSet<String>> = Arc::default();
            loop {
                tokio::select! {
                    changed = demand.changed() => if changed.is_err() { return },
                    _ = shutdown.draining() => return,
                }
                let now = demand.borrow_and_update().clone();
                *cluster_wants.write() = now.clone();
                for channel in now.difference(&held) {
                    router.demand_changed(channel, true);
                }
                for channel in held.difference(&now) {
                    router.demand_changed(channel, false);
                }
                held = now;
            }
        });
    }
}

/// Runs one feed while this node holds the ingest lease, in standby otherwise, until the
/// server drains.
async fn run_under_lease(
    app: Arc<AppState>,
    mut lease: Lease,
    router: Arc<DemandRouter>,
    cfg: FeedConfig,
    stats: Arc<FeedStats>,
    run: Runner,
) {
    let shutdown = app.shutdown.clone();
    loop {
        if !lease.is_held() {
            stats.set_state(LinkState::Standby, Some(STANDBY.into()));
        }
        tokio::select! {
            _ = lease.acquired() => {}
            _ = shutdown.draining() => break,
        }
        router.backfill_always(&cfg);
        let (mut watch, draining) = (lease.clone(), shutdown.clone());
        let stop = async move {
            tokio::select! {
                _ = draining.draining() => {}
                _ = watch.lost() => {}
            }
        };
        run(Box::pin(stop)).await;
        if shutdown.is_draining() {
            break;
        }
        tracing::info!(feed = %cfg.name, "ingest lease lost: another node runs this feed now");
    }
    stats.set_state(LinkState::Stopped, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Claims(&'static str, &'static str);

    impl Feed for Claims {
        fn name(&self) -> &str {
            self.0
        }
        fn claims(&self, channel: &MarketChannel<'_>) -> bool {
            channel.symbol().starts_with(self.1)
        }
        fn admit(&self, _channel: &str) -> Result<(), String> {
            Err(self.0.to_owned())
        }
        fn demand(&self, _channel: &str, _wanted: bool) {}
    }

    #[test]
    fn channels_go_to_the_first_feed_that_claims_them() {
        let router = DemandRouter::new(vec![
            Arc::new(Claims("options", "O:")),
            Arc::new(Claims("stocks", "")),
        ]);
        let name = |c: &str| router.route(c).map(|f| f.name().to_owned());
        assert_eq!(name("quotes.O:SPY241220P00720000").as_deref(), Some("options"));
        assert_eq!(name("candles.AAPL.1m").as_deref(), Some("stocks"));
        assert_eq!(name("chat.room"), None);
        assert_eq!(router.admit("ticks.AAPL"), Err("stocks".into()));
        assert_eq!(router.admit("chat.room"), Ok(()));
    }

    /// The whole path over real sockets: a Massive simulator upstream, the server with two
    /// feeds (stocks, options), a WebSocket client downstream.
    mod end_to_end {
        use std::time::Duration;

        use ferrocast_client::Client;
        use ferrocast_feeds::simulate::{Protocol, SimOptions, Simulator};

        use crate::config::{Config, Sources};
        use crate::{AppState, Server};

        /// A real server on a free port, stopped (drained) by [`Running::stop`].
        struct Running {
            addr: std::net::SocketAddr,
            stop: tokio::sync::oneshot::Sender<()>,
            task: tokio::task::JoinHandle<()>,
        }

        impl Running {
            async fn start(app: &std::sync::Arc<AppState>) -> Running {
                let server =
                    Server::bind(app.clone(), Some("127.0.0.1:0".parse().unwrap())).await.unwrap();
                let addr = server.local_addr();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(server.run(async move {
                    let _ = stopped.await;
                }));
                Running { addr, stop, task }
            }

            async fn stop(self) -> Result<(), tokio::task::JoinError> {
                let _ = self.stop.send(());
                self.task.await
            }
        }

        async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            let status = out[9..12].parse().unwrap();
            (status, out)
        }

        async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
            for _ in 0..250 {
                if f().await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("timed out waiting for {what}");
        }

        fn config(sim: &Simulator, key: &str) -> Config {
            let text = format!(
                r#"
                [simulator]
                enabled = false
                [[feeds]]
                name = "stocks"
                kind = "massive"
                url = "ws://{addr}/stocks"
                api_key = "{key}"
                events = ["T", "AM"]
                linger_ms = 100
                read_timeout_ms = 2000
                ping_interval_ms = 500
                [[feeds]]
                name = "options"
                kind = "massive"
                url = "ws://{addr}/options"
                api_key = "{key}"
                events = ["T", "Q"]
                quote_limit = 1
                required = false
                "#,
                addr = sim.addr()
            );
            Config::load(&Sources {
                file: Some((std::path::Path::new("test.toml"), text)),
                ..Default::default()
            })
            .expect("valid config")
        }

        /// The first subscriber of a candle channel makes the router fetch the feed's REST
        /// aggregates (the simulator's, at the WebSocket's host) once; the bars land in the
        /// channel's history in time order.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn candle_channels_are_backfilled_from_rest_once() {
            let sim = Simulator::bind(
                Protocol::Massive,
                "127.0.0.1:0",
                SimOptions { api_key: Some("k".into()), ..SimOptions::default() },
            )
            .await
            .unwrap();
            let app = AppState::new(config(&sim, "k"), None);
            let running = Running::start(&app).await;
            let addr = running.addr;
            eventually("ready", async || http_get(addr, "/readyz").await.0 == 200).await;

            let mut client = Client::connect(&format!("ws://{addr}/ws")).await.unwrap();
            assert!(client.subscribe(&["candles.MSFT.1m"]).await.unwrap().is_ok());
            let hub = app.hub.clone();
            eventually("300 bars in history", async || {
                hub.history("candles.MSFT.1m", 0, 1000).is_some_and(|p| p.messages.len() == 300)
            })
            .await;
            let page = hub.history("candles.MSFT.1m", 0, 1000).unwrap();
            let bars: Vec<ferrocast_feeds::market::Candle> =
                page.messages.iter().map(|(_, d)| serde_json::from_slice(d).unwrap()).collect();
            assert!(bars.windows(2).all(|w| w[1].start - w[0].start == 60_000));
            assert!(bars.iter().all(|b| b.src == "massive" && !b.forming));
            let stats = &app.candles.backfill;
            assert_eq!(stats.bars.load(std::sync::atomic::Ordering::Relaxed), 300);

            // A second subscriber after the first left: no second fetch.
            drop(client);
            let mut again = Client::connect(&format!("ws://{addr}/ws")).await.unwrap();
            assert!(again.subscribe(&["candles.MSFT.1m"]).await.unwrap().is_ok());
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(sim.state().counter("rest_aggs"), 1);
            assert_eq!(hub.history("candles.MSFT.1m", 0, 1000).unwrap().messages.len(), 300);
            let _ = running.stop().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn feeds_serve_clients_end_to_end() {
            let sim = Simulator::bind(
                Protocol::Massive,
                "127.0.0.1:0",
                SimOptions {
                    api_key: Some("k".into()),
                    rate: 100.0,
                    minute_bar_every: Duration::from_millis(200),
                    ..SimOptions::default()
                },
            )
            .await
            .unwrap();
            let app = AppState::new(config(&sim, "k"), None);
            let running = Running::start(&app).await;
            let addr = running.addr;
            eventually("ready", async || http_get(addr, "/readyz").await.0 == 200).await;

            let mut client = Client::connect(&format!("ws://{addr}/ws")).await.unwrap();
            let ack = client.subscribe(&["ticks.AAPL", "candles.AAPL.1m"]).await.unwrap();
            assert!(ack.is_ok(), "{ack:?}");
            let state = sim.state().clone();
            eventually("T.AAPL and AM.AAPL upstream", async || {
                state.subscriptions().into_iter().collect::<Vec<_>>() == ["AM.AAPL", "T.AAPL"]
            })
            .await;
            // Trades arrive normalised; every candle is Massive's, none built by the server
            // (its builder would emit forming bars with src "server" from these trades).
            let (mut trades, mut candles) = (0, 0);
            while trades < 5 || candles < 2 {
                let m = tokio::time::timeout(Duration::from_secs(5), client.next_message())
                    .await
                    .expect("data within 5 s")
                    .unwrap();
                let data = m.data_value();
                assert_eq!(data["src"], "massive", "{} {data}", m.channel);
                if m.channel == "ticks.AAPL" {
                    trades += 1;
                } else {
                    assert_eq!(m.channel, "candles.AAPL.1m");
                    assert_eq!(data["forming"], false);
                    candles += 1;
                }
            }

            // Options quotes: a limit of one contract; the second is refused upstream-side.
            let ack = client.subscribe(&["quotes.O:SPY241220P00720000"]).await.unwrap();
            assert!(ack.is_ok(), "{ack:?}");
            let ack = client.subscribe(&["quotes.O:TSLA230616C00150000"]).await.unwrap();
            let err = ack.error("quotes.O:TSLA230616C00150000").expect("refused");
            assert_eq!(err.code, "upstream_rejected");
            assert!(err.message.contains("limit"), "{}", err.message);

            // Leaving: unsubscribed upstream after the linger.
            client.unsubscribe(&["ticks.AAPL", "candles.AAPL.1m"]).await.unwrap();
            eventually("AAPL unsubscribed upstream", async || {
                !state.subscriptions().iter().any(|s| s.ends_with(".AAPL"))
            })
            .await;

            let (_, feeds) = http_get(addr, "/api/feeds").await;
            assert!(
                feeds.contains(r#""name":"options""#) && feeds.contains(r#""state":"live""#),
                "{feeds}"
            );
            let (_, metrics) = http_get(addr, "/metrics").await;
            for family in [
                r#"ferrocast_feed_state{feed="stocks",kind="massive",state="live"} 1"#,
                r#"ferrocast_feed_reconnects_total{feed="stocks"} 0"#,
                r#"ferrocast_feed_subscribe_refused_total{feed="options"} 1"#,
                r#"ferrocast_feed_latency_seconds_count{feed="stocks"}"#,
                r#"ferrocast_feed_messages_in_total{feed="stocks"}"#,
                r#"ferrocast_feed_parse_errors_total{feed="stocks"} 0"#,
            ] {
                assert!(metrics.contains(family), "metrics lack {family}");
            }
            running.stop().await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_rejected_key_makes_the_server_unready_with_the_reason() {
            let sim = Simulator::bind(
                Protocol::Massive,
                "127.0.0.1:0",
                SimOptions { api_key: Some("right".into()), ..SimOptions::default() },
            )
            .await
            .unwrap();
            let app = AppState::new(config(&sim, "wrong"), None);
            let running = Running::start(&app).await;
            let addr = running.addr;
            eventually("stocks failed", async || {
                http_get(addr, "/readyz").await.1.contains("is failed")
            })
            .await;
            let (status, body) = http_get(addr, "/readyz").await;
            assert_eq!(status, 503);
            assert!(body.contains("stocks") && body.contains("auth_failed"), "{body}");
            running.stop().await.unwrap();
        }
    }
}

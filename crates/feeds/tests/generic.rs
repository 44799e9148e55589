//! The generic JSON WebSocket connector, configured by the shipped examples
//! (`deploy/examples/binance.toml`, `coinbase.toml`), against the Binance combined-streams
//! and Coinbase Exchange simulators: envelopes, batching under a request-rate limit, server
//! pings, heartbeats, demand-driven subscribe/unsubscribe and read timeouts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Harness, SECS, fast, wait_for};
use ferrocast_feeds::config::FeedConfig;
use ferrocast_feeds::feed::{Feed, FeedStats, LinkState};
use ferrocast_feeds::generic::{GenericConfig, GenericFeed};
use ferrocast_feeds::simulate::{Protocol, SimOptions, Simulator};

/// The single `[[feeds]]` table of a shipped example config.
fn example_feed(file: &str) -> FeedConfig {
    #[derive(serde::Deserialize)]
    struct File {
        feeds: Vec<FeedConfig>,
    }
    let path = format!("{}/../../deploy/examples/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut parsed: File = toml::from_str(&text).unwrap();
    assert_eq!(parsed.feeds.len(), 1);
    let feed = parsed.feeds.remove(0);
    assert_eq!(feed.validate(), Vec::<(String, String)>::new(), "{file}");
    feed
}

fn start(cfg: FeedConfig) -> (Harness, Arc<GenericFeed>) {
    assert_eq!(cfg.validate(), Vec::<(String, String)>::new());
    let (h, ctx) = Harness::new(&cfg.name, "generic");
    let feed = GenericFeed::new(GenericConfig::from_feed(&cfg, &[]).unwrap(), ctx);
    tokio::spawn(feed.clone().run(h.shutdown()));
    (h, feed)
}

#[tokio::test]
async fn binance_combined_streams() {
    let sim = Simulator::bind(
        Protocol::Binance,
        "127.0.0.1:0",
        SimOptions {
            rate: 200.0,
            ping_interval: Duration::from_millis(100),
            pong_timeout: Duration::from_millis(400),
            ..SimOptions::default()
        },
    )
    .await
    .unwrap();
    let mut cfg = fast(example_feed("binance.toml"));
    cfg.url = format!("ws://{}/stream", sim.addr());
    let (h, feed) = start(cfg);
    h.wait_state(LinkState::Live, SECS(5)).await;
    let state = sim.state().clone();
    // `always = ["BTCUSDT"]`: both topics, in one request.
    wait_for("always symbol subscribed", SECS(5), || {
        state.subscriptions().into_iter().collect::<Vec<_>>()
            == ["btcusdt@bookTicker", "btcusdt@trade"]
    })
    .await;

    h.watch(&*feed, "ticks.ETHUSDT", true);
    h.watch(&*feed, "quotes.ETHUSDT", true);
    wait_for("ETHUSDT topics", SECS(5), || state.subscriptions().contains("ethusdt@trade")).await;
    let capture = h.capture.clone();
    wait_for("ETHUSDT trades and quotes", SECS(5), || {
        !capture.on("ticks.ETHUSDT").is_empty() && !capture.on("quotes.ETHUSDT").is_empty()
    })
    .await;
    let trade = &h.capture.on("ticks.ETHUSDT")[0];
    assert_eq!((trade["sym"].as_str(), trade["src"].as_str()), (Some("ETHUSDT"), Some("binance")));
    assert!(trade["price"].as_f64().unwrap() > 0.0 && trade["id"].is_string(), "{trade}");
    let quote = &h.capture.on("quotes.ETHUSDT")[0];
    assert!(quote["ask"].as_f64().unwrap() > quote["bid"].as_f64().unwrap(), "{quote}");
    // Acks of SUBSCRIBE are ignored, not errors.
    assert!(FeedStats::get(&h.stats.ignored) >= 2);
    assert_eq!(FeedStats::get(&h.stats.parse_errors), 0);

    // Symbols outside `symbols` are not this feed's.
    assert!(!feed.claims(&ferrocast_feeds::feed::MarketChannel::parse("ticks.AAPL").unwrap()));

    // Thirty symbols at once stay under Binance's 5 requests per second (batched), and the
    // server's 100 ms pings are answered (no pong timeout).
    for i in 0..30 {
        h.watch(&*feed, &format!("ticks.C{i}USDT"), true);
    }
    wait_for("thirty more symbols", SECS(5), || state.subscriptions().len() == 64).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sim.state().counter("rate_limited"), 0);
    assert_eq!(sim.state().counter("pong_timeouts"), 0);
    assert_eq!(FeedStats::get(&h.stats.connects), 1);

    // The last client of ETHUSDT leaves: both its topics are unsubscribed after the linger.
    h.watch(&*feed, "ticks.ETHUSDT", false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sim.state().subscriptions().contains("ethusdt@trade"), "quotes.ETHUSDT still watched");
    h.watch(&*feed, "quotes.ETHUSDT", false);
    wait_for("ETHUSDT unsubscribed", SECS(5), || !state.subscriptions().contains("ethusdt@trade"))
        .await;
    assert!(sim.state().subscriptions().contains("btcusdt@trade"), "always stays");
    h.stop();
}

#[tokio::test]
async fn coinbase_ticker_with_heartbeats() {
    let sim = Simulator::bind(
        Protocol::Coinbase,
        "127.0.0.1:0",
        SimOptions { rate: 100.0, ..SimOptions::default() },
    )
    .await
    .unwrap();
    let mut cfg = fast(example_feed("coinbase.toml"));
    cfg.url = format!("ws://{}/", sim.addr());
    // Heartbeats arrive every second: a 1.5 s read timeout with no WebSocket pings proves
    // they keep the connection alive on their own.
    cfg.ping_interval_ms = 0;
    cfg.read_timeout_ms = 1_500;
    let (h, feed) = start(cfg);
    h.wait_state(LinkState::Live, SECS(5)).await;
    let state = sim.state().clone();
    wait_for("BTC-USD ticker and heartbeat", SECS(5), || {
        state.subscriptions().into_iter().collect::<Vec<_>>()
            == ["heartbeat:BTC-USD", "ticker:BTC-USD"]
    })
    .await;
    h.watch(&*feed, "ticks.ETH-USD", true);
    wait_for("ETH-USD", SECS(5), || state.subscriptions().contains("ticker:ETH-USD")).await;
    let capture = h.capture.clone();
    wait_for("ETH-USD trades and quotes", SECS(5), || {
        !capture.on("ticks.ETH-USD").is_empty() && !capture.on("quotes.ETH-USD").is_empty()
    })
    .await;
    let trade = &h.capture.on("ticks.ETH-USD")[0];
    assert_eq!(trade["src"], "coinbase");
    // RFC 3339 `time` became epoch ms close to now.
    let age = ferrocast_feeds::feed::now_ms() - trade["ts"].as_i64().unwrap();
    assert!((0..5_000).contains(&age), "{trade}");

    // Quiet symbol-wise, but heartbeats keep it alive past several read timeouts.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert!(FeedStats::get(&h.stats.ignored) >= 3, "heartbeats seen and ignored");
    assert_eq!(FeedStats::get(&h.stats.connects), 1, "{:?}", h.stats.disconnects());

    // A stalled upstream stops the heartbeats: the read timeout replaces the connection and
    // the new one gets every subscription back.
    sim.state().stall(true);
    let stats = h.stats.clone();
    wait_for("read timeout", SECS(5), || stats.disconnects().get("read_timeout") == Some(&1)).await;
    wait_for("resubscribed", SECS(5), || {
        state.connections().iter().any(|c| c.id > 1 && c.subscriptions.contains("ticker:ETH-USD"))
    })
    .await;
    sim.state().stall(false);

    h.watch(&*feed, "ticks.ETH-USD", false);
    wait_for("ETH-USD unsubscribed", SECS(5), || {
        !state.connections().iter().any(|c| c.id > 1 && c.subscriptions.contains("ticker:ETH-USD"))
    })
    .await;
    h.stop();
}

#[tokio::test]
async fn auth_template_and_failure_matcher() {
    // The Massive simulator doubles as an upstream with message auth: the generic connector
    // sends the key, waits for auth_success, and treats auth_failed as final.
    let sim = Simulator::bind(
        Protocol::Massive,
        "127.0.0.1:0",
        SimOptions { api_key: Some("good".into()), ..SimOptions::default() },
    )
    .await
    .unwrap();
    let text = format!(
        r#"
        name = "poly"
        kind = "generic"
        url = "ws://{}/stocks"
        api_key = "bad"
        auth = '{{"action":"auth","params":"{{api_key}}"}}'
        auth_ok = {{ "/status" = "auth_success" }}
        auth_failed = {{ "/status" = "auth_failed" }}
        subscribe = '{{"action":"subscribe","params":"T.{{sym}}"}}'
        ignore = [{{ "/ev" = "status" }}]
        [[routes]]
        match = {{ "/ev" = "T" }}
        channel = "ticks.{{/sym}}"
        schema = "trade"
        fields = {{ price = "/p", size = "/s", ts = "/t" }}
        "#,
        sim.addr()
    );
    let bad: FeedConfig = fast(toml::from_str(&text).unwrap());
    let (h, _feed) = start(bad.clone());
    let reason = h.wait_state(LinkState::Failed, SECS(5)).await.unwrap();
    assert!(reason.contains("refused the credentials"), "{reason}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sim.state().counter("auth_failed"), 1);
    h.stop();

    let good = FeedConfig { api_key: "good".into(), ..bad };
    let (h, feed) = start(good);
    h.wait_state(LinkState::Live, SECS(5)).await;
    h.watch(&*feed, "ticks.AAPL", true);
    let capture = h.capture.clone();
    wait_for("trades", SECS(5), || !capture.on("ticks.AAPL").is_empty()).await;
    assert_eq!(sim.state().subscriptions().into_iter().collect::<Vec<_>>(), ["T.AAPL"]);
    h.stop();
}

#[test]
fn generic_validation_names_the_key() {
    let cfg = FeedConfig {
        name: "x".into(),
        kind: "generic".into(),
        url: "wss://example.invalid/ws".into(),
        subscribe: r#"{"params":{topics},"id":{idd}}"#.into(),
        routes: vec![ferrocast_feeds::config::RouteConfig {
            channel: "ticks.{/s}".into(),
            schema: "trade".into(),
            ..Default::default()
        }],
        events: vec!["T".into()],
        ..FeedConfig::default()
    };
    let problems = cfg.validate();
    let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.contains(&"events"), "{problems:?}");
    assert!(keys.contains(&"subscribe"), "{problems:?}");
    assert!(keys.contains(&"routes[0].fields.price"), "{problems:?}");
}

/// A Coinbase upstream that keeps sending heartbeats but no tickers: heartbeats keep the
/// read timeout quiet, yet with symbols subscribed the feed turns `stale`, reconnects, and
/// is `live` again once tickers flow.
#[tokio::test]
async fn a_silent_upstream_with_heartbeats_turns_the_feed_stale() {
    let sim = Simulator::bind(
        Protocol::Coinbase,
        "127.0.0.1:0",
        SimOptions { rate: 100.0, silent: true, ..SimOptions::default() },
    )
    .await
    .unwrap();
    let mut cfg = fast(example_feed("coinbase.toml"));
    cfg.url = format!("ws://{}/", sim.addr());
    cfg.stale_after_ms = 500;
    let (h, _feed) = start(cfg);
    // The example keeps BTC-USD subscribed (`always`), so staleness applies at once.
    let reason = h.wait_state(LinkState::Stale, SECS(5)).await.unwrap_or_default();
    assert!(
        reason.contains("no market data for 500 ms") || reason.contains("after going stale"),
        "{reason}"
    );
    let stats = h.stats.clone();
    wait_for("stale counted", SECS(5), || stats.disconnects().contains_key("stale")).await;
    let state = sim.state().clone();
    wait_for("a reconnect", SECS(5), || state.counter("connections") >= 2).await;
    assert!(!h.stats.disconnects().contains_key("read_timeout"), "heartbeats kept it alive");
    sim.state().set_silent(false);
    h.wait_state(LinkState::Live, SECS(5)).await;
    h.stop();
}

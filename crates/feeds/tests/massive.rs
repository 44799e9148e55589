//! The Massive connector against the Massive protocol simulator, over real sockets:
//! authentication, demand-driven subscriptions seen from the simulator's side, batched and
//! malformed frames, stalls, restarts, evictions, disconnect statuses and the options
//! quote limit.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Harness, SECS, fast, wait_for};
use ferrocast_feeds::config::FeedConfig;
use ferrocast_feeds::feed::{Feed, FeedStats, LinkState};
use ferrocast_feeds::market::Interval;
use ferrocast_feeds::massive::{MassiveConfig, MassiveFeed};
use ferrocast_feeds::simulate::{Eviction, Protocol, SimOptions, Simulator};
use futures_util::{SinkExt, StreamExt};

const KEY: &str = "test-key";

async fn simulator(opts: SimOptions) -> Simulator {
    Simulator::bind(
        Protocol::Massive,
        "127.0.0.1:0",
        SimOptions { api_key: Some(KEY.into()), ..opts },
    )
    .await
    .unwrap()
}

fn feed_config(sim: &Simulator, cluster: &str, events: &[&str]) -> FeedConfig {
    fast(FeedConfig {
        name: cluster.into(),
        kind: "massive".into(),
        url: format!("ws://{}/{cluster}", sim.addr()),
        api_key: KEY.into(),
        events: events.iter().map(|e| e.to_string()).collect(),
        ..FeedConfig::default()
    })
}

fn start(cfg: FeedConfig) -> (Harness, Arc<MassiveFeed>) {
    assert_eq!(cfg.validate(), Vec::<(String, String)>::new());
    let (h, ctx) = Harness::new(&cfg.name, "massive");
    let feed = MassiveFeed::new(MassiveConfig::from_feed(&cfg, &[]), ctx);
    tokio::spawn(feed.clone().run(h.shutdown()));
    (h, feed)
}

#[tokio::test]
async fn demand_drives_upstream_subscriptions() {
    let sim = simulator(SimOptions { rate: 200.0, ..SimOptions::default() }).await;
    let (h, feed) = start(feed_config(&sim, "stocks", &["T", "Q"]));
    h.wait_state(LinkState::Live, SECS(5)).await;
    assert!(sim.state().subscriptions().is_empty(), "nothing subscribed without demand");

    h.watch(&*feed, "ticks.AAPL", true);
    h.watch(&*feed, "quotes.AAPL", true);
    h.watch(&*feed, "ticks.MSFT", true);
    let state = sim.state().clone();
    wait_for("T.AAPL, Q.AAPL, T.MSFT upstream", SECS(5), || {
        state.subscriptions().into_iter().collect::<Vec<_>>() == ["Q.AAPL", "T.AAPL", "T.MSFT"]
    })
    .await;
    let capture = h.capture.clone();
    wait_for("trades and quotes of AAPL", SECS(5), || {
        !capture.on("ticks.AAPL").is_empty() && !capture.on("quotes.AAPL").is_empty()
    })
    .await;
    // Only what was asked for arrives, normalised.
    for channel in h.capture.channels() {
        assert!(
            ["ticks.AAPL", "quotes.AAPL", "ticks.MSFT"].contains(&channel.as_str()),
            "{channel}"
        );
    }
    let trade = &h.capture.on("ticks.AAPL")[0];
    assert_eq!(trade["src"], "massive");
    assert_eq!(trade["sym"], "AAPL");
    let quote = &h.capture.on("quotes.AAPL")[0];
    assert_eq!(quote["bid_size"].as_f64().unwrap() % 100.0, 0.0, "round lots × 100: {quote}");
    assert!(FeedStats::get(&h.stats.messages_in) > 0);
    let (_, count, _) = h.stats.latency.snapshot();
    assert!(count > 0, "latency recorded");

    // The last client leaves: unsubscribed upstream after the linger, not before.
    h.watch(&*feed, "ticks.MSFT", false);
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(sim.state().subscriptions().contains("T.MSFT"), "still lingering");
    wait_for("T.MSFT unsubscribed", SECS(3), || !state.subscriptions().contains("T.MSFT")).await;
    assert!(sim.state().subscriptions().contains("T.AAPL"));

    // A quick resubscribe within the linger keeps the upstream subscription.
    h.watch(&*feed, "ticks.AAPL", false);
    h.watch(&*feed, "ticks.AAPL", true);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(sim.state().subscriptions().contains("T.AAPL"));
    assert_eq!(FeedStats::get(&h.stats.connects), 1);
    h.stop();
}

#[tokio::test]
async fn channels_map_to_events_and_upstream_bars_take_precedence() {
    let sim = simulator(SimOptions {
        rate: 100.0,
        minute_bar_every: Duration::from_millis(300),
        ..SimOptions::default()
    })
    .await;
    let (h, feed) = start(feed_config(&sim, "stocks", &["T", "Q", "A", "AM"]));
    h.wait_state(LinkState::Live, SECS(5)).await;
    for c in ["candles.TSLA.1s", "candles.TSLA.1m", "ticks.TSLA", "quotes.TSLA"] {
        h.watch(&*feed, c, true);
    }
    let state = sim.state().clone();
    wait_for("A, AM, T, Q for TSLA", SECS(5), || state.subscriptions().len() == 4).await;
    assert!(
        h.bars.covers("TSLA", Interval::OneSecond) && h.bars.covers("TSLA", Interval::OneMinute)
    );
    let capture = h.capture.clone();
    wait_for("bars of both intervals", SECS(5), || {
        !capture.on("candles.TSLA.1s").is_empty() && !capture.on("candles.TSLA.1m").is_empty()
    })
    .await;
    let bar = &h.capture.on("candles.TSLA.1m")[0];
    assert_eq!((bar["src"].as_str(), bar["forming"].as_bool()), (Some("massive"), Some(false)));
    assert_eq!(bar["interval"], "1m");
    assert_eq!(bar["end"].as_i64().unwrap() - bar["start"].as_i64().unwrap(), 60_000);
    // Retained: closed bars are history.
    assert!(
        h.capture.0.lock().iter().all(|(_, _, k)| *k == ferrocast_feeds::PublishKind::Retained)
    );

    // Without A/AM configured, a candle channel asks for trades (the server builds bars).
    let sim2 = simulator(SimOptions::default()).await;
    let (h2, feed2) = start(feed_config(&sim2, "stocks", &["T"]));
    h2.wait_state(LinkState::Live, SECS(5)).await;
    h2.watch(&*feed2, "candles.NVDA.1m", true);
    let state2 = sim2.state().clone();
    wait_for("T.NVDA for a candle channel", SECS(5), || state2.subscriptions().contains("T.NVDA"))
        .await;
    assert!(!h2.bars.covers("NVDA", Interval::OneMinute));

    // Unsubscribing the bars gives them back to the server's builder.
    for c in ["candles.TSLA.1s", "candles.TSLA.1m"] {
        h.watch(&*feed, c, false);
    }
    let bars = h.bars.clone();
    wait_for("bars unmarked", SECS(3), || !bars.covers("TSLA", Interval::OneMinute)).await;
    h.stop();
    h2.stop();
}

#[tokio::test]
async fn auth_failure_is_final_and_does_not_storm() {
    let sim = simulator(SimOptions::default()).await;
    let mut cfg = feed_config(&sim, "stocks", &["T"]);
    cfg.api_key = "wrong-key".into();
    let (h, _feed) = start(cfg);
    let reason = h.wait_state(LinkState::Failed, SECS(5)).await.unwrap();
    assert!(reason.contains("auth_failed") && reason.contains("API key"), "{reason}");
    // With a 50 ms backoff a retry loop would make dozens of attempts by now.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(sim.state().counter("auth_failed"), 1);
    assert_eq!(sim.state().counter("connections"), 1);
    assert_eq!(FeedStats::get(&h.stats.connects), 1);
    assert_eq!(h.state().0, LinkState::Failed);
    h.stop();
}

#[tokio::test]
async fn a_missing_key_variable_fails_with_its_name() {
    let sim = simulator(SimOptions::default()).await;
    let mut cfg = feed_config(&sim, "stocks", &["T"]);
    cfg.api_key = String::new();
    cfg.api_key_env = "FERROCAST_TEST_SURELY_UNSET_KEY".into();
    let (h, _feed) = start(cfg);
    let reason = h.wait_state(LinkState::Failed, SECS(5)).await.unwrap();
    assert!(reason.contains("FERROCAST_TEST_SURELY_UNSET_KEY"), "{reason}");
    assert_eq!(sim.state().counter("connections"), 0);
    h.stop();
}

#[tokio::test]
async fn a_restarted_upstream_gets_every_subscription_back() {
    let sim = simulator(SimOptions { rate: 100.0, ..SimOptions::default() }).await;
    let addr = sim.addr();
    let (h, feed) = start(feed_config(&sim, "stocks", &["T", "Q"]));
    h.wait_state(LinkState::Live, SECS(5)).await;
    h.watch(&*feed, "ticks.AAPL", true);
    h.watch(&*feed, "quotes.SPY", true);
    let capture = h.capture.clone();
    wait_for("data", SECS(5), || capture.len() > 5).await;

    // The upstream dies (every socket gone at once) and comes back on the same port.
    sim.shutdown();
    drop(sim);
    h.wait_state(LinkState::BackingOff, SECS(5)).await;
    let sim = Simulator::bind(
        Protocol::Massive,
        &addr.to_string(),
        SimOptions { api_key: Some(KEY.into()), rate: 100.0, ..SimOptions::default() },
    )
    .await
    .unwrap();
    let state = sim.state().clone();
    wait_for("resubscribed after restart", SECS(10), || {
        state.subscriptions().into_iter().collect::<Vec<_>>() == ["Q.SPY", "T.AAPL"]
    })
    .await;
    h.capture.clear();
    wait_for("data again", SECS(5), || !capture.on("ticks.AAPL").is_empty()).await;
    assert!(FeedStats::get(&h.stats.reconnects) >= 1);
    assert_eq!(h.state().0, LinkState::Live);
    h.stop();
}

#[tokio::test]
async fn a_stalled_upstream_is_detected_by_the_read_timeout() {
    let sim = simulator(SimOptions { rate: 50.0, ..SimOptions::default() }).await;
    let (h, feed) = start(feed_config(&sim, "stocks", &["T"]));
    h.wait_state(LinkState::Live, SECS(5)).await;
    h.watch(&*feed, "ticks.AAPL", true);
    let capture = h.capture.clone();
    wait_for("data", SECS(5), || capture.len() > 3).await;

    // The upstream stops sending and reading (no pongs) without closing the socket.
    sim.state().stall(true);
    let stats = h.stats.clone();
    wait_for("read timeout", SECS(5), || stats.disconnects().get("read_timeout") == Some(&1)).await;
    let state = sim.state().clone();
    wait_for("a fresh connection subscribed", SECS(5), || {
        state.connections().iter().any(|c| c.id > 1 && c.subscriptions.contains("T.AAPL"))
    })
    .await;
    h.capture.clear();
    wait_for("data again", SECS(5), || capture.len() > 3).await;
    sim.state().stall(false);
    h.stop();
}

#[tokio::test]
async fn malformed_frames_are_counted_and_batches_survive() {
    let sim =
        simulator(SimOptions { rate: 400.0, malformed_every: 1, ..SimOptions::default() }).await;
    let (h, feed) = start(feed_config(&sim, "stocks", &["T", "Q"]));
    h.wait_state(LinkState::Live, SECS(5)).await;
    h.watch(&*feed, "ticks.AAPL", true);
    h.watch(&*feed, "quotes.AAPL", true);
    let stats = h.stats.clone();
    let capture = h.capture.clone();
    // Every frame is broken one way or another: not JSON, one bad element, one unknown
    // event. The good events around the bad ones still get through.
    wait_for("errors counted and data published", SECS(5), || {
        FeedStats::get(&stats.parse_errors) >= 4
            && FeedStats::get(&stats.unknown_events) >= 2
            && capture.len() >= 10
    })
    .await;
    assert_eq!(FeedStats::get(&h.stats.connects), 1, "malformed data is no reason to reconnect");
    assert_eq!(h.state().0, LinkState::Live);
    h.stop();
}

#[tokio::test]
async fn disconnect_statuses_are_counted_and_followed_by_a_reconnect() {
    let sim = simulator(SimOptions::default()).await;
    let (h, feed) = start(feed_config(&sim, "stocks", &["T"]));
    h.wait_state(LinkState::Live, SECS(5)).await;
    h.watch(&*feed, "ticks.AAPL", true);
    let state = sim.state().clone();
    wait_for("subscribed", SECS(5), || state.subscriptions().contains("T.AAPL")).await;
    for (i, status) in ["slow_consumer", "force_disconnect"].into_iter().enumerate() {
        sim.state().disconnect_all(status);
        let stats = h.stats.clone();
        wait_for(status, SECS(5), || stats.disconnects().get(status) == Some(&1)).await;
        wait_for("resubscribed", SECS(5), || {
            state
                .connections()
                .iter()
                .any(|c| c.id as usize > i + 1 && c.subscriptions.contains("T.AAPL"))
        })
        .await;
    }
    h.stop();
}

/// A second client authenticating with the same key, as another gateway would.
async fn intruder(sim: &Simulator) -> impl Sized {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/stocks", sim.addr())).await.unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text(format!(
        r#"{{"action":"auth","params":"{KEY}"}}"#
    )))
    .await
    .unwrap();
    // Read `connected` and `auth_success`.
    for _ in 0..2 {
        ws.next().await;
    }
    ws
}

#[tokio::test]
async fn max_connections_waits_long_in_both_eviction_modes() {
    for eviction in [Eviction::Old, Eviction::New] {
        let sim = simulator(SimOptions { eviction, ..SimOptions::default() }).await;
        let mut cfg = feed_config(&sim, "stocks", &["T"]);
        cfg.max_connections_backoff_ms = 5_000;
        let _other = if eviction == Eviction::New { Some(intruder(&sim).await) } else { None };
        let (h, _feed) = start(cfg);
        if eviction == Eviction::Old {
            h.wait_state(LinkState::Live, SECS(5)).await;
            let _other = intruder(&sim).await;
            let reason = h.wait_state(LinkState::BackingOff, SECS(5)).await.unwrap();
            assert!(reason.contains("max_connections"), "{reason}");
        } else {
            let reason = h.wait_state(LinkState::BackingOff, SECS(5)).await.unwrap();
            assert!(reason.contains("max_connections"), "{reason}");
        }
        assert_eq!(h.stats.disconnects().get("max_connections"), Some(&1), "{eviction:?}");
        // No reconnect within the long wait (the normal backoff would be 50-200 ms).
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(FeedStats::get(&h.stats.connects), 1, "{eviction:?}");
        h.stop();
    }
}

#[tokio::test]
async fn options_quote_limit_refuses_the_contract_beyond_it() {
    let sim = simulator(SimOptions::default()).await;
    let mut cfg = feed_config(&sim, "options", &["T", "Q"]);
    cfg.quote_limit = Some(2);
    cfg.linger_ms = 60_000;
    let (h, feed) = start(cfg);
    h.wait_state(LinkState::Live, SECS(5)).await;
    let (a, b, c) = (
        "quotes.O:SPY241220P00720000",
        "quotes.O:TSLA230616C00150000",
        "quotes.O:AAPL250117C00200000",
    );
    for ch in [a, b] {
        assert_eq!(feed.admit(ch), Ok(()));
        h.watch(&*feed, ch, true);
    }
    // Trades are not limited; a channel already carried is admitted again.
    assert_eq!(feed.admit("ticks.O:AAPL250117C00200000"), Ok(()));
    assert_eq!(feed.admit(a), Ok(()));
    let err = feed.admit(c).unwrap_err();
    assert!(err.contains("2 symbols") && err.contains("1,000"), "{err}");
    assert_eq!(FeedStats::get(&h.stats.subscribe_refused), 1);

    // Once a contract is left (lingering), the newcomer takes its slot at once.
    h.watch(&*feed, a, false);
    assert_eq!(feed.admit(c), Ok(()));
    h.watch(&*feed, c, true);
    let state = sim.state().clone();
    wait_for("Q.O:SPY dropped, Q.O:AAPL added upstream", SECS(5), || {
        let subs = state.subscriptions();
        subs.contains("Q.O:AAPL250117C00200000")
            && subs.contains("Q.O:TSLA230616C00150000")
            && !subs.contains("Q.O:SPY241220P00720000")
    })
    .await;
    h.stop();
}

#[tokio::test]
async fn option_and_wildcard_rules_of_the_simulator() {
    // The simulator refuses Q.* on options, like Massive; the connector's validation refuses
    // it before that.
    let sim = simulator(SimOptions::default()).await;
    let mut cfg = feed_config(&sim, "options", &["Q"]);
    cfg.always = vec!["*".into()];
    let problems = cfg.validate();
    assert!(problems.iter().any(|(k, r)| k == "always" && r.contains("wildcard")), "{problems:?}");

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/options", sim.addr())).await.unwrap();
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text(format!(r#"{{"action":"auth","params":"{KEY}"}}"#))).await.unwrap();
    ws.send(Message::text(r#"{"action":"subscribe","params":"Q.*, T.*"}"#)).await.unwrap();
    let mut texts = Vec::new();
    while texts.len() < 4 {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            texts.push(t.to_string());
        }
    }
    assert!(texts[2].contains("\"error\"") && texts[2].contains("wildcard"), "{texts:?}");
    assert!(texts[3].contains("subscribed to: T.*"), "{texts:?}");
}

/// An upstream that authenticates and answers pings but sends no data: with a symbol
/// subscribed, the feed turns `stale` after `stale_after_ms`, reconnects, stays `stale` while
/// the new connection is silent too, and is `live` again once data flows.
#[tokio::test]
async fn a_silent_upstream_turns_the_feed_stale_until_data_flows() {
    let sim = simulator(SimOptions { rate: 50.0, silent: true, ..SimOptions::default() }).await;
    let cfg = FeedConfig { stale_after_ms: 400, ..feed_config(&sim, "stocks", &["T"]) };
    let (h, feed) = start(cfg);
    h.wait_state(LinkState::Live, SECS(5)).await;
    // Nothing subscribed: silence is normal, the feed stays live.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(h.state().0, LinkState::Live);
    assert_eq!(sim.state().counter("connections"), 1);

    h.watch(&*feed, "ticks.AAPL", true);
    let reason = h.wait_state(LinkState::Stale, SECS(5)).await.unwrap_or_default();
    // The first reason, or the one after an already-made (still silent) reconnect.
    assert!(
        reason.contains("no market data for 400 ms") || reason.contains("after going stale"),
        "{reason}"
    );
    // It reconnects by itself, and the new (still silent) connection keeps it stale.
    let state = sim.state().clone();
    wait_for("a reconnect", SECS(5), || state.counter("connections") >= 2).await;
    let stats = h.stats.clone();
    wait_for("stale counted", SECS(5), || stats.disconnects().contains_key("stale")).await;
    wait_for("the new connection subscribed", SECS(5), || {
        state.connections().iter().any(|c| c.id > 1 && c.subscriptions.contains("T.AAPL"))
    })
    .await;
    // Never live again while the upstream stays silent.
    assert_ne!(h.state().0, LinkState::Live, "{:?}", h.state());

    sim.state().set_silent(false);
    h.wait_state(LinkState::Live, SECS(5)).await;
    let capture = h.capture.clone();
    wait_for("data", SECS(5), || !capture.on("ticks.AAPL").is_empty()).await;
    h.stop();
}

#[tokio::test]
async fn stale_after_zero_never_goes_stale() {
    let sim = simulator(SimOptions { silent: true, ..SimOptions::default() }).await;
    let cfg = FeedConfig { stale_after_ms: 0, ..feed_config(&sim, "stocks", &["T"]) };
    let (h, feed) = start(cfg);
    h.wait_state(LinkState::Live, SECS(5)).await;
    h.watch(&*feed, "ticks.AAPL", true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.state().0, LinkState::Live);
    assert_eq!(sim.state().counter("connections"), 1);
    h.stop();
}

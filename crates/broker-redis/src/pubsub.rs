//! The node's pub/sub side: one Redis subscription per channel that has local subscribers,
//! delivery of what arrives into the hub (in order, gaps filled from history, duplicates
//! dropped), resubscription after a reconnect, and periodic position checks. The same
//! connection carries the pattern subscriptions of a node following the taps, the demand
//! announcements a watcher listens to, and cluster-wide surveys.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use ferrocast_hub::{BrokerError, Delivery};
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use crate::keys::{self, Carried, parse_carried, topic_prefix};
use crate::{Inner, demand, survey};

/// Position checks sent to Redis at once.
const POSITION_CHECKS_IN_FLIGHT: usize = 64;
/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the pub/sub task is asked to do.
pub enum Command {
    /// Subscribe to a channel's topic; answered once Redis confirmed it.
    Subscribe(String, oneshot::Sender<Result<(), BrokerError>>),
    /// Unsubscribe, if the channel still has no local subscriber.
    Unsubscribe(String),
    /// Start or stop receiving every retained message of the tapped namespaces.
    FollowTaps(bool),
    /// Start receiving demand announcements.
    WatchDemand,
}

/// Makes sure this node receives `channel`'s live messages: returns once Redis has
/// confirmed the subscription, so anything published afterwards will arrive.
pub(crate) async fn ensure_subscribed(inner: &Inner, channel: &str) -> Result<(), BrokerError> {
    if inner.subscribed.lock().contains(channel) {
        return Ok(());
    }
    let (tx, rx) = oneshot::channel();
    inner
        .pubsub_tx
        .send(Command::Subscribe(channel.to_owned(), tx))
        .map_err(|_| BrokerError::Unavailable("the broker stopped".into()))?;
    rx.await.map_err(|_| BrokerError::Unavailable("the broker stopped".into()))?
}

/// Runs the pub/sub connection for the life of the process, reconnecting with jittered
/// backoff.
pub(crate) async fn run(inner: Arc<Inner>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let prefix = topic_prefix(&inner.opts.prefix);
    let demand_topic = keys::demand_topic(&inner.opts.prefix);
    let question_topic = survey::question_topic(&inner.opts.prefix);
    let answer_topic = survey::answer_topic(&inner.opts.prefix, &inner.node_id);
    let timeout = inner.opts.timeout;
    let mut backoff = Duration::from_millis(100);
    let mut connected_before = false;
    loop {
        let connected = match inner.conn.server().await {
            Ok(server) => tokio::time::timeout(timeout, server.get_async_pubsub()).await.ok(),
            Err(_) => None,
        };
        let Some(Ok(pubsub)) = connected else {
            if !pause(&inner, &mut commands, &mut backoff).await {
                return;
            }
            continue;
        };
        let (mut sink, mut stream) = pubsub.split();
        let channels: Vec<String> = inner.subscribed.lock().iter().cloned().collect();
        let mut topics: Vec<String> = channels.iter().map(|c| format!("{prefix}{c}")).collect();
        topics.extend([question_topic.clone(), answer_topic.clone()]);
        if inner.demand_watched.load(Relaxed) {
            topics.push(demand_topic.clone());
        }
        let patterns = tap_patterns(&inner);
        let resubscribed = async {
            sink.subscribe(&topics).await?;
            if inner.taps_followed.load(Relaxed) && !patterns.is_empty() {
                sink.psubscribe(&patterns).await?;
            }
            Ok::<(), redis::RedisError>(())
        };
        if !matches!(tokio::time::timeout(timeout, resubscribed).await, Ok(Ok(()))) {
            inner.metrics.error("connection");
            continue;
        }
        inner.health.pubsub(true);
        let connected_at = std::time::Instant::now();
        if connected_before {
            inner.metrics.pubsub_reconnects.fetch_add(1, Relaxed);
            tracing::info!(channels = channels.len(), "Redis pub/sub reconnected; catching up");
            // What was published while the connection was down is in history.
            let catch_up = inner.clone();
            tokio::spawn(async move {
                for channel in channels {
                    let _ = catch_up.catch_up(&channel, None).await;
                }
            });
        }
        connected_before = true;
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => {
                        let name = message.get_channel_name();
                        if message.from_pattern() {
                            if let Some(channel) = name.strip_prefix(&prefix) {
                                tapped(&inner, channel, message.get_payload_bytes());
                            }
                        } else if name == demand_topic {
                            inner.demand_announced.notify_one();
                        } else if name == question_topic {
                            survey::answer(&inner, message.get_payload_bytes());
                        } else if name == answer_topic {
                            survey::answered(&inner, message.get_payload_bytes());
                        } else if let Some(channel) = name.strip_prefix(&prefix) {
                            let channel = channel.to_owned();
                            carried(&inner, &channel, message.get_payload_bytes()).await;
                        }
                    }
                    None => break,
                },
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Subscribe(channel, reply)) => {
                        if inner.subscribed.lock().contains(&channel) {
                            let _ = reply.send(Ok(()));
                            continue;
                        }
                        let topic = format!("{prefix}{channel}");
                        match tokio::time::timeout(timeout, sink.subscribe(&topic)).await {
                            Ok(Ok(())) => {
                                inner.subscribed.lock().insert(channel.clone());
                                inner.metrics.subscribed_channels.fetch_add(1, Relaxed);
                                let _ = reply.send(Ok(()));
                                let announcer = inner.clone();
                                tokio::spawn(async move {
                                    demand::announce(&announcer, &channel).await;
                                });
                            }
                            _ => {
                                let _ = reply.send(Err(BrokerError::Unavailable(
                                    "Redis did not confirm the pub/sub subscription".into(),
                                )));
                                break;
                            }
                        }
                    }
                    Some(Command::Unsubscribe(channel)) => {
                        if inner.hub.subscriber_count(&channel) == 0
                            && inner.subscribed.lock().contains(&channel)
                        {
                            unsubscribed(&inner, &channel);
                            let topic = format!("{prefix}{channel}");
                            if !matches!(
                                tokio::time::timeout(timeout, sink.unsubscribe(&topic)).await,
                                Ok(Ok(()))
                            ) {
                                break;
                            }
                        }
                    }
                    Some(Command::FollowTaps(on)) => {
                        let patterns = tap_patterns(&inner);
                        let changed = async {
                            if patterns.is_empty() {
                                Ok(())
                            } else if on {
                                sink.psubscribe(&patterns).await
                            } else {
                                sink.punsubscribe(&patterns).await
                            }
                        };
                        if !matches!(tokio::time::timeout(timeout, changed).await, Ok(Ok(()))) {
                            break;
                        }
                    }
                    Some(Command::WatchDemand) => {
                        let subscribed = sink.subscribe(&demand_topic);
                        if !matches!(tokio::time::timeout(timeout, subscribed).await, Ok(Ok(()))) {
                            break;
                        }
                    }
                },
            }
        }
        tracing::warn!("Redis pub/sub connection lost; reconnecting");
        if connected_at.elapsed() > MAX_BACKOFF {
            // It served a while: the first retry comes at once.
            backoff = Duration::from_millis(100);
            inner.health.pubsub(false);
            inner.metrics.error("connection");
        } else if !pause(&inner, &mut commands, &mut backoff).await {
            return;
        }
    }
}

/// Waits a jittered, growing pause before the next connection attempt, meanwhile failing
/// subscribes at once rather than making them wait. `false` when the broker is gone.
async fn pause(
    inner: &Inner,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    backoff: &mut Duration,
) -> bool {
    inner.health.pubsub(false);
    inner.metrics.error("connection");
    let wait = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    let sleep = tokio::time::sleep(wait);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            command = commands.recv() => match command {
                None => return false,
                Some(Command::Subscribe(_, reply)) => {
                    let _ = reply.send(Err(BrokerError::Unavailable(
                        "Redis pub/sub is unreachable; retry shortly".into(),
                    )));
                }
                Some(Command::Unsubscribe(channel)) => {
                    if inner.hub.subscriber_count(&channel) == 0 {
                        unsubscribed(inner, &channel);
                    }
                }
                // Applied from the flags at the next connection.
                Some(Command::FollowTaps(_) | Command::WatchDemand) => {}
            },
        }
    }
}

fn unsubscribed(inner: &Inner, channel: &str) {
    if inner.subscribed.lock().remove(channel) {
        inner.metrics.subscribed_channels.fetch_sub(1, Relaxed);
    }
}

/// The pattern subscriptions that bring every message of the tapped namespaces.
fn tap_patterns(inner: &Inner) -> Vec<String> {
    let prefix = topic_prefix(&inner.opts.prefix);
    inner.hub.tap_namespaces().iter().map(|ns| format!("{prefix}{ns}.*")).collect()
}

/// Hands a retained message of a tapped namespace, from any node, to the hub's taps.
fn tapped(inner: &Inner, channel: &str, payload: &[u8]) {
    if let Some(m) = parse_carried(payload)
        && m.retained
        && inner.taps_followed.load(Relaxed)
    {
        inner.hub.run_taps(channel, m.data);
    }
}

/// Delivers one message from a topic: in order, after filling any gap from history.
async fn carried(inner: &Inner, channel: &str, payload: &[u8]) {
    let Some(m) = parse_carried(payload) else {
        inner.metrics.error("protocol");
        tracing::warn!(channel, "unreadable message on the channel's Redis topic; dropped");
        return;
    };
    if !m.retained {
        let _ = inner.hub.deliver_ephemeral(channel, m.data);
        return;
    }
    match inner.hub.deliver(channel, m.epoch, m.offset, m.data, false) {
        Ok(Delivery::Gap { .. }) => fill(inner, channel, &m).await,
        Ok(Delivery::Diverged) => diverged(inner, channel, m.epoch).await,
        _ => {}
    }
}

/// A message arrived after a gap (or in another epoch): the node catches up from history,
/// which delivers the missing ones in order, then delivers the message unless that did.
async fn fill(inner: &Inner, channel: &str, m: &Carried<'_>) {
    let mut epoch = m.epoch.to_owned();
    // Whatever came before this message and is missing is lost; what came after it is not.
    match inner.catch_up(channel, Some(m.offset - 1)).await {
        Ok((_, replaced)) => {
            // A message published just before another node fenced the channel carries the
            // epoch the fence replaced; it belongs to the new one.
            if replaced == m.epoch
                && let Some(now) = inner.hub.position(channel)
            {
                epoch = now.epoch.to_string();
            }
        }
        Err(e) => tracing::warn!(channel, "cannot fill a gap from Redis history: {e}"),
    }
    match inner.hub.deliver(channel, &epoch, m.offset, m.data, false) {
        Ok(Delivery::Gap { top }) => {
            inner.metrics.gaps_unfilled.fetch_add(1, Relaxed);
            tracing::warn!(
                channel,
                from = top + 1,
                to = m.offset - 1,
                "messages missing from Redis history (trimmed or expired)"
            );
            let _ = inner.hub.deliver(channel, &epoch, m.offset, m.data, true);
        }
        Ok(Delivery::Diverged) => diverged(inner, channel, &epoch).await,
        _ => {}
    }
}

/// A message took an offset this node delivered with other data: Redis lost writes.
async fn diverged(inner: &Inner, channel: &str, epoch: &str) {
    let delivered = inner.hub.position(channel).map_or(0, |p| p.top);
    if let Err(e) = inner.fence(channel, epoch, delivered).await {
        tracing::warn!(channel, "cannot move the channel to a new epoch: {e}");
    }
}

/// Every `broker.position_check_ms`: subscribes channels that have local subscribers but
/// no Redis subscription (a subscribe that raced an unsubscribe), unsubscribes the reverse,
/// and compares each channel's position with Redis.
///
/// A channel behind Redis is not caught up at once: its messages may be on their way (a busy
/// node's pub/sub lags). Only messages that have not arrived by the next check, a whole
/// period later, count as lost (a lost last message, a silent pub/sub connection): they are
/// delivered from history. Another epoch, or Redis behind the node, is handled at once.
pub(crate) async fn check_positions(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.opts.position_check);
    tick.tick().await;
    // Redis's position of each channel at the previous check.
    let mut seen: HashMap<String, (String, u64)> = HashMap::new();
    loop {
        tick.tick().await;
        let demanded: HashSet<String> = inner.hub.demanded_channels().into_iter().collect();
        let subscribed: HashSet<String> = inner.subscribed.lock().clone();
        for channel in subscribed.difference(&demanded) {
            let _ = inner.pubsub_tx.send(Command::Unsubscribe(channel.clone()));
        }
        seen.retain(|channel, _| demanded.contains(channel));
        // Many channels at once: each check is one small script on the multiplexed
        // connection, so a node with thousands of channels checks them in a few round trips.
        let checked = futures_util::stream::iter(demanded)
            .map(|channel| {
                let inner = &inner;
                let subscribed = &subscribed;
                let previous = seen.get(&channel).cloned();
                async move {
                    if !subscribed.contains(&channel)
                        && ensure_subscribed(inner, &channel).await.is_err()
                    {
                        return None;
                    }
                    match check(inner, &channel, previous).await {
                        Ok(now) => Some((channel, now)),
                        Err(e) => {
                            tracing::debug!(channel, "position check failed: {e}");
                            None
                        }
                    }
                }
            })
            .buffer_unordered(POSITION_CHECKS_IN_FLIGHT)
            .filter_map(|checked| async move { checked })
            .collect::<Vec<_>>()
            .await;
        seen.extend(checked);
    }
}

/// One channel's position check (see [`check_positions`]); returns Redis's position.
async fn check(
    inner: &Inner,
    channel: &str,
    previous: Option<(String, u64)>,
) -> Result<(String, u64), BrokerError> {
    let local = inner.hub.position(channel);
    let now = inner.read(channel, None, 0, 0, crate::Reader::Node).await?;
    inner.metrics.position_checks.fetch_add(1, Relaxed);
    let Some(local) = local else { return Ok((now.epoch, now.top)) };
    let lost_until = match previous {
        _ if *local.epoch != *now.epoch || local.top > now.top => Some(None),
        Some((epoch, top)) if epoch == now.epoch && local.top < top => Some(Some(top)),
        _ => None,
    };
    if let Some(lost_until) = lost_until {
        inner.catch_up(channel, lost_until).await?;
    }
    Ok((now.epoch, now.top))
}

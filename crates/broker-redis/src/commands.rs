//! The cluster-wide command path: one pub/sub topic, `{prefix}:commands`, that every node
//! subscribes to on a connection of its own, so the server API's "disconnect this user"
//! reaches the user's connections on every node. A command is an opaque JSON text for the
//! server; this module only carries it.
//!
//! Pub/sub delivers to whoever is subscribed when the command is published: a node that is
//! reconnecting at that moment misses it (the server API reports which nodes answered).
//! Its own connection keeps the topic apart from the per-channel subscriptions in
//! [`crate::pubsub`], which come and go with demand.

use std::sync::Arc;
use std::time::Duration;

use ferrocast_hub::{BrokerError, CommandHandler, Pending};
use futures_util::StreamExt;
use parking_lot::Mutex;

use crate::Inner;

/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The topic every node listens to.
pub fn topic(prefix: &str) -> String {
    format!("{prefix}:commands")
}

/// Where arriving commands go.
#[derive(Default)]
pub(crate) struct Commands {
    handler: Mutex<Option<CommandHandler>>,
}

impl Commands {
    pub(crate) fn set_handler(&self, handler: CommandHandler) {
        *self.handler.lock() = Some(handler);
    }

    fn deliver(&self, command: String) {
        let handler = self.handler.lock().clone();
        if let Some(handler) = handler {
            handler(command);
        }
    }
}

/// Publishes `command` on the topic.
pub(crate) fn send(inner: &Arc<Inner>, command: String) -> Pending<Result<(), BrokerError>> {
    let inner = inner.clone();
    Pending::Later(Box::pin(async move {
        let mut conn = inner.conn.get().await?;
        let cmd = redis::cmd("PUBLISH").arg(topic(&inner.opts.prefix)).arg(command).to_owned();
        match tokio::time::timeout(inner.opts.timeout, cmd.query_async::<i64>(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(inner.redis_error(e)),
            Err(_) => Err(inner.unavailable_timeout()),
        }
    }))
}

/// Listens to the topic for the life of the process, reconnecting with backoff.
pub(crate) async fn run(inner: Arc<Inner>) {
    let topic = topic(&inner.opts.prefix);
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = match inner.conn.server().await {
            Ok(server) => {
                tokio::time::timeout(inner.opts.timeout, server.get_async_pubsub()).await.ok()
            }
            Err(_) => None,
        };
        if let Some(Ok(mut pubsub)) = connected {
            let subscribed = tokio::time::timeout(inner.opts.timeout, pubsub.subscribe(&topic));
            if matches!(subscribed.await, Ok(Ok(()))) {
                backoff = Duration::from_millis(100);
                let mut stream = pubsub.on_message();
                while let Some(message) = stream.next().await {
                    if let Ok(text) = String::from_utf8(message.get_payload_bytes().to_vec()) {
                        inner.commands.deliver(text);
                    }
                }
                tracing::info!("Redis command subscription lost; reconnecting");
            }
        }
        inner.metrics.error("connection");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

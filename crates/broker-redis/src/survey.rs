//! Cluster-wide questions: a node asks every live node (itself included) about its local
//! state, or to act on it, and gathers the answers: `GET /api/channels` and `/api/stats` sum
//! what each node holds, the server API has each node act on a user's connections there.
//!
//! The question goes out on the `P:survey` topic as `<asker id> <request id> <question>`;
//! each node answers on the asker's `P:answer:<id>` topic with `<request id> <answer>`. Both
//! topics ride on the pub/sub connection every node keeps. The asker waits for as many
//! answers as nodes heard the question, at most `broker.timeout_ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ferrocast_hub::{BrokerError, SurveyHandler};
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;

use crate::{Inner, timeout_error};

/// The surveys this node is waiting on, and how it answers others'.
#[derive(Default)]
pub(crate) struct Surveys {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<Vec<u8>>>>,
    pub(crate) handler: RwLock<Option<SurveyHandler>>,
}

/// The topic survey questions are asked on.
pub(crate) fn question_topic(prefix: &str) -> String {
    format!("{prefix}:survey")
}

/// The topic node `id` receives answers on.
pub(crate) fn answer_topic(prefix: &str, id: &str) -> String {
    format!("{prefix}:answer:{id}")
}

/// Asks every live node `question`; returns the answers that came within the timeout.
pub(crate) async fn ask(inner: &Inner, question: &[u8]) -> Result<Vec<Vec<u8>>, BrokerError> {
    let id = inner.surveys.next.fetch_add(1, Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    inner.surveys.pending.lock().insert(id, tx);
    let asked = async {
        let mut message = format!("{} {id} ", inner.node_id).into_bytes();
        message.extend_from_slice(question);
        let mut conn = inner.conn.get().await?;
        let cmd =
            redis::cmd("PUBLISH").arg(question_topic(&inner.opts.prefix)).arg(message).to_owned();
        let heard = tokio::time::timeout(inner.opts.timeout, cmd.query_async::<usize>(&mut conn))
            .await
            .unwrap_or_else(|_| Err(timeout_error()))
            .map_err(|e| inner.redis_error(e))?;
        // PUBLISH counts the nodes that heard the question (one pub/sub connection each). A
        // Redis Cluster counts only the receiving node's: then the live nodes tell.
        let expected = match heard {
            0 => crate::live_nodes(inner).await?.len().max(1),
            n => n,
        };
        let mut answers = Vec::with_capacity(expected);
        let deadline = tokio::time::Instant::now() + inner.opts.timeout;
        while answers.len() < expected {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(answer)) => answers.push(answer),
                Ok(None) | Err(_) => break,
            }
        }
        Ok(answers)
    };
    let result = asked.await;
    inner.surveys.pending.lock().remove(&id);
    match result {
        Ok(answers) if answers.is_empty() => {
            Err(BrokerError::Unavailable("no node answered in time (broker.timeout_ms)".into()))
        }
        other => other,
    }
}

/// Answers a question another node (or this one) asked on the survey topic.
pub(crate) fn answer(inner: &Arc<Inner>, payload: &[u8]) {
    let mut parts = payload.splitn(3, |b| *b == b' ');
    let (Some(asker), Some(id), Some(question)) = (parts.next(), parts.next(), parts.next()) else {
        inner.metrics.error("protocol");
        return;
    };
    let Some(handler) = inner.surveys.handler.read().clone() else { return };
    let (Ok(asker), Ok(id)) = (std::str::from_utf8(asker), std::str::from_utf8(id)) else {
        inner.metrics.error("protocol");
        return;
    };
    let mut message = format!("{id} ").into_bytes();
    let topic = answer_topic(&inner.opts.prefix, asker);
    let (inner, question) = (inner.clone(), question.to_vec());
    // Off the pub/sub task: listing a node's channels takes a while when it holds many, and a
    // server API subscribe waits for Redis.
    tokio::spawn(async move {
        message.extend_from_slice(&handler(question).await);
        let Ok(mut conn) = inner.conn.get().await else { return };
        let cmd = redis::cmd("PUBLISH").arg(topic).arg(message).to_owned();
        let sent = tokio::time::timeout(inner.opts.timeout, cmd.query_async::<i64>(&mut conn));
        if !matches!(sent.await, Ok(Ok(_))) {
            inner.metrics.error("connection");
        }
    });
}

/// Hands an answer to the survey waiting for it.
pub(crate) fn answered(inner: &Inner, payload: &[u8]) {
    let mut parts = payload.splitn(2, |b| *b == b' ');
    let (Some(id), Some(answer)) = (parts.next(), parts.next()) else { return };
    let Some(id) = std::str::from_utf8(id).ok().and_then(|id| id.parse::<u64>().ok()) else {
        return;
    };
    if let Some(waiting) = inner.surveys.pending.lock().get(&id) {
        let _ = waiting.send(answer.to_vec());
    }
}

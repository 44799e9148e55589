//! The SSE buffering probe: open the event stream on a channel of the doctor's own, publish
//! messages a fixed interval apart, and compare when each was sent with when it arrived.
//! Events that arrive late and together are the signature of a buffering proxy.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::fixes;
use super::net::Connector;
use super::probes::NativeConn;
use super::report::Outcome;

/// Messages published per probe.
const COUNT: usize = 8;
/// Interval between publishes.
const SPACING: Duration = Duration::from_millis(250);
/// A message later than this is late.
const LATE: Duration = Duration::from_millis(1000);
/// Padding per message, so that a few messages fill a typical proxy buffer (4 to 8 KiB) and
/// a buffering proxy shows up as bursts rather than as silence.
const PAD: usize = 1000;
/// How long the response head is awaited before publishing starts anyway.
const HEAD_WAIT: Duration = Duration::from_millis(1500);
/// How long after the last publish the events may still arrive.
const SETTLE: Duration = Duration::from_secs(4);

/// How the probe publishes.
pub enum Publisher<'a> {
    /// Over the native WebSocket, on a namespace clients may publish to.
    Ws(&'a mut NativeConn),
    /// Over `POST /api/publish` (with the API key, if one was given).
    Http(Option<String>),
}

impl Publisher<'_> {
    async fn publish(
        &mut self,
        connector: &Connector,
        channel: &str,
        data: serde_json::Value,
    ) -> Result<(), String> {
        match self {
            Publisher::Ws(conn) => conn.publish(channel, data, connector.timeout).await,
            Publisher::Http(key) => {
                let headers: Vec<(&str, String)> =
                    key.iter().map(|k| ("authorization", format!("Bearer {k}"))).collect();
                let reply = connector
                    .post_json("/api/publish", &json!({"channel": channel, "data": data}), &headers)
                    .await
                    .map_err(|e| e.to_string())?;
                if reply.status.is_success() {
                    Ok(())
                } else {
                    Err(format!("POST /api/publish answered {}: {}", reply.status, reply.snippet()))
                }
            }
        }
    }
}

/// Runs the probe against `path` (usually `/sse`).
pub async fn check(
    connector: &Connector,
    path: &str,
    channel: &str,
    mut publisher: Publisher<'_>,
) -> Outcome {
    let url = format!("{path}?channels={channel}");
    let req = connector
        .request("GET", &url)
        .header("accept", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Full::new(Bytes::new()))
        .expect("valid request");

    // The stream is read on its own task, which timestamps every event carrying a sequence
    // number. A buffering proxy may hold back even the response head, so publishing does not
    // wait for it.
    let (head_tx, mut head_rx) = oneshot::channel::<Result<Head, String>>();
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let (first_tx, mut first_rx) = mpsc::unbounded_channel::<()>();
    let stream_connector = connector.clone();
    let reader = tokio::spawn(async move {
        let resp = match stream_connector.send(req).await {
            Ok(r) => r,
            Err(e) => {
                let _ = head_tx.send(Err(e.to_string()));
                return;
            }
        };
        let head = Head {
            status: resp.status(),
            content_type: header(&resp, "content-type"),
            encoding: header(&resp, "content-encoding"),
        };
        let streaming = head.status.is_success();
        let _ = head_tx.send(Ok(head));
        if !streaming {
            return;
        }
        let mut body = resp.into_body();
        let mut buf = String::new();
        let mut first = Some(first_tx);
        while let Some(Ok(frame)) = body.frame().await {
            let Some(data) = frame.data_ref() else { continue };
            if let Some(f) = first.take() {
                let _ = f.send(());
            }
            buf.push_str(&String::from_utf8_lossy(data));
            let now = Instant::now();
            // Events end with a blank line.
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                if let Some(seq) = sequence(&event) {
                    let _ = tx.send((seq, now));
                }
            }
        }
    });

    let mut head = match tokio::time::timeout(HEAD_WAIT, &mut head_rx).await {
        Ok(Ok(Ok(head))) => Some(head),
        Ok(Ok(Err(e))) => {
            return Outcome::fail(format!("GET {url} failed: {e}"))
                .cause("the event stream could not be opened through the path")
                .fixes(fixes::sse_buffering(path));
        }
        Ok(Err(_)) => {
            return Outcome::fail(format!("GET {url} ended without an answer"))
                .cause("the connection was closed before any answer: a proxy dropping the request")
                .fixes(fixes::sse_buffering(path));
        }
        Err(_) => None,
    };
    if let Some(h) = &head {
        if h.status == http::StatusCode::NOT_FOUND {
            reader.abort();
            return Outcome::skip(format!(
                "no event stream at {path} (404): see the fallback check"
            ));
        }
        if !h.status.is_success() || !h.content_type.starts_with("text/event-stream") {
            reader.abort();
            return Outcome::fail(format!(
                "GET {url} answered {} with Content-Type {:?}, not an event stream",
                h.status, h.content_type
            ))
            .cause("a proxy or the application answers this path with something else than Server-Sent Events")
            .fixes(fixes::sse_buffering(path));
        }
        // The first bytes (the welcome) say the subscription is registered.
        let _ = tokio::time::timeout(Duration::from_millis(500), first_rx.recv()).await;
    }

    let mut sent = Vec::with_capacity(COUNT);
    for seq in 0..COUNT {
        if seq > 0 {
            tokio::time::sleep(SPACING).await;
        }
        let data = json!({"doctor_seq": seq, "pad": "x".repeat(PAD)});
        if let Err(e) = publisher.publish(connector, channel, data).await {
            reader.abort();
            return Outcome::skip(format!("could not publish the test messages: {e}")).detail(
                "pass --api-key, or give --namespace a namespace with client_publish = true",
            );
        }
        sent.push(Instant::now());
    }
    let deadline = tokio::time::Instant::now() + SETTLE;
    if head.is_none() {
        head = tokio::time::timeout_at(deadline, head_rx)
            .await
            .ok()
            .and_then(|r| r.ok())
            .and_then(Result::ok);
    }
    let Some(head) = head else {
        reader.abort();
        return Outcome::fail(format!(
            "the event stream is held back: not even its response head arrived within {} s, while {COUNT} events were published",
            (HEAD_WAIT + SPACING * COUNT as u32 + SETTLE).as_secs()
        ))
        .cause("a proxy buffers the whole response, headers included (nginx does this with proxy_buffering on and HTTP/1.0 to the upstream, its defaults), and releases it only when its buffer fills")
        .fixes(fixes::sse_buffering(path));
    };
    let mut arrived: Vec<Option<Instant>> = vec![None; COUNT];
    while arrived.iter().any(Option::is_none) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((seq, at))) if seq < COUNT => arrived[seq] = arrived[seq].or(Some(at)),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    reader.abort();
    judge(path, &sent, &arrived, head.encoding.as_str())
}

/// The response head of the event stream.
struct Head {
    status: http::StatusCode,
    content_type: String,
    encoding: String,
}

fn header(resp: &http::Response<hyper::body::Incoming>, name: &str) -> String {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// The `doctor_seq` of an event, if it carries one.
fn sequence(event: &str) -> Option<usize> {
    let data: String = event
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n");
    let at = data.find("\"doctor_seq\":")? + "\"doctor_seq\":".len();
    let digits: String = data[at..]
        .chars()
        .skip_while(|c| c.is_whitespace())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Compares send and arrival times.
fn judge(path: &str, sent: &[Instant], arrived: &[Option<Instant>], encoding: &str) -> Outcome {
    let received: Vec<(usize, Instant)> =
        arrived.iter().enumerate().filter_map(|(i, a)| a.map(|a| (i, a))).collect();
    let lags: Vec<Duration> =
        received.iter().map(|(i, a)| a.saturating_duration_since(sent[*i])).collect();
    let max_lag = lags.iter().max().copied().unwrap_or_default();
    let mut sorted = lags.clone();
    sorted.sort();
    let median_lag = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    let sent_span = sent.last().zip(sent.first()).map(|(l, f)| *l - *f).unwrap_or_default();
    let arrival_span = match (received.first(), received.last()) {
        (Some((_, f)), Some((_, l))) => l.saturating_duration_since(*f),
        _ => Duration::ZERO,
    };
    // Distinct arrival moments (events read in the same chunk share one).
    let mut moments: Vec<Instant> = received.iter().map(|(_, a)| *a).collect();
    moments.dedup();
    let data = json!({
        "published": sent.len(),
        "received": received.len(),
        "spacing_ms": SPACING.as_millis() as u64,
        "median_lag_ms": median_lag.as_millis() as u64,
        "max_lag_ms": max_lag.as_millis() as u64,
        "arrival_moments": moments.len(),
        "arrival_span_ms": arrival_span.as_millis() as u64,
        "content_encoding": encoding,
    });
    let observed = format!(
        "{} of {} events published {} ms apart arrived; median lag {} ms, max {} ms, in {} read(s) over {} ms",
        received.len(),
        sent.len(),
        SPACING.as_millis(),
        median_lag.as_millis(),
        max_lag.as_millis(),
        moments.len(),
        arrival_span.as_millis()
    );
    let compressed = !encoding.is_empty() && encoding != "identity";
    let bursty = received.len() >= 2 && arrival_span < sent_span / 4;
    if received.is_empty() || max_lag > LATE || bursty || received.len() < sent.len() {
        let summary = if received.is_empty() {
            format!(
                "none of {} events arrived within 4 s of publishing: the stream is held back",
                sent.len()
            )
        } else {
            format!("events arrive in bursts: {observed}")
        };
        let cause = if compressed {
            format!(
                "the response is compressed ({encoding}) on the way: compression buffers the stream until a block fills"
            )
        } else if received.is_empty() {
            "a proxy buffers the response (nginx: proxy_buffering on, or an upstream X-Accel-Buffering header being ignored; a CDN or compression in front) and holds every event; or, behind a load balancer over several nodes that share no broker (the memory broker), the doctor's publishes reached another node than its stream".to_owned()
        } else {
            "a proxy buffers the response (nginx: proxy_buffering on, or an upstream X-Accel-Buffering header being ignored; a CDN or compression in front) and releases events when its buffer fills".to_owned()
        };
        return Outcome::fail(summary).cause(cause).fixes(fixes::sse_buffering(path)).data(data);
    }
    Outcome::pass(format!("events arrive as published: {observed}")).data(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sequence_numbers() {
        assert_eq!(sequence("id: 4\nevent: chat.x\ndata: {\"doctor_seq\":3}\n\n"), Some(3));
        assert_eq!(
            sequence("data: {\"channel\":\"c\",\"data\":{\"doctor_seq\": 12}}\n\n"),
            Some(12)
        );
        assert_eq!(sequence(": keepalive\n\n"), None);
    }

    #[test]
    fn spaced_arrivals_pass_and_bursts_fail() {
        let t0 = Instant::now();
        let sent: Vec<Instant> = (0..COUNT).map(|i| t0 + SPACING * i as u32).collect();
        let spaced: Vec<Option<Instant>> =
            sent.iter().map(|s| Some(*s + Duration::from_millis(3))).collect();
        assert_eq!(judge("/sse", &sent, &spaced, "").status, super::super::report::Status::Pass);
        let end = *sent.last().unwrap() + Duration::from_millis(1500);
        let burst: Vec<Option<Instant>> = sent.iter().map(|_| Some(end)).collect();
        let o = judge("/sse", &sent, &burst, "");
        assert_eq!(o.status, super::super::report::Status::Fail);
        assert!(o.summary.contains("bursts"), "{}", o.summary);
        let none = vec![None; COUNT];
        assert!(judge("/sse", &sent, &none, "gzip").cause.unwrap().contains("gzip"));
    }
}

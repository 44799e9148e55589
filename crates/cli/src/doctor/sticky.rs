//! The sticky-session probe: a Socket.IO long-polling session and an SSE stream live on the
//! node that opened them, so a load balancer in front of several nodes must send all of a
//! session's requests to that node. The probe opens sessions and sends each follow-up request
//! on a new TCP connection (as a browser's polls often are, and as a balancer sees them); a
//! node that does not hold the session answers Socket.IO's 400 `Session ID unknown` or
//! `/sse/control`'s 404 `unknown_session`. Cookies the front sets are sent back, as a browser
//! would, so cookie stickiness (AWS ALB, HAProxy, ingress-nginx) counts as sticky.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::net::{Connector, HttpReply, NetError};

/// Socket.IO sessions opened at once: a front that hashes something other than the client
/// (the sid, say) routes a session right by chance, one in N nodes; several sessions make
/// that chance small.
pub const SIO_SESSIONS: usize = 4;
/// Socket.IO `ping` events each session sends (each a POST, then a GET for its ack).
const SIO_PINGS: usize = 2;
/// SSE streams opened at once, and control requests sent for each.
pub const SSE_STREAMS: usize = 2;
const SSE_CONTROLS: usize = 4;
/// How long a poll may wait: one that reaches the session's node answers at once (an ack
/// is pending), one that reaches another node answers 400 at once.
const POLL_WAIT: Duration = Duration::from_secs(5);
/// How long the SSE stream's welcome event is awaited.
const WELCOME_WAIT: Duration = Duration::from_secs(5);

/// The cookies a front set, sent back on every later request of the same session.
#[derive(Debug, Default, Clone)]
pub struct Cookies(Vec<(String, String)>);

impl Cookies {
    /// Takes in the `Set-Cookie` headers of an answer (name and value; attributes ignored).
    pub fn absorb(&mut self, headers: &HeaderMap) {
        for value in headers.get_all(http::header::SET_COOKIE) {
            let Ok(text) = value.to_str() else { continue };
            let pair = text.split(';').next().unwrap_or_default();
            let Some((name, value)) = pair.split_once('=') else { continue };
            let (name, value) = (name.trim().to_owned(), value.trim().to_owned());
            if name.is_empty() {
                continue;
            }
            self.0.retain(|(n, _)| *n != name);
            self.0.push((name, value));
        }
    }

    /// The `Cookie` header for the next request, if any cookie was set.
    fn headers(&self) -> Vec<(&'static str, String)> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let line = self.0.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join("; ");
        vec![("cookie", line)]
    }

    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// What the follow-up requests of one session met.
#[derive(Debug, Default, Clone)]
pub struct SessionRun {
    /// Follow-up requests sent (the handshake or stream not counted).
    pub requests: usize,
    /// Of those, answered by a node that did not know the session.
    pub unknown: usize,
    /// Other failures: an unexpected status, a connection error.
    pub errors: Vec<String>,
    pub cookies: Vec<String>,
}

impl SessionRun {
    fn answer(
        &mut self,
        result: Result<HttpReply, NetError>,
        what: &str,
        unknown: fn(&HttpReply) -> bool,
    ) -> bool {
        self.requests += 1;
        match result {
            Ok(reply) if reply.status.is_success() => true,
            Ok(reply) if unknown(&reply) => {
                self.unknown += 1;
                false
            }
            Ok(reply) => {
                self.errors.push(format!("{what} answered {}: {}", reply.status, reply.snippet()));
                false
            }
            Err(e) => {
                self.errors.push(format!("{what}: {e}"));
                false
            }
        }
    }
}

/// Whether an Engine.IO answer is the "unknown session" error (code 1; socketioxide sends
/// it as a string, the reference server as a number).
pub fn is_sid_unknown(reply: &HttpReply) -> bool {
    reply.status == http::StatusCode::BAD_REQUEST
        && reply.json().is_some_and(|b| {
            b["message"] == "Session ID unknown" || b["code"] == 1 || b["code"] == "1"
        })
}

/// Whether a `/sse/control` answer says no stream with that session is open here.
fn is_sse_unknown(reply: &HttpReply) -> bool {
    reply.status == http::StatusCode::NOT_FOUND
        && reply.json().is_some_and(|b| b["code"] == "unknown_session")
}

/// The outcome of opening a session: its run, or why no session could be opened.
pub type Opened = Result<SessionRun, String>;

/// One Socket.IO polling session at `sio` (the path without its trailing slash): the
/// handshake, the namespace connect and its answer, `ping` events and their acks, the close.
/// A GET is only sent after a POST that reached the session's node, so an ack is waiting and
/// the poll is answered at once.
pub async fn socketio_session(connector: &Connector, sio: &str) -> Opened {
    let mut cookies = Cookies::default();
    let base = format!("{sio}/?EIO=4&transport=polling");
    let handshake = connector.get(&base, &[]).await.map_err(|e| format!("handshake: {e}"))?;
    cookies.absorb(&handshake.headers);
    let sid = handshake
        .text()
        .strip_prefix('0')
        .and_then(|open| serde_json::from_str::<Value>(open).ok())
        .and_then(|open| open["sid"].as_str().map(str::to_owned))
        .ok_or_else(|| {
            format!("the handshake answered {}: {}", handshake.status, handshake.snippet())
        })?;
    let url = format!("{base}&sid={sid}");
    let mut run = SessionRun::default();
    let mut packets: Vec<String> = vec!["40".into()];
    packets.extend((1..=SIO_PINGS).map(|n| format!("42{n}[\"ping\",\"doctor-sticky-{n}\"]")));
    for packet in &packets {
        let posted = connector.post_text(&url, packet, &cookies.headers()).await;
        if let Ok(reply) = &posted {
            cookies.absorb(&reply.headers);
        }
        if !run.answer(posted, &format!("POST {packet}"), is_sid_unknown) {
            continue;
        }
        match tokio::time::timeout(POLL_WAIT, connector.get(&url, &cookies.headers())).await {
            Ok(polled) => {
                if let Ok(reply) = &polled {
                    cookies.absorb(&reply.headers);
                }
                run.answer(polled, "GET (poll)", is_sid_unknown);
            }
            // Held open: a node that knows the session (another would have answered 400).
            Err(_) => run.requests += 1,
        }
    }
    // Close the session (Engine.IO close packet) so it does not wait for its ping timeout.
    let closed = connector.post_text(&url, "1", &cookies.headers()).await;
    run.answer(closed, "POST 1 (close)", is_sid_unknown);
    run.cookies = cookies.names();
    Ok(run)
}

/// One SSE stream on `channel`, held open while `/sse/control` pings it.
pub async fn sse_session(connector: &Connector, channel: &str) -> Opened {
    let mut cookies = Cookies::default();
    let req = connector
        .request("GET", &format!("/sse?channels={channel}"))
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let resp = connector.send(req).await.map_err(|e| format!("GET /sse: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET /sse answered {}", resp.status()));
    }
    cookies.absorb(resp.headers());
    let mut body = resp.into_body();
    let read_welcome = async {
        let mut buf = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Some(data) = frame.data_ref() else { continue };
            buf.push_str(&String::from_utf8_lossy(data));
            for line in buf.lines() {
                let Some(event) = line.strip_prefix("data:") else { continue };
                let Ok(v) = serde_json::from_str::<Value>(event.trim()) else { continue };
                if v["type"] == "welcome" {
                    return Some((v["session"].clone(), v["token"].clone()));
                }
            }
        }
        None
    };
    let (session, token) = match tokio::time::timeout(WELCOME_WAIT, read_welcome).await {
        Ok(Some(pair)) => pair,
        Ok(None) => return Err("the event stream ended before its welcome".into()),
        Err(_) => return Err("no welcome on the event stream in time (a buffering proxy?)".into()),
    };
    let mut run = SessionRun::default();
    for id in 1..=SSE_CONTROLS {
        let request = json!({"session": session, "token": token, "op": "ping", "id": id});
        let reply = connector.post_json("/sse/control", &request, &cookies.headers()).await;
        if let Ok(r) = &reply {
            cookies.absorb(&r.headers);
        }
        run.answer(reply, "POST /sse/control", is_sse_unknown);
    }
    drop(body);
    run.cookies = cookies.names();
    Ok(run)
}

/// What a group of sessions (of one kind) showed, summed.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub opened: usize,
    pub broken: usize,
    pub requests: usize,
    pub unknown: usize,
    pub errors: Vec<String>,
    pub not_opened: Vec<String>,
    pub cookies: Vec<String>,
}

impl Tally {
    pub fn of(runs: &[Opened]) -> Tally {
        let mut t = Tally::default();
        for run in runs {
            match run {
                Ok(r) => {
                    t.opened += 1;
                    t.requests += r.requests;
                    t.unknown += r.unknown;
                    if r.unknown > 0 {
                        t.broken += 1;
                    }
                    t.errors.extend(r.errors.iter().cloned());
                    for c in &r.cookies {
                        if !t.cookies.contains(c) {
                            t.cookies.push(c.clone());
                        }
                    }
                }
                Err(e) => t.not_opened.push(e.clone()),
            }
        }
        t
    }

    pub fn data(&self) -> Value {
        json!({
            "sessions": self.opened,
            "broken_sessions": self.broken,
            "requests": self.requests,
            "unknown": self.unknown,
            "errors": self.errors,
            "not_opened": self.not_opened,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_keep_the_last_value_of_each_name() {
        let mut headers = HeaderMap::new();
        headers.append(http::header::SET_COOKIE, "AWSALB=abc; Path=/; Expires=x".parse().unwrap());
        headers.append(http::header::SET_COOKIE, "SERVERID=n2".parse().unwrap());
        let mut jar = Cookies::default();
        jar.absorb(&headers);
        let mut again = HeaderMap::new();
        again.append(http::header::SET_COOKIE, "AWSALB=def; HttpOnly".parse().unwrap());
        jar.absorb(&again);
        assert_eq!(jar.headers(), vec![("cookie", "SERVERID=n2; AWSALB=def".to_owned())]);
        assert_eq!(jar.names(), ["SERVERID", "AWSALB"]);
        assert!(Cookies::default().headers().is_empty());
    }

    fn reply(status: u16, body: &str) -> HttpReply {
        HttpReply {
            status: http::StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn unknown_session_answers() {
        assert!(is_sid_unknown(&reply(400, r#"{"code":"1","message":"Session ID unknown"}"#)));
        assert!(is_sid_unknown(&reply(400, r#"{"code":1,"message":"Session ID unknown"}"#)));
        assert!(!is_sid_unknown(&reply(
            400,
            r#"{"code":5,"message":"Unsupported protocol version"}"#
        )));
        assert!(!is_sid_unknown(&reply(502, "<html>nginx</html>")));
        assert!(is_sse_unknown(&reply(404, r#"{"type":"error","code":"unknown_session"}"#)));
        assert!(!is_sse_unknown(&reply(404, "not found")));
    }

    #[test]
    fn tally_counts_broken_sessions() {
        let ok = SessionRun { requests: 6, ..Default::default() };
        let bad =
            SessionRun { requests: 6, unknown: 3, cookies: vec!["c".into()], ..Default::default() };
        let t = Tally::of(&[Ok(ok), Ok(bad), Err("refused".into())]);
        assert_eq!((t.opened, t.broken, t.requests, t.unknown), (2, 1, 12, 3));
        assert_eq!(t.not_opened, ["refused"]);
        assert_eq!(t.cookies, ["c"]);
    }
}

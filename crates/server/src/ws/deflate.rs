//! permessage-deflate (RFC 7692) for the native endpoint: the handshake's negotiation, the
//! compression of a message (once, for every subscriber) and the bounded decompression of a
//! client's message.
//!
//! The server always negotiates `server_no_context_takeover`: each message is compressed on
//! its own, with an empty LZ77 window, so its compressed bytes do not depend on what the
//! connection sent before and one compressed frame is shared by every subscriber (the hub
//! carries it next to the plain frame, see [`ferrocast_hub::SharedForms`]). Centrifugo and most
//! servers keep a compressor per connection and compress every message once per subscriber.
//!
//! It also always answers `client_no_context_takeover` (RFC 7692 7.1.1.2 lets a server ask
//! for it whether or not the client offered it), so a client's messages are decompressed one
//! by one with a per-thread inflater reset for each, and a connection keeps no 32 KiB window
//! of its own. A `client_max_window_bits` offer is accepted by leaving it out of the answer
//! (the client then uses a window of at most 2^15, which the inflater takes). An offer with
//! `server_max_window_bits` below 15 is declined: the shared compressed frames use a 2^15
//! window; the next offer, if any, is considered, else the connection goes uncompressed.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use axum::http::{HeaderMap, HeaderValue, header};
use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's answer in `Sec-WebSocket-Extensions`.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The four bytes every sync-flushed message ends with, removed on the wire (RFC 7692 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Counters of the extension, for `/metrics`.
#[derive(Debug, Default)]
pub struct DeflateMetrics {
    /// Connections that negotiated the extension.
    pub connections: AtomicU64,
    /// Messages compressed (once each, however many subscribers get them).
    pub compressions: AtomicU64,
    /// Compressed messages written: `/ws` frames, and messages in gzip SSE streams.
    pub frames: AtomicU64,
    /// Payload bytes of those frames before compression.
    pub plain_bytes: AtomicU64,
    /// Payload bytes of those frames as sent.
    pub wire_bytes: AtomicU64,
}

/// Whether the request offers permessage-deflate in a form this server accepts.
pub fn negotiate(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(offer_acceptable)
}

/// The `Sec-WebSocket-Extensions` answer for a negotiated connection.
pub fn response_header() -> HeaderValue {
    HeaderValue::from_static(RESPONSE)
}

/// Whether one offer (`permessage-deflate; param; param=value`) can be accepted: known
/// parameters only, each at most once, with valid values.
fn offer_acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next().is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate")) {
        return false;
    }
    let mut seen: Vec<&str> = Vec::new();
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        if seen.iter().any(|s| s.eq_ignore_ascii_case(name)) {
            return false;
        }
        seen.push(name);
        let ok = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
            // Only the full window: the shared compressed frames are made with it.
            "server_max_window_bits" => value == Some("15"),
            // Without a value, a hint that the client supports the parameter.
            "client_max_window_bits" => {
                value.is_none_or(|v| v.parse::<u8>().is_ok_and(|b| (8..=15).contains(&b)))
            }
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

thread_local! {
    static COMPRESSOR: RefCell<Compress> =
        RefCell::new(Compress::new(Compression::default(), false));
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// The permessage-deflate payload of `frame`, compressed on its own (no context); empty when
/// compression would not make it smaller, so the frame goes plain.
pub fn compress(frame: &[u8], metrics: &DeflateMetrics) -> Bytes {
    metrics.compressions.fetch_add(1, Relaxed);
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        let mut out = Vec::with_capacity(frame.len() / 2 + 64);
        loop {
            let consumed = c.total_in() as usize;
            let status = c
                .compress_vec(&frame[consumed..], &mut out, FlushCompress::Sync)
                .expect("deflate with a valid state cannot fail");
            // Done once every byte went in and the flush fit in the room left.
            if c.total_in() as usize == frame.len() && out.len() < out.capacity() {
                debug_assert_eq!(status, Status::Ok);
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        debug_assert!(out.ends_with(&TAIL));
        out.truncate(out.len().saturating_sub(TAIL.len()));
        if out.len() >= frame.len() { Bytes::new() } else { Bytes::from(out) }
    })
}

/// Why a client's compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It decompresses to more than the limit.
    TooBig,
    /// It is not valid deflate data.
    Corrupt,
}

/// Decompresses a client's message (its frames' payloads joined) into at most `max` bytes.
pub fn inflate(compressed: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let mut out: Vec<u8> =
            Vec::with_capacity(compressed.len().saturating_mul(3).clamp(64, max + 1));
        for mut input in [compressed, &TAIL[..]] {
            loop {
                if out.len() == out.capacity() {
                    if out.len() > max {
                        return Err(InflateError::TooBig);
                    }
                    let room = out.capacity().max(64).min(max + 1 - out.len());
                    out.reserve_exact(room);
                }
                let before = d.total_in();
                let status = d
                    .decompress_vec(input, &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                input = &input[(d.total_in() - before) as usize..];
                if out.len() > max {
                    return Err(InflateError::TooBig);
                }
                match status {
                    // A final block (BFINAL) ends the data: what follows is ignored.
                    Status::StreamEnd => return Ok(out),
                    _ if input.is_empty() && out.len() < out.capacity() => break,
                    Status::BufError if out.len() < out.capacity() => {
                        return Err(InflateError::Corrupt);
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offers(v: &'static str) -> bool {
        let mut h = HeaderMap::new();
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_static(v));
        negotiate(&h)
    }

    #[test]
    fn negotiation_accepts_what_clients_offer() {
        assert!(offers("permessage-deflate"));
        // Browsers, Node ws and Python websockets.
        assert!(offers("permessage-deflate; client_max_window_bits"));
        assert!(offers(
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=10"
        ));
        assert!(offers(
            "permessage-deflate; client_no_context_takeover; server_max_window_bits=15"
        ));
        // A first offer that cannot be accepted, then one that can.
        assert!(offers(
            "permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits"
        ));
        assert!(!offers("permessage-deflate; server_max_window_bits=10"));
        assert!(!offers("permessage-deflate; client_max_window_bits=16"));
        assert!(!offers(
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
        ));
        assert!(!offers("permessage-deflate; server_no_context_takeover=1"));
        assert!(!offers("permessage-deflate; unknown_param"));
        assert!(!offers("x-webkit-deflate-frame"));
        assert!(!negotiate(&HeaderMap::new()));
    }

    #[test]
    fn compressed_messages_round_trip_one_by_one() {
        let metrics = DeflateMetrics::default();
        let doc = format!("{{\"type\":\"msg\",\"data\":\"{}\"}}", "abcdefgh".repeat(256));
        let z = compress(doc.as_bytes(), &metrics);
        assert!(!z.is_empty() && z.len() < doc.len() / 10, "{} bytes", z.len());
        assert!(!z.ends_with(&TAIL), "the sync flush's tail is not sent");
        // Independent of what was compressed before (no context takeover).
        let other = compress(b"{\"something\":\"else entirely, to fill the window\"}", &metrics);
        assert_eq!(compress(doc.as_bytes(), &metrics), z);
        assert_eq!(inflate(&z, 1 << 20).unwrap(), doc.as_bytes());
        assert!(other.is_empty() || inflate(&other, 1 << 20).is_ok());
        assert_eq!(metrics.compressions.load(Relaxed), 3);
        // Too short to gain anything: sent plain.
        assert!(compress(b"{}", &metrics).is_empty());
    }

    #[test]
    fn inflate_is_bounded_and_refuses_garbage() {
        let metrics = DeflateMetrics::default();
        let big = vec![b'a'; 100_000];
        let z = compress(&big, &metrics);
        assert!(z.len() < 1_000);
        assert_eq!(inflate(&z, 100_000).unwrap().len(), 100_000);
        assert_eq!(inflate(&z, 99_999), Err(InflateError::TooBig));
        assert_eq!(inflate(&[0xff, 0xff, 0xff, 0xff], 1000), Err(InflateError::Corrupt));
        // A message compressed with a final block (BFINAL) is accepted too.
        let mut c = Compress::new(Compression::default(), false);
        let mut fin = Vec::with_capacity(64);
        c.compress_vec(b"hello", &mut fin, FlushCompress::Finish).unwrap();
        assert_eq!(inflate(&fin, 100).unwrap(), b"hello");
    }
}

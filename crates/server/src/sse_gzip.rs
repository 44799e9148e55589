//! `Content-Encoding: gzip` for event streams, sharing each compressed message with `/ws`.
//!
//! A gzip body is one deflate stream between a header and a trailer (CRC-32 and length of
//! the uncompressed bytes). A deflate stream may mix block kinds, and a permessage-deflate
//! payload (a message compressed on its own, sync-flushed) is a run of complete blocks once
//! its four tail bytes `00 00 ff ff` are put back. So an event stream is framed as: what is
//! particular to the stream (the `welcome`, acks, each event's `id:` cursor, `data: ` and the
//! blank line, heartbeats) in stored (uncompressed) blocks, and each large message of a
//! compressing namespace as the very bytes `/ws` sends compressed
//! ([`ferrocast_hub::SharedForms`]): one compression per message for every `/ws` and SSE
//! subscriber. Only the CRC is computed per stream. A stream the server ends gets the final
//! block and the trailer, so the client can check the whole body.

use bytes::{BufMut, BytesMut};
use flate2::Crc;

/// The gzip header: deflate, no name, no time, unknown OS.
const HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff];
/// The tail a sync flush ends with, removed from permessage-deflate payloads.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// An empty final block (fixed Huffman: BFINAL, BTYPE 01, end of block).
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];
/// The most bytes in one stored block.
const STORED_MAX: usize = 65_535;

/// Whether `Accept-Encoding` admits gzip (`gzip`, `x-gzip` or `*`, with a quality above 0).
pub fn accepts_gzip(accept_encoding: &str) -> bool {
    accept_encoding.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        let q = parts
            .find_map(|p| p.strip_prefix("q=").and_then(|q| q.trim().parse::<f32>().ok()))
            .unwrap_or(1.0);
        q > 0.0 && ["gzip", "x-gzip", "*"].iter().any(|c| coding.eq_ignore_ascii_case(c))
    })
}

/// One stream's gzip framing.
#[derive(Debug, Default)]
pub struct Gzip {
    crc: Crc,
    started: bool,
}

impl Gzip {
    fn start(&mut self, out: &mut BytesMut) {
        if !self.started {
            out.put_slice(&HEADER);
            self.started = true;
        }
    }

    /// Appends `text` uncompressed, in stored blocks.
    pub fn plain(&mut self, out: &mut BytesMut, text: &[u8]) {
        self.start(out);
        self.crc.update(text);
        for block in text.chunks(STORED_MAX) {
            let len = block.len() as u16;
            out.put_u8(0x00);
            out.put_u16_le(len);
            out.put_u16_le(!len);
            out.put_slice(block);
        }
    }

    /// Appends `text` as its permessage-deflate payload `compressed` (the message compressed
    /// on its own, without the sync flush's tail).
    pub fn compressed(&mut self, out: &mut BytesMut, text: &[u8], compressed: &[u8]) {
        self.start(out);
        self.crc.update(text);
        out.put_slice(compressed);
        out.put_slice(&SYNC_TAIL);
    }

    /// Ends the body: the final block and the trailer.
    pub fn finish(&mut self, out: &mut BytesMut) {
        self.start(out);
        out.put_slice(&FINAL_BLOCK);
        out.put_u32_le(self.crc.sum());
        out.put_u32_le(self.crc.amount());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::ws::deflate::{DeflateMetrics, compress};

    #[test]
    fn accept_encoding_forms() {
        assert!(accepts_gzip("gzip, deflate, br"));
        assert!(accepts_gzip("br;q=1.0, GZIP;q=0.5"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("deflate, br"));
        assert!(!accepts_gzip(""));
    }

    #[test]
    fn stored_and_shared_blocks_make_one_gzip_body() {
        let metrics = DeflateMetrics::default();
        let frame = format!("{{\"type\":\"msg\",\"data\":\"{}\"}}", "abc".repeat(400));
        let z = compress(frame.as_bytes(), &metrics);
        let mut g = Gzip::default();
        let mut out = BytesMut::new();
        let mut expected = Vec::new();
        for prefix in ["id: a=1\ndata: ", "data: "] {
            g.plain(&mut out, prefix.as_bytes());
            g.compressed(&mut out, frame.as_bytes(), &z);
            g.plain(&mut out, b"\n\n");
            expected.extend_from_slice(prefix.as_bytes());
            expected.extend_from_slice(frame.as_bytes());
            expected.extend_from_slice(b"\n\n");
        }
        assert!(out.len() * 5 < expected.len(), "{} of {}", out.len(), expected.len());
        let big = vec![b'x'; 70_000];
        g.plain(&mut out, &big);
        expected.extend_from_slice(&big);
        g.finish(&mut out);
        // flate2's reader checks the CRC and the length.
        let mut got = Vec::new();
        flate2::read::GzDecoder::new(&out[..]).read_to_end(&mut got).unwrap();
        assert_eq!(got, expected);
    }
}

//! RFC 6455 framing for the server side: decoding masked client frames, encoding headers.
//!
//! The decoder is a plain value fed with whatever bytes a read returned. A partial frame is a
//! normal condition: the remainder is kept until the next read, and nothing is buffered once
//! a frame completes, so an idle connection holds no buffer at all.
//!
//! Every rule of the RFC that a client can break is checked, and each failure names the close
//! code to send and a metric label. Text is validated as UTF-8 fragment by fragment, so a bad
//! byte sequence fails the connection when it arrives, not when the message ends. After a
//! refused frame the decoder skips the rest of that frame and goes on decoding, so the
//! connection can still recognise the client's close frame and end promptly.
//!
//! With permessage-deflate negotiated ([`Decoder::with_deflate`]), RSV1 on a message's first
//! frame marks it compressed: its fragments are joined, then decompressed within the message
//! limit (1009 beyond it, 1007 for data that is not deflate) and validated as UTF-8. RSV1
//! anywhere else, RSV2, RSV3, or RSV1 without the extension fail the connection with 1002.

use ferrocast_protocol::CloseCode;

use super::deflate::InflateError;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;
/// The first header byte's RSV1 bit: a compressed message (permessage-deflate).
pub const RSV1: u8 = 0x40;

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Ping(Vec<u8>),
    Pong,
    /// The client's close frame: its code, if it sent one (always a code valid on the wire).
    Close(Option<u16>),
}

/// Why the connection must be failed: the close code to send, the metric label and a reason
/// for the log and the close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: CloseCode,
    /// The `code` label of `ferrocast_frame_errors_total`.
    pub label: &'static str,
    pub reason: String,
    /// The refused frame was the client's close frame: the client is done, so nothing more
    /// is to be waited for.
    pub peer_closed: bool,
}

impl Violation {
    fn new(code: CloseCode, label: &'static str, reason: impl Into<String>) -> Self {
        Violation { code, label, reason: reason.into(), peer_closed: false }
    }

    fn protocol(reason: impl Into<String>) -> Self {
        Violation::new(CloseCode::ProtocolError, "protocol_error", reason)
    }

    fn in_close_frame(mut self) -> Self {
        self.peer_closed = true;
        self
    }
}

/// A refused frame, and how many bytes it spans (`None` when that is unknowable).
struct Refused {
    violation: Violation,
    frame_len: Option<u64>,
}

/// Whether a close code received from a client is one RFC 6455 allows on the wire (1005,
/// 1006 and 1015 are reserved for reporting, never sent; 1004 and 1016-2999 are unassigned
/// or reserved for the RFC and its extensions).
pub fn close_code_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A text message arriving in fragments, validated as it grows.
#[derive(Debug, Default)]
struct TextAssembly {
    text: String,
    /// The first bytes of a character split across fragments (at most 3).
    carry: Vec<u8>,
}

impl TextAssembly {
    fn len(&self) -> usize {
        self.text.len() + self.carry.len()
    }

    /// Appends a fragment; fails on the first byte sequence that cannot be UTF-8 however the
    /// message goes on. Each byte is scanned once (a split character's bytes at most twice).
    fn push(&mut self, mut bytes: &[u8]) -> Result<(), Violation> {
        if !self.carry.is_empty() {
            let have = self.carry.len();
            let take = bytes.len().min(4 - have);
            let mut joined = [0u8; 4];
            joined[..have].copy_from_slice(&self.carry);
            joined[have..have + take].copy_from_slice(&bytes[..take]);
            let done = match std::str::from_utf8(&joined[..have + take]) {
                Ok(s) => s.len(),
                Err(e) if e.valid_up_to() > 0 => e.valid_up_to(),
                Err(e) if e.error_len().is_some() => return Err(invalid_utf8()),
                // Still incomplete: the fragment was too short to finish the character.
                Err(_) => {
                    self.carry.extend_from_slice(&bytes[..take]);
                    return Ok(());
                }
            };
            let s = std::str::from_utf8(&joined[..done]).expect("checked prefix");
            self.text.push_str(s);
            self.carry.clear();
            bytes = &bytes[done - have..];
        }
        match std::str::from_utf8(bytes) {
            Ok(s) => self.text.push_str(s),
            Err(e) if e.error_len().is_some() => return Err(invalid_utf8()),
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                self.text.push_str(std::str::from_utf8(valid).expect("checked prefix"));
                self.carry.extend_from_slice(rest);
            }
        }
        Ok(())
    }

    /// The whole message, after its final fragment.
    fn finish(self) -> Result<String, Violation> {
        if self.carry.is_empty() { Ok(self.text) } else { Err(invalid_utf8()) }
    }
}

fn invalid_utf8() -> Violation {
    Violation::new(CloseCode::InvalidPayload, "invalid_utf8", CloseCode::InvalidPayload.reason())
}

/// A fragmented message being assembled.
#[derive(Debug)]
enum Assembly {
    Text(TextAssembly),
    /// A compressed message (RSV1 on its first frame): its compressed bytes, decompressed and
    /// validated once the last fragment arrives.
    Deflated(Vec<u8>),
}

impl Assembly {
    fn len(&self) -> usize {
        match self {
            Assembly::Text(t) => t.len(),
            Assembly::Deflated(z) => z.len(),
        }
    }
}

/// Incremental decoder of client frames.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
    /// Bytes of an incomplete frame carried over from the previous read.
    partial: Vec<u8>,
    /// A fragmented message being assembled.
    fragments: Option<Assembly>,
    /// Bytes still to arrive of a refused frame, skipped so decoding resumes after it.
    skip: u64,
    /// The stream can no longer be split into frames (a refused frame of unknowable length),
    /// or the client's close frame has arrived: everything from now on is ignored.
    done: bool,
}

impl Decoder {
    pub fn new(max_message: usize) -> Self {
        Decoder {
            max_message,
            deflate: false,
            partial: Vec::new(),
            fragments: None,
            skip: 0,
            done: false,
        }
    }

    /// A decoder for a connection that negotiated permessage-deflate: a message whose first
    /// frame has RSV1 set is decompressed (into at most the message limit).
    pub fn with_deflate(max_message: usize) -> Self {
        Decoder { deflate: true, ..Decoder::new(max_message) }
    }

    /// Decodes every complete frame in `input` (after any carried-over bytes). After an
    /// `Err`, feeding on (even with no new bytes) decodes the frames that followed the
    /// refused one, so a caller can still find the client's close frame.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Incoming>) -> Result<(), Violation> {
        if self.done {
            return Ok(());
        }
        let skipped = input.len().min(usize::try_from(self.skip).unwrap_or(usize::MAX));
        self.skip -= skipped as u64;
        let input = &input[skipped..];
        if self.partial.is_empty() {
            let (used, result) = self.decode_all(input, out);
            if used < input.len() && !self.done {
                self.partial.extend_from_slice(&input[used..]);
            }
            result
        } else {
            let mut data = std::mem::take(&mut self.partial);
            data.extend_from_slice(input);
            let (used, result) = self.decode_all(&data, out);
            if used < data.len() && !self.done {
                data.drain(..used);
                self.partial = data;
            }
            result
        }
    }

    /// Decodes frames from the front of `input`; returns how many bytes were used up
    /// (including those of a refused frame) and whether a frame was refused.
    fn decode_all(
        &mut self,
        input: &[u8],
        out: &mut Vec<Incoming>,
    ) -> (usize, Result<(), Violation>) {
        let mut used = 0;
        while !self.done {
            match self.decode_one(&input[used..], out) {
                Ok(Some(n)) => used += n,
                Ok(None) => break,
                Err(Refused { violation, frame_len }) => {
                    self.fragments = None;
                    // A refused close frame still ends what the client has to say.
                    self.done |= violation.peer_closed;
                    let available = (input.len() - used) as u64;
                    match frame_len {
                        Some(n) if n <= available => used += n as usize,
                        Some(n) => {
                            self.skip = n - available;
                            used = input.len();
                        }
                        None => {
                            self.done = true;
                            used = input.len();
                        }
                    }
                    return (used, Err(violation));
                }
            }
        }
        (used, Ok(()))
    }

    /// Decodes one frame from the front of `input`; `None` when it is not complete yet.
    fn decode_one(
        &mut self,
        input: &[u8],
        out: &mut Vec<Incoming>,
    ) -> Result<Option<usize>, Refused> {
        if input.len() < 2 {
            return Ok(None);
        }
        let fin = input[0] & 0x80 != 0;
        let opcode = input[0] & 0x0F;
        let masked = input[1] & 0x80 != 0;
        let (len, header_len) = match input[1] & 0x7F {
            126 if input.len() >= 4 => (u16::from_be_bytes([input[2], input[3]]) as u64, 4),
            127 if input.len() >= 10 => {
                (u64::from_be_bytes(input[2..10].try_into().expect("8 bytes")), 10)
            }
            126 | 127 => return Ok(None),
            n => (n as u64, 2),
        };
        if len >> 63 != 0 {
            // The RFC requires the most significant bit to be 0; such a frame has no length
            // to skip, so nothing after it can be decoded.
            return Err(Refused {
                violation: Violation::protocol(
                    "64-bit payload length with the most significant bit set",
                ),
                frame_len: None,
            });
        }
        let frame_len = header_len as u64 + if masked { 4 } else { 0 } + len;
        let refuse = |violation: Violation| Err(Refused { violation, frame_len: Some(frame_len) });
        let compressed = input[0] & 0x40 != 0;
        if input[0] & 0x30 != 0 || (compressed && !self.deflate) {
            return refuse(Violation::protocol("reserved bits set without a negotiated extension"));
        }
        if compressed && !matches!(opcode, OP_TEXT | OP_BINARY) {
            // RFC 7692 6: only the first frame of a data message may carry RSV1.
            return refuse(Violation::protocol(format!(
                "RSV1 set on a frame with opcode {opcode:#x}, not the first frame of a message"
            )));
        }
        if !masked {
            return refuse(Violation::protocol("client frames must be masked"));
        }
        let is_control = opcode & 0x8 != 0;
        match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
            other => return refuse(Violation::protocol(format!("unknown opcode {other:#x}"))),
        }
        if is_control && len > 125 {
            return refuse(Violation::protocol(format!(
                "control frame of {len} bytes; at most 125 are allowed"
            )));
        }
        if is_control && !fin {
            return refuse(Violation::protocol("control frames must not be fragmented"));
        }
        match (opcode, &self.fragments) {
            (OP_TEXT | OP_BINARY, Some(_)) => {
                return refuse(Violation::protocol("new message started inside a fragmented one"));
            }
            (OP_CONTINUATION, None) => {
                return refuse(Violation::protocol("continuation frame without a message"));
            }
            (OP_BINARY, None) => {
                return refuse(Violation::new(
                    CloseCode::Unsupported,
                    "binary_frame",
                    CloseCode::Unsupported.reason(),
                ));
            }
            _ => {}
        }
        let assembled = self.fragments.as_ref().map_or(0, Assembly::len) as u64;
        if !is_control && assembled + len > self.max_message as u64 {
            return refuse(Violation::new(
                CloseCode::TooBig,
                "frame_too_big",
                format!(
                    "message of {} bytes exceeds the {} byte limit",
                    assembled + len,
                    self.max_message
                ),
            ));
        }
        let used = frame_len as usize;
        if input.len() < used {
            return Ok(None);
        }
        let pos = header_len + 4;
        let mask: [u8; 4] = input[header_len..pos].try_into().expect("4 bytes");
        let mut payload = input[pos..used].to_vec();
        unmask(&mut payload, mask);

        let handled = match opcode {
            OP_TEXT if fin && compressed => self.inflate(&payload).map(|t| out.push(t)),
            OP_TEXT if fin => String::from_utf8(payload)
                .map(|text| out.push(Incoming::Text(text)))
                .map_err(|_| invalid_utf8()),
            OP_TEXT if compressed => {
                self.fragments = Some(Assembly::Deflated(payload));
                Ok(())
            }
            OP_TEXT => {
                let mut text = TextAssembly::default();
                let pushed = text.push(&payload);
                self.fragments = Some(Assembly::Text(text));
                pushed
            }
            OP_CONTINUATION => match self.fragments.as_mut().expect("checked above") {
                Assembly::Deflated(z) => {
                    z.extend_from_slice(&payload);
                    if fin {
                        let Some(Assembly::Deflated(z)) = self.fragments.take() else {
                            unreachable!("matched above")
                        };
                        self.inflate(&z).map(|t| out.push(t))
                    } else {
                        Ok(())
                    }
                }
                Assembly::Text(text) => text.push(&payload).and_then(|()| {
                    if fin {
                        let Some(Assembly::Text(text)) = self.fragments.take() else {
                            unreachable!("matched above")
                        };
                        out.push(Incoming::Text(text.finish()?));
                    }
                    Ok(())
                }),
            },
            OP_CLOSE => close_payload(&payload).map(|code| {
                self.done = true;
                out.push(Incoming::Close(code));
            }),
            OP_PING => {
                out.push(Incoming::Ping(payload));
                Ok(())
            }
            _ => {
                out.push(Incoming::Pong);
                Ok(())
            }
        };
        match handled {
            Ok(()) => Ok(Some(used)),
            Err(violation) => refuse(violation),
        }
    }
}

impl Decoder {
    /// Decompresses a whole compressed text message, within the message limit.
    fn inflate(&self, compressed: &[u8]) -> Result<Incoming, Violation> {
        match super::deflate::inflate(compressed, self.max_message) {
            Ok(plain) => String::from_utf8(plain).map(Incoming::Text).map_err(|_| invalid_utf8()),
            Err(InflateError::TooBig) => Err(Violation::new(
                CloseCode::TooBig,
                "frame_too_big",
                format!("message decompresses to more than the {} byte limit", self.max_message),
            )),
            Err(InflateError::Corrupt) => Err(Violation::new(
                CloseCode::InvalidPayload,
                "invalid_deflate",
                "compressed message is not valid deflate data",
            )),
        }
    }
}

/// The code of a client's close frame, checked: a 1-byte payload or a code not allowed on
/// the wire is a protocol error, a reason that is not UTF-8 an invalid payload.
fn close_payload(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(Violation::protocol("close frame with a 1-byte payload").in_close_frame()),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_valid(code) {
                return Err(Violation::new(
                    CloseCode::ProtocolError,
                    "invalid_close_code",
                    format!("close code {code} is not allowed on the wire"),
                )
                .in_close_frame());
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(Violation::new(
                    CloseCode::InvalidPayload,
                    "invalid_close_reason",
                    "close reason is not valid UTF-8",
                )
                .in_close_frame());
            }
            Ok(Some(code))
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes(chunk.try_into().expect("4 bytes")) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Writes the header of an unmasked server frame into `out`; returns its length.
pub fn encode_header(opcode: u8, len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// A complete close frame with `code` and `reason` (truncated to fit 125 bytes).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut reason = reason;
    while reason.len() > 123 {
        let mut cut = 123;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason = &reason[..cut];
    }
    let mut frame = vec![0x80 | OP_CLOSE, (2 + reason.len()) as u8];
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason.as_bytes());
    frame
}

/// A complete control frame (ping or pong) with a payload of at most 125 bytes.
pub fn control_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(125)];
    let mut frame = vec![0x80 | opcode, payload.len() as u8];
    frame.extend_from_slice(payload);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn decodes_text_split_across_reads_byte_by_byte() {
        let frame = client_frame(true, OP_TEXT, "héllo, wörld".as_bytes());
        let mut d = Decoder::new(1024);
        let mut out = Vec::new();
        for b in &frame {
            d.feed(std::slice::from_ref(b), &mut out).unwrap();
        }
        assert_eq!(out, vec![Incoming::Text("héllo, wörld".into())]);
        assert!(d.partial.is_empty() && d.partial.capacity() == 0, "no buffer kept after a frame");
    }

    #[test]
    fn assembles_fragments_and_interleaved_control_frames() {
        let mut bytes = client_frame(false, OP_TEXT, b"ab");
        bytes.extend(client_frame(true, OP_PING, b"p"));
        bytes.extend(client_frame(true, OP_CONTINUATION, b"cd"));
        let mut out = Vec::new();
        Decoder::new(1024).feed(&bytes, &mut out).unwrap();
        assert_eq!(out, vec![Incoming::Ping(b"p".to_vec()), Incoming::Text("abcd".into())]);
    }

    #[test]
    fn limits_and_violations_map_to_close_codes() {
        let mut out = Vec::new();
        let big = client_frame(true, OP_TEXT, &vec![b'a'; 70_000]);
        // Refused from the header alone, before the payload has arrived.
        let e = Decoder::new(65_536).feed(&big[..20], &mut out).unwrap_err();
        assert_eq!(e.code, CloseCode::TooBig);
        let e = Decoder::new(64).feed(&client_frame(true, OP_BINARY, b"x"), &mut out).unwrap_err();
        assert_eq!(e.code, CloseCode::Unsupported);
        let e = Decoder::new(64)
            .feed(&client_frame(true, OP_TEXT, &[0xff, 0xfe]), &mut out)
            .unwrap_err();
        assert_eq!(e.code, CloseCode::InvalidPayload);
        let mut unmasked = client_frame(true, OP_TEXT, b"x");
        unmasked[1] &= 0x7F;
        let e = Decoder::new(64).feed(&unmasked, &mut out).unwrap_err();
        assert_eq!(e.code, CloseCode::ProtocolError);
        let e = Decoder::new(64)
            .feed(&client_frame(true, OP_CONTINUATION, b"x"), &mut out)
            .unwrap_err();
        assert_eq!(e.code, CloseCode::ProtocolError);
    }

    #[test]
    fn close_frame_carries_code_and_truncated_reason() {
        let f = close_frame(4009, &"x".repeat(300));
        assert_eq!(f.len(), 2 + 125);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 4009);
        let mut out = Vec::new();
        Decoder::new(64)
            .feed(&client_frame(true, OP_CLOSE, &1000u16.to_be_bytes()), &mut out)
            .unwrap();
        assert_eq!(out, vec![Incoming::Close(Some(1000))]);
    }

    fn decode(d: &mut Decoder, bytes: &[u8]) -> (Vec<Incoming>, Result<(), Violation>) {
        let mut out = Vec::new();
        let result = d.feed(bytes, &mut out);
        (out, result)
    }

    fn refused(bytes: &[u8]) -> Violation {
        let (out, result) = decode(&mut Decoder::new(1 << 20), bytes);
        let v = result.expect_err("frame should be refused");
        assert!(out.is_empty(), "{out:?}");
        v
    }

    fn close_with(payload: &[u8]) -> Vec<u8> {
        client_frame(true, OP_CLOSE, payload)
    }

    #[test]
    fn close_frame_with_one_byte_payload_is_a_protocol_error() {
        let v = refused(&close_with(&[0x03]));
        assert_eq!(
            (v.code, v.label, v.peer_closed),
            (CloseCode::ProtocolError, "protocol_error", true)
        );
    }

    #[test]
    fn close_codes_not_allowed_on_the_wire_are_refused() {
        for code in [0u16, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            let v = refused(&close_with(&code.to_be_bytes()));
            assert_eq!(
                (v.code, v.label),
                (CloseCode::ProtocolError, "invalid_close_code"),
                "{code}"
            );
            assert!(v.peer_closed && v.reason.contains(&code.to_string()), "{v:?}");
        }
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            let (out, result) = decode(&mut Decoder::new(64), &close_with(&code.to_be_bytes()));
            assert_eq!((out, result), (vec![Incoming::Close(Some(code))], Ok(())), "{code}");
        }
        let (out, _) = decode(&mut Decoder::new(64), &close_with(&[]));
        assert_eq!(out, vec![Incoming::Close(None)]);
    }

    #[test]
    fn close_reason_must_be_utf8() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice("bye ✓".as_bytes());
        let (out, _) = decode(&mut Decoder::new(64), &close_with(&payload));
        assert_eq!(out, vec![Incoming::Close(Some(1000))]);
        payload.extend_from_slice(&[
            0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC, 0xCE, 0xB5, 0xED, 0xA0, 0x80,
        ]);
        let v = refused(&close_with(&payload));
        assert_eq!(
            (v.code, v.label, v.peer_closed),
            (CloseCode::InvalidPayload, "invalid_close_reason", true)
        );
    }

    #[test]
    fn invalid_utf8_fails_at_the_fragment_that_holds_it() {
        let mut d = Decoder::new(1 << 20);
        let (_, result) = decode(&mut d, &client_frame(false, OP_TEXT, b"ok \xff and more"));
        assert_eq!(result.unwrap_err().label, "invalid_utf8");
        // In a later fragment, after valid ones.
        let mut d = Decoder::new(1 << 20);
        assert_eq!(decode(&mut d, &client_frame(false, OP_TEXT, "κόσμε".as_bytes())).1, Ok(()));
        assert_eq!(decode(&mut d, &client_frame(false, OP_CONTINUATION, b"fine")).1, Ok(()));
        let v =
            decode(&mut d, &client_frame(false, OP_CONTINUATION, b"\xed\xa0\x80")).1.unwrap_err();
        assert_eq!((v.code, v.label), (CloseCode::InvalidPayload, "invalid_utf8"));
    }

    #[test]
    fn impossible_sequence_at_a_fragment_end_fails_before_the_message_ends() {
        // Each is a prefix no continuation can make valid: above U+10FFFF, a surrogate, an
        // overlong form, a byte that never occurs in UTF-8.
        for tail in [&b"\xf4\x90"[..], b"\xed\xa0", b"\xe0\x80", b"\xf5", b"\xc0"] {
            let mut payload = b"abc".to_vec();
            payload.extend_from_slice(tail);
            let mut d = Decoder::new(1 << 20);
            let v = decode(&mut d, &client_frame(false, OP_TEXT, &payload)).1.unwrap_err();
            assert_eq!(v.code, CloseCode::InvalidPayload, "{tail:x?}");
        }
    }

    #[test]
    fn characters_split_across_fragments_are_accepted() {
        // "€" (3 bytes) one byte per fragment, then a 4-byte character split 1 + 3.
        let mut bytes = client_frame(false, OP_TEXT, b"\xe2");
        bytes.extend(client_frame(false, OP_CONTINUATION, b"\x82"));
        bytes.extend(client_frame(false, OP_CONTINUATION, b"\xac x \xf0"));
        bytes.extend(client_frame(false, OP_CONTINUATION, b""));
        bytes.extend(client_frame(true, OP_CONTINUATION, b"\x9f\x98\x80!"));
        let (out, result) = decode(&mut Decoder::new(64), &bytes);
        assert_eq!((out, result), (vec![Incoming::Text("€ x 😀!".into())], Ok(())));
    }

    #[test]
    fn incomplete_character_at_the_end_of_the_message_is_invalid() {
        let mut d = Decoder::new(64);
        assert_eq!(decode(&mut d, &client_frame(false, OP_TEXT, b"a\xe2\x82")).1, Ok(()));
        let v = decode(&mut d, &client_frame(true, OP_CONTINUATION, b"")).1.unwrap_err();
        assert_eq!(v.code, CloseCode::InvalidPayload);
        let v = refused(&client_frame(true, OP_TEXT, b"a\xe2\x82"));
        assert_eq!(v.code, CloseCode::InvalidPayload);
    }

    proptest::proptest! {
        /// Fragment by fragment validation agrees with validating the whole message, and
        /// fails at the first fragment after which no continuation could be valid.
        #[test]
        fn fragmented_utf8_matches_whole_message_validation(
            bytes in proptest::collection::vec(proptest::prop_oneof![
                proptest::num::u8::ANY, 0x80u8..0xC0, 0xE0u8..0xF5], 0..40),
            cuts in proptest::collection::vec(0usize..40, 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            cuts.push(bytes.len());
            let mut d = Decoder::new(1 << 20);
            let mut start = 0;
            let mut got = None;
            for (i, &end) in cuts.iter().enumerate() {
                let last = i + 1 == cuts.len();
                let op = if i == 0 { OP_TEXT } else { OP_CONTINUATION };
                let (out, result) = decode(&mut d, &client_frame(last, op, &bytes[start..end]));
                if let Err(v) = result {
                    proptest::prop_assert_eq!(v.code, CloseCode::InvalidPayload);
                    got = Some(Err(i));
                    break;
                }
                if last {
                    got = Some(Ok(out));
                }
                start = end;
            }
            let expected_fail = cuts.iter().position(|&end| {
                matches!(std::str::from_utf8(&bytes[..end]), Err(e) if e.error_len().is_some())
            });
            match (std::str::from_utf8(&bytes), got.unwrap()) {
                (Ok(text), Ok(out)) => proptest::prop_assert_eq!(out, vec![Incoming::Text(text.into())]),
                (Err(_), Err(at)) => proptest::prop_assert_eq!(at, expected_fail.unwrap_or(cuts.len() - 1)),
                (whole, got) => proptest::prop_assert!(false, "whole {:?}, fragments {:?}", whole, got),
            }
        }
    }

    #[test]
    fn payload_length_with_the_top_bit_set_is_a_protocol_error() {
        let mut frame = vec![0x80 | OP_TEXT, 0x80 | 127];
        frame.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        let mut d = Decoder::new(1 << 20);
        let v = decode(&mut d, &frame).1.unwrap_err();
        assert_eq!((v.code, v.label), (CloseCode::ProtocolError, "protocol_error"));
        assert!(v.reason.contains("most significant bit"), "{}", v.reason);
        // Nothing after it can be framed, so nothing is decoded (not even a close).
        assert_eq!(decode(&mut d, &close_with(&1000u16.to_be_bytes())), (vec![], Ok(())));
    }

    #[test]
    fn non_minimal_lengths_are_accepted() {
        let mask = [9, 8, 7, 6];
        let masked: Vec<u8> = b"hi".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
        let mut sixteen = vec![0x80 | OP_TEXT, 0x80 | 126, 0, 2];
        sixteen.extend_from_slice(&mask);
        sixteen.extend_from_slice(&masked);
        let mut sixty_four = vec![0x80 | OP_TEXT, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0, 2];
        sixty_four.extend_from_slice(&mask);
        sixty_four.extend_from_slice(&masked);
        for frame in [sixteen, sixty_four] {
            let (out, result) = decode(&mut Decoder::new(64), &frame);
            assert_eq!((out, result), (vec![Incoming::Text("hi".into())], Ok(())));
        }
    }

    #[test]
    fn control_frames_ping_pong_and_their_limits() {
        let payload = [7u8; 125];
        let (out, _) = decode(&mut Decoder::new(64), &client_frame(true, OP_PING, &payload));
        assert_eq!(out, vec![Incoming::Ping(payload.to_vec())]);
        let (out, result) =
            decode(&mut Decoder::new(64), &client_frame(true, OP_PONG, b"whatever"));
        assert_eq!((out, result), (vec![Incoming::Pong], Ok(())));
        for (fin, opcode, len) in [
            (true, OP_PING, 126),
            (true, OP_PONG, 126),
            (true, OP_CLOSE, 126),
            (false, OP_PING, 1),
            (false, OP_CLOSE, 2),
        ] {
            let v = refused(&client_frame(fin, opcode, &vec![3; len]));
            assert_eq!(v.code, CloseCode::ProtocolError, "fin {fin} opcode {opcode} len {len}");
        }
    }

    #[test]
    fn unknown_opcodes_and_reserved_bits_are_protocol_errors() {
        for opcode in (0x3..=0x7).chain(0xB..=0xF) {
            let v = refused(&client_frame(true, opcode, b"x"));
            assert_eq!(v.code, CloseCode::ProtocolError, "opcode {opcode:#x}");
            assert!(v.reason.contains("opcode"), "{}", v.reason);
        }
        for rsv in [0x40u8, 0x20, 0x10, 0x70] {
            let mut frame = client_frame(true, OP_TEXT, b"x");
            frame[0] |= rsv;
            assert_eq!(refused(&frame).code, CloseCode::ProtocolError, "rsv {rsv:#x}");
        }
    }

    #[test]
    fn compressed_messages_with_the_extension() {
        let metrics = crate::ws::deflate::DeflateMetrics::default();
        let text = "{\"op\":\"ping\",\"pad\":\"".to_string() + &"zz".repeat(300) + "\"}";
        let z = crate::ws::deflate::compress(text.as_bytes(), &metrics);
        // Whole, and split over three frames (RSV1 on the first only).
        let mut whole = client_frame(true, OP_TEXT, &z);
        whole[0] |= RSV1;
        let (a, rest) = z.split_at(3);
        let (b, c) = rest.split_at(rest.len() / 2);
        let mut split = client_frame(false, OP_TEXT, a);
        split[0] |= RSV1;
        split.extend(client_frame(false, OP_CONTINUATION, b));
        split.extend(client_frame(true, OP_CONTINUATION, c));
        for bytes in [whole.clone(), split] {
            let (out, result) = decode(&mut Decoder::with_deflate(1024), &bytes);
            result.unwrap();
            assert_eq!(out, vec![Incoming::Text(text.clone())]);
        }
        // Plain messages still pass on the same connection.
        let (out, _) =
            decode(&mut Decoder::with_deflate(1024), &client_frame(true, OP_TEXT, b"hi"));
        assert_eq!(out, vec![Incoming::Text("hi".into())]);
        // Bigger than the limit once decompressed (the compressed frame is far smaller).
        let v = decode(&mut Decoder::with_deflate(text.len() - 1), &whole).1.unwrap_err();
        assert_eq!((v.code, v.label), (CloseCode::TooBig, "frame_too_big"));
        // Not deflate data.
        let mut junk = client_frame(true, OP_TEXT, &[0xff; 8]);
        junk[0] |= RSV1;
        let v = decode(&mut Decoder::with_deflate(1024), &junk).1.unwrap_err();
        assert_eq!((v.code, v.label), (CloseCode::InvalidPayload, "invalid_deflate"));
        // RSV1 on a continuation or a control frame, RSV2 and RSV3: protocol errors.
        let mut cont = client_frame(false, OP_TEXT, b"a");
        let mut second = client_frame(true, OP_CONTINUATION, b"b");
        second[0] |= RSV1;
        cont.extend(second);
        let mut ping = client_frame(true, OP_PING, b"");
        ping[0] |= RSV1;
        let mut rsv2 = client_frame(true, OP_TEXT, b"x");
        rsv2[0] |= 0x20;
        for bytes in [cont, ping, rsv2] {
            let v = decode(&mut Decoder::with_deflate(1024), &bytes).1.unwrap_err();
            assert_eq!(v.code, CloseCode::ProtocolError, "{}", v.reason);
        }
    }

    #[test]
    fn fragmentation_errors_are_protocol_errors() {
        let v = refused(&client_frame(false, OP_CONTINUATION, b"x"));
        assert_eq!(v.code, CloseCode::ProtocolError);
        for second in [OP_TEXT, OP_BINARY] {
            let mut bytes = client_frame(false, OP_TEXT, b"a");
            bytes.extend(client_frame(true, second, b"b"));
            let (out, result) = decode(&mut Decoder::new(64), &bytes);
            assert!(out.is_empty());
            assert_eq!(result.unwrap_err().code, CloseCode::ProtocolError, "opcode {second}");
        }
    }

    #[test]
    fn data_after_the_close_frame_is_ignored() {
        let mut bytes = close_with(&1000u16.to_be_bytes());
        bytes.extend(client_frame(true, OP_TEXT, b"late"));
        bytes.extend([0xff; 8]);
        let mut d = Decoder::new(64);
        assert_eq!(decode(&mut d, &bytes), (vec![Incoming::Close(Some(1000))], Ok(())));
        assert_eq!(decode(&mut d, &client_frame(true, OP_TEXT, b"later")), (vec![], Ok(())));
        assert!(d.partial.is_empty());
    }

    #[test]
    fn after_a_refused_frame_the_clients_close_is_still_found() {
        // The refused frame and the close in one read.
        let mut bytes = client_frame(true, OP_BINARY, b"bin");
        bytes.extend(close_with(&1000u16.to_be_bytes()));
        let mut d = Decoder::new(64);
        let (out, result) = decode(&mut d, &bytes);
        assert!(out.is_empty());
        assert_eq!(result.unwrap_err().code, CloseCode::Unsupported);
        assert_eq!(decode(&mut d, &[]), (vec![Incoming::Close(Some(1000))], Ok(())));
        // A frame refused from its header alone: its payload is skipped as it arrives.
        let big = client_frame(true, OP_TEXT, &[b'a'; 300]);
        let mut d = Decoder::new(100);
        assert_eq!(decode(&mut d, &big[..10]).1.unwrap_err().code, CloseCode::TooBig);
        assert_eq!(decode(&mut d, &big[10..200]), (vec![], Ok(())));
        let mut rest = big[200..].to_vec();
        rest.extend(close_with(&4000u16.to_be_bytes()));
        assert_eq!(decode(&mut d, &rest), (vec![Incoming::Close(Some(4000))], Ok(())));
    }

    #[test]
    fn header_lengths() {
        let mut h = [0u8; 10];
        assert_eq!(encode_header(OP_TEXT, 125, &mut h), 2);
        assert_eq!(encode_header(OP_TEXT, 126, &mut h), 4);
        assert_eq!(encode_header(OP_TEXT, 70_000, &mut h), 10);
    }
}

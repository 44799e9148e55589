//! RFC 6455 framing for the server side: decoding masked client frames, encoding headers.
//!
//! The decoder is a plain value fed with whatever bytes a read returned. A partial frame is a
//! normal condition: the remainder is kept until the next read, and nothing is buffered once
//! a frame completes, so an idle connection holds no buffer at all.

use ferrocast_protocol::CloseCode;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Ping(Vec<u8>),
    Pong,
    /// The client's close frame: its code (if any).
    Close(Option<u16>),
}

/// Why the connection must be closed, and with which code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: CloseCode,
    pub reason: String,
}

impl Violation {
    fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        Violation { code, reason: reason.into() }
    }
}

/// Incremental decoder of client frames.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// Bytes of an incomplete frame carried over from the previous read.
    partial: Vec<u8>,
    /// A fragmented text message being assembled.
    fragments: Option<Vec<u8>>,
}

impl Decoder {
    pub fn new(max_message: usize) -> Self {
        Decoder { max_message, partial: Vec::new(), fragments: None }
    }

    /// Decodes every complete frame in `input` (after any carried-over bytes).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Incoming>) -> Result<(), Violation> {
        if self.partial.is_empty() {
            let used = self.decode_all(input, out)?;
            if used < input.len() {
                self.partial.extend_from_slice(&input[used..]);
            }
        } else {
            let mut data = std::mem::take(&mut self.partial);
            data.extend_from_slice(input);
            let used = self.decode_all(&data, out)?;
            if used < data.len() {
                data.drain(..used);
                self.partial = data;
            }
        }
        Ok(())
    }

    fn decode_all(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<Incoming>,
    ) -> Result<usize, Violation> {
        let total = input.len();
        while let Some(used) = self.decode_one(input, out)? {
            input = &input[used..];
        }
        Ok(total - input.len())
    }

    /// Decodes one frame from the front of `input`; `None` when it is not complete yet.
    fn decode_one(
        &mut self,
        input: &[u8],
        out: &mut Vec<Incoming>,
    ) -> Result<Option<usize>, Violation> {
        if input.len() < 2 {
            return Ok(None);
        }
        let fin = input[0] & 0x80 != 0;
        if input[0] & 0x70 != 0 {
            return Err(Violation::new(
                CloseCode::ProtocolError,
                "reserved bits set without a negotiated extension",
            ));
        }
        let opcode = input[0] & 0x0F;
        if input[1] & 0x80 == 0 {
            return Err(Violation::new(CloseCode::ProtocolError, "client frames must be masked"));
        }
        let (len, mut pos) = match input[1] & 0x7F {
            126 if input.len() >= 4 => (u16::from_be_bytes([input[2], input[3]]) as u64, 4),
            127 if input.len() >= 10 => {
                (u64::from_be_bytes(input[2..10].try_into().expect("8 bytes")), 10)
            }
            126 | 127 => return Ok(None),
            n => (n as u64, 2),
        };
        let is_control = opcode & 0x8 != 0;
        if is_control && (len > 125 || !fin) {
            return Err(Violation::new(
                CloseCode::ProtocolError,
                "control frames must be final and at most 125 bytes",
            ));
        }
        let assembled = self.fragments.as_ref().map_or(0, Vec::len) as u64;
        if !is_control && assembled + len > self.max_message as u64 {
            return Err(Violation::new(
                CloseCode::TooBig,
                format!(
                    "message of {} bytes exceeds the {} byte limit",
                    assembled + len,
                    self.max_message
                ),
            ));
        }
        let len = len as usize;
        if input.len() < pos + 4 + len {
            return Ok(None);
        }
        let mask: [u8; 4] = input[pos..pos + 4].try_into().expect("4 bytes");
        pos += 4;
        let mut payload = input[pos..pos + len].to_vec();
        unmask(&mut payload, mask);
        let used = pos + len;

        match opcode {
            OP_TEXT | OP_BINARY if self.fragments.is_some() => {
                return Err(Violation::new(
                    CloseCode::ProtocolError,
                    "new message started inside a fragmented one",
                ));
            }
            OP_TEXT if fin => out.push(Incoming::Text(to_text(payload)?)),
            OP_TEXT => self.fragments = Some(payload),
            OP_BINARY => {
                return Err(Violation::new(
                    CloseCode::Unsupported,
                    CloseCode::Unsupported.reason(),
                ));
            }
            OP_CONTINUATION => match self.fragments.as_mut() {
                Some(buf) => {
                    buf.extend_from_slice(&payload);
                    if fin {
                        let text = self.fragments.take().expect("checked");
                        out.push(Incoming::Text(to_text(text)?));
                    }
                }
                None => {
                    return Err(Violation::new(
                        CloseCode::ProtocolError,
                        "continuation frame without a message",
                    ));
                }
            },
            OP_CLOSE => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                out.push(Incoming::Close(code));
            }
            OP_PING => out.push(Incoming::Ping(payload)),
            OP_PONG => out.push(Incoming::Pong),
            other => {
                return Err(Violation::new(
                    CloseCode::ProtocolError,
                    format!("unknown opcode {other:#x}"),
                ));
            }
        }
        Ok(Some(used))
    }
}

fn to_text(payload: Vec<u8>) -> Result<String, Violation> {
    String::from_utf8(payload)
        .map_err(|_| Violation::new(CloseCode::InvalidPayload, CloseCode::InvalidPayload.reason()))
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

    #[test]
    fn header_lengths() {
        let mut h = [0u8; 10];
        assert_eq!(encode_header(OP_TEXT, 125, &mut h), 2);
        assert_eq!(encode_header(OP_TEXT, 126, &mut h), 4);
        assert_eq!(encode_header(OP_TEXT, 70_000, &mut h), 10);
    }
}

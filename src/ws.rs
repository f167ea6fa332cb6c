//! WebSocket frames, sans-IO: turn received bytes into events, and build server frames.
//!
//! Frame headers are parsed and written by tungstenite (`FrameHeader`, `Frame`); this
//! module adds what a fan-out server needs on top: frames are decoded straight out of
//! the loop's shared read buffer, so an idle connection owns no buffer at all, and only a
//! partial frame (or a fragmented message being reassembled) is kept per connection.
//! Server frames are unmasked, so one encoded frame serves every recipient.

use bytes::{Bytes, BytesMut};
use std::io::Cursor;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::{Frame, FrameHeader};

/// The kind of a data message; kept end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
}

/// Something a client's bytes meant.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete data message (text is valid UTF-8).
    Message(Kind, Bytes),
    /// A ping: answer with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong (liveness only).
    Pong,
    /// The client closes; `reply` is the close frame to send back.
    Close { code: Option<u16>, reply: Bytes },
}

/// A protocol violation: the connection is closed with this code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// 1002: malformed frame, bad opcode, unmasked client frame, bad continuation…
    Protocol,
    /// 1007: text that is not UTF-8.
    InvalidUtf8,
    /// 1009: message larger than `max_message_size`.
    TooBig,
}

impl Violation {
    /// Close reason text sent with the close frame.
    pub fn text(self) -> &'static str {
        match self {
            Violation::Protocol => "protocol error",
            Violation::InvalidUtf8 => "invalid utf-8",
            Violation::TooBig => "message too big",
        }
    }

    pub fn close_code(self) -> u16 {
        match self {
            Violation::Protocol => 1002,
            Violation::InvalidUtf8 => 1007,
            Violation::TooBig => 1009,
        }
    }
}

/// Per-connection decoder state: only a fragmented message under reassembly.
/// `None` (one pointer) for the common case of unfragmented messages.
#[derive(Debug, Default)]
pub struct Decoder {
    fragments: Option<Box<(Kind, BytesMut)>>,
}

impl Decoder {
    /// Bytes held for a fragmented message under reassembly (its buffer's capacity).
    pub fn held(&self) -> usize {
        self.fragments.as_ref().map_or(0, |f| f.1.capacity())
    }

    /// Decodes every complete frame at the front of `buf` (unmasking it in place),
    /// pushing events to `out`. Returns how many bytes were consumed; the rest is a
    /// partial frame to keep until more bytes arrive. Stops after a Close.
    pub fn decode(
        &mut self,
        buf: &mut [u8],
        max_size: usize,
        out: &mut Vec<Event>,
    ) -> Result<usize, Violation> {
        let mut pos = 0;
        loop {
            let mut cur = Cursor::new(&buf[pos..]);
            let (header, len) = match FrameHeader::parse(&mut cur) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(pos),
                Err(_) => return Err(Violation::Protocol),
            };
            let head_len = cur.position() as usize;
            let so_far = self.fragments.as_ref().map_or(0, |f| f.1.len());
            if header.rsv1 || header.rsv2 || header.rsv3 || header.mask.is_none() {
                return Err(Violation::Protocol);
            }
            if let OpCode::Control(_) = header.opcode {
                if !header.is_final || len > 125 {
                    return Err(Violation::Protocol);
                }
            } else if len > (max_size - so_far.min(max_size)) as u64 {
                return Err(Violation::TooBig);
            }
            let len = len as usize;
            if buf.len() - pos - head_len < len {
                return Ok(pos); // wait for the rest of the frame
            }
            let start = pos + head_len;
            let payload = &mut buf[start..start + len];
            if let Some(mask) = header.mask {
                unmask(payload, mask);
            }
            pos = start + len;
            let closed = self.frame(&header, payload, out)?;
            if closed {
                return Ok(pos);
            }
        }
    }

    /// Handles one unmasked frame; true after a Close.
    fn frame(
        &mut self,
        h: &FrameHeader,
        payload: &[u8],
        out: &mut Vec<Event>,
    ) -> Result<bool, Violation> {
        match h.opcode {
            OpCode::Control(Control::Ping) => {
                out.push(Event::Ping(Bytes::copy_from_slice(payload)))
            }
            OpCode::Control(Control::Pong) => out.push(Event::Pong),
            OpCode::Control(Control::Close) => {
                out.push(close_event(payload)?);
                return Ok(true);
            }
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(Violation::Protocol)
            }
            OpCode::Data(Data::Continue) => {
                let Some(frag) = self.fragments.as_mut() else {
                    return Err(Violation::Protocol);
                };
                frag.1.extend_from_slice(payload);
                if h.is_final {
                    let Some(frag) = self.fragments.take() else {
                        return Err(Violation::Protocol);
                    };
                    let (kind, data) = *frag;
                    // The buffer grew by doubling: a message that keeps far less than
                    // its capacity (history, the fan-out) is copied to its size.
                    let data = if data.capacity() > data.len() + data.len() / 4 {
                        Bytes::copy_from_slice(&data)
                    } else {
                        data.freeze()
                    };
                    out.push(message(kind, data)?);
                }
            }
            OpCode::Data(d) => {
                if self.fragments.is_some() {
                    return Err(Violation::Protocol);
                }
                let kind = if d == Data::Text {
                    Kind::Text
                } else {
                    Kind::Binary
                };
                if h.is_final {
                    out.push(message(kind, Bytes::copy_from_slice(payload))?);
                } else {
                    self.fragments = Some(Box::new((kind, BytesMut::from(payload))));
                }
            }
        }
        Ok(false)
    }
}

fn message(kind: Kind, data: Bytes) -> Result<Event, Violation> {
    if kind == Kind::Text && std::str::from_utf8(&data).is_err() {
        return Err(Violation::InvalidUtf8);
    }
    Ok(Event::Message(kind, data))
}

fn close_event(payload: &[u8]) -> Result<Event, Violation> {
    match payload.len() {
        0 => Ok(Event::Close {
            code: None,
            reply: close_frame(1000, ""),
        }),
        1 => Err(Violation::Protocol),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !CloseCode::from(code).is_allowed() {
                return Err(Violation::Protocol);
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(Violation::InvalidUtf8);
            }
            Ok(Event::Close {
                code: Some(code),
                reply: close_frame(code, ""),
            })
        }
    }
}

/// XORs the client mask into `buf`, eight bytes at a time.
pub fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let m8 = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ m8).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

fn encode(frame: Frame) -> Bytes {
    let mut v = Vec::with_capacity(frame.len());
    // Writing into a Vec cannot fail.
    let _ = frame.format(&mut v);
    Bytes::from(v)
}

/// One unmasked, final data frame: built once, shared by every recipient.
pub fn data_frame(kind: Kind, payload: Bytes) -> Bytes {
    let op = match kind {
        Kind::Text => OpCode::Data(Data::Text),
        Kind::Binary => OpCode::Data(Data::Binary),
    };
    encode(Frame::message(payload, op, true))
}

/// A close frame with `code` and a short `reason` (truncated to fit a control frame).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    let header = FrameHeader {
        opcode: OpCode::Control(Control::Close),
        ..Default::default()
    };
    encode(Frame::from_payload(header, Bytes::from(payload)))
}

pub fn pong_frame(payload: Bytes) -> Bytes {
    encode(Frame::pong(payload))
}

pub fn ping_frame() -> Bytes {
    encode(Frame::ping(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        if payload.len() < 126 {
            v.push(0x80 | payload.len() as u8);
        } else {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    fn decode_all(bytes: &mut [u8]) -> (Result<usize, Violation>, Vec<Event>) {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        (d.decode(bytes, 1000, &mut out), out)
    }

    #[test]
    fn text_binary_and_empty_binary() {
        let mut b = client(true, 1, b"hello");
        b.extend(client(true, 2, &[0, 255]));
        b.extend(client(true, 2, b""));
        let (r, ev) = decode_all(&mut b);
        assert_eq!(r, Ok(b.len()));
        assert_eq!(
            ev,
            vec![
                Event::Message(Kind::Text, Bytes::from_static(b"hello")),
                Event::Message(Kind::Binary, Bytes::from_static(&[0, 255])),
                Event::Message(Kind::Binary, Bytes::new()),
            ]
        );
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let full = client(true, 1, &[b'x'; 300]);
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for cut in [0, 1, 2, 4, 8, 100, full.len() - 1] {
            let mut part = full[..cut].to_vec();
            assert_eq!(d.decode(&mut part, 1000, &mut out), Ok(0), "cut {cut}");
        }
        assert!(out.is_empty());
        let mut all = full.clone();
        assert_eq!(d.decode(&mut all, 1000, &mut out), Ok(full.len()));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn fragments_reassemble_with_interleaved_ping() {
        let mut b = client(false, 1, b"he");
        b.extend(client(true, 9, b"p"));
        b.extend(client(false, 0, b"ll"));
        b.extend(client(true, 0, b"o"));
        let (r, ev) = decode_all(&mut b);
        assert_eq!(r, Ok(b.len()));
        assert_eq!(
            ev,
            vec![
                Event::Ping(Bytes::from_static(b"p")),
                Event::Message(Kind::Text, Bytes::from_static(b"hello"))
            ]
        );
    }

    #[test]
    fn violations_map_to_close_codes() {
        let cases: Vec<(Vec<u8>, Violation)> = vec![
            (client(true, 1, &[0xff, 0xfe]), Violation::InvalidUtf8),
            (client(true, 2, &[0; 1001]), Violation::TooBig),
            (client(true, 0, b"x"), Violation::Protocol), // continuation with nothing open
            (client(true, 3, b""), Violation::Protocol),  // reserved opcode
            (client(false, 9, b""), Violation::Protocol), // fragmented control
            (client(true, 8, &[0x03]), Violation::Protocol), // 1-byte close
            (client(true, 8, &[0x03, 0xed]), Violation::Protocol), // close code 1005
            (vec![0x81, 0x01, b'a'], Violation::Protocol), // unmasked
        ];
        for (mut bytes, want) in cases {
            let (r, _) = decode_all(&mut bytes);
            assert_eq!(r, Err(want), "{bytes:?}");
        }
        assert_eq!(Violation::TooBig.close_code(), 1009);
        // A fragmented message is limited as a whole.
        let mut b = client(false, 2, &[0; 600]);
        b.extend(client(true, 0, &[0; 600]));
        assert_eq!(decode_all(&mut b).0, Err(Violation::TooBig));
    }

    #[test]
    fn close_echoes_code_and_stops() {
        let mut b = client(true, 8, &[0x03, 0xe8, b'b', b'y']);
        b.extend(client(true, 1, b"after"));
        let (r, ev) = decode_all(&mut b);
        assert_eq!(r, Ok(10));
        assert_eq!(
            ev,
            vec![Event::Close {
                code: Some(1000),
                reply: close_frame(1000, "")
            }]
        );
    }

    #[test]
    fn server_frames_are_unmasked_and_exact() {
        assert_eq!(
            &data_frame(Kind::Text, Bytes::from_static(b"hi"))[..],
            b"\x81\x02hi"
        );
        assert_eq!(&data_frame(Kind::Binary, Bytes::new())[..], b"\x82\x00");
        assert_eq!(&close_frame(1001, "bye")[..], b"\x88\x05\x03\xe9bye");
        assert_eq!(close_frame(1000, &"é".repeat(100)).len(), 2 + 2 + 122);
        let big = data_frame(Kind::Binary, Bytes::from(vec![7u8; 70_000]));
        assert_eq!(&big[..2], &[0x82, 127]);
        assert_eq!(big.len(), 70_000 + 10);
    }

    #[test]
    fn unmask_matches_bytewise() {
        let mask = [1, 2, 3, 4];
        let mut a: Vec<u8> = (0..37).collect();
        let b: Vec<u8> = a.iter().enumerate().map(|(i, x)| x ^ mask[i % 4]).collect();
        unmask(&mut a, mask);
        assert_eq!(a, b);
    }
}

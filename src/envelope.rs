//! How a WebSocket message is carried in a Redis Pub/Sub payload.
//!
//! Plain text stays plain, so `redis-cli PUBLISH chat hello` reaches browsers as text and
//! `redis-cli SUBSCRIBE chat` shows what wsfan users type — interop with Node `ws` +
//! `ioredis` chat servers during a migration. Only where plain bytes would be ambiguous
//! is a two-byte envelope added:
//!
//! | Redis payload                    | delivered as                        |
//! |----------------------------------|-------------------------------------|
//! | `0x00 'b'` + bytes               | binary message `bytes`              |
//! | `0x00 't'` + bytes (UTF-8)       | text message `bytes`                |
//! | anything else starting `0x00`    | binary message, whole payload       |
//! | valid UTF-8 not starting `0x00`  | text message, verbatim              |
//! | other bytes (foreign publishers) | binary message, verbatim            |
//!
//! wsfan publishes text verbatim unless it starts with `0x00` (then `0x00 't'`), and
//! binary always as `0x00 'b'` — so text whose bytes look like an envelope stays text.
//! The NUL marker cannot start any text a chat client types.
//!
//! With history on (`--history-size` > 0), the publish script puts the message's place
//! in its channel's history in front: `0x00 'h' <offset> ':' <epoch> ':'` + the payload
//! as above. [`split_position`] takes it off again; a payload without it (a foreign
//! `PUBLISH`, or `--history-size 0`) is delivered with no position.
//!
//! With `--history-key`, the script authenticates the position and payload:
//! `0x00 'H' <tag: 40 hex> <offset> ':' <epoch> ':'` + the payload, where the tag is
//! `sha1hex(okey ‖ sha1hex(ikey ‖ "<offset>:<epoch>:" ‖ payload))` with `ikey`/`okey`
//! the key XOR the HMAC pads (Redis's Lua has `sha1hex`, no HMAC). Only those who know
//! the key can claim a position; [`HistoryKey::open`] checks it.

use crate::message::{Epoch, StreamPosition};
use crate::ws::Kind;
use bytes::{BufMut, Bytes, BytesMut};

const MARK: u8 = 0x00;
const TEXT: u8 = b't';
const BINARY: u8 = b'b';
const POSITIONED: u8 = b'h';
const AUTHENTICATED: u8 = b'H';

/// The shared secret that authenticates wsfan's positioned envelopes (`--history-key`):
/// its two HMAC-padded forms, as the publish script uses them.
#[derive(Clone)]
pub struct HistoryKey {
    pub ikey: [u8; 64],
    pub okey: [u8; 64],
}

impl std::fmt::Debug for HistoryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HistoryKey(..)")
    }
}

/// What an instance makes of a positioned envelope when it holds a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Authenticated: position and body.
    Genuine(StreamPosition, Bytes),
    /// Claims a position without (or with a wrong) tag: never delivered.
    Forged,
    /// No position at all (a foreign plain `PUBLISH`): delivered as it is.
    Plain(Bytes),
}

impl HistoryKey {
    /// From a secret of 16 to 64 bytes.
    pub fn new(secret: &[u8]) -> Option<HistoryKey> {
        if !(16..=64).contains(&secret.len()) {
            return None;
        }
        let mut ikey = [0x36u8; 64];
        let mut okey = [0x5cu8; 64];
        for (i, b) in secret.iter().enumerate() {
            ikey[i] ^= b;
            okey[i] ^= b;
        }
        Some(HistoryKey { ikey, okey })
    }

    /// The tag of `head` (`<offset>:<epoch>:`) and `body`, as 40 hex digits.
    pub fn tag(&self, head: &[u8], body: &[u8]) -> [u8; 40] {
        use sha1::{Digest, Sha1};
        let mut inner = Sha1::new();
        inner.update(self.ikey);
        inner.update(head);
        inner.update(body);
        let inner = hex40(&inner.finalize());
        let mut outer = Sha1::new();
        outer.update(self.okey);
        outer.update(inner);
        hex40(&outer.finalize())
    }

    /// Checks an envelope's tag.
    pub fn open(&self, raw: &Bytes) -> Opened {
        match raw.get(..2) {
            Some([MARK, AUTHENTICATED]) => {}
            Some([MARK, POSITIONED]) => return Opened::Forged,
            _ => return Opened::Plain(raw.clone()),
        }
        let Some(tag) = raw.get(2..42) else {
            return Opened::Forged;
        };
        let rest = raw.slice(42..);
        let mut as_h = BytesMut::with_capacity(rest.len() + 2);
        as_h.put_u8(MARK);
        as_h.put_u8(POSITIONED);
        as_h.put_slice(&rest);
        let Some((pos, body)) = split_position(&as_h.freeze()) else {
            return Opened::Forged;
        };
        let head_len = rest.len() - body.len();
        let expected = self.tag(&rest[..head_len], &body);
        if crate::jwt::constant_time_eq(&expected, tag) {
            Opened::Genuine(pos, body)
        } else {
            Opened::Forged
        }
    }
}

fn hex40(d: &[u8]) -> [u8; 40] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 40];
    for (i, b) in d.iter().take(20).enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 15) as usize];
    }
    out
}

/// Splits `0x00 'h' <offset> ':' <epoch> ':' body` into the position and the body.
/// `None`: no position (plain Pub/Sub payload), or a malformed one (offset 0 or not a
/// number, not an [`Epoch`]). A position here is only a *claim*: anyone who may PUBLISH
/// can write one; gap repair believes it only once history confirms it.
pub fn split_position(raw: &Bytes) -> Option<(StreamPosition, Bytes)> {
    if raw.starts_with(&[MARK, AUTHENTICATED]) && raw.len() >= 42 {
        // Keyed by a sender while this instance holds no key: the position as a claim,
        // like any other (gap repair believes it only once history confirms it).
        let mut as_h = BytesMut::with_capacity(raw.len() - 40);
        as_h.put_u8(MARK);
        as_h.put_u8(POSITIONED);
        as_h.put_slice(&raw[42..]);
        return split_position(&as_h.freeze());
    }
    let rest = raw.strip_prefix(&[MARK, POSITIONED])?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let offset: u64 = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
    if offset == 0 || rest[0] == b'+' {
        return None;
    }
    let after = &rest[colon + 1..];
    let colon2 = after.iter().position(|&b| b == b':')?;
    let start = 2 + colon + 1;
    let epoch = Epoch::new(raw.slice(start..start + colon2))?;
    Some((
        StreamPosition::new(epoch, offset),
        raw.slice(start + colon2 + 1..),
    ))
}

/// The positioned payload the publish script sends (for tests and tools).
pub fn positioned(pos: &StreamPosition, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(body.len() + pos.epoch.as_bytes().len() + 24);
    b.put_u8(MARK);
    b.put_u8(POSITIONED);
    b.put_slice(pos.offset.to_string().as_bytes());
    b.put_u8(b':');
    b.put_slice(pos.epoch.as_bytes());
    b.put_u8(b':');
    b.put_slice(body);
    b.freeze()
}

/// Encodes a message for PUBLISH.
pub fn encode(kind: Kind, payload: &Bytes) -> Bytes {
    let tag = match kind {
        Kind::Text if payload.first() != Some(&MARK) => return payload.clone(),
        Kind::Text => TEXT,
        Kind::Binary => BINARY,
    };
    let mut b = BytesMut::with_capacity(payload.len() + 2);
    b.put_u8(MARK);
    b.put_u8(tag);
    b.put_slice(payload);
    b.freeze()
}

/// Decodes a Redis payload into the message to deliver.
pub fn decode(raw: Bytes) -> (Kind, Bytes) {
    match (raw.first(), raw.get(1)) {
        (Some(&MARK), Some(&BINARY)) => (Kind::Binary, raw.slice(2..)),
        (Some(&MARK), Some(&TEXT)) if std::str::from_utf8(&raw[2..]).is_ok() => {
            (Kind::Text, raw.slice(2..))
        }
        (Some(&MARK), _) => (Kind::Binary, raw),
        _ if std::str::from_utf8(&raw).is_ok() => (Kind::Text, raw),
        _ => (Kind::Binary, raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(kind: Kind, p: &[u8]) {
        let b = Bytes::copy_from_slice(p);
        assert_eq!(decode(encode(kind, &b)), (kind, b), "{kind:?} {p:?}");
    }

    #[test]
    fn round_trips_keep_kind_and_bytes() {
        for p in [
            &b""[..],
            b"hello",
            b"\0b",
            b"\0t",
            b"\0tx",
            b"\0",
            b"\0bxyz",
            &[0, 0xff],
        ] {
            round(Kind::Binary, p);
            if std::str::from_utf8(p).is_ok() {
                round(Kind::Text, p);
            }
        }
    }

    #[test]
    fn positions_split_off_and_the_rest_decodes_as_before() {
        let pos = StreamPosition::new(Epoch::from_static("k3x9"), 42);
        for (kind, p) in [(Kind::Text, &b"hi:there"[..]), (Kind::Binary, b"\0b\xff")] {
            let body = encode(kind, &Bytes::copy_from_slice(p));
            let raw = positioned(&pos, &body);
            let (got, rest) = split_position(&raw).expect("positioned");
            assert_eq!(got, pos);
            assert_eq!(decode(rest), (kind, Bytes::copy_from_slice(p)));
        }
        for plain in [
            &b"hello"[..],
            b"\0h",
            b"\0hx:e:1",
            b"\0h1:e",
            b"\0t1:e:x",
            b"",
            b"\0h0:e:x",
            b"\0h+1:e:x",
            b"\0h1::x",
            b"\0h1:E:x",
            b"\0h1:a b:x",
        ] {
            assert!(
                split_position(&Bytes::copy_from_slice(plain)).is_none(),
                "{plain:?}"
            );
        }
        let (p, rest) = split_position(&Bytes::from_static(b"\0h7:e:")).expect("empty body");
        assert_eq!(
            (p.offset, p.epoch.as_bytes(), &rest[..]),
            (7, &b"e"[..], &b""[..])
        );
    }

    /// The tag as the publish script computes it, checked against Lua's arithmetic by
    /// the integration tests; here: genuine opens, anything else is forged or plain.
    #[test]
    fn keyed_envelopes_open_only_with_the_right_tag() {
        let key = HistoryKey::new(b"0123456789abcdef").expect("key");
        assert!(HistoryKey::new(b"short").is_none());
        let head = b"7:k3x9:";
        let body = b"hello";
        let tag = key.tag(head, body);
        let mut raw = vec![0u8, b'H'];
        raw.extend_from_slice(&tag);
        raw.extend_from_slice(head);
        raw.extend_from_slice(body);
        let raw = Bytes::from(raw);
        assert_eq!(
            key.open(&raw),
            Opened::Genuine(
                StreamPosition::new(Epoch::from_static("k3x9"), 7),
                Bytes::from_static(b"hello")
            )
        );
        let other = HistoryKey::new(b"fedcba9876543210").expect("key");
        assert_eq!(other.open(&raw), Opened::Forged, "another key");
        let mut tampered = raw.to_vec();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            key.open(&Bytes::from(tampered)),
            Opened::Forged,
            "another body"
        );
        assert_eq!(
            key.open(&Bytes::from_static(b"\0h7:k3x9:x")),
            Opened::Forged
        );
        assert_eq!(key.open(&Bytes::from_static(b"\0Hshort")), Opened::Forged);
        assert_eq!(
            key.open(&Bytes::from_static(b"plain")),
            Opened::Plain(Bytes::from_static(b"plain"))
        );
        // Without a key the keyed envelope is an ordinary claim.
        let (p, b) = split_position(&raw).expect("a claim");
        assert_eq!((p.offset, &b[..]), (7, &b"hello"[..]));
    }

    #[test]
    fn plain_text_is_verbatim_both_ways() {
        let b = Bytes::from_static(b"hello");
        assert_eq!(encode(Kind::Text, &b), b);
        assert_eq!(
            decode(Bytes::from_static(b"hi")),
            (Kind::Text, Bytes::from_static(b"hi"))
        );
        assert_eq!(decode(Bytes::new()), (Kind::Text, Bytes::new()));
        // Foreign publishers: non-UTF-8 and unknown envelopes arrive as binary, whole.
        let raw = Bytes::from_static(&[0xff, 1]);
        assert_eq!(decode(raw.clone()), (Kind::Binary, raw));
        let raw = Bytes::from_static(b"\0z1");
        assert_eq!(decode(raw.clone()), (Kind::Binary, raw));
        let raw = Bytes::from_static(b"\0t\xff");
        assert_eq!(decode(raw.clone()), (Kind::Binary, raw));
    }
}

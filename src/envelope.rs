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
//! The NUL marker cannot start any text a chat client types, and later
//! envelope kinds (offsets, history) can take other letters.

use crate::ws::Kind;
use bytes::{BufMut, Bytes, BytesMut};

const MARK: u8 = 0x00;
const TEXT: u8 = b't';
const BINARY: u8 = b'b';

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

//! Property tests for every parser we own: arbitrary input never panics, and what
//! parses round-trips. Bounded (cases per property below) so CI stays fast; raise
//! `PROPTEST_CASES` to run longer.

mod common;

use bytes::Bytes;
use proptest::prelude::*;
use wsfan::backplane::redis::resp;
use wsfan::ws::{Decoder, Event, Kind};
use wsfan::{envelope, http, hub, jwt};

fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    ProptestConfig {
        cases: n,
        ..ProptestConfig::default()
    }
}

/// A masked client frame (the harness's encoder).
fn frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    common::masked_frame(fin, opcode, payload, mask)
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn http_head_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(Some(h)) = http::parse_head(&bytes) {
            prop_assert!(h.len <= bytes.len());
            let _ = h.keep_alive();
            let _ = h.content_length();
            let _ = h.upgrade_response();
        }
    }

    #[test]
    fn http_head_parser_handles_any_split(path in "/[a-z0-9/._-]{0,40}", split in 0usize..200) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-A: b\r\n\r\n");
        let cut = split.min(req.len());
        let first = http::parse_head(&req.as_bytes()[..cut]);
        if cut < req.len() {
            prop_assert_eq!(first, Ok(None));
        }
        let h = http::parse_head(req.as_bytes()).unwrap().unwrap();
        prop_assert_eq!(h.path, path);
        prop_assert_eq!(h.len, req.len());
    }

    #[test]
    fn ws_decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut buf = bytes.clone();
        let mut out = Vec::new();
        if let Ok(n) = Decoder::default().decode(&mut buf, 1000, &mut out) {
            prop_assert!(n <= bytes.len());
        }
    }

    #[test]
    fn ws_decoder_is_split_invariant(
        msgs in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..8),
        mask in any::<[u8; 4]>(),
        chunk in 1usize..64,
    ) {
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for (text, payload) in &msgs {
            let (op, kind, payload) = if *text {
                let s = String::from_utf8_lossy(payload).into_owned().into_bytes();
                (1, Kind::Text, s)
            } else {
                (2, Kind::Binary, payload.clone())
            };
            // Split each message in two fragments to exercise reassembly.
            let mid = payload.len() / 2;
            wire.extend(frame(false, op, &payload[..mid], mask));
            wire.extend(frame(true, 0, &payload[mid..], mask));
            want.push(Event::Message(kind, Bytes::from(payload)));
        }
        // Feed in chunks, keeping unconsumed bytes like the server does.
        let mut d = Decoder::default();
        let mut pending: Vec<u8> = Vec::new();
        let mut got = Vec::new();
        for piece in wire.chunks(chunk) {
            pending.extend_from_slice(piece);
            let n = d.decode(&mut pending, 1 << 20, &mut got).unwrap();
            pending.drain(..n);
        }
        prop_assert!(pending.is_empty());
        prop_assert_eq!(got, want);
    }

    #[test]
    fn envelope_round_trips(text in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        let (kind, payload) = if text {
            (Kind::Text, Bytes::from(String::from_utf8_lossy(&payload).into_owned()))
        } else {
            (Kind::Binary, Bytes::from(payload))
        };
        prop_assert_eq!(envelope::decode(envelope::encode(kind, &payload)), (kind, payload));
    }

    #[test]
    fn envelope_decode_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
        let (_, p) = envelope::decode(Bytes::from(raw.clone()));
        prop_assert!(p.len() <= raw.len());
    }

    #[test]
    fn jwt_never_panics_and_only_accepts_our_signature(token in "[A-Za-z0-9_.=-]{0,200}", ch in "[a-z]{1,8}") {
        prop_assert!(jwt::authorize(Some(&token), "secret", &ch, 0).is_err());
        let good = jwt::sign(&format!(r#"{{"channels":["{ch}"]}}"#), "secret");
        prop_assert_eq!(jwt::authorize(Some(&good), "secret", &ch, 0), Ok(()));
        prop_assert!(jwt::authorize(Some(&good), "other", &ch, 0).is_err());
    }

    #[test]
    fn channel_names_and_upgrade_paths_agree(name in ".{0,140}") {
        let path = format!("/ws/{name}");
        match wsfan::protocol::plain::upgrade_channel(&path, "d") {
            Ok(ch) => { prop_assert!(hub::valid_channel_name(ch)); prop_assert_eq!(ch, name.as_str()); }
            Err(status) => { prop_assert_eq!(status, 400); prop_assert!(!hub::valid_channel_name(&name)); }
        }
    }

    #[test]
    fn resp_scanner_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let resp::Scan::Complete(n) = resp::scan(&bytes, 64) {
            prop_assert!(n <= bytes.len());
        }
    }

    /// Near-RESP garbage (type bytes, lengths, CRLFs in any order) reaches the deep
    /// paths: never a panic, the buffer stays bounded, the parser gets only whole values.
    #[test]
    fn resp_readbuf_survives_resp_shaped_garbage(
        tokens in proptest::collection::vec(
            prop::sample::select(vec![
                "*", "$", ">", "%", "|", "~", ":", "+", "-", "_", "#", ",", "(", "=", "!",
                "\r\n", "\r", "\n", "0", "1", "2", "3", "-1", "-2", "99", "abc", "",
            ]),
            0..200,
        ),
        chunk in 1usize..64,
    ) {
        let wire: Vec<u8> = tokens.concat().into_bytes();
        // Errors are fine (the link would reconnect); a hang, a panic or growth not.
        let fed = resp::feed(&wire, chunk, 16);
        prop_assert!(fed.biggest <= 16 + 2 * 64 * 1024);
    }

    /// Pub/Sub messages of random sizes around the limit, read in random chunk sizes:
    /// exactly those within the limit come out, in order, and the buffer stays bounded.
    #[test]
    fn resp_readbuf_keeps_small_messages_drops_big_ones_at_any_split(
        sizes in proptest::collection::vec(0usize..300, 1..20),
        chunk in 1usize..700,
    ) {
        let max = 100;
        let mut wire = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            wire.extend(format!("*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n${n}\r\n").bytes());
            wire.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, n));
            wire.extend(b"\r\n");
        }
        let fed = resp::feed(&wire, chunk, max);
        prop_assert_eq!(fed.error, None);
        prop_assert!(fed.biggest <= max + 2 * 64 * 1024);
        let got: Vec<usize> = fed
            .values
            .into_iter()
            .map(|v| match v.expect("parses") {
                redis::Value::Array(items) => match &items[2] {
                    redis::Value::BulkString(p) => p.len(),
                    other => panic!("no payload: {other:?}"),
                },
                other => panic!("not an array: {other:?}"),
            })
            .collect();
        let dropped = fed.dropped;
        let want: Vec<usize> = sizes.iter().copied().filter(|&n| n <= max).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(dropped, sizes.iter().filter(|&&n| n > max).count());
    }
}

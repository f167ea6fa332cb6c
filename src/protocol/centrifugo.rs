//! Centrifugo's JSON client protocol (v2), sans-IO: what the official SDKs send, parsed
//! into plain enums at the edge, and the replies and pushes they expect, encoded. No
//! JSON reaches the rest of the server.
//!
//! A frame holds one or more commands, one JSON object per line; each has an `id`
//! (replies echo it) and one method field: `connect`, `subscribe`, `unsubscribe`,
//! `publish`, `history`. An empty object `{}` is the client's pong to the server's
//! ping (also `{}`). Replies and pushes are JSON objects too, one per frame here.
//!
//! Payloads: a publication's `data` is JSON. A message published by a plain client is
//! its text when that text is JSON, else a JSON string of the text; a binary message is
//! `{"b64": "<base64>"}`. A protocol client's `data` is published as a text message:
//! a JSON string as its text, anything else as its JSON text.

use crate::backplane::Publication;
use crate::message::{Epoch, StreamPosition};
use crate::ws::Kind;
use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Map, Value};

/// Commands per frame, at most (the SDK batches a handful).
pub const MAX_COMMANDS: usize = 128;

/// Error codes of the protocol (replies with `error`), as the SDKs know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unauthorized = 101,
    UnknownChannel = 102,
    PermissionDenied = 103,
    MethodNotFound = 104,
    AlreadySubscribed = 105,
    LimitExceeded = 106,
    BadRequest = 107,
    NotAvailable = 108,
    TokenExpired = 109,
    Unrecoverable = 112,
}

impl ErrorCode {
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnknownChannel => "unknown channel",
            ErrorCode::PermissionDenied => "permission denied",
            ErrorCode::MethodNotFound => "method not found",
            ErrorCode::AlreadySubscribed => "already subscribed",
            ErrorCode::LimitExceeded => "limit exceeded",
            ErrorCode::BadRequest => "bad request",
            ErrorCode::NotAvailable => "not available",
            ErrorCode::TokenExpired => "token expired",
            ErrorCode::Unrecoverable => "unrecoverable position",
        }
    }
}

/// Close codes the server disconnects with (the SDK reconnects on 3000–3499, stops on
/// 3500–3999).
pub const CLOSE_BAD_REQUEST: u16 = 3501;
pub const CLOSE_EXPIRED: u16 = 3005;

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Connect {
        token: Option<String>,
    },
    Subscribe {
        channel: String,
        /// Recover from `since` (the SDK after a reconnect).
        recover: Option<StreamPosition>,
        /// `recover` was asked but without a usable position (the SDK then expects
        /// `recovered: false`).
        recover_asked: bool,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        /// What to publish as a text message: a JSON string's text, else the JSON text.
        data: Bytes,
    },
    History {
        channel: String,
        limit: i64,
        since: Option<StreamPosition>,
        reverse: bool,
    },
}

/// One command with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u32,
    pub cmd: Command,
}

/// One line of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Request(Request),
    /// `{}`: the client's pong.
    Pong,
    /// A command the protocol knows but not with these fields, or a method wsfan does
    /// not serve: answered with this error, the connection goes on.
    Refused(u32, ErrorCode),
}

/// Parses a frame. `Err`: not the protocol at all (not JSON, no id, a huge id, too
/// many commands): the connection is closed with `CLOSE_BAD_REQUEST`.
pub fn parse(frame: &[u8]) -> Result<Vec<Line>, &'static str> {
    let text = std::str::from_utf8(frame).map_err(|_| "not UTF-8")?;
    let mut out = Vec::new();
    for line in text.split('\n').filter(|l| !l.trim().is_empty()) {
        if out.len() >= MAX_COMMANDS {
            return Err("too many commands in one frame");
        }
        let v: Value = serde_json::from_str(line).map_err(|_| "not JSON")?;
        let Value::Object(o) = v else {
            return Err("not a JSON object");
        };
        if o.is_empty() {
            out.push(Line::Pong);
            continue;
        }
        out.push(parse_command(&o)?);
    }
    Ok(out)
}

fn parse_command(o: &Map<String, Value>) -> Result<Line, &'static str> {
    let id = match o.get("id").and_then(Value::as_u64) {
        Some(id) if id > 0 && id <= u32::MAX as u64 => id as u32,
        _ => return Err("missing or bad id"),
    };
    let refused = |code| Ok(Line::Refused(id, code));
    let method = ["connect", "subscribe", "unsubscribe", "publish", "history"]
        .into_iter()
        .find(|m| o.contains_key(*m));
    let Some(method) = method else {
        return refused(ErrorCode::MethodNotFound);
    };
    let Some(Value::Object(args)) = o.get(method) else {
        return refused(ErrorCode::BadRequest);
    };
    let text = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
    let channel = text("channel");
    let cmd = match method {
        "connect" => Command::Connect {
            token: text("token"),
        },
        "subscribe" => {
            let Some(channel) = channel else {
                return refused(ErrorCode::BadRequest);
            };
            let recover_asked = args.get("recover").and_then(Value::as_bool) == Some(true);
            let offset = match args.get("offset") {
                None => 0,
                Some(v) => match v.as_u64() {
                    Some(o) => o,
                    None => return refused(ErrorCode::BadRequest), // negative, fractional
                },
            };
            let epoch = text("epoch").and_then(|e| Epoch::new(Bytes::from(e)));
            let recover = match (recover_asked, epoch) {
                (true, Some(e)) => Some(StreamPosition::new(e, offset)),
                _ => None,
            };
            Command::Subscribe {
                channel,
                recover,
                recover_asked,
            }
        }
        "unsubscribe" => match channel {
            Some(channel) => Command::Unsubscribe { channel },
            None => return refused(ErrorCode::BadRequest),
        },
        "publish" => match (channel, args.get("data")) {
            // A JSON string is published as its text (so plain clients see `hello`,
            // not `"hello"`, and it comes back to protocol clients as the same string);
            // any other JSON as its JSON text.
            (Some(channel), Some(Value::String(text))) => Command::Publish {
                channel,
                data: Bytes::from(text.clone()),
            },
            (Some(channel), Some(data)) => Command::Publish {
                channel,
                data: Bytes::from(data.to_string()),
            },
            _ => return refused(ErrorCode::BadRequest),
        },
        "history" => {
            let Some(channel) = channel else {
                return refused(ErrorCode::BadRequest);
            };
            let limit = args.get("limit").and_then(Value::as_i64).unwrap_or(0);
            let since = args.get("since").and_then(Value::as_object).and_then(|s| {
                let e = s.get("epoch").and_then(Value::as_str)?;
                let o = s.get("offset").and_then(Value::as_u64).unwrap_or(0);
                Some(StreamPosition::new(
                    Epoch::new(Bytes::from(e.to_string()))?,
                    o,
                ))
            });
            Command::History {
                channel,
                limit,
                since,
                reverse: args.get("reverse").and_then(Value::as_bool) == Some(true),
            }
        }
        _ => return refused(ErrorCode::MethodNotFound),
    };
    Ok(Line::Request(Request { id, cmd }))
}

/// A message's payload as the protocol's `data` (JSON text).
pub fn data_json(kind: Kind, payload: &[u8]) -> String {
    match kind {
        Kind::Text if serde_json::from_slice::<Value>(payload).is_ok() => {
            String::from_utf8_lossy(payload).into_owned()
        }
        Kind::Text => Value::String(String::from_utf8_lossy(payload).into_owned()).to_string(),
        Kind::Binary => json!({
            "b64": base64::engine::general_purpose::STANDARD.encode(payload)
        })
        .to_string(),
    }
}

fn publication(data: &str, pos: Option<&StreamPosition>) -> String {
    match pos {
        Some(p) => format!("{{\"data\":{data},\"offset\":{}}}", p.offset),
        None => format!("{{\"data\":{data}}}"),
    }
}

/// The push of one publication, encoded once per message per channel.
pub fn pub_push(channel: &str, kind: Kind, payload: &[u8], pos: Option<&StreamPosition>) -> String {
    format!(
        "{{\"push\":{{\"channel\":{},\"pub\":{}}}}}",
        Value::String(channel.to_string()),
        publication(&data_json(kind, payload), pos)
    )
}

pub fn connect_reply(id: u32, client: &str, ping_secs: u64) -> String {
    json!({"id": id, "connect": {
        "client": client, "version": concat!("wsfan ", env!("CARGO_PKG_VERSION")),
        "ping": ping_secs, "pong": true
    }})
    .to_string()
}

/// The subscribe reply: `top` where the channel is (or the position recovered from),
/// and the publications recovered.
pub fn subscribe_reply(
    id: u32,
    pos: Option<&StreamPosition>,
    publications: &[Publication],
    was_recovering: bool,
    recovered: bool,
) -> String {
    subscribe_reply_with(
        id,
        pos,
        &publications_json(publications),
        was_recovering,
        recovered,
    )
}

/// The publications of a reply, encoded (once per read when clients share one).
pub fn publications_json(publications: &[Publication]) -> String {
    let pubs: Vec<String> = publications
        .iter()
        .map(|p| publication(&data_json(p.kind, &p.payload), Some(&p.pos)))
        .collect();
    pubs.join(",")
}

/// The subscribe reply around publications already encoded by [`publications_json`].
pub fn subscribe_reply_with(
    id: u32,
    pos: Option<&StreamPosition>,
    pubs: &str,
    was_recovering: bool,
    recovered: bool,
) -> String {
    let (epoch, offset) = match pos {
        Some(p) => (p.epoch.to_string(), p.offset),
        None => (String::new(), 0),
    };
    format!(
        "{{\"id\":{id},\"subscribe\":{{\"recoverable\":true,\"positioned\":true,\"epoch\":{},\"offset\":{offset},\"publications\":[{}],\"was_recovering\":{was_recovering},\"recovered\":{recovered}}}}}",
        Value::String(epoch),
        pubs
    )
}

/// `{"id":n,"<method>":{}}`.
pub fn empty_reply(id: u32, method: &str) -> String {
    format!("{{\"id\":{id},\"{method}\":{{}}}}")
}

pub fn history_reply(
    id: u32,
    publications: &[Publication],
    top: Option<&StreamPosition>,
) -> String {
    let pubs: Vec<String> = publications
        .iter()
        .map(|p| publication(&data_json(p.kind, &p.payload), Some(&p.pos)))
        .collect();
    let (epoch, offset) = match top {
        Some(p) => (p.epoch.to_string(), p.offset),
        None => (String::new(), 0),
    };
    format!(
        "{{\"id\":{id},\"history\":{{\"publications\":[{}],\"epoch\":{},\"offset\":{offset}}}}}",
        pubs.join(","),
        Value::String(epoch)
    )
}

pub fn error_reply(id: u32, code: ErrorCode) -> String {
    json!({"id": id, "error": {"code": code as u16, "message": code.message()}}).to_string()
}

/// `{"push":{"disconnect":{"code":n,"reason":r}}}`: sent before the connection is
/// closed by the server (the SDK reconnects unless the code is 3500–3999).
pub fn disconnect_push(code: u16, reason: &str) -> String {
    json!({"push": {"disconnect": {"code": code, "reason": reason}}}).to_string()
}

/// `{"push":{"channel":c,"unsubscribe":{"code":n,"reason":r}}}`.
pub fn unsubscribe_push(channel: &str, code: u16, reason: &str) -> String {
    json!({"push": {"channel": channel, "unsubscribe": {"code": code, "reason": reason}}})
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_sdk_sends_parses() {
        let frame = br#"{"id":1,"connect":{"token":"t","name":"js"}}
{"id":2,"subscribe":{"channel":"chat","recover":true,"offset":5,"epoch":"abc","recoverable":true,"positioned":true,"flag":1}}
{}
{"id":3,"publish":{"channel":"chat","data":{"text":"hi"}}}
{"id":4,"unsubscribe":{"channel":"chat"}}
{"id":5,"history":{"channel":"chat","limit":10,"since":{"offset":2,"epoch":"abc"},"reverse":false}}"#;
        let got = parse(frame).expect("parses");
        assert_eq!(got.len(), 6);
        assert_eq!(
            got[1],
            Line::Request(Request {
                id: 2,
                cmd: Command::Subscribe {
                    channel: "chat".into(),
                    recover: Some(StreamPosition::new(Epoch::from_static("abc"), 5)),
                    recover_asked: true
                }
            })
        );
        assert_eq!(got[2], Line::Pong);
        assert!(
            matches!(&got[3], Line::Request(Request { cmd: Command::Publish { data, .. }, .. }) if &data[..] == br#"{"text":"hi"}"#)
        );
    }

    #[test]
    fn bad_input_is_refused_or_ends_the_connection() {
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            b"{\"connect\":{}}",
            b"{\"id\":-1,\"connect\":{}}",
            b"{\"id\":99999999999,\"connect\":{}}",
            b"{\"id\":1.5,\"connect\":{}}",
            b"\xff",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let bomb = "[".repeat(100_000);
        assert!(parse(format!("{{\"id\":1,\"publish\":{bomb}}}").as_bytes()).is_err());
        let many = "{}\n".repeat(MAX_COMMANDS + 1);
        assert!(parse(many.as_bytes()).is_err());
        for (frame, code) in [
            (&b"{\"id\":7,\"rpc\":{}}"[..], ErrorCode::MethodNotFound),
            (b"{\"id\":7,\"subscribe\":{}}", ErrorCode::BadRequest),
            (
                b"{\"id\":7,\"subscribe\":{\"channel\":5}}",
                ErrorCode::BadRequest,
            ),
            (
                b"{\"id\":7,\"publish\":{\"channel\":\"c\"}}",
                ErrorCode::BadRequest,
            ),
            (b"{\"id\":7,\"subscribe\":\"x\"}", ErrorCode::BadRequest),
            (
                b"{\"id\":7,\"subscribe\":{\"channel\":\"c\",\"recover\":true,\"offset\":-5,\"epoch\":\"e\"}}",
                ErrorCode::BadRequest,
            ),
        ] {
            assert_eq!(parse(frame), Ok(vec![Line::Refused(7, code)]), "{frame:?}");
        }
    }

    #[test]
    fn payloads_map_to_json_data() {
        assert_eq!(data_json(Kind::Text, br#"{"a":1}"#), r#"{"a":1}"#);
        assert_eq!(data_json(Kind::Text, b"hello"), r#""hello""#);
        assert_eq!(data_json(Kind::Binary, &[0, 255]), r#"{"b64":"AP8="}"#);
        let p = pub_push(
            "c",
            Kind::Text,
            b"hi",
            Some(&StreamPosition::new(Epoch::from_static("e"), 3)),
        );
        assert_eq!(
            p,
            r#"{"push":{"channel":"c","pub":{"data":"hi","offset":3}}}"#
        );
        let v: Value =
            serde_json::from_str(&subscribe_reply(2, None, &[], true, false)).expect("json");
        assert_eq!(v["subscribe"]["recovered"], false);
        assert_eq!(v["subscribe"]["was_recovering"], true);
    }
}

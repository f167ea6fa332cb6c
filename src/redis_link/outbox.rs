//! The publish outbox, sans-IO: publishes waiting for the link (bounded, oldest dropped),
//! publishes written and waiting for their reply, and what each reply on the publish link
//! answers (publishes, PINGs, script loads, history reads). Inputs are publishes,
//! replies and the link going up or down; outputs are commands and counters. No
//! sockets, no clock.
//!
//! With history on, a publish is a call of the publish script (`history`), which needs
//! its SHA: the scripts are loaded (`SCRIPT LOAD`) each time the link comes up, and
//! nothing is sent before both SHAs are back. A `NOSCRIPT` reply (an operator ran
//! `SCRIPT FLUSH`) ends the link; the next one loads them again and re-sends.

use super::history::{self, History, Shas};
use super::positions::{Range, ReadReq};
use bytes::Bytes;
use redis::Value;
use std::collections::VecDeque;

/// Times one publish is written to Redis at most. A publish whose reply never came is
/// sent again after a reconnect; one that has been sent this often without a reply (a
/// Redis that executes it and then answers garbage) is dropped and counted in
/// `wsfan_redis_publish_abandoned_total`, instead of being delivered again forever.
pub const MAX_PUBLISH_SENDS: u8 = 3;
/// Publishes of one channel carried by one history script call, at most.
pub const BATCH_MESSAGES: usize = 64;
/// Payload bytes one history script call carries, at most (beyond its first message).
pub const BATCH_BYTES: usize = 256 * 1024;

/// What the next reply on the publish link answers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// One PUBLISH, or one script call carrying this many publishes of one channel.
    Publish(usize),
    Ping,
    LoadPublish,
    LoadRead,
    Read(ReadReq),
}

/// A publish not yet acknowledged by Redis.
#[derive(Debug)]
struct Outgoing {
    /// Redis channel (prefix included).
    channel: Box<str>,
    body: Bytes,
    /// Times it was written to Redis so far (bounded by `MAX_PUBLISH_SENDS`).
    sends: u8,
    /// This process's publish number: the script drops a re-send already applied.
    seq: u64,
}

/// What a reply on the publish link was.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Published,
    /// Redis refused that publish (`-ERR …`): it is not sent again.
    Refused(String),
    Pong,
    /// Both scripts are loaded: publishes and reads may go.
    Loaded,
    /// Nothing to act on (the first of the two scripts loaded).
    Nothing,
    /// A history read's answer (`Err`: Redis refused it; the gap cannot be read).
    Range(ReadReq, Result<Range, String>),
}

/// Publishes on their way to Redis.
#[derive(Debug)]
pub struct Outbox {
    /// `--redis-buffer-messages` and `--redis-buffer-bytes`.
    max_msgs: usize,
    max_bytes: usize,
    /// Not yet written.
    waiting: VecDeque<Outgoing>,
    /// Written, reply not yet received (sent again if the link drops).
    inflight: VecDeque<Outgoing>,
    expect: VecDeque<Expect>,
    /// Body bytes in `waiting` and `inflight`.
    bytes: usize,
    pub dropped: u64,
    pub abandoned: u64,
    pub published: u64,
    /// `Some`: publishes go through the history script.
    history: Option<History>,
    shas: Shas,
    /// The last publish number given out.
    seq: u64,
}

impl Outbox {
    pub fn new(max_msgs: usize, max_bytes: usize) -> Outbox {
        Outbox {
            max_msgs,
            max_bytes,
            waiting: VecDeque::new(),
            inflight: VecDeque::new(),
            expect: VecDeque::new(),
            bytes: 0,
            dropped: 0,
            abandoned: 0,
            published: 0,
            history: None,
            shas: Shas::default(),
            seq: 0,
        }
    }

    /// Publishes go through the history script.
    pub fn with_history(mut self, h: History) -> Outbox {
        self.history = Some(h);
        self
    }

    pub fn history_on(&self) -> bool {
        self.history.is_some()
    }

    /// The link is up: the commands to send first (loading the scripts).
    pub fn on_up(&mut self) -> Vec<redis::Cmd> {
        if self.history.is_none() {
            return Vec::new();
        }
        self.expect.push_back(Expect::LoadPublish);
        self.expect.push_back(Expect::LoadRead);
        [history::PUBLISH_SCRIPT, history::READ_SCRIPT]
            .iter()
            .map(|s| redis::cmd("SCRIPT").arg("LOAD").arg(*s).clone())
            .collect()
    }

    /// Whether publishes and reads can be sent (scripts loaded, or history off).
    pub fn can_send(&self) -> bool {
        self.history.is_none() || self.shas.loaded()
    }

    /// A history read of `redis_channel`, if the scripts are loaded.
    pub fn send_read(&mut self, redis_channel: &str, req: ReadReq) -> Option<redis::Cmd> {
        let (Some(h), Some(sha)) = (&self.history, &self.shas.read) else {
            return None;
        };
        let cmd = h.read(sha, redis_channel, &req);
        self.expect.push_back(Expect::Read(req));
        Some(cmd)
    }

    /// Queues a publish; over the limits the oldest waiting ones are dropped (counted).
    /// Returns whether anything was dropped.
    pub fn push(&mut self, channel: String, body: Bytes) -> bool {
        let mut dropped = false;
        while self.over_limit(body.len()) {
            let Some(old) = self.waiting.pop_front() else {
                break;
            };
            self.bytes -= old.body.len();
            self.dropped += 1;
            dropped = true;
        }
        if self.over_limit(body.len()) {
            // Everything buffered is already in flight: this one cannot be kept.
            self.dropped += 1;
            return true;
        }
        self.bytes += body.len();
        self.seq += 1;
        self.waiting.push_back(Outgoing {
            channel: channel.into(),
            body,
            sends: 0,
            seq: self.seq,
        });
        dropped
    }

    /// Messages and bytes that fit before a limit.
    pub fn room(&self) -> (usize, usize) {
        (
            self.max_msgs.saturating_sub(self.len()),
            self.max_bytes.saturating_sub(self.bytes),
        )
    }

    /// Half the message or byte limit is in use (paused client reads resume below).
    pub fn half_full(&self) -> bool {
        self.len() * 2 >= self.max_msgs || self.bytes * 2 >= self.max_bytes
    }

    /// Whether `extra` more bytes would go over a limit.
    pub fn over_limit(&self, extra: usize) -> bool {
        self.len() + 1 > self.max_msgs || self.bytes + extra > self.max_bytes
    }

    /// The next publish to write (moved in flight), while fewer than the message limit
    /// are in flight.
    ///
    /// With history, consecutive waiting publishes of one channel go in one script call
    /// (up to `BATCH_MESSAGES` / `BATCH_BYTES`): the script's fixed cost (the Lua call,
    /// the epoch, the dedupe key, the TTLs) is paid once per batch, which is what lets
    /// one Redis keep up with a busy channel (bench: ~23 µs of Redis per message alone,
    /// ~9 µs in batches of 16).
    pub fn send_next(&mut self) -> Option<redis::Cmd> {
        if self.inflight.len() >= self.max_msgs || !self.can_send() {
            return None;
        }
        let first = self.waiting.pop_front()?;
        let (Some(h), Some(sha)) = (&self.history, &self.shas.publish) else {
            let cmd = redis::cmd("PUBLISH")
                .arg(&*first.channel)
                .arg(&first.body[..])
                .clone();
            self.launch(first);
            self.expect.push_back(Expect::Publish(1));
            return Some(cmd);
        };
        let mut batch = vec![first];
        let mut bytes = batch[0].body.len();
        while let Some(next) = self.waiting.front() {
            if batch.len() >= BATCH_MESSAGES
                || bytes + next.body.len() > BATCH_BYTES
                || self.inflight.len() + batch.len() >= self.max_msgs
                || next.channel != batch[0].channel
            {
                break;
            }
            bytes += next.body.len();
            batch.extend(self.waiting.pop_front());
        }
        let items: Vec<(u64, &[u8])> = batch.iter().map(|m| (m.seq, &m.body[..])).collect();
        let cmd = h.publish(sha, &batch[0].channel, &items);
        self.expect.push_back(Expect::Publish(batch.len()));
        for m in batch {
            self.launch(m);
        }
        Some(cmd)
    }

    fn launch(&mut self, mut m: Outgoing) {
        m.sends += 1;
        self.inflight.push_back(m);
    }

    /// A periodic PING was written on the publish link.
    pub fn ping_sent(&mut self) {
        self.expect.push_back(Expect::Ping);
    }

    /// A reply on the publish link (after its handshake). An error means the link no
    /// longer knows what answers what and must be dropped.
    pub fn on_reply(&mut self, v: Value) -> Result<Reply, String> {
        match self.expect.pop_front() {
            Some(Expect::Publish(n)) => {
                let reply = match v {
                    Value::Int(_) => Reply::Published,
                    Value::ServerError(e) if e.code() == "NOSCRIPT" => {
                        return Err("the publish script is gone (NOSCRIPT)".to_string())
                    }
                    Value::ServerError(e) => Reply::Refused(format!("{e:?}")),
                    other => return Err(format!("unexpected PUBLISH reply {other:?}")),
                };
                for _ in 0..n {
                    if let Some(out) = self.inflight.pop_front() {
                        self.bytes -= out.body.len();
                        if reply == Reply::Published {
                            self.published += 1;
                        }
                    }
                }
                Ok(reply)
            }
            Some(Expect::Ping) => match v {
                Value::SimpleString(s) if s.eq_ignore_ascii_case("PONG") => Ok(Reply::Pong),
                other => Err(format!("unexpected PING reply {other:?}")),
            },
            Some(which @ (Expect::LoadPublish | Expect::LoadRead)) => {
                let sha = match v {
                    Value::BulkString(b) => String::from_utf8(b).map_err(|e| e.to_string())?,
                    other => return Err(format!("SCRIPT LOAD failed: {other:?}")),
                };
                if which == Expect::LoadPublish {
                    self.shas.publish = Some(sha);
                } else {
                    self.shas.read = Some(sha);
                }
                Ok(if self.shas.loaded() {
                    Reply::Loaded
                } else {
                    Reply::Nothing
                })
            }
            Some(Expect::Read(req)) => match v {
                Value::ServerError(e) if e.code() == "NOSCRIPT" => {
                    Err("the history read script is gone (NOSCRIPT)".to_string())
                }
                Value::ServerError(e) => Ok(Reply::Range(req, Err(format!("{e:?}")))),
                other => Ok(Reply::Range(req, Ok(history::parse_range(other)?))),
            },
            None => Err(format!("unexpected reply {v:?}")),
        }
    }

    /// The link went down: unanswered publishes go back to the front, in order, unless
    /// they were sent `MAX_PUBLISH_SENDS` times already (then dropped and counted).
    /// Returns the channels of the dropped ones (for the log).
    pub fn on_down(&mut self) -> Vec<Box<str>> {
        let mut abandoned = Vec::new();
        while let Some(m) = self.inflight.pop_back() {
            if m.sends >= MAX_PUBLISH_SENDS {
                self.bytes -= m.body.len();
                self.abandoned += 1;
                abandoned.push(m.channel);
            } else {
                self.waiting.push_front(m);
            }
        }
        self.expect.clear();
        self.shas = Shas::default();
        abandoned
    }

    /// Publishes not yet acknowledged (waiting or in flight).
    pub fn len(&self) -> usize {
        self.waiting.len() + self.inflight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn sent(o: &mut Outbox) -> Vec<String> {
        std::iter::from_fn(|| o.send_next())
            .map(|c| String::from_utf8(c.get_packed_command()).unwrap())
            .collect()
    }

    #[test]
    fn replies_are_matched_in_order_and_pings_interleave() {
        let mut o = Outbox::new(10, 1000);
        o.push("c".into(), body("one"));
        o.push("c".into(), body("two"));
        assert_eq!(sent(&mut o).len(), 2);
        o.ping_sent();
        assert_eq!(o.on_reply(Value::Int(1)), Ok(Reply::Published));
        let refused = redis::parse_redis_value(b"-ERR nope\r\n").expect("an error reply");
        assert!(matches!(o.on_reply(refused), Ok(Reply::Refused(_))));
        assert_eq!(
            o.on_reply(Value::SimpleString("PONG".into())),
            Ok(Reply::Pong)
        );
        assert!(o.is_empty() && o.bytes() == 0);
        assert_eq!(o.published, 1);
        assert!(
            o.on_reply(Value::Int(1)).is_err(),
            "a reply nobody asked for"
        );
    }

    #[test]
    fn garbage_where_a_publish_reply_belongs_is_an_error() {
        for garbage in [
            Value::SimpleString("SURPRISE".into()),
            Value::Nil,
            Value::Okay,
            Value::Array(vec![]),
        ] {
            let mut o = Outbox::new(10, 1000);
            o.push("c".into(), body("x"));
            sent(&mut o);
            assert!(o.on_reply(garbage.clone()).is_err(), "{garbage:?}");
        }
        let mut o = Outbox::new(10, 1000);
        o.ping_sent();
        assert!(o.on_reply(Value::Int(0)).is_err(), "not a PONG");
    }

    #[test]
    fn unanswered_publishes_are_sent_again_in_order_at_most_three_times() {
        let mut o = Outbox::new(10, 1000);
        o.push("c".into(), body("a"));
        o.push("c".into(), body("b"));
        for round in 1..=MAX_PUBLISH_SENDS {
            let s = sent(&mut o);
            assert_eq!(s.len(), 2, "round {round}");
            assert!(s[0].ends_with("$1\r\na\r\n") && s[1].ends_with("$1\r\nb\r\n"));
            let dropped = o.on_down();
            if round < MAX_PUBLISH_SENDS {
                assert!(dropped.is_empty());
                assert_eq!(o.len(), 2);
            } else {
                assert_eq!(dropped.len(), 2);
            }
        }
        assert!(o.is_empty() && o.bytes() == 0);
        assert_eq!(o.abandoned, 2);
        assert!(o.send_next().is_none());
    }

    fn with_scripts() -> Outbox {
        let mut o = Outbox::new(100, 10_000_000).with_history(History {
            size: 10,
            ttl: 60,
            instance: "i".into(),
            max_entry: 100,
        });
        assert_eq!(o.on_up().len(), 2, "SCRIPT LOAD twice");
        assert!(
            !o.can_send() && o.send_next().is_none(),
            "not before the SHAs"
        );
        assert_eq!(
            o.on_reply(Value::BulkString(b"sha1".to_vec())),
            Ok(Reply::Nothing)
        );
        assert_eq!(
            o.on_reply(Value::BulkString(b"sha2".to_vec())),
            Ok(Reply::Loaded)
        );
        o
    }

    #[test]
    fn a_channels_consecutive_publishes_go_in_one_script_call() {
        let mut o = with_scripts();
        for (ch, b) in [("a", "1"), ("a", "2"), ("a", "3"), ("b", "4"), ("a", "5")] {
            o.push(ch.into(), body(b));
        }
        let s = sent(&mut o);
        assert_eq!(s.len(), 3, "a×3, b, a: {s:?}");
        assert!(s[0].contains("EVALSHA") && s[0].contains("sha1"));
        assert!(s[0].contains("\r\n$1\r\n3\r\n"), "n = 3: {}", s[0]);
        // One reply acknowledges the whole batch.
        assert_eq!(o.on_reply(Value::Int(3)), Ok(Reply::Published));
        assert_eq!((o.len(), o.published), (2, 3));
        // Lost with the link: re-sent in order, with their own sequence numbers.
        o.on_down();
        let mut o2 = o;
        o2.on_up();
        o2.on_reply(Value::BulkString(b"s".to_vec())).expect("load");
        o2.on_reply(Value::BulkString(b"r".to_vec())).expect("load");
        let s = sent(&mut o2);
        assert_eq!(s.len(), 2);
        assert!(
            s[0].contains("$1\r\n4\r\n$1\r\n4\r\n"),
            "seq 4, body 4: {}",
            s[0]
        );
        let refused = redis::parse_redis_value(b"-NOSCRIPT gone\r\n").expect("error");
        assert!(o2.on_reply(refused).is_err(), "NOSCRIPT ends the link");
    }

    #[test]
    fn batches_are_bounded() {
        let mut o = with_scripts();
        for i in 0..(BATCH_MESSAGES + 1) {
            o.push("a".into(), body(&format!("{i}")));
        }
        assert_eq!(sent(&mut o).len(), 2, "{BATCH_MESSAGES} then 1");
        let mut o = with_scripts();
        let big = "x".repeat(BATCH_BYTES / 2 - 10);
        for _ in 0..3 {
            o.push("a".into(), body(&big));
        }
        assert_eq!(sent(&mut o).len(), 2, "by bytes: 2 + 1");
    }

    #[test]
    fn limits_drop_the_oldest_waiting_and_count_it() {
        let mut o = Outbox::new(3, 1000);
        for i in 0..5 {
            o.push("c".into(), body(&format!("{i}")));
        }
        assert_eq!(o.len(), 3);
        assert_eq!(o.dropped, 2);
        let s = sent(&mut o);
        assert!(s[0].ends_with("$1\r\n2\r\n"), "oldest kept is 2: {s:?}");
        // All in flight: a new one cannot displace them.
        assert!(o.push("c".into(), body("x")), "dropped");
        assert_eq!(o.len(), 3);
        let mut o = Outbox::new(100, 10);
        o.push("c".into(), body("123456"));
        o.push("c".into(), body("789012"));
        assert_eq!(o.bytes(), 6, "byte limit");
    }
}

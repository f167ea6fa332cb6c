//! The publish outbox, sans-IO: publishes waiting for the link (bounded, oldest dropped),
//! publishes written and waiting for their reply, and what each reply on the publish link
//! answers. Inputs are publishes, replies and the link going down; outputs are PUBLISH
//! commands and counters. No sockets, no clock.

use bytes::Bytes;
use redis::Value;
use std::collections::VecDeque;

/// Times one publish is written to Redis at most. A publish whose reply never came is
/// sent again after a reconnect; one that has been sent this often without a reply (a
/// Redis that executes it and then answers garbage) is dropped and counted in
/// `wsfan_redis_publish_abandoned_total`, instead of being delivered again forever.
pub const MAX_PUBLISH_SENDS: u8 = 3;

/// What the next reply on the publish link answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Publish,
    Ping,
}

/// A publish not yet acknowledged by Redis.
#[derive(Debug)]
struct Outgoing {
    /// Redis channel (prefix included).
    channel: Box<str>,
    body: Bytes,
    /// Times it was written to Redis so far (bounded by `MAX_PUBLISH_SENDS`).
    sends: u8,
}

/// What a reply on the publish link was.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Published,
    /// Redis refused that publish (`-ERR …`): it is not sent again.
    Refused(String),
    Pong,
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
        }
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
        self.waiting.push_back(Outgoing {
            channel: channel.into(),
            body,
            sends: 0,
        });
        dropped
    }

    /// Whether `extra` more bytes would go over a limit.
    pub fn over_limit(&self, extra: usize) -> bool {
        self.len() + 1 > self.max_msgs || self.bytes + extra > self.max_bytes
    }

    /// The next publish to write (moved in flight), while fewer than the message limit
    /// are in flight.
    pub fn send_next(&mut self) -> Option<redis::Cmd> {
        if self.inflight.len() >= self.max_msgs {
            return None;
        }
        let mut m = self.waiting.pop_front()?;
        let cmd = redis::cmd("PUBLISH")
            .arg(&*m.channel)
            .arg(&m.body[..])
            .clone();
        m.sends += 1;
        self.expect.push_back(Expect::Publish);
        self.inflight.push_back(m);
        Some(cmd)
    }

    /// A periodic PING was written on the publish link.
    pub fn ping_sent(&mut self) {
        self.expect.push_back(Expect::Ping);
    }

    /// A reply on the publish link (after its handshake). An error means the link no
    /// longer knows what answers what and must be dropped.
    pub fn on_reply(&mut self, v: Value) -> Result<Reply, String> {
        match self.expect.pop_front() {
            Some(Expect::Publish) => {
                let reply = match v {
                    Value::Int(_) => Reply::Published,
                    Value::ServerError(e) => Reply::Refused(format!("{e:?}")),
                    other => return Err(format!("unexpected PUBLISH reply {other:?}")),
                };
                if let Some(out) = self.inflight.pop_front() {
                    self.bytes -= out.body.len();
                }
                if reply == Reply::Published {
                    self.published += 1;
                }
                Ok(reply)
            }
            Some(Expect::Ping) => match v {
                Value::SimpleString(s) if s.eq_ignore_ascii_case("PONG") => Ok(Reply::Pong),
                other => Err(format!("unexpected PING reply {other:?}")),
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

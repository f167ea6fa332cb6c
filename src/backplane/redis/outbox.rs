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
use super::recovery::RecoverReq;
use super::topology;
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
    /// One PUBLISH (`[1]`), or one script call carrying, per channel in order, this
    /// many publishes.
    Publish(Vec<usize>),
    Ping,
    /// `INFO replication`: the replication id the publish script is given.
    Node,
    /// `CLUSTER MYID` (sharded links).
    MyId,
    /// `CLUSTER SHARDS` (`false`) or `CLUSTER SLOTS` (`true`).
    Topology(bool),
    LoadPublish,
    LoadRead,
    Read(ReadReq),
    Recover(RecoverReq),
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
    /// Handed to another shard while in flight here: its reply is awaited (replies
    /// match by position), nothing else; never sent again from here.
    moved: bool,
}

/// Error codes by which Redis says "not now" or "not here" (a replica, loading, a
/// script running too long, out of memory, a cluster reconfiguring): the link is the
/// problem, not the command. The link is dropped and reconnected with backoff (a managed
/// endpoint's DNS may name the new primary by then), and every unanswered publish is
/// sent again, in order, without counting against `MAX_PUBLISH_SENDS`.
pub const NOT_NOW: &[&str] = &[
    "READONLY",
    "MASTERDOWN",
    "LOADING",
    "BUSY",
    "OOM",
    "NOREPLICAS",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "MOVED",
    "ASK",
    "NOSCRIPT",
];

/// Why Redis refused one command for good (any code not in [`NOT_NOW`]): that publish
/// (or read) alone is dropped, counted by reason; other channels go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A key of the channel holds another type (a neighbour app's key).
    WrongType,
    /// The ACL user may not run the command or touch the key.
    NoPerm,
    /// The channel's history meta hash is corrupt (read script).
    BadMeta,
    /// Any other error, e.g. a script error.
    Other,
}

impl Refused {
    pub const ALL: [Refused; 4] = [
        Refused::WrongType,
        Refused::NoPerm,
        Refused::BadMeta,
        Refused::Other,
    ];

    /// Its metrics label: the seam's list, in this enum's order.
    pub fn label(self) -> &'static str {
        crate::backplane::REFUSED_REASONS[self as usize]
    }

    fn of(code: &str) -> Refused {
        match code {
            "WRONGTYPE" => Refused::WrongType,
            "NOPERM" => Refused::NoPerm,
            "BADMETA" => Refused::BadMeta,
            _ => Refused::Other,
        }
    }
}

/// What a reply on the publish link was.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// `flags` from the publish script (see `history::PUBLISH_SCRIPT`): 1 = a corrupt
    /// dedupe value was overwritten, 2 = a corrupt meta hash began a new epoch.
    Published {
        flags: u8,
    },
    /// Redis refused that publish for good: it is not sent again (counted by reason).
    Refused(Refused, String),
    Pong,
    /// Both scripts are loaded: publishes and reads may go.
    Loaded,
    /// Nothing to act on (the first of the two scripts loaded).
    Nothing,
    /// A history read's answer (`Err`: Redis refused it, or answered nonsense, for
    /// this channel; the link goes on).
    Range(ReadReq, Result<Range, (Refused, String)>),
    /// A `Backplane::history` read's answer (the same shapes).
    Recovered(RecoverReq, Result<Range, (Refused, String)>),
    /// A cluster topology answer (`CLUSTER SLOTS` if the flag), or why not (a
    /// refusal's text, or a reply that does not parse).
    Topology(bool, Result<topology::Topology, String>),
}

/// The link must be dropped: a "not now" refusal (`NOT_NOW`; `code` set, `/readyz`
/// shows it until a write succeeds) or a reply that breaks the pairing of replies.
#[derive(Debug, PartialEq, Eq)]
pub struct LinkDown {
    pub code: Option<String>,
    pub why: String,
}

impl From<String> for LinkDown {
    fn from(why: String) -> LinkDown {
        LinkDown { code: None, why }
    }
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
    /// Publishes Redis refused for good, by `Refused` reason.
    pub refused: [u64; 4],
    /// Corrupt dedupe values and meta hashes the publish script overwrote.
    pub corrupt_dedupe: u64,
    pub corrupt_meta: u64,
    /// The last "not now" refusal (`NOT_NOW`), until a publish succeeds again.
    pub not_now: Option<String>,
    /// `Some`: publishes go through the history script.
    history: Option<History>,
    shas: Shas,
    /// The last publish number given out, shared by every shard's outbox (one
    /// instance id, one sequence: a channel moved between shards keeps its dedupe).
    seq: std::rc::Rc<std::cell::Cell<u64>>,
    /// Redis Cluster: `SPUBLISH` in the script, and one slot per call.
    sharded: bool,
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
            refused: [0; 4],
            corrupt_dedupe: 0,
            corrupt_meta: 0,
            not_now: None,
            history: None,
            shas: Shas::default(),
            seq: Default::default(),
            sharded: false,
        }
    }

    /// Shard channels: the script `SPUBLISH`es, and a call carries channels of one
    /// slot only; `seq` is the sequence shared with the other shards' outboxes.
    pub fn sharded(mut self, seq: std::rc::Rc<std::cell::Cell<u64>>) -> Outbox {
        self.sharded = true;
        self.seq = seq;
        self
    }

    /// Takes out every publish of `channel` (waiting or in flight, in order) for
    /// another shard's outbox: the channel's slot moved. In-flight ones will get no
    /// reply here that counts (their replies are matched by position, so they stay
    /// as placeholders); the other outbox sends them again (the script's dedupe drops
    /// any this Redis applied and handed over).
    pub fn take_channel(&mut self, channel: &str) -> Vec<(Bytes, u64)> {
        let mut out = Vec::new();
        for m in self.inflight.iter_mut() {
            if &*m.channel == channel && !m.moved {
                m.moved = true;
                out.push((std::mem::take(&mut m.body), m.seq));
            }
        }
        let mut keep = VecDeque::new();
        for m in std::mem::take(&mut self.waiting) {
            if &*m.channel == channel {
                out.push((m.body, m.seq));
            } else {
                keep.push_back(m);
            }
        }
        self.waiting = keep;
        out.sort_by_key(|(_, seq)| *seq);
        self.bytes -= out.iter().map(|(b, _)| b.len()).sum::<usize>();
        out
    }

    /// Publishes handed over by another shard's outbox (`take_channel`), before the
    /// ones waiting here (they are older).
    pub fn give_channel(&mut self, channel: &str, items: Vec<(Bytes, u64)>) {
        for (body, seq) in items.into_iter().rev() {
            self.bytes += body.len();
            self.waiting.push_front(Outgoing {
                channel: channel.into(),
                body,
                sends: 0,
                seq,
                moved: false,
            });
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
        if self.is_empty() {
            // Nothing to prove writes work with: the next refusal says so again.
            self.not_now = None;
        }
        let Some(h) = self.history.as_mut() else {
            return Vec::new();
        };
        // Asked again on every connect: it may be another Redis now.
        h.node.clear();
        h.node2.clear();
        h.myid.clear();
        let mut cmds = vec![redis::cmd("INFO").arg("replication").clone()];
        self.expect.push_back(Expect::Node);
        if self.sharded {
            cmds.push(redis::cmd("CLUSTER").arg("MYID").clone());
            self.expect.push_back(Expect::MyId);
        }
        self.expect.push_back(Expect::LoadPublish);
        self.expect.push_back(Expect::LoadRead);
        cmds.extend(
            [
                if self.sharded {
                    history::publish_script()
                        .replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
                } else {
                    history::publish_script()
                },
                history::read_script(),
            ]
            .iter()
            .map(|s| redis::cmd("SCRIPT").arg("LOAD").arg(s).clone()),
        );
        cmds
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

    /// A read for a `Backplane::history` ask, if the scripts are loaded.
    pub fn send_recover(&mut self, redis_channel: &str, req: RecoverReq) -> Option<redis::Cmd> {
        let (Some(h), Some(sha)) = (&self.history, &self.shas.read) else {
            return None;
        };
        let (epoch, from) = req.script_args();
        // A client is about to be told a position: a channel without history begins one.
        let cmd = h.read_from(sha, redis_channel, epoch, from, true);
        self.expect.push_back(Expect::Recover(req));
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
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        self.waiting.push_back(Outgoing {
            channel: channel.into(),
            body,
            sends: 0,
            seq,
            moved: false,
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
    /// With history, consecutive waiting publishes of any channels go in one script
    /// call (up to `BATCH_MESSAGES` / `BATCH_BYTES`), grouped by runs of one channel:
    /// the Lua call and the round trip are paid once per call, the meta hash and TTLs
    /// once per channel run (numbers: README, Performance).
    pub fn send_next(&mut self) -> Option<redis::Cmd> {
        if self.inflight.len() >= self.max_msgs || !self.can_send() {
            return None;
        }
        let first = self.waiting.pop_front()?;
        let (Some(h), Some(sha)) = (&self.history, &self.shas.publish) else {
            // History off: a plain publish (sharded on a cluster, where the
            // subscription links SSUBSCRIBE).
            let cmd = redis::cmd(if self.sharded { "SPUBLISH" } else { "PUBLISH" })
                .arg(&*first.channel)
                .arg(&first.body[..])
                .clone();
            self.launch(first);
            self.expect.push_back(Expect::Publish(vec![1]));
            return Some(cmd);
        };
        // Consecutive waiting publishes, of any channels (on one Redis every key may
        // share a call), grouped by runs of one channel: each channel's stay in order.
        let slot = self
            .sharded
            .then(|| topology::slot(first.channel.as_bytes()));
        let mut batch = vec![first];
        let mut bytes = batch[0].body.len();
        while let Some(next) = self.waiting.front() {
            if batch.len() >= BATCH_MESSAGES
                || bytes + next.body.len() > BATCH_BYTES
                || self.inflight.len() + batch.len() >= self.max_msgs
                || slot.is_some_and(|s| {
                    *next.channel != *batch[batch.len() - 1].channel
                        && topology::slot(next.channel.as_bytes()) != s
                })
            {
                break;
            }
            bytes += next.body.len();
            batch.extend(self.waiting.pop_front());
        }
        let mut groups: Vec<history::ChannelGroup<'_>> = Vec::new();
        for m in &batch {
            match groups.last_mut() {
                Some((ch, items)) if *ch == &*m.channel => items.push((m.seq, &m.body[..])),
                _ => groups.push((&m.channel, vec![(m.seq, &m.body[..])])),
            }
        }
        let sizes: Vec<usize> = groups.iter().map(|g| g.1.len()).collect();
        let cmd = h.publish_channels(sha, self.seq.get(), &groups);
        drop(groups);
        self.expect.push_back(Expect::Publish(sizes));
        for m in batch {
            self.launch(m);
        }
        Some(cmd)
    }

    fn launch(&mut self, mut m: Outgoing) {
        m.sends += 1;
        self.inflight.push_back(m);
    }

    /// Asks for the cluster's topology (`CLUSTER SHARDS`, or `CLUSTER SLOTS` from a
    /// Redis older than 7): the command to send.
    pub fn ask_topology(&mut self, slots: bool) -> redis::Cmd {
        self.expect.push_back(Expect::Topology(slots));
        redis::cmd("CLUSTER")
            .arg(if slots { "SLOTS" } else { "SHARDS" })
            .clone()
    }

    /// A periodic PING was written on the publish link.
    pub fn ping_sent(&mut self) {
        self.expect.push_back(Expect::Ping);
    }

    /// A reply on the publish link (after its handshake). An error means the link
    /// must be dropped: it no longer knows what answers what, or Redis said "not now".
    pub fn on_reply(&mut self, v: Value) -> Result<Reply, LinkDown> {
        if let Value::ServerError(e) = &v {
            if NOT_NOW.contains(&e.code()) {
                let what = format!("{} {}", e.code(), e.details().unwrap_or(""));
                return Err(self.not_now(e.code(), what.trim_end()));
            }
        }
        match self.expect.pop_front() {
            Some(Expect::Publish(sizes)) => {
                // Per channel of the call: its outcome.
                let results: Vec<history::ChannelResult> = match v {
                    Value::Int(_) if self.history.is_none() => {
                        vec![history::ChannelResult::Published { flags: 0 }]
                    }
                    Value::ServerError(e) => {
                        let text = format!("{} {}", e.code(), e.details().unwrap_or(""));
                        vec![history::ChannelResult::Refused(text); sizes.len()]
                    }
                    other => match history::parse_published(&other) {
                        Some(r) if self.history.is_some() && r.len() == sizes.len() => r,
                        _ => return Err(format!("unexpected PUBLISH reply {other:?}").into()),
                    },
                };
                let mut flags = 0u8;
                let mut refused: Option<(Refused, String)> = None;
                for (size, result) in sizes.iter().zip(results) {
                    let ok = matches!(result, history::ChannelResult::Published { .. });
                    for _ in 0..*size {
                        if let Some(out) = self.inflight.pop_front() {
                            self.bytes -= out.body.len();
                            if ok {
                                self.published += 1;
                            }
                        }
                    }
                    match result {
                        history::ChannelResult::Published { flags: f } => {
                            self.not_now = None;
                            self.corrupt_dedupe += u64::from(f & 1);
                            self.corrupt_meta += u64::from(f >> 1 & 1);
                            flags |= f;
                        }
                        history::ChannelResult::Refused(text) => {
                            let code = text.split_whitespace().next().unwrap_or("");
                            let reason = Refused::of(code);
                            self.refused[reason as usize] += *size as u64;
                            refused.get_or_insert((reason, text));
                        }
                    }
                }
                Ok(match refused {
                    Some((r, text)) => Reply::Refused(r, text),
                    None => Reply::Published { flags },
                })
            }
            Some(Expect::Ping) => match v {
                Value::SimpleString(s) if s.eq_ignore_ascii_case("PONG") => Ok(Reply::Pong),
                other => Err(format!("unexpected PING reply {other:?}").into()),
            },
            Some(Expect::Topology(slots)) => Ok(Reply::Topology(
                slots,
                match v {
                    Value::ServerError(e) => {
                        Err(format!("{} {}", e.code(), e.details().unwrap_or("")))
                    }
                    other if slots => topology::parse_slots(&other),
                    other => topology::parse_shards(&other),
                },
            )),
            Some(Expect::Node) => {
                // A Redis that refuses INFO (renamed by an operator) or gives no id
                // still works: without fork detection.
                if let Some(h) = self.history.as_mut() {
                    h.node = history::replication_id(&v).unwrap_or_default();
                    h.node2 = history::previous_replication_id(&v).unwrap_or_default();
                }
                Ok(Reply::Nothing)
            }
            Some(Expect::MyId) => {
                if let (Some(h), Value::BulkString(id)) = (self.history.as_mut(), &v) {
                    h.myid = String::from_utf8(id.clone())
                        .ok()
                        .filter(|i| i.len() == 40 && i.bytes().all(|b| b.is_ascii_hexdigit()))
                        .unwrap_or_default();
                }
                Ok(Reply::Nothing)
            }
            Some(which @ (Expect::LoadPublish | Expect::LoadRead)) => {
                let sha = match v {
                    Value::BulkString(b) => {
                        String::from_utf8(b).map_err(|e| LinkDown::from(e.to_string()))?
                    }
                    Value::ServerError(e) if e.code() == "ERR" || e.code() == "NOPERM" => {
                        return Err(format!(
                            "SCRIPT LOAD refused ({e:?}): this Redis runs no Lua scripts (some managed offerings); run wsfan with --history-size 0 there"
                        )
                        .into())
                    }
                    other => return Err(format!("SCRIPT LOAD failed: {other:?}").into()),
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
                Value::ServerError(e) => Ok(Reply::Range(
                    req,
                    Err((Refused::of(e.code()), format!("{e:?}"))),
                )),
                // A well-framed reply of the wrong shape is about this channel's keys
                // (a corrupt meta hash, a foreign stream): this read fails, the link
                // goes on.
                other => Ok(Reply::Range(
                    req,
                    history::parse_range(other).map_err(|e| (Refused::BadMeta, e)),
                )),
            },
            Some(Expect::Recover(req)) => Ok(Reply::Recovered(
                req,
                match v {
                    Value::ServerError(e) => Err((Refused::of(e.code()), format!("{e:?}"))),
                    other => history::parse_range(other).map_err(|e| (Refused::BadMeta, e)),
                },
            )),
            None => Err(format!("unexpected reply {v:?}").into()),
        }
    }

    /// Redis said "not now": nothing in flight counts as a send (Redis did not apply
    /// the refused command, and the script's dedupe drops any that it did), and
    /// `/readyz` says why until a publish succeeds.
    fn not_now(&mut self, code: &str, what: &str) -> LinkDown {
        for m in &mut self.inflight {
            m.sends = m.sends.saturating_sub(1);
        }
        self.not_now = Some(code.to_string());
        LinkDown {
            code: Some(code.to_string()),
            why: format!("redis refused ({what})"),
        }
    }

    /// The link went down: unanswered publishes go back to the front, in order, unless
    /// they were sent `MAX_PUBLISH_SENDS` times already (then dropped and counted).
    /// Returns the channels of the dropped ones (for the log).
    pub fn on_down(&mut self) -> Vec<Box<str>> {
        let mut abandoned = Vec::new();
        while let Some(m) = self.inflight.pop_back() {
            if m.moved {
                continue; // sent again by the shard it moved to
            }
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
        assert_eq!(o.on_reply(Value::Int(1)), Ok(Reply::Published { flags: 0 }));
        let refused = redis::parse_redis_value(b"-ERR nope\r\n").expect("an error reply");
        assert!(matches!(
            o.on_reply(refused),
            Ok(Reply::Refused(Refused::Other, _))
        ));
        assert_eq!(o.refused, [0, 0, 0, 1]);
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
            key: None,
            node: String::new(),
            node2: String::new(),
            myid: String::new(),
        });
        assert_eq!(o.on_up().len(), 3, "INFO replication, SCRIPT LOAD twice");
        assert!(
            !o.can_send() && o.send_next().is_none(),
            "not before the SHAs"
        );
        let info = "# Replication\r\nrole:master\r\nmaster_replid:0123456789abcdef0123456789abcdef01234567\r\nmaster_replid2:fedcba9876543210fedcba9876543210fedcba98\r\n";
        assert_eq!(
            o.on_reply(Value::BulkString(info.as_bytes().to_vec())),
            Ok(Reply::Nothing)
        );
        assert_eq!(
            o.history
                .as_ref()
                .map(|h| (h.node.as_str(), h.node2.as_str())),
            Some((
                "0123456789abcdef0123456789abcdef01234567",
                "fedcba9876543210fedcba9876543210fedcba98"
            ))
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

    fn group(top: i64, flags: i64) -> Value {
        Value::Array(vec![Value::Int(top), Value::Int(flags)])
    }

    fn refused_group(text: &str) -> Value {
        Value::Array(vec![
            Value::Int(-1),
            Value::BulkString(text.as_bytes().to_vec()),
        ])
    }

    #[test]
    fn consecutive_publishes_of_any_channels_go_in_one_script_call() {
        let mut o = with_scripts();
        for (ch, b) in [("a", "1"), ("a", "2"), ("a", "3"), ("b", "4"), ("a", "5")] {
            o.push(ch.into(), body(b));
        }
        let s = sent(&mut o);
        assert_eq!(s.len(), 1, "one call: {s:?}");
        assert!(s[0].contains("EVALSHA") && s[0].contains("sha1"));
        assert!(
            s[0].contains("\r\n$1\r\n6\r\n$5\r\n{a}:m"),
            "3 channel groups, 6 keys: {}",
            s[0]
        );
        // One reply acknowledges the whole call, one result per channel group.
        let ok = Value::Array(vec![group(3, 0), group(1, 0), group(4, 0)]);
        assert_eq!(o.on_reply(ok), Ok(Reply::Published { flags: 0 }));
        assert_eq!((o.len(), o.published), (0, 5));
        // Lost with the link: re-sent in order, with their own sequence numbers.
        o.push("c".into(), body("6"));
        o.push("d".into(), body("7"));
        assert_eq!(sent(&mut o).len(), 1);
        o.on_down();
        let mut o2 = o;
        o2.on_up();
        o2.on_reply(Value::Nil)
            .expect("INFO (no id: no fork detection)");
        o2.on_reply(Value::BulkString(b"s".to_vec())).expect("load");
        o2.on_reply(Value::BulkString(b"r".to_vec())).expect("load");
        let s = sent(&mut o2);
        assert_eq!(s.len(), 1);
        assert!(
            s[0].contains("$1\r\n6\r\n$1\r\n6\r\n") && s[0].contains("$1\r\n7\r\n$1\r\n7\r\n"),
            "seq 6, body 6; seq 7, body 7: {}",
            s[0]
        );
        let refused = redis::parse_redis_value(b"-NOSCRIPT gone\r\n").expect("error");
        assert!(o2.on_reply(refused).is_err(), "NOSCRIPT ends the link");
    }

    /// "Not now" ends the link and costs no send; a verdict drops that channel's
    /// publishes only, counted by reason; flags count corrupt keys.
    #[test]
    fn refusals_are_link_conditions_or_verdicts() {
        for code in NOT_NOW {
            let mut o = with_scripts();
            o.push("a".into(), body("1"));
            o.push("b".into(), body("2"));
            assert_eq!(sent(&mut o).len(), 1);
            let e = redis::parse_redis_value(format!("-{code} no\r\n").as_bytes()).expect("err");
            let down = o.on_reply(e).expect_err("ends the link");
            assert_eq!(down.code.as_deref(), Some(*code));
            assert_eq!(o.not_now.as_deref(), Some(*code));
            // Refused MAX_PUBLISH_SENDS times and more: never abandoned.
            for _ in 0..(MAX_PUBLISH_SENDS + 2) {
                assert!(o.on_down().is_empty(), "{code}: nothing abandoned");
                o.on_up();
                o.on_reply(Value::Nil).expect("INFO");
                o.on_reply(Value::BulkString(b"s".to_vec())).expect("load");
                o.on_reply(Value::BulkString(b"r".to_vec())).expect("load");
                assert_eq!(sent(&mut o).len(), 1, "both sent again, in order");
                let e =
                    redis::parse_redis_value(format!("-{code} no\r\n").as_bytes()).expect("err");
                assert!(o.on_reply(e).is_err());
            }
            assert_eq!((o.len(), o.abandoned, o.dropped), (2, 0, 0));
        }
        let mut o = with_scripts();
        for ch in ["a", "b", "c", "d"] {
            o.push(ch.into(), body("x"));
        }
        assert_eq!(sent(&mut o).len(), 1);
        let reply = Value::Array(vec![
            refused_group("WRONGTYPE no"),
            refused_group("NOPERM no"),
            refused_group("ERR no"),
            group(9, 3),
        ]);
        assert!(matches!(
            o.on_reply(reply),
            Ok(Reply::Refused(Refused::WrongType, _))
        ));
        assert_eq!(o.refused, [1, 1, 0, 1]);
        assert_eq!((o.corrupt_dedupe, o.corrupt_meta, o.published), (1, 1, 1));
        assert!(o.is_empty() && o.not_now.is_none());
        // A script error for the whole call refuses every channel of it.
        o.push("a".into(), body("y"));
        o.push("b".into(), body("z"));
        assert_eq!(sent(&mut o).len(), 1);
        let e = redis::parse_redis_value(b"-ERR script broke\r\n").expect("err");
        assert!(matches!(
            o.on_reply(e),
            Ok(Reply::Refused(Refused::Other, _))
        ));
        assert_eq!((o.refused[3], o.len()), (3, 0));
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

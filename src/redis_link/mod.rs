//! The Redis backplane, inside the same poll loop: two non-blocking sockets, no threads.
//!
//! * The **subscription link** holds SUBSCRIBE for every channel with local members
//!   (interest-driven: first member → SUBSCRIBE, last leaves → UNSUBSCRIBE) and receives
//!   every message, ours included — all deliveries come through Redis, so every client
//!   on every instance sees one order per channel.
//! * The **publish link** sends PUBLISH, pipelined: every message of an iteration goes
//!   out in one write.
//!
//! Commands are encoded with the redis crate (`redis::cmd(..).get_packed_command()`);
//! replies and pushes are read into a bounded buffer per connection, framed by `resp`
//! (which skips a message larger than `--max-message-size` as it streams past), and
//! each whole value is parsed by the connection's `redis::Parser`. A host name is looked
//! up by a child process (`transport::Resolver`), never on the loop. Each link
//! reconnects with capped exponential backoff and jitter and is PINGed with a deadline,
//! so a silent dead link is noticed. While the publish side is
//! down (or the subscription side is re-subscribing), publishes wait in a bounded
//! buffer and go out in order afterwards; publishes whose replies never came are sent
//! again (at-least-once across a reconnect).

pub mod resp;
mod transport;

use resp::Next;
pub use transport::{resolve_main, Target};
use transport::{Link, Progress, State, Stream};

use crate::bus::{BusEvent, BusStats, Published};
use crate::config::Config;
use crate::hub::Interest;
use crate::server::{REDIS_PUB, REDIS_SUB};
use crate::{envelope, ws::Kind};
use bytes::Bytes;
use log::{debug, error, info, warn};
use mio::event::Event;
use mio::{Interest as Ready, Registry};
use redis::Value;
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::time::{Duration, Instant};

/// At most one line per this interval for warnings that could flood the log.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// True when a rate-limited warning may be logged again (and records that it was).
fn log_due(last: &mut Option<Instant>) -> bool {
    let now = Instant::now();
    if last.is_some_and(|t| now - t <= LOG_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

/// Bytes read from one Redis link per loop iteration: what they carry is fanned out
/// before more is read, so a backlog in Redis neither starves clients nor piles up here.
const READ_BUDGET: usize = 1024 * 1024;

/// PUBLISH bytes handed to the socket per iteration; the rest waits its turn.
const PUBLISH_CHUNK: usize = 512 * 1024;
/// Channels per SUBSCRIBE command when re-subscribing many at once.
const SUBSCRIBE_BATCH: usize = 1000;
/// Times one publish is written to Redis at most. A publish whose reply never came is
/// sent again after a reconnect; one that has been sent this often without a reply (a
/// Redis that executes it and then answers garbage) is dropped and counted in
/// `wsfan_redis_publish_abandoned_total`, instead of being delivered again forever.
pub const MAX_PUBLISH_SENDS: u8 = 3;
/// A PING unanswered for longer than this makes `/readyz` say not ready (the link is
/// declared dead only at `--redis-timeout`): a live Redis answers in microseconds.
const PING_LATE: Duration = Duration::from_secs(1);
/// Identical connect failures are logged once per this interval, with a count.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);

/// What the next reply on the publish link answers (once the link is up).
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

#[derive(Debug, Default)]
struct Sub {
    /// Local members want it.
    wanted: bool,
    /// SUBSCRIBE/UNSUBSCRIBE sent and not yet acknowledged.
    pending: u32,
    /// Redis confirmed the subscription and nothing newer is in flight.
    confirmed: bool,
}

pub struct RedisLink {
    target: Target,
    prefix: String,
    max_msgs: usize,
    max_bytes: usize,
    /// Largest payload delivered to clients (`--max-message-size`).
    max_payload: usize,
    /// Bytes read per link per iteration (`READ_BUDGET`; smaller in unit tests).
    read_budget: usize,
    ping_interval: Duration,
    timeout: Duration,
    backoff_max: Duration,
    sub: Link,
    publ: Link,
    subs: HashMap<Box<str>, Sub>,
    /// Publishes not yet written to Redis.
    outbox: VecDeque<Outgoing>,
    /// Written, reply not yet received (re-sent if the link drops).
    inflight: VecDeque<Outgoing>,
    expect: VecDeque<Expect>,
    buffered_bytes: usize,
    events: Vec<BusEvent>,
    rng: u64,
    reconnects: u64,
    dropped: u64,
    oversize: u64,
    published: u64,
    /// Publishes dropped after `MAX_PUBLISH_SENDS` unanswered sends.
    abandoned: u64,
    /// Connect attempts that failed before the link came up (logged rate-limited).
    connect_failures: u64,
    last_drop_log: Option<Instant>,
    last_oversize_log: Option<Instant>,
}

impl RedisLink {
    pub fn new(url: &str, cfg: &Config) -> Result<RedisLink, String> {
        let target = Target::parse(url)?;
        let now = Instant::now();
        // Room for the envelope's two bytes; the payload itself is checked after decoding.
        let max_bulk = cfg.max_message_size + 2;
        Ok(RedisLink {
            target,
            prefix: cfg.channel_prefix.clone(),
            max_msgs: cfg.redis_buffer_messages,
            max_bytes: cfg.redis_buffer_bytes,
            max_payload: cfg.max_message_size,
            read_budget: READ_BUDGET,
            ping_interval: cfg.redis_ping_interval,
            timeout: cfg.redis_timeout,
            backoff_max: cfg.redis_backoff_max,
            sub: Link::new("subscribe", REDIS_SUB, max_bulk, now),
            publ: Link::new("publish", REDIS_PUB, max_bulk, now),
            subs: HashMap::new(),
            outbox: VecDeque::new(),
            inflight: VecDeque::new(),
            expect: VecDeque::new(),
            buffered_bytes: 0,
            events: Vec::new(),
            rng: (std::process::id() as u64) << 32 | now.elapsed().subsec_nanos() as u64 | 1,
            reconnects: 0,
            dropped: 0,
            oversize: 0,
            published: 0,
            abandoned: 0,
            connect_failures: 0,
            last_drop_log: None,
            last_oversize_log: None,
        })
    }

    pub fn target_display(&self) -> String {
        self.target.display()
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64: jitter only needs to differ between processes and attempts.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The subscription or the publish link. (Where other fields are used while a link
    /// is borrowed, the match is spelled out instead so the borrows stay split.)
    fn link(&mut self, is_sub: bool) -> &mut Link {
        if is_sub {
            &mut self.sub
        } else {
            &mut self.publ
        }
    }

    fn redis_name(&self, channel: &str) -> String {
        format!("{}{}", self.prefix, channel)
    }

    // ---- inputs from the loop -----------------------------------------------------

    pub fn interest(&mut self, i: Interest) {
        let up = self.sub.state == State::Up;
        match i {
            Interest::Subscribe(ch) => {
                let name = self.redis_name(&ch);
                let s = self.subs.entry(ch).or_default();
                s.wanted = true;
                if up {
                    s.pending += 1;
                    self.sub.send(redis::cmd("SUBSCRIBE").arg(name));
                }
            }
            Interest::Unsubscribe(ch) => {
                let name = self.redis_name(&ch);
                let Some(s) = self.subs.get_mut(&ch) else {
                    return;
                };
                s.wanted = false;
                s.confirmed = false;
                if up {
                    s.pending += 1;
                    self.sub.send(redis::cmd("UNSUBSCRIBE").arg(name));
                } else if s.pending == 0 {
                    self.subs.remove(&ch);
                }
            }
        }
    }

    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.sub.state == State::Up && self.subs.get(channel).is_some_and(|s| s.confirmed)
    }

    /// Every wanted channel is confirmed on a live subscription link.
    fn all_subscribed(&self) -> bool {
        self.sub.state == State::Up && self.subs.values().all(|s| !s.wanted || s.confirmed)
    }

    pub fn publish(&mut self, channel: &str, kind: Kind, payload: Bytes) -> Published {
        let body = envelope::encode(kind, &payload);
        let mut result = Published::Accepted;
        while self.over_limit(body.len()) {
            let Some(old) = self.outbox.pop_front() else {
                break;
            };
            self.buffered_bytes -= old.body.len();
            self.count_drop();
            result = Published::AcceptedDroppedOldest;
        }
        if self.over_limit(body.len()) {
            // Everything buffered is already in flight: this one cannot be kept.
            self.count_drop();
            return Published::AcceptedDroppedOldest;
        }
        self.buffered_bytes += body.len();
        self.outbox.push_back(Outgoing {
            channel: self.redis_name(channel).into(),
            body,
            sends: 0,
        });
        result
    }

    fn over_limit(&self, extra: usize) -> bool {
        self.outbox.len() + self.inflight.len() + 1 > self.max_msgs
            || self.buffered_bytes + extra > self.max_bytes
    }

    pub fn is_full(&self, extra: usize) -> bool {
        self.over_limit(extra) && !(self.publ.state == State::Up && self.all_subscribed())
    }

    /// A link whose PING has waited longer than `PING_LATE` (Redis frozen or
    /// partitioned): not declared dead yet, but not ready either.
    fn ping_late(&self, now: Instant) -> Option<&'static str> {
        [&self.sub, &self.publ]
            .into_iter()
            .find(|l| {
                l.ping_sent
                    .is_some_and(|t| now.saturating_duration_since(t) > PING_LATE)
            })
            .map(|l| l.name)
    }

    fn count_drop(&mut self) {
        self.dropped += 1;
        if log_due(&mut self.last_drop_log) {
            warn!(
                "redis outage buffer full: dropping oldest messages ({} dropped so far)",
                self.dropped
            );
        }
    }

    pub fn drain(&mut self, out: &mut Vec<BusEvent>) {
        out.append(&mut self.events);
    }

    /// `Ok` when a publish and a subscribe would work now: both links proved by a
    /// round trip, every wanted channel confirmed, and no PING left waiting.
    pub fn ready(&self, now: Instant) -> Result<(), &'static str> {
        if self.sub.state != State::Up {
            return Err("redis subscription link down");
        }
        if self.publ.state != State::Up {
            return Err("redis publish link down");
        }
        if !self.all_subscribed() {
            return Err("redis subscribing");
        }
        if let Some(name) = self.ping_late(now) {
            return Err(if name == "subscribe" {
                "redis not answering PING on the subscription link"
            } else {
                "redis not answering PING on the publish link"
            });
        }
        Ok(())
    }

    pub fn stats(&self, now: Instant) -> BusStats {
        BusStats {
            up: self.ready(now).is_ok(),
            reconnects: self.reconnects,
            buffered_messages: self.outbox.len() + self.inflight.len(),
            buffered_bytes: self.buffered_bytes,
            dropped: self.dropped,
            oversize: self.oversize,
            published: self.published,
            publish_abandoned: self.abandoned,
            connect_failures: self.connect_failures,
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        [&self.sub, &self.publ]
            .iter()
            .filter_map(|l| match l.state {
                State::Down => Some(l.retry_at),
                State::Connecting | State::Handshaking => l.deadline,
                State::Up => Some(l.ping_sent.map_or(l.next_ping, |t| t + self.timeout)),
            })
            .min()
    }

    // ---- I/O ------------------------------------------------------------------------

    pub fn on_event(&mut self, registry: &Registry, ev: &Event, now: Instant) {
        let is_sub = ev.token() == REDIS_SUB;
        let link = self.link(is_sub);
        if link.state == State::Connecting {
            let Some(progress) = link.stream.as_mut().map(Stream::progress) else {
                return;
            };
            match progress {
                Ok(Progress::Connected) => self.on_connected(is_sub, now),
                Ok(Progress::Waiting) => return,
                Ok(Progress::Resolved(mut addrs)) => {
                    debug!("redis {} link: resolved to {addrs:?}", link.name);
                    // Each failed attempt starts one address further: one that swallows
                    // connects (silence, not a refusal) cannot hold every attempt.
                    let start = link.failures as usize % addrs.len().max(1);
                    addrs.rotate_left(start);
                    link.addrs = addrs.into();
                    if let Err(e) = link.connect_next(registry) {
                        self.fail(registry, is_sub, &format!("connect: {e}"), now);
                    }
                    return;
                }
                Err(e) if link.is_resolving() => {
                    return self.fail(registry, is_sub, &format!("resolve: {e}"), now)
                }
                // Refused: try the next address the name resolved to, if any.
                Err(e) => {
                    if link.addrs.is_empty() || link.connect_next(registry).is_err() {
                        self.fail(registry, is_sub, &format!("connect: {e}"), now);
                    }
                    return;
                }
            }
        }
        let link = self.link(is_sub);
        if !link.connected() {
            return;
        }
        if ev.is_writable() {
            if let Err(e) = link.write() {
                return self.fail(registry, is_sub, &format!("write: {e}"), now);
            }
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            if let Err(why) = self.read(is_sub, now) {
                self.fail(registry, is_sub, &why, now);
            }
        }
    }

    /// Links whose read stopped at the budget: read on (before this iteration's
    /// deliveries are fanned out).
    pub fn resume_reads(&mut self, registry: &Registry, now: Instant) {
        for is_sub in [true, false] {
            let link = self.link(is_sub);
            if std::mem::take(&mut link.more_to_read) && link.connected() {
                if let Err(why) = self.read(is_sub, now) {
                    self.fail(registry, is_sub, &why, now);
                }
            }
        }
    }

    /// A link has input waiting that the last read left for later.
    pub fn has_more_to_read(&self) -> bool {
        self.sub.more_to_read || self.publ.more_to_read
    }

    /// Handles every complete value available, until the socket would block or this
    /// iteration's read budget is spent (then `resume_reads` goes on next iteration).
    fn read(&mut self, is_sub: bool, now: Instant) -> Result<(), String> {
        let mut budget = self.read_budget;
        loop {
            let link = self.link(is_sub);
            let Some(stream) = link.stream.as_mut() else {
                return Ok(());
            };
            match link.rbuf.frame() {
                Ok(Next::Ready) => loop {
                    let link = self.link(is_sub);
                    let Some(v) = link.rbuf.parse_one(&mut link.parser) else {
                        break;
                    };
                    let v = v.map_err(|e| format!("parse: {e}"))?;
                    if link.state == State::Handshaking {
                        self.on_handshake_reply(is_sub, v, now)?;
                    } else if is_sub {
                        self.on_sub_value(v, now)?;
                    } else {
                        self.on_pub_value(v, now)?;
                    }
                },
                Ok(Next::Dropped) => self.count_oversize(),
                Ok(Next::NeedMore) if budget == 0 => {
                    // More may be waiting in the socket; edge-triggered polling won't
                    // say so again, so the loop comes back here without waiting.
                    link.more_to_read = true;
                    return Ok(());
                }
                // At most the budget's rest per read (`take`'s Ok(0) can only be EOF here).
                Ok(Next::NeedMore) => {
                    match link.rbuf.fill(&mut Read::take(stream, budget as u64)) {
                        Ok(0) => return Err("closed by redis".to_string()),
                        Ok(n) => budget = budget.saturating_sub(n),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(format!("read: {e}")),
                    }
                }
                Err(why) => return Err(format!("protocol: {why}")),
            }
        }
    }

    /// A message larger than `--max-message-size` (from a publisher other than wsfan)
    /// is not delivered: clients would have to be cut off for it.
    fn count_oversize(&mut self) {
        self.oversize += 1;
        if log_due(&mut self.last_oversize_log) {
            warn!(
                "redis: message larger than --max-message-size {} bytes not delivered ({} so far)",
                self.max_payload, self.oversize
            );
        }
    }

    fn on_sub_value(&mut self, v: Value, now: Instant) -> Result<(), String> {
        let Value::Array(items) = v else {
            return match v {
                Value::ServerError(e) => Err(format!("server error: {e:?}")),
                // PING on a connection subscribed to nothing is answered `+PONG`, not
                // with the `pong` push of subscribed mode.
                Value::SimpleString(s) if s.eq_ignore_ascii_case("PONG") => {
                    self.on_pong(true, now);
                    Ok(())
                }
                other => Err(format!("unexpected reply {other:?}")),
            };
        };
        let mut it = items.into_iter();
        let kind = match it.next() {
            Some(Value::BulkString(k)) => k,
            other => return Err(format!("unexpected push {other:?}")),
        };
        match &kind[..] {
            b"message" => {
                let (Some(Value::BulkString(ch)), Some(Value::BulkString(payload))) =
                    (it.next(), it.next())
                else {
                    return Err("malformed message push".to_string());
                };
                let Some(name) = ch.strip_prefix(self.prefix.as_bytes()) else {
                    return Ok(());
                };
                let Ok(name) = std::str::from_utf8(name) else {
                    return Ok(());
                };
                let (kind, payload) = envelope::decode(Bytes::from(payload));
                if payload.len() > self.max_payload {
                    self.count_oversize();
                    return Ok(());
                }
                self.events.push(BusEvent::Deliver {
                    channel: name.to_string(),
                    kind,
                    payload,
                });
            }
            b"subscribe" | b"unsubscribe" => {
                if let Some(Value::BulkString(ch)) = it.next() {
                    self.on_sub_ack(&ch);
                }
            }
            b"pong" => self.on_pong(true, now),
            _ => debug!(
                "redis subscribe link: ignoring push {:?}",
                String::from_utf8_lossy(&kind)
            ),
        }
        Ok(())
    }

    fn on_sub_ack(&mut self, redis_name: &[u8]) {
        let Some(name) = redis_name
            .strip_prefix(self.prefix.as_bytes())
            .and_then(|n| std::str::from_utf8(n).ok())
        else {
            return;
        };
        let Some(s) = self.subs.get_mut(name) else {
            return;
        };
        s.pending = s.pending.saturating_sub(1);
        if s.pending > 0 {
            return;
        }
        if !s.wanted {
            self.subs.remove(name);
        } else if !s.confirmed {
            s.confirmed = true;
            debug!("redis: subscribed channel={name}");
            self.events.push(BusEvent::Subscribed(name.to_string()));
        }
    }

    fn on_pub_value(&mut self, v: Value, now: Instant) -> Result<(), String> {
        match self.expect.pop_front() {
            Some(Expect::Publish) => {
                let m = match v {
                    Value::Int(_) => None,
                    Value::ServerError(e) => Some(format!("{e:?}")),
                    // Not a PUBLISH reply: this link no longer knows what answers what.
                    other => return Err(format!("unexpected PUBLISH reply {other:?}")),
                };
                if let Some(out) = self.inflight.pop_front() {
                    self.buffered_bytes -= out.body.len();
                }
                match m {
                    Some(e) => warn!("redis PUBLISH failed: {e}"),
                    None => self.published += 1,
                }
            }
            Some(Expect::Ping) => match v {
                Value::SimpleString(s) if s.eq_ignore_ascii_case("PONG") => {
                    self.on_pong(false, now)
                }
                other => return Err(format!("unexpected PING reply {other:?}")),
            },
            None => return Err(format!("unexpected reply {v:?}")),
        }
        Ok(())
    }

    /// A periodic PING was answered: the link has now held for a PING interval with
    /// round trips, so its reconnect backoff starts from the bottom again.
    fn on_pong(&mut self, is_sub: bool, _now: Instant) {
        let link = self.link(is_sub);
        link.ping_sent = None;
        link.failures = 0;
    }

    /// Replies to the login commands and PING sent on connect. Any error ends the
    /// attempt (wrong password, `-ERR max clients`, not Redis); the last reply makes the
    /// link up.
    fn on_handshake_reply(&mut self, is_sub: bool, v: Value, now: Instant) -> Result<(), String> {
        let link = self.link(is_sub);
        match v {
            Value::ServerError(e) => return Err(format!("login refused: {e:?}")),
            Value::Okay | Value::SimpleString(_) => {}
            other => return Err(format!("unexpected handshake reply {other:?}")),
        }
        link.handshake_replies_left = link.handshake_replies_left.saturating_sub(1);
        if link.handshake_replies_left == 0 {
            self.on_up(is_sub, now);
        }
        Ok(())
    }

    fn on_connected(&mut self, is_sub: bool, now: Instant) {
        let mut login = Vec::new();
        if let Some(pass) = &self.target.password {
            let mut c = redis::cmd("AUTH");
            if let Some(u) = &self.target.username {
                c.arg(u);
            }
            login.push(c.arg(pass).clone());
        }
        if !is_sub && self.target.db != 0 {
            login.push(redis::cmd("SELECT").arg(self.target.db).clone());
        }
        login.push(redis::cmd("PING"));
        let timeout = self.timeout;
        let link = self.link(is_sub);
        link.state = State::Handshaking;
        link.deadline = Some(now + timeout);
        link.handshake_replies_left = login.len() as u32;
        for c in &login {
            link.send(c);
        }
        debug!("redis {} link connected, handshaking", link.name);
    }

    /// The handshake was answered: the link is up.
    fn on_up(&mut self, is_sub: bool, now: Instant) {
        let next_ping = now + self.ping_interval;
        let target = self.target.display();
        let link = self.link(is_sub);
        link.state = State::Up;
        link.deadline = None;
        link.next_ping = next_ping;
        let again = link.ever_up;
        link.ever_up = true;
        info!("redis {} link up ({target})", link.name);
        if again {
            self.reconnects += 1;
        }
        if is_sub {
            // Re-subscribe everything with local interest, in batches.
            self.subs.retain(|_, s| s.wanted);
            let names: Vec<Box<str>> = self.subs.keys().cloned().collect();
            for chunk in names.chunks(SUBSCRIBE_BATCH) {
                let mut c = redis::cmd("SUBSCRIBE");
                for n in chunk {
                    c.arg(self.redis_name(n));
                    if let Some(s) = self.subs.get_mut(n) {
                        s.pending = 1;
                        s.confirmed = false;
                    }
                }
                self.sub.send(&c);
            }
        }
    }

    fn fail(&mut self, registry: &Registry, is_sub: bool, why: &str, now: Instant) {
        let jitter = self.jitter();
        let up_before = matches!(self.link(is_sub).state, State::Up);
        if !up_before {
            self.connect_failures += 1;
        }
        let link = if is_sub {
            &mut self.sub
        } else {
            &mut self.publ
        };
        let was_up = link.state == State::Up;
        link.close(registry, now, self.backoff_max, jitter);
        let retry = link.retry_at.saturating_duration_since(now);
        if was_up {
            link.last_failure = None;
            error!(
                "redis {} link lost ({why}); reconnecting in {retry:?}",
                link.name
            );
        } else if let Some(unlogged) = link.log_failure(why, now, FAILURE_LOG_EVERY) {
            let more = if unlogged > 0 {
                format!(" ({unlogged} more like it not logged)")
            } else {
                String::new()
            };
            warn!(
                "redis {} link to {} failed ({why}); retrying in {retry:?}{more}",
                link.name,
                self.target.display()
            );
        }
        if is_sub {
            self.subs.retain(|_, s| s.wanted);
            for s in self.subs.values_mut() {
                s.pending = 0;
                s.confirmed = false;
            }
        } else {
            // Unanswered publishes go back to the front, in order, unless they were
            // sent too often already.
            while let Some(m) = self.inflight.pop_back() {
                if m.sends >= MAX_PUBLISH_SENDS {
                    self.buffered_bytes -= m.body.len();
                    self.abandoned += 1;
                    warn!(
                        "redis: publish to {} dropped after {} sends without a reply",
                        m.channel, m.sends
                    );
                } else {
                    self.outbox.push_front(m);
                }
            }
            self.expect.clear();
        }
    }

    /// Reconnects, PINGs, moves buffered publishes to the socket, and writes.
    pub fn tick(&mut self, registry: &Registry, now: Instant) {
        for is_sub in [true, false] {
            self.tick_link(registry, is_sub, now);
        }
        if self.publ.state == State::Up && self.all_subscribed() {
            // Re-subscribed first, so our own clients miss nothing we flush.
            while self.publ.pending_out() < PUBLISH_CHUNK && self.inflight.len() < self.max_msgs {
                let Some(mut m) = self.outbox.pop_front() else {
                    break;
                };
                self.publ
                    .send(redis::cmd("PUBLISH").arg(&*m.channel).arg(&m.body[..]));
                m.sends += 1;
                self.expect.push_back(Expect::Publish);
                self.inflight.push_back(m);
            }
        }
        for is_sub in [true, false] {
            let link = self.link(is_sub);
            if let Err(e) = link.write() {
                self.fail(registry, is_sub, &format!("write: {e}"), now);
            }
        }
    }

    fn tick_link(&mut self, registry: &Registry, is_sub: bool, now: Instant) {
        let link = if is_sub {
            &mut self.sub
        } else {
            &mut self.publ
        };
        link.reap();
        match link.state {
            State::Down if now >= link.retry_at => self.start_connect(registry, is_sub, now),
            State::Connecting if link.deadline.is_some_and(|d| now >= d) => {
                let why = if link.is_resolving() {
                    "resolving the host name timed out"
                } else {
                    "connect timed out"
                };
                self.fail(registry, is_sub, why, now)
            }
            State::Handshaking if link.deadline.is_some_and(|d| now >= d) => self.fail(
                registry,
                is_sub,
                "connected, but no reply to login/PING in time",
                now,
            ),
            State::Up => {
                if link.ping_sent.is_some_and(|t| now >= t + self.timeout) {
                    return self.fail(registry, is_sub, "PING unanswered", now);
                }
                if link.ping_sent.is_none() && now >= link.next_ping {
                    link.ping_sent = Some(now);
                    link.next_ping = now + self.ping_interval;
                    link.send(&redis::cmd("PING"));
                    if !is_sub {
                        self.expect.push_back(Expect::Ping);
                    }
                }
            }
            _ => {}
        }
    }

    fn start_connect(&mut self, registry: &Registry, is_sub: bool, now: Instant) {
        let result = self.target.connect().and_then(|mut s| {
            let link = if is_sub { &self.sub } else { &self.publ };
            let ready = match s {
                Stream::Resolving(_) => Ready::READABLE,
                _ => Ready::READABLE | Ready::WRITABLE,
            };
            registry.register(s.source(), link.token, ready)?;
            Ok(s)
        });
        match result {
            Ok(s) => {
                let link = if is_sub {
                    &mut self.sub
                } else {
                    &mut self.publ
                };
                link.stream = Some(s);
                link.state = State::Connecting;
                link.deadline = Some(now + self.timeout);
                debug!("redis {} link connecting", link.name);
            }
            Err(e) => self.fail(registry, is_sub, &format!("connect: {e}"), now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(channel: &str, payload: &str) -> Vec<u8> {
        format!(
            "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n{payload}\r\n",
            channel.len(),
            payload.len()
        )
        .into_bytes()
    }

    /// A backlog (here written into a socket pair before wsfan reads) is taken a budget
    /// at a time, each part fanned out before the next is read, and nothing is lost.
    #[test]
    fn a_backlog_is_read_one_budget_per_iteration_and_all_of_it_arrives() {
        let cfg = Config::parse(Vec::<String>::new(), |_| None).expect("defaults");
        let mut link = RedisLink::new("redis://127.0.0.1:1", &cfg).expect("url");
        link.read_budget = 16 * 1024;
        let (ours, mut redis) = std::os::unix::net::UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("nonblocking");
        link.sub.stream = Some(Stream::Unix(mio::net::UnixStream::from_std(ours)));
        link.sub.state = State::Up;
        let mut wire = Vec::new();
        let mut n = 0;
        while wire.len() < 100 * 1024 {
            wire.extend(push(
                "room",
                &format!("message {n:06} padded to some length"),
            ));
            n += 1;
        }
        std::io::Write::write_all(&mut redis, &wire).expect("fits the socket buffer");
        let poll = mio::Poll::new().expect("poll");
        let mut got = Vec::new();
        link.read(true, Instant::now()).expect("read");
        let mut iterations = 1;
        link.drain(&mut got);
        assert!(link.has_more_to_read(), "stopped at the budget");
        assert!(got.len() < n, "not all in one iteration: {}", got.len());
        while link.has_more_to_read() {
            link.resume_reads(poll.registry(), Instant::now());
            link.drain(&mut got);
            iterations += 1;
            assert!(iterations < 100);
        }
        assert!(
            iterations >= 100 * 1024 / (16 * 1024),
            "{iterations} iterations"
        );
        assert_eq!(got.len(), n);
        for (i, ev) in got.iter().enumerate() {
            let BusEvent::Deliver { payload, .. } = ev else {
                panic!("{ev:?}");
            };
            assert!(payload.starts_with(format!("message {i:06}").as_bytes()));
        }
    }
}

//! The Redis backplane, inside the same poll loop: two non-blocking sockets, no threads.
//!
//! * The **subscription link** holds SUBSCRIBE for every channel with local members
//!   (interest-driven: first member → SUBSCRIBE, last leaves → UNSUBSCRIBE) and receives
//!   every message, ours included — all deliveries come through Redis, so every client
//!   on every instance sees one order per channel.
//! * The **publish link** sends PUBLISH, pipelined: every message of an iteration goes
//!   out in one write.
//!
//! With history on (the default), every publish is a script call that appends it to the
//! channel's history and publishes it with its position ([`history`]), and every
//! instance repairs its own gaps by reading history on the publish link
//! ([`positions`]). So a message is lost only when Redis loses it.
//!
//! The decisions are made by sans-IO cores, each unit-tested without sockets:
//! [`health`] (one link's life: connect, handshake, PING deadline, backoff),
//! [`subs`] (the subscription set, and what each value on the subscription link is),
//! [`outbox`] (publishes and reads waiting, in flight, and what each reply answers) and
//! [`positions`] (each channel's last delivered position, gaps, holds). The I/O shell
//! is this file (the `Backplane` face: events, ticks, stats) and `wire` (reading values
//! into the cores, and each link's connect / handshake / fail as they direct).
//!
//! Where Redis is, beyond one address, is [`topology`]'s: `sentinel` (a third link
//! that asks the sentinels and follows the primary) and `cluster` (a `RedisLink` per
//! primary in sharded mode, behind one `Backplane` face).
//!
//! Commands are encoded with the redis crate; replies are read into a bounded buffer per
//! connection, framed by [`resp`] (which skips a message larger than
//! `--max-message-size` as it streams past) and parsed by the connection's
//! `redis::Parser`. A host name is looked up by a child process (`transport::Resolver`),
//! never on the loop.

pub mod health;
pub mod history;
pub mod outbox;
pub mod positions;
pub mod recovery;
pub mod resp;
pub mod subs;
pub mod target;
pub mod topology;
mod transport;
mod wire;

pub use transport::resolve_main;

use crate::backplane::{Backplane, BusEvent, BusStats, HistoryStats};
use crate::hub::Interest;
use crate::message::StreamPosition;
use crate::token::{REDIS_PUB, REDIS_SENTINEL, REDIS_SUB};
use crate::{envelope, ws::Kind};
use bytes::Bytes;
use health::{Health, Timing};
use history::History;
use log::{debug, warn};
use mio::event::Event;
use mio::Registry;
use outbox::Outbox;
use positions::Positions;
use recovery::Recoveries;
use std::time::{Duration, Instant};
use subs::Subscriptions;
use target::Target;
use topology::sentinel::Sentinels;
use transport::{Link, Progress, Stream};

/// At most one line per this interval for warnings that could flood the log.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// Identical connect failures are logged once per this interval, with a count.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);
/// Bytes read from one Redis link per loop iteration: what they carry is fanned out
/// before more is read, so a backlog in Redis neither starves clients nor piles up here.
const READ_BUDGET: usize = 1024 * 1024;
/// PUBLISH bytes handed to the socket per iteration; the rest waits its turn.
const PUBLISH_CHUNK: usize = 512 * 1024;

/// True when a rate-limited warning may be logged again (and records that it was).
fn log_due(last: &mut Option<Instant>) -> bool {
    let now = Instant::now();
    if last.is_some_and(|t| now - t <= LOG_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

/// `/readyz`'s reason while Redis refuses writes "for now" (`outbox::NOT_NOW`).
fn not_now_reason(code: &str) -> &'static str {
    match code {
        "READONLY" => "redis refusing writes: READONLY (a replica; failover in progress?)",
        "OOM" => "redis refusing writes: OOM (maxmemory reached)",
        "LOADING" => "redis refusing writes: LOADING (loading its dataset)",
        "BUSY" => "redis refusing writes: BUSY (a script is running too long)",
        "MASTERDOWN" => "redis refusing writes: MASTERDOWN (a replica lost its primary)",
        "NOSCRIPT" => "redis lost the history scripts (NOSCRIPT): reloading",
        _ => "redis refusing writes for now (see the log)",
    }
}

/// Which link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Sub,
    Pub,
    /// To a sentinel (`redis+sentinel://` only).
    Sentinel,
}

/// With Sentinel and no primary known yet, the data links look again this often.
const NO_PRIMARY_RETRY: Duration = Duration::from_millis(250);
/// With Sentinel, data link failures ask the sentinels again at most this often (a
/// failover is heard at once through `+switch-master`; this is for a missed one).
const REDISCOVER_EVERY: Duration = Duration::from_secs(1);

/// What the Redis backplane needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub target: Target,
    pub prefix: String,
    /// `--redis-buffer-messages` / `--redis-buffer-bytes`.
    pub buffer_messages: usize,
    pub buffer_bytes: usize,
    /// `--max-message-size`: the largest payload delivered to clients.
    pub max_payload: usize,
    pub timing: Timing,
    /// `--history-size` (0: plain PUBLISH, no history) and `--history-ttl`.
    pub history_size: usize,
    pub history_ttl: Duration,
    /// `--history-hold-bytes`: live messages held while gaps are read, all channels.
    pub hold_bytes: usize,
    /// `--history-key`: authenticated envelopes only.
    pub history_key: Option<crate::envelope::HistoryKey>,
    /// One shard of a Redis Cluster (`cluster::ClusterBackplane`): shard channels, its
    /// own tokens, the instance's one id and publish sequence.
    pub shard: Option<ShardOf>,
}

/// What a shard link shares with the cluster it is part of.
#[derive(Debug, Clone)]
pub struct ShardOf {
    /// The subscription and publish links' tokens.
    pub tokens: (mio::Token, mio::Token),
    pub instance: String,
    pub seq: std::rc::Rc<std::cell::Cell<u64>>,
}

/// A channel handed from one shard link to another (its slot moved): where it was,
/// whether its members were admitted, and its publishes not yet acknowledged.
#[derive(Debug)]
pub struct Handover {
    pub channel: String,
    pub pos: Option<StreamPosition>,
    pub admitted: bool,
    pub publishes: Vec<(Bytes, u64)>,
}

/// The smallest client frame (2-byte header + 4-byte mask, empty payload): a read of
/// N bytes carries at most N / 6 messages.
const MIN_CLIENT_FRAME: usize = 6;

/// The largest bulk reply the publish and sentinel links take whatever
/// `--max-message-size` is (`INFO replication`, a sentinel's answers).
const MIN_REPLY_BULK: usize = 64 * 1024;

/// Room for the position in front of a payload (`0x00 'h' <offset>:<epoch>:`).
const POSITION_ROOM: usize = 64;

/// A random id for this process (dedupe keys): std's hasher keys are random per process.
pub fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// One link: its transport and its health.
struct Conn {
    io: Link,
    health: Health,
}

pub struct RedisLink {
    target: Target,
    max_payload: usize,
    /// Bytes read per link per iteration (`READ_BUDGET`; smaller in unit tests).
    read_budget: usize,
    sub: Conn,
    publ: Conn,
    /// The link to a sentinel, and what it is for (`redis+sentinel://` only).
    sent: Conn,
    sentinels: Option<Sentinels>,
    /// The primary changed: the data links move to it (next tick).
    moved: bool,
    /// A data link failed or found a replica: ask the sentinels again (next tick).
    rediscover: bool,
    last_rediscover: Option<Instant>,
    /// A shard link: something suggests the cluster's topology changed (a `MOVED`,
    /// a link failure, a shard channel dropped by Redis). Taken by the cluster.
    trouble: bool,
    sharded: bool,
    /// A topology answer not yet taken by the cluster (`take_topology`).
    topology: Option<(bool, Result<topology::Topology, String>)>,
    /// A topology question is out on the publish link.
    topology_asked: bool,
    subs: Subscriptions,
    outbox: Outbox,
    positions: Positions,
    /// `--history-key`: envelopes are opened with it (forged ones dropped, counted).
    history_key: Option<crate::envelope::HistoryKey>,
    /// Positioned envelopes without a valid tag (with a key).
    forged: u64,
    /// `Backplane::history` asks not yet answered.
    recoveries: Recoveries,
    events: Vec<BusEvent>,
    rng: u64,
    reconnects: u64,
    oversize: u64,
    connect_failures: u64,
    last_drop_log: Option<Instant>,
    last_oversize_log: Option<Instant>,
    last_refused_log: Option<Instant>,
    last_corrupt_log: Option<Instant>,
    /// Drops already logged (the outbox counts them).
    drops_seen: u64,
    /// History resets logged recently, and those left out of the log since.
    reset_log: (Option<Instant>, u32),
    resets_unlogged: u64,
}

impl RedisLink {
    pub fn new(s: Settings) -> RedisLink {
        let now = Instant::now();
        // Room for the envelope's two bytes and a position; the payload itself is
        // checked after decoding.
        let max_bulk = s.max_payload + 2 + POSITION_ROOM;
        let mut outbox = Outbox::new(s.buffer_messages, s.buffer_bytes);
        if let Some(sh) = &s.shard {
            outbox = outbox.sharded(sh.seq.clone());
        }
        let (sub_token, pub_token) = s
            .shard
            .as_ref()
            .map_or((REDIS_SUB, REDIS_PUB), |sh| sh.tokens);
        if s.history_size > 0 {
            outbox = outbox.with_history(History {
                size: s.history_size,
                ttl: s.history_ttl.as_secs().max(1),
                instance: s
                    .shard
                    .as_ref()
                    .map_or_else(instance_id, |sh| sh.instance.clone()),
                max_entry: s.max_payload + 2,
                key: s.history_key.clone(),
                node: String::new(),
                node2: String::new(),
                myid: String::new(),
            });
        }
        let conn = |name, token, max_bulk| Conn {
            io: Link::new(name, token, max_bulk),
            health: Health::new(s.timing, now),
        };
        RedisLink {
            sub: conn("subscribe", sub_token, max_bulk),
            // Replies on the publish link include `INFO replication` (~0.5 KiB, more
            // with many replicas): a small `--max-message-size` must not skip it.
            publ: conn("publish", pub_token, max_bulk.max(MIN_REPLY_BULK)),
            sent: conn("sentinel", REDIS_SENTINEL, MIN_REPLY_BULK),
            sentinels: s.target.sentinel.clone().map(Sentinels::new),
            moved: false,
            rediscover: false,
            last_rediscover: None,
            trouble: false,
            sharded: s.shard.is_some(),
            topology: None,
            topology_asked: false,
            subs: if s.shard.is_some() {
                Subscriptions::new(&s.prefix).sharded()
            } else {
                Subscriptions::new(&s.prefix)
            },
            outbox,
            positions: Positions::new(s.hold_bytes, s.max_payload),
            recoveries: Recoveries::new(s.hold_bytes, s.max_payload),
            history_key: s.history_key.clone(),
            forged: 0,
            target: s.target,
            max_payload: s.max_payload,
            read_budget: READ_BUDGET,
            events: Vec::new(),
            rng: (std::process::id() as u64) << 32 | now.elapsed().subsec_nanos() as u64 | 1,
            reconnects: 0,
            oversize: 0,
            connect_failures: 0,
            last_drop_log: None,
            last_oversize_log: None,
            last_refused_log: None,
            last_corrupt_log: None,
            drops_seen: 0,
            reset_log: (None, 0),
            resets_unlogged: 0,
        }
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64: jitter only needs to differ between processes and attempts.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn conn(&mut self, side: Side) -> &mut Conn {
        match side {
            Side::Sub => &mut self.sub,
            Side::Pub => &mut self.publ,
            Side::Sentinel => &mut self.sent,
        }
    }

    /// The links in use: the data links, and with Sentinel the link to a sentinel.
    fn sides(&self) -> &'static [Side] {
        if self.sentinels.is_some() {
            &[Side::Sub, Side::Pub, Side::Sentinel]
        } else {
            &[Side::Sub, Side::Pub]
        }
    }

    /// One line per channel whose history began again, at most 10 per 5 s; the rest
    /// are counted into the next line (and always in `wsfan_history_resets_total`).
    fn log_resets(&mut self) {
        let mut gaps = std::mem::take(&mut self.positions.gaps);
        gaps.dedup();
        self.events.extend(gaps.into_iter().map(BusEvent::Gap));
        for r in std::mem::take(&mut self.positions.resets) {
            let now = Instant::now();
            let (since, n) = &mut self.reset_log;
            if since.is_none_or(|t| now - t > LOG_EVERY) {
                *since = Some(now);
                *n = 0;
            }
            if *n >= 10 {
                self.resets_unlogged += 1;
                continue;
            }
            *n += 1;
            let more = std::mem::take(&mut self.resets_unlogged);
            let more = if more > 0 {
                format!(" ({more} more channels not logged)")
            } else {
                String::new()
            };
            match (&r.new, r.fork) {
                (Some(new), Some((at, lost))) => warn!(
                    "redis: history of channel {} forked at offset {at} (epoch {} -> {new}): another Redis took over (a promoted replica, or a restart) and goes on from there; {lost} messages delivered here past it are not in its history{more}",
                    r.channel, r.old
                ),
                (Some(new), None) => warn!(
                    "redis: history of channel {} began again (epoch {} -> {new}): what Redis held of the old one and was not delivered is lost{more}",
                    r.channel, r.old
                ),
                (None, _) => warn!(
                    "redis: history of channel {} (epoch {}) is gone (expired, or Redis lost it): what was published meanwhile and not delivered is lost{more}",
                    r.channel, r.old
                ),
            }
        }
    }

    /// Sends wanted history reads (gap repair first, then asks) while the publish link
    /// can take them.
    fn send_reads(&mut self) {
        if !self.publ.health.is_up() || !self.outbox.can_send() {
            return;
        }
        while self.publ.io.pending_out() < PUBLISH_CHUNK {
            let Some(req) = self.positions.next_read() else {
                break;
            };
            let name = self.subs.redis_name(&req.channel);
            if let Some(cmd) = self.outbox.send_read(&name, req) {
                self.publ.io.send(&cmd);
            }
        }
        while self.publ.io.pending_out() < PUBLISH_CHUNK {
            let Some(req) = self.recoveries.next_read() else {
                break;
            };
            let name = self.subs.redis_name(&req.key.0);
            if let Some(cmd) = self.outbox.send_recover(&name, req) {
                self.publ.io.send(&cmd);
            }
        }
    }

    /// Both links proven and the scripts loaded: the outbox drains (once channels being
    /// subscribed are confirmed, a matter of a round trip). O(1): asked on every client
    /// read, so it does not walk the subscriptions as `all_confirmed` does.
    fn flowing(&self) -> bool {
        self.publ.health.is_up() && self.sub.health.is_up() && self.outbox.can_send()
    }

    // ---- one shard of a cluster (`cluster::ClusterBackplane`) --------------------------

    /// Whether something suggested the topology changed since the last call.
    pub fn take_trouble(&mut self) -> bool {
        std::mem::take(&mut self.trouble)
    }

    /// Asks this node for the cluster's topology if its publish link is up and no
    /// question is out; whether it was asked.
    pub fn ask_topology(&mut self, slots: bool) -> bool {
        if self.topology_asked || !self.publ.health.is_up() {
            return false;
        }
        let cmd = self.outbox.ask_topology(slots);
        self.publ.io.send(&cmd);
        self.topology_asked = true;
        true
    }

    /// The publish link is up (a topology question could go out).
    pub fn publish_link_up(&self) -> bool {
        self.publ.health.is_up()
    }

    /// The answer to `ask_topology`, once.
    pub fn take_topology(&mut self) -> Option<(bool, Result<topology::Topology, String>)> {
        self.topology.take()
    }

    /// Where this link's Redis is.
    pub fn addr(&self) -> &target::Addr {
        &self.target.addr
    }

    /// Some channel is tracked here (wanted, or leaving).
    pub fn holds_channels(&self) -> bool {
        !self.subs.is_empty()
    }

    /// The channels local members want here.
    pub fn wanted(&self) -> Vec<String> {
        self.subs.wanted()
    }

    /// Hands a channel over to another shard link (its slot moved): unsubscribed here
    /// (if the link is up), its position and unacknowledged publishes taken out.
    pub fn hand_over(&mut self, channel: &str) -> Option<Handover> {
        let up = self.sub.health.is_up();
        let cmd = self.subs.unwant(channel, up);
        if let Some(cmd) = cmd {
            self.sub.io.send(&cmd);
        }
        let (pos, admitted) = self.positions.take(channel).unwrap_or((None, false));
        let name = self.subs.redis_name(channel);
        let publishes = self.outbox.take_channel(&name);
        Some(Handover {
            channel: channel.to_string(),
            pos,
            admitted,
            publishes,
        })
    }

    /// Takes a channel over from another shard link (`hand_over`): subscribed here,
    /// going on from its position, its publishes sent first.
    pub fn take_over(&mut self, h: Handover) {
        self.positions.adopt(&h.channel, h.pos, h.admitted);
        let name = self.subs.redis_name(&h.channel);
        self.outbox.give_channel(&name, h.publishes);
        self.interest(Interest::Subscribe(h.channel.into()));
    }

    /// Points both links at another node (the same slots' new primary): they leave the
    /// old one at once; every channel repairs its gap there.
    pub fn retarget(&mut self, registry: &Registry, addr: target::Addr, now: Instant) {
        self.target.addr = addr;
        for side in [Side::Sub, Side::Pub] {
            if self.conn(side).health.phase != health::Phase::Down {
                self.fail(registry, side, "its slots moved to another node", now);
            }
            self.conn(side).health.retry_now(now);
        }
    }

    /// Closes both links (the shard is no longer used).
    pub fn close(&mut self, registry: &Registry) {
        self.sub.io.close(registry);
        self.publ.io.close(registry);
    }

    fn log_drops(&mut self) {
        if self.outbox.dropped > self.drops_seen {
            self.drops_seen = self.outbox.dropped;
            if log_due(&mut self.last_drop_log) {
                warn!(
                    "redis publish buffer full (Redis unreachable, or slower than the publishers): dropping oldest messages ({} dropped so far)",
                    self.outbox.dropped
                );
            }
        }
    }
}

impl Backplane for RedisLink {
    fn describe(&self) -> String {
        format!("redis {}", self.target.display())
    }

    fn interest(&mut self, i: Interest) {
        let up = self.sub.health.is_up();
        let cmd = match i {
            Interest::Subscribe(ch) => self.subs.want(&ch, up),
            Interest::Unsubscribe(ch) => {
                self.positions.forget(&ch);
                self.subs.unwant(&ch, up)
            }
        };
        if let Some(cmd) = cmd {
            self.sub.io.send(&cmd);
        }
    }

    /// Subscribed, and with history on, the channel's position read answered (its
    /// members are admitted at a position history confirmed).
    fn is_subscribed(&self, channel: &str) -> bool {
        self.sub.health.is_up()
            && self.subs.is_confirmed(channel)
            && (!self.outbox.history_on() || self.positions.admitted(channel))
    }

    fn publish(&mut self, channel: &str, kind: Kind, payload: Bytes) {
        let body = envelope::encode(kind, &payload);
        self.outbox.push(self.subs.redis_name(channel), body);
        self.log_drops();
    }

    /// Read on the publish link, shared with asks of the same channel and position;
    /// with history off there is nothing to read: `Failed` at once.
    fn history(&mut self, id: u64, channel: &str, since: Option<StreamPosition>, limit: usize) {
        if !self.outbox.history_on() {
            self.events.push(BusEvent::History {
                id,
                channel: channel.to_string(),
                answer: crate::backplane::Recovery::Lost { top: None },
            });
            return;
        }
        self.recoveries.ask(id, channel, since, limit);
    }

    fn history_window(
        &mut self,
        id: u64,
        channel: &str,
        after: StreamPosition,
        limit: usize,
        skip_trimmed: bool,
    ) {
        if !self.outbox.history_on() {
            return self.history(id, channel, Some(after), limit);
        }
        self.recoveries
            .ask_window(id, channel, after, limit, skip_trimmed);
    }

    /// Over the limit while flowing too: with backpressure, WebSocket publishers wait
    /// for room, and the publish API answers 503 rather than drop a buffered message.
    fn is_full(&self, extra: usize) -> bool {
        self.outbox.over_limit(extra)
    }

    /// While the links work, client input is read only as far as the publishes in it
    /// fit the outbox: a masked client frame is at least `MIN_CLIENT_FRAME` bytes, and
    /// carries at most its own length in payload. One message of room is held back for
    /// a frame that a connection had half read before (it completes with this read).
    /// An empty outbox always allows one frame, so reading never stops for good.
    fn intake_room(&self) -> Option<usize> {
        if !self.flowing() {
            return None;
        }
        let (msgs, bytes) = self.outbox.room();
        let room = msgs
            .saturating_sub(1)
            .saturating_mul(MIN_CLIENT_FRAME)
            .min(bytes.saturating_sub(self.max_payload + 2));
        Some(if self.outbox.is_empty() {
            room.max(MIN_CLIENT_FRAME)
        } else {
            room
        })
    }

    fn backlogged(&self) -> bool {
        self.flowing() && self.outbox.half_full()
    }

    fn drain(&mut self, out: &mut Vec<BusEvent>) {
        out.append(&mut self.events);
    }

    /// `Ok` when a publish and a subscribe would work now: both links proved by a
    /// round trip, every wanted channel confirmed, and no PING left waiting.
    fn ready(&self, now: Instant) -> Result<(), &'static str> {
        if let Some(code) = &self.outbox.not_now {
            return Err(not_now_reason(code));
        }
        if self.sentinels.is_some() && !self.primary_known() {
            return Err("redis primary not known yet (asking the sentinels)");
        }
        if !self.sub.health.is_up() {
            return Err("redis subscription link down");
        }
        if !self.publ.health.is_up() {
            return Err("redis publish link down");
        }
        if !self.subs.all_confirmed() {
            return Err("redis subscribing");
        }
        if !self.outbox.can_send() {
            return Err("redis loading the history scripts");
        }
        if self.sub.health.ping_late(now) {
            return Err("redis not answering PING on the subscription link");
        }
        if self.publ.health.ping_late(now) {
            return Err("redis not answering PING on the publish link");
        }
        Ok(())
    }

    fn on_event(&mut self, registry: &Registry, ev: &Event, now: Instant) {
        let t = ev.token();
        let side = if t == self.sub.io.token {
            Side::Sub
        } else if t == self.publ.io.token {
            Side::Pub
        } else {
            Side::Sentinel
        };
        let c = self.conn(side);
        if c.health.phase == health::Phase::Connecting {
            let Some(progress) = c.io.stream.as_mut().map(Stream::progress) else {
                return;
            };
            match progress {
                Ok(Progress::Connected) => self.on_connected(side, now),
                Ok(Progress::Waiting) => return,
                Ok(Progress::Resolved(mut addrs)) => {
                    debug!("redis {} link: resolved to {addrs:?}", c.io.name);
                    // Each failed attempt starts one address further: one that swallows
                    // connects (silence, not a refusal) cannot hold every attempt.
                    let start = c.health.failures() as usize % addrs.len().max(1);
                    addrs.rotate_left(start);
                    c.io.addrs = addrs.into();
                    if let Err(e) = c.io.connect_next(registry) {
                        self.fail(registry, side, &format!("connect: {e}"), now);
                    }
                    return;
                }
                Err(e) if c.io.is_resolving() => {
                    return self.fail(registry, side, &format!("resolve: {e}"), now)
                }
                // Refused: try the next address the name resolved to, if any.
                Err(e) => {
                    if c.io.addrs.is_empty() || c.io.connect_next(registry).is_err() {
                        self.fail(registry, side, &format!("connect: {e}"), now);
                    }
                    return;
                }
            }
        }
        let c = self.conn(side);
        if !c.health.connected() {
            return;
        }
        if ev.is_writable() {
            if let Err(e) = c.io.write() {
                return self.fail(registry, side, &format!("write: {e}"), now);
            }
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            if let Err(why) = self.read(side, now) {
                self.fail(registry, side, &why, now);
            }
        }
    }

    /// Links whose read stopped at the budget: read on (before this iteration's
    /// deliveries are fanned out).
    fn resume_reads(&mut self, registry: &Registry, now: Instant) {
        for &side in self.sides() {
            let c = self.conn(side);
            if std::mem::take(&mut c.io.more_to_read) && c.health.connected() {
                if let Err(why) = self.read(side, now) {
                    self.fail(registry, side, &why, now);
                }
            }
        }
    }

    fn has_more_to_read(&self) -> bool {
        self.sub.io.more_to_read || self.publ.io.more_to_read || self.sent.io.more_to_read
    }

    /// Reconnects, PINGs, moves buffered publishes to the socket, and writes.
    fn tick(&mut self, registry: &Registry, now: Instant) {
        if self.sentinels.is_some() {
            self.follow_primary(registry, now);
        }
        for &side in self.sides() {
            self.tick_link(registry, side, now);
        }
        self.send_reads();
        if self.publ.health.is_up() && self.sub.health.is_up() && self.subs.all_confirmed() {
            // Re-subscribed first, so our own clients miss nothing we flush.
            while self.publ.io.pending_out() < PUBLISH_CHUNK {
                let Some(cmd) = self.outbox.send_next() else {
                    break;
                };
                self.publ.io.send(&cmd);
            }
        }
        for &side in self.sides() {
            let c = self.conn(side);
            if !c.health.connected() {
                continue;
            }
            if let Err(e) = c.io.write() {
                self.fail(registry, side, &format!("write: {e}"), now);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let sent = self.sentinels.as_ref().map(|_| &self.sent);
        [Some(&self.sub), Some(&self.publ), sent]
            .into_iter()
            .flatten()
            .filter_map(|c| c.health.next_deadline())
            .min()
    }

    fn pending(&self) -> usize {
        self.outbox.len()
    }

    fn stats(&self, now: Instant) -> BusStats {
        BusStats {
            up: self.ready(now).is_ok(),
            reconnects: self.reconnects,
            buffered_messages: self.outbox.len(),
            buffered_bytes: self.outbox.bytes(),
            dropped: self.outbox.dropped,
            oversize: self.oversize,
            published: self.outbox.published,
            publish_abandoned: self.outbox.abandoned,
            connect_failures: self.connect_failures,
            history: HistoryStats {
                corrupt_dedupe: self.outbox.corrupt_dedupe,
                corrupt_meta: self.outbox.corrupt_meta,
                forged: self.forged,
                ..self.positions.stats
            },
            publish_refused: self.outbox.refused,
            held_bytes: self.positions.held_bytes(),
            history_bytes: 0,
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
        let mut link = RedisLink::new(Settings {
            target: Target::parse("redis://127.0.0.1:1").expect("url"),
            prefix: String::new(),
            buffer_messages: 10,
            buffer_bytes: 1000,
            max_payload: 65536,
            history_size: 0,
            history_ttl: Duration::from_secs(60),
            hold_bytes: 1 << 20,
            history_key: None,
            shard: None,
            timing: Timing {
                ping_interval: Duration::from_secs(3),
                timeout: Duration::from_secs(5),
                backoff_max: Duration::from_secs(5),
            },
        });
        link.read_budget = 16 * 1024;
        link.subs.want("room", false); // a local member wants it
        let (ours, mut redis) = std::os::unix::net::UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("nonblocking");
        link.sub.io.stream = Some(Stream::Unix(mio::net::UnixStream::from_std(ours)));
        let now = Instant::now();
        link.sub.health.on_connecting(now);
        link.sub.health.on_connected(0, now);
        link.sub
            .health
            .on_handshake_reply(&redis::Value::SimpleString("PONG".into()), now)
            .expect("up");
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
        link.read(Side::Sub, now).expect("read");
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

    /// Runs the link in a poll loop until `done` says so (10 s at most).
    fn drive(
        link: &mut RedisLink,
        poll: &mut mio::Poll,
        out: &mut Vec<BusEvent>,
        mut done: impl FnMut(&[BusEvent]) -> bool,
    ) {
        let mut events = mio::Events::with_capacity(64);
        let end = Instant::now() + Duration::from_secs(10);
        while !done(out) {
            assert!(Instant::now() < end, "timed out; got {out:?}");
            let now = Instant::now();
            link.tick(poll.registry(), now);
            poll.poll(&mut events, Some(Duration::from_millis(10)))
                .expect("poll");
            for ev in events.iter() {
                link.on_event(poll.registry(), ev, Instant::now());
            }
            link.resume_reads(poll.registry(), Instant::now());
            link.drain(out);
        }
    }

    /// `Backplane::history` on a real redis-server: asks for one position share a read
    /// and get what followed it, with positions; another epoch is lost; a top-only ask
    /// gets the top.
    #[test]
    fn history_asks_are_answered_from_a_real_redis() {
        use crate::backplane::Recovery;
        use crate::message::Epoch;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        struct Server(std::process::Child);
        impl Drop for Server {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _redis = Server(
            std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("redis-server must be installed (see README)"),
        );
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut link = RedisLink::new(Settings {
            target: Target::parse(&format!("redis://127.0.0.1:{port}")).expect("url"),
            prefix: String::new(),
            buffer_messages: 100,
            buffer_bytes: 1 << 20,
            max_payload: 65536,
            history_size: 100,
            history_ttl: Duration::from_secs(60),
            hold_bytes: 1 << 20,
            history_key: None,
            shard: None,
            timing: Timing {
                ping_interval: Duration::from_secs(3),
                timeout: Duration::from_secs(5),
                backoff_max: Duration::from_secs(1),
            },
        });
        let mut poll = mio::Poll::new().expect("poll");
        let mut out = Vec::new();
        link.interest(Interest::Subscribe("c".into()));
        drive(&mut link, &mut poll, &mut out, |o| {
            o.contains(&BusEvent::Subscribed("c".into()))
        });
        for i in 1..=3 {
            link.publish("c", Kind::Text, Bytes::from(format!("m{i}")));
        }
        let delivered = |o: &[BusEvent]| {
            o.iter()
                .filter_map(|e| match e {
                    BusEvent::Deliver { pos, .. } => pos.clone(),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        drive(&mut link, &mut poll, &mut out, |o| delivered(o).len() == 3);
        let positions = delivered(&out);
        assert_eq!(
            positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        out.clear();
        link.history(1, "c", Some(positions[0].clone()), 10);
        link.history(2, "c", Some(positions[0].clone()), 10);
        let other = StreamPosition::new(Epoch::from_static("zz"), 1);
        link.history(3, "c", Some(other), 10);
        link.history(4, "c", None, 10);
        link.history(5, "c", Some(positions[0].clone()), 1);
        let answers = |o: &[BusEvent]| {
            o.iter()
                .filter_map(|e| match e {
                    BusEvent::History { id, answer, .. } => Some((*id, answer.clone())),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        drive(&mut link, &mut poll, &mut out, |o| answers(o).len() == 5);
        let mut got = answers(&out);
        got.sort_by_key(|a| a.0);
        let top = Some(positions[2].clone());
        match &got[0].1 {
            Recovery::Complete {
                publications,
                top: t,
            } => {
                let m: Vec<_> = publications
                    .iter()
                    .map(|p| (p.pos.clone(), p.payload.clone()))
                    .collect();
                assert_eq!(
                    m,
                    [
                        (positions[1].clone(), Bytes::from("m2")),
                        (positions[2].clone(), Bytes::from("m3"))
                    ]
                );
                assert_eq!(t, &top);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(got[1].1, got[0].1, "one read, one answer");
        assert_eq!(got[2].1, Recovery::Lost { top: top.clone() });
        assert!(
            matches!(&got[3].1, Recovery::Complete { publications, top: t } if publications.is_empty() && t == &top)
        );
        assert_eq!(got[4].1, Recovery::Lost { top }, "over its limit of 1");
        assert_eq!(link.recoveries.len(), 0);
    }
}

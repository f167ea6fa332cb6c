//! The Redis backplane's wire side: reading values and handing them to the cores, and
//! each link's life (connect, handshake, up, fail) as the cores direct it.

use super::health::{self, Due};
use super::outbox::{self, Reply};
use super::resp::Next;
use super::subs::{self, SubReply};
use super::target::{Addr, Target};
use super::topology::sentinel::{self, Heard};
use super::transport::{self, Stream};
use super::{log_due, RedisLink, Side, FAILURE_LOG_EVERY, NO_PRIMARY_RETRY, REDISCOVER_EVERY};
use crate::backplane::BusEvent;
use crate::envelope;
use bytes::Bytes;
use log::{debug, error, info, warn};
use mio::{Interest as Ready, Registry};
use redis::Value;
use std::io::Read;
use std::time::Instant;

impl RedisLink {
    // ---- reading --------------------------------------------------------------------

    /// Handles every complete value available, until the socket would block or this
    /// iteration's read budget is spent (then `resume_reads` goes on next iteration).
    pub(super) fn read(&mut self, side: Side, now: Instant) -> Result<(), String> {
        let mut budget = self.read_budget;
        loop {
            let link = &mut self.conn(side).io;
            let Some(stream) = link.stream.as_mut() else {
                return Ok(());
            };
            match link.rbuf.frame() {
                Ok(Next::Ready) => loop {
                    let link = &mut self.conn(side).io;
                    let Some(v) = link.rbuf.parse_one(&mut link.parser) else {
                        break;
                    };
                    let v = v.map_err(|e| format!("parse: {e}"))?;
                    self.on_value(side, v, now)?;
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

    pub(super) fn on_value(&mut self, side: Side, v: Value, now: Instant) -> Result<(), String> {
        let c = self.conn(side);
        if c.health.phase == health::Phase::Handshaking {
            // With Sentinel, a data link's handshake has a ROLE: only a master will do.
            let v = match v {
                Value::Array(_) if side != Side::Sentinel && self.sentinels.is_some() => {
                    sentinel::role_is_master(&v)?;
                    Value::Okay
                }
                v => v,
            };
            let c = self.conn(side);
            if c.health.on_handshake_reply(&v, now)? {
                self.on_up(side);
            }
            return Ok(());
        }
        match side {
            Side::Sentinel => self.on_sentinel_value(v),
            Side::Sub => self.on_sub_value(v),
            Side::Pub => {
                let reply = self.outbox.on_reply(v).map_err(|e| e.why)?;
                self.on_pub_reply(reply);
                Ok(())
            }
        }
    }

    fn on_pub_reply(&mut self, reply: Reply) {
        match reply {
            Reply::Published { flags } => {
                // (Bit 4, a fork, is logged by the readers that cross it.)
                if flags & 3 != 0 && log_due(&mut self.last_corrupt_log) {
                    warn!(
                        "redis: a channel's history keys were corrupt (dedupe value beyond what this instance sent, or a meta hash wsfan did not write): overwritten ({} dedupe, {} meta so far)",
                        self.outbox.corrupt_dedupe, self.outbox.corrupt_meta
                    );
                }
            }
            Reply::Nothing | Reply::Pong => {
                if reply == Reply::Pong {
                    self.publ.health.on_pong();
                }
            }
            Reply::Loaded => debug!("redis: history scripts loaded"),
            Reply::Topology(slots, r) => {
                self.topology_asked = false;
                self.topology = Some((slots, r));
            }
            Reply::Range(req, r) => {
                let r = r.map_err(|(reason, e)| {
                    if log_due(&mut self.last_refused_log) {
                        warn!(
                            "redis: history read of channel {} refused ({}): {e}; what it was to confirm is dropped and counted",
                            req.channel,
                            reason.label()
                        );
                    }
                });
                self.positions.on_range(&req, r, &mut self.events);
                self.log_resets();
            }
            Reply::Recovered(req, r) => {
                let r = r.map_err(|(reason, e)| {
                    if log_due(&mut self.last_refused_log) {
                        warn!(
                            "redis: history read for a client of channel {} refused ({}): {e}",
                            req.key.0,
                            reason.label()
                        );
                    }
                });
                self.recoveries.on_range(&req, r, &mut self.events);
            }
            Reply::Refused(reason, e) => {
                if log_due(&mut self.last_refused_log) {
                    let total: u64 = self.outbox.refused.iter().sum();
                    warn!(
                        "redis refused a publish ({}): {e}; dropped and counted ({total} refused so far)",
                        reason.label()
                    );
                }
            }
        }
    }

    pub(super) fn on_sub_value(&mut self, v: Value) -> Result<(), String> {
        match subs::classify(v)? {
            SubReply::Message { channel, payload } => {
                let Some(name) = self.subs.local_name(&channel) else {
                    return Ok(()); // not ours (another prefix)
                };
                if !self.subs.is_wanted(name) {
                    // In flight when the last member left: nobody to deliver to, and
                    // no position to keep for a channel we no longer follow.
                    return Ok(());
                }
                let name = name.to_string();
                let raw = Bytes::from(payload);
                let (pos, body) = match &self.history_key {
                    Some(key) => match key.open(&raw) {
                        envelope::Opened::Genuine(pos, body) => (Some(pos), body),
                        envelope::Opened::Plain(raw) => (None, raw),
                        envelope::Opened::Forged => {
                            self.forged += 1;
                            return Ok(()); // a position nobody with the key claimed
                        }
                    },
                    None => match envelope::split_position(&raw) {
                        Some((pos, body)) => (Some(pos), body),
                        None => (None, raw),
                    },
                };
                if body.len() > self.max_payload + 2 {
                    self.count_oversize();
                    return Ok(());
                }
                // With history off this instance cannot read gaps: positions are
                // taken off and the message delivered as it comes.
                let pos = pos.filter(|_| self.outbox.history_on());
                let before = self.positions.stats.oversize;
                self.positions
                    .on_message(&name, pos, body, &mut self.events);
                if self.positions.stats.oversize > before {
                    self.count_oversize();
                }
                self.log_resets();
            }
            SubReply::Ack(ch) if self.sharded && !self.subs.is_pending(&ch) => {
                // `sunsubscribe` from Redis itself: the slot moved away.
                if self.subs.on_lost(&ch) {
                    debug!("redis: a shard channel was dropped by Redis (its slot moved?)");
                    self.trouble = true;
                }
            }
            SubReply::Refused(text) => {
                let code = text.split_whitespace().next().unwrap_or("");
                if self.sharded && ["MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN"].contains(&code) {
                    // A subscription this node does not serve: the cluster moves it.
                    self.subs.on_refused();
                    self.trouble = true;
                } else {
                    return Err(format!("server error: {text}"));
                }
            }
            SubReply::Ack(ch) => {
                if let Some(name) = self.subs.on_ack(&ch) {
                    debug!("redis: subscribed channel={name}");
                    if self.outbox.history_on() {
                        // Members are admitted once the position read answers.
                        self.positions.on_confirmed(&name, &mut self.events);
                    } else {
                        self.events.push(BusEvent::Subscribed(name));
                    }
                }
            }
            SubReply::Pong => self.sub.health.on_pong(),
            SubReply::Other(kind) => debug!("redis subscribe link: ignoring push {kind:?}"),
        }
        Ok(())
    }

    /// A message larger than `--max-message-size` (from a publisher other than wsfan)
    /// is not delivered: clients would have to be cut off for it.
    pub(super) fn count_oversize(&mut self) {
        self.oversize += 1;
        if log_due(&mut self.last_oversize_log) {
            warn!(
                "redis: message larger than --max-message-size {} bytes not delivered ({} so far)",
                self.max_payload, self.oversize
            );
        }
    }

    // ---- the link's life ------------------------------------------------------------

    /// TCP connected: send the login commands and a PING; up when all are answered.
    pub(super) fn on_connected(&mut self, side: Side, now: Instant) {
        let mut login = Vec::new();
        if side == Side::Sentinel {
            // Sentinels are asked without AUTH; a PING proves the link.
            let c = self.conn(side);
            c.health.on_connected(0, now);
            c.io.send(&redis::cmd("PING"));
            return;
        }
        if let Some(pass) = &self.target.password {
            let mut c = redis::cmd("AUTH");
            if let Some(u) = &self.target.username {
                c.arg(u);
            }
            login.push(c.arg(pass).clone());
        }
        if side == Side::Pub && self.target.db != 0 {
            login.push(redis::cmd("SELECT").arg(self.target.db).clone());
        }
        if self.sentinels.is_some() {
            login.push(redis::cmd("ROLE"));
        }
        let c = self.conn(side);
        c.health.on_connected(login.len(), now);
        for cmd in &login {
            c.io.send(cmd);
        }
        c.io.send(&redis::cmd("PING"));
        debug!("redis {} link connected, handshaking", c.io.name);
    }

    pub(super) fn on_up(&mut self, side: Side) {
        let target = self.target.display();
        let c = self.conn(side);
        if side == Side::Sentinel {
            debug!("redis sentinel link up");
        } else {
            info!("redis {} link up ({target})", c.io.name);
        }
        if c.health.take_reconnect() {
            self.reconnects += 1;
        }
        let cmds = match side {
            Side::Sub => self.subs.on_up(),
            Side::Pub => self.outbox.on_up(),
            Side::Sentinel => self.sentinels.as_mut().map_or(Vec::new(), |s| s.on_up()),
        };
        let c = self.conn(side);
        for cmd in &cmds {
            c.io.send(cmd);
        }
    }

    pub(super) fn fail(&mut self, registry: &Registry, side: Side, why: &str, now: Instant) {
        let jitter = self.jitter();
        let target = self.target.display();
        let c = self.conn(side);
        if !c.health.is_up() {
            self.connect_failures += 1;
        }
        let c = self.conn(side);
        c.io.close(registry);
        let (was_up, retry) = c.health.on_failed(now, jitter);
        if was_up {
            error!(
                "redis {} link lost ({why}); reconnecting in {retry:?}",
                c.io.name
            );
        } else if let Some(unlogged) = c.health.log_failure(why, now, FAILURE_LOG_EVERY) {
            let more = if unlogged > 0 {
                format!(" ({unlogged} more like it not logged)")
            } else {
                String::new()
            };
            warn!(
                "redis {} link to {target} failed ({why}); retrying in {retry:?}{more}",
                c.io.name
            );
        }
        if side != Side::Sentinel && self.sentinels.is_some() {
            // Any data link failure asks the sentinels again: the primary may have moved.
            self.rediscover = true;
        }
        if self.sharded {
            self.trouble = true;
        }
        match side {
            Side::Sentinel => {}
            Side::Sub => self.subs.on_down(),
            Side::Pub => {
                self.topology_asked = false;
                self.positions.on_publish_link_down();
                self.recoveries.on_down();
                for ch in self.outbox.on_down() {
                    warn!(
                        "redis: publish to {ch} dropped after {} sends without a reply",
                        outbox::MAX_PUBLISH_SENDS
                    );
                }
            }
        }
    }

    pub(super) fn start_connect(&mut self, registry: &Registry, side: Side, now: Instant) {
        let known = self.primary_known();
        let target = match (side, &mut self.sentinels) {
            (Side::Sentinel, Some(s)) => {
                let (host, port) = s.pick();
                Target {
                    addr: Addr::Tcp(host, port),
                    username: None,
                    password: None,
                    db: 0,
                    sentinel: None,
                }
            }
            (_, Some(_)) if !known => {
                // No sentinel has named the primary yet: look again shortly.
                self.conn(side).health.wait_until(now + NO_PRIMARY_RETRY);
                return;
            }
            _ => self.target.clone(),
        };
        let result = transport::connect(&target).and_then(|mut s| {
            let ready = match s {
                Stream::Resolving(_) => Ready::READABLE,
                _ => Ready::READABLE | Ready::WRITABLE,
            };
            registry.register(s.source(), self.conn(side).io.token, ready)?;
            Ok(s)
        });
        match result {
            Ok(s) => {
                let c = self.conn(side);
                c.io.stream = Some(s);
                c.health.on_connecting(now);
                debug!("redis {} link connecting", c.io.name);
            }
            Err(e) => self.fail(registry, side, &format!("connect: {e}"), now),
        }
    }

    pub(super) fn tick_link(&mut self, registry: &Registry, side: Side, now: Instant) {
        let c = self.conn(side);
        c.io.reap();
        match c.health.on_timer(now) {
            Due::Nothing => {}
            Due::Connect => self.start_connect(registry, side, now),
            Due::Fail(why) => {
                let why = if why == "connect timed out" && c.io.is_resolving() {
                    "resolving the host name timed out"
                } else {
                    why
                };
                self.fail(registry, side, why, now)
            }
            Due::Ping => {
                c.io.send(&redis::cmd("PING"));
                if side == Side::Pub {
                    self.outbox.ping_sent();
                }
            }
        }
    }

    // ---- following the primary through Sentinel -------------------------------------

    /// A sentinel has named the primary (the data links have an address).
    pub(super) fn primary_known(&self) -> bool {
        !matches!(&self.target.addr, Addr::Tcp(_, 0))
    }

    pub(super) fn on_sentinel_value(&mut self, v: Value) -> Result<(), String> {
        let Some(s) = self.sentinels.as_mut() else {
            return Ok(());
        };
        match s.on_value(v)? {
            Heard::Nothing => {}
            Heard::Pong => self.sent.health.on_pong(),
            Heard::Primary(host, port) => {
                let new = Addr::Tcp(host.clone(), port);
                if !matches!(&self.target.addr, Addr::Tcp(h, p) if *h == host && *p == port) {
                    let master = s.master().to_string();
                    if self.primary_known() {
                        warn!(
                            "redis: the sentinels name a new primary of {master}: {host}:{port} (was {}); both links move to it",
                            self.target.display()
                        );
                    } else {
                        info!("redis: the sentinels name the primary of {master}: {host}:{port}");
                    }
                    self.target.addr = new;
                    self.moved = true;
                }
            }
        }
        Ok(())
    }

    /// With Sentinel, once per tick: data links leave a primary that is no longer one,
    /// and a data link failure asks the sentinels again (their link restarts, on the
    /// next sentinel, and asks for the address first).
    pub(super) fn follow_primary(&mut self, registry: &Registry, now: Instant) {
        if std::mem::take(&mut self.moved) {
            for side in [Side::Sub, Side::Pub] {
                if self.conn(side).health.phase != health::Phase::Down {
                    self.fail(registry, side, "the primary moved", now);
                }
                self.conn(side).health.retry_now(now);
            }
            self.rediscover = false;
        }
        let due = self
            .last_rediscover
            .is_none_or(|t| now.saturating_duration_since(t) >= REDISCOVER_EVERY);
        if self.rediscover && due {
            self.rediscover = false;
            if self.sent.health.connected() {
                debug!("redis: a data link failed; asking the sentinels again");
                self.last_rediscover = Some(now);
                self.sent.io.close(registry);
                self.sent.health.wait_until(now);
            }
        }
    }
}

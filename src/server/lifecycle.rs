//! Closing connections, timers (deadlines, keepalive), the log summary and staged
//! shutdown.

use super::{Server, CLOSE_LINGER, SUMMARY_EVERY, TIMER_SLACK};
use crate::conn::{Phase, Reason};
use crate::hub::ConnId;
use crate::metrics::Rejection;
use crate::ws;
use bytes::Bytes;
use log::{debug, info, warn};
use std::cmp::Reverse;
use std::time::Instant;

impl Server {
    /// Stops reading messages, queues `last` (a close frame or response), writes what is
    /// queued, then shuts the write side and lingers for the peer's EOF.
    pub(super) fn begin_close(
        &mut self,
        id: ConnId,
        reason: Reason,
        last: Option<Bytes>,
        now: Instant,
    ) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        if matches!(c.phase, Phase::Closing) {
            return;
        }
        debug!("conn={} peer={} closing: {}", id.0, c.peer, reason.label());
        c.phase = Phase::Closing;
        c.reason = Some(reason);
        self.metrics.disconnect(reason); // counted when decided, not when the peer acks
        c.inbuf = Vec::new();
        // A closing connection's fragments are freed now, and their budget with them.
        self.reassembly_bytes -= c.decoder.held();
        c.decoder = ws::Decoder::default();
        self.sessions.remove(&id.0);
        if let Some(b) = last {
            c.out.push(b);
        }
        for i in self.hub.leave_all(id) {
            self.bus.interest(i);
        }
        self.set_deadline(id, now + CLOSE_LINGER);
        self.mark_flush(id);
    }

    /// Closes the socket now.
    pub(super) fn drop_conn(&mut self, id: ConnId, reason: Reason) {
        let Some(mut c) = self.conns.try_remove(id.0) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.reassembly_bytes -= c.decoder.held();
        self.sessions.remove(&id.0);
        let reason = match c.reason {
            Some(r) => r, // counted in begin_close
            None => {
                self.metrics.disconnect(reason);
                reason
            }
        };
        debug!("conn={} peer={} closed: {}", id.0, c.peer, reason.label());
        for i in self.hub.leave_all(id) {
            self.bus.interest(i);
        }
    }

    pub(super) fn set_deadline(&mut self, id: ConnId, at: Instant) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        // An armed entry is due no later than the old deadline; it still serves when
        // the deadline moves later (it re-arms when due). An earlier one needs its own.
        let needs_entry = !c.timer_armed || c.deadline.is_none_or(|old| at < old);
        c.deadline = Some(at);
        if needs_entry {
            c.timer_armed = true;
            self.timers.push(Reverse((at, id.0, c.serial)));
            self.compact_timers();
        }
    }

    /// Entries of closed connections stay in the heap until due; once they outnumber
    /// the live ones they are dropped in one pass (amortized O(1) per push), so the heap
    /// stays within about twice the open connections (`--max-connections`).
    fn compact_timers(&mut self) {
        if self.timers.len() <= 2 * self.conns.len() + TIMER_SLACK {
            return;
        }
        let conns = &self.conns;
        self.timers.retain(|Reverse((_, key, serial))| {
            conns
                .get(*key)
                .is_some_and(|c| c.serial == *serial && c.timer_armed)
        });
    }

    pub(super) fn run_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, key, serial))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conns.get_mut(key) else {
                continue;
            };
            if c.serial != serial {
                continue; // stale: the slot holds a newer connection
            }
            c.timer_armed = false;
            match c.deadline {
                None => {}
                Some(d) if d > now => {
                    // Moved later since this entry was pushed: one entry, re-armed.
                    c.timer_armed = true;
                    self.timers.push(Reverse((d, key, serial)));
                }
                Some(_) => self.on_deadline(ConnId(key), now),
            }
        }
        if now >= self.next_ping {
            self.next_ping = now + self.cfg.ping_interval;
            self.ping_sweep();
        }
        if now >= self.next_summary {
            self.next_summary = now + SUMMARY_EVERY;
            self.log_summary();
        }
    }

    pub(super) fn on_deadline(&mut self, id: ConnId, now: Instant) {
        let Some(c) = self.conns.get(id.0) else {
            return;
        };
        match c.phase {
            Phase::Closing => self.drop_conn(id, Reason::ClientClose),
            Phase::AwaitSub(_) => {
                info!(
                    "conn={} peer={} upgrade refused: channel not subscribed in time",
                    id.0, c.peer
                );
                self.metrics.reject(Rejection::RedisUnavailable);
                let resp = crate::http::Response::text(503, "redis unavailable");
                self.begin_close(
                    id,
                    Reason::HandshakeTimeout,
                    Some(resp.encode(false, false)),
                    now,
                );
            }
            Phase::Http | Phase::Body { .. } => {
                if !c.inbuf.is_empty() || matches!(c.phase, Phase::Body { .. }) {
                    self.metrics.reject(Rejection::Timeout);
                }
                debug!("conn={} peer={} handshake/idle timeout", id.0, c.peer);
                self.drop_conn(id, Reason::HandshakeTimeout);
            }
            Phase::Open => {}
        }
    }

    /// One info line for what happened to connections since the last one (nothing when
    /// nothing did): per-connection lines are debug, so a reconnect storm of any size
    /// costs one line per `SUMMARY_EVERY`.
    fn log_summary(&mut self) {
        let m = &self.metrics;
        let last = &self.summarized;
        let opened = m.connections_total - last.connections_total;
        let closed: Vec<String> = Reason::ALL
            .iter()
            .filter(|r| !matches!(r, Reason::Http))
            .filter_map(|&r| {
                let n = m.disconnects[r as usize] - last.disconnects[r as usize];
                (n > 0).then(|| format!("{}={n}", r.label()))
            })
            .collect();
        let refused: Vec<String> = Rejection::ALL
            .iter()
            .filter_map(|&r| {
                let n = m.rejections[r as usize] - last.rejections[r as usize];
                (n > 0).then(|| format!("{}={n}", r.label()))
            })
            .collect();
        if opened > 0 || !closed.is_empty() || !refused.is_empty() {
            info!(
                "connections: {} open, {opened} accepted; closed: {}; refused: {}",
                self.conns.len(),
                if closed.is_empty() {
                    "none".to_string()
                } else {
                    closed.join(" ")
                },
                if refused.is_empty() {
                    "none".to_string()
                } else {
                    refused.join(" ")
                },
            );
        }
        self.summarized = self.metrics.snapshot();
    }

    /// Keepalive: drop open connections silent since the last sweep; ping the rest.
    /// Silence counts only from what a connection was allowed to send: one whose input
    /// is paused by backpressure (`in_paused_list`) has its pong unread in the kernel,
    /// not missing.
    pub(super) fn ping_sweep(&mut self) {
        let mut dead = Vec::new();
        let mut ping = Vec::new();
        for (k, c) in self.conns.iter_mut() {
            if !c.is_open() {
                continue;
            }
            if c.alive || c.in_paused_list {
                c.alive = false;
                ping.push(ConnId(k));
            } else {
                dead.push(ConnId(k));
            }
        }
        for id in dead {
            self.drop_conn(id, Reason::PingTimeout);
        }
        if !self.sessions.is_empty() {
            self.close_expired(Instant::now());
        }
        for id in ping {
            // Centrifugo's clients expect its own ping (`{}`) and answer it.
            let frame = match self.conns.get(id.0).map(|c| c.proto) {
                Some(crate::protocol::Proto::Centrifugo) => self.protocol_ping.clone(),
                _ => self.ping_frame.clone(),
            };
            self.queue(id, frame);
        }
    }

    pub(super) fn on_signal(&mut self, now: Instant) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let got: Vec<i32> = signals.pending().collect();
        for sig in got {
            if sig == signal_hook::consts::SIGHUP {
                // A terminal closing or a habit of `kill -HUP` must not end the service.
                info!("SIGHUP ignored: wsfan reads its settings only at start (restart to change them)");
                continue;
            }
            if self.shutdown_deadline.is_some() {
                warn!("second signal ({sig}): exiting now");
                std::process::exit(130);
            }
            info!(
                "signal {sig}: shutting down (closing {} connections)",
                self.conns.len()
            );
            crate::notify::send("STOPPING=1");
            self.begin_shutdown(now);
        }
    }

    pub(super) fn begin_shutdown(&mut self, now: Instant) {
        self.shutdown_deadline = Some(now + self.cfg.shutdown_timeout);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let ids: Vec<ConnId> = self.conns.iter().map(|(k, _)| ConnId(k)).collect();
        let bye = ws::close_frame(1001, "server shutting down");
        // Centrifugo's clients are told first, the protocol's way (3001: reconnect).
        let push = ws::data_frame(
            ws::Kind::Text,
            crate::protocol::centrifugo::disconnect_push(3001, "shutdown").into(),
        );
        for id in ids {
            let Some(c) = self.conns.get(id.0) else {
                continue;
            };
            match c.phase {
                Phase::Open => {
                    if c.proto == crate::protocol::Proto::Centrifugo {
                        self.queue(id, push.clone());
                    }
                    self.begin_close(id, Reason::Shutdown, Some(bye.clone()), now)
                }
                Phase::AwaitSub(_) => {
                    let resp = crate::http::Response::text(503, "shutting down");
                    self.begin_close(id, Reason::Shutdown, Some(resp.encode(false, false)), now);
                }
                Phase::Http | Phase::Body { .. } if c.out.is_empty() => {
                    self.drop_conn(id, Reason::Shutdown)
                }
                Phase::Http | Phase::Body { .. } => {
                    self.begin_close(id, Reason::Shutdown, None, now)
                }
                Phase::Closing => {}
            }
        }
    }

    pub(super) fn shutdown_done(&self, now: Instant) -> bool {
        match self.shutdown_deadline {
            None => false,
            Some(d) => now >= d || (self.conns.is_empty() && self.bus.pending() == 0),
        }
    }
}

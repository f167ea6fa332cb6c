//! Accepting and reading: connections in, bytes into requests, frames and publishes.

use super::{Server, MAX_EARLY_INPUT, READ_BUDGET, REJECT_RESERVE};
use crate::conn::{Conn, Phase, Reason};
use crate::hub::ConnId;
use crate::metrics::Rejection;
use crate::ws::{self, Kind};
use bytes::Bytes;
use log::{debug, warn};
use mio::net::TcpStream;
use mio::{Interest as Ready, Token};
use std::io::{self, Read};

/// The smallest client frame (2-byte header, 4-byte mask): with less room than this for
/// client input, the backplane is backlogged and reads pause.
const MIN_FRAME: usize = 6;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

impl Server {
    pub(super) fn on_conn_event(&mut self, id: ConnId, ev: &mio::event::Event, now: Instant) {
        if !self.conns.contains(id.0) {
            return; // spurious: closed earlier in this batch
        }
        if ev.is_writable() {
            self.mark_flush(id);
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            self.on_readable(id, now);
        }
    }

    pub(super) fn on_readable(&mut self, id: ConnId, now: Instant) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut budget = READ_BUDGET;
        while let Some(c) = self.conns.get_mut(id.0) {
            // Read only as much as the backplane can take; below one frame, Redis is
            // behind the publishers: leave the input in the kernel and come back once
            // it has caught up (`resume_paused`).
            // Only WebSocket messages are publishes: HTTP requests (health checks,
            // metrics, the publish API with its own 503) are read as always.
            let room = match c.phase {
                Phase::Open => self.bus.intake_room().unwrap_or(usize::MAX),
                _ => usize::MAX,
            };
            if room < MIN_FRAME || c.in_paused_list {
                if !c.in_paused_list {
                    c.in_paused_list = true;
                    self.paused.push(id);
                }
                break;
            }
            let cap = room.min(scratch.len());
            match c.stream.read(&mut scratch[..cap]) {
                Ok(0) => {
                    self.on_eof(id);
                    break;
                }
                Ok(n) => {
                    self.on_bytes(id, &mut scratch[..n], now);
                    if n >= budget {
                        // Once: a readiness event for it in the same poll batch must
                        // not queue it again (the list would grow every iteration).
                        if let Some(c) = self.conns.get_mut(id.0) {
                            if !c.in_reread_list {
                                c.in_reread_list = true;
                                self.reread.push(id);
                            }
                        }
                        break;
                    }
                    budget -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("conn={} read error: {e}", id.0);
                    self.drop_conn(id, Reason::PeerGone);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Reads the connections paused while the backplane was backlogged, once it is not.
    pub(super) fn resume_paused(&mut self, now: Instant) {
        if self.paused.is_empty() || self.bus.backlogged() {
            return;
        }
        let mut paused = std::mem::take(&mut self.paused);
        for &id in &paused {
            if let Some(c) = self.conns.get_mut(id.0) {
                c.in_paused_list = false;
            }
        }
        let mut done = 0;
        for &id in &paused {
            if self.bus.intake_room().is_some_and(|r| r < MIN_FRAME) {
                break;
            }
            self.on_readable(id, now);
            done += 1;
        }
        // Those whose turn did not come go first next time (paused again in order),
        // ahead of those that read and were paused again: no connection starves.
        let again = std::mem::take(&mut self.paused); // flagged by on_readable
        for id in paused.split_off(done) {
            if let Some(c) = self.conns.get_mut(id.0) {
                if !c.in_paused_list {
                    c.in_paused_list = true;
                    self.paused.push(id);
                }
            }
        }
        self.paused.extend(again);
    }

    pub(super) fn on_eof(&mut self, id: ConnId) {
        let Some(c) = self.conns.get(id.0) else {
            return;
        };
        let reason = match c.phase {
            Phase::Closing => c.reason.unwrap_or(Reason::ClientClose),
            Phase::Open => Reason::PeerGone,
            _ => Reason::Http,
        };
        self.drop_conn(id, reason);
    }

    pub(super) fn on_bytes(&mut self, id: ConnId, data: &mut [u8], now: Instant) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        match c.phase {
            Phase::Closing => {}
            Phase::Open => {
                c.alive = true;
                self.on_ws_bytes(id, data, now);
            }
            Phase::AwaitSub(_) => {
                if c.inbuf.len() + data.len() > MAX_EARLY_INPUT + self.cfg.max_message_size {
                    self.drop_conn(id, Reason::ProtocolError);
                } else {
                    c.inbuf.extend_from_slice(data);
                }
            }
            Phase::Http | Phase::Body { .. } => {
                c.inbuf.extend_from_slice(data);
                self.process_http(id, now);
            }
        }
    }

    pub(super) fn on_ws_bytes(&mut self, id: ConnId, data: &mut [u8], now: Instant) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        let max = self.cfg.max_message_size;
        let mut events = std::mem::take(&mut self.ws_events);
        let held_before = c.decoder.held();
        let result = if c.inbuf.is_empty() {
            let r = c.decoder.decode(data, max, &mut events);
            if let Ok(k) = r {
                c.inbuf.extend_from_slice(&data[k..]);
            }
            r
        } else {
            c.inbuf.extend_from_slice(data);
            let r = c.decoder.decode(&mut c.inbuf, max, &mut events);
            if let Ok(k) = r {
                c.inbuf.drain(..k);
                if c.inbuf.is_empty() {
                    c.inbuf = Vec::new(); // idle connections hold no buffer
                }
            }
            r
        };
        let held = c.decoder.held();
        self.reassembly_bytes = self.reassembly_bytes + held - held_before;
        // Fragments of many connections together would hold too much: the one whose
        // fragment went over is told to come back later (after its complete messages).
        let over = held > held_before && self.reassembly_bytes > self.cfg.max_reassembly_bytes;
        for ev in events.drain(..) {
            if !self.conns.get(id.0).is_some_and(Conn::is_open) {
                break;
            }
            self.on_ws_event(id, ev, now);
        }
        self.ws_events = events;
        if over {
            let why = "server busy reassembling messages, try again later";
            return self.begin_close(
                id,
                Reason::ReassemblyLimit,
                Some(ws::close_frame(1013, why)),
                now,
            );
        }
        if let Err(v) = result {
            let reason = match v {
                ws::Violation::Protocol => Reason::ProtocolError,
                ws::Violation::InvalidUtf8 => Reason::InvalidUtf8,
                ws::Violation::TooBig => Reason::TooBig,
            };
            self.begin_close(
                id,
                reason,
                Some(ws::close_frame(v.close_code(), v.text())),
                now,
            );
        }
    }

    pub(super) fn on_ws_event(&mut self, id: ConnId, ev: ws::Event, now: Instant) {
        match ev {
            ws::Event::Message(kind, payload) => self.on_message(id, kind, payload, now),
            // Control frames cost a token like messages: a ping flood is a flood.
            ws::Event::Ping(p) => {
                if self.charge(id, now) {
                    self.queue(id, ws::pong_frame(p));
                }
            }
            ws::Event::Pong => {
                self.charge(id, now);
            }
            ws::Event::Close { reply, code } => {
                debug!("conn={} sent close {code:?}", id.0);
                self.begin_close(id, Reason::ClientClose, Some(reply), now);
            }
        }
    }

    /// Takes one token of the connection's rate limit; over the limit → close 1008.
    pub(super) fn charge(&mut self, id: ConnId, now: Instant) -> bool {
        let Some(c) = self.conns.get_mut(id.0) else {
            return false;
        };
        if c.take_token(
            now,
            self.cfg.max_messages_per_sec,
            self.cfg.max_messages_burst,
        ) {
            return true;
        }
        debug!("conn={} peer={} over its message rate", id.0, c.peer);
        let frame = ws::close_frame(1008, "rate limit exceeded");
        self.begin_close(id, Reason::RateLimit, Some(frame), now);
        false
    }

    pub(super) fn on_message(&mut self, id: ConnId, kind: Kind, payload: Bytes, now: Instant) {
        if !self.charge(id, now) {
            return;
        }
        if self
            .conns
            .get(id.0)
            .is_some_and(|c| c.proto == crate::protocol::Proto::Centrifugo)
        {
            return self.on_protocol_frame(id, payload, now);
        }
        self.metrics.messages_received += 1;
        if let Some(channel) = self.hub.channels_of(id).next() {
            self.bus.publish(channel, kind, payload);
        }
    }

    // ---- accepting ----------------------------------------------------------------

    pub(super) fn accept(&mut self, now: Instant) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.on_accept(stream, peer, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: the backlog keeps the rest; try again shortly
                    // (edge-triggered: no new event would come for them).
                    warn!("accept failed: {e}; retrying in 100 ms");
                    self.accept_retry = Some(now + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    fn on_accept(&mut self, mut stream: TcpStream, peer: SocketAddr, now: Instant) {
        if self.conns.len() >= self.cfg.max_connections + REJECT_RESERVE {
            self.metrics.reject(Rejection::TooManyConnections);
            return; // dropped: the reserve for polite refusals is full too
        }
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let id = ConnId(entry.key());
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(id.0), Ready::READABLE)
        {
            warn!("conn={} peer={peer} register failed: {e}", id.0);
            return;
        }
        self.next_serial += 1;
        entry.insert(Conn::new(stream, peer, self.next_serial, now));
        self.metrics.connections_total += 1;
        if self.conns.len() > self.cfg.max_connections || self.shutdown_deadline.is_some() {
            debug!("conn={} peer={peer} refused: too many connections", id.0);
            self.metrics.reject(Rejection::TooManyConnections);
            let resp = crate::http::Response::text(503, "too many connections");
            self.begin_close(id, Reason::Rejected, Some(resp.encode(false, false)), now);
            return;
        }
        debug!("conn={} peer={peer} accepted", id.0);
        self.set_deadline(id, now + self.cfg.handshake_timeout);
    }
}

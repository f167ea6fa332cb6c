//! The event loop: one mio `Poll` on one thread drives the listener, every client
//! connection, the Redis links and the signal pipe.
//!
//! One iteration: poll → handle readiness (accept, read, decode, publish) → drain the
//! backplane (fan out deliveries, release held upgrades) → close slow consumers → run
//! timers → write Redis commands → flush every connection with queued output once
//! (WRITABLE interest only for leftovers) → poll again.

use crate::bus::{Bus, BusEvent};
use crate::config::Config;
use crate::conn::{Conn, Phase, Reason};
use crate::hub::{ConnId, Hub, Interest};
use crate::metrics::{Metrics, Rejection};
use crate::outq::{Flushed, WriteStats};
use crate::redis_link::RedisLink;
use crate::static_files::Files;
use crate::ws::{self, Kind};
use bytes::Bytes;
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest as Ready, Poll, Token};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

/// Reserved tokens, at the top of the range so they never meet a slab key.
pub const LISTENER: Token = Token(usize::MAX - 1);
pub const SIGNALS: Token = Token(usize::MAX - 2);
pub const REDIS_SUB: Token = Token(usize::MAX - 3);
pub const REDIS_PUB: Token = Token(usize::MAX - 4);

/// Shared read buffer: every socket is read into this, so idle connections own none.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Bytes read from one connection per readiness event before others get their turn.
const READ_BUDGET: usize = 256 * 1024;
/// Bytes written to one connection per iteration before others get their turn.
const WRITE_BUDGET: usize = 1024 * 1024;
/// How long a closing connection waits for the peer to close after our last bytes
/// went out (so a final response or close frame is not destroyed by a reset).
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Connections accepted over `max_connections` only to be told 503; beyond this many
/// they are dropped without a word.
const REJECT_RESERVE: usize = 64;
/// Readiness events handled per poll call.
const EVENTS_CAPACITY: usize = 1024;
/// A WebSocket connection still waiting for its 101 buffers at most this much input.
const MAX_EARLY_INPUT: usize = 64 * 1024;

pub struct Server {
    pub(crate) cfg: Config,
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    pub(crate) conns: Slab<Conn>,
    pub(crate) hub: Hub,
    pub(crate) bus: Bus,
    pub(crate) metrics: Metrics,
    pub(crate) files: Files,
    scratch: Vec<u8>,
    /// Connections with output queued this iteration (flushed once, before polling).
    flush_list: Vec<ConnId>,
    /// Connections that hit the read budget and still have input waiting.
    reread: Vec<ConnId>,
    /// Connections found over `max_outbound_bytes` during a fan-out.
    slow: Vec<ConnId>,
    /// Deadlines: (when, slab key, serial). Stale entries are skipped when they fire.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_serial: u64,
    next_ping: Instant,
    accept_retry: Option<Instant>,
    shutdown_deadline: Option<Instant>,
    bus_events: Vec<BusEvent>,
    ws_events: Vec<ws::Event>,
    ping_frame: Bytes,
    write_stats: WriteStats,
    /// Called once when the server is ready (listening and, with Redis, subscribed).
    on_ready: Option<Box<dyn FnOnce()>>,
}

impl Server {
    /// Binds the listener and sets everything up; nothing is accepted until [`run`].
    pub fn bind(cfg: Config) -> io::Result<Server> {
        let poll = Poll::new()?;
        let mut listener = crate::listen::bind(&cfg)?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Ready::READABLE)?;
        let mut signals = signal_hook_mio::v1_0::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Ready::READABLE)?;
        let bus = match &cfg.redis {
            Some(url) => Bus::Redis(Box::new(
                RedisLink::new(url, &cfg).map_err(io::Error::other)?,
            )),
            None => Bus::Local(Default::default()),
        };
        let now = Instant::now();
        Ok(Server {
            next_ping: now + cfg.ping_interval,
            files: match &cfg.static_dir {
                Some(d) => Files::Dir(d.clone()),
                None => Files::Embedded,
            },
            cfg,
            poll,
            listener: Some(listener),
            local_addr,
            signals: Some(signals),
            conns: Slab::new(),
            hub: Hub::new(),
            bus,
            metrics: Metrics::default(),
            scratch: vec![0; SCRATCH_BYTES],
            flush_list: Vec::new(),
            reread: Vec::new(),
            slow: Vec::new(),
            timers: BinaryHeap::new(),
            next_serial: 0,
            accept_retry: None,
            shutdown_deadline: None,
            bus_events: Vec::new(),
            ws_events: Vec::new(),
            ping_frame: ws::ping_frame(),
            write_stats: WriteStats::default(),
            on_ready: None,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Sets a callback run once the server is ready to serve (systemd notify).
    pub fn on_ready(&mut self, f: Box<dyn FnOnce()>) {
        self.on_ready = Some(f);
    }

    /// Runs until a graceful shutdown completes. A second signal exits at once (130).
    pub fn run(mut self) -> io::Result<()> {
        let mode = match &self.bus {
            Bus::Local(_) => "standalone (no Redis)".to_string(),
            Bus::Redis(r) => format!(
                "redis {} prefix={:?}",
                r.target_display(),
                self.cfg.channel_prefix
            ),
        };
        info!("listening on {} mode={}", self.local_addr, mode);
        info!(
            "limits: max_connections={} max_message_size={} max_outbound_bytes={} handshake_timeout={:?} \
             ping_interval={:?} max_messages_per_sec={} max_messages_burst={} redis_buffer_messages={} redis_buffer_bytes={}",
            self.cfg.max_connections,
            self.cfg.max_message_size,
            self.cfg.max_outbound_bytes,
            self.cfg.handshake_timeout,
            self.cfg.ping_interval,
            self.cfg.max_messages_per_sec,
            self.cfg.max_messages_burst,
            self.cfg.redis_buffer_messages,
            self.cfg.redis_buffer_bytes,
        );
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        let mut now = Instant::now();
        self.bus.tick(self.poll.registry(), now);
        loop {
            let timeout = self.poll_timeout(now);
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(now),
                    SIGNALS => self.on_signal(now),
                    REDIS_SUB | REDIS_PUB => self.bus.on_event(self.poll.registry(), ev, now),
                    Token(k) => self.on_conn_event(ConnId(k), ev, now),
                }
            }
            self.iterate(now);
            self.metrics.loop_iteration(now.elapsed());
            if self.shutdown_done(now) {
                info!("shutdown complete");
                return Ok(());
            }
        }
    }

    /// Everything after readiness handling: one pass, in a fixed order.
    fn iterate(&mut self, now: Instant) {
        for id in std::mem::take(&mut self.reread) {
            self.on_readable(id, now);
        }
        if self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_retry = None;
            self.accept(now);
        }
        self.drain_bus(now);
        self.close_slow_consumers(now);
        self.run_timers(now);
        self.bus.tick(self.poll.registry(), now);
        // Deliveries can arrive during tick (a Redis link came back with buffered data).
        self.drain_bus(now);
        self.close_slow_consumers(now);
        self.flush_all();
        self.notify_ready_once();
    }

    fn notify_ready_once(&mut self) {
        if self.on_ready.is_some() && self.bus.ready().is_ok() {
            if let Some(f) = self.on_ready.take() {
                f();
            }
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.flush_list.is_empty() || !self.reread.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut next = self.next_ping;
        let candidates = [
            self.timers.peek().map(|Reverse((t, _, _))| *t),
            self.bus.next_deadline(),
            self.shutdown_deadline,
            self.accept_retry,
        ];
        for t in candidates.into_iter().flatten() {
            next = next.min(t);
        }
        // Round up so we do not wake a hair early and spin.
        Some(next.saturating_duration_since(now) + Duration::from_millis(1))
    }

    // ---- accepting ----------------------------------------------------------------

    fn accept(&mut self, now: Instant) {
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

    // ---- reading ------------------------------------------------------------------

    fn on_conn_event(&mut self, id: ConnId, ev: &mio::event::Event, now: Instant) {
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

    fn on_readable(&mut self, id: ConnId, now: Instant) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut budget = READ_BUDGET;
        while let Some(c) = self.conns.get_mut(id.0) {
            match c.stream.read(&mut scratch) {
                Ok(0) => {
                    self.on_eof(id);
                    break;
                }
                Ok(n) => {
                    self.on_bytes(id, &mut scratch[..n], now);
                    if n >= budget {
                        self.reread.push(id);
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

    fn on_eof(&mut self, id: ConnId) {
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

    fn on_bytes(&mut self, id: ConnId, data: &mut [u8], now: Instant) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        match c.phase {
            Phase::Closing => {}
            Phase::Open => {
                c.alive = true;
                self.on_ws_bytes(id, data, now);
            }
            Phase::AwaitSub { .. } => {
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

    fn on_ws_bytes(&mut self, id: ConnId, data: &mut [u8], now: Instant) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        let max = self.cfg.max_message_size;
        let mut events = std::mem::take(&mut self.ws_events);
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
        for ev in events.drain(..) {
            if !self.conns.get(id.0).is_some_and(Conn::is_open) {
                break;
            }
            self.on_ws_event(id, ev, now);
        }
        self.ws_events = events;
        if let Err(v) = result {
            let reason = match v {
                ws::Violation::Protocol => Reason::ProtocolError,
                ws::Violation::InvalidUtf8 => Reason::InvalidUtf8,
                ws::Violation::TooBig => Reason::TooBig,
            };
            let text = match v {
                ws::Violation::Protocol => "protocol error",
                ws::Violation::InvalidUtf8 => "invalid utf-8",
                ws::Violation::TooBig => "message too big",
            };
            self.begin_close(id, reason, Some(ws::close_frame(v.close_code(), text)), now);
        }
    }

    fn on_ws_event(&mut self, id: ConnId, ev: ws::Event, now: Instant) {
        match ev {
            ws::Event::Message(kind, payload) => self.on_message(id, kind, payload, now),
            ws::Event::Ping(p) => self.queue(id, ws::pong_frame(p)),
            ws::Event::Pong => {}
            ws::Event::Close { reply, code } => {
                debug!("conn={} sent close {code:?}", id.0);
                self.begin_close(id, Reason::ClientClose, Some(reply), now);
            }
        }
    }

    fn on_message(&mut self, id: ConnId, kind: Kind, payload: Bytes, now: Instant) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        if !c.take_token(
            now,
            self.cfg.max_messages_per_sec,
            self.cfg.max_messages_burst,
        ) {
            info!("conn={} peer={} over its message rate", id.0, c.peer);
            let frame = ws::close_frame(1008, "rate limit exceeded");
            self.begin_close(id, Reason::RateLimit, Some(frame), now);
            return;
        }
        self.metrics.messages_received += 1;
        if let Some(channel) = self.hub.channels_of(id).next() {
            self.bus.publish(channel, kind, payload);
        }
    }

    // ---- fan-out ------------------------------------------------------------------

    fn drain_bus(&mut self, now: Instant) {
        let mut evs = std::mem::take(&mut self.bus_events);
        self.bus.drain(&mut evs);
        for ev in evs.drain(..) {
            match ev {
                BusEvent::Deliver {
                    channel,
                    kind,
                    payload,
                } => self.fan_out(&channel, kind, payload),
                BusEvent::Subscribed(channel) => self.release_waiting(&channel, now),
            }
        }
        self.bus_events = evs;
    }

    /// Encodes the frame once and queues the same bytes to every open local member.
    fn fan_out(&mut self, channel: &str, kind: Kind, payload: Bytes) {
        let members = self.hub.members(channel);
        if members.is_empty() {
            return;
        }
        let frame = ws::data_frame(kind, payload);
        let max = self.cfg.max_outbound_bytes;
        for &m in members {
            let Some(c) = self.conns.get_mut(m.0) else {
                continue;
            };
            if !c.is_open() {
                continue;
            }
            if c.out.len() + frame.len() > max {
                self.slow.push(m);
                continue;
            }
            c.out.push(frame.clone());
            self.metrics.messages_delivered += 1;
            if !c.in_flush_list {
                c.in_flush_list = true;
                self.flush_list.push(m);
            }
        }
    }

    /// Marked during the fan-out, closed after it (never inside it).
    fn close_slow_consumers(&mut self, now: Instant) {
        for id in std::mem::take(&mut self.slow) {
            let Some(c) = self.conns.get_mut(id.0) else {
                continue;
            };
            if !c.is_open() {
                continue;
            }
            info!(
                "conn={} peer={} slow consumer: {} bytes queued",
                id.0,
                c.peer,
                c.out.len()
            );
            let frame = ws::close_frame(1008, "slow consumer");
            if c.out.len() + frame.len() <= self.cfg.max_outbound_bytes {
                self.begin_close(id, Reason::SlowConsumer, Some(frame), now);
            } else {
                self.drop_conn(id, Reason::SlowConsumer);
            }
        }
    }

    /// The channel is subscribed: complete the upgrades that were waiting for it.
    fn release_waiting(&mut self, channel: &str, now: Instant) {
        let waiting: Vec<ConnId> = self
            .hub
            .members(channel)
            .iter()
            .copied()
            .filter(|m| {
                self.conns.get(m.0).is_some_and(
                    |c| matches!(&c.phase, Phase::AwaitSub { channel: ch, .. } if &**ch == channel),
                )
            })
            .collect();
        for id in waiting {
            self.open_ws(id, now);
        }
    }

    /// Sends the held 101 and starts speaking WebSocket.
    pub(crate) fn open_ws(&mut self, id: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        let Phase::AwaitSub { response, channel } = std::mem::replace(&mut c.phase, Phase::Open)
        else {
            return;
        };
        c.deadline = None;
        c.alive = true;
        c.tokens = self.cfg.max_messages_burst as f32;
        c.refilled = now;
        info!("conn={} peer={} joined channel={channel}", id.0, c.peer);
        self.queue(id, response);
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        if !c.inbuf.is_empty() {
            let mut early = std::mem::take(&mut c.inbuf);
            self.on_ws_bytes(id, &mut early, now);
        }
    }

    // ---- writing ------------------------------------------------------------------

    pub(crate) fn queue(&mut self, id: ConnId, bytes: Bytes) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        c.out.push(bytes);
        self.mark_flush(id);
    }

    fn mark_flush(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id.0) {
            if !c.in_flush_list {
                c.in_flush_list = true;
                self.flush_list.push(id);
            }
        }
    }

    fn flush_all(&mut self) {
        let list = std::mem::take(&mut self.flush_list);
        for &id in &list {
            self.flush_one(id);
        }
        let mut list = list;
        list.clear();
        if self.flush_list.is_empty() {
            self.flush_list = list; // keep the allocation
        }
        self.metrics.write_calls = self.write_stats.writes;
        self.metrics.bytes_sent = self.write_stats.bytes;
    }

    fn flush_one(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        c.in_flush_list = false;
        match c
            .out
            .flush_to(&mut c.stream, WRITE_BUDGET, &mut self.write_stats)
        {
            Ok(Flushed::All) => {
                if c.want_write {
                    c.want_write = false;
                    let _ = self.poll.registry().reregister(
                        &mut c.stream,
                        Token(id.0),
                        Ready::READABLE,
                    );
                }
                if matches!(c.phase, Phase::Closing) && !c.write_shut {
                    c.write_shut = true;
                    let _ = c.stream.shutdown(Shutdown::Write);
                }
            }
            Ok(Flushed::Partial) => {
                if !c.want_write {
                    c.want_write = true;
                    let _ = self.poll.registry().reregister(
                        &mut c.stream,
                        Token(id.0),
                        Ready::READABLE | Ready::WRITABLE,
                    );
                }
            }
            Ok(Flushed::Capped) => {
                // Fairness: others get their turn; continue next iteration.
                c.in_flush_list = true;
                self.flush_list.push(id);
            }
            Err(e) => {
                debug!("conn={} write error: {e}", id.0);
                self.drop_conn(id, Reason::PeerGone);
            }
        }
    }

    // ---- closing ------------------------------------------------------------------

    /// Stops reading messages, queues `last` (a close frame or response), writes what is
    /// queued, then shuts the write side and lingers for the peer's EOF.
    pub(crate) fn begin_close(
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
        c.decoder = ws::Decoder::default();
        if let Some(b) = last {
            c.out.push(b);
        }
        for i in self.hub.leave_all(id) {
            self.interest(i);
        }
        self.set_deadline(id, now + CLOSE_LINGER);
        self.mark_flush(id);
    }

    /// Closes the socket now.
    pub(crate) fn drop_conn(&mut self, id: ConnId, reason: Reason) {
        let Some(mut c) = self.conns.try_remove(id.0) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        let reason = match c.reason {
            Some(r) => r, // counted in begin_close
            None => {
                self.metrics.disconnect(reason);
                reason
            }
        };
        if matches!(reason, Reason::Http) {
            debug!("conn={} peer={} closed: {}", id.0, c.peer, reason.label());
        } else {
            info!("conn={} peer={} closed: {}", id.0, c.peer, reason.label());
        }
        for i in self.hub.leave_all(id) {
            self.interest(i);
        }
    }

    fn interest(&mut self, i: Interest) {
        self.bus.interest(i);
    }

    // ---- timers -------------------------------------------------------------------

    pub(crate) fn set_deadline(&mut self, id: ConnId, at: Instant) {
        let Some(c) = self.conns.get_mut(id.0) else {
            return;
        };
        c.deadline = Some(at);
        self.timers.push(Reverse((at, id.0, c.serial)));
    }

    fn run_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, key, serial))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conns.get(key) else {
                continue;
            };
            if c.serial != serial || c.deadline.is_none_or(|d| d > now) {
                continue; // stale: the connection moved on
            }
            self.on_deadline(ConnId(key), now);
        }
        if now >= self.next_ping {
            self.next_ping = now + self.cfg.ping_interval;
            self.ping_sweep();
        }
    }

    fn on_deadline(&mut self, id: ConnId, now: Instant) {
        let Some(c) = self.conns.get(id.0) else {
            return;
        };
        match c.phase {
            Phase::Closing => self.drop_conn(id, Reason::ClientClose),
            Phase::AwaitSub { .. } => {
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

    /// Keepalive: drop open connections silent since the last sweep; ping the rest.
    fn ping_sweep(&mut self) {
        let mut dead = Vec::new();
        let mut ping = Vec::new();
        for (k, c) in self.conns.iter_mut() {
            if !c.is_open() {
                continue;
            }
            if c.alive {
                c.alive = false;
                ping.push(ConnId(k));
            } else {
                dead.push(ConnId(k));
            }
        }
        for id in dead {
            self.drop_conn(id, Reason::PingTimeout);
        }
        let frame = self.ping_frame.clone();
        for id in ping {
            self.queue(id, frame.clone());
        }
    }

    // ---- shutdown -----------------------------------------------------------------

    fn on_signal(&mut self, now: Instant) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let got: Vec<i32> = signals.pending().collect();
        for sig in got {
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

    fn begin_shutdown(&mut self, now: Instant) {
        self.shutdown_deadline = Some(now + self.cfg.shutdown_timeout);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let ids: Vec<ConnId> = self.conns.iter().map(|(k, _)| ConnId(k)).collect();
        let bye = ws::close_frame(1001, "server shutting down");
        for id in ids {
            let Some(c) = self.conns.get(id.0) else {
                continue;
            };
            match c.phase {
                Phase::Open => self.begin_close(id, Reason::Shutdown, Some(bye.clone()), now),
                Phase::AwaitSub { .. } => {
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

    fn shutdown_done(&self, now: Instant) -> bool {
        match self.shutdown_deadline {
            None => false,
            Some(d) => now >= d || (self.conns.is_empty() && self.bus.pending() == 0),
        }
    }
}

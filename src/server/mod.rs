//! The event loop: one mio `Poll` on one thread drives the listener, every client
//! connection, the Redis links and the signal pipe.
//!
//! One iteration: poll → handle readiness (accept, read, decode, publish) → drain the
//! backplane (fan out deliveries, release held upgrades) → close slow consumers → run
//! timers → write Redis commands → flush every connection with queued output once
//! (WRITABLE interest only for leftovers) → poll again.
//!
//! One file per stage, each an `impl Server` block with explicit imports: this file owns
//! the state and the loop (poll, dispatch, the iteration's order, the poll timeout);
//! `read` accepts and turns bytes into requests, frames and publishes; `routes` answers
//! HTTP requests and upgrades; `fanout` queues frames and writes; `lifecycle` closes
//! connections, runs timers, keepalive and the staged shutdown.

mod centrifugo;
mod fanout;
mod lifecycle;
mod read;
pub mod routes;

use crate::backplane::pick::Bus;
use crate::backplane::BusEvent;
use crate::config::Config;
use crate::conn::Conn;
use crate::hub::{ConnId, Hub};
use crate::metrics::Metrics;
use crate::static_files::Files;
use crate::token::{self, LISTENER, SIGNALS};
use crate::ws;
use bytes::Bytes;
use log::info;
use mio::net::TcpListener;
use mio::{Events, Interest as Ready, Poll, Token};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
/// Timer-heap entries allowed beyond twice the open connections before stale ones
/// (closed connections) are swept out.
const TIMER_SLACK: usize = 1024;
/// How often connection activity is summed up in one info line (per-connection
/// lines are debug: a reconnect storm of 20,000 clients wrote 40,000 lines, 3.3 MB).
const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// A WebSocket connection still waiting for its 101 buffers at most this much input.
const MAX_EARLY_INPUT: usize = 64 * 1024;

pub struct Server {
    cfg: Config,
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    conns: Slab<Conn>,
    hub: Hub,
    bus: Bus,
    metrics: Metrics,
    files: Files,
    scratch: Vec<u8>,
    /// Connections with output queued this iteration (flushed once, before polling).
    flush_list: Vec<ConnId>,
    /// Connections that hit the read budget and still have input waiting.
    reread: Vec<ConnId>,
    /// Connections not read while the backplane is backlogged (each once:
    /// `Conn::in_paused_list`); read again when it is not.
    paused: Vec<ConnId>,
    /// Connections found over `max_outbound_bytes` during a fan-out.
    slow: Vec<ConnId>,
    /// Deadlines: (when, slab key, serial). Stale entries are skipped when they fire.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_serial: u64,
    next_ping: Instant,
    /// When connection activity is next summed up in the log, and the counters then.
    next_summary: Instant,
    summarized: crate::metrics::Snapshot,
    accept_retry: Option<Instant>,
    shutdown_deadline: Option<Instant>,
    bus_events: Vec<BusEvent>,
    ws_events: Vec<ws::Event>,
    /// Bytes of fragmented messages under reassembly, all connections
    /// (`--max-reassembly-bytes`).
    reassembly_bytes: usize,
    ping_frame: Bytes,
    /// Centrifugo's ping (`{}` as a text frame), encoded once.
    protocol_ping: Bytes,
    /// Centrifugo sessions, by connection key (plain connections have none).
    sessions: std::collections::HashMap<usize, centrifugo::Session>,
    /// History asks in flight, by ask id.
    asks: std::collections::HashMap<u64, centrifugo::Ask>,
    next_ask_id: u64,
    /// The last recovery's publications and their encoding: clients that shared a read
    /// share the encoding (the `Arc` keeps the pointer unique while cached).
    encoded_recovery: Option<(
        std::sync::Arc<[crate::backplane::Publication]>,
        std::rc::Rc<str>,
    )>,
    /// Called once when the server is ready (listening and, with Redis, subscribed).
    on_ready: Option<Box<dyn FnOnce()>>,
}

impl Server {
    /// Binds the listener and sets everything up; nothing is accepted until [`Server::run`].
    pub fn bind(cfg: Config) -> io::Result<Server> {
        let poll = Poll::new()?;
        let mut listener = crate::listen::bind(&cfg)?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Ready::READABLE)?;
        let mut signals = signal_hook_mio::v1_0::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Ready::READABLE)?;
        let bus = crate::backplane::pick::from_config(&cfg);
        let now = Instant::now();
        Ok(Server {
            next_ping: now + cfg.ping_interval,
            next_summary: now + SUMMARY_EVERY,
            summarized: Default::default(),
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
            paused: Vec::new(),
            slow: Vec::new(),
            timers: BinaryHeap::new(),
            next_serial: 0,
            accept_retry: None,
            shutdown_deadline: None,
            bus_events: Vec::new(),
            ws_events: Vec::new(),
            reassembly_bytes: 0,
            protocol_ping: ws::data_frame(ws::Kind::Text, Bytes::from_static(b"{}")),
            sessions: std::collections::HashMap::new(),
            asks: std::collections::HashMap::new(),
            next_ask_id: 0,
            encoded_recovery: None,
            ping_frame: ws::ping_frame(),
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
        let mode = match &self.cfg.redis {
            None => self.bus.describe(),
            Some(_) => format!(
                "{} prefix={:?}",
                self.bus.describe(),
                self.cfg.channel_prefix
            ),
        };
        info!("listening on {} mode={}", self.local_addr, mode);
        info!(
            "limits: max_connections={} max_message_size={} max_outbound_bytes={} handshake_timeout={:?} \
             ping_interval={:?} max_messages_per_sec={} max_messages_burst={} redis_buffer_messages={} redis_buffer_bytes={} \
             history_size={} history_ttl={:?} history_hold_bytes={} history_memory_bytes={} max_reassembly_bytes={}",
            self.cfg.max_connections,
            self.cfg.max_message_size,
            self.cfg.max_outbound_bytes,
            self.cfg.handshake_timeout,
            self.cfg.ping_interval,
            self.cfg.max_messages_per_sec,
            self.cfg.max_messages_burst,
            self.cfg.redis_buffer_messages,
            self.cfg.redis_buffer_bytes,
            self.cfg.history_size,
            self.cfg.history_ttl,
            self.cfg.history_hold_bytes,
            self.cfg.history_memory_bytes,
            self.cfg.max_reassembly_bytes,
        );
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        let mut now = Instant::now();
        self.bus.tick(self.poll.registry(), now);
        // Standalone is ready before any event arrives: tell systemd now, not at the
        // first connection or timer.
        self.notify_ready_once(now);
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
                    t if token::is_backplane(t) => self.bus.on_event(self.poll.registry(), ev, now),
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
        self.resume_paused(now);
        for id in std::mem::take(&mut self.reread) {
            if let Some(c) = self.conns.get_mut(id.0) {
                c.in_reread_list = false;
                self.on_readable(id, now);
            }
        }
        if self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_retry = None;
            self.accept(now);
        }
        self.bus.resume_reads(self.poll.registry(), now);
        self.drain_bus(now);
        self.close_slow_consumers(now);
        self.run_timers(now);
        // Reconnects, PINGs and this iteration's publishes/subscriptions, in one write
        // per Redis link.
        self.bus.tick(self.poll.registry(), now);
        self.flush_all();
        self.notify_ready_once(now);
        // Log output the stderr reader did not take yet (never blocks).
        log::logger().flush();
    }

    fn notify_ready_once(&mut self, now: Instant) {
        if self.on_ready.is_some() && self.bus.ready(now).is_ok() {
            if let Some(f) = self.on_ready.take() {
                f();
            }
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.flush_list.is_empty() || !self.reread.is_empty() || self.bus.has_more_to_read() {
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
}

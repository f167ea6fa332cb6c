//! One client connection's state. Sized deliberately: an idle WebSocket connection owns
//! no heap buffer (reads go through the loop's shared scratch buffer), so it costs
//! this struct in the slab plus its hub membership.

use crate::http::Head;
use crate::outq::OutQueue;
use crate::ws::Decoder;
use bytes::Bytes;
use mio::net::TcpStream;
use std::net::SocketAddr;
use std::time::Instant;

/// Where a connection is in its life.
#[derive(Debug)]
pub enum Phase {
    /// Reading an HTTP request head (every connection starts here).
    Http,
    /// Reading the body of `head` (`POST /publish/...`): `need` bytes in all.
    Body { head: Box<Head>, need: usize },
    /// Upgrade accepted; the 101 `response` is held until the channel is subscribed
    /// at Redis, so "101" means "you will receive everything published from now on".
    AwaitSub(Box<Held>),
    /// WebSocket open.
    Open,
    /// Last bytes queued. Once they are written the write side is shut down and reads
    /// are discarded until the peer closes or the linger deadline passes, so the final
    /// response or close frame is not lost to a TCP reset.
    Closing,
}

/// An accepted upgrade waiting for its channel's subscription (boxed: rare and short,
/// so it does not widen every connection's `Phase`).
#[derive(Debug)]
pub struct Held {
    pub response: Bytes,
    pub channel: Box<str>,
}

/// Why a connection ended (the `reason` label of `wsfan_disconnects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    ClientClose,
    PeerGone,
    ProtocolError,
    TooBig,
    InvalidUtf8,
    SlowConsumer,
    RateLimit,
    PingTimeout,
    HandshakeTimeout,
    Rejected,
    Http,
    Shutdown,
    IoError,
    /// Its next fragment would have taken reassembly over `--max-reassembly-bytes`.
    ReassemblyLimit,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::ClientClose,
        Reason::PeerGone,
        Reason::ProtocolError,
        Reason::TooBig,
        Reason::InvalidUtf8,
        Reason::SlowConsumer,
        Reason::RateLimit,
        Reason::PingTimeout,
        Reason::HandshakeTimeout,
        Reason::Rejected,
        Reason::Http,
        Reason::Shutdown,
        Reason::IoError,
        Reason::ReassemblyLimit,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::ClientClose => "client_close",
            Reason::PeerGone => "peer_gone",
            Reason::ProtocolError => "protocol_error",
            Reason::TooBig => "message_too_big",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::SlowConsumer => "slow_consumer",
            Reason::RateLimit => "rate_limit",
            Reason::PingTimeout => "ping_timeout",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::Rejected => "rejected",
            Reason::Http => "http",
            Reason::Shutdown => "shutdown",
            Reason::IoError => "io_error",
            Reason::ReassemblyLimit => "reassembly_limit",
        }
    }
}

#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Distinguishes this connection from earlier ones with the same slab key
    /// (timers carry it, so a stale timer never fires on a newcomer).
    pub serial: u64,
    pub phase: Phase,
    /// Unparsed input: a partial request head/body or a partial frame. Empty when idle.
    pub inbuf: Vec<u8>,
    pub decoder: Decoder,
    pub out: OutQueue,
    /// WRITABLE interest is registered (only while output is left over).
    pub want_write: bool,
    /// Already in the loop's flush list this iteration.
    pub in_flush_list: bool,
    /// Already in the loop's re-read list (read budget spent, input left).
    pub in_reread_list: bool,
    /// In the loop's paused list: not read while the backplane is backlogged (its input
    /// waits in the kernel, and TCP slows the client down).
    pub in_paused_list: bool,
    /// Found over its output cap during this iteration's fan-out: closed right after
    /// it, and nothing more is queued to it until then.
    pub slow: bool,
    /// The write side was shut down (Closing, after the last byte went out).
    pub write_shut: bool,
    /// Handshake / keep-alive / linger deadline, depending on the phase.
    pub deadline: Option<Instant>,
    /// An entry for this connection is in the timer heap, due no later than `deadline`
    /// (a deadline moved later is re-armed when that entry comes due, so a keep-alive
    /// connection holds one entry however many requests it makes).
    pub timer_armed: bool,
    /// Traffic seen since the last keepalive ping.
    pub alive: bool,
    /// Rate limit token bucket: tokens left and when it was last refilled.
    pub tokens: f32,
    pub refilled: Instant,
    /// Why it is closing (for logs and metrics when it is finally dropped).
    pub reason: Option<Reason>,
    /// The client protocol it speaks once open.
    pub proto: crate::protocol::Proto,
}

impl Conn {
    pub fn new(stream: TcpStream, peer: SocketAddr, serial: u64, now: Instant) -> Conn {
        Conn {
            stream,
            peer,
            serial,
            phase: Phase::Http,
            inbuf: Vec::new(),
            decoder: Decoder::default(),
            out: OutQueue::default(),
            want_write: false,
            in_flush_list: false,
            in_reread_list: false,
            in_paused_list: false,
            slow: false,
            write_shut: false,
            deadline: None,
            timer_armed: false,
            alive: true,
            tokens: 0.0,
            refilled: now,
            reason: None,
            proto: crate::protocol::Proto::Plain,
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    /// Token bucket: takes one token for a message; false when the client is over its rate.
    pub fn take_token(&mut self, now: Instant, per_sec: u32, burst: u32) -> bool {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f32();
        self.refilled = now;
        self.tokens = (self.tokens + dt * per_sec as f32).min(burst as f32);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conn_struct_stays_small() {
        // Guard against accidental growth of the per-connection footprint.
        let size = std::mem::size_of::<super::Conn>();
        assert!(size <= 240, "Conn is {size} bytes");
    }
}

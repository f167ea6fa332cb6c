//! The load generator: many WebSocket clients on one mio poll, on loopback source
//! addresses spread so more than 28k connections fit.

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Connections per loopback source address: few enough that the kernel's search for a
/// free ephemeral port stays short (it slows down as a source address fills up).
const PER_SOURCE_IP: usize = 5_000;

/// A client socket bound to a loopback source address chosen for connection `i`, with
/// the port picked at connect time (IP_BIND_ADDRESS_NO_PORT) so TIME_WAIT ports from
/// earlier runs can be reused: >28k connections and repeated runs both fit.
pub fn client_socket(i: usize) -> Socket {
    let base = 1 + (std::process::id() % 200) as usize;
    let src: SocketAddr = format!(
        "127.{base}.{}.{}:0",
        i / PER_SOURCE_IP / 250,
        2 + (i / PER_SOURCE_IP) % 250
    )
    .parse()
    .expect("src");
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and an int option value.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(&src.into()).expect("bind source");
    sock
}

// ---- the load generator -----------------------------------------------------------

pub struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    open: bool,
    sent_req: bool,
    received: u64,
}

/// Many WebSocket clients on one mio poll.
pub struct Fleet {
    poll: Poll,
    pub clients: Vec<Client>,
    events: Events,
    scratch: Vec<u8>,
}

const REQ_TAIL: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

impl Fleet {
    pub fn new() -> Fleet {
        Fleet {
            poll: Poll::new().expect("poll"),
            clients: Vec::new(),
            events: Events::with_capacity(4096),
            scratch: vec![0; 256 * 1024],
        }
    }

    /// Opens `n` WebSocket connections to `addr` on `path` (at most `window` handshakes in
    /// flight; see `client_socket` for source addresses). Returns elapsed.
    pub fn connect(&mut self, addr: SocketAddr, path: &str, n: usize, window: usize) -> Duration {
        let start = Instant::now();
        let first = self.clients.len();
        let target = first + n;
        let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n{REQ_TAIL}");
        while self.clients.iter().skip(first).filter(|c| c.open).count() < n {
            let pending = self.clients.len()
                - first
                - self.clients[first..].iter().filter(|c| c.open).count();
            let mut room = window.saturating_sub(pending);
            while room > 0 && self.clients.len() < target {
                let i = self.clients.len();
                let sock = client_socket(i);
                sock.set_nonblocking(true).expect("nonblocking");
                let _ = sock.set_tcp_nodelay(true);
                match sock.connect(&addr.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) => panic!("connect #{i}: {e}"),
                }
                let mut s = TcpStream::from_std(sock.into());
                self.poll
                    .registry()
                    .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)
                    .expect("register");
                self.clients.push(Client {
                    s,
                    buf: Vec::new(),
                    open: false,
                    sent_req: false,
                    received: 0,
                });
                room -= 1;
            }
            self.poll
                .poll(&mut self.events, Some(Duration::from_millis(100)))
                .expect("poll");
            let ready: Vec<(usize, bool)> = self
                .events
                .iter()
                .map(|e| (e.token().0, e.is_writable()))
                .collect();
            for (i, writable) in ready {
                let c = &mut self.clients[i];
                if writable && !c.sent_req && c.s.peer_addr().is_ok() {
                    c.s.write_all(req.as_bytes()).expect("send request");
                    c.sent_req = true;
                }
                if !c.open && c.sent_req {
                    let mut tmp = [0u8; 512];
                    while let Ok(k) = c.s.read(&mut tmp) {
                        if k == 0 {
                            panic!("server closed during handshake");
                        }
                        c.buf.extend_from_slice(&tmp[..k]);
                    }
                    if let Some(end) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        assert!(
                            c.buf.starts_with(b"HTTP/1.1 101"),
                            "{}",
                            String::from_utf8_lossy(&c.buf)
                        );
                        c.buf.drain(..end + 4);
                        c.buf.shrink_to_fit();
                        c.open = true;
                    }
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "handshakes stalled"
            );
        }
        start.elapsed()
    }

    /// Sends `frames` (already encoded) from client `i`.
    pub fn send(&mut self, i: usize, bytes: &[u8]) {
        let s = &mut self.clients[i].s;
        let mut off = 0;
        while off < bytes.len() {
            match s.write(&bytes[off..]) {
                Ok(k) => off += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("send: {e}"),
            }
        }
    }

    /// Reads whatever arrives for up to `wait`, calling `on_msg(client, payload)` per
    /// data frame. Returns when `done()` or the time is up.
    pub fn pump(
        &mut self,
        wait: Duration,
        on_msg: &mut dyn FnMut(usize, &[u8]),
        done: &mut dyn FnMut() -> bool,
    ) {
        let end = Instant::now() + wait;
        while !done() && Instant::now() < end {
            let _ = self
                .poll
                .poll(&mut self.events, Some(Duration::from_millis(5)));
            let ready: Vec<usize> = self
                .events
                .iter()
                .filter(|e| e.is_readable())
                .map(|e| e.token().0)
                .collect();
            for i in ready {
                self.read_client(i, on_msg);
            }
        }
    }

    pub fn read_client(&mut self, i: usize, on_msg: &mut dyn FnMut(usize, &[u8])) {
        let c = &mut self.clients[i];
        loop {
            match c.s.read(&mut self.scratch) {
                Ok(0) => return,
                Ok(k) => {
                    c.buf.extend_from_slice(&self.scratch[..k]);
                    let mut pos = 0;
                    while let Some((op, start, len)) = parse_frame(&c.buf[pos..]) {
                        if op == 1 || op == 2 {
                            c.received += 1;
                            on_msg(i, &c.buf[pos + start..pos + start + len]);
                        }
                        pos += start + len;
                    }
                    c.buf.drain(..pos);
                }
                Err(_) => return,
            }
        }
    }

    pub fn total_received(&self) -> u64 {
        self.clients.iter().map(|c| c.received).sum()
    }
}

/// (opcode, payload offset, payload length) of an unmasked server frame.
pub fn parse_frame(b: &[u8]) -> Option<(u8, usize, usize)> {
    if b.len() < 2 {
        return None;
    }
    let op = b[0] & 0x0f;
    let (start, len) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
        127 if b.len() >= 10 => (10, u64::from_be_bytes(b[2..10].try_into().ok()?) as usize),
        126 | 127 => return None,
        n => (2, n as usize),
    };
    (b.len() >= start + len).then_some((op, start, len))
}

/// A masked (zero key) client text frame.
pub fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0x81];
    if payload.len() < 126 {
        v.push(0x80 | payload.len() as u8);
    } else {
        v.push(0x80 | 126);
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    v.extend_from_slice(&[0, 0, 0, 0]);
    v.extend_from_slice(payload);
    v
}

pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

//! A minimal WebSocket client on a raw socket (masked frames out, server frames in),
//! so a reader and a writer can share one connection from two threads.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    crate::common::masked_frame(true, opcode, payload, [7, 1, 9, 3])
}

pub struct Client {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

pub enum Got {
    Frame(u8, Vec<u8>),
    Idle,
    Gone,
}

impl Client {
    /// Upgrades on `path`; `None` when refused or unreachable.
    pub fn connect(addr: SocketAddr, path: &str) -> Option<Client> {
        Self::connect_with(addr, path, None)
    }

    /// The same, with a small receive buffer (a client that never reads fills it soon).
    pub fn connect_with(addr: SocketAddr, path: &str, rcvbuf: Option<usize>) -> Option<Client> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
        if let Some(n) = rcvbuf {
            sock.set_recv_buffer_size(n).ok()?;
        }
        sock.connect_timeout(&addr.into(), Duration::from_secs(2))
            .ok()?;
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        // A server that stops reading must not hang the soak.
        s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
        s.set_nodelay(true).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            let n = s.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        if !buf.starts_with(b"HTTP/1.1 101") {
            return None;
        }
        buf.drain(..end);
        s.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
        Some(Client { s, buf })
    }

    pub fn send(&mut self, opcode: u8, payload: &[u8]) -> bool {
        self.s.write_all(&client_frame(opcode, payload)).is_ok()
    }

    /// Next frame (server frames are unmasked and, from wsfan, never fragmented).
    pub fn next(&mut self) -> Got {
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0f;
                let (len, hdr) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(b) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if hdr > 0 && self.buf.len() >= hdr + len {
                    let payload = self.buf[hdr..hdr + len].to_vec();
                    self.buf.drain(..hdr + len);
                    return Got::Frame(op, payload);
                }
            }
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk) {
                Ok(0) => return Got::Gone,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Got::Idle
                }
                Err(_) => return Got::Gone,
            }
        }
    }

    /// Cuts TCP with a reset: no close frame, no FIN.
    pub fn kill(self) {
        let sock = socket2::SockRef::from(&self.s);
        let _ = sock.set_linger(Some(Duration::ZERO));
    }
}

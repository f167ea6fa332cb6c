//! The transport under each Redis link: the non-blocking TCP or Unix stream (after a
//! host-name lookup in a child process) and one connection's buffers (`Link`: write
//! buffer, read buffer, parser). No Pub/Sub logic and no timing here (`health` has it).

use super::resp::ReadBuf;
use super::target::{Addr, Target};
use mio::event::Source;
use mio::{Interest, Registry, Token};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

/// Above this the write buffer is released once it drains.
const KEEP_OUT_BYTES: usize = 2 * 1024 * 1024;

/// Starts connecting. An IP literal or a Unix path connects at once; a host name is
/// first resolved by a child process (`Stream::Resolving`), never on the loop.
pub(super) fn connect(target: &Target) -> io::Result<Stream> {
    match &target.addr {
        Addr::Tcp(host, port) => match host.parse::<IpAddr>() {
            Ok(ip) => Stream::tcp(SocketAddr::new(ip, *port)),
            Err(_) => Ok(Stream::Resolving(Resolver::start(host, *port)?)),
        },
        Addr::Unix(p) => Ok(Stream::Unix(mio::net::UnixStream::connect(p)?)),
    }
}

/// The hidden `wsfan --resolve HOST PORT` mode: getaddrinfo (hosts file, DNS search
/// domains, everything glibc's resolver does) in a short-lived process of its own, so
/// a slow or dead DNS server can only delay the Redis link, never stall the loop.
/// Prints one address per line, or one line `!<why>` and exit status 1.
pub fn resolve_main(host: &str, port: &str) -> i32 {
    let Ok(port) = port.parse::<u16>() else {
        return 2;
    };
    match (host, port).to_socket_addrs() {
        Ok(addrs) => {
            let mut out = String::new();
            for a in addrs.take(MAX_ADDRS) {
                out.push_str(&a.to_string());
                out.push('\n');
            }
            if out.is_empty() {
                println!("!no address for {host}");
                return 1;
            }
            print!("{out}");
            0
        }
        Err(e) => {
            println!("!{host}: {e}");
            1
        }
    }
}

/// Addresses kept from one lookup (tried in order).
const MAX_ADDRS: usize = 16;
/// Bytes read from the resolver at most (`MAX_ADDRS` IPv6 lines fit easily).
const MAX_RESOLVER_OUTPUT: usize = 4096;

/// A running `wsfan --resolve`: its stdout is a non-blocking pipe in the poll.
pub(super) struct Resolver {
    /// `None` once handed over by `finish`.
    child: Option<std::process::Child>,
    out: mio::unix::pipe::Receiver,
    buf: Vec<u8>,
}

impl Resolver {
    fn start(host: &str, port: u16) -> io::Result<Resolver> {
        let mut child = std::process::Command::new("/proc/self/exe")
            .args(["--resolve", host, &port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            return Err(io::Error::other("resolver has no stdout"));
        };
        let out = mio::unix::pipe::Receiver::from(stdout);
        out.set_nonblocking(true)?;
        Ok(Resolver {
            child: Some(child),
            out,
            buf: Vec::new(),
        })
    }

    /// Reads what the resolver printed: `Ok(Some(addrs))` once it is done.
    fn poll(&mut self) -> io::Result<Option<Vec<SocketAddr>>> {
        let mut chunk = [0u8; 512];
        loop {
            match self.out.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) if self.buf.len() + n <= MAX_RESOLVER_OUTPUT => {
                    self.buf.extend_from_slice(&chunk[..n])
                }
                Ok(_) => return Err(io::Error::other("resolver output too long")),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let text = String::from_utf8_lossy(&self.buf);
        if let Some(why) = text.strip_prefix('!') {
            return Err(io::Error::other(why.trim_end().to_string()));
        }
        let addrs: Vec<SocketAddr> = text.lines().filter_map(|l| l.parse().ok()).collect();
        if addrs.is_empty() {
            return Err(io::Error::other("host name not resolved"));
        }
        Ok(Some(addrs))
    }

    /// Stops the child (if it is still running) and reaps it, or hands it back to be
    /// reaped later.
    fn finish(mut self) -> Option<std::process::Child> {
        let mut child = self.child.take()?;
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        let _ = child.kill();
        match child.try_wait() {
            Ok(None) => Some(child),
            _ => None,
        }
    }
}

impl Drop for Resolver {
    /// At exit (the link dropped with a lookup in flight) the child is not left running.
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
    }
}

pub(super) enum Stream {
    /// A host name is being looked up; then `Tcp` to each address in turn.
    Resolving(Resolver),
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

/// What a connecting stream did on an event.
pub(super) enum Progress {
    Waiting,
    Connected,
    /// The name resolved: connect to these addresses, in order.
    Resolved(Vec<SocketAddr>),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
            Stream::Resolving(_) => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
            Stream::Resolving(_) => Err(io::ErrorKind::NotConnected.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream {
    fn tcp(addr: SocketAddr) -> io::Result<Stream> {
        let s = mio::net::TcpStream::connect(addr)?;
        let _ = s.set_nodelay(true);
        Ok(Stream::Tcp(s))
    }

    pub(super) fn source(&mut self) -> &mut dyn Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
            Stream::Resolving(r) => &mut r.out,
        }
    }

    /// Advances a connect in progress (a lookup, then a non-blocking connect).
    pub(super) fn progress(&mut self) -> io::Result<Progress> {
        let (err, peer) = match self {
            Stream::Resolving(r) => {
                return Ok(r.poll()?.map_or(Progress::Waiting, Progress::Resolved))
            }
            Stream::Tcp(s) => (s.take_error()?, s.peer_addr().map(|_| ())),
            Stream::Unix(s) => (s.take_error()?, s.peer_addr().map(|_| ())),
        };
        if let Some(e) = err {
            return Err(e);
        }
        match peer {
            Ok(()) => Ok(Progress::Connected),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(Progress::Waiting),
            Err(e) => Err(e),
        }
    }
}

/// One Redis connection's transport: stream, buffers, parser.
pub(super) struct Link {
    pub(super) name: &'static str,
    pub(super) token: Token,
    pub(super) stream: Option<Stream>,
    /// Resolved addresses not tried yet in this attempt.
    pub(super) addrs: std::collections::VecDeque<SocketAddr>,
    /// Resolver processes stopped but not yet reaped (at most a few).
    reap: Vec<std::process::Child>,
    pub(super) parser: redis::Parser,
    pub(super) rbuf: ReadBuf,
    /// The last read stopped at its budget, not at WouldBlock.
    pub(super) more_to_read: bool,
    out: Vec<u8>,
    out_pos: usize,
}

impl Link {
    /// `max_bulk`: the largest bulk string (message payload) this link keeps.
    pub(super) fn new(name: &'static str, token: Token, max_bulk: usize) -> Link {
        Link {
            name,
            token,
            stream: None,
            addrs: std::collections::VecDeque::new(),
            reap: Vec::new(),
            parser: redis::Parser::new(),
            rbuf: ReadBuf::new(max_bulk),
            more_to_read: false,
            out: Vec::new(),
            out_pos: 0,
        }
    }

    pub(super) fn send(&mut self, cmd: &redis::Cmd) {
        cmd.write_packed_command(&mut self.out);
    }

    /// Writes queued bytes until done or WouldBlock (the caller checks that the stream
    /// is connected).
    pub(super) fn write(&mut self) -> io::Result<()> {
        let Some(s) = self.stream.as_mut() else {
            return Ok(());
        };
        while self.out_pos < self.out.len() {
            match s.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        if self.out.capacity() > KEEP_OUT_BYTES {
            self.out = Vec::new();
        }
        Ok(())
    }

    pub(super) fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Drops the current stream (deregistered; a resolver is stopped).
    fn drop_stream(&mut self, registry: &Registry) {
        if let Some(mut s) = self.stream.take() {
            let _ = registry.deregister(s.source());
            if let Stream::Resolving(r) = s {
                self.reap.extend(r.finish());
            }
        }
    }

    /// Reaps resolver processes that have exited.
    pub(super) fn reap(&mut self) {
        self.reap.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }

    /// Starts connecting to the next resolved address that can be tried.
    pub(super) fn connect_next(&mut self, registry: &Registry) -> io::Result<()> {
        self.drop_stream(registry);
        let mut last = io::Error::other("no address left to try");
        while let Some(addr) = self.addrs.pop_front() {
            let started = Stream::tcp(addr).and_then(|mut s| {
                registry.register(
                    s.source(),
                    self.token,
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                Ok(s)
            });
            match started {
                Ok(s) => {
                    self.stream = Some(s);
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    pub(super) fn is_resolving(&self) -> bool {
        matches!(self.stream, Some(Stream::Resolving(_)))
    }

    /// Drops the connection and everything buffered for it (a new connection starts
    /// with a new parser: the redis crate's EOF is sticky).
    pub(super) fn close(&mut self, registry: &Registry) {
        self.drop_stream(registry);
        self.addrs.clear();
        self.parser = redis::Parser::new();
        self.rbuf.clear();
        self.more_to_read = false;
        self.out.clear();
        self.out_pos = 0;
    }
}

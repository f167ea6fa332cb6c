//! The floor a broadcast is compared with: raw writes on raw sockets, in two helper
//! processes (this bench binary re-run with `WSFAN_BENCH_ROLE`).

use crate::fleet::client_socket;
use crate::{env_or, self_cpu};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A helper process, stopped with SIGTERM (then SIGKILL) on drop.
struct Proc(Child);
impl Drop for Proc {
    /// SIGTERM first (wsfan shuts down gracefully, and a wrapping profiler gets to write
    /// its output), SIGKILL if it is still there after 10 s.
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The floor: CPU for `n` raw 66-byte writes, each on its own loopback socket, with a
/// receiver waiting in epoll on the other ends (as the load generator waits on wsfan's
/// sockets, so the writer pays the same wake-ups). Writer and receiver are child
/// processes (this bench re-run with `WSFAN_BENCH_ROLE`), so the full `n` sockets fit
/// next to the fleet's under a per-process open-files limit; nothing is scaled.
/// (A variant with the writer's sockets non-blocking and registered in an epoll set, as a
/// server's are, measured the same within noise, so the plain writes are the floor.)
pub struct FloorRig {
    _writer: Proc,
    to_writer: std::process::ChildStdin,
    from_writer: std::io::BufReader<std::process::ChildStdout>,
    _reader: Proc,
    from_reader: std::io::BufReader<std::process::ChildStdout>,
}

fn spawn_role(
    role: &str,
    env: &[(&str, String)],
) -> (Proc, std::io::BufReader<std::process::ChildStdout>) {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .env("WSFAN_BENCH_ROLE", role)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn floor helper");
    let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    (Proc(child), out)
}

fn read_line(r: &mut impl std::io::BufRead) -> String {
    let mut line = String::new();
    let _ = r.read_line(&mut line);
    line.trim().to_string()
}

impl FloorRig {
    pub fn new(n: usize) -> FloorRig {
        let (mut writer, mut from_writer) = spawn_role("floor-writer", &[("N", n.to_string())]);
        let port = read_line(&mut from_writer);
        let (reader, mut from_reader) =
            spawn_role("floor-reader", &[("N", n.to_string()), ("PORT", port)]);
        assert_eq!(
            read_line(&mut from_reader),
            "ready",
            "floor reader connected"
        );
        assert_eq!(
            read_line(&mut from_writer),
            "ready",
            "floor writer accepted"
        );
        let to_writer = writer.0.stdin.take().expect("stdin");
        FloorRig {
            _writer: writer,
            to_writer,
            from_writer,
            _reader: reader,
            from_reader,
        }
    }

    /// One round: every socket gets one write. Returns the writer's (CPU ms, wall ms
    /// from its first write to its last).
    pub fn round(&mut self) -> (f64, f64) {
        let _ = writeln!(self.to_writer, "go");
        let _ = self.to_writer.flush();
        let line = read_line(&mut self.from_writer);
        assert_eq!(
            read_line(&mut self.from_reader),
            "round",
            "floor reader got all"
        );
        let mut it = line.split(' ').filter_map(|v| v.parse::<f64>().ok());
        (
            it.next().unwrap_or(0.0) / 1e6,
            it.next().unwrap_or(0.0) / 1e6,
        )
    }
}

/// Child role: accept N connections, then per "go" line on stdin write 66 bytes to each
/// and print "<cpu ns> <wall ns>".
pub fn floor_writer() {
    let n = env_or("N", 0);
    let l = TcpListener::bind("127.0.0.1:0").expect("listener");
    println!("{}", l.local_addr().expect("addr").port());
    let mut conns: Vec<std::net::TcpStream> = Vec::with_capacity(n);
    for _ in 0..n {
        let (s, _) = l.accept().expect("accept");
        let _ = s.set_nodelay(true);
        conns.push(s);
    }
    println!("ready");
    let frame = [0x81u8; 66];
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|k| k > 0) {
        line.clear();
        let (c0, t0) = (self_cpu(), Instant::now());
        for s in conns.iter_mut() {
            let _ = s.write(&frame);
        }
        let wall = t0.elapsed().as_nanos();
        println!("{} {wall}", self_cpu() - c0);
    }
}

/// Child role: connect N sockets to PORT, print "ready", then read in an epoll loop and
/// print "round" each time another N * 66 bytes have arrived.
pub fn floor_reader() {
    let n = env_or("N", 0);
    let port = env_or("PORT", 0);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut poll = Poll::new().expect("poll");
    let mut socks = Vec::with_capacity(n);
    for i in 0..n {
        // Source addresses after the fleet's, so ports never collide with it.
        let sock = client_socket(1_000_000 + i);
        sock.connect(&addr.into()).expect("connect");
        sock.set_nonblocking(true).expect("nonblocking");
        let mut s = TcpStream::from_std(sock.into());
        poll.registry()
            .register(&mut s, Token(i), Interest::READABLE)
            .expect("register");
        socks.push(s);
    }
    // Stdin closing (the bench ended, however it ended) stops this process.
    let stdin = 0;
    poll.registry()
        .register(
            &mut mio::unix::SourceFd(&stdin),
            Token(usize::MAX),
            Interest::READABLE,
        )
        .expect("register stdin");
    println!("ready");
    let mut events = Events::with_capacity(4096);
    let (mut got, mut rounds) = (0usize, 0usize);
    let mut buf = [0u8; 256];
    loop {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(100)));
        for e in events.iter() {
            if e.token() == Token(usize::MAX) {
                if std::io::stdin().read(&mut buf).map_or(true, |k| k == 0) {
                    return;
                }
                continue;
            }
            while let Ok(k @ 1..) = socks[e.token().0].read(&mut buf) {
                got += k;
            }
        }
        while got >= (rounds + 1) * n * 66 {
            rounds += 1;
            println!("round");
        }
    }
}

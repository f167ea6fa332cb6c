//! End-to-end benchmark: real wsfan processes, a real redis-server, and a single-threaded
//! mio load generator, all on loopback. `cargo bench --bench e2e`.
//!
//! Prints: binary size, RSS per idle connection, idle CPU, handshakes/s, broadcast time
//! to N connections with server CPU against the raw-write floor, coalescing (deliveries
//! per write, CPU per delivery at 1/10/100 messages per loop iteration), and throughput
//! with 2 instances + Redis (deliveries/s, loss, latency p50/p99/p999, CPU per delivery).
//!
//! Sizes by environment: WSFAN_BENCH_IDLE (10000), WSFAN_BENCH_CLIENTS (1000),
//! WSFAN_BENCH_SECS (5), WSFAN_BENCH_RATES (publishes/s, "200,400,800,1200").
//! WSFAN_BENCH_ONLY=idle|coalescing|throughput runs one phase (e.g. under `perf record`);
//! WSFAN_BENCH_WRAP="valgrind --tool=callgrind ..." runs wsfan under a tool.
//! Under `cargo test` (no `--bench`) it runs a small smoke version.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{free_port, rss_kb};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set in a smoke run (`cargo test`, debug build): its figures are labelled as such.
static SMOKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `println!`, labelled "smoke" when the figures are not a measurement.
macro_rules! report {
    ($($arg:tt)*) => {{
        if SMOKE.load(std::sync::atomic::Ordering::Relaxed) {
            println!("smoke, not a measurement: {}", format_args!($($arg)*));
        } else {
            println!($($arg)*);
        }
    }};
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn raise_nofile() {
    let lim = libc::rlimit {
        rlim_cur: 1_000_000,
        rlim_max: 1_000_000,
    };
    // SAFETY: plain syscall on a struct we own. Fails harmlessly when not permitted.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
            cur.rlim_cur = cur.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
        }
    }
}

/// CPU time (ns) a process or thread has spent running, from schedstat.
fn cpu_ns(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn proc_cpu(pid: u32) -> u64 {
    cpu_ns(&format!("/proc/{pid}/schedstat"))
}

fn self_cpu() -> u64 {
    cpu_ns("/proc/thread-self/schedstat")
}

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

fn wait_http_ok(addr: SocketAddr, path: &str) {
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if http_get(addr, path).0 == 200 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{addr}{path} never answered 200");
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics");
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

fn start_wsfan(extra: &[&str]) -> (Proc, SocketAddr) {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // WSFAN_BENCH_WRAP runs wsfan under a tool, e.g.
    // "valgrind --tool=callgrind --callgrind-out-file=/tmp/wsfan.%p.cg".
    let wrap = std::env::var("WSFAN_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(tool) => {
            let mut c = Command::new(tool);
            c.args(words).arg(env!("CARGO_BIN_EXE_wsfan"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_wsfan")),
    };
    let child = cmd
        .args([
            "--listen",
            &addr.to_string(),
            "--log-level",
            "warn",
            "--ping-interval",
            "3600",
        ])
        .args([
            "--handshake-timeout",
            "60",
            "--max-messages-per-sec",
            "1000000",
        ])
        .args(["--max-messages-burst", "1000000"])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn wsfan");
    let p = Proc(child);
    wait_http_ok(addr, "/healthz");
    (p, addr)
}

/// Connections per loopback source address: few enough that the kernel's search for a
/// free ephemeral port stays short (it slows down as a source address fills up).
const PER_SOURCE_IP: usize = 5_000;

/// A client socket bound to a loopback source address chosen for connection `i`, with
/// the port picked at connect time (IP_BIND_ADDRESS_NO_PORT) so TIME_WAIT ports from
/// earlier runs can be reused: >28k connections and repeated runs both fit.
fn client_socket(i: usize) -> Socket {
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

struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    open: bool,
    sent_req: bool,
    received: u64,
}

/// Many WebSocket clients on one mio poll.
struct Fleet {
    poll: Poll,
    clients: Vec<Client>,
    events: Events,
    scratch: Vec<u8>,
}

const REQ_TAIL: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

impl Fleet {
    fn new() -> Fleet {
        Fleet {
            poll: Poll::new().expect("poll"),
            clients: Vec::new(),
            events: Events::with_capacity(4096),
            scratch: vec![0; 256 * 1024],
        }
    }

    /// Opens `n` WebSocket connections to `addr` on `path` (at most `window` handshakes in
    /// flight; see `client_socket` for source addresses). Returns elapsed.
    fn connect(&mut self, addr: SocketAddr, path: &str, n: usize, window: usize) -> Duration {
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
    fn send(&mut self, i: usize, bytes: &[u8]) {
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
    fn pump(
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

    fn read_client(&mut self, i: usize, on_msg: &mut dyn FnMut(usize, &[u8])) {
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

    fn total_received(&self) -> u64 {
        self.clients.iter().map(|c| c.received).sum()
    }
}

/// (opcode, payload offset, payload length) of an unmasked server frame.
fn parse_frame(b: &[u8]) -> Option<(u8, usize, usize)> {
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
fn client_frame(payload: &[u8]) -> Vec<u8> {
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

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

/// Broadcasts (and raw-write floor rounds) per measurement: medians of this many.
const BROADCAST_ROUNDS: usize = 25;

// ---- phases -----------------------------------------------------------------------

fn idle_and_broadcast(wanted: usize) {
    // wsfan and this process each hold one descriptor per connection.
    let fits = nofile_limit().saturating_sub(1000) / 1000 * 1000;
    let n = wanted.min(fits.max(1000));
    if n < wanted {
        report!(
            "idle memory: {wanted} connections do not fit this machine's open-files limit ({}); \
             measuring {n} instead (raise the hard limit: ulimit -Hn / LimitNOFILE)",
            nofile_limit()
        );
    }
    let (p, addr) = start_wsfan(&["--max-connections", &(n + 500).to_string()]);
    let pid = p.0.id();
    std::thread::sleep(Duration::from_millis(200));
    let rss0 = rss_kb(pid);
    // Connections open in four steps with RSS read after each: bytes per connection
    // should stay flat as the count grows (nothing hidden that grows faster).
    let mut fleet = Fleet::new();
    let mut took = Duration::ZERO;
    let mut steps = Vec::new();
    for step in 1..=4 {
        let upto = n * step / 4;
        took += fleet.connect(addr, "/ws/bcast", upto - fleet.clients.len(), 1000);
        let deadline = Instant::now() + Duration::from_secs(30);
        while metric(addr, "wsfan_connections") < upto as f64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        let rss = rss_kb(pid);
        steps.push(format!(
            "{upto}: {:.0}",
            (rss.saturating_sub(rss0) * 1024) as f64 / upto as f64
        ));
        if step == 4 {
            report!("handshakes: {n} connections in {:.2} s = {:.0} new WebSocket connections/s (1000 in flight)",
                took.as_secs_f64(), n as f64 / took.as_secs_f64());
            report!("idle memory: RSS {rss0} KiB -> {rss} KiB with {n} open WebSocket connections = {:.0} bytes per connection",
                (rss.saturating_sub(rss0) * 1024) as f64 / n as f64);
        }
    }
    report!(
        "idle memory, bytes per connection by count: {}",
        steps.join(", ")
    );
    let c0 = proc_cpu(pid);
    std::thread::sleep(Duration::from_secs(2));
    report!(
        "idle CPU: {:.3} ms over 2 s with {n} idle connections",
        (proc_cpu(pid) - c0) as f64 / 1e6
    );

    // Broadcast: client 0 sends one 64-byte message; time until all n have it. Each
    // round is paired with a floor round, so both see the same machine conditions.
    let mut floor_rig = FloorRig::new(n);
    let (mut spans, mut cpus, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut floors, mut floor_walls) = (Vec::new(), Vec::new());
    for round in 0..BROADCAST_ROUNDS {
        // Floor before the broadcast on odd rounds, after it on even ones: drift in
        // machine speed during the run falls on both sides equally.
        let floor_first = (round % 2 == 1).then(|| floor_rig.round());
        let payload = format!("{round:064}");
        let frame = client_frame(payload.as_bytes());
        let before = fleet.total_received();
        let cpu0 = proc_cpu(pid);
        let t0 = Instant::now();
        let (mut first, mut last) = (None, None);
        fleet.send(0, &frame);
        let got = Cell::new(0usize);
        fleet.pump(
            Duration::from_secs(20),
            &mut |_, _| {
                got.set(got.get() + 1);
                let now = t0.elapsed();
                first.get_or_insert(now);
                last = Some(now);
            },
            &mut || got.get() >= n,
        );
        let cpu = (proc_cpu(pid) - cpu0) as f64 / 1e6;
        assert_eq!(
            fleet.total_received() - before,
            n as u64,
            "every connection got the broadcast"
        );
        let (floor, wall) = floor_first.unwrap_or_else(|| floor_rig.round());
        cpus.push(cpu);
        floors.push(floor);
        floor_walls.push(wall);
        ratios.push(cpu / floor);
        spans.push((first.unwrap_or_default(), last.unwrap_or_default()));
    }
    drop((floor_rig, fleet, p));
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    spans.sort_by_key(|s| s.1);
    let (f, l) = spans[spans.len() / 2];
    report!(
        "broadcast: one 64-byte message to {n} connections: first after {:.1} ms, last after {:.1} ms \
         (median of {BROADCAST_ROUNDS}; {n} raw writes take {:.1} ms from first to last)",
        f.as_secs_f64() * 1e3,
        l.as_secs_f64() * 1e3,
        median(&mut floor_walls),
    );
    report!(
        "broadcast CPU: server {:.1} ms vs {:.1} ms for {n} raw writes: per-round ratio median {:.2}x \
         (min {:.2}x, max {:.2}x; {BROADCAST_ROUNDS} interleaved rounds)",
        median(&mut cpus),
        median(&mut floors),
        median(&mut ratios),
        ratios[0],
        ratios[ratios.len() - 1],
    );
}

/// The floor: CPU for `n` raw 66-byte writes, each on its own loopback socket, with a
/// receiver waiting in epoll on the other ends (as the load generator waits on wsfan's
/// sockets, so the writer pays the same wake-ups). Writer and receiver are child
/// processes (this bench re-run with `WSFAN_BENCH_ROLE`), so the full `n` sockets fit
/// next to the fleet's under a per-process open-files limit; nothing is scaled.
/// (A variant with the writer's sockets non-blocking and registered in an epoll set, as a
/// server's are, measured the same within noise, so the plain writes are the floor.)
struct FloorRig {
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
    fn new(n: usize) -> FloorRig {
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
    fn round(&mut self) -> (f64, f64) {
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
fn floor_writer() {
    let n = env_or("N", 0);
    let l = TcpListener::bind("127.0.0.1:0").expect("listener");
    report!("{}", l.local_addr().expect("addr").port());
    let mut conns: Vec<std::net::TcpStream> = Vec::with_capacity(n);
    for _ in 0..n {
        let (s, _) = l.accept().expect("accept");
        let _ = s.set_nodelay(true);
        conns.push(s);
    }
    report!("ready");
    let frame = [0x81u8; 66];
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|k| k > 0) {
        line.clear();
        let (c0, t0) = (self_cpu(), Instant::now());
        for s in conns.iter_mut() {
            let _ = s.write(&frame);
        }
        let wall = t0.elapsed().as_nanos();
        report!("{} {wall}", self_cpu() - c0);
    }
}

/// Child role: connect N sockets to PORT, print "ready", then read in an epoll loop and
/// print "round" each time another N * 66 bytes have arrived.
fn floor_reader() {
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
    report!("ready");
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
            report!("round");
        }
    }
}

/// The open-files limit after `raise_nofile` (soft = hard where allowed).
fn nofile_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return usize::MAX;
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

fn coalescing(clients: usize) {
    let (p, addr) = start_wsfan(&["--max-connections", &(clients + 100).to_string()]);
    let pid = p.0.id();
    let mut fleet = Fleet::new();
    fleet.connect(addr, "/ws/co", clients, 500);
    for k in [1usize, 10, 100] {
        let bursts = (200 / k).max(4);
        let burst: Vec<u8> = (0..k)
            .flat_map(|i| client_frame(format!("{i:032}").as_bytes()))
            .collect();
        let w0 = metric(addr, "wsfan_write_calls_total");
        let cpu0 = proc_cpu(pid);
        let before = fleet.total_received();
        for _ in 0..bursts {
            let want = fleet.total_received() + (k * clients) as u64;
            fleet.send(0, &burst);
            let got = Cell::new(fleet.total_received());
            fleet.pump(
                Duration::from_secs(20),
                &mut |_, _| got.set(got.get() + 1),
                &mut || got.get() >= want,
            );
            assert!(fleet.total_received() >= want, "burst not delivered");
        }
        let cpu = (proc_cpu(pid) - cpu0) as f64;
        let deliveries = (fleet.total_received() - before) as f64;
        // Subtract the metrics scrape itself (one write).
        let writes = metric(addr, "wsfan_write_calls_total") - w0 - 1.0;
        report!(
            "coalescing: {k:>3} messages per loop iteration x {clients} clients: {:.1} deliveries per write, \
             {:.2} us server CPU per delivery",
            deliveries / writes.max(1.0),
            cpu / 1e3 / deliveries
        );
    }
}

fn throughput(clients: usize, secs: f64, rates: &[u64]) {
    // The tests' private redis-server helper: free port, no persistence, killed on drop.
    let redis = common::Redis::start();
    let redis_pid = redis.child.as_ref().map_or(0, |c| c.id());
    let url = redis.url();
    let (a, aa) = start_wsfan(&[
        "--redis",
        &url,
        "--max-connections",
        &(clients + 100).to_string(),
    ]);
    let (b, ba) = start_wsfan(&[
        "--redis",
        &url,
        "--max-connections",
        &(clients + 100).to_string(),
    ]);
    wait_http_ok(aa, "/readyz");
    wait_http_ok(ba, "/readyz");
    let mut fleet = Fleet::new();
    fleet.connect(aa, "/ws/tp", clients / 2, 500);
    fleet.connect(ba, "/ws/tp", clients - clients / 2, 500);
    let publishers: Vec<usize> = (0..10.min(clients))
        .map(|i| i * clients / 10.min(clients))
        .collect();
    let origin = Instant::now();
    for &rate in rates {
        let before = fleet.total_received();
        let cpus0 = [
            proc_cpu(a.0.id()),
            proc_cpu(b.0.id()),
            proc_cpu(redis_pid),
            self_cpu(),
        ];
        let mut lat: Vec<u64> = Vec::with_capacity((rate as f64 * secs) as usize * clients);
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                let ts = origin.elapsed().as_nanos() as u64;
                let who = publishers[(sent % publishers.len() as u64) as usize];
                fleet.send(who, &client_frame(format!("{ts:020}").as_bytes()));
                sent += 1;
            }
            fleet.pump(
                Duration::from_millis(1),
                &mut |_, p| record(&mut lat, origin, p),
                &mut || false,
            );
        }
        let want = sent * clients as u64;
        let got = Cell::new(fleet.total_received() - before);
        fleet.pump(
            Duration::from_secs(10),
            &mut |_, p| {
                got.set(got.get() + 1);
                record(&mut lat, origin, p)
            },
            &mut || got.get() >= want,
        );
        let elapsed = start.elapsed().as_secs_f64();
        let got = fleet.total_received() - before;
        let cpu = |i: usize, pid: u32| (proc_cpu(pid) - cpus0[i]) as f64;
        let server = cpu(0, a.0.id()) + cpu(1, b.0.id());
        let redis_cpu = cpu(2, redis_pid);
        let gen = (self_cpu() - cpus0[3]) as f64;
        lat.sort_unstable();
        report!(
            "throughput @ {rate} publishes/s x {clients} clients (2 instances + Redis): {:.0} deliveries/s offered, \
             {got}/{want} delivered ({} lost); latency p50 {:.1} ms p99 {:.1} ms p999 {:.1} ms; \
             CPU per delivery: wsfan {:.2} us, redis {:.3} us, load generator {:.2} us",
            want as f64 / secs,
            want.saturating_sub(got),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            server / 1e3 / got.max(1) as f64,
            redis_cpu / 1e3 / got.max(1) as f64,
            gen / 1e3 / got.max(1) as f64,
        );
        let _ = elapsed;
        if got < want || percentile(&lat, 0.99) > 100.0 {
            report!(
                "throughput: stopping the ramp at {rate} publishes/s (loss or p99 over 100 ms)"
            );
            break;
        }
    }
}

fn record(lat: &mut Vec<u64>, origin: Instant, payload: &[u8]) {
    if let Some(ts) = std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        lat.push((origin.elapsed().as_nanos() as u64).saturating_sub(ts));
    }
}

fn main() {
    raise_nofile();
    match std::env::var("WSFAN_BENCH_ROLE").as_deref() {
        Ok("floor-writer") => return floor_writer(),
        Ok("floor-reader") => return floor_reader(),
        _ => {}
    }
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        println!("(smoke run under cargo test, debug build: the figures below only show the bench works; `cargo bench --bench e2e` measures)");
        SMOKE.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let bin = env!("CARGO_BIN_EXE_wsfan");
    let size = std::fs::metadata(bin).map(|m| m.len()).unwrap_or(0);
    report!(
        "binary: {bin} is {:.2} MiB",
        size as f64 / (1024.0 * 1024.0)
    );
    let (idle, clients, secs, rates) = if bench {
        let rates: Vec<u64> = std::env::var("WSFAN_BENCH_RATES")
            .unwrap_or_else(|_| "200,400,800,1200".into())
            .split(',')
            .filter_map(|r| r.trim().parse().ok())
            .collect();
        (
            env_or("WSFAN_BENCH_IDLE", 10_000),
            env_or("WSFAN_BENCH_CLIENTS", 1000),
            env_or("WSFAN_BENCH_SECS", 5) as f64,
            rates,
        )
    } else {
        (300, 50, 0.5, vec![100])
    };
    // WSFAN_BENCH_ONLY=idle|coalescing|throughput runs one phase (for profiling).
    let only = std::env::var("WSFAN_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "idle" {
        idle_and_broadcast(idle);
    }
    if only.is_empty() || only == "coalescing" {
        coalescing(clients);
    }
    if only.is_empty() || only == "throughput" {
        throughput(clients, secs, &rates);
    }
}

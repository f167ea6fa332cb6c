//! Test harness: the real `wsfan` binary, real `redis-server` processes on free ports,
//! real WebSocket and HTTP clients over TCP. Waits poll a condition with a deadline.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

pub type Ws = WebSocket<TcpStream>;

/// Polls `cond` every 10 ms until it holds or `secs` pass.
pub fn eventually(secs: f64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out after {secs} s waiting for: {what}");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running wsfan process; killed on drop.
pub struct Wsfan {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Wsfan {
    /// Starts wsfan on a free port with `args` (plus `--listen 127.0.0.1:0` unless given).
    pub fn start(args: &[&str]) -> Wsfan {
        Self::start_env(args, &[])
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Wsfan {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_wsfan")), args, env)
    }

    /// Starts wsfan in a private mount namespace where `/etc/resolv.conf` is `resolv_conf`
    /// (needs root: `unshare -m`). wsfan itself is the child (sh execs it).
    pub fn start_with_resolv_conf(resolv_conf: &std::path::Path, args: &[&str]) -> Wsfan {
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /etc/resolv.conf && exec \"$0\" \"$@\"",
                resolv_conf.display()
            ))
            .arg(env!("CARGO_BIN_EXE_wsfan"));
        Self::spawn(cmd, args, &[])
    }

    fn spawn(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> Wsfan {
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(args).env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wsfan");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                if std::env::var_os("WSFAN_TEST_LOG").is_some() {
                    eprintln!("[wsfan] {line}");
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => panic!("wsfan did not start: {}", log.lock().unwrap()),
        };
        Wsfan { child, addr, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_log(&self, needle: &str, secs: f64) {
        eventually(secs, &format!("log line containing {needle:?}"), || {
            self.log().contains(needle)
        });
    }

    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.child.id())
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    pub fn wait_exit(&mut self, secs: f64) -> ExitStatus {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < end, "wsfan did not exit within {secs} s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// GET /metrics, parsed into (series, value) pairs.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let (status, _, body) = http(
            self.addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status, 200);
        String::from_utf8(body)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .into_iter()
            .find(|(k, _)| k == series)
            .unwrap_or_else(|| panic!("no metric {series}"))
            .1
    }

    pub fn status(&self, path: &str) -> u16 {
        http(
            self.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .0
    }
}

impl Drop for Wsfan {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// Peak RSS: catches a large allocation even after it was freed again.
pub fn peak_rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmHWM:")
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A private redis-server on its own port; killed on drop.
pub struct Redis {
    pub child: Option<Child>,
    pub port: u16,
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// Starts redis-server on a given (free) port.
    pub fn start_on(port: u16) -> Redis {
        let mut r = Redis {
            child: None,
            port,
            extra: Vec::new(),
        };
        r.restart();
        r
    }

    pub fn start_with(extra: &[&str]) -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart();
        r
    }

    /// (Re)starts redis-server on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see README)");
        self.child = Some(child);
        let port = self.port;
        eventually(10.0, "redis-server answers PING", || {
            // Up when it answers at all (NOAUTH counts: a password is set).
            match redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            {
                Ok(_) => true,
                Err(e) => e.to_string().contains("NOAUTH"),
            }
        });
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Channels with at least one subscriber.
    pub fn channels(&self) -> Vec<String> {
        let mut v: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query(&mut self.conn())
            .unwrap();
        v.sort();
        v
    }

    pub fn numsub(&self, channel: &str) -> i64 {
        let v: (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut self.conn())
            .unwrap();
        v.1
    }

    pub fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query(&mut self.conn())
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A WebSocket client; reads time out after 10 s so a missing message fails the test.
pub fn connect(url: &str) -> Ws {
    try_connect(url, &[]).unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

pub fn try_connect(url: &str, headers: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let host = req.uri().authority().unwrap().as_str().to_string();
    let stream = TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    match tungstenite::client(req, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            Err(tungstenite::Error::ConnectionClosed)
        }
    }
}

/// Status of a refused upgrade (`None` if it succeeded).
pub fn upgrade_status(url: &str, headers: &[(&str, &str)]) -> Option<u16> {
    match try_connect(url, headers) {
        Ok(_) => None,
        Err(tungstenite::Error::Http(r)) => Some(r.status().as_u16()),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Next data message (pings/pongs skipped).
pub fn recv(ws: &mut Ws) -> Message {
    loop {
        match ws.read() {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(m) => return m,
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

pub fn recv_text(ws: &mut Ws) -> String {
    match recv(ws) {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Reads until the server's close frame; returns its code.
pub fn expect_close(ws: &mut Ws) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return u16::from(f.code),
            Ok(Message::Close(None)) => return 1005,
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => return 1005,
            Err(e) => panic!("expected a close frame, got error {e}"),
        }
    }
}

pub fn send_text(ws: &mut Ws, s: &str) {
    ws.send(Message::text(s)).unwrap();
}

pub fn close_code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// One raw HTTP exchange: sends `request`, reads the response (by Content-Length).
pub fn http(addr: SocketAddr, request: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    read_response(&mut s, request.starts_with("HEAD"))
}

pub fn read_response(s: &mut TcpStream, head_only: bool) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            other => panic!(
                "response ended early: {other:?} after {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let head = String::from_utf8(buf).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("Content-Length");
    let mut body = vec![0; if head_only { 0 } else { len }];
    s.read_exact(&mut body).unwrap();
    (status, head, body)
}

/// Child processes of `pid` with their state letter (`Z` = zombie), from /proc.
pub fn children(pid: u32) -> Vec<(u32, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let child: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
        let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
        let state = rest.next()?.chars().next()?;
        let ppid: u32 = rest.next()?.parse().ok()?;
        (ppid == pid).then_some((child, state))
    })
    .collect()
}

/// A DNS server on a loopback address of its own (UDP port 53, so root only), for
/// host-name tests: once `answer()` is called it answers every A query with `ips` and
/// AAAA with no records; until then it holds queries unanswered, as a dead DNS server
/// would. `resolv_conf` is a file pointing at it (see `Wsfan::start_with_resolv_conf`).
pub struct FakeDns {
    pub resolv_conf: std::path::PathBuf,
    queries: Arc<std::sync::atomic::AtomicUsize>,
    answer: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeDns {
    /// `None` (and a note on stderr) when not running as root.
    pub fn start(ips: Vec<std::net::Ipv4Addr>) -> Option<FakeDns> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: a private /etc/resolv.conf and port 53 need root");
            return None;
        }
        // One address per test process and server, so parallel tests never collide.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let ip = std::net::Ipv4Addr::new(127, 53, (id % 250) as u8 + 1, (n % 250) as u8 + 1);
        let sock = std::net::UdpSocket::bind((ip, 53)).expect("bind fake DNS");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let resolv_conf =
            std::env::temp_dir().join(format!("wsfan-test-resolv-{id}-{}", free_port()));
        std::fs::write(
            &resolv_conf,
            format!("nameserver {ip}\noptions timeout:30 attempts:1\n"),
        )
        .unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, a, st) = (queries.clone(), answer.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
            let mut buf = [0u8; 1500];
            while !st.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    q.fetch_add(1, Ordering::SeqCst);
                    held.push((buf[..n].to_vec(), from));
                }
                if a.load(Ordering::SeqCst) {
                    for (query, from) in held.drain(..) {
                        if let Some(reply) = dns_reply(&query, &ips) {
                            let _ = sock.send_to(&reply, from);
                        }
                    }
                }
            }
        });
        Some(FakeDns {
            resolv_conf,
            queries,
            answer,
            stop,
            thread: Some(thread),
        })
    }

    pub fn queries(&self) -> usize {
        self.queries.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn answer(&self) {
        self.answer.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.resolv_conf);
    }
}

/// The reply to a DNS query: its question echoed, A records for `ips` if it asks for A.
fn dns_reply(query: &[u8], ips: &[std::net::Ipv4Addr]) -> Option<Vec<u8>> {
    let mut pos = 12;
    while *query.get(pos)? != 0 {
        pos += 1 + *query.get(pos)? as usize;
    }
    let qtype = u16::from_be_bytes([*query.get(pos + 1)?, *query.get(pos + 2)?]);
    let end = pos + 5;
    let mut r = query.get(..end)?.to_vec();
    let answers: &[std::net::Ipv4Addr] = if qtype == 1 { ips } else { &[] };
    r[2] = 0x81; // response, recursion desired
    r[3] = 0x80; // recursion available, no error
    r[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
    r[8..12].copy_from_slice(&[0, 0, 0, 0]);
    for ip in answers {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

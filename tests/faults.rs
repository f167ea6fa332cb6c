//! Faults found under attack and real load (issue 9): each test is the hostile twin of
//! a happy path, against the real binary, real clients and real (or deliberately
//! broken) Redis servers. Each fails without its fix.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// A masked client frame (opcode, payload), as a browser would send it.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    masked_frame(true, opcode, payload, [0x11, 0x22, 0x33, 0x44])
}

/// A raw TCP stream that has completed the WebSocket handshake on `path`.
fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "handshake cut short");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    s
}

fn disconnects(s: &Wsfan, reason: &str) -> f64 {
    s.metric(&format!("wsfan_disconnects_total{{reason=\"{reason}\"}}"))
}

/// Writes `frame` over and over (never reading) until the server cuts the connection or
/// `secs` pass; returns whether it was cut.
fn flood_until_cut(mut s: TcpStream, frame: &[u8], secs: f64) -> bool {
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let batch: Vec<u8> = frame.repeat((16 * 1024 / frame.len()).max(1));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        match s.write(&batch) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// A bystander on another channel still gets a round trip.
fn round_trip(s: &Wsfan, text: &str) {
    let mut c = connect(&s.url("/ws/bystander"));
    send_text(&mut c, text);
    assert_eq!(recv_text(&mut c), text);
}

// ---- 1. pings from a client that never reads ----------------------------------------

fn ping_flood(extra: &[&str], reason: &str) {
    let mut args = vec!["--max-outbound-bytes", "65536"];
    args.extend_from_slice(extra);
    let s = Wsfan::start(&args);
    let base = s.rss_kb();
    let flooder = raw_ws(s.addr, "/ws/flood");
    let ping = client_frame(0x9, &[b'p'; 125]);
    let cut = std::thread::spawn(move || flood_until_cut(flooder, &ping, 20.0));
    eventually(20.0, "the ping flooder is cut off", || {
        disconnects(&s, reason) >= 1.0
    });
    round_trip(&s, "still here");
    assert!(cut.join().unwrap(), "the flooder's socket was closed");
    let peak = peak_rss_kb(s.child.id());
    assert!(
        peak < base + 16 * 1024,
        "peak RSS {peak} KiB from {base} KiB: pongs were not bounded"
    );
}

#[test]
fn a_ping_flood_is_rate_limited() {
    ping_flood(&[], "rate_limit");
}

#[test]
fn pongs_to_a_client_that_never_reads_count_against_its_output_cap() {
    // No rate limit to speak of: only the output cap can stop it.
    ping_flood(
        &[
            "--max-messages-per-sec",
            "10000000",
            "--max-messages-burst",
            "10000000",
        ],
        "slow_consumer",
    );
}

// ---- 4. a burst to a client that reads is not a slow consumer ------------------------

#[test]
fn a_client_that_reads_gets_every_echo_of_a_burst_larger_than_its_cap() {
    let s = Wsfan::start(&["--max-outbound-bytes", "65536"]);
    let base = s.rss_kb();
    let stream = raw_ws(s.addr, "/ws/burst");
    let mut writer = stream.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut ws = tungstenite::WebSocket::from_raw_socket(
            stream,
            tungstenite::protocol::Role::Client,
            None,
        );
        let mut got = Vec::new();
        while got.len() < 256 {
            match ws.read() {
                Ok(Message::Binary(b)) => got.push(b),
                Ok(Message::Close(c)) => panic!("closed after {} echoes: {c:?}", got.len()),
                Ok(_) => {}
                Err(e) => panic!("read failed after {} echoes: {e}", got.len()),
            }
        }
        got
    });
    // A bystander that never reads, on the same channel.
    let mut deaf = raw_ws(s.addr, "/ws/burst");
    let mut burst = Vec::new();
    for i in 0..256u32 {
        let mut p = vec![(i % 251) as u8; 16 * 1024];
        p[..4].copy_from_slice(&i.to_be_bytes());
        burst.extend(client_frame(0x2, &p));
    }
    writer.write_all(&burst).unwrap();
    let got = reader.join().unwrap();
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.len(), 16 * 1024);
        assert_eq!(&m[..4], &(i as u32).to_be_bytes(), "echo {i} out of order");
    }
    // The one that never read is cut off, and memory stayed bounded.
    eventually(10.0, "the deaf client is a slow consumer", || {
        disconnects(&s, "slow_consumer") >= 1.0
    });
    assert_eq!(disconnects(&s, "slow_consumer"), 1.0, "only the deaf one");
    let mut buf = [0u8; 65536];
    deaf.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut total = 0;
    while let Ok(n) = deaf.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n;
    }
    assert!(
        total < 16 * 1024 * 256,
        "the deaf client was not cut: {total} bytes"
    );
    // 4 MiB went through; queues held to 64 KiB each, plus read buffers.
    let peak = peak_rss_kb(s.child.id());
    assert!(
        peak < base + 16 * 1024,
        "peak RSS {peak} KiB from {base} KiB"
    );
}

// ---- 2. stderr that is full or gone ------------------------------------------------

/// Starts wsfan on a known port with stderr as a pipe we control.
fn start_with_stderr_pipe(level: &str) -> (std::process::Child, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_wsfan"))
        .args(["--listen", &addr.to_string(), "--log-level", level])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, addr)
}

fn healthz(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).is_ok()
        && http(
            addr,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .0 == 200
}

fn metric_at(addr: SocketAddr, name: &str) -> f64 {
    let (_, _, body) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    String::from_utf8(body)
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .map(|v| v.parse().unwrap())
        })
        .unwrap()
}

#[test]
fn a_log_line_to_a_closed_stderr_pipe_neither_kills_nor_blocks() {
    // debug: every upgrade and close writes a line.
    let (mut child, addr) = start_with_stderr_pipe("debug");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap(); // started
    drop(err); // the reader goes away (`wsfan 2>&1 | head -n 1`)
    eventually(10.0, "listening", || healthz(addr));
    for i in 0..5 {
        let mut c = connect(&format!("ws://{addr}/ws/x"));
        send_text(&mut c, &format!("m{i}"));
        assert_eq!(recv_text(&mut c), format!("m{i}"));
    }
    assert!(child.try_wait().unwrap().is_none(), "wsfan died");
    assert!(metric_at(addr, "wsfan_log_lines_dropped_total") >= 1.0);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_full_stderr_pipe_does_not_block_the_loop() {
    let (mut child, addr) = start_with_stderr_pipe("debug");
    let _unread = child.stderr.take().unwrap(); // open, never read: fills at 64 KiB
    eventually(10.0, "listening", || healthz(addr));
    // Every request logs debug lines: far more than the pipe and our buffer hold.
    let end = Instant::now() + Duration::from_secs(20);
    while metric_at(addr, "wsfan_log_lines_dropped_total") < 100.0 {
        assert!(
            Instant::now() < end,
            "no line was dropped: the loop must have blocked"
        );
        for _ in 0..200 {
            assert!(healthz(addr));
        }
    }
    let mut c = connect(&format!("ws://{addr}/ws/x"));
    send_text(&mut c, "still serving");
    assert_eq!(recv_text(&mut c), "still serving");
    let _ = child.kill();
    let _ = child.wait();
}

// ---- 7. bodies where none is read; 8. SIGHUP --------------------------------------

#[test]
fn a_body_on_get_is_never_parsed_as_the_next_request() {
    let s = Wsfan::start(&["--api-key", "k"]);
    let smuggled = "POST /publish/c HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\
                    Content-Length: 5\r\n\r\nhello";
    for framing in [
        format!("Content-Length: {}\r\n\r\n{smuggled}", smuggled.len()),
        format!(
            "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
            smuggled.len()
        ),
    ] {
        for method in ["GET /healthz", "HEAD /healthz", "GET /ws/c"] {
            let mut t = TcpStream::connect(s.addr).unwrap();
            t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(t, "{method} HTTP/1.1\r\nHost: x\r\n{framing}").unwrap();
            let (status, _, _) = read_response(&mut t, false);
            assert_eq!(status, 400, "{method} with {framing:?}");
            let mut rest = Vec::new();
            let _ = t.read_to_end(&mut rest);
            assert!(
                rest.is_empty(),
                "a second response: {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
    }
    assert_eq!(s.metric("wsfan_messages_published_total"), 0.0);
}

#[test]
fn two_websocket_keys_are_refused() {
    let s = Wsfan::start(&[]);
    let (status, _, _) = http(
        s.addr,
        "GET /ws/c HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(status, 400);
}

#[test]
fn sighup_is_logged_and_ignored() {
    let s = Wsfan::start(&[]);
    let mut c = connect(&s.url("/ws/h"));
    s.signal("HUP");
    s.wait_log("SIGHUP ignored", 5.0);
    send_text(&mut c, "after hup");
    assert_eq!(recv_text(&mut c), "after hup");
    assert_eq!(s.status("/healthz"), 200);
}

// ---- 3. a healthy Redis is never declared dead -------------------------------------

fn info_field(r: &mut redis::Connection, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(r).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Client ids at Redis other than the test's own connection.
fn client_ids(r: &mut redis::Connection) -> Vec<u64> {
    let me: u64 = redis::cmd("CLIENT").arg("ID").query(r).unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query(r).unwrap();
    let mut ids: Vec<u64> = list
        .lines()
        .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
        .filter(|&id| id != me)
        .collect();
    ids.sort();
    ids
}

#[test]
fn a_healthy_redis_link_is_never_declared_dead() {
    let redis = Redis::start();
    // 10 ping periods take one second; a PING unanswered for 1 s would be "dead".
    let a = Wsfan::start(&[
        "--redis",
        &redis.url(),
        "--redis-ping-interval",
        "0.1",
        "--redis-timeout",
        "1",
    ]);
    eventually(10.0, "ready", || a.status("/readyz") == 200);
    let mut r = redis.conn();
    let ids = client_ids(&mut r);
    assert_eq!(ids.len(), 2, "two links");
    let conns = info_field(&mut r, "total_connections_received");
    let pause = |secs: f64| {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        eventually(secs + 5.0, "time passes", || Instant::now() >= end);
    };
    // No channels: PING on a connection subscribed to nothing answers +PONG.
    pause(1.5);
    // One channel held.
    let held = connect(&a.url("/ws/held"));
    pause(1.5);
    drop(held);
    // Channels joined and left every ~100 ms (down to zero and back).
    let end = Instant::now() + Duration::from_millis(1500);
    let mut n = 0;
    while Instant::now() < end {
        let mut c = connect(&a.url(&format!("/ws/churn{}", n % 3)));
        send_text(&mut c, "x");
        assert_eq!(recv_text(&mut c), "x");
        c.close(None).unwrap();
        let _ = expect_close(&mut c);
        n += 1;
        pause(0.1);
    }
    assert_eq!(a.metric("wsfan_redis_reconnects_total"), 0.0, "{}", a.log());
    assert!(!a.log().contains("PING unanswered"), "{}", a.log());
    assert_eq!(info_field(&mut r, "total_connections_received"), conns);
    assert_eq!(
        client_ids(&mut r),
        ids,
        "the same two connections throughout"
    );
}

// ---- 5. /readyz means "a publish and a subscribe would work now" -------------------

#[test]
fn readyz_follows_a_frozen_redis() {
    let redis = Redis::start();
    let a = Wsfan::start(&[
        "--redis",
        &redis.url(),
        "--redis-ping-interval",
        "0.3",
        "--redis-timeout",
        "1",
        "--redis-backoff-max",
        "0.3",
    ]);
    eventually(10.0, "ready", || a.status("/readyz") == 200);
    let pid = redis.child.as_ref().unwrap().id().to_string();
    let stop = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    stop("-STOP");
    let frozen = Instant::now();
    eventually(3.0, "not ready within a PING interval and a second", || {
        a.status("/readyz") == 503
    });
    // Stays not ready while frozen: through the dead-link timeout and the reconnects
    // that the kernel's listen backlog accepts for a frozen Redis.
    let mut samples = 0;
    while frozen.elapsed() < Duration::from_secs(5) {
        assert_eq!(a.status("/readyz"), 503, "ready while Redis is frozen");
        assert_eq!(a.metric("wsfan_redis_up"), 0.0);
        samples += 1;
    }
    assert!(samples > 10);
    stop("-CONT");
    eventually(10.0, "ready again", || a.status("/readyz") == 200);
}

/// A TCP server that accepts and never says a word.
fn silent_server() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[test]
fn a_redis_that_accepts_and_never_answers_is_never_ready() {
    let (listener, port) = silent_server();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            h.lock().unwrap().push(s);
        }
    });
    let a = Wsfan::start(&[
        "--redis",
        &format!("redis://127.0.0.1:{port}"),
        "--redis-timeout",
        "0.5",
        "--handshake-timeout",
        "1",
    ]);
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        assert_eq!(a.status("/readyz"), 503);
    }
    assert_eq!(a.metric("wsfan_redis_up"), 0.0);
    assert_eq!(upgrade_status(&a.url("/ws/x"), &[]), Some(503));
    a.wait_log("no reply to login/PING", 5.0);
}

// ---- 6. backoff grows until a link has proved healthy ------------------------------

#[test]
fn a_wrong_password_backs_off_and_is_logged_once() {
    let redis = Redis::start_with(&["--requirepass", "right"]);
    let url = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    let start = Instant::now();
    let a = Wsfan::start(&["--redis", &url, "--redis-backoff-max", "5"]);
    eventually(10.0, "refused", || a.log().contains("login refused"));
    let end = start + Duration::from_secs(3);
    eventually(5.0, "3 s pass", || Instant::now() >= end);
    let attempts = a.metric("wsfan_redis_connect_failures_total");
    // Backoff 100 ms doubling, from half to all of each step: at most ~6 tries a link
    // in 3 s. Reset at every connect it was ~30.
    assert!(
        (2.0..=16.0).contains(&attempts),
        "{attempts} attempts in 3 s"
    );
    assert_eq!(
        a.log().matches("login refused").count(),
        2,
        "identical failures are logged once per link: {}",
        a.log()
    );
    assert_eq!(a.status("/readyz"), 503);
}

#[test]
fn a_server_answering_garbage_backs_off() {
    let (listener, port) = silent_server();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            n.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let start = Instant::now();
    let a = Wsfan::start(&["--redis", &format!("redis://127.0.0.1:{port}")]);
    let end = start + Duration::from_secs(3);
    eventually(5.0, "3 s pass", || Instant::now() >= end);
    let n = accepted.load(Ordering::SeqCst);
    assert!((2..=16).contains(&n), "{n} connections in 3 s");
    assert_eq!(a.status("/readyz"), 503);
}

// ---- 9. a publish is not sent again forever -----------------------------------------

/// A Redis stand-in that speaks enough RESP for wsfan, delivers every PUBLISH to the
/// subscribers and then answers the publisher with garbage.
struct LyingRedis {
    port: u16,
    publishes: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

fn read_command(r: &mut BufReader<TcpStream>) -> Option<Vec<Vec<u8>>> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let n: usize = line.trim().strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::new();
    for _ in 0..n {
        line.clear();
        r.read_line(&mut line).ok()?;
        let len: usize = line.trim().strip_prefix('$')?.parse().ok()?;
        let mut buf = vec![0u8; len + 2];
        r.read_exact(&mut buf).ok()?;
        buf.truncate(len);
        args.push(buf);
    }
    Some(args)
}

fn bulk(b: &[u8]) -> Vec<u8> {
    let mut v = format!("${}\r\n", b.len()).into_bytes();
    v.extend_from_slice(b);
    v.extend_from_slice(b"\r\n");
    v
}

impl LyingRedis {
    fn start() -> LyingRedis {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let subscribers: Arc<std::sync::Mutex<Vec<TcpStream>>> = Default::default();
        let publishes = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, st) = (publishes.clone(), stop.clone());
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let subs = subscribers.clone();
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut out = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    while let Some(cmd) = read_command(&mut r) {
                        let name = String::from_utf8_lossy(&cmd[0]).to_ascii_uppercase();
                        let reply = match name.as_str() {
                            "PING" => b"+PONG\r\n".to_vec(),
                            "SUBSCRIBE" => {
                                subs.lock().unwrap().push(out.try_clone().unwrap());
                                let mut v = b"*3\r\n".to_vec();
                                v.extend(bulk(b"subscribe"));
                                v.extend(bulk(&cmd[1]));
                                v.extend_from_slice(b":1\r\n");
                                v
                            }
                            "PUBLISH" => {
                                p.fetch_add(1, Ordering::SeqCst);
                                let mut push = b"*3\r\n".to_vec();
                                push.extend(bulk(b"message"));
                                push.extend(bulk(&cmd[1]));
                                push.extend(bulk(&cmd[2]));
                                for sub in subs.lock().unwrap().iter_mut() {
                                    let _ = sub.write_all(&push);
                                }
                                b"+SURPRISE\r\n".to_vec() // not an integer
                            }
                            _ => b"+OK\r\n".to_vec(),
                        };
                        if out.write_all(&reply).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        LyingRedis {
            port,
            publishes,
            stop,
        }
    }
}

impl Drop for LyingRedis {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_publish_answered_with_garbage_is_sent_a_bounded_number_of_times() {
    let fake = LyingRedis::start();
    // Plain PUBLISH (the fake speaks no scripts). With history on, a real Redis drops
    // the re-sends the script has already applied (tests/history.rs).
    let a = Wsfan::start(&[
        "--redis",
        &format!("redis://127.0.0.1:{}", fake.port),
        "--redis-backoff-max",
        "0.2",
        "--history-size",
        "0",
    ]);
    eventually(10.0, "ready", || a.status("/readyz") == 200);
    let mut c = connect(&a.url("/ws/lie"));
    send_text(&mut c, "once");
    eventually(10.0, "given up", || {
        a.metric("wsfan_redis_publish_abandoned_total") == 1.0
    });
    assert_eq!(
        fake.publishes.load(Ordering::SeqCst),
        3,
        "MAX_PUBLISH_SENDS"
    );
    // Exactly the three copies Redis delivered reach the client, then nothing more.
    for _ in 0..3 {
        assert_eq!(recv_text(&mut c), "once");
    }
    c.get_mut()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    if let Ok(Message::Text(t)) = c.read() {
        panic!("a fourth copy: {t}");
    }
}

//! Redis failover (issue 18): wsfan following a primary through Redis Sentinel (real
//! sentinels, a real replica promoted), and what a promoted replica that missed the old
//! primary's tail does to positions.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MASTER: &str = "wsfan-test";

/// A primary, a replica of it, and three sentinels (quorum 2) that know both and each
/// other, so a failover can be decided.
struct Group {
    primary: Redis,
    replica: Redis,
    sentinels: Vec<Sentinel>,
}

/// A TCP proxy to `target` whose target-to-client direction can be frozen: a replica
/// behind it stops receiving its primary's stream while both stay connected (what a
/// partition or a slow replication link does). Threads end with the test process.
struct Proxy {
    port: u16,
    frozen: Arc<AtomicBool>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let frozen = Arc::new(AtomicBool::new(false));
        let f = frozen.clone();
        std::thread::spawn(move || {
            for client in l.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let pipe =
                    |mut from: TcpStream, mut to: TcpStream, gate: Option<Arc<AtomicBool>>| {
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 16384];
                            loop {
                                while gate.as_ref().is_some_and(|g| g.load(Ordering::SeqCst)) {
                                    std::thread::sleep(Duration::from_millis(5));
                                }
                                match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        // Frozen while this was read: it never arrives.
                                        if gate.as_ref().is_some_and(|g| g.load(Ordering::SeqCst)) {
                                            break;
                                        }
                                        if to.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                        });
                    };
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                pipe(client, server, None);
                pipe(s2, c2, Some(f.clone()));
            }
        });
        Proxy { port, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// A replica of the Redis on `port`, loading its primary's data from the socket (not
/// a dump.rdb in the working directory).
fn replica_of(port: &str) -> Redis {
    Redis::start_with(&[
        "--replicaof",
        "127.0.0.1",
        port,
        "--repl-diskless-load",
        "on-empty-db",
    ])
}

impl Group {
    fn start() -> Group {
        Self::start_via(None)
    }

    /// With `proxy`, the replica replicates through it (`Proxy::start(primary)`).
    fn start_via(proxy: Option<&dyn Fn(u16) -> u16>) -> Group {
        let primary = Redis::start();
        let port = match proxy {
            Some(p) => p(primary.port),
            None => primary.port,
        }
        .to_string();
        let replica = replica_of(&port);
        eventually(10.0, "the replica is in sync", || {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut replica.conn())
                .expect("INFO");
            info.contains("master_link_status:up")
        });
        let sentinels: Vec<Sentinel> = (0..3)
            .map(|_| Sentinel::start(MASTER, primary.port, 2))
            .collect();
        eventually(
            20.0,
            "the sentinels know the replica and each other",
            || {
                sentinels.iter().all(|s| {
                    let mut c = s.conn();
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg(MASTER)
                        .query(&mut c)
                        .unwrap_or_default();
                    let others: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("SENTINELS")
                        .arg(MASTER)
                        .query(&mut c)
                        .unwrap_or_default();
                    replicas.len() == 1 && others.len() == 2
                })
            },
        );
        Group {
            primary,
            replica,
            sentinels,
        }
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{MASTER}", hosts.join(","))
    }

    /// The primary's address as the first sentinel knows it now.
    fn primary_port(&self) -> u16 {
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MASTER)
            .query(&mut self.sentinels[0].conn())
            .expect("GET-MASTER-ADDR-BY-NAME");
        port
    }
}

fn instance(url: &str) -> Wsfan {
    let mut args = vec!["--redis", url];
    args.extend_from_slice(FAST_FAILOVER);
    Wsfan::start(&args)
}

/// Sends `m` on `from` and asserts every client in `to` (the sender among them) gets it
/// next.
fn everyone_gets(from: &mut Ws, others: &mut [&mut Ws], m: &str) {
    send_text(from, m);
    assert_eq!(recv_text(from), m);
    for c in others.iter_mut() {
        assert_eq!(recv_text(c), m);
    }
}

/// The primary is killed; the sentinels promote the replica; both instances follow
/// (`/readyz` 503, then 200 within the documented time), a publish after the failover
/// reaches every client, and what was published before it (and replicated) is not
/// delivered again.
#[test]
fn instances_follow_a_sentinel_failover() {
    let mut g = Group::start();
    let url = g.url();
    let a = instance(&url);
    let b = instance(&url);
    eventually(10.0, "both ready", || {
        a.status("/readyz") == 200 && b.status("/readyz") == 200
    });
    a.wait_log(
        &format!("primary of {MASTER}: 127.0.0.1:{}", g.primary.port),
        5.0,
    );
    let mut ca = connect(&a.url("/ws/room"));
    let mut cb = connect(&b.url("/ws/room"));
    send_text(&mut ca, "joined");
    assert_eq!(recv_text(&mut ca), "joined");
    assert_eq!(recv_text(&mut cb), "joined");
    for i in 0..20 {
        everyone_gets(&mut ca, &mut [&mut cb], &format!("before {i}"));
    }
    // Everything so far is on the replica before the primary dies.
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query(&mut g.primary.conn())
        .expect("WAIT");
    assert_eq!(acked, 1);
    let old = g.primary.port;
    g.primary.kill();
    let t = Instant::now();
    eventually(10.0, "readyz 503 once the primary is gone", || {
        a.status("/readyz") == 503
    });
    eventually(30.0, "the sentinels promote the replica", || {
        g.primary_port() == g.replica.port
    });
    let promoted = t.elapsed();
    eventually(10.0, "both ready on the new primary", || {
        a.status("/readyz") == 200 && b.status("/readyz") == 200
    });
    let followed = t.elapsed();
    eprintln!(
        "failover: primary killed -> replica promoted {:.1} s -> both instances ready {:.1} s",
        promoted.as_secs_f64(),
        followed.as_secs_f64()
    );
    a.wait_log("(was redis+sentinel://", 1.0);
    assert!(a.log().contains(&format!(":{}", g.replica.port)));
    assert_ne!(old, g.replica.port);
    everyone_gets(&mut cb, &mut [&mut ca], "after the failover");
    everyone_gets(&mut ca, &mut [&mut cb], "and again");
    // The replica now refuses nothing: it is the primary, and the publishes went there.
    let role: Vec<redis::Value> = redis::cmd("ROLE")
        .query(&mut g.replica.conn())
        .expect("ROLE");
    assert_eq!(role[0], redis::Value::BulkString(b"master".to_vec()));
    assert_eq!(a.metric("wsfan_history_resets_total"), 0.0);
    assert_eq!(b.metric("wsfan_history_resets_total"), 0.0);
}

/// Bad topology input: a sentinel that names no such master, and sentinels that are
/// all down, are retried with a clear log line and `/readyz` 503; a malformed URL is the
/// only exit 2.
#[test]
fn bad_sentinel_input_is_logged_and_retried() {
    let primary = Redis::start();
    let s = Sentinel::start("some-other-master", primary.port, 1);
    let url = format!("redis+sentinel://127.0.0.1:{}/{MASTER}", s.port);
    let a = instance(&url);
    a.wait_log("does not know a master named", 10.0);
    assert_eq!(a.status("/readyz"), 503);
    let dead = free_port();
    let down = instance(&format!(
        "redis+sentinel://127.0.0.1:{dead},127.0.0.1:{}/{MASTER}",
        free_port()
    ));
    down.wait_log("sentinel link", 10.0);
    assert_eq!(down.status("/readyz"), 503);
    for bad in [
        "redis+sentinel://127.0.0.1:1",
        "redis+sentinel://127.0.0.1:x/m",
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsfan"))
            .args(["--redis", bad])
            .output()
            .expect("wsfan");
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("redis+sentinel://"), "{bad}: {err}");
    }
}

/// A promoted replica that really missed the old primary's tail: its replication
/// stream is frozen (a partition) while five messages are published and delivered, the
/// primary dies, the sentinels promote the replica. Its history ends before the tail,
/// so the next publishes get the tail's offsets again: every instance delivers them
/// (a new epoch forked at the replica's top; nothing dropped as a duplicate) and counts
/// the five the old primary took with it.
#[test]
fn a_promoted_replica_that_missed_the_tail_delivers_what_is_new() {
    let proxy: std::cell::RefCell<Option<Proxy>> = std::cell::RefCell::new(None);
    let mut g = Group::start_via(Some(&|primary| {
        let p = Proxy::start(primary);
        let port = p.port;
        *proxy.borrow_mut() = Some(p);
        port
    }));
    let proxy = proxy.into_inner().expect("proxy");
    let url = g.url();
    let a = instance(&url);
    let b = instance(&url);
    eventually(10.0, "both ready", || {
        a.status("/readyz") == 200 && b.status("/readyz") == 200
    });
    let mut ca = connect(&a.url("/ws/room"));
    let mut cb = connect(&b.url("/ws/room"));
    send_text(&mut ca, "joined");
    assert_eq!(recv_text(&mut ca), "joined");
    assert_eq!(recv_text(&mut cb), "joined");
    for i in 0..5 {
        everyone_gets(&mut ca, &mut [&mut cb], &format!("kept {i}"));
    }
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query(&mut g.primary.conn())
        .expect("WAIT");
    assert_eq!(acked, 1, "the replica has everything so far");
    proxy.freeze();
    for i in 0..5 {
        everyone_gets(&mut ca, &mut [&mut cb], &format!("tail {i}"));
    }
    g.primary.kill();
    eventually(30.0, "the sentinels promote the replica", || {
        g.primary_port() == g.replica.port
    });
    eventually(10.0, "both ready on the new primary", || {
        a.status("/readyz") == 200 && b.status("/readyz") == 200
    });
    let (_, top): (String, u64) = redis::cmd("HMGET")
        .arg(wsfan::backplane::redis::history::keys("room").0)
        .arg("e")
        .arg("s")
        .query(&mut g.replica.conn())
        .expect("meta");
    assert_eq!(top, 6, "the replica's history ends before the tail");
    for i in 0..7 {
        everyone_gets(&mut cb, &mut [&mut ca], &format!("new {i}"));
    }
    for w in [&a, &b] {
        assert_eq!(w.metric("wsfan_history_forks_total"), 1.0);
        assert_eq!(w.metric("wsfan_history_fork_lost_total"), 5.0);
        assert_eq!(w.metric("wsfan_history_duplicates_total"), 0.0);
    }
    a.wait_log("forked at offset 6", 1.0);
}

/// A sentinel that names a replica (stale, or lying): the instance connects there, the
/// handshake's `ROLE` says `slave`, and the link is refused — a replica is never used as
/// the primary. `/readyz` stays 503 and the log says why. (The sentinel here is a
/// stand-in speaking RESP on a socket: real sentinels do not name replicas.)
#[test]
fn a_replica_named_as_primary_is_never_used() {
    let primary = Redis::start();
    let port = primary.port.to_string();
    let replica = replica_of(&port);
    let liar = TcpListener::bind("127.0.0.1:0").expect("bind");
    let liar_port = liar.local_addr().expect("addr").port();
    let named = replica.port;
    std::thread::spawn(move || {
        for conn in liar.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen).to_string();
                    let mut out = String::new();
                    // Answers in order of what arrived (whole commands only).
                    if text.contains("PING") && !text.contains("GET-MASTER") {
                        out.push_str("+PONG\r\n");
                        seen.clear();
                    } else if text.contains("+switch-master") {
                        let p = named.to_string();
                        out.push_str(&format!("*2\r\n$9\r\n127.0.0.1\r\n${}\r\n{p}\r\n", p.len()));
                        out.push_str("*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n");
                        seen.clear();
                    }
                    if !out.is_empty() && conn.write_all(out.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let a = instance(&format!("redis+sentinel://127.0.0.1:{liar_port}/{MASTER}"));
    a.wait_log(&format!("primary of {MASTER}: 127.0.0.1:{named}"), 10.0);
    a.wait_log("not the primary (ROLE says slave)", 10.0);
    assert_eq!(a.status("/readyz"), 503);
    assert!(!a.log().contains("link up (redis+sentinel"), "{}", a.log());
}

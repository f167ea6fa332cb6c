//! Per-channel history and gap repair (issue 11): with history on (the default), every
//! client of every instance gets every message exactly once, in one order per channel,
//! across Redis freezes, killed subscription links and Redis restarts — as long as Redis
//! keeps its data; without it, the new epoch is delivered from its first offset.
//!
//! Every scenario: two instances on one private Redis, two clients on each, all on one
//! channel, every client a publisher too. Each client's messages are `<name>-<n>`.

mod common;
use common::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const CHANNEL: &str = "room";

fn instance(redis: &Redis, extra: &[&str]) -> Wsfan {
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str()];
    args.extend_from_slice(FAST_FAILOVER);
    args.extend_from_slice(extra);
    let s = Wsfan::start(&args);
    eventually(10.0, "instance ready", || s.status("/readyz") == 200);
    s
}

/// A client that publishes numbered messages and records what it receives.
struct Client {
    name: String,
    ws: Ws,
    sent: usize,
    got: Vec<String>,
}

impl Client {
    fn new(w: &Wsfan, name: &str) -> Client {
        Client {
            name: name.to_string(),
            ws: connect(&w.url(&format!("/ws/{CHANNEL}"))),
            sent: 0,
            got: Vec::new(),
        }
    }

    fn publish(&mut self) -> String {
        self.sent += 1;
        let m = format!("{}-{}", self.name, self.sent);
        send_text(&mut self.ws, &m);
        m
    }

    /// Reads until `n` messages in all, or fails after `secs`.
    fn read_until(&mut self, n: usize, secs: f64) {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        self.ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        while self.got.len() < n {
            assert!(
                Instant::now() < end,
                "{}: {} of {n} messages after {secs} s",
                self.name,
                self.got.len()
            );
            match self.ws.read() {
                Ok(tungstenite::Message::Text(t)) => self.got.push(t.to_string()),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("{}: read failed: {e}", self.name),
            }
        }
    }
}

struct Scene {
    redis: Redis,
    a: Wsfan,
    b: Wsfan,
    clients: Vec<Client>,
    published: Vec<String>,
}

impl Scene {
    fn new(redis: Redis, extra: &[&str]) -> Scene {
        let a = instance(&redis, extra);
        let b = instance(&redis, extra);
        let clients = vec![
            Client::new(&a, "a0"),
            Client::new(&a, "a1"),
            Client::new(&b, "b0"),
            Client::new(&b, "b1"),
        ];
        eventually(5.0, "both subscribed", || redis.numsub(CHANNEL) == 2);
        Scene {
            redis,
            a,
            b,
            clients,
            published: Vec::new(),
        }
    }

    /// `rounds` rounds, each one message from every client (a's clients only when
    /// `only_a`), `pace` apart.
    fn publish(&mut self, rounds: usize, pace: Duration, only: Option<&str>) {
        for _ in 0..rounds {
            for c in &mut self.clients {
                if only.is_some_and(|p| !c.name.starts_with(p)) {
                    continue;
                }
                let m = c.publish();
                self.published.push(m);
            }
            std::thread::sleep(pace);
        }
    }

    /// Every client has every message published, exactly once, each publisher's in
    /// its order, and all clients in one and the same order.
    fn check_all(&mut self, secs: f64) {
        let n = self.published.len();
        for c in &mut self.clients {
            c.read_until(n, secs);
        }
        // Nothing more (a duplicate would arrive right behind).
        for c in &mut self.clients {
            c.ws.get_mut()
                .set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            if let Ok(tungstenite::Message::Text(t)) = c.ws.read() {
                panic!("{}: a message more than published: {t}", c.name);
            }
        }
        let want: HashSet<&String> = self.published.iter().collect();
        let first = self.clients[0].got.clone();
        for c in &self.clients {
            let set: HashSet<&String> = c.got.iter().collect();
            assert_eq!(set.len(), n, "{}: a duplicate", c.name);
            assert_eq!(set, want, "{}: not what was published", c.name);
            assert_eq!(c.got, first, "{}: another order than {}", c.name, "a0");
        }
        for who in ["a0", "a1", "b0", "b1"] {
            let nums: Vec<usize> = first
                .iter()
                .filter_map(|m| m.strip_prefix(&format!("{who}-")))
                .map(|s| s.parse().expect("number"))
                .collect();
            assert!(nums.windows(2).all(|w| w[0] < w[1]), "{who} out of order");
        }
    }

    fn metric(&self, m: &str) -> f64 {
        self.a.metric(m) + self.b.metric(m)
    }
}

const PACE: Duration = Duration::from_millis(10);

fn aof_dir(port: u16) -> String {
    let d = std::env::temp_dir().join(format!("wsfan-aof-{port}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d.display().to_string()
}

fn redis_with_aof() -> Redis {
    let port = free_port();
    let dir = aof_dir(port);
    // (start_with picks its own port; the directory name only has to be unique.)
    Redis::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &dir,
    ])
}

#[test]
fn a_frozen_redis_loses_nothing_on_either_instance() {
    let mut s = Scene::new(Redis::start(), &[]);
    s.publish(20, PACE, None);
    s.redis.signal("STOP");
    // 2 s frozen: both instances declare their links dead (0.5 s) and reconnect.
    s.publish(100, Duration::from_millis(20), None);
    s.redis.signal("CONT");
    s.publish(20, PACE, None);
    s.check_all(30.0);
    assert!(s.metric("wsfan_redis_reconnects_total") >= 2.0);
    assert_eq!(s.metric("wsfan_history_missed_total"), 0.0);
    assert_eq!(s.metric("wsfan_history_resets_total"), 0.0);
}

/// The subscription link of the instance subscribed to two channels.
fn kill_pubsub_link_with_two_channels(redis: &Redis) -> bool {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut redis.conn())
        .expect("CLIENT LIST");
    let Some(id) = list
        .lines()
        .find(|l| l.contains(" sub=2 "))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
    else {
        return false;
    };
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query(&mut redis.conn())
        .expect("CLIENT KILL");
    killed == 1
}

#[test]
fn a_killed_subscription_link_repairs_its_gap() {
    let mut s = Scene::new(Redis::start(), &[]);
    // A second channel on a only: its link is the one with sub=2.
    let _other = connect(&s.a.url("/ws/a-only"));
    eventually(5.0, "a-only subscribed", || s.redis.numsub("a-only") == 1);
    s.publish(20, PACE, None);
    for _ in 0..3 {
        assert!(kill_pubsub_link_with_two_channels(&s.redis), "killed");
        // Publishing on while a re-subscribes: what it misses live is read back.
        s.publish(30, Duration::from_millis(5), None);
        eventually(10.0, "a re-subscribed", || s.a.status("/readyz") == 200);
    }
    s.publish(10, PACE, None);
    s.check_all(30.0);
    assert!(s.a.metric("wsfan_redis_reconnects_total") >= 3.0);
    assert_eq!(s.b.metric("wsfan_redis_reconnects_total"), 0.0);
    assert_eq!(s.metric("wsfan_history_missed_total"), 0.0);
}

#[test]
fn redis_killed_and_restarted_with_aof_loses_nothing() {
    let mut s = Scene::new(redis_with_aof(), &[]);
    s.publish(20, PACE, None);
    // Wait until all is delivered, so the kill does not race a publish's reply.
    let n = s.published.len();
    for c in &mut s.clients {
        c.read_until(n, 10.0);
    }
    s.redis.kill();
    s.publish(30, PACE, None); // waits in both outage buffers
    s.redis.restart();
    s.publish(20, PACE, None);
    s.check_all(30.0);
    assert_eq!(s.metric("wsfan_history_resets_total"), 0.0, "AOF kept it");
    assert_eq!(s.metric("wsfan_history_missed_total"), 0.0);
}

/// Redis comes back while `late` is frozen (SIGSTOP), so the other instance
/// re-subscribes, flushes its outage buffer and publishes on first.
fn restart_with_one_instance_late(aof: bool, late_is_a: bool) -> Scene {
    let redis = if aof {
        redis_with_aof()
    } else {
        Redis::start()
    };
    let mut s = Scene::new(redis, &[]);
    s.publish(20, PACE, None);
    let n = s.published.len();
    for c in &mut s.clients {
        c.read_until(n, 10.0);
    }
    s.redis.kill();
    s.publish(25, PACE, None);
    let (late, early, early_prefix) = if late_is_a {
        (&s.a, &s.b, "b")
    } else {
        (&s.b, &s.a, "a")
    };
    late.signal("STOP");
    s.redis.restart();
    eventually(10.0, "the early instance is back", || {
        early.status("/readyz") == 200 && early.metric("wsfan_redis_buffer_messages") == 0.0
    });
    let late_pid = late.child.id();
    s.publish(10, PACE, Some(early_prefix));
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &late_pid.to_string()])
        .status();
    s.publish(10, PACE, None);
    s
}

#[test]
fn instances_resubscribing_in_either_order_lose_nothing() {
    for late_is_a in [true, false] {
        let mut s = restart_with_one_instance_late(true, late_is_a);
        s.check_all(30.0);
        assert_eq!(s.metric("wsfan_history_missed_total"), 0.0);
        assert_eq!(s.metric("wsfan_history_resets_total"), 0.0);
    }
}

#[test]
fn redis_restarted_without_data_delivers_the_new_epoch_from_its_start() {
    for late_is_a in [true, false] {
        let mut s = restart_with_one_instance_late(false, late_is_a);
        s.check_all(30.0);
        // Both instances saw the channel's history begin again.
        assert!(s.a.metric("wsfan_history_resets_total") >= 1.0);
        assert!(s.b.metric("wsfan_history_resets_total") >= 1.0);
        assert_eq!(s.metric("wsfan_history_missed_total"), 0.0);
        let late = if late_is_a { &s.a } else { &s.b };
        assert!(late.log().contains("history of channel room began again"));
    }
}

/// Appends `body` to `channel`'s history as the publish script would (next offset,
/// stream entry), without publishing it: nobody hears of it live.
fn hide_in_history(redis: &Redis, channel: &str, body: &str) {
    let mut r = redis.conn();
    let (meta, stream) = wsfan::backplane::redis::history::keys(channel);
    let off: u64 = redis::cmd("HINCRBY")
        .arg(&meta)
        .arg("s")
        .arg(1)
        .query(&mut r)
        .expect("HINCRBY");
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg(format!("{off}-0"))
        .arg("d")
        .arg(body)
        .query(&mut r)
        .expect("XADD");
}

#[test]
fn a_gap_forced_into_history_is_read_and_delivered_in_order() {
    let mut s = Scene::new(Redis::start(), &[]);
    s.publish(1, PACE, Some("a0"));
    let n = s.published.len();
    for c in &mut s.clients {
        c.read_until(n, 10.0);
    }
    // Written as the script would, without a PUBLISH: nobody hears of it live.
    hide_in_history(&s.redis, CHANNEL, "hidden-1");
    s.published.push("hidden-1".to_string());
    s.publish(1, PACE, Some("b0"));
    s.check_all(10.0);
    assert_eq!(s.clients[0].got, ["a0-1", "hidden-1", "b0-1"]);
    assert_eq!(s.a.metric("wsfan_history_repaired_total"), 1.0);
    assert_eq!(s.b.metric("wsfan_history_repaired_total"), 1.0);
}

#[test]
fn history_size_and_ttl_hold_in_redis() {
    let redis = Redis::start();
    let a = instance(&redis, &["--history-size", "5", "--history-ttl", "2"]);
    let mut c = connect(&a.url("/ws/bounded"));
    for i in 0..300 {
        send_text(&mut c, &format!("m{i}"));
    }
    for i in 0..300 {
        assert_eq!(recv_text(&mut c), format!("m{i}"));
    }
    let mut r = redis.conn();
    let (meta, stream) = wsfan::backplane::redis::history::keys("bounded");
    // `XTRIM MAXLEN ~` every TRIM_EVERY offsets: Redis trims whole stream nodes
    // (stream-node-max-entries, 100), so at least the size is kept and at most one node
    // and TRIM_EVERY entries more.
    let len: i64 = redis::cmd("XLEN").arg(&stream).query(&mut r).expect("XLEN");
    let most = 5 + 100 + wsfan::backplane::redis::history::TRIM_EVERY as i64;
    assert!((5..=most).contains(&len), "--history-size 5: XLEN {len}");
    let top: i64 = redis::cmd("HGET")
        .arg(&meta)
        .arg("s")
        .query(&mut r)
        .expect("top");
    assert_eq!(top, 300);
    // Kept at least the TTL after the last publish, at most 1.5 times it.
    for key in [&meta, &stream] {
        let ttl: i64 = redis::cmd("TTL").arg(key).query(&mut r).expect("TTL");
        assert!((1..=3).contains(&ttl), "{key}: TTL {ttl}");
    }
    eventually(5.0, "quiet history expired", || {
        let n: i64 = redis::cmd("EXISTS")
            .arg(&meta)
            .arg(&stream)
            .query(&mut r)
            .expect("EXISTS");
        n == 0
    });
    // The next publish starts a new epoch at offset 1, and is delivered.
    send_text(&mut c, "again");
    assert_eq!(recv_text(&mut c), "again");
    let top: i64 = redis::cmd("HGET")
        .arg(&meta)
        .arg("s")
        .query(&mut r)
        .expect("top");
    assert_eq!(top, 1);
}

#[test]
fn scripts_flushed_by_an_operator_are_loaded_again() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut c = connect(&a.url("/ws/flush"));
    send_text(&mut c, "before");
    assert_eq!(recv_text(&mut c), "before");
    let _: String = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut redis.conn())
        .expect("SCRIPT FLUSH");
    for i in 0..5 {
        send_text(&mut c, &format!("after{i}"));
    }
    for i in 0..5 {
        assert_eq!(
            recv_text(&mut c),
            format!("after{i}"),
            "once each, in order"
        );
    }
    assert!(a.metric("wsfan_redis_reconnects_total") >= 1.0);
    assert!(a.log().contains("NOSCRIPT"));
}

#[test]
fn history_off_publishes_plain_payloads() {
    let redis = Redis::start();
    let a = instance(&redis, &["--history-size", "0"]);
    let mut c = connect(&a.url("/ws/plain"));
    send_text(&mut c, "x");
    assert_eq!(recv_text(&mut c), "x");
    let n: i64 = redis::cmd("DBSIZE")
        .query(&mut redis.conn())
        .expect("DBSIZE");
    assert_eq!(n, 0, "no history keys");
}

#[test]
fn standalone_history_memory_stays_bounded() {
    let limit = 1024 * 1024;
    let a = Wsfan::start(&[
        "--history-memory-bytes",
        &limit.to_string(),
        "--max-messages-per-sec",
        "100000",
        "--max-messages-burst",
        "100000",
    ]);
    let base = a.rss_kb();
    let payload = "x".repeat(1000);
    for ch in 0..40 {
        let mut c = connect(&a.url(&format!("/ws/c{ch}")));
        for _ in 0..200 {
            send_text(&mut c, &payload);
        }
        for _ in 0..200 {
            recv_text(&mut c);
        }
        let bytes = a.metric("wsfan_history_memory_bytes");
        assert!(bytes > 0.0 && bytes <= limit as f64, "{bytes} at c{ch}");
    }
    // 8 MB went through; history kept at most 1 MiB of it.
    assert!(
        a.rss_kb() < base + 8 * 1024,
        "RSS {} -> {} kB",
        base,
        a.rss_kb()
    );
}

#[test]
fn a_foreign_plain_publish_is_delivered_with_history_on() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut c = connect(&a.url("/ws/mixed"));
    send_text(&mut c, "ours-1");
    assert_eq!(recv_text(&mut c), "ours-1");
    // No position: delivered as it comes, and the positions of ours go on.
    assert_eq!(redis.publish("mixed", b"from redis-cli"), 1);
    assert_eq!(recv_text(&mut c), "from redis-cli");
    send_text(&mut c, "ours-2");
    assert_eq!(recv_text(&mut c), "ours-2");
    assert_eq!(a.metric("wsfan_history_repaired_total"), 0.0, "no gap seen");
    assert_eq!(a.metric("wsfan_history_missed_total"), 0.0);
}

/// The test publishes through the history script itself (as another instance would):
/// a burst that arrives behind a gap fills the small hold, and the rest is read from
/// history once the gap is filled.
#[test]
fn a_burst_behind_a_gap_overflows_the_hold_and_is_read_from_history() {
    use wsfan::backplane::redis::history::{self, History};
    let redis = Redis::start();
    let a = instance(&redis, &["--history-hold-bytes", "3000"]);
    let mut c = connect(&a.url("/ws/burst"));
    send_text(&mut c, "first");
    assert_eq!(recv_text(&mut c), "first");
    hide_in_history(&redis, "burst", "hidden");
    let mut r = redis.conn();
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(history::publish_script())
        .query(&mut r)
        .expect("SCRIPT LOAD");
    let h = History {
        size: 10_000,
        ttl: 60,
        instance: "the-test".into(),
        max_entry: 70_000,
        key: None,
        node: String::new(),
        node2: String::new(),
        myid: String::new(),
    };
    let mut p = redis::pipe();
    for i in 1..=2000u64 {
        let body = format!("burst {i:04} padded to some length");
        p.add_command(h.publish(&sha, "burst", 2000, &[(i, body.as_bytes())]))
            .ignore();
    }
    let _: () = p.query(&mut r).expect("pipeline");
    assert_eq!(recv_text(&mut c), "hidden");
    for i in 1..=2000 {
        assert_eq!(
            recv_text(&mut c),
            format!("burst {i:04} padded to some length")
        );
    }
    assert!(
        a.metric("wsfan_history_hold_overflows_total") > 0.0,
        "the hold overflowed"
    );
    assert_eq!(a.metric("wsfan_history_held_bytes"), 0.0);
    assert_eq!(a.metric("wsfan_history_missed_total"), 0.0);
    // (One read may cover it all: what overflowed had been published before the read
    // ran. Live copies arriving after it are dropped as duplicates.)
    assert!(a.metric("wsfan_history_reads_total") >= 1.0);
}

/// A channel nobody has published on yet still has a position (from the read when it
/// was confirmed), so a link that drops while it is quiet reads what it missed.
#[test]
fn a_quiet_channel_loses_nothing_when_its_link_drops() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let b = instance(&redis, &[]);
    let mut a0 = connect(&a.url("/ws/quiet"));
    let _marker = connect(&a.url("/ws/a-only")); // a's link is the one with sub=2
    let mut b0 = connect(&b.url("/ws/quiet"));
    eventually(5.0, "both subscribed", || redis.numsub("quiet") == 2);
    eventually(5.0, "a's position reads sent", || {
        a.metric("wsfan_history_reads_total") >= 2.0
    });
    a.signal("STOP");
    assert!(kill_pubsub_link_with_two_channels(&redis), "killed");
    for i in 0..3 {
        send_text(&mut b0, &format!("while a was away {i}"));
    }
    for i in 0..3 {
        assert_eq!(recv_text(&mut b0), format!("while a was away {i}"));
    }
    a.signal("CONT");
    for i in 0..3 {
        assert_eq!(recv_text(&mut a0), format!("while a was away {i}"));
    }
    send_text(&mut a0, "back");
    assert_eq!(recv_text(&mut a0), "back");
    assert_eq!(recv_text(&mut b0), "back");
    assert_eq!(a.metric("wsfan_history_repaired_total"), 3.0);
}

/// Publishes faster than Redis runs the history script: the instance stops reading
/// the publisher while half its publish buffer is in use, so TCP slows the client down
/// and nothing is dropped, though the buffer is far smaller than the burst.
#[test]
fn a_burst_faster_than_redis_is_slowed_down_not_dropped() {
    let redis = Redis::start();
    let a = instance(
        &redis,
        &[
            "--redis-buffer-messages",
            "100",
            "--max-messages-per-sec",
            "1000000",
            "--max-messages-burst",
            "1000000",
        ],
    );
    let mut c = connect(&a.url("/ws/fast"));
    let mut other = connect(&a.url("/ws/other"));
    for i in 0..3000 {
        send_text(&mut c, &format!("fast {i}"));
        if i % 1000 == 0 {
            // A different channel in between: batches break there.
            send_text(&mut other, &format!("other {i}"));
        }
    }
    for i in 0..3000 {
        assert_eq!(recv_text(&mut c), format!("fast {i}"));
    }
    for i in [0, 1000, 2000] {
        assert_eq!(recv_text(&mut other), format!("other {i}"));
    }
    assert_eq!(a.metric("wsfan_redis_buffer_dropped_total"), 0.0);
    assert!(a.metric("wsfan_redis_buffer_messages") <= 100.0);
}

/// A client whose input is paused by backpressure cannot have its pongs read: it is
/// not cut for keepalive silence meanwhile (Redis holds writes for many ping periods).
#[test]
fn a_client_paused_by_backpressure_is_not_cut_for_its_unread_pongs() {
    let redis = Redis::start();
    let a = Wsfan::start(&[
        "--redis",
        &redis.url(),
        "--redis-buffer-messages",
        "50",
        "--max-messages-per-sec",
        "1000000",
        "--max-messages-burst",
        "1000000",
        "--ping-interval",
        "0.2",
        "--redis-ping-interval",
        "1",
        "--redis-timeout",
        "10",
    ]);
    eventually(10.0, "ready", || a.status("/readyz") == 200);
    let mut c = connect(&a.url("/ws/paused"));
    send_text(&mut c, "first");
    assert_eq!(recv_text(&mut c), "first");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("WRITE")
        .query(&mut redis.conn())
        .expect("CLIENT PAUSE");
    for i in 0..500 {
        send_text(&mut c, &format!("held {i}"));
    }
    // The client reads (and so answers pings) while Redis holds the writes.
    for i in 0..500 {
        assert_eq!(recv_text(&mut c), format!("held {i}"));
    }
    assert_eq!(
        a.metric("wsfan_disconnects_total{reason=\"ping_timeout\"}"),
        0.0
    );
    assert_eq!(a.metric("wsfan_redis_buffer_dropped_total"), 0.0);
}

/// The same with large messages through a byte-limited buffer: frames read in parts
/// complete within the room held back for them.
#[test]
fn large_messages_faster_than_redis_are_slowed_down_not_dropped() {
    let redis = Redis::start();
    let a = instance(
        &redis,
        &[
            "--redis-buffer-bytes",
            "300000",
            "--max-messages-per-sec",
            "1000000",
            "--max-messages-burst",
            "1000000",
            "--max-outbound-bytes",
            "16000000",
        ],
    );
    let mut c = connect(&a.url("/ws/large"));
    let body = |i: usize| format!("{i:04}{}", "y".repeat(60_000));
    for i in 0..100 {
        send_text(&mut c, &body(i));
    }
    for i in 0..100 {
        let got = recv_text(&mut c);
        // (The number only, so a failure does not print 60 kB.)
        assert_eq!(&got[..4], &body(i)[..4], "in order, none dropped");
        assert_eq!(got, body(i));
    }
    assert_eq!(a.metric("wsfan_redis_buffer_dropped_total"), 0.0);
}

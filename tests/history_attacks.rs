//! History from the attacker's side (issue 16): a foreign publisher with only PUBLISH
//! rights, a neighbour app writing into wsfan's keys, and a Redis that refuses writes
//! (a replica after failover, `maxmemory`). Each test is the hostile twin of a happy
//! path in `history.rs` and asserts what clients receive, the history reads it cost,
//! `/readyz`, a bystander's round trip and the log.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn instance(redis: &Redis, extra: &[&str]) -> Wsfan {
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str()];
    args.extend_from_slice(FAST_FAILOVER);
    args.extend_from_slice(extra);
    let s = Wsfan::start(&args);
    eventually(10.0, "instance ready", || s.status("/readyz") == 200);
    s
}

fn meta(channel: &str) -> String {
    wsfan::backplane::redis::history::keys(channel).0
}

/// The channel's epoch and top offset in Redis.
fn epoch_and_top(redis: &Redis, channel: &str) -> (String, u64) {
    let (e, s): (String, u64) = redis::cmd("HMGET")
        .arg(meta(channel))
        .arg("e")
        .arg("s")
        .query(&mut redis.conn())
        .expect("meta");
    (e, s)
}

/// A client on `channel` that has seen its own first message come back.
fn joined(w: &Wsfan, channel: &str) -> Ws {
    let mut c = connect(&w.url(&format!("/ws/{channel}")));
    send_text(&mut c, "hello");
    assert_eq!(recv_text(&mut c), "hello");
    c
}

/// Sends `m` and asserts it is the very next message: nothing else (no replay, no
/// forged message) arrived before it.
fn next_is_own(c: &mut Ws, m: &str) {
    send_text(c, m);
    assert_eq!(recv_text(c), m, "nothing before it");
}

/// The longest of `n` round trips of a bystander's own messages.
fn bystander_max_rtt(c: &mut Ws, n: usize) -> Duration {
    let mut worst = Duration::ZERO;
    for i in 0..n {
        let t = Instant::now();
        next_is_own(c, &format!("rtt {i}"));
        worst = worst.max(t.elapsed());
    }
    worst
}

fn pipeline_publish(redis: &Redis, channel: &str, payloads: &[Vec<u8>]) {
    let mut p = redis::pipe();
    for b in payloads {
        p.cmd("PUBLISH").arg(channel).arg(&b[..]).ignore();
    }
    let _: () = p.query(&mut redis.conn()).expect("PUBLISH pipeline");
}

/// Finding 1: `\0h999999999999:deadbeef:x` made every client receive the whole channel
/// again. Now a claimed epoch costs a share of one read, and is dropped and counted.
#[test]
fn a_forged_epoch_flood_replays_nothing_and_costs_few_reads() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut c = joined(&a, "f1");
    let mut by = joined(&a, "bystander");
    for i in 0..100 {
        send_text(&mut c, &format!("m{i}"));
    }
    for i in 0..100 {
        assert_eq!(recv_text(&mut c), format!("m{i}"));
    }
    let reads_before = a.metric("wsfan_history_reads_total");
    let forged: Vec<Vec<u8>> = (0..5000)
        .map(|i| format!("\0h{}:deadbeef:x", 999_999_999_999u64 + i).into_bytes())
        .collect();
    pipeline_publish(&redis, "f1", &forged);
    next_is_own(&mut c, "after the flood");
    eventually(10.0, "every forged envelope settled", || {
        a.metric("wsfan_history_unconfirmed_total") == 5000.0
    });
    let reads = a.metric("wsfan_history_reads_total") - reads_before;
    assert!(reads <= 50.0, "{reads} reads for 5,000 forged envelopes");
    assert_eq!(a.metric("wsfan_history_resets_total"), 0.0);
    assert_eq!(a.metric("wsfan_history_held_bytes"), 0.0);
    let rtt = bystander_max_rtt(&mut by, 20);
    eprintln!(
        "forged epochs: 5,000 settled by {reads} reads; bystander worst round trip after: {rtt:?}"
    );
}

/// Finding 2: a far offset with the real epoch started reads that never ended.
#[test]
fn a_forged_far_offset_costs_one_read() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut c = joined(&a, "f2");
    let (epoch, top) = epoch_and_top(&redis, "f2");
    let reads_before = a.metric("wsfan_history_reads_total");
    redis.publish("f2", format!("\0h{}:{epoch}:x", top + 1_000_000).as_bytes());
    next_is_own(&mut c, "real");
    next_is_own(&mut c, "real again");
    let mut by = joined(&a, "bystander");
    bystander_max_rtt(&mut by, 20);
    let reads = a.metric("wsfan_history_reads_total") - reads_before;
    // The claim (1 read), the bystander's position read (1).
    assert!(reads <= 3.0, "{reads} reads");
    assert_eq!(a.metric("wsfan_history_unconfirmed_total"), 1.0);
}

/// Finding 3: a forged next offset replaced the real message, which was then dropped
/// as a duplicate. Without a secret both are delivered and the conflict counted.
#[test]
fn the_real_message_after_a_forged_next_offset_is_still_delivered() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let b = instance(&redis, &[]);
    let mut ca = joined(&a, "f3");
    let mut cb = connect(&b.url("/ws/f3"));
    let (epoch, top) = epoch_and_top(&redis, "f3");
    redis.publish("f3", format!("\0h{}:{epoch}:SPOOF", top + 1).as_bytes());
    assert_eq!(recv_text(&mut ca), "SPOOF");
    assert_eq!(recv_text(&mut cb), "SPOOF");
    send_text(&mut ca, "real");
    assert_eq!(recv_text(&mut ca), "real");
    assert_eq!(recv_text(&mut cb), "real");
    next_is_own(&mut ca, "after");
    assert_eq!(recv_text(&mut cb), "after");
    assert_eq!(a.metric("wsfan_history_conflicts_total"), 1.0);
    assert_eq!(b.metric("wsfan_history_conflicts_total"), 1.0);
}

/// Finding 4: a far offset arriving between a first member's SUBSCRIBE and the position
/// read became the instance's position; every real message after it was dropped.
#[test]
fn forged_offsets_while_a_channel_is_first_joined_cut_nobody_off() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    // A real history for the channel (another instance's publish).
    let other = instance(&redis, &[]);
    joined(&other, "f4");
    drop(other);
    let (epoch, top) = epoch_and_top(&redis, "f4");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let port = redis.port;
        std::thread::spawn(move || {
            let mut r = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .and_then(|c| c.get_connection())
                .expect("flood connection");
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 200_000 {
                let m = format!("\0h{}:{epoch}:forged", top + 1_000_000 + n);
                let _: i64 = redis::cmd("PUBLISH")
                    .arg("f4")
                    .arg(m)
                    .query(&mut r)
                    .expect("PUBLISH");
                n += 1;
            }
            n
        })
    };
    // Joins (SUBSCRIBE, position read) while the flood runs, several times.
    for _ in 0..5 {
        let c = connect(&a.url("/ws/f4"));
        eventually(5.0, "subscribed", || redis.numsub("f4") == 1);
        drop(c);
        eventually(5.0, "unsubscribed", || redis.numsub("f4") == 0);
    }
    let mut c = connect(&a.url("/ws/f4"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().expect("flood");
    for i in 0..5 {
        send_text(&mut c, &format!("real {i}"));
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = recv_text(&mut c);
        if m != "forged" {
            got.push(m);
        }
    }
    assert_eq!(got, (0..5).map(|i| format!("real {i}")).collect::<Vec<_>>());
    eventually(5.0, "claims settled", || {
        a.metric("wsfan_history_held_bytes") == 0.0
    });
    eprintln!(
        "{sent} forged envelopes during joins: {} unconfirmed, {} reads",
        a.metric("wsfan_history_unconfirmed_total"),
        a.metric("wsfan_history_reads_total")
    );
}

/// Finding 5: a gap of large messages cost Redis ~110 ms per message repaired (XRANGE
/// COUNT 1000 materialised before the byte limit). Now a read costs what it returns.
#[test]
fn a_gap_of_large_messages_is_repaired_in_seconds_and_bystanders_keep_going() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut c = joined(&a, "big");
    let mut by = joined(&a, "bystander");
    let (meta, stream) = wsfan::backplane::redis::history::keys("big");
    let mut r = redis.conn();
    let (_, top) = epoch_and_top(&redis, "big");
    let body = "x".repeat(60_000);
    let n = 1000u64;
    let mut p = redis::pipe();
    for off in top + 1..=top + n {
        p.cmd("XADD")
            .arg(&stream)
            .arg(format!("{off}-0"))
            .arg("d")
            .arg(format!("{off:06}{body}"))
            .ignore();
    }
    p.cmd("HSET").arg(&meta).arg("s").arg(top + n).ignore();
    let _: () = p.query(&mut r).expect("hidden gap");
    let t = Instant::now();
    send_text(&mut c, "reveal");
    c.get_mut()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    for off in top + 1..=top + n {
        let m = recv_text(&mut c);
        assert_eq!(&m[..6], format!("{off:06}"), "in order");
        assert_eq!(m.len(), 60_006);
    }
    assert_eq!(recv_text(&mut c), "reveal");
    let took = t.elapsed();
    let rtt = bystander_max_rtt(&mut by, 20);
    let reads = a.metric("wsfan_history_reads_total");
    eprintln!("1,000 x 60 kB gap repaired in {took:?} with {reads} reads; bystander worst round trip after {rtt:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(a.metric("wsfan_history_missed_total"), 0.0);
}

/// Finding 6a: a node demoted to replica (`-READONLY`) lost 98 of 100 publishes with
/// `/readyz` 200. Now they stay buffered, `/readyz` says why, and all arrive once the
/// node takes writes again.
#[test]
fn a_read_only_redis_keeps_publishes_buffered_and_readyz_says_why() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut c = joined(&a, "ro");
    let dead = free_port();
    let _: String = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(dead)
        .query(&mut redis.conn())
        .expect("REPLICAOF");
    for i in 0..100 {
        send_text(&mut c, &format!("m{i}"));
    }
    eventually(5.0, "readyz 503 naming READONLY", || {
        let (status, _, body) = http(
            a.addr,
            "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        status == 503 && String::from_utf8_lossy(&body).contains("READONLY")
    });
    let _: String = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut redis.conn())
        .expect("REPLICAOF NO ONE");
    for i in 0..100 {
        assert_eq!(recv_text(&mut c), format!("m{i}"), "all, once, in order");
    }
    next_is_own(&mut c, "after");
    eventually(5.0, "ready again", || a.status("/readyz") == 200);
    assert_eq!(a.metric("wsfan_redis_publish_abandoned_total"), 0.0);
    assert_eq!(a.metric("wsfan_redis_buffer_dropped_total"), 0.0);
    assert!(a.log().contains("READONLY"));
}

/// Finding 6b: `maxmemory` + `noeviction` (`-OOM`) lost every publish, 0 counted.
#[test]
fn an_out_of_memory_redis_keeps_publishes_buffered() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut c = joined(&a, "oom");
    let mut r = redis.conn();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(&mut r)
        .expect("policy");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query(&mut r)
        .expect("maxmemory");
    for i in 0..20 {
        send_text(&mut c, &format!("m{i}"));
    }
    eventually(5.0, "readyz 503 naming OOM", || {
        let (status, _, body) = http(
            a.addr,
            "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        status == 503 && String::from_utf8_lossy(&body).contains("OOM")
    });
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query(&mut r)
        .expect("maxmemory");
    for i in 0..20 {
        assert_eq!(recv_text(&mut c), format!("m{i}"));
    }
    eventually(5.0, "ready again", || a.status("/readyz") == 200);
    assert_eq!(a.metric("wsfan_redis_publish_abandoned_total"), 0.0);
}

/// Finding 6c: a foreign key of the wrong type at a channel's meta lost every publish
/// of that channel, 0 counted, a WARN line per message. Now: counted by reason, logged
/// rate-limited, other channels untouched.
#[test]
fn a_foreign_key_of_the_wrong_type_drops_that_channel_s_publishes_counted() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut by = joined(&a, "fine");
    let mut c = connect(&a.url("/ws/wrong"));
    let _: () = redis::cmd("SET")
        .arg(meta("wrong"))
        .arg("a neighbour's string")
        .query(&mut redis.conn())
        .expect("SET");
    for i in 0..50 {
        send_text(&mut c, &format!("m{i}"));
    }
    eventually(5.0, "all 50 refused and counted", || {
        a.metric("wsfan_redis_publish_refused_total{reason=\"wrongtype\"}") == 50.0
    });
    bystander_max_rtt(&mut by, 5);
    let warns = a
        .log()
        .lines()
        .filter(|l| l.contains("refused a publish"))
        .count();
    assert!(
        (1..=2).contains(&warns),
        "{warns} log lines for 50 refusals"
    );
    assert_eq!(a.metric("wsfan_redis_reconnects_total"), 0.0);
    assert_eq!(a.status("/readyz"), 200);
    drop(c);
}

/// Finding 7: `SET {C}:p:<instance> 99999999999` dropped every later publish of that
/// instance on that channel, counted as published. Now a dedupe value beyond anything
/// the instance sent is overwritten and counted.
#[test]
fn a_tampered_dedupe_value_is_overwritten_not_obeyed() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut c = joined(&a, "dd");
    let mut r = redis.conn();
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(meta("dd"))
        .query(&mut r)
        .expect("HKEYS");
    let mine: Vec<&String> = fields.iter().filter(|f| f.starts_with("p:")).collect();
    assert_eq!(mine.len(), 1, "{fields:?}");
    let _: () = redis::cmd("HSET")
        .arg(meta("dd"))
        .arg(mine[0])
        .arg("99999999999:1")
        .query(&mut r)
        .expect("tamper");
    for i in 0..5 {
        next_is_own(&mut c, &format!("after tamper {i}"));
    }
    assert_eq!(a.metric("wsfan_history_corrupt_dedupe_total"), 1.0);
}

/// Finding 8: one channel's bad meta (`HSET {C}:m s -1`) ended the shared publish link
/// on every read. Now the read fails for that channel only, the next publish starts a
/// new epoch, and nobody else notices.
#[test]
fn one_channel_s_bad_meta_stays_in_that_channel() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut by = joined(&a, "fine");
    let mut c = joined(&a, "bad");
    drop(c);
    eventually(5.0, "unsubscribed", || redis.numsub("bad") == 0);
    let _: () = redis::cmd("HSET")
        .arg(meta("bad"))
        .arg("s")
        .arg(-1)
        .query(&mut redis.conn())
        .expect("HSET");
    // Joining reads the position: refused for this channel only.
    c = connect(&a.url("/ws/bad"));
    for i in 0..5 {
        next_is_own(&mut c, &format!("on bad {i}"));
        next_is_own(&mut by, &format!("on fine {i}"));
    }
    assert_eq!(a.metric("wsfan_redis_reconnects_total"), 0.0);
    assert!(a.metric("wsfan_history_read_refused_total") >= 1.0);
    assert_eq!(a.metric("wsfan_history_corrupt_meta_total"), 1.0);
    assert_eq!(a.metric("wsfan_redis_publish_abandoned_total"), 0.0);
    let (epoch, top) = epoch_and_top(&redis, "bad");
    assert!(!epoch.is_empty() && top == 5, "a new epoch: {epoch} {top}");
}

/// Finding 9: with mixed `--max-message-size`, a message over B's limit stuck the
/// channel on B: the read that skipped it stopped at the next entry when that one was
/// over the read's byte budget (64 KiB) and returned nothing, forever.
#[test]
fn a_message_too_large_for_one_instance_does_not_stick_the_channel_there() {
    let redis = Redis::start();
    let a = instance(&redis, &["--max-message-size", "300000"]);
    let b = instance(&redis, &["--max-message-size", "100000"]);
    let mut cb = connect(&b.url("/ws/mixed"));
    let mut ca = joined(&a, "mixed");
    assert_eq!(recv_text(&mut cb), "hello");
    let big = "y".repeat(150_000);
    send_text(&mut ca, &big);
    assert_eq!(recv_text(&mut ca), big);
    for i in 0..5 {
        let m = format!("{i}{}", "z".repeat(70_000));
        send_text(&mut ca, &m);
        assert_eq!(recv_text(&mut ca), m);
    }
    for i in 0..5 {
        let m = recv_text(&mut cb);
        assert_eq!((&m[..1], m.len()), (i.to_string().as_str(), 70_001));
    }
    next_is_own(&mut cb, "b too");
    // The position read, the gap read, then at most one per 70 kB message (each is
    // alone over a read's 64 KiB budget; how many arrive live while a read is out
    // depends on timing): a channel stuck on the big one would read without end.
    let reads = b.metric("wsfan_history_reads_total");
    assert!(reads <= 7.0, "{reads} reads");
    assert!(b.metric("wsfan_redis_oversize_dropped_total") >= 1.0);
}

/// Finding 10: the dedupe key was refreshed only by its own instance's publishes, so
/// a re-send after a partition longer than `--history-ttl` was appended again while
/// other instances kept the channel alive. Now it lives in the meta hash, as long as
/// the channel's history.
#[test]
fn a_re_send_after_others_kept_the_channel_alive_is_not_stored_twice() {
    use wsfan::backplane::redis::history::{self, History};
    let redis = Redis::start();
    let mut r = redis.conn();
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(history::publish_script())
        .query(&mut r)
        .expect("SCRIPT LOAD");
    let inst = |name: &str| History {
        size: 100,
        ttl: 1,
        instance: name.into(),
        max_entry: 1000,
        key: None,
        node: String::new(),
        node2: String::new(),
        myid: String::new(),
    };
    let call = |r: &mut redis::Connection, h: &History, seq: u64| -> (u64, u64) {
        let per_channel: Vec<(u64, u64)> = h
            .publish(&sha, "ch", seq, &[(seq, b"x")])
            .query(r)
            .expect("script");
        per_channel[0]
    };
    let (a, b) = (inst("a"), inst("b"));
    assert_eq!(call(&mut r, &a, 1), (1, 0));
    // Only b publishes for longer than the TTL (a is cut off).
    let end = Instant::now() + Duration::from_millis(2500);
    let mut seq = 0;
    while Instant::now() < end {
        seq += 1;
        call(&mut r, &b, seq);
        std::thread::sleep(Duration::from_millis(100));
    }
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut r).expect("KEYS");
    assert_eq!(keys.len(), 2, "meta and stream only: {keys:?}");
    // a's reply was lost; a sends seq 1 again: already applied.
    assert_eq!(call(&mut r, &a, 1), (0, 0));
    let (_, top) = epoch_and_top(&redis, "ch");
    assert_eq!(top, 1 + seq);
}

/// Finding 12: history expired while an instance was away; its catch-up found nothing
/// and the loss was not counted. Now it is a counted reset, with a log line.
#[test]
fn history_gone_during_an_outage_is_counted() {
    let redis = Redis::start();
    let a = instance(&redis, &["--history-ttl", "1"]);
    let b = instance(&redis, &["--history-ttl", "1"]);
    let mut cb = connect(&b.url("/ws/gone"));
    let mut ca = joined(&a, "gone");
    assert_eq!(recv_text(&mut cb), "hello");
    b.signal("STOP");
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut redis.conn())
        .expect("CLIENT KILL");
    eventually(5.0, "a subscribed again", || redis.numsub("gone") == 1);
    send_text(&mut ca, "b misses this");
    assert_eq!(recv_text(&mut ca), "b misses this");
    let mut r = redis.conn();
    eventually(10.0, "history expired", || {
        let n: i64 = redis::cmd("EXISTS")
            .arg(meta("gone"))
            .query(&mut r)
            .expect("EXISTS");
        n == 0
    });
    b.signal("CONT");
    eventually(10.0, "b counted the loss", || {
        b.metric("wsfan_history_resets_total") >= 1.0
    });
    assert!(b.log().contains("history of channel gone"));
    next_is_own(&mut ca, "later");
    assert_eq!(recv_text(&mut cb), "later");
}

/// A Redis that runs no Lua (some managed offerings disable `SCRIPT`/`EVAL`): not ready,
/// and the log says what to do.
#[test]
fn a_redis_without_lua_says_to_turn_history_off() {
    let redis = Redis::start_with(&["--rename-command", "SCRIPT", "\"\""]);
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str()];
    args.extend_from_slice(FAST_FAILOVER);
    let a = Wsfan::start(&args);
    a.wait_log("--history-size 0", 10.0);
    assert_eq!(a.status("/readyz"), 503);
    let off = instance(&redis, &["--history-size", "0"]);
    let mut c = connect(&off.url("/ws/plain"));
    next_is_own(&mut c, "works with history off");
}

/// A top offset lowered behind the stream (an operator's `HSET`, offsets that would be
/// reused): the next publish moves past the stream's last entry instead of failing, and
/// nothing is delivered twice or lost.
#[test]
fn a_top_offset_behind_the_stream_moves_forward_instead_of_failing() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut c = joined(&a, "low");
    for i in 0..4 {
        next_is_own(&mut c, &format!("m{i}"));
    }
    let _: () = redis::cmd("HSET")
        .arg(meta("low"))
        .arg("s")
        .arg(1)
        .query(&mut redis.conn())
        .expect("HSET");
    for i in 0..3 {
        next_is_own(&mut c, &format!("after {i}"));
    }
    assert_eq!(epoch_and_top(&redis, "low").1, 8);
    assert_eq!(a.metric("wsfan_history_corrupt_meta_total"), 1.0);
    assert_eq!(
        a.metric("wsfan_redis_publish_refused_total{reason=\"other\"}"),
        0.0
    );
}

fn ttl(redis: &Redis, key: &str) -> i64 {
    redis::cmd("TTL")
        .arg(key)
        .query(&mut redis.conn())
        .expect("TTL")
}

/// Both keys' TTLs set to 100 s (far above what wsfan sets: a refresh shows).
fn expire_100(redis: &Redis, meta: &str, stream: &str) {
    for key in [meta, stream] {
        let _: () = redis::cmd("EXPIRE")
            .arg(key)
            .arg(100)
            .query(&mut redis.conn())
            .expect("EXPIRE");
    }
}

fn hset(redis: &Redis, key: &str, field: &str, value: &str) {
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg(field)
        .arg(value)
        .query(&mut redis.conn())
        .expect("HSET");
}

/// Issue 18, trimming what a publish costs Redis: the two `EXPIRE`s run once per half
/// TTL (the meta hash's `x`, by Redis's clock), not per publish, and every publish
/// still leaves both keys at least `--history-ttl` to live. A refresh time that is
/// old, in the future or not a number refreshes; a stream gone while its meta hash is
/// not gets its TTL at once (it would otherwise live forever).
#[test]
fn ttls_are_refreshed_when_due_and_never_left_behind() {
    let redis = Redis::start();
    let a = instance(&redis, &["--history-ttl", "4"]);
    let mut c = joined(&a, "kept");
    let (m, s) = wsfan::backplane::redis::history::keys("kept");
    let fresh = |redis: &Redis| {
        for key in [&m, &s] {
            let t = ttl(redis, key);
            assert!(
                (4..=6).contains(&t),
                "{key}: TTL {t}, want 4..=6 (ttl 4, 1.5x)"
            );
        }
    };
    fresh(&redis);
    // Refreshed moments ago: a publish leaves the TTLs alone (no EXPIRE per call).
    expire_100(&redis, &m, &s);
    next_is_own(&mut c, "no refresh due");
    assert!(ttl(&redis, &m) > 90 && ttl(&redis, &s) > 90);
    for x in ["1", "99999999999", "garbage"] {
        expire_100(&redis, &m, &s);
        hset(&redis, &m, "x", x);
        next_is_own(&mut c, &format!("refresh time {x}"));
        fresh(&redis);
    }
    let _: () = redis::cmd("DEL")
        .arg(&s)
        .query(&mut redis.conn())
        .expect("DEL");
    next_is_own(&mut c, "the stream was gone");
    fresh(&redis);
    let len: i64 = redis::cmd("XLEN")
        .arg(&s)
        .query(&mut redis.conn())
        .expect("XLEN");
    assert_eq!(len, 1);
}

/// Offsets stop at `history::MAX_OFFSET` (Lua would print a larger one as `1e+14`, no
/// stream id): the publish that reaches it is delivered at it, the next begins a new
/// epoch, counted as a reset; nothing is refused or lost.
#[test]
fn the_last_offset_is_used_and_the_next_publish_begins_again() {
    use wsfan::backplane::redis::history::MAX_OFFSET;
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let b = instance(&redis, &[]);
    let mut cb = connect(&b.url("/ws/end"));
    let mut c = joined(&a, "end");
    assert_eq!(recv_text(&mut cb), "hello");
    let (epoch, _) = epoch_and_top(&redis, "end");
    hset(&redis, &meta("end"), "s", &(MAX_OFFSET - 1).to_string());
    next_is_own(&mut c, "the last offset");
    assert_eq!(recv_text(&mut cb), "the last offset");
    assert_eq!(epoch_and_top(&redis, "end"), (epoch.clone(), MAX_OFFSET));
    next_is_own(&mut c, "a new epoch");
    assert_eq!(recv_text(&mut cb), "a new epoch");
    let (again, top) = epoch_and_top(&redis, "end");
    assert_ne!(again, epoch);
    assert_eq!(top, 1);
    assert_eq!(
        a.metric("wsfan_redis_publish_refused_total{reason=\"other\"}"),
        0.0
    );
}

/// Finding 3, closed: with `--history-key` shared by every instance, a forged claim of
/// the very next offset (plain `\0h`, or `\0H` with a wrong tag) is never delivered and
/// is counted; real messages flow, across instances, tagged by Lua and checked in Rust.
#[test]
fn with_a_history_key_a_forged_next_offset_is_never_delivered() {
    let redis = Redis::start();
    let key = ["--history-key", "a shared secret of 32 bytes....."];
    let a = instance(&redis, &key);
    let b = instance(&redis, &key);
    let mut cb = connect(&b.url("/ws/keyed"));
    let mut ca = joined(&a, "keyed");
    assert_eq!(recv_text(&mut cb), "hello");
    let (epoch, top) = epoch_and_top(&redis, "keyed");
    redis.publish("keyed", format!("\0h{}:{epoch}:SPOOF", top + 1).as_bytes());
    let bad_tag = "0".repeat(40);
    redis.publish(
        "keyed",
        format!("\0H{bad_tag}{}:{epoch}:SPOOF", top + 1).as_bytes(),
    );
    next_is_own(&mut ca, "real");
    assert_eq!(
        recv_text(&mut cb),
        "real",
        "the real one, nothing before it"
    );
    assert_eq!(a.metric("wsfan_history_forged_total"), 2.0);
    assert_eq!(b.metric("wsfan_history_forged_total"), 2.0);
    assert_eq!(a.metric("wsfan_history_conflicts_total"), 0.0);
    // A foreign plain message is still delivered (interop).
    redis.publish("keyed", b"plain neighbour");
    assert_eq!(recv_text(&mut ca), "plain neighbour");
}

/// Issue 18, batching: one script call carries the publishes of many channels. 500
/// channels, a message each per round, 3 rounds: every client gets its own messages
/// exactly once, in order; a channel whose meta key is a neighbour's string is refused
/// alone (counted), the others in the same calls go on.
#[test]
fn many_channels_share_script_calls_and_a_bad_one_is_refused_alone() {
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut clients: Vec<Ws> = (0..500)
        .map(|i| connect(&a.url(&format!("/ws/ch{i}"))))
        .collect();
    let _: () = redis::cmd("SET")
        .arg(meta("ch250"))
        .arg("not a hash")
        .query(&mut redis.conn())
        .expect("SET");
    // Every client joined (its channel subscribed and positioned) before the burst.
    for (i, c) in clients.iter_mut().enumerate().filter(|(i, _)| *i != 250) {
        next_is_own(c, &format!("ch{i} joined"));
    }
    let calls0 = redis_calls(&redis);
    let reads0 = a.metric("wsfan_history_reads_total");
    // The instance is stopped while the clients send, so it finds all 1,500 publishes
    // at once (as a busy instance would): how they are grouped into calls does not
    // depend on how fast this test sends.
    a.signal("STOP");
    for round in 0..3 {
        for (i, c) in clients.iter_mut().enumerate() {
            send_text(c, &format!("ch{i} round {round}"));
        }
    }
    a.signal("CONT");
    for (i, c) in clients.iter_mut().enumerate() {
        if i == 250 {
            continue;
        }
        for round in 0..3 {
            assert_eq!(recv_text(c), format!("ch{i} round {round}"));
        }
    }
    next_is_own(&mut clients[0], "after");
    // Script calls that were publishes (the rest are history reads: a fresh channel's
    // first epoch is read once).
    let reads = a.metric("wsfan_history_reads_total") - reads0;
    let calls = redis_calls(&redis) - calls0 - reads;
    assert!(
        calls <= 1500.0 / 8.0,
        "{calls} publish calls for 1,500 publishes"
    );
    assert_eq!(
        a.metric("wsfan_redis_publish_refused_total{reason=\"wrongtype\"}"),
        3.0
    );
}

/// EVALSHA calls Redis has run (`INFO commandstats`).
fn redis_calls(redis: &Redis) -> f64 {
    redis_cmd_calls(redis, "evalsha")
}

/// Issue 18, batching across channels keeps exactly-once: 1,000 channels, one message
/// each, sent in shared script calls into a frozen Redis. The instance gives up on the
/// link (PING deadline) and sends the unanswered calls again once Redis is back; Redis
/// runs the first copies too (they were in its socket buffer). Every message is stored
/// once (each stream holds 2 entries) and delivered once, in order.
#[test]
fn batched_calls_re_sent_after_a_frozen_redis_are_applied_once() {
    const N: usize = 1000;
    let _ = raise_nofile();
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    let mut clients: Vec<Ws> = (0..N)
        .map(|i| connect(&a.url(&format!("/ws/r{i}"))))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        next_is_own(c, &format!("r{i} joined"));
    }
    let hmgets0 = redis_cmd_calls(&redis, "hmget");
    let reads0 = a.metric("wsfan_history_reads_total");
    redis.signal("STOP");
    a.signal("STOP");
    for (i, c) in clients.iter_mut().enumerate() {
        send_text(c, &format!("r{i} once"));
    }
    a.signal("CONT");
    // The calls are written into the frozen Redis's socket; the link is given up.
    a.wait_log("redis publish link lost", 10.0);
    redis.signal("CONT");
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(recv_text(c), format!("r{i} once"));
    }
    for (i, c) in clients.iter_mut().enumerate().step_by(97) {
        next_is_own(c, &format!("r{i} after"));
    }
    let mut r = redis.conn();
    let mut p = redis::pipe();
    for i in 0..N {
        p.cmd("XLEN")
            .arg(wsfan::backplane::redis::history::keys(&format!("r{i}")).1);
    }
    let lens: Vec<i64> = p.query(&mut r).expect("XLEN");
    for (i, len) in lens.iter().enumerate() {
        let want = if i % 97 == 0 { 3 } else { 2 };
        assert_eq!(*len, want, "r{i}: stored once each");
    }
    // Each copy of a publish reads its channel's meta hash once (as each history
    // read does): beyond one per publish, the first copies Redis ran before the
    // re-sends (those written before the link was given up; at least a whole call),
    // and yet every stream holds each message once.
    let reads = a.metric("wsfan_history_reads_total") - reads0;
    let publish_reads = redis_cmd_calls(&redis, "hmget") - hmgets0 - reads;
    let twice = publish_reads - (N + 11) as f64;
    assert!(
        (64.0..=N as f64).contains(&twice),
        "{twice} publishes ran twice"
    );
}

/// Calls of one command Redis has run, scripts' included (`INFO commandstats`).
fn redis_cmd_calls(redis: &Redis, cmd: &str) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn())
        .expect("INFO");
    let prefix = format!("cmdstat_{cmd}:");
    info.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.split(&[':', ',']).find_map(|f| f.strip_prefix("calls=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

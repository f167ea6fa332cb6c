//! History costs: publishes/s one Redis sustains through the history script against
//! plain PUBLISH (both pipelined), the time an instance takes to repair a gap of
//! 1,000 messages on one channel (and Redis's CPU per repaired message, 64 B and 60 kB),
//! standalone history's memory against its limit, and the forged envelopes an instance
//! absorbs while a bystander's round trips are measured.

use crate::common::{self, connect, recv_text, send_text};
use crate::start_wsfan;
use std::time::Instant;
use wsfan::backplane::redis::history;

/// `n` commands in pipelines of 1,000 on one connection; returns commands/s.
fn pipelined(conn: &mut redis::Connection, n: usize, cmd: &dyn Fn(usize) -> redis::Cmd) -> f64 {
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let mut p = redis::pipe();
        for k in i..(i + 1000).min(n) {
            p.add_command(cmd(k)).ignore();
        }
        let _: () = p.query(conn).expect("pipeline");
        i += 1000;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

pub fn history(n: usize, gap: usize) {
    let redis = common::Redis::start();
    let mut conn = redis.conn();
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(history::publish_script())
        .query(&mut conn)
        .expect("SCRIPT LOAD");
    let body = [b'x'; 64];
    let plain = pipelined(&mut conn, n, &|_| {
        redis::cmd("PUBLISH").arg("bench").arg(&body[..]).clone()
    });
    let h = history::History {
        size: 10_000,
        ttl: 300,
        instance: "bench".into(),
        max_entry: 65_538,
        key: None,
        node: String::new(),
        node2: String::new(),
        myid: String::new(),
    };
    let scripted = pipelined(&mut conn, n, &|k| {
        h.publish(&sha, "bench", 1 << 50, &[(k as u64 + 1, &body[..])])
    });
    // Batches of 16 (the outbox groups a busy channel's publishes like this).
    let batched = 16.0
        * pipelined(&mut conn, n / 16, &|k| {
            let items: Vec<(u64, &[u8])> = (0..16)
                .map(|i| ((n + k * 16 + i) as u64 + 1, &body[..]))
                .collect();
            h.publish(&sha, "bench", 1 << 50, &items)
        });
    // 1,000 channels, one message each per round: the outbox puts up to 64 consecutive
    // publishes of any channels in one call (issue 18's "batching across channels").
    let names: Vec<String> = (0..1000).map(|i| format!("room{i}")).collect();
    let spread = 64.0
        * pipelined(&mut conn, n / 64, &|k| {
            let groups: Vec<history::ChannelGroup<'_>> = (0..64)
                .map(|i| {
                    let seq = (2 * n + k * 64 + i) as u64 + 1;
                    (names[(k * 64 + i) % 1000].as_str(), vec![(seq, &body[..])])
                })
                .collect();
            h.publish_channels(&sha, 1 << 50, &groups)
        });
    // With --history-key: two sha1hex per message in the script.
    let keyed_h = history::History {
        key: wsfan::envelope::HistoryKey::new(b"a shared secret of 32 bytes....."),
        node: String::new(),
        node2: String::new(),
        myid: String::new(),
        instance: "bench-keyed".into(),
        ..h.clone()
    };
    let keyed = 16.0
        * pipelined(&mut conn, n / 16, &|k| {
            let items: Vec<(u64, &[u8])> = (0..16)
                .map(|i| ((k * 16 + i) as u64 + 1, &body[..]))
                .collect();
            keyed_h.publish(&sha, "bench-keyed", 1 << 50, &items)
        });
    report!(
        "history: one Redis, 64-byte messages, pipelines of 1,000 calls: PUBLISH {:.0}/s; history script, one message per call {:.0}/s ({:.1}x fewer), 16 per call {:.0}/s ({:.1}x fewer); 1,000 channels one message each, 64 channels per call {:.0}/s ({:.1}x fewer); 16 per call with --history-key {:.0}/s",
        plain,
        scripted,
        plain / scripted,
        batched,
        plain / batched,
        spread,
        plain / spread,
        keyed
    );

    // A gap of `gap` messages: written into history as the script would, unpublished.
    let a = start_wsfan(&["--redis", &redis.url()]);
    common::eventually(15.0, "instance ready", || a.status("/readyz") == 200);
    let mut ws = connect(&a.url("/ws/gap"));
    send_text(&mut ws, "first");
    assert_eq!(recv_text(&mut ws), "first");
    let (meta, stream) = history::keys("gap");
    let mut p = redis::pipe();
    for _ in 0..gap {
        p.cmd("HINCRBY").arg(&meta).arg("s").arg(1).ignore();
    }
    let _: () = p.query(&mut conn).expect("offsets");
    let mut p = redis::pipe();
    for off in 2..(2 + gap) {
        p.cmd("XADD")
            .arg(&stream)
            .arg(format!("{off}-0"))
            .arg("d")
            .arg(format!("hidden {off}"))
            .ignore();
    }
    let _: () = p.query(&mut conn).expect("entries");
    let t = Instant::now();
    send_text(&mut ws, "reveals the gap");
    for off in 2..(2 + gap) {
        assert_eq!(recv_text(&mut ws), format!("hidden {off}"));
    }
    assert_eq!(recv_text(&mut ws), "reveals the gap");
    report!(
        "history: a gap of {gap} messages on one channel repaired and delivered in {:.1} ms ({} reads)",
        t.elapsed().as_secs_f64() * 1000.0,
        a.metric("wsfan_history_reads_total")
    );
}

/// Standalone history memory: appends one tiny message to each of `channels` channels
/// under a `--history-memory-bytes` of `cap`, in a child process of its own (a clean
/// RSS), and reports what the history counted against its resident memory.
pub fn memory(channels: usize, cap: usize) {
    let out = std::process::Command::new(std::env::current_exe().expect("bench binary"))
        .env("WSFAN_BENCH_ROLE", "history-memory")
        .env("WSFAN_BENCH_MEM", format!("{channels},{cap}"))
        .output()
        .expect("history-memory child");
    let line = String::from_utf8_lossy(&out.stdout);
    report!("history memory (standalone): {}", line.trim());
}

/// The child of [`memory`].
pub fn memory_child() {
    let arg = std::env::var("WSFAN_BENCH_MEM").unwrap_or_default();
    let mut it = arg.split(',').filter_map(|v| v.parse::<usize>().ok());
    let (n, cap) = (
        it.next().unwrap_or(1_000_000),
        it.next().unwrap_or(16 << 20),
    );
    let rss = || common::rss_kb(std::process::id());
    let base = rss();
    let mut h = wsfan::backplane::memory::history::MemHistory::new(
        10_000,
        std::time::Duration::from_secs(300),
        cap,
    );
    let t = Instant::now();
    let mut keep = Vec::new();
    for i in 0..n {
        let p = bytes::Bytes::copy_from_slice(b"hi");
        keep.push(p.clone()); // the fan-out holds a clone for a moment, as in the server
        h.append(&format!("channel-{i}"), wsfan::ws::Kind::Text, p, t);
        if keep.len() == 64 {
            keep.clear();
        }
    }
    let used = rss().saturating_sub(base) as f64 / 1024.0;
    println!(
        "{n} channels x one 2-byte message, --history-memory-bytes {} MiB: {} channels kept, {:.1} MiB counted, RSS +{used:.1} MiB ({:.2}x the limit)",
        cap >> 20,
        h.channels(),
        h.bytes() as f64 / 1048576.0,
        used / (cap as f64 / 1048576.0)
    );
}

/// Microseconds of Redis CPU spent in `EVALSHA` so far (`INFO commandstats`).
fn evalsha_usec(conn: &mut redis::Connection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(conn)
        .expect("INFO");
    info.lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| l.split(',').find(|f| f.starts_with("usec=")))
        .and_then(|f| f[5..].parse().ok())
        .unwrap_or(0.0)
}

/// A gap of `gap` messages of `size` bytes, written into history as the script would
/// and unpublished, repaired by one instance: time, reads, and Redis CPU per repaired
/// message (the read script's share of `EVALSHA` time).
pub fn gap_repair(size: usize, gap: usize) {
    let redis = common::Redis::start();
    let mut conn = redis.conn();
    let a = start_wsfan(&["--redis", &redis.url(), "--max-message-size", "100000"]);
    common::eventually(15.0, "instance ready", || a.status("/readyz") == 200);
    let mut ws = connect(&a.url("/ws/gap"));
    ws.get_mut()
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    send_text(&mut ws, "first");
    assert_eq!(recv_text(&mut ws), "first");
    let (meta, stream) = history::keys("gap");
    let body = "x".repeat(size.saturating_sub(8));
    let mut p = redis::pipe();
    for off in 2..(2 + gap) {
        p.cmd("XADD")
            .arg(&stream)
            .arg(format!("{off}-0"))
            .arg("d")
            .arg(format!("{off:08}{body}"))
            .ignore();
    }
    p.cmd("HSET").arg(&meta).arg("s").arg(1 + gap).ignore();
    let _: () = p.query(&mut conn).expect("gap");
    let reads0 = a.metric("wsfan_history_reads_total");
    let usec0 = evalsha_usec(&mut conn);
    let t = Instant::now();
    send_text(&mut ws, "reveal");
    for off in 2..(2 + gap) {
        let m = recv_text(&mut ws);
        assert_eq!(&m[..8], format!("{off:08}"));
    }
    assert_eq!(recv_text(&mut ws), "reveal");
    let took = t.elapsed();
    let reads = a.metric("wsfan_history_reads_total") - reads0;
    let usec = evalsha_usec(&mut conn) - usec0;
    report!(
        "history: a gap of {gap} x {size} B repaired in {:.1} ms: {reads} reads, Redis {:.1} us per repaired message (EVALSHA time, one publish included)",
        took.as_secs_f64() * 1000.0,
        usec / gap as f64
    );
}

/// Forged envelopes (`\0h<far offset>:<unknown epoch>:x`) published at `rate`/s for
/// `secs` on one channel an instance follows, while a bystander on another channel of
/// the same instance measures its round trips: p50/p99 with and without the flood, and
/// what the instance absorbed (reads, unconfirmed).
pub fn forged_flood(rates: &[u64], secs: f64) {
    let redis = common::Redis::start();
    let a = start_wsfan(&["--redis", &redis.url()]);
    common::eventually(15.0, "instance ready", || a.status("/readyz") == 200);
    let mut target = connect(&a.url("/ws/attacked"));
    send_text(&mut target, "x");
    assert_eq!(recv_text(&mut target), "x");
    let mut by = connect(&a.url("/ws/bystander"));
    let rtts = |by: &mut common::Ws, secs: f64| -> (f64, f64) {
        let end = Instant::now() + std::time::Duration::from_secs_f64(secs);
        let mut v = Vec::new();
        while Instant::now() < end {
            let t = Instant::now();
            send_text(by, "rtt");
            assert_eq!(recv_text(by), "rtt");
            v.push(t.elapsed().as_secs_f64() * 1000.0);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)])
    };
    let (p50, p99) = rtts(&mut by, secs);
    report!("history: bystander round trip without a flood: p50 {p50:.2} ms, p99 {p99:.2} ms");
    for &rate in rates {
        // Counted before the flood starts (it publishes at once).
        let reads0 = a.metric("wsfan_history_reads_total");
        let unc0 = a.metric("wsfan_history_unconfirmed_total");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = {
            let stop = stop.clone();
            let url = redis.url();
            std::thread::spawn(move || {
                let mut c = redis::Client::open(url)
                    .and_then(|c| c.get_connection())
                    .expect("flood connection");
                let start = Instant::now();
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                    if sent >= due {
                        std::thread::sleep(std::time::Duration::from_micros(500));
                        continue;
                    }
                    let mut p = redis::pipe();
                    for i in sent..due.min(sent + 1000) {
                        p.cmd("PUBLISH")
                            .arg("attacked")
                            .arg(format!("\0h{}:deadbeef{}:x", 999_999_999 + i, i % 7))
                            .ignore();
                    }
                    let _: () = p.query(&mut c).expect("flood");
                    sent = due.min(sent + 1000);
                }
                sent
            })
        };
        let (p50, p99) = rtts(&mut by, secs);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = flood.join().expect("flood");
        common::eventually(10.0, "flood settled", || {
            a.metric("wsfan_history_unconfirmed_total") - unc0 >= sent as f64
        });
        report!(
            "history: {rate} forged envelopes/s for {secs} s: bystander p50 {p50:.2} ms, p99 {p99:.2} ms; {} reads, {} dropped unconfirmed",
            a.metric("wsfan_history_reads_total") - reads0,
            a.metric("wsfan_history_unconfirmed_total") - unc0
        );
    }
}

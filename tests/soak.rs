//! The chaos soak: three wsfan instances on one real Redis, real clients over TCP, and
//! faults injected on a schedule. Bounded and self-stopping, loopback only.
//!
//! `cargo test --test soak -- --ignored --nocapture` (the README's test command runs it
//! for 60 s); `WSFAN_SOAK_SECS=1800` for a long run. What runs meanwhile:
//!
//! * publishers on every channel, on different instances, at low and high rates; every
//!   message carries its publisher and sequence number;
//! * a witness per instance and channel (reads everything, answers pings);
//! * clients joining and leaving (channels drop to zero members and come back), some
//!   leaving with a close, some just cutting TCP; clients that never read; ping
//!   flooders;
//! * faults, one every few seconds: Redis paused briefly (no reconnect may follow),
//!   paused past the dead-link timeout, `CLIENT KILL TYPE pubsub`, Redis killed and
//!   restarted with its data (AOF), Redis killed and restarted with its data wiped, one
//!   instance SIGTERMed and restarted.
//!
//! What it checks (non-zero exit — a failed test — on any violation):
//! * every message reaches every witness exactly once, in order (history repairs every
//!   gap) — except inside the window of a Redis that lost its data or an instance
//!   restart; no client ever sees a duplicate or a reordering outside a data loss;
//! * every other client got exactly what its instance's witness got while it was joined,
//!   in the same order (one order per channel);
//! * no reconnect while no fault was injected; the short pause causes none;
//! * RSS and open fds of the instances that were not restarted are flat;
//! * ping flooders and non-readers were cut off while everyone else went on.

#[path = "soak/actors.rs"]
mod actors;
#[path = "soak/check.rs"]
mod check;
#[path = "soak/client.rs"]
mod client;
mod common;

use actors::*;
use common::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn ready(s: &Wsfan) -> bool {
    s.status("/readyz") == 200
}

#[test]
#[ignore = "the chaos soak: run by tests/run-all.sh on its own (see README)"]
fn chaos_soak() {
    let secs: u64 = std::env::var("WSFAN_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
        .max(40);
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let aof_dir = std::env::temp_dir().join(format!("wsfan-soak-aof-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&aof_dir);
    std::fs::create_dir_all(&aof_dir).expect("AOF dir");
    let aof = aof_dir.display().to_string();
    let mut redis = Redis::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &aof,
    ]);
    let url = redis.url();
    let ports: Vec<u16> = (0..INSTANCES).map(|_| free_port()).collect();
    let args = |i: usize| -> Vec<String> {
        [
            "--listen",
            &format!("127.0.0.1:{}", ports[i]),
            "--redis",
            &url,
            "--redis-ping-interval",
            "0.5",
            "--redis-timeout",
            "1",
            "--redis-backoff-max",
            "0.5",
            "--max-outbound-bytes",
            "131072",
            "--ping-interval",
            "5",
            "--handshake-timeout",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let start_instance = |i: usize| {
        let a = args(i);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let s = Wsfan::start(&refs);
        eventually(10.0, "instance ready", || ready(&s));
        s
    };
    let mut inst: Vec<Wsfan> = (0..INSTANCES).map(start_instance).collect();
    let world = Arc::new(World {
        addrs: inst.iter().map(|s| s.addr).collect(),
        redis_port: redis.port,
        generations: (0..INSTANCES).map(|_| AtomicU64::new(0)).collect(),
        stop: AtomicBool::new(false),
        stop_churn: AtomicBool::new(false),
        stop_publishing: AtomicBool::new(false),
        records: Mutex::new(Vec::new()),
        sent: Mutex::new(HashMap::new()),
    });
    let mut threads = Vec::new();
    for i in 0..INSTANCES {
        for ch in 0..CHANNELS {
            let w = world.clone();
            threads.push(std::thread::spawn(move || witness(w, i, ch)));
        }
    }
    eventually(10.0, "witnesses joined", || {
        inst.iter()
            .all(|s| s.metric("wsfan_connections") >= CHANNELS as f64)
    });
    // Publishers: channel 0 busy (two at 100/s), the others at 5–20/s, spread over instances.
    let pubs: [(u32, usize, usize, f64); 7] = [
        (0, 0, 0, 100.0),
        (1, 1, 0, 100.0),
        (2, 2, 1, 20.0),
        (3, 0, 1, 5.0),
        (4, 1, 2, 10.0),
        (5, 2, 3, 5.0),
        (6, 1, 3, 5.0),
    ];
    for (id, i, ch, rate) in pubs {
        let w = world.clone();
        threads.push(std::thread::spawn(move || publisher(w, id, i, ch, rate)));
    }
    let persistent = (INSTANCES * CHANNELS + pubs.len()) as f64;
    let not_ready = Arc::new(Mutex::new(Vec::new()));
    {
        let (w, o) = (world.clone(), not_ready.clone());
        threads.push(std::thread::spawn(move || monitor(w, o)));
    }
    eventually(10.0, "publishers joined", || {
        inst.iter()
            .map(|s| s.metric("wsfan_connections"))
            .sum::<f64>()
            >= persistent
    });
    let baseline: Vec<(u64, usize)> = inst
        .iter()
        .map(|s| (s.rss_kb(), fd_count(s.child.id())))
        .collect();
    let mut churn_threads = Vec::new();
    for seed in 1..=4u64 {
        let w = world.clone();
        churn_threads.push(std::thread::spawn(move || churner(w, seed * 0x9e37_79b9)));
    }
    {
        let w = world.clone();
        churn_threads.push(std::thread::spawn(move || abuser(w)));
        let w = world.clone();
        churn_threads.push(std::thread::spawn(move || deaf(w)));
        let w = world.clone();
        churn_threads.push(std::thread::spawn(move || forger(w)));
    }

    // ---- the fault schedule ----
    let faults = [
        Fault::PauseShort,
        Fault::PauseLong,
        Fault::KillPubsub,
        Fault::RedisRestart,
        Fault::RedisRestartEmpty,
        Fault::InstanceRestart,
    ];
    let mut windows: Vec<Window> = Vec::new();
    let mut violations: Vec<String> = Vec::new();
    let reconnects = |inst: &[Wsfan]| -> Vec<f64> {
        inst.iter()
            .map(|s| s.metric("wsfan_redis_reconnects_total"))
            .collect()
    };
    let mut k = 0;
    let quiet_before_end = Duration::from_secs(10);
    let mut next_fault = started + Duration::from_secs(5);
    let mut quiet_from = (Instant::now(), reconnects(&inst));
    let mut outages: Vec<(Fault, Instant, Instant, Vec<f64>)> = Vec::new();
    while next_fault + Duration::from_secs(4) + quiet_before_end < end {
        while Instant::now() < next_fault {
            std::thread::sleep(Duration::from_millis(20));
        }
        // A quiet period just ended: no reconnect may have happened in it.
        let now_rc = reconnects(&inst);
        quiet_check(&quiet_from, &now_rc, &mut violations);
        let fault = faults[k % faults.len()];
        k += 1;
        let start = Instant::now();
        let rpid = redis
            .child
            .as_ref()
            .map(|c| c.id().to_string())
            .unwrap_or_default();
        let signal = |sig: &str| {
            let _ = std::process::Command::new("kill")
                .args([sig, &rpid])
                .status();
        };
        let mut scope = None;
        match fault {
            Fault::PauseShort => {
                signal("-STOP");
                std::thread::sleep(Duration::from_millis(300));
                signal("-CONT");
            }
            Fault::PauseLong => {
                signal("-STOP");
                std::thread::sleep(Duration::from_millis(2500));
                signal("-CONT");
            }
            Fault::KillPubsub => {
                let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("pubsub")
                    .query(&mut redis.conn());
            }
            Fault::RedisRestart => {
                redis.kill();
                std::thread::sleep(Duration::from_millis(300));
                redis.restart();
            }
            Fault::RedisRestartEmpty => {
                redis.kill();
                let _ = std::fs::remove_dir_all(aof_dir.join("appendonlydir"));
                std::thread::sleep(Duration::from_millis(300));
                redis.restart();
            }
            Fault::InstanceRestart => {
                scope = Some(RESTARTED);
                inst[RESTARTED].signal("TERM");
                let _ = inst[RESTARTED].wait_exit(10.0);
                world.generations[RESTARTED].fetch_add(1, Ordering::SeqCst);
                inst[RESTARTED] = start_instance(RESTARTED);
            }
        }
        let affected: Vec<usize> = match scope {
            Some(i) => vec![i],
            None => (0..INSTANCES).collect(),
        };
        eventually(20.0, "every instance ready after the fault", || {
            affected.iter().all(|&i| ready(&inst[i]))
        });
        let recovered = Instant::now();
        let rc = reconnects(&inst);
        // (A restarted instance starts its counters from zero.)
        let rc_delta: Vec<f64> = (0..INSTANCES)
            .map(|i| (rc[i] - now_rc[i]).max(0.0))
            .collect();
        outages.push((fault, start, recovered, rc_delta.clone()));
        if matches!(fault, Fault::PauseShort) && rc_delta.iter().any(|&d| d > 0.0) {
            violations.push(format!("a 0.3 s pause caused reconnects {rc_delta:?}"));
        }
        windows.push(Window {
            fault,
            start,
            end: recovered + POST_MARGIN,
            scope,
        });
        std::thread::sleep(POST_MARGIN);
        quiet_from = (Instant::now(), reconnects(&inst));
        next_fault = Instant::now() + Duration::from_secs(4);
    }

    // ---- wind down: churn stops, then publishers, then everyone ----
    while Instant::now() + Duration::from_secs(5) < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    world.stop_churn.store(true, Ordering::SeqCst);
    for t in churn_threads {
        t.join().unwrap();
    }
    // Quiet period until the end: no reconnects.
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    quiet_check(&quiet_from, &reconnects(&inst), &mut violations);
    // (Each instance also counts the /metrics request asking, and the monitor.)
    eventually(10.0, "only the persistent clients are left", || {
        inst.iter()
            .map(|s| s.metric("wsfan_connections"))
            .sum::<f64>()
            <= persistent + 2.0 * INSTANCES as f64
    });
    let finals: Vec<(u64, usize)> = inst
        .iter()
        .map(|s| (s.rss_kb(), fd_count(s.child.id())))
        .collect();
    world.stop_publishing.store(true, Ordering::SeqCst);
    let publishing_ended = Instant::now();
    // Everything sent has 2 s to arrive before the witnesses stop.
    std::thread::sleep(Duration::from_secs(3));
    world.stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }

    // ---- checks ----
    let records = std::mem::take(&mut *world.records.lock().unwrap());
    let sent = std::mem::take(&mut *world.sent.lock().unwrap());
    let counts = check::deliveries(
        &records,
        &sent,
        &windows,
        publishing_ended,
        started,
        &mut violations,
    );
    let (delivered, compared, exempt_missing) =
        (counts.delivered, counts.compared, counts.exempt_missing);
    let forged: u32 = records.iter().map(|r| r.forged).sum();
    if forged > 0 {
        violations.push(format!("{forged} forged envelopes delivered"));
    }
    // Resources of the instances that ran throughout.
    let mut resources = Vec::new();
    for i in 0..INSTANCES {
        let (rss0, fd0) = baseline[i];
        let (rss1, fd1) = finals[i];
        resources.push(format!(
            "instance {i}: RSS {rss0} → {rss1} KiB, fds {fd0} → {fd1}"
        ));
        if i != RESTARTED {
            if rss1 > rss0 + 8 * 1024 {
                violations.push(format!("instance {i}: RSS grew {rss0} → {rss1} KiB"));
            }
            if fd1 > fd0 + 2 {
                violations.push(format!("instance {i}: fds grew {fd0} → {fd1}"));
            }
        }
    }
    let mut cut_reasons = BTreeMap::new();
    for s in &inst {
        for (k, v) in s.metrics() {
            if k.starts_with("wsfan_disconnects_total") || k.starts_with("wsfan_history_") {
                *cut_reasons.entry(k).or_insert(0.0) += v;
            }
        }
    }
    let flooders = cut_reasons
        .get("wsfan_disconnects_total{reason=\"rate_limit\"}")
        .copied()
        .unwrap_or(0.0);
    let deaf = cut_reasons
        .get("wsfan_disconnects_total{reason=\"slow_consumer\"}")
        .copied()
        .unwrap_or(0.0);
    if flooders == 0.0 {
        violations.push("no ping flooder was cut off".into());
    }
    if deaf == 0.0 {
        violations.push("no client that never reads was cut off".into());
    }

    println!(
        "== chaos soak: {secs} s, {INSTANCES} instances, {} publishers",
        pubs.len()
    );
    println!("sent {} messages, {} deliveries checked, {} client connections compared with their witness", sent.len(), delivered, compared);
    let since = |t: Instant| t.duration_since(started).as_secs_f64();
    println!("faults injected, and what witnesses missed inside each window (allowed only where Redis lost its data or an instance restarted):");
    for (k, (fault, start, recovered, rc)) in outages.iter().enumerate() {
        println!(
            "  {fault:?} at {:.1} s: all ready {:.2} s later; reconnects per instance {rc:?}; missed {}",
            since(*start),
            recovered.duration_since(*start).as_secs_f64(),
            exempt_missing[k]
        );
    }
    println!("outage windows (/readyz not 200, sampled every 50 ms):");
    for (i, from, to) in not_ready.lock().unwrap().iter() {
        println!(
            "  instance {i}: {:.2} s from {:.1} s",
            to.duration_since(*from).as_secs_f64(),
            since(*from)
        );
    }
    for r in &resources {
        println!("  {r}");
    }
    println!("ping flooders cut (rate_limit): {flooders}; non-readers cut (slow_consumer): {deaf}");
    println!(
        "disconnects and gap repair (all instances; a restarted one from zero): {cut_reasons:?}"
    );
    if violations.is_empty() {
        println!("soak: 0 violations");
    } else {
        for v in violations.iter().take(40) {
            println!("VIOLATION: {v}");
        }
        panic!("{} violations", violations.len());
    }
}

/// The checks themselves can fail: a loss, a duplicate, a reordering, a client missing
/// what its witness got, and another order than the witness's are each reported; a loss
/// inside a fault window is only counted.
#[test]
fn the_soak_checks_report_what_they_should() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut sent = HashMap::new();
    for seq in 0..6u64 {
        sent.insert(
            (1u32, seq),
            Sent {
                at: at(1000 + seq * 100),
                instance: 0,
                channel: 0,
            },
        );
    }
    let record = |role, got: &[u64]| {
        let mut r = Record::new(role, 0, 0, 0);
        r.joined = at(0);
        r.leaving = Some(at(5000));
        r.got = got
            .iter()
            .map(|&s| ((1u32, s), at(1050 + s * 100)))
            .collect();
        r
    };
    let window = |fault| Window {
        fault,
        start: at(1500),
        end: at(1550),
        scope: None,
    };
    let run = |records: Vec<Record>, windows: &[Window]| {
        let mut v = Vec::new();
        let c = check::deliveries(&records, &sent, windows, at(4000), t0, &mut v);
        (v, c.exempt_missing)
    };
    // All good.
    let (v, _) = run(vec![record(Role::Witness, &[0, 1, 2, 3, 4, 5])], &[]);
    assert!(v.is_empty(), "{v:?}");
    // A loss outside any window.
    let (v, _) = run(vec![record(Role::Witness, &[0, 1, 3, 4, 5])], &[]);
    assert!(v.iter().any(|s| s.contains("never got P1:2")), "{v:?}");
    // The same loss inside the window of a Redis that lost its data: counted, not a
    // violation. Inside any other fault's window it is one (history repairs those).
    let lossy = || vec![record(Role::Witness, &[0, 1, 2, 3, 4])];
    let (v, missed) = run(lossy(), &[window(Fault::RedisRestartEmpty)]);
    assert!(v.is_empty(), "{v:?}");
    assert_eq!(missed, [1]);
    for f in [Fault::PauseLong, Fault::KillPubsub, Fault::RedisRestart] {
        let (v, _) = run(lossy(), &[window(f)]);
        assert!(
            v.iter().any(|s| s.contains("never got P1:5")),
            "{f:?}: {v:?}"
        );
    }
    // A duplicate and a reordering.
    let (v, _) = run(vec![record(Role::Witness, &[0, 1, 1, 2, 3, 4, 5])], &[]);
    assert!(v.iter().any(|s| s.contains("P1:1 after P1:1")), "{v:?}");
    let (v, _) = run(vec![record(Role::Witness, &[0, 2, 1, 3, 4, 5])], &[]);
    assert!(v.iter().any(|s| s.contains("P1:1 after P1:2")), "{v:?}");
    // A churning client that closed cleanly but missed what its witness got.
    let w = record(Role::Witness, &[0, 1, 2, 3, 4, 5]);
    let c = record(Role::Churn { with_close: true }, &[0, 1, 3, 4, 5]);
    let (v, _) = run(vec![w, c], &[]);
    assert!(v.iter().any(|s| s.contains("missed P1:2")), "{v:?}");
}

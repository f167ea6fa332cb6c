//! Redis Cluster against one Redis (issue 18's "Measure"): with history on and
//! channels spread over the shards, Redis CPU per publish (summed over the primaries)
//! and wsfan CPU per delivery; and the time from a primary's death to delivery
//! resuming with Redis's default `cluster-node-timeout`.

use crate::common::{self, connect, recv_text, send_text, Cluster, Redis, Ws};

use crate::{proc_cpu, start_wsfan};
use std::time::Instant;

/// `used_cpu_sys + used_cpu_user` of a Redis, in µs.
fn redis_cpu_us(conn: &mut redis::Connection) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query(conn).expect("INFO cpu");
    info.lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum::<f64>()
        * 1e6
}

/// `channels` channels, one client each (publisher and subscriber), `rounds` rounds of
/// one message per channel: (Redis µs per publish, wsfan µs per delivery).
fn run(
    redis_args: &[&str],
    redis_conns: &mut [redis::Connection],
    channels: usize,
    rounds: usize,
) -> (f64, f64) {
    let w = start_wsfan(redis_args);
    common::eventually(20.0, "ready", || w.status("/readyz") == 200);
    let mut clients: Vec<Ws> = (0..channels)
        .map(|i| connect(&w.url(&format!("/ws/spread{i}"))))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        send_text(c, &format!("{i} warm"));
        assert_eq!(recv_text(c), format!("{i} warm"));
    }
    let r0: f64 = redis_conns.iter_mut().map(redis_cpu_us).sum();
    let w0 = proc_cpu(w.child.id());
    let body = "x".repeat(64);
    for _ in 0..rounds {
        for c in clients.iter_mut() {
            send_text(c, &body);
        }
        for c in clients.iter_mut() {
            assert_eq!(recv_text(c).len(), 64);
        }
    }
    let n = (channels * rounds) as f64;
    let redis_us = (redis_conns.iter_mut().map(redis_cpu_us).sum::<f64>() - r0) / n;
    let wsfan_us = (proc_cpu(w.child.id()) - w0) as f64 / 1000.0 / n;
    (redis_us, wsfan_us)
}

pub fn costs(channels: usize, rounds: usize) {
    let single = Redis::start();
    let url = single.url();
    let (r1, w1) = run(&["--redis", &url], &mut [single.conn()], channels, rounds);
    drop(single);
    let cluster = Cluster::start(3);
    let seed = cluster.seed_url();
    let mut conns: Vec<redis::Connection> = cluster
        .primaries()
        .iter()
        .map(|p| cluster.node(*p).conn())
        .collect();
    let (r3, w3) = run(&["--redis-cluster", &seed], &mut conns, channels, rounds);
    report!(
        "cluster: {channels} channels x {rounds} rounds, history on, one instance: Redis CPU per publish {r1:.1} us on one Redis, {r3:.1} us summed over 3 primaries ({:.2}x); wsfan CPU per delivery {w1:.1} us vs {w3:.1} us ({:.2}x)",
        r3 / r1,
        w3 / w1
    );
}

/// A primary killed under Redis's default `cluster-node-timeout` (15 s): seconds until
/// a message on one of its channels is delivered again.
pub fn failover_default_timeout() {
    let mut cluster = Cluster::start_with(3, 15_000);
    let seed = cluster.seed_url();
    let w = start_wsfan(&["--redis-cluster", &seed]);
    common::eventually(20.0, "ready", || w.status("/readyz") == 200);
    let victim = cluster.primaries()[0];
    // A channel the victim serves.
    let ranges = cluster.slot_ranges();
    let ch = (0..)
        .map(|i| format!("fo{i}"))
        .find(|c| {
            let slot = cluster.keyslot(c);
            ranges
                .iter()
                .any(|(s, e, p)| *p == victim && (*s..=*e).contains(&slot))
        })
        .expect("a channel on the victim");
    let mut c = connect(&w.url(&format!("/ws/{ch}")));
    send_text(&mut c, "before");
    assert_eq!(recv_text(&mut c), "before");
    c.get_mut()
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .expect("timeout");
    let others: Vec<u16> = cluster
        .nodes
        .iter()
        .map(|n| n.port)
        .filter(|p| *p != victim)
        .collect();
    cluster.node_mut(victim).kill();
    let t = Instant::now();
    // When the cluster itself has promoted the victim's replica (three masters among
    // the survivors).
    let promoted = std::thread::spawn(move || {
        let master = |p: u16| {
            redis::Client::open(format!("redis://127.0.0.1:{p}"))
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("ROLE").query::<Vec<redis::Value>>(&mut c))
                .is_ok_and(|r| r.first() == Some(&redis::Value::BulkString(b"master".to_vec())))
        };
        while others.iter().filter(|p| master(**p)).count() < 3 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        t.elapsed()
    });
    send_text(&mut c, "after");
    match c.read() {
        Ok(m) => assert_eq!(
            m.into_text().map(|t| t.to_string()).unwrap_or_default(),
            "after"
        ),
        Err(e) => {
            let log = w.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "no delivery {:.1} s after the kill ({e}); wsfan's log ends:\n{}",
                t.elapsed().as_secs_f64(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    let resumed = t.elapsed();
    let promoted = promoted.join().expect("promotion watcher");
    report!(
        "cluster: a primary killed with Redis's default cluster-node-timeout (15 s): the cluster was whole again after {:.1} s, delivery on the dead primary's channel resumed after {:.1} s (wsfan's part {:.1} s; the message sent right after the kill arrived)",
        promoted.as_secs_f64(),
        resumed.as_secs_f64(),
        resumed.as_secs_f64() - promoted.as_secs_f64()
    );
}

//! History costs: publishes/s one Redis sustains through the history script against
//! plain PUBLISH (both pipelined), and the time an instance takes to repair a gap of
//! 1,000 messages on one channel.

use crate::common::{self, connect, recv_text, send_text};
use crate::start_wsfan;
use std::time::Instant;
use wsfan::redis_link::history;

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
    report!(
        "history: one Redis, 64-byte messages, pipelines of 1,000 calls: PUBLISH {:.0}/s; history script, one message per call {:.0}/s ({:.1}x fewer), 16 per call {:.0}/s ({:.1}x fewer)",
        plain,
        scripted,
        plain / scripted,
        batched,
        plain / batched
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

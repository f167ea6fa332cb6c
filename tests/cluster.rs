//! Redis Cluster as the backplane (issue 18): a real 3-primary + 3-replica cluster,
//! sharded Pub/Sub, two instances, channels on every primary; a primary killed.

mod common;
use common::*;
use std::collections::HashMap;

fn instance(cluster: &Cluster) -> Wsfan {
    instance_with(cluster, &[])
}

fn instance_with(cluster: &Cluster, extra: &[&str]) -> Wsfan {
    let url = cluster.seed_url();
    let mut args = vec!["--redis-cluster", url.as_str()];
    args.extend_from_slice(FAST_FAILOVER);
    args.extend_from_slice(extra);
    Wsfan::start(&args)
}

/// One client per channel on `w`.
fn clients(w: &Wsfan, channels: &[String]) -> Vec<Ws> {
    channels
        .iter()
        .map(|c| connect(&w.url(&format!("/ws/{c}"))))
        .collect()
}

/// Channel names whose slots fall on every primary (at least `per` on each).
fn spread(cluster: &Cluster, per: usize) -> Vec<String> {
    let primaries = cluster.primaries();
    let ranges = cluster.slot_ranges();
    let mut by: HashMap<u16, Vec<String>> = HashMap::new();
    for i in 0.. {
        let ch = format!("room{i}");
        let slot = cluster.keyslot(&ch);
        assert_eq!(
            slot,
            cluster.keyslot(&wsfan::backplane::redis::history::keys(&ch).0),
            "a channel's keys share its slot"
        );
        let owner = ranges
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|(_, _, p)| *p)
            .expect("every slot served");
        let v = by.entry(owner).or_default();
        if v.len() < per {
            v.push(ch);
        }
        if by.len() == primaries.len() && by.values().all(|v| v.len() >= per) {
            break;
        }
    }
    let mut all: Vec<String> = by.into_values().flatten().collect();
    all.sort();
    all
}

/// With history off (`--history-size 0`) a publish is a plain `SPUBLISH`: every
/// channel, on every primary, still reaches both instances.
#[test]
fn history_off_publishes_to_shard_channels() {
    let cluster = Cluster::start(3);
    let a = instance_with(&cluster, &["--history-size", "0"]);
    let b = instance_with(&cluster, &["--history-size", "0"]);
    eventually(20.0, "both ready", || {
        a.status("/readyz") == 200 && b.status("/readyz") == 200
    });
    let channels = spread(&cluster, 1);
    for ch in &channels {
        let mut ca = connect(&a.url(&format!("/ws/{ch}")));
        let mut cb = connect(&b.url(&format!("/ws/{ch}")));
        send_text(&mut ca, ch);
        assert_eq!(recv_text(&mut ca), *ch);
        assert_eq!(recv_text(&mut cb), *ch);
    }
}

/// Two instances on one cluster: channels on all three primaries (each subscribed by
/// both instances on its own primary, `PUBSUB SHARDNUMSUB`), every message to every
/// client in order, from either side.
#[test]
fn two_instances_share_channels_on_every_primary() {
    let cluster = Cluster::start(3);
    let a = instance(&cluster);
    let b = instance(&cluster);
    eventually(20.0, "both ready", || {
        a.status("/readyz") == 200 && b.status("/readyz") == 200
    });
    let channels = spread(&cluster, 3);
    let (mut on_a, mut on_b) = (clients(&a, &channels), clients(&b, &channels));
    for round in 0..5 {
        for (i, c) in on_a.iter_mut().enumerate() {
            send_text(c, &format!("{} a{round}", channels[i]));
        }
        for (i, c) in on_b.iter_mut().enumerate() {
            send_text(c, &format!("{} b{round}", channels[i]));
        }
    }
    for (i, ch) in channels.iter().enumerate() {
        for c in [&mut on_a[i], &mut on_b[i]] {
            let got: Vec<String> = (0..10).map(|_| recv_text(c)).collect();
            // Per sender, in order; both senders' messages all there.
            let from_a: Vec<String> = got.iter().filter(|m| m.contains(" a")).cloned().collect();
            let from_b: Vec<String> = got.iter().filter(|m| m.contains(" b")).cloned().collect();
            assert_eq!(
                from_a,
                (0..5).map(|r| format!("{ch} a{r}")).collect::<Vec<_>>()
            );
            assert_eq!(
                from_b,
                (0..5).map(|r| format!("{ch} b{r}")).collect::<Vec<_>>()
            );
        }
    }
    // Both instances subscribe each channel on the primary that serves it.
    for port in cluster.primaries() {
        let n = cluster.shardnumsub(port, &channels);
        assert_eq!(n.iter().filter(|&&k| k == 2).count(), 3, "{port}: {n:?}");
    }
}

/// A primary is killed; its replica takes over (the cluster decides in seconds); both
/// instances follow it: `/readyz` back to 200, and messages on every channel, before
/// and after, reach every client once, in order.
#[test]
fn a_killed_primary_s_replica_takes_over() {
    let mut cluster = Cluster::start(3);
    let a = instance(&cluster);
    let b = instance(&cluster);
    eventually(20.0, "both ready", || {
        a.status("/readyz") == 200 && b.status("/readyz") == 200
    });
    let channels = spread(&cluster, 2);
    let (mut on_a, mut on_b) = (clients(&a, &channels), clients(&b, &channels));
    let everyone = |on_a: &mut [Ws], on_b: &mut [Ws], m: &str| {
        for (i, c) in on_a.iter_mut().enumerate() {
            send_text(c, &format!("{} {m}", channels[i]));
        }
        for i in 0..channels.len() {
            let want = format!("{} {m}", channels[i]);
            assert_eq!(recv_text(&mut on_a[i]), want);
            assert_eq!(recv_text(&mut on_b[i]), want);
        }
    };
    everyone(&mut on_a, &mut on_b, "before");
    let victim = cluster.primaries()[0];
    // Everything so far is on the replica.
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query(&mut cluster.node(victim).conn())
        .expect("WAIT");
    assert_eq!(acked, 1, "the victim's replica has everything");
    cluster.node_mut(victim).kill();
    let t = std::time::Instant::now();
    eventually(30.0, "a replica took over", || {
        cluster.primaries().len() == 3
    });
    eventually(20.0, "both ready again", || {
        a.status("/readyz") == 200 && b.status("/readyz") == 200
    });
    eprintln!(
        "cluster failover: primary killed -> both instances ready {:.1} s",
        t.elapsed().as_secs_f64()
    );
    everyone(&mut on_a, &mut on_b, "after");
    for w in [&a, &b] {
        assert_eq!(w.metric("wsfan_history_missed_total"), 0.0);
        assert_eq!(w.metric("wsfan_history_resets_total"), 0.0);
        assert_eq!(w.metric("wsfan_history_fork_lost_total"), 0.0);
        // The promoted replica may have lacked a tail (it did not here): forked.
        assert!(w.metric("wsfan_history_forks_total") >= 1.0);
    }
}

fn node_id(cluster: &Cluster, port: u16) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut cluster.node(port).conn())
        .expect("MYID")
}

/// Moves `slot` from the primary at `from` to the one at `to` as `redis-cli --cluster
/// reshard` does: IMPORTING / MIGRATING, MIGRATE the keys, then NODE everywhere.
fn migrate_slot(cluster: &Cluster, slot: u16, from: u16, to: u16) {
    let (from_id, to_id) = (node_id(cluster, from), node_id(cluster, to));
    let set = |port: u16, args: &[&str]| {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(args)
            .query(&mut cluster.node(port).conn())
            .expect("SETSLOT");
    };
    set(to, &["IMPORTING", &from_id]);
    set(from, &["MIGRATING", &to_id]);
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query(&mut cluster.node(from).conn())
            .expect("GETKEYSINSLOT");
        if keys.is_empty() {
            break;
        }
        let _: () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query(&mut cluster.node(from).conn())
            .expect("MIGRATE");
    }
    set(to, &["NODE", &to_id]);
    set(from, &["NODE", &to_id]);
    for p in cluster.primaries() {
        if p != from && p != to {
            set(p, &["NODE", &to_id]);
        }
    }
}

/// A busy channel's slot is migrated to another primary while a client publishes on
/// it: both instances follow (the old node drops the shard channel, a topology read
/// sends the channel to the new node's link with its position and unsent publishes),
/// and every client gets every message once, in order.
#[test]
fn a_busy_channel_s_slot_migrates_without_loss_or_duplicates() {
    let cluster = Cluster::start(3);
    let a = instance(&cluster);
    let b = instance(&cluster);
    eventually(20.0, "both ready", || {
        a.status("/readyz") == 200 && b.status("/readyz") == 200
    });
    let ch = "busy";
    let slot = cluster.keyslot(ch);
    let from = cluster.owner(slot);
    let to = *cluster
        .primaries()
        .iter()
        .find(|p| **p != from)
        .expect("another primary");
    let mut on_a = connect(&a.url(&format!("/ws/{ch}")));
    let mut on_b = connect(&b.url(&format!("/ws/{ch}")));
    send_text(&mut on_a, "first");
    assert_eq!(recv_text(&mut on_a), "first");
    assert_eq!(recv_text(&mut on_b), "first");
    const N: usize = 300;
    let url = a.url(&format!("/ws/{ch}"));
    let publisher = std::thread::spawn(move || {
        let mut p = connect(&url);
        for i in 0..N {
            send_text(&mut p, &format!("m{i}"));
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
        p
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    migrate_slot(&cluster, slot, from, to);
    let _p = publisher.join().expect("publisher");
    for c in [&mut on_a, &mut on_b] {
        for i in 0..N {
            assert_eq!(recv_text(c), format!("m{i}"));
        }
    }
    send_text(&mut on_b, "last");
    assert_eq!(recv_text(&mut on_a), "last");
    assert_eq!(recv_text(&mut on_b), "last");
    assert_eq!(cluster.shardnumsub(to, &[ch.to_string()]), vec![2]);
    assert_eq!(cluster.shardnumsub(from, &[ch.to_string()]), vec![0]);
    for w in [&a, &b] {
        assert_eq!(w.metric("wsfan_history_missed_total"), 0.0);
        assert_eq!(w.metric("wsfan_history_resets_total"), 0.0);
        // MIGRATE moved the keys whole: no tail can be missing, no fork.
        assert_eq!(w.metric("wsfan_history_forks_total"), 0.0);
    }
}

/// Bad topology input: a seed that is not in cluster mode and seeds that are down are
/// logged and retried (`/readyz` 503); only a malformed URL exits 2.
#[test]
fn bad_cluster_seeds_are_logged_and_retried() {
    let plain = Redis::start();
    let url = plain.url();
    let mut args = vec!["--redis-cluster", url.as_str()];
    args.extend_from_slice(FAST_FAILOVER);
    let a = Wsfan::start(&args);
    a.wait_log("cluster support disabled", 10.0);
    assert_eq!(a.status("/readyz"), 503);
    let down = format!(
        "redis://127.0.0.1:{},redis://127.0.0.1:{}",
        free_port(),
        free_port()
    );
    let mut args = vec!["--redis-cluster", down.as_str()];
    args.extend_from_slice(FAST_FAILOVER);
    let b = Wsfan::start(&args);
    b.wait_log("no seed node answers with a topology yet", 10.0);
    assert_eq!(b.status("/readyz"), 503);
    for bad in [
        &["--redis-cluster", "http://x"][..],
        &["--redis-cluster", ","][..],
        &["--redis-cluster", "redis://127.0.0.1:1/3"][..],
        &[
            "--redis-cluster",
            "redis://127.0.0.1:1",
            "--redis",
            "redis://127.0.0.1:2",
        ][..],
        &[
            "--redis-cluster",
            "redis://127.0.0.1:1",
            "--channel-prefix",
            "{x}",
        ][..],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsfan"))
            .args(bad)
            .output()
            .expect("wsfan");
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
}

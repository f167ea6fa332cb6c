//! The measurements: idle memory and broadcast, coalescing, throughput.

use crate::common::{self, rss_kb};
use crate::fleet::{client_frame, percentile, Fleet};
use crate::floor::FloorRig;
use crate::{proc_cpu, self_cpu, start_wsfan};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Broadcasts (and raw-write floor rounds) per measurement: medians of this many.
const BROADCAST_ROUNDS: usize = 25;

pub fn idle_and_broadcast(wanted: usize) {
    // wsfan and this process each hold one descriptor per connection.
    let fits = nofile_limit().saturating_sub(1000) / 1000 * 1000;
    let n = wanted.min(fits.max(1000));
    if n < wanted {
        report!(
            "idle memory: {wanted} connections do not fit this machine's open-files limit ({}); \
             measuring {n} instead (raise the hard limit: ulimit -Hn / LimitNOFILE)",
            nofile_limit()
        );
    }
    let p = start_wsfan(&["--max-connections", &(n + 500).to_string()]);
    let (addr, pid) = (p.addr, p.child.id());
    std::thread::sleep(Duration::from_millis(200));
    let rss0 = rss_kb(pid);
    // Connections open in four steps with RSS read after each: bytes per connection
    // should stay flat as the count grows (nothing hidden that grows faster).
    let mut fleet = Fleet::new();
    let mut took = Duration::ZERO;
    let mut steps = Vec::new();
    for step in 1..=4 {
        let upto = n * step / 4;
        took += fleet.connect(addr, "/ws/bcast", upto - fleet.clients.len(), 1000);
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.metric("wsfan_connections") < upto as f64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        let rss = rss_kb(pid);
        steps.push(format!(
            "{upto}: {:.0}",
            (rss.saturating_sub(rss0) * 1024) as f64 / upto as f64
        ));
        if step == 4 {
            report!("handshakes: {n} connections in {:.2} s = {:.0} new WebSocket connections/s (1000 in flight)",
                took.as_secs_f64(), n as f64 / took.as_secs_f64());
            report!("idle memory: RSS {rss0} KiB -> {rss} KiB with {n} open WebSocket connections = {:.0} bytes per connection",
                (rss.saturating_sub(rss0) * 1024) as f64 / n as f64);
        }
    }
    report!(
        "idle memory, bytes per connection by count: {}",
        steps.join(", ")
    );
    let c0 = proc_cpu(pid);
    std::thread::sleep(Duration::from_secs(2));
    report!(
        "idle CPU: {:.3} ms over 2 s with {n} idle connections",
        (proc_cpu(pid) - c0) as f64 / 1e6
    );

    // Broadcast: client 0 sends one 64-byte message; time until all n have it. Each
    // round is paired with a floor round, so both see the same machine conditions.
    let mut floor_rig = FloorRig::new(n);
    let (mut spans, mut cpus, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut floors, mut floor_walls) = (Vec::new(), Vec::new());
    for round in 0..BROADCAST_ROUNDS {
        // Floor before the broadcast on odd rounds, after it on even ones: drift in
        // machine speed during the run falls on both sides equally.
        let floor_first = (round % 2 == 1).then(|| floor_rig.round());
        let payload = format!("{round:064}");
        let frame = client_frame(payload.as_bytes());
        let before = fleet.total_received();
        let cpu0 = proc_cpu(pid);
        let t0 = Instant::now();
        let (mut first, mut last) = (None, None);
        fleet.send(0, &frame);
        let got = Cell::new(0usize);
        fleet.pump(
            Duration::from_secs(20),
            &mut |_, _| {
                got.set(got.get() + 1);
                let now = t0.elapsed();
                first.get_or_insert(now);
                last = Some(now);
            },
            &mut || got.get() >= n,
        );
        let cpu = (proc_cpu(pid) - cpu0) as f64 / 1e6;
        assert_eq!(
            fleet.total_received() - before,
            n as u64,
            "every connection got the broadcast"
        );
        let (floor, wall) = floor_first.unwrap_or_else(|| floor_rig.round());
        cpus.push(cpu);
        floors.push(floor);
        floor_walls.push(wall);
        ratios.push(cpu / floor);
        spans.push((first.unwrap_or_default(), last.unwrap_or_default()));
    }
    drop((floor_rig, fleet, p));
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    spans.sort_by_key(|s| s.1);
    let (f, l) = spans[spans.len() / 2];
    report!(
        "broadcast: one 64-byte message to {n} connections: first after {:.1} ms, last after {:.1} ms \
         (median of {BROADCAST_ROUNDS}; {n} raw writes take {:.1} ms from first to last)",
        f.as_secs_f64() * 1e3,
        l.as_secs_f64() * 1e3,
        median(&mut floor_walls),
    );
    report!(
        "broadcast CPU: server {:.1} ms vs {:.1} ms for {n} raw writes: per-round ratio median {:.2}x \
         (min {:.2}x, max {:.2}x; {BROADCAST_ROUNDS} interleaved rounds)",
        median(&mut cpus),
        median(&mut floors),
        median(&mut ratios),
        ratios[0],
        ratios[ratios.len() - 1],
    );
}

/// The open-files limit after `raise_nofile` (soft = hard where allowed).
fn nofile_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return usize::MAX;
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

pub fn coalescing(clients: usize) {
    let p = start_wsfan(&["--max-connections", &(clients + 100).to_string()]);
    let (addr, pid) = (p.addr, p.child.id());
    let mut fleet = Fleet::new();
    fleet.connect(addr, "/ws/co", clients, 500);
    for k in [1usize, 10, 100] {
        let bursts = (200 / k).max(4);
        let burst: Vec<u8> = (0..k)
            .flat_map(|i| client_frame(format!("{i:032}").as_bytes()))
            .collect();
        let w0 = p.metric("wsfan_write_calls_total");
        let cpu0 = proc_cpu(pid);
        let before = fleet.total_received();
        for _ in 0..bursts {
            let want = fleet.total_received() + (k * clients) as u64;
            fleet.send(0, &burst);
            let got = Cell::new(fleet.total_received());
            fleet.pump(
                Duration::from_secs(20),
                &mut |_, _| got.set(got.get() + 1),
                &mut || got.get() >= want,
            );
            assert!(fleet.total_received() >= want, "burst not delivered");
        }
        let cpu = (proc_cpu(pid) - cpu0) as f64;
        let deliveries = (fleet.total_received() - before) as f64;
        // Subtract the metrics scrape itself (one write).
        let writes = p.metric("wsfan_write_calls_total") - w0 - 1.0;
        report!(
            "coalescing: {k:>3} messages per loop iteration x {clients} clients: {:.1} deliveries per write, \
             {:.2} us server CPU per delivery",
            deliveries / writes.max(1.0),
            cpu / 1e3 / deliveries
        );
    }
}

pub fn throughput(clients: usize, secs: f64, rates: &[u64]) {
    // The tests' private redis-server helper: free port, no persistence, killed on drop.
    let redis = common::Redis::start();
    let redis_pid = redis.child.as_ref().map_or(0, |c| c.id());
    let url = redis.url();
    // WSFAN_BENCH_HISTORY=0: history off, for comparing the cost of history.
    let history = std::env::var("WSFAN_BENCH_HISTORY").unwrap_or_else(|_| "10000".into());
    report!("throughput with --history-size {history}");
    let max = (clients + 100).to_string();
    let args = [
        "--redis",
        &url,
        "--max-connections",
        &max,
        "--history-size",
        &history,
    ];
    let a = start_wsfan(&args);
    let b = start_wsfan(&args);
    for s in [&a, &b] {
        common::eventually(15.0, "instance ready", || s.status("/readyz") == 200);
    }
    let (aa, ba) = (a.addr, b.addr);
    let mut fleet = Fleet::new();
    fleet.connect(aa, "/ws/tp", clients / 2, 500);
    fleet.connect(ba, "/ws/tp", clients - clients / 2, 500);
    let publishers: Vec<usize> = (0..10.min(clients))
        .map(|i| i * clients / 10.min(clients))
        .collect();
    let origin = Instant::now();
    for &rate in rates {
        let before = fleet.total_received();
        let cpus0 = [
            proc_cpu(a.child.id()),
            proc_cpu(b.child.id()),
            proc_cpu(redis_pid),
            self_cpu(),
        ];
        let mut lat: Vec<u64> = Vec::with_capacity((rate as f64 * secs) as usize * clients);
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                let ts = origin.elapsed().as_nanos() as u64;
                let who = publishers[(sent % publishers.len() as u64) as usize];
                fleet.send(who, &client_frame(format!("{ts:020}").as_bytes()));
                sent += 1;
            }
            fleet.pump(
                Duration::from_millis(1),
                &mut |_, p| record(&mut lat, origin, p),
                &mut || false,
            );
        }
        let want = sent * clients as u64;
        let got = Cell::new(fleet.total_received() - before);
        fleet.pump(
            Duration::from_secs(10),
            &mut |_, p| {
                got.set(got.get() + 1);
                record(&mut lat, origin, p)
            },
            &mut || got.get() >= want,
        );
        let elapsed = start.elapsed().as_secs_f64();
        let got = fleet.total_received() - before;
        let cpu = |i: usize, pid: u32| (proc_cpu(pid) - cpus0[i]) as f64;
        let server = cpu(0, a.child.id()) + cpu(1, b.child.id());
        let redis_cpu = cpu(2, redis_pid);
        let gen = (self_cpu() - cpus0[3]) as f64;
        lat.sort_unstable();
        report!(
            "throughput @ {rate} publishes/s x {clients} clients (2 instances + Redis): {:.0} deliveries/s offered, \
             {got}/{want} delivered ({} lost); latency p50 {:.1} ms p99 {:.1} ms p999 {:.1} ms; \
             CPU per delivery: wsfan {:.2} us, redis {:.3} us, load generator {:.2} us",
            want as f64 / secs,
            want.saturating_sub(got),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            server / 1e3 / got.max(1) as f64,
            redis_cpu / 1e3 / got.max(1) as f64,
            gen / 1e3 / got.max(1) as f64,
        );
        let _ = elapsed;
        if got < want || percentile(&lat, 0.99) > 100.0 {
            report!(
                "throughput: stopping the ramp at {rate} publishes/s (loss or p99 over 100 ms)"
            );
            break;
        }
    }
}

fn record(lat: &mut Vec<u64>, origin: Instant, payload: &[u8]) {
    if let Some(ts) = std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        lat.push((origin.elapsed().as_nanos() as u64).saturating_sub(ts));
    }
}

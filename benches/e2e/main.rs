//! End-to-end benchmark: real wsfan processes, a real redis-server, and a single-threaded
//! mio load generator, all on loopback. `cargo bench --bench e2e`.
//!
//! Prints: binary size, RSS per idle connection, idle CPU, handshakes/s, broadcast time
//! to N connections with server CPU against the raw-write floor, coalescing (deliveries
//! per write, CPU per delivery at 1/10/100 messages per loop iteration), and throughput
//! with 2 instances + Redis (deliveries/s, loss, latency p50/p99/p999, CPU per delivery),
//! and history (script publishes/s against PUBLISH, time to repair a 1,000-message gap).
//!
//! Sizes by environment: WSFAN_BENCH_IDLE (10000), WSFAN_BENCH_CLIENTS (1000),
//! WSFAN_BENCH_SECS (5), WSFAN_BENCH_RATES (publishes/s, "200,400,800,1200").
//! WSFAN_BENCH_ONLY=idle|coalescing|throughput|history|protocol|cluster runs one phase (e.g. under
//! `perf record`); WSFAN_BENCH_HISTORY=0 runs the throughput phase with history off
//! (`--history-size 0`) for comparison;
//! WSFAN_BENCH_WRAP="valgrind --tool=callgrind ..." runs wsfan under a tool.
//! Under `cargo test` (no `--bench`) it runs a small smoke version.
//!
//! Files: `fleet` is the load generator (many clients on one mio poll), `floor` the
//! raw-write floor the broadcast is compared with, `phases` the measurements. Starting
//! wsfan and Redis, metrics and /proc readings come from the tests' harness
//! (`tests/common`).

#[path = "../../tests/common/mod.rs"]
mod common;

/// Set in a smoke run (`cargo test`, debug build): its figures are labelled as such.
static SMOKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `println!`, labelled "smoke" when the figures are not a measurement.
macro_rules! report {
    ($($arg:tt)*) => {{
        if crate::SMOKE.load(std::sync::atomic::Ordering::Relaxed) {
            println!("smoke, not a measurement: {}", format_args!($($arg)*));
        } else {
            println!($($arg)*);
        }
    }};
}

mod cluster;
mod fleet;
mod floor;
mod history;
mod phases;
mod protocol;

use common::Wsfan;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (ns) a process or thread has spent running, from schedstat.
fn cpu_ns(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn proc_cpu(pid: u32) -> u64 {
    cpu_ns(&format!("/proc/{pid}/schedstat"))
}

fn self_cpu() -> u64 {
    cpu_ns("/proc/thread-self/schedstat")
}

/// A wsfan for the bench: stopped with SIGTERM (a profiler writes its output), run
/// under `WSFAN_BENCH_WRAP` when set, with keepalive and rate limits out of the way.
fn start_wsfan(extra: &[&str]) -> Wsfan {
    let wrap = std::env::var("WSFAN_BENCH_WRAP").unwrap_or_default();
    let mut args = vec![
        "--ping-interval",
        "3600",
        "--handshake-timeout",
        "60",
        "--max-messages-per-sec",
        "1000000",
        "--max-messages-burst",
        "1000000",
    ];
    args.extend_from_slice(extra);
    Wsfan::start_wrapped(&wrap, &args).graceful()
}

fn main() {
    common::raise_nofile();
    match std::env::var("WSFAN_BENCH_ROLE").as_deref() {
        Ok("floor-writer") => return floor::floor_writer(),
        Ok("floor-reader") => return floor::floor_reader(),
        Ok("history-memory") => return history::memory_child(),
        _ => {}
    }
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        println!("(smoke run under cargo test, debug build: the figures below only show the bench works; `cargo bench --bench e2e` measures)");
        SMOKE.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let bin = env!("CARGO_BIN_EXE_wsfan");
    let size = std::fs::metadata(bin).map(|m| m.len()).unwrap_or(0);
    report!(
        "binary: {bin} is {:.2} MiB",
        size as f64 / (1024.0 * 1024.0)
    );
    let (idle, clients, secs, rates) = if bench {
        let rates: Vec<u64> = std::env::var("WSFAN_BENCH_RATES")
            .unwrap_or_else(|_| "200,400,800,1200".into())
            .split(',')
            .filter_map(|r| r.trim().parse().ok())
            .collect();
        (
            env_or("WSFAN_BENCH_IDLE", 10_000),
            env_or("WSFAN_BENCH_CLIENTS", 1000),
            env_or("WSFAN_BENCH_SECS", 5) as f64,
            rates,
        )
    } else {
        (300, 50, 0.5, vec![100])
    };
    // WSFAN_BENCH_ONLY=idle|coalescing|throughput runs one phase (for profiling).
    let only = std::env::var("WSFAN_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "idle" {
        phases::idle_and_broadcast(idle);
    }
    if only.is_empty() || only == "coalescing" {
        phases::coalescing(clients);
    }
    if only.is_empty() || only == "throughput" {
        phases::throughput(clients, secs, &rates);
    }
    if only.is_empty() || only == "history" {
        let (n, gap) = if bench { (200_000, 1000) } else { (2000, 100) };
        history::history(n, gap);
        let (channels, cap) = if bench {
            (1_000_000, 16 << 20)
        } else {
            (20_000, 1 << 20)
        };
        history::memory(channels, cap);
        let gap = if bench { 1000 } else { 20 };
        history::gap_repair(64, gap);
        history::gap_repair(60_000, gap);
        if bench {
            history::forged_flood(&[10_000, 50_000, 100_000], 3.0);
        } else {
            history::forged_flood(&[1000], 0.3);
        }
    }
    if only.is_empty() || only == "protocol" {
        let (storm, missed, clients, messages) = if bench {
            (
                env_or("WSFAN_BENCH_STORM", 1000),
                1000,
                env_or("WSFAN_BENCH_PROTOCOL_CLIENTS", 1000),
                1000,
            )
        } else {
            (20, 50, 20, 20)
        };
        protocol::recovery_storm(storm, missed);
        protocol::pushes_vs_plain(clients, messages);
    }
    if only.is_empty() || only == "cluster" {
        if bench {
            if std::env::var_os("WSFAN_BENCH_SKIP_COSTS").is_none() {
                cluster::costs(300, 200);
            }
            cluster::failover_default_timeout();
        } else {
            cluster::costs(6, 3);
        }
    }
}

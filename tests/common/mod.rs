//! Test harness: the real `wsfan` binary, real `redis-server` processes on free ports,
//! real WebSocket and HTTP clients over TCP. Waits poll a condition with a deadline.
//! Shared by the integration tests and the end-to-end bench (`benches/e2e`).
//!
//! | module   | owns                                                     |
//! |----------|----------------------------------------------------------|
//! | `wsfan_proc`   | a wsfan process: start, log, signals, metrics, statuses |
//! | `redis_server` | a private redis-server: start, kill, restart, queries   |
//! | `client` | WebSocket and raw HTTP clients                           |
//! | `procs`  | /proc readings (RSS, children) and the open-files limit  |
//! | `dns`    | a fake DNS server for the host-name tests                |
#![allow(dead_code, unused_imports)]

mod client;
mod dns;
mod procs;
mod redis_server;
mod wsfan_proc;

pub use client::*;
pub use dns::FakeDns;
pub use procs::*;
pub use redis_server::{free_cluster_port, Cluster, Redis, Sentinel};
pub use wsfan_proc::Wsfan;

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// wsfan flags that notice a dead Redis link fast and retry fast (test timescales).
pub const FAST_FAILOVER: &[&str] = &[
    "--redis-ping-interval",
    "0.2",
    "--redis-timeout",
    "0.5",
    "--redis-backoff-max",
    "0.3",
];

/// Polls `cond` every 10 ms until it holds or `secs` pass.
pub fn eventually(secs: f64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out after {secs} s waiting for: {what}");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

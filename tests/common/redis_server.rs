//! A private redis-server on a free port (never the machine's shared one).

use super::{eventually, free_port};
use std::process::{Child, Command, Stdio};

/// A private redis-server on its own port; killed on drop.
pub struct Redis {
    pub child: Option<Child>,
    pub port: u16,
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// Starts redis-server on a given (free) port.
    pub fn start_on(port: u16) -> Redis {
        let mut r = Redis {
            child: None,
            port,
            extra: Vec::new(),
        };
        r.restart();
        r
    }

    pub fn start_with(extra: &[&str]) -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart();
        r
    }

    /// (Re)starts redis-server on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see README)");
        self.child = Some(child);
        let port = self.port;
        eventually(10.0, "redis-server answers PING", || {
            // Up when it answers at all (NOAUTH counts: a password is set).
            match redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            {
                Ok(_) => true,
                Err(e) => e.to_string().contains("NOAUTH"),
            }
        });
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the server process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} redis-server");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Channels with at least one subscriber.
    pub fn channels(&self) -> Vec<String> {
        let mut v: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query(&mut self.conn())
            .unwrap();
        v.sort();
        v
    }

    pub fn numsub(&self, channel: &str) -> i64 {
        let v: (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut self.conn())
            .unwrap();
        v.1
    }

    pub fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query(&mut self.conn())
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private Redis Sentinel on a free port watching `master` at `master_port`, quick to
/// decide (down after 1 s); killed on drop, its config file removed.
pub struct Sentinel {
    child: Child,
    pub port: u16,
    conf: std::path::PathBuf,
}

impl Sentinel {
    pub fn start(master: &str, master_port: u16, quorum: u32) -> Sentinel {
        let port = free_port();
        let conf =
            std::env::temp_dir().join(format!("wsfan-sentinel-{}-{port}.conf", std::process::id()));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\n\
                 sentinel monitor {master} 127.0.0.1 {master_port} {quorum}\n\
                 sentinel down-after-milliseconds {master} 1000\n\
                 sentinel failover-timeout {master} 4000\n\
                 sentinel parallel-syncs {master} 1\n"
            ),
        )
        .expect("sentinel config");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see README)");
        let s = Sentinel { child, port, conf };
        eventually(10.0, "sentinel answers PING", || {
            redis::Client::open(s.url())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
        });
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.conf);
    }
}

impl Redis {
    /// Starts redis-server on `port` with extra arguments.
    pub fn start_on_with(port: u16, extra: &[&str]) -> Redis {
        let mut r = Redis {
            child: None,
            port,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart();
        r
    }
}

/// A port that is free, and whose cluster bus port (+10000) is free too (so at most
/// 55535).
pub fn free_cluster_port() -> u16 {
    use std::net::TcpListener;
    // A different sequence per call (tests run in parallel threads of one process).
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut seed =
        (std::process::id() as u64) << 32 ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ nanos | 1;
    for _ in 0..1000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = 20000 + (seed % 35000) as u16;
        let a = TcpListener::bind(("127.0.0.1", port));
        let b = TcpListener::bind(("127.0.0.1", port + 10000));
        if a.is_ok() && b.is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

/// A local Redis Cluster: `primaries` primaries with one replica each, ready
/// (`cluster_state:ok` on every node). A killed primary's replica takes over in a few
/// seconds (`--cluster-node-timeout 2000`).
pub struct Cluster {
    pub nodes: Vec<Redis>,
    dir: std::path::PathBuf,
}

impl Cluster {
    pub fn start(primaries: usize) -> Cluster {
        Self::start_with(primaries, 2000)
    }

    /// `node_timeout_ms`: `--cluster-node-timeout` (Redis's default is 15000).
    pub fn start_with(primaries: usize, node_timeout_ms: u64) -> Cluster {
        let timeout = node_timeout_ms.to_string();
        let dir = std::env::temp_dir().join(format!(
            "wsfan-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let d = dir.to_string_lossy().to_string();
        let mut nodes = Vec::new();
        for _ in 0..primaries * 2 {
            let port = free_cluster_port();
            let conf = format!("nodes-{port}.conf");
            nodes.push(Redis::start_on_with(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--dir",
                    &d,
                    "--cluster-node-timeout",
                    &timeout,
                    "--cluster-replica-validity-factor",
                    "0",
                    "--repl-diskless-load",
                    "on-empty-db",
                ],
            ));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed (see README)");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = Cluster { nodes, dir };
        eventually(30.0, "cluster_state:ok on every node", || {
            c.nodes.iter().all(|n| {
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query::<String>(&mut n.conn())
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            })
        });
        eventually(30.0, "every replica in sync with its primary", || {
            let replicas = c
                .nodes
                .iter()
                .filter(|n| {
                    redis::cmd("INFO")
                        .arg("replication")
                        .query::<String>(&mut n.conn())
                        .is_ok_and(|i| i.contains("master_link_status:up"))
                })
                .count();
            replicas == primaries
        });
        c
    }

    pub fn seed_url(&self) -> String {
        self.nodes[0].url()
    }

    /// Ports of the nodes that are primaries now and serve slots.
    pub fn primaries(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .filter(|n| {
                redis::cmd("ROLE")
                    .query::<Vec<redis::Value>>(&mut n.conn())
                    .is_ok_and(|r| r.first() == Some(&redis::Value::BulkString(b"master".to_vec())))
            })
            .map(|n| n.port)
            .collect()
    }

    pub fn node(&self, port: u16) -> &Redis {
        self.nodes.iter().find(|n| n.port == port).expect("node")
    }

    pub fn node_mut(&mut self, port: u16) -> &mut Redis {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("node")
    }

    /// The slot of a key, as the cluster computes it.
    pub fn keyslot(&self, key: &str) -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.nodes[0].conn())
            .expect("KEYSLOT")
    }

    /// Slot ranges and the port of the primary serving each (`CLUSTER SLOTS`, asked of
    /// a live primary).
    pub fn slot_ranges(&self) -> Vec<(u16, u16, u16)> {
        let port = self.primaries()[0];
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut self.node(port).conn())
            .expect("CLUSTER SLOTS");
        ranges
            .iter()
            .filter_map(|r| match r {
                redis::Value::Array(a) => match (a.first(), a.get(1), a.get(2)) {
                    (
                        Some(redis::Value::Int(s)),
                        Some(redis::Value::Int(e)),
                        Some(redis::Value::Array(n)),
                    ) => match n.get(1) {
                        Some(redis::Value::Int(p)) => Some((*s as u16, *e as u16, *p as u16)),
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    /// The port of the primary serving `slot` now.
    pub fn owner(&self, slot: u16) -> u16 {
        self.slot_ranges()
            .into_iter()
            .find(|(s, e, _)| (*s..=*e).contains(&slot))
            .map(|(_, _, p)| p)
            .expect("every slot served")
    }

    /// Subscribers of each shard channel on the node at `port`.
    pub fn shardnumsub(&self, port: u16, channels: &[String]) -> Vec<i64> {
        let v: Vec<redis::Value> = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(channels)
            .query(&mut self.node(port).conn())
            .expect("SHARDNUMSUB");
        v.chunks(2)
            .map(|kv| match kv.get(1) {
                Some(redis::Value::Int(n)) => *n,
                _ => 0,
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

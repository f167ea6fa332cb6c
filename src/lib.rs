//! wsfan: a single-threaded WebSocket fan-out server that scales out through Redis
//! Pub/Sub.
//!
//! Module map (one concern each). Leaves first: nothing below a line imports anything
//! above it in the same group, and `tests/structure.rs` checks the graph has no circle.
//!
//! | module           | owns                                                            |
//! |------------------|-----------------------------------------------------------------|
//! | [`server`]       | the mio poll loop, one file per stage: `read` (accept, read),   |
//! |                  | `routes` (HTTP, upgrades), `fanout` (queue, write), `lifecycle` |
//! | [`backplane`]    | "everyone else on this channel": the seam (`mod.rs`: the        |
//! |                  | `Backplane` trait, `BusEvent`, `BusStats`; a leaf), `pick` (the |
//! |                  | config's choice), and the two backplanes, file for file:       |
//! |                  | `memory` (standalone, the short example; `memory::history`) and |
//! |                  | `redis` (sans-IO cores `health`, `subs`, `outbox`, `positions`  |
//! |                  | = gap repair; the scripts `history`; the I/O shell `mod`,       |
//! |                  | `wire`; RESP framing with a size cap `resp`; `target` the URL;  |
//! |                  | `topology`: slots, `sentinel`, `cluster` = Redis Cluster as     |
//! |                  | one backplane of shard links)                                   |
//! | [`protocol`]     | client protocols: `Proto` (plain, Centrifugo), `centrifugo` codec |
//! | [`config`]       | every flag declared once (`FLAGS`): default, help, parser       |
//! | [`token`]        | reserved poll tokens, the backplane's range among them (leaf)   |
//! | [`conn`]         | one connection's state and phases                               |
//! | [`hub`]          | sans-IO channel registry (channel ⇄ connections)                 |
//! | [`message`]      | `Epoch`, `StreamPosition`: a message's place in history (leaf)  |
//! | [`envelope`]     | how a message's kind travels inside a Redis payload             |
//! | [`ws`]           | sans-IO WebSocket frame decoding and server frame encoding      |
//! | [`http`]         | sans-IO HTTP request heads and responses                         |
//! | [`outq`]         | per-connection output queue of shared frames (writev)          |
//! | [`static_files`] | the web client, compiled in or from `--static-dir`              |
//! | [`metrics`]      | counters and the Prometheus text page                           |
//! | [`jwt`]          | HS256 token checks for upgrades                                 |
//! | [`logging`]      | log lines to stderr that never block or crash the loop         |
//! | [`limits`]       | raising the open-files limit                                    |
//! | [`listen`]       | the listening socket (`SO_REUSEPORT`)                           |
//! | [`notify`]       | systemd `READY=1` / `STOPPING=1`                                |
//!
//! A new backplane implements [`backplane::Backplane`] (read it and
//! `backplane::memory::LocalBus`), takes tokens from `token`'s backplane range, and is
//! picked in `backplane::pick::from_config`; the loop does not change.

pub mod backplane;
pub mod config;
pub mod conn;
pub mod envelope;
pub mod http;
pub mod hub;
pub mod jwt;
pub mod limits;
pub mod listen;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod outq;
pub mod protocol;
pub mod server;
pub mod static_files;
pub mod token;
pub mod ws;

pub use config::Config;
pub use server::Server;

/// Binds and runs a server until it shuts down (signals READY to systemd when ready).
pub fn run(cfg: Config) -> std::io::Result<()> {
    limits::raise_nofile(cfg.max_connections);
    let mut server = Server::bind(cfg)?;
    server.on_ready(Box::new(|| notify::send("READY=1")));
    server.run()
}

//! The listening socket: non-blocking, optionally `SO_REUSEPORT` so one process per core
//! can share a port (the kernel spreads new connections across them by hash).

use crate::config::Config;
use mio::net::TcpListener;
use socket2::{Domain, Socket, Type};
use std::io;

/// Pending connections the kernel may queue for us (clamped by `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// The listening socket; an error names the address and the flag.
pub fn bind(cfg: &Config) -> io::Result<TcpListener> {
    open(cfg).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {} (--listen): {e}", cfg.listen),
        )
    })
}

fn open(cfg: &Config) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(cfg.listen), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if cfg.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&cfg.listen.into())?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

//! systemd readiness notification (`Type=notify`): one non-blocking datagram to
//! `$NOTIFY_SOCKET`. No daemon and no library: the protocol is a line of `KEY=VALUE` text.

use log::{debug, warn};
use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) if the service manager asked for notifications.
pub fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = UnixDatagram::unbound().and_then(|sock| {
        // Never wait on the service manager from the loop: if its queue is full the
        // notification is dropped (and logged) instead.
        sock.set_nonblocking(true)?;
        if let Some(name) = bytes.strip_prefix(b"@") {
            // Abstract socket namespace.
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), &path)
        }
    });
    match result {
        Ok(_) => debug!("notified service manager: {state}"),
        Err(e) => warn!("could not notify service manager ({state}): {e}"),
    }
}

//! Process limits a connection server needs.

use log::{info, warn};

/// Raises the soft open-files limit to the hard limit (as nginx's
/// `worker_rlimit_nofile` or Go's runtime do): every connection is a file descriptor,
/// and the default soft limit (1024) is far below `--max-connections`.
pub fn raise_nofile(wanted: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let old = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            info!("open files limit raised from {old} to {}", lim.rlim_cur);
        }
    }
    // Listener, Redis links, signal pipe, epoll: a few descriptors beyond the clients.
    if (lim.rlim_cur as usize) < wanted + 16 {
        warn!(
            "open files limit {} is below --max-connections {wanted}: accepts will fail \
             earlier (raise LimitNOFILE / ulimit -n)",
            lim.rlim_cur
        );
    }
}

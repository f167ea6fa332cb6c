//! Log lines to stderr that can neither block nor crash the loop.
//!
//! `simple_logger` (our first choice) writes each line with `eprintln!`: a full pipe
//! blocks the whole loop, and a closed one (`wsfan 2>&1 | head`, a log shipper that
//! restarts) makes `eprintln!` panic, which `panic = "abort"` turns into SIGABRT. It has
//! no hook to change where or how it writes, so this module replaces it with a minimal
//! `log::Log` of the same line format (`LEVEL [target] message`):
//!
//! * stderr is written **non-blocking**: a socket (journald) with
//!   `send(MSG_DONTWAIT | MSG_NOSIGNAL)`; a pipe, FIFO or terminal through a private
//!   descriptor opened from `/proc/self/fd/2` with `O_NONBLOCK` (its own open file
//!   description, so the shell or log shipper sharing ours is not switched to
//!   non-blocking); a regular file with plain `write(2)`, which never waits on a reader.
//! * what the reader does not take at once waits in a buffer of `PENDING_MAX` bytes,
//!   retried on the next line and once per loop iteration (`log::logger().flush()`);
//!   lines that do not fit, and everything once stderr is gone (EPIPE, EBADF), are
//!   dropped and counted (`wsfan_log_lines_dropped_total`), and the next line written
//!   says how many were lost.
//! * a line is at most `MAX_LINE` bytes (the pipe's atomic write size), so lines from
//!   several processes sharing one pipe never interleave mid-line.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::fmt::Write as _;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Bytes of log output kept while stderr's reader is not keeping up.
pub const PENDING_MAX: usize = 64 * 1024;
/// Longest line written (PIPE_BUF: a pipe write up to this size is atomic).
pub const MAX_LINE: usize = 4096;

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped since start (stderr full or gone).
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// How lines reach the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `send` with `MSG_DONTWAIT` (a socket: journald's stream).
    Send,
    /// `write` on a non-blocking descriptor of our own (pipe, FIFO, terminal), or on
    /// a regular file (never waits for a reader).
    Write,
}

struct Sink {
    fd: RawFd,
    mode: Mode,
    /// Bytes not taken by the reader yet (whole lines, bounded by `PENDING_MAX`).
    pending: Vec<u8>,
    /// Lines dropped since the last one that was written (reported in the next).
    unreported: u64,
    /// Set once stderr is gone for good: everything is dropped.
    broken: bool,
}

pub struct Logger {
    level: LevelFilter,
    sink: Mutex<Sink>,
}

/// Installs the logger for stderr at `level` (once per process; later calls are no-ops).
pub fn init(level: LevelFilter) {
    let logger: &'static Logger = Box::leak(Box::new(Logger::for_stderr(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

impl Logger {
    /// A logger on stderr, set up so that writing never blocks.
    pub fn for_stderr(level: LevelFilter) -> Logger {
        let (fd, mode) = open_nonblocking(2);
        Logger::on_fd(fd, mode == Mode::Send, level)
    }

    /// A logger on `fd`, which the caller has made non-blocking (tests).
    pub fn on_fd(fd: RawFd, socket: bool, level: LevelFilter) -> Logger {
        Logger {
            level,
            sink: Mutex::new(Sink {
                fd,
                mode: if socket { Mode::Send } else { Mode::Write },
                pending: Vec::new(),
                unreported: 0,
                broken: false,
            }),
        }
    }
}

/// Picks how to write `fd` without blocking; see the module doc.
fn open_nonblocking(fd: RawFd) -> (RawFd, Mode) {
    // SAFETY: fstat on a descriptor number with a valid out-pointer; a closed fd just
    // fails with EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return (fd, Mode::Write); // closed: every write fails and is counted
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => (fd, Mode::Send),
        libc::S_IFREG | libc::S_IFBLK => (fd, Mode::Write),
        _ => {
            // Pipe, FIFO, terminal: a private open file description of the same object.
            let path = format!("/proc/self/fd/{fd}\0");
            // SAFETY: NUL-terminated path; the result is checked.
            let own = unsafe {
                libc::open(
                    path.as_ptr().cast(),
                    libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
                )
            };
            if own >= 0 {
                return (own, Mode::Write);
            }
            // No /proc: make stderr itself non-blocking (shared with whoever else
            // holds this description, the lesser evil than blocking the loop).
            // SAFETY: fcntl on our descriptor with integer flags.
            unsafe {
                let fl = libc::fcntl(fd, libc::F_GETFL);
                if fl >= 0 {
                    libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
                }
            }
            (fd, Mode::Write)
        }
    }
}

impl Sink {
    /// Writes what is pending until done or the reader is full.
    fn drain(&mut self) {
        while !self.pending.is_empty() && !self.broken {
            let buf = &self.pending;
            // SAFETY: writing from a valid buffer of `buf.len()` bytes to a descriptor.
            let n = unsafe {
                match self.mode {
                    Mode::Send => libc::send(
                        self.fd,
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    ),
                    Mode::Write => libc::write(self.fd, buf.as_ptr().cast(), buf.len()),
                }
            };
            if n > 0 {
                self.pending.drain(..n as usize);
                continue;
            }
            if n == 0 {
                return; // took nothing, said nothing: try again later
            }
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return,
                _ => {
                    // EPIPE, EBADF, ENOSPC…: stderr is gone; stop trying.
                    self.broken = true;
                    self.discard_pending();
                }
            }
        }
        if self.pending.capacity() > PENDING_MAX {
            self.pending.shrink_to(PENDING_MAX);
        }
    }

    fn discard_pending(&mut self) {
        let lines = self.pending.iter().filter(|&&b| b == b'\n').count() as u64;
        self.pending.clear();
        self.drop_lines(lines);
    }

    fn drop_lines(&mut self, n: u64) {
        self.unreported += n;
        DROPPED.fetch_add(n, Ordering::Relaxed);
    }

    fn push_line(&mut self, line: &[u8]) {
        self.drain();
        if self.broken || self.pending.len() + line.len() > PENDING_MAX {
            return self.drop_lines(1);
        }
        if self.unreported > 0 && self.pending.is_empty() {
            let note = format!(
                "WARN  [wsfan::logging] {} log lines dropped (stderr full or gone)\n",
                self.unreported
            );
            self.unreported = 0;
            self.pending.extend_from_slice(note.as_bytes());
        }
        self.pending.extend_from_slice(line);
        self.drain();
    }
}

/// `LEVEL [target] message\n`, cut to `MAX_LINE` bytes (on a char boundary).
pub fn format_line(level: Level, target: &str, args: &std::fmt::Arguments) -> String {
    let mut line = String::with_capacity(128);
    let _ = write!(line, "{:<5} [{}] {}", level, target, args);
    if line.len() > MAX_LINE - 1 {
        let mut cut = MAX_LINE - 4;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line.push('\n');
    line
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format_line(r.level(), r.target(), r.args());
        if let Ok(mut sink) = self.sink.lock() {
            sink.push_line(line.as_bytes());
        }
    }

    /// Retries what is pending (the loop calls this once per iteration).
    fn flush(&self) {
        if let Ok(mut sink) = self.sink.lock() {
            if !sink.pending.is_empty() {
                sink.drain();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Log;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn pipe() -> (std::fs::File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) },
            0
        );
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        }
    }

    fn line(l: &Logger, msg: &str) {
        l.log(
            &Record::builder()
                .level(Level::Info)
                .target("t")
                .args(format_args!("{msg}"))
                .build(),
        );
    }

    #[test]
    fn a_full_pipe_drops_and_counts_then_says_so() {
        let (mut r, w) = pipe();
        let logger = Logger::on_fd(w.as_raw_fd(), false, LevelFilter::Info);
        let before = dropped_lines();
        let long = "x".repeat(1000);
        // 64 KiB of pipe + 64 KiB pending, then drops; never blocks.
        for _ in 0..300 {
            line(&logger, &long);
        }
        let dropped = dropped_lines() - before;
        assert!(dropped > 0, "nothing dropped");
        let pending = logger.sink.lock().unwrap().pending.len();
        assert!(pending <= PENDING_MAX, "{pending}");
        // The reader catches up: pending goes out on flush, then the note.
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        for _ in 0..10 {
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            logger.flush();
        }
        line(&logger, "after");
        while let Ok(n) = r.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8(got).unwrap();
        assert!(text
            .lines()
            .all(|l| l.starts_with("INFO  [t] ") || l.starts_with("WARN ")));
        assert!(text.contains("log lines dropped"), "no note");
        assert!(text.ends_with("INFO  [t] after\n"));
    }

    #[test]
    fn a_closed_pipe_drops_and_counts_without_a_panic() {
        let (r, w) = pipe();
        drop(r);
        let logger = Logger::on_fd(w.as_raw_fd(), false, LevelFilter::Info);
        let before = dropped_lines();
        line(&logger, "one");
        line(&logger, "two");
        assert!(dropped_lines() - before >= 2);
    }

    #[test]
    fn long_lines_are_cut_to_one_atomic_pipe_write() {
        let l = format_line(Level::Warn, "t", &format_args!("{}", "é".repeat(5000)));
        assert!(l.len() <= MAX_LINE, "{}", l.len());
        assert!(l.ends_with("…\n"));
    }
}

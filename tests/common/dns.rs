//! A fake DNS server for the host-name tests.

use super::free_port;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A DNS server on a loopback address of its own (UDP port 53, so root only), for
/// host-name tests: once `answer()` is called it answers every A query with `ips` and
/// AAAA with no records; until then it holds queries unanswered, as a dead DNS server
/// would. `resolv_conf` is a file pointing at it (see `Wsfan::start_with_resolv_conf`).
pub struct FakeDns {
    pub resolv_conf: std::path::PathBuf,
    queries: Arc<std::sync::atomic::AtomicUsize>,
    answer: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeDns {
    /// `None` (and a note on stderr) when not running as root.
    pub fn start(ips: Vec<std::net::Ipv4Addr>) -> Option<FakeDns> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: a private /etc/resolv.conf and port 53 need root");
            return None;
        }
        // One address per test process and server, so parallel tests never collide.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let ip = std::net::Ipv4Addr::new(127, 53, (id % 250) as u8 + 1, (n % 250) as u8 + 1);
        let sock = std::net::UdpSocket::bind((ip, 53)).expect("bind fake DNS");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let resolv_conf =
            std::env::temp_dir().join(format!("wsfan-test-resolv-{id}-{}", free_port()));
        std::fs::write(
            &resolv_conf,
            format!("nameserver {ip}\noptions timeout:30 attempts:1\n"),
        )
        .unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, a, st) = (queries.clone(), answer.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
            let mut buf = [0u8; 1500];
            while !st.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    q.fetch_add(1, Ordering::SeqCst);
                    held.push((buf[..n].to_vec(), from));
                }
                if a.load(Ordering::SeqCst) {
                    for (query, from) in held.drain(..) {
                        if let Some(reply) = dns_reply(&query, &ips) {
                            let _ = sock.send_to(&reply, from);
                        }
                    }
                }
            }
        });
        Some(FakeDns {
            resolv_conf,
            queries,
            answer,
            stop,
            thread: Some(thread),
        })
    }

    pub fn queries(&self) -> usize {
        self.queries.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn answer(&self) {
        self.answer.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.resolv_conf);
    }
}

/// The reply to a DNS query: its question echoed, A records for `ips` if it asks for A.
fn dns_reply(query: &[u8], ips: &[std::net::Ipv4Addr]) -> Option<Vec<u8>> {
    let mut pos = 12;
    while *query.get(pos)? != 0 {
        pos += 1 + *query.get(pos)? as usize;
    }
    let qtype = u16::from_be_bytes([*query.get(pos + 1)?, *query.get(pos + 2)?]);
    let end = pos + 5;
    let mut r = query.get(..end)?.to_vec();
    let answers: &[std::net::Ipv4Addr] = if qtype == 1 { ips } else { &[] };
    r[2] = 0x81; // response, recursion desired
    r[3] = 0x80; // recursion available, no error
    r[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
    r[8..12].copy_from_slice(&[0, 0, 0, 0]);
    for ip in answers {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

//! A connection's output queue: shared frames waiting to be written.
//!
//! Frames are `Bytes` handles, so a broadcast frame is stored once and referenced by
//! every recipient's queue. A flush writes many frames with one `writev`, bounded per call
//! for fairness (Redis's `NET_MAX_WRITES_PER_EVENT` idea).

use bytes::Bytes;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

/// Frames gathered into one `writev` (Linux IOV_MAX is 1024).
const MAX_IOVECS: usize = 128;
/// What one queued frame costs beyond its bytes (its `Bytes` handle in the ring), so a
/// flood of tiny frames (pongs to empty pings) is held to the cap by memory, not by
/// payload bytes alone.
pub const FRAME_OVERHEAD: usize = std::mem::size_of::<Bytes>();

#[derive(Debug, Default)]
pub struct OutQueue {
    /// The front frame, kept inline: a connection with one frame queued (the broadcast
    /// case) needs no allocation. Invariant: `None` only when `rest` is empty too.
    front: Option<Bytes>,
    /// The frames after `front`; allocated only while more than one frame waits.
    rest: VecDeque<Bytes>,
    /// Bytes of the front frame already written (a frame is far below 4 GiB: u32,
    /// so this and `frames` share one word of the per-connection struct).
    head_written: u32,
    /// Unwritten bytes in the queue.
    queued: usize,
    /// Frames in the queue (`front` included).
    frames: u32,
}

/// What a flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything was written.
    All,
    /// The socket would block: wait for WRITABLE.
    Partial,
    /// `max_bytes` were written and more is queued: continue on the next iteration.
    Capped,
}

impl OutQueue {
    pub fn push(&mut self, frame: Bytes) {
        if frame.is_empty() {
            return;
        }
        self.queued += frame.len();
        self.frames += 1;
        if self.front.is_none() {
            self.front = Some(frame);
        } else {
            self.rest.push_back(frame);
        }
    }

    /// Unwritten bytes.
    pub fn len(&self) -> usize {
        self.queued
    }

    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// What the queue holds against `--max-outbound-bytes`: unwritten bytes plus
    /// `FRAME_OVERHEAD` per frame.
    pub fn cost(&self) -> usize {
        self.queued + self.frames as usize * FRAME_OVERHEAD
    }

    /// What queuing `frame_len` more bytes would make the cost.
    pub fn cost_with(frame_len: usize) -> usize {
        frame_len + FRAME_OVERHEAD
    }

    /// Writes until empty, WouldBlock, or `max_bytes` written. Counts write calls and
    /// bytes in `stats`. Errors other than WouldBlock/Interrupted are returned.
    pub fn flush_to<W: Write>(
        &mut self,
        w: &mut W,
        max_bytes: usize,
        stats: &mut WriteStats,
    ) -> io::Result<Flushed> {
        let mut written_total = 0;
        while let Some(front) = &self.front {
            if written_total >= max_bytes {
                return Ok(Flushed::Capped);
            }
            let head = &front[self.head_written as usize..];
            let result = if self.rest.is_empty() {
                // The common broadcast case: one frame, plain write(2).
                w.write(head)
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                slices[0] = IoSlice::new(head);
                let mut n = 1;
                for f in self.rest.iter().take(MAX_IOVECS - 1) {
                    slices[n] = IoSlice::new(f);
                    n += 1;
                }
                w.write_vectored(&slices[..n])
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    stats.writes += 1;
                    stats.bytes += k as u64;
                    written_total += k;
                    self.advance(k);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Partial),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Flushed::All)
    }

    fn advance(&mut self, mut k: usize) {
        self.queued -= k;
        while k > 0 {
            let Some(front) = &self.front else {
                return;
            };
            let left = front.len() - self.head_written as usize;
            if k >= left {
                k -= left;
                self.frames -= 1;
                self.front = self.rest.pop_front();
                self.head_written = 0;
            } else {
                self.head_written += k as u32;
                k = 0;
            }
        }
        if self.rest.is_empty() && self.rest.capacity() > 0 {
            // A burst drained: give the ring back, so an idle connection holds nothing.
            self.rest = VecDeque::new();
        }
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        *self = OutQueue::default();
    }
}

/// Write-side counters, for metrics and benches.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriteStats {
    pub writes: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `cap` bytes per call, then blocks after `calls`.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        calls: usize,
    }
    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.calls == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls -= 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.cap - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_resume_in_order() {
        let mut q = OutQueue::default();
        let shared = Bytes::from_static(b"hello");
        for _ in 0..3 {
            q.push(shared.clone());
        }
        q.push(Bytes::from_static(b"!"));
        assert_eq!(q.len(), 16);
        let mut w = Trickle {
            got: vec![],
            cap: 7,
            calls: 1,
        };
        let mut st = WriteStats::default();
        assert_eq!(
            q.flush_to(&mut w, usize::MAX, &mut st).unwrap(),
            Flushed::Partial
        );
        assert_eq!(q.len(), 9);
        w.calls = 10;
        assert_eq!(
            q.flush_to(&mut w, usize::MAX, &mut st).unwrap(),
            Flushed::All
        );
        assert_eq!(w.got, b"hellohellohello!");
        assert_eq!(st.writes, 3);
        assert!(q.is_empty());
    }

    #[test]
    fn many_frames_go_in_one_write_and_cap_is_respected() {
        let mut q = OutQueue::default();
        for _ in 0..10 {
            q.push(Bytes::from_static(b"abcd"));
        }
        let mut w = Trickle {
            got: vec![],
            cap: 1000,
            calls: 100,
        };
        let mut st = WriteStats::default();
        assert_eq!(
            q.flush_to(&mut w, usize::MAX, &mut st).unwrap(),
            Flushed::All
        );
        assert_eq!(st.writes, 1, "coalesced into one writev");
        for _ in 0..10 {
            q.push(Bytes::from_static(b"abcd"));
        }
        let mut w = Trickle {
            got: vec![],
            cap: 8,
            calls: 100,
        };
        assert_eq!(q.flush_to(&mut w, 16, &mut st).unwrap(), Flushed::Capped);
        assert_eq!(w.got.len(), 16);
    }
}

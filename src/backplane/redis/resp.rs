//! RESP framing in front of the redis crate's parser: a bounded read buffer per link and
//! a scanner that finds where each value ends, so nothing Redis sends can make wsfan
//! allocate without limit. The redis crate still parses every value (handed over whole);
//! this only decides where values end and which ones are too big to keep.
//!
//! A value whose *last* bulk string is larger than the limit (a Pub/Sub message carries
//! its payload last) is skipped as it streams past — counted, never buffered whole, the
//! link stays up. Any other value that cannot fit the buffer is a protocol error (the
//! link reconnects); Redis sends no such value in reply to what wsfan asks.

use std::io::{self, Read};

/// Longest header or simple line (`+OK`, `-ERR ...`, `$123`) accepted.
const MAX_LINE: usize = 64 * 1024;
/// Bytes read per `read(2)` at least (the buffer starts this big and shrinks back).
const READ_CHUNK: usize = 64 * 1024;

/// What the bytes at the start of a buffer hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// One whole value of this many bytes.
    Complete(usize),
    /// Not all of it has arrived.
    Partial,
    /// The value's last bulk string is larger than allowed: drop `header` bytes now and
    /// `skip` more as they arrive; then the value is over.
    Oversize {
        header: usize,
        skip: usize,
    },
    Invalid(&'static str),
}

/// Finds the end of the first RESP2/RESP3 value in `buf`. Bulk strings longer than
/// `max_bulk` are only acceptable as the value's last element (see module doc).
pub fn scan(buf: &[u8], max_bulk: usize) -> Scan {
    let mut pos = 0;
    // Elements still to read: aggregates add their children, every element takes one.
    let mut pending: u64 = 1;
    while pending > 0 {
        let Some(line_end) = find_crlf(&buf[pos..]) else {
            return if buf.len() - pos > MAX_LINE {
                Scan::Invalid("line too long")
            } else {
                Scan::Partial
            };
        };
        if line_end == 0 {
            return Scan::Invalid("empty line");
        }
        let line = &buf[pos + 1..pos + line_end];
        let kind = buf[pos];
        let next = pos + line_end + 2;
        pending -= 1;
        match kind {
            b'+' | b'-' | b':' | b',' | b'#' | b'_' | b'(' => pos = next,
            b'$' | b'!' | b'=' => {
                let Some(len) = parse_len(line) else {
                    return Scan::Invalid("bad bulk length");
                };
                let Ok(len) = usize::try_from(len) else {
                    pos = next; // -1: null bulk string
                    continue;
                };
                if len > max_bulk {
                    return if pending == 0 {
                        Scan::Oversize {
                            header: next,
                            skip: len + 2,
                        }
                    } else {
                        Scan::Invalid("oversized value in the middle of a reply")
                    };
                }
                if buf.len() < next + len + 2 {
                    return Scan::Partial;
                }
                if &buf[next + len..next + len + 2] != b"\r\n" {
                    return Scan::Invalid("bulk string not terminated");
                }
                pos = next + len + 2;
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let Some(n) = parse_len(line) else {
                    return Scan::Invalid("bad aggregate length");
                };
                // -1 is a null aggregate. Saturating: an absurd count only means
                // "Partial" until the buffer is full, which is an error then.
                let n = u64::try_from(n).unwrap_or(0);
                pending = pending.saturating_add(match kind {
                    b'%' => n.saturating_mul(2),
                    // An attribute map is followed by the value it describes.
                    b'|' => n.saturating_mul(2).saturating_add(1),
                    _ => n,
                });
                pos = next;
            }
            _ => return Scan::Invalid("unknown type byte"),
        }
    }
    Scan::Complete(pos)
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn parse_len(line: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(line).ok()?;
    let n: i64 = s.parse().ok()?;
    (n >= -1).then_some(n)
}

/// One link's read buffer. Whole values at its front are "framed" and handed to the
/// redis parser as a reader that ends where they end, so the parser (which reads in
/// chunks and zero-fills 8 KiB per read) sees many values per read and never a partial
/// one.
#[derive(Debug)]
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes at `start` that are whole values not yet read by the parser.
    framed: usize,
    /// Whole values framed and not yet parsed (their bytes may be inside the parser).
    ready: usize,
    /// Bytes of an oversized value still to throw away as they arrive.
    discard: usize,
    /// The buffer never grows past this.
    limit: usize,
    max_bulk: usize,
}

/// What `frame` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Whole values are ready: call `parse_one` until it returns `None`.
    Ready,
    /// An oversized value was dropped (it is being skipped).
    Dropped,
    /// Read more first.
    NeedMore,
}

impl ReadBuf {
    /// `max_bulk`: largest bulk string kept; the buffer holds one such value plus
    /// framing and a read's worth of what follows.
    pub fn new(max_bulk: usize) -> ReadBuf {
        ReadBuf {
            buf: Vec::new(),
            start: 0,
            end: 0,
            framed: 0,
            ready: 0,
            discard: 0,
            limit: max_bulk + 2 * READ_CHUNK,
            max_bulk,
        }
    }

    /// Forgets everything (the connection is gone) and gives memory back.
    pub fn clear(&mut self) {
        *self = ReadBuf::new(self.max_bulk);
    }

    /// Bytes held.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    fn consume(&mut self, n: usize) {
        self.start += n.min(self.end - self.start);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > READ_CHUNK {
                self.buf.truncate(READ_CHUNK);
                self.buf.shrink_to_fit();
            }
        }
    }

    fn apply_discard(&mut self) {
        let d = self.discard.min(self.end - self.start);
        self.discard -= d;
        self.consume(d);
    }

    /// Frames every whole value the buffer holds.
    pub fn frame(&mut self) -> Result<Next, &'static str> {
        if self.framed == 0 {
            self.apply_discard();
            if self.discard > 0 {
                return Ok(Next::NeedMore);
            }
        }
        loop {
            let from = self.start + self.framed;
            match scan(&self.buf[from..self.end], self.max_bulk) {
                Scan::Complete(n) => {
                    self.framed += n;
                    self.ready += 1;
                }
                Scan::Partial => break,
                // Values ahead of it are parsed first; then it is cut out.
                Scan::Oversize { .. } | Scan::Invalid(_) if self.ready > 0 => break,
                Scan::Oversize { header, skip } => {
                    self.consume(header);
                    self.discard = skip;
                    self.apply_discard();
                    return Ok(Next::Dropped);
                }
                Scan::Invalid(why) => return Err(why),
            }
        }
        Ok(if self.ready > 0 {
            Next::Ready
        } else {
            Next::NeedMore
        })
    }

    /// Parses the next framed value, `None` when none is left.
    pub fn parse_one(
        &mut self,
        parser: &mut redis::Parser,
    ) -> Option<redis::RedisResult<redis::Value>> {
        if self.ready == 0 {
            return None;
        }
        self.ready -= 1;
        Some(parser.parse_value(Framed(self)))
    }

    /// One read from `r` into free space (growing the buffer up to its limit).
    /// `Ok(0)` is end of stream; an error of kind `InvalidData` means a value too big
    /// for the buffer that cannot be skipped.
    pub fn fill(&mut self, r: &mut impl Read) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                if self.buf.len() >= self.limit {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("value from redis larger than {} bytes", self.limit),
                    ));
                }
                let grown = (self.buf.len() * 2).clamp(READ_CHUNK, self.limit);
                self.buf.resize(grown, 0);
            }
        }
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

/// The framed bytes as a reader: WouldBlock where they end.
struct Framed<'a>(&'a mut ReadBuf);

impl Read for Framed<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let rb = &mut *self.0;
        let n = out.len().min(rb.framed);
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        out[..n].copy_from_slice(&rb.buf[rb.start..rb.start + n]);
        rb.framed -= n;
        rb.consume(n);
        Ok(n)
    }
}

/// What [`feed`] saw.
#[derive(Debug, Default)]
pub struct Fed {
    /// Every framed value as the redis parser read it, in order.
    pub values: Vec<redis::RedisResult<redis::Value>>,
    /// Oversized values skipped.
    pub dropped: usize,
    /// The most bytes the buffer held at any time.
    pub biggest: usize,
    /// Why framing stopped before the end (invalid input, a value too big to hold).
    pub error: Option<String>,
}

/// Runs `wire` through a [`ReadBuf`] the way a Redis link does, `chunk` bytes per read,
/// parsing every framed value (a parse error starts a fresh parser, as a reconnect
/// would). For tests and fuzzing.
pub fn feed(wire: &[u8], chunk: usize, max_bulk: usize) -> Fed {
    let mut rb = ReadBuf::new(max_bulk);
    let mut parser = redis::Parser::new();
    let mut fed = Fed::default();
    let mut at = 0;
    loop {
        match rb.frame() {
            Ok(Next::Ready) => {
                while let Some(v) = rb.parse_one(&mut parser) {
                    if v.is_err() {
                        parser = redis::Parser::new();
                    }
                    fed.values.push(v);
                }
            }
            Ok(Next::Dropped) => fed.dropped += 1,
            Ok(Next::NeedMore) if at < wire.len() => {
                let mut piece = &wire[at..(at + chunk.max(1)).min(wire.len())];
                match rb.fill(&mut piece) {
                    Ok(n) => at += n,
                    Err(e) => {
                        fed.error = Some(e.to_string());
                        return fed;
                    }
                }
                fed.biggest = fed.biggest.max(rb.capacity());
            }
            Ok(Next::NeedMore) => return fed,
            Err(why) => {
                fed.error = Some(why.to_string());
                return fed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_whole_values_of_every_kind() {
        for v in [
            &b"+OK\r\n"[..],
            b"-ERR no\r\n",
            b":42\r\n",
            b"$5\r\nhello\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*3\r\n$7\r\nmessage\r\n$4\r\nchat\r\n$2\r\nhi\r\n",
            b">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n",
            b"%1\r\n+k\r\n*2\r\n:1\r\n_\r\n",
            b"|1\r\n+ttl\r\n:3\r\n$1\r\nx\r\n",
            b"=7\r\ntxt:abc\r\n",
            b"_\r\n",
            b",1.5\r\n",
            b"#t\r\n",
            b"(12345678901234567890\r\n",
        ] {
            assert_eq!(scan(v, 100), Scan::Complete(v.len()), "{:?}", v);
            let mut more = v.to_vec();
            more.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(scan(&more, 100), Scan::Complete(v.len()));
            for cut in 0..v.len() {
                assert_eq!(scan(&v[..cut], 100), Scan::Partial, "{:?} cut at {cut}", v);
            }
        }
    }

    #[test]
    fn oversized_payload_last_is_skippable_elsewhere_invalid() {
        let msg = b"*3\r\n$7\r\nmessage\r\n$4\r\nchat\r\n$11\r\nhello world\r\n";
        assert_eq!(
            scan(msg, 10),
            Scan::Oversize {
                header: msg.len() - 11 - 2,
                skip: 13
            }
        );
        assert_eq!(scan(&msg[..msg.len() - 5], 10), scan(msg, 10));
        assert!(matches!(
            scan(b"*2\r\n$11\r\nhello world\r\n:1\r\n", 10),
            Scan::Invalid(_)
        ));
        assert!(matches!(scan(b"$x\r\n", 10), Scan::Invalid(_)));
        assert!(matches!(scan(b"$-2\r\n", 10), Scan::Invalid(_)));
        assert!(matches!(scan(b"?\r\n", 10), Scan::Invalid(_)));
        let huge = b"%9223372036854775807\r\n%9223372036854775807\r\n";
        assert_eq!(scan(huge, 10), Scan::Partial);
        // Found by the proptest: an empty line (no type byte) used to panic.
        assert!(matches!(scan(b"\r\n", 10), Scan::Invalid(_)));
        assert!(matches!(scan(b"*2\r\n:1\r\n\r\n", 10), Scan::Invalid(_)));
        assert!(matches!(scan(b"$2\r\nabcd", 10), Scan::Invalid(_)));
        assert!(matches!(scan(&[b'+'; MAX_LINE + 2], 10), Scan::Invalid(_)));
    }

    /// A reader that hands out `chunk` bytes per read, then WouldBlock.
    struct Trickle<'a> {
        data: &'a [u8],
        chunk: usize,
    }
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.data.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.chunk.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut v = format!(
            "*3\r\n$7\r\nmessage\r\n$4\r\nchat\r\n${}\r\n",
            payload.len()
        )
        .into_bytes();
        v.extend_from_slice(payload);
        v.extend_from_slice(b"\r\n");
        v
    }

    #[test]
    fn big_values_are_skipped_in_bounded_memory_at_any_read_size() {
        let mut input = message(b"first");
        input.extend(message(&vec![b'x'; 3_000_000]));
        input.extend(message(&vec![b'y'; 1000]));
        input.extend(b"+PONG\r\n");
        for chunk in [1, 7, 1000, 65536, 10_000_000] {
            let fed = feed(&input, chunk, 1000);
            assert_eq!(fed.error, None, "chunk {chunk}");
            let (dropped, biggest) = (fed.dropped, fed.biggest);
            let values: Vec<redis::Value> =
                fed.values.into_iter().map(|v| v.expect("parses")).collect();
            assert_eq!(dropped, 1, "chunk {chunk}");
            assert_eq!(values.len(), 3, "chunk {chunk}");
            let redis::Value::Array(last_msg) = &values[1] else {
                panic!("{:?}", values[1]);
            };
            assert_eq!(last_msg[2], redis::Value::BulkString(vec![b'y'; 1000]));
            assert_eq!(values[2], redis::Value::SimpleString("PONG".into()));
            assert!(biggest <= 1000 + 2 * READ_CHUNK, "buffer grew to {biggest}");
        }
    }

    #[test]
    fn a_value_that_cannot_fit_is_an_error_not_growth() {
        // 100k small elements: no single bulk is too big, but the whole can't fit.
        let mut input = b"*100000\r\n".to_vec();
        for _ in 0..100_000 {
            input.extend_from_slice(b"$3\r\nabc\r\n");
        }
        let mut rb = ReadBuf::new(1000);
        let mut r = Trickle {
            data: &input,
            chunk: 65536,
        };
        let err = loop {
            assert_eq!(rb.frame(), Ok(Next::NeedMore));
            if let Err(e) = rb.fill(&mut r) {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(rb.capacity() <= 1000 + 2 * READ_CHUNK);
    }
}

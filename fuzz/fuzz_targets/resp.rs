#![no_main]
//! RESP framing (scan + ReadBuf) with the redis parser behind it: any bytes, fed in chunks
//! of 1..32 (first input byte), never panic and never grow the buffer past its limit.
use libfuzzer_sys::fuzz_target;
use wsfan::redis_link::resp::{scan, Next, ReadBuf};
fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let _ = scan(&data[1..], 16);
    let chunk = (data[0] as usize % 32) + 1;
    let wire = &data[1..];
    let mut rb = ReadBuf::new(16);
    let mut parser = redis::Parser::new();
    let mut at = 0;
    loop {
        match rb.frame() {
            Ok(Next::Ready) => {
                while let Some(v) = rb.parse_one(&mut parser) {
                    if v.is_err() {
                        parser = redis::Parser::new();
                    }
                }
            }
            Ok(Next::Dropped) => {}
            Ok(Next::NeedMore) if at < wire.len() => {
                let end = (at + chunk).min(wire.len());
                let mut piece = &wire[at..end];
                match rb.fill(&mut piece) {
                    Ok(n) => at += n,
                    Err(_) => break,
                }
                assert!(rb.capacity() <= 16 + 2 * 64 * 1024);
            }
            _ => break,
        }
    }
});

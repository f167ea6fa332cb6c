#![no_main]
//! RESP framing (scan + ReadBuf) with the redis parser behind it: any bytes, fed in chunks
//! of 1..32 (first input byte), never panic and never grow the buffer past its limit.
use libfuzzer_sys::fuzz_target;
use wsfan::backplane::redis::resp::{feed, scan};
fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let _ = scan(&data[1..], 16);
    let fed = feed(&data[1..], (data[0] as usize % 32) + 1, 16);
    assert!(fed.biggest <= 16 + 2 * 64 * 1024);
});

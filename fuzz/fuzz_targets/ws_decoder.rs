#![no_main]
//! WebSocket frame decoder: any bytes, fed in chunks of 1..64 (first input byte), never
//! panic; consumed never exceeds what was buffered.
use libfuzzer_sys::fuzz_target;
use wsfan::ws::Decoder;
// First byte: chunk size for feeding; rest: the wire.
fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let chunk = (data[0] as usize % 64) + 1;
    let wire = &data[1..];
    let mut d = Decoder::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for piece in wire.chunks(chunk) {
        pending.extend_from_slice(piece);
        match d.decode(&mut pending, 4096, &mut out) {
            Ok(n) => {
                assert!(n <= pending.len());
                pending.drain(..n);
            }
            Err(_) => return,
        }
    }
});

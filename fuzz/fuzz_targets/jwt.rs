#![no_main]
//! JWT checks and the Redis payload envelope: any string is refused (it can't carry our
//! signature) and nothing panics.
use libfuzzer_sys::fuzz_target;
fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        assert!(wsfan::jwt::authorize(Some(s), "secret", "room", 0).is_err());
        let _ = wsfan::envelope::decode(bytes::Bytes::copy_from_slice(data));
    }
});

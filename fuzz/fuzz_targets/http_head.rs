#![no_main]
//! HTTP request-head parser and upgrade routing: any bytes never panic.
use libfuzzer_sys::fuzz_target;
use wsfan::http;
fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = http::parse_head(data) {
        assert!(h.len <= data.len());
        let _ = h.keep_alive();
        let _ = h.content_length();
        let _ = h.upgrade_response();
        let _ = wsfan::server::routes::upgrade_channel(&h.path, "d");
    }
});

//! The `traceparent` header parser: see `localsession_tests::fuzz_headers::traceparent`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| localsession_tests::fuzz_headers::traceparent(data));

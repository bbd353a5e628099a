//! The `CLOUDWEGO_SESSION_CONFIG_KEY` parser and Go durations: see `localsession_tests::fuzz_config`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| localsession_tests::fuzz_config::run(data));

//! Operation sequences over sessions, contexts, slots and a sharded store, against a model: see
//! `localsession_tests::fuzz_ops`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| localsession_tests::fuzz_ops::run(data));

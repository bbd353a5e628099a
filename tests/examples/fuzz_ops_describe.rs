//! Prints the operations a fuzz `ops` input decodes to, then replays it:
//! `cargo run -p localsession-tests --example fuzz_ops_describe -- fuzz/artifacts/ops/crash-…`.
#![allow(missing_docs)]

fn main() {
    for path in std::env::args().skip(1) {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        println!("{path}:\n{}", localsession_tests::fuzz_ops::describe(&data));
        localsession_tests::fuzz_ops::run(&data);
        println!("{path}: passes");
    }
}

//! Replays the fuzz corpora (`fuzz/corpus/<target>/`) and the crash reproducers
//! (`fuzz/regressions/<target>/`, when present) through the fuzz interpreters, as ordinary
//! tests: no nightly, no libFuzzer.
//!
//! A failing reproducer is reported with its file name, and for `ops` with its decoded
//! operations ([`fuzz_ops::describe`]).
#![allow(missing_docs)]

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use localsession_tests::{fuzz_config, fuzz_headers, fuzz_ops};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("fuzz")
}

/// The files of `dir`, sorted; empty if `dir` does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> =
        entries.map(|e| e.expect("readable directory entry").path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

/// Runs every input; panics with the names (and descriptions) of those that failed.
fn replay(files: &[PathBuf], run: fn(&[u8]), describe: fn(&[u8]) -> String) {
    let mut failed = Vec::new();
    for path in files {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(format!("{}\n{}", path.display(), describe(&data)));
        }
    }
    assert!(failed.is_empty(), "{} of {} inputs failed:\n{}", failed.len(), files.len(), failed.join("\n"));
}

fn describe_config(data: &[u8]) -> String {
    format!("input: {:?}", String::from_utf8_lossy(data))
}

#[test]
fn config_corpus() {
    let corpus = files(&fuzz_dir().join("corpus").join("config"));
    assert!(!corpus.is_empty(), "fuzz/corpus/config is empty");
    replay(&corpus, fuzz_config::run, describe_config);
}

#[test]
fn ops_corpus() {
    let corpus = files(&fuzz_dir().join("corpus").join("ops"));
    assert!(!corpus.is_empty(), "fuzz/corpus/ops is empty");
    replay(&corpus, fuzz_ops::run, fuzz_ops::describe);
}

#[test]
fn config_regressions() {
    replay(&files(&fuzz_dir().join("regressions").join("config")), fuzz_config::run, describe_config);
}

#[test]
fn ops_regressions() {
    replay(&files(&fuzz_dir().join("regressions").join("ops")), fuzz_ops::run, fuzz_ops::describe);
}

/// A fuzz target's name and the interpreter that replays its inputs.
type HeaderTarget = (&'static str, fn(&[u8]));

/// The header-parser targets.
const HEADER_TARGETS: [HeaderTarget; 3] = [
    ("baggage", fuzz_headers::baggage),
    ("traceparent", fuzz_headers::traceparent),
    ("metainfo", fuzz_headers::metainfo),
];

#[test]
fn header_corpora() {
    for (target, run) in HEADER_TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target));
        assert!(!corpus.is_empty(), "fuzz/corpus/{target} is empty");
        replay(&corpus, run, describe_config);
    }
}

#[test]
fn header_regressions() {
    for (target, run) in HEADER_TARGETS {
        replay(&files(&fuzz_dir().join("regressions").join(target)), run, describe_config);
    }
}

//! The seed program as a test, with `SessionCtx` and with `SessionMap`: every assertion of the
//! Go program holds in every thread, and every thread reports done before g0.
#![allow(missing_docs)]

use std::sync::{Arc, Mutex};

use localsession_tests::seed::{Kind, run};

fn run_and_collect(kind: Kind) -> Vec<String> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    run(kind, move |line| sink.lock().unwrap().push(line.to_owned()));
    lines.lock().unwrap().clone()
}

fn check(lines: &[String]) {
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines.last().map(String::as_str), Some("g0 done"));
    let mut children: Vec<&str> = lines[..3].iter().map(String::as_str).collect();
    children.sort_unstable();
    assert_eq!(children, ["g1 done", "g2 done", "g3 done"]);
}

#[test]
fn seed_program_with_session_ctx() {
    check(&run_and_collect(Kind::Ctx));
    // The program unbinds at the end: nothing is left on this thread.
    assert!(localsession_std::current().is_none());
}

#[test]
fn seed_program_with_session_map() {
    check(&run_and_collect(Kind::Map));
    assert!(localsession_std::current().is_none());
}

#[test]
fn seed_program_repeatedly_leaves_nothing_behind() {
    for _ in 0..20 {
        check(&run_and_collect(Kind::Ctx));
        check(&run_and_collect(Kind::Map));
    }
}

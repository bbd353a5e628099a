//! The seed program (`localsession-examples`) as a test, with `SessionCtx` and with `SessionMap`:
//! every assertion of the Go program holds in every thread, and the transcript is exactly the same
//! on every run (the threads report to g0, which prints in thread order).

use localsession_examples::seed::{Kind, run};

fn run_and_collect(kind: Kind) -> Vec<String> {
    let mut lines = Vec::new();
    run(kind, |line| lines.push(line.to_owned()));
    lines
}

const CTX: &[&str] = &[
    r#"g0: bound start = session.with_value("a", "b") on the main thread: a = Some("b")"#,
    r#"g1: go() carried g0's session (start) into the new thread: a = Some("b")"#,
    r#"g1: next = current.with_value("c", "d"); the current session is still start: c = None (SessionCtx is immutable: with_value derived a new session)"#,
    r#"g1: bound next on its own thread: c = Some("d")"#,
    r#"g2: go_session(next) carried next into the new thread: a = Some("b"), c = Some("d")"#,
    r#"g3: go() carried g1's current session (still start) into the new thread: a = Some("b"), c = None"#,
    r#"g0: the main thread's session is still start: c = None (g1's with_value and bind changed nothing here)"#,
    r#"g0: session.disable(); start, derived from it, is_valid() = false; g0 releases the threads"#,
    r#"g1 done: next.is_valid() = false, because next derives from the disabled session"#,
    r#"g2 done: its session (next) is_valid() = false, because next derives from the disabled session"#,
    r#"g3 done: its session (start) is_valid() = false, because start derives from the disabled session"#,
    r#"g0 done: every thread saw the disabled session as invalid, and all three have ended"#,
];

fn map_transcript() -> Vec<String> {
    CTX.iter()
        .map(|line| {
            line.replace(
                "c = None (SessionCtx is immutable: with_value derived a new session)",
                r#"c = Some("d") (SessionMap is shared: with_value updated the map every holder sees)"#,
            )
            .replace(r#"a = Some("b"), c = None"#, r#"a = Some("b"), c = Some("d")"#)
            .replace(
                "c = None (g1's with_value and bind changed nothing here)",
                r#"c = Some("d") (the map is shared, so g1's with_value is visible here)"#,
            )
        })
        .collect()
}

#[test]
fn seed_program_with_session_ctx() {
    assert_eq!(run_and_collect(Kind::Ctx), CTX);
    // The program unbinds at the end: nothing is left on this thread.
    assert!(localsession_std::current().is_none());
}

#[test]
fn seed_program_with_session_map() {
    assert_eq!(run_and_collect(Kind::Map), map_transcript());
    assert!(localsession_std::current().is_none());
}

#[test]
fn seed_program_repeatedly_prints_the_same_and_leaves_nothing_behind() {
    let map = map_transcript();
    for _ in 0..20 {
        assert_eq!(run_and_collect(Kind::Ctx), CTX);
        assert_eq!(run_and_collect(Kind::Map), map);
    }
    assert!(localsession_std::current().is_none());
}

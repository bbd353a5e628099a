//! A proptest model of a hooked unit's bindings (`ThreadStore::enter_unit` / `exit_unit` and its
//! `BindSink`), as the tokio adapter's implicit mode drives them: polls of one unit (task 1)
//! that bind, read and open scopes, a task of another executor running inside a poll and
//! binding (task 2: a plain `LocalSet` task under `block_in_place`), and
//! `reset_default_manager` at any point. Checked against a sequential model after every step:
//! - the unit reads its own latest binding, except after another task bound inside its poll
//!   (then nothing, for the rest of that poll) or after a reset (nothing);
//! - a scope of the unit that closes over another task's binding leaves the unit's record empty
//!   (the documented loss: the unit's binding from before that task bound is not kept);
//! - the unit's record never holds another task's binding, and never a binding from before a
//!   reset (its next poll would install it);
//! - between polls the thread has nothing bound.

use std::cell::Cell;
use std::sync::Mutex;

use localsession_core::{AnySession, ContextStore, SessionMap};
use localsession_std::{
    BindSink, ManagerOptions, THREAD_STORE, bind, current, register_reset_hook, register_task_probe,
    reset_default_manager, scope,
};
use proptest::prelude::*;

thread_local! {
    /// The task the probe reports: 0 (none), 1 (the hooked unit) or 2 (a task inside its poll).
    static RUNNING: Cell<u64> = const { Cell::new(0) };
}

fn probe() -> u64 {
    RUNNING.with(Cell::get)
}

/// The unit's record (the tokio adapter's table entry).
static RECORD: Mutex<Option<AnySession>> = Mutex::new(None);

fn record(unit: u64, session: Option<&AnySession>) -> Option<AnySession> {
    assert_eq!(unit, 1, "only the hooked unit has a sink");
    std::mem::replace(&mut *RECORD.lock().unwrap(), session.cloned())
}

/// The adapter's reset hook: the record is from before the reset.
fn clear_record() {
    drop(RECORD.lock().unwrap().take());
}

fn value_of(s: Option<&AnySession>) -> Option<u64> {
    s.and_then(|s| s.value_cloned::<u64, _>(&"v"))
}

fn session(v: u64) -> AnySession {
    SessionMap::new().with_value("v", v).into()
}

#[derive(Clone, Debug)]
enum Op {
    Poll(Vec<InPoll>),
    Reset,
}

#[derive(Clone, Debug)]
enum InPoll {
    Bind(u64),
    ForeignBind(u64),
    Read,
    Scope(u64),
    Reset,
}

fn in_poll() -> impl Strategy<Value = InPoll> {
    prop_oneof![
        4 => (0u64..100).prop_map(InPoll::Bind),
        2 => (100u64..200).prop_map(InPoll::ForeignBind),
        4 => Just(InPoll::Read),
        2 => (200u64..300).prop_map(InPoll::Scope),
        1 => Just(InPoll::Reset),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec(in_poll(), 0..8).prop_map(Op::Poll),
        1 => Just(Op::Reset),
    ]
}

fn reset() {
    reset_default_manager(ManagerOptions::default()).unwrap();
}

fn run(ops: &[Op]) {
    // The model: the unit's record, and what the unit reads inside its poll.
    let mut model_record: Option<u64> = value_of(RECORD.lock().unwrap().as_ref());
    for op in ops {
        match op {
            Op::Reset => {
                reset();
                model_record = None;
            }
            Op::Poll(steps) => {
                // Before-poll: the generation first, then the record.
                RUNNING.with(|r| r.set(1));
                let read_at = THREAD_STORE.generation();
                let mut installed = RECORD.lock().unwrap().clone();
                let (scope_token, stale) =
                    THREAD_STORE.enter_unit(&mut installed, read_at, BindSink { unit: 1, record }).unwrap();
                drop(stale);
                let mut visible = model_record;
                // Whether the slot holds task 2's binding (the unit reads nothing then).
                let mut foreign_in_slot = false;
                for step in steps {
                    match *step {
                        InPoll::Bind(v) => {
                            bind(session(v)).unwrap();
                            model_record = Some(v);
                            visible = Some(v);
                            foreign_in_slot = false;
                        }
                        InPoll::ForeignBind(v) => {
                            RUNNING.with(|r| r.set(2));
                            bind(session(v)).unwrap();
                            assert_eq!(value_of(current().as_ref()), Some(v), "task 2 reads its own bind");
                            RUNNING.with(|r| r.set(1));
                            visible = None;
                            foreign_in_slot = true;
                        }
                        InPoll::Read => {}
                        InPoll::Scope(v) => {
                            let inside = scope(session(v), || {
                                let record = value_of(RECORD.lock().unwrap().as_ref());
                                (value_of(current().as_ref()), record)
                            });
                            assert_eq!(inside, (Some(v), Some(v)), "(the unit's read, its record) inside the scope");
                            if foreign_in_slot {
                                model_record = None;
                            }
                        }
                        InPoll::Reset => {
                            reset();
                            model_record = None;
                            visible = None;
                            foreign_in_slot = false;
                        }
                    }
                    assert_eq!(value_of(current().as_ref()), visible, "the unit's read after {step:?}");
                    assert_eq!(
                        value_of(RECORD.lock().unwrap().as_ref()),
                        model_record,
                        "the unit's record after {step:?}"
                    );
                }
                // After-poll.
                let stale = THREAD_STORE.exit_unit(&mut installed, scope_token);
                drop((stale, installed));
                RUNNING.with(|r| r.set(0));
                assert_eq!(value_of(current().as_ref()), None, "the thread between polls");
            }
        }
        assert!(
            value_of(RECORD.lock().unwrap().as_ref()).is_none_or(|v| v < 100),
            "the record holds another task's or a scope's binding"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 8 } else { 256 }, ..ProptestConfig::default() })]
    #[test]
    fn a_hooked_units_bindings_follow_the_model(ops in prop::collection::vec(op(), 1..12)) {
        assert!(register_task_probe(probe));
        register_reset_hook(clear_record);
        run(&ops);
    }
}

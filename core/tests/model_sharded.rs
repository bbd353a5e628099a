//! Model-based property tests for [`ShardedStore`] (arc-swap's `tests/random.rs` pattern), and
//! the ported Go GC test.
//!
//! The model is a `HashMap` from unit id to the index of a session in a small pool. The pool
//! mixes `SessionCtx`s and `SessionMap`s whose validity scopes are related (a `with_value`
//! sibling shares a scope, a fork and a map opened under a session's context sit below it), so
//! `disable` invalidates more than one pool entry and `gc` must see it. Every lookup compares
//! the session's identity (`AnySession::ptr_eq`) with the pool entry the model says is bound.
//! Plain tests check that user code (`is_valid` of a user session, the drop of a removed one,
//! a `retain` predicate) runs with no shard locked, and that a panicking `is_valid` leaves the
//! store usable.

#![allow(missing_docs)]

use std::any::Any;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Duration;

use localsession_core::{
    AnySession, Context, ContextStore, DynKey, KeyQuery, ManagerOptions, Session, SessionCtx, SessionMap, ShardedStore,
    with_current_in,
};
use proptest::prelude::*;

/// Runs crossbeam-epoch's pending deferred destructions (the old chains a compaction released)
/// when a test ends, so that their drop code runs — under miri too — instead of outliving the
/// process in the collector's queue. Several pins: an epoch advances one step per collection.
struct Quiesce;

impl Drop for Quiesce {
    fn drop(&mut self) {
        for _ in 0..8 {
            localsession_core::EpochGuard::pin(&localsession_core::EpochHandle::register()).flush();
        }
    }
}

/// Unit ids are below this.
const IDS: u64 = 20;

fn new_store(shards: usize) -> ShardedStore {
    ShardedStore::new(ManagerOptions { shard_number: shards, ..Default::default() }, || None).unwrap()
}

/// The session pool and the validity scopes of its entries.
struct Pool {
    sessions: Vec<AnySession>,
    /// Per entry: its scope.
    scope_of: Vec<usize>,
    /// Per scope: itself, then its ancestors.
    scope_paths: Vec<Vec<usize>>,
}

/// Six sessions, pairwise different (`ptr_eq`), with related scopes:
/// 0 `SessionCtx` (scope 0), 1 its `with_value` (scope 0), 2 its fork (scope 1, under 0),
/// 3 a `SessionMap` (scope 2), 4 a `SessionMap` opened under 0's context (scope 3, under 0),
/// 5 an unrelated `SessionCtx` (scope 4).
fn pool() -> Pool {
    let s0 = SessionCtx::new(&Context::background());
    let s1 = s0.with_value("k", 1u32);
    let s2 = s0.fork();
    let m3 = SessionMap::new().with_value("k", 3u32);
    let m4 = SessionMap::new_in(s0.context());
    let s5 = SessionCtx::new(&Context::background());
    Pool {
        sessions: vec![s0.into(), s1.into(), s2.into(), m3.into(), m4.into(), s5.into()],
        scope_of: vec![0, 0, 1, 2, 3, 4],
        scope_paths: vec![vec![0], vec![1, 0], vec![2], vec![3, 0], vec![4]],
    }
}

#[derive(Debug, Clone)]
enum Op {
    Bind {
        id: u64,
        session: usize,
    },
    Remove {
        id: u64,
    },
    Get {
        id: u64,
    },
    Disable {
        session: usize,
    },
    /// `gc()`, or `gc_with(AnySession::is_valid)`.
    Gc {
        with: bool,
    },
    /// `retain(|id, _| id % modulus != 0)`.
    Retain {
        modulus: u64,
    },
    /// Like `Retain`, but the predicate rebinds every id it rejects to `session` first: an id
    /// rebound to another session must survive (only the session that was judged is removed).
    RetainRebinding {
        modulus: u64,
        session: usize,
    },
    Len,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..IDS, 0..6usize).prop_map(|(id, session)| Op::Bind { id, session }),
        2 => (0..IDS).prop_map(|id| Op::Remove { id }),
        2 => (0..IDS).prop_map(|id| Op::Get { id }),
        2 => (0..6usize).prop_map(|session| Op::Disable { session }),
        2 => any::<bool>().prop_map(|with| Op::Gc { with }),
        1 => (1..6u64).prop_map(|modulus| Op::Retain { modulus }),
        1 => (1..6u64, 0..6usize).prop_map(|(modulus, session)| Op::RetainRebinding { modulus, session }),
        1 => Just(Op::Len),
    ]
}

#[derive(Debug, Default)]
struct Model {
    bound: HashMap<u64, usize>,
    /// Per scope: disabled explicitly.
    disabled: Vec<bool>,
}

impl Model {
    fn valid(&self, pool: &Pool, session: usize) -> bool {
        !pool.scope_paths[pool.scope_of[session]].iter().any(|&s| self.disabled[s])
    }
}

/// `got` is the pool entry `want` (by identity), and no other entry.
fn same_session(pool: &Pool, got: Option<&AnySession>, want: Option<usize>, what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.is_some(), want.is_some(), "{}: presence", what);
    if let (Some(got), Some(want)) = (got, want) {
        for (j, s) in pool.sessions.iter().enumerate() {
            prop_assert_eq!(got.ptr_eq(s), j == want, "{}: identity against pool entry {} (want {})", what, j, want);
        }
    }
    Ok(())
}

fn apply(op: &Op, store: &ShardedStore, pool: &Pool, model: &mut Model) -> Result<(), TestCaseError> {
    match *op {
        Op::Bind { id, session } => {
            let prev = store.bind(id, pool.sessions[session].clone());
            let want = model.bound.insert(id, session);
            same_session(pool, prev.as_ref(), want, "bind's previous session")?;
        }
        Op::Remove { id } => {
            let got = store.remove(id);
            let want = model.bound.remove(&id);
            same_session(pool, got.as_ref(), want, "remove")?;
        }
        Op::Get { id } => {
            same_session(pool, store.get(id).as_ref(), model.bound.get(&id).copied(), "get")?;
        }
        Op::Disable { session } => {
            let got = pool.sessions[session].disable();
            let want = model.valid(pool, session);
            model.disabled[pool.scope_of[session]] = true;
            prop_assert_eq!(got, want, "disable() of pool entry {}", session);
        }
        Op::Gc { with } => {
            let got = if with { store.gc_with(AnySession::is_valid) } else { store.gc() };
            let before = model.bound.len();
            let bound = std::mem::take(&mut model.bound);
            model.bound = bound.into_iter().filter(|&(_, s)| model.valid(pool, s)).collect();
            prop_assert_eq!(got, before - model.bound.len(), "gc() count");
        }
        Op::Retain { modulus } => {
            let mut seen = Vec::new();
            let mut wrong = Vec::new();
            let got = store.retain(|id, s| {
                seen.push(id);
                if !model.bound.get(&id).is_some_and(|&want| s.ptr_eq(&pool.sessions[want])) {
                    wrong.push(id);
                }
                id % modulus != 0
            });
            seen.sort_unstable();
            let mut want_seen: Vec<u64> = model.bound.keys().copied().collect();
            want_seen.sort_unstable();
            prop_assert_eq!(seen, want_seen, "retain visits every bound id once");
            prop_assert!(wrong.is_empty(), "retain was shown the wrong session for ids {:?}", wrong);
            let before = model.bound.len();
            model.bound.retain(|id, _| id % modulus != 0);
            prop_assert_eq!(got, before - model.bound.len(), "retain() count");
        }
        Op::RetainRebinding { modulus, session } => {
            let got = store.retain(|id, _| {
                if id % modulus == 0 {
                    store.bind(id, pool.sessions[session].clone());
                    false
                } else {
                    true
                }
            });
            let mut removed = 0;
            let bound = std::mem::take(&mut model.bound);
            for (id, s) in bound {
                if id % modulus != 0 {
                    model.bound.insert(id, s);
                } else if s == session {
                    // Rebound to the very session that was judged: still that session, removed.
                    removed += 1;
                } else {
                    model.bound.insert(id, session);
                }
            }
            prop_assert_eq!(got, removed, "retain() count with rebinding");
        }
        Op::Len => {
            prop_assert_eq!(store.len(), model.bound.len(), "len()");
        }
    }
    Ok(())
}

fn check(store: &ShardedStore, pool: &Pool, model: &Model, shards: usize) -> Result<(), TestCaseError> {
    for id in 0..IDS {
        same_session(pool, store.get(id).as_ref(), model.bound.get(&id).copied(), &format!("get({id})"))?;
    }
    prop_assert_eq!(store.len(), model.bound.len(), "len()");
    prop_assert_eq!(store.is_empty(), model.bound.is_empty(), "is_empty()");
    let mut want_lens = vec![0; shards];
    for &id in model.bound.keys() {
        want_lens[(id % shards as u64) as usize] += 1;
    }
    prop_assert_eq!(store.shard_lens(), want_lens, "shard_lens() (id i lives in shard i % shards)");
    for (i, s) in pool.sessions.iter().enumerate() {
        prop_assert_eq!(s.is_valid(), model.valid(pool, i), "pool entry {} is_valid", i);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    /// Random binds, removes, disables, sweeps and retains against a `HashMap` model.
    #[test]
    fn sharded_store_matches_model(ops in prop::collection::vec(op(), 1..60), shards in 1..8usize) {
        let _quiesce = Quiesce;
        let store = new_store(shards);
        let pool = pool();
        let mut model = Model { bound: HashMap::new(), disabled: vec![false; pool.scope_paths.len()] };
        check(&store, &pool, &model, shards)?;
        for op in &ops {
            apply(op, &store, &pool, &mut model)?;
            check(&store, &pool, &model, shards)?;
        }
    }
}

/// Operations on the store's [`ContextStore`] face, where the running unit is named by an id
/// function.
#[derive(Debug, Clone)]
enum FaceOp {
    /// Makes `id` the running unit (`None`: outside any unit).
    Enter(Option<u64>),
    /// `replace(Some(pool[session]))` or `replace(None)`.
    Replace(Option<usize>),
    /// `with_current`.
    Current,
    Bind {
        id: u64,
        session: usize,
    },
    Remove {
        id: u64,
    },
}

fn face_op() -> impl Strategy<Value = FaceOp> {
    prop_oneof![
        2 => prop::option::weighted(0.8, 0..6u64).prop_map(FaceOp::Enter),
        3 => prop::option::weighted(0.7, 0..6usize).prop_map(FaceOp::Replace),
        2 => Just(FaceOp::Current),
        2 => (0..6u64, 0..6usize).prop_map(|(id, session)| FaceOp::Bind { id, session }),
        1 => (0..6u64).prop_map(|id| FaceOp::Remove { id }),
    ]
}

const NO_UNIT: u64 = u64::MAX;

proptest! {
    #![proptest_config(ProptestConfig::default())]

    /// `ContextStore::replace` / `with_current` act on the unit the id function names, and on
    /// nothing (an error that hands the session back) when it names none.
    #[test]
    fn context_store_face_matches_model(ops in prop::collection::vec(face_op(), 1..60), shards in 1..4usize) {
        let _quiesce = Quiesce;
        let unit = Arc::new(AtomicU64::new(NO_UNIT));
        let id_fn = {
            let unit = unit.clone();
            move || Some(unit.load(Ordering::Relaxed)).filter(|&u| u != NO_UNIT)
        };
        let store = ShardedStore::new(ManagerOptions { shard_number: shards, ..Default::default() }, id_fn).unwrap();
        let pool = pool();
        let mut bound: HashMap<u64, usize> = HashMap::new();
        let mut current: Option<u64> = None;
        for op in &ops {
            match *op {
                FaceOp::Enter(id) => {
                    unit.store(id.unwrap_or(NO_UNIT), Ordering::Relaxed);
                    current = id;
                }
                FaceOp::Replace(session) => {
                    let got = store.replace(session.map(|s| pool.sessions[s].clone()));
                    match current {
                        None => {
                            let Err(err) = got else {
                                return Err(TestCaseError::fail("replace outside any unit succeeded"));
                            };
                            same_session(&pool, err.into_session().as_ref(), session, "session handed back")?;
                        }
                        Some(id) => {
                            let Ok(prev) = got else {
                                return Err(TestCaseError::fail("replace inside a unit failed"));
                            };
                            let want = match session {
                                Some(s) => bound.insert(id, s),
                                None => bound.remove(&id),
                            };
                            same_session(&pool, prev.as_ref(), want, "replace's previous session")?;
                        }
                    }
                }
                FaceOp::Current => {}
                FaceOp::Bind { id, session } => {
                    store.bind(id, pool.sessions[session].clone());
                    bound.insert(id, session);
                }
                FaceOp::Remove { id } => {
                    store.remove(id);
                    bound.remove(&id);
                }
            }
            let want = current.and_then(|id| bound.get(&id).copied());
            let mut res = Ok(());
            store.with_current(&mut |cur| res = same_session(&pool, cur, want, "with_current"));
            res?;
            with_current_in(&store, |cur| same_session(&pool, cur, want, "with_current_in"))?;
            prop_assert_eq!(store.len(), bound.len());
        }
    }
}

/// Go's `TestSessionManager_GC`: 10 shards, 1000 sessions bound to ids 0..1000, the odd ones
/// disabled; 100 per shard before the sweep, 500 left after it.
///
/// Id `i` lives in shard `i % 10`, so every id in a shard has the shard's parity: after the
/// sweep the even shards keep their 100 sessions and the odd shards are empty (Go's test only
/// checks the total).
#[test]
fn go_gc_counts() {
    let _quiesce = Quiesce;
    let store = new_store(10);
    let mut sessions = Vec::new();
    for i in 0..1000u64 {
        let s = SessionMap::new();
        store.bind(i, s.clone());
        if i % 2 == 1 {
            assert!(s.disable());
        }
        sessions.push(s);
    }
    assert_eq!(store.shard_lens(), vec![100; 10]);
    assert_eq!(store.len(), 1000);
    assert_eq!(store.gc(), 500);
    assert_eq!(store.len(), 500);
    let want: Vec<usize> = (0..10).map(|shard| if shard % 2 == 0 { 100 } else { 0 }).collect();
    assert_eq!(store.shard_lens(), want);
    for i in 0..1000u64 {
        assert_eq!(store.get(i).is_some(), i % 2 == 0, "id {i}");
    }
    // A second sweep finds nothing.
    assert_eq!(store.gc(), 0);

    // The same with `SessionCtx`s and ids spread so that every shard holds both kinds.
    let store = new_store(10);
    for i in 0..1000u64 {
        let s = SessionCtx::new(&Context::background());
        store.bind(i, s.clone());
        if (i / 10) % 2 == 1 {
            s.disable();
        }
    }
    assert_eq!(store.shard_lens(), vec![100; 10]);
    assert_eq!(store.gc(), 500);
    assert_eq!(store.len(), 500);
    assert_eq!(store.shard_lens(), vec![50; 10]);
}

/// A user session whose `is_valid` panics.
struct Panicky;

impl Session for Panicky {
    fn is_valid(&self) -> bool {
        panic!("user is_valid panicked");
    }
    fn get_with(&self, _key: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) {
        f(None);
    }
    fn with_value_dyn(&self, _key: DynKey, _value: Arc<dyn Any + Send + Sync>) -> AnySession {
        AnySession::custom(Panicky)
    }
}

/// A panicking `is_valid` makes `gc()` panic, but the store stays usable and keeps the entry;
/// `gc_with` that catches the panic keeps that entry and sweeps the others.
#[test]
fn panicking_is_valid_leaves_the_store_usable() {
    let _quiesce = Quiesce;
    let store = new_store(4);
    let panicky = AnySession::custom(Panicky);
    store.bind(7, panicky.clone());
    let valid: Vec<SessionCtx> = (0..8).map(|_| SessionCtx::new(&Context::background())).collect();
    let invalid: Vec<SessionMap> = (0..8).map(|_| SessionMap::new()).collect();
    for (i, s) in valid.iter().enumerate() {
        store.bind(100 + i as u64, s.clone());
    }
    for (i, s) in invalid.iter().enumerate() {
        store.bind(200 + i as u64, s.clone());
        s.disable();
    }

    // Keep the expected panic's message out of the test output.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let swept = catch_unwind(AssertUnwindSafe(|| store.gc()));
    std::panic::set_hook(hook);
    assert!(swept.is_err(), "gc() should propagate the user's panic");

    // Usable: no lock is left held, the entry is still there, every valid session too.
    assert!(store.get(7).is_some_and(|s| s.ptr_eq(&panicky)));
    for i in 0..8u64 {
        assert!(store.get(100 + i).is_some(), "valid session {i} was removed");
    }
    let extra = SessionCtx::new(&Context::background());
    assert!(store.bind(1, extra.clone()).is_none());
    assert!(store.get(1).is_some_and(|s| s.ptr_eq(&extra.clone().into())));
    assert!(store.remove(1).is_some());
    assert!(store.len() >= 9);

    // A sweep that catches the panic keeps the entry and removes the invalid ones that are left.
    let left_invalid = (0..8u64).filter(|i| store.get(200 + i).is_some()).count();
    let removed = store.gc_with(|s| catch_unwind(AssertUnwindSafe(|| s.is_valid())).unwrap_or(true));
    assert_eq!(removed, left_invalid);
    assert_eq!(store.len(), 9);
    assert!(store.get(7).is_some_and(|s| s.ptr_eq(&panicky)));
    for i in 0..8u64 {
        assert!(store.get(200 + i).is_none(), "invalid session {i} survived");
    }

    // Once the entry is gone, plain `gc()` works again.
    assert!(store.remove(7).is_some());
    valid[0].disable();
    assert_eq!(store.gc(), 1);
    assert_eq!(store.len(), 7);
}

static REENTRANT_STORE: OnceLock<ShardedStore> = OnceLock::new();
static DROPS: AtomicUsize = AtomicUsize::new(0);

/// A user session whose `is_valid` and drop call back into the store that holds it: this
/// would spin forever if the store ran them with a shard locked.
struct Reentrant {
    id: u64,
    valid: Arc<AtomicBool>,
}

impl Session for Reentrant {
    fn is_valid(&self) -> bool {
        let store = REENTRANT_STORE.get().unwrap();
        assert!(store.get(self.id).is_some());
        let _ = store.len();
        self.valid.load(Ordering::SeqCst)
    }
    fn get_with(&self, _key: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) {
        f(None);
    }
    fn with_value_dyn(&self, _key: DynKey, _value: Arc<dyn Any + Send + Sync>) -> AnySession {
        unimplemented!()
    }
}

impl Drop for Reentrant {
    fn drop(&mut self) {
        if let Some(store) = REENTRANT_STORE.get() {
            let _ = store.get(self.id);
            let _ = store.len();
        }
        DROPS.fetch_add(1, Ordering::SeqCst);
    }
}

/// `is_valid`, the drop of a swept session and a `retain` predicate may all use the store.
#[test]
fn user_code_runs_without_shard_locks() {
    let _quiesce = Quiesce;
    let store = REENTRANT_STORE.get_or_init(|| new_store(2));
    let flags: Vec<Arc<AtomicBool>> = (0..6).map(|_| Arc::new(AtomicBool::new(true))).collect();
    for (id, flag) in flags.iter().enumerate() {
        store.bind(id as u64, AnySession::custom(Reentrant { id: id as u64, valid: flag.clone() }));
    }
    for flag in &flags[..3] {
        flag.store(false, Ordering::SeqCst);
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let swept = store.gc();
        let removed_by_retain = store.retain(|id, _| {
            // Re-entrant use of the same shard from the predicate.
            let _ = store.get(id);
            store.bind(100 + id, SessionCtx::new(&Context::background()));
            id != 5
        });
        tx.send((swept, removed_by_retain)).unwrap();
    });
    let (swept, removed_by_retain) =
        rx.recv_timeout(Duration::from_secs(20)).expect("gc/retain deadlocked: user code ran under a shard lock");
    assert_eq!(swept, 3);
    assert_eq!(removed_by_retain, 1);
    assert_eq!(DROPS.load(Ordering::SeqCst), 4, "every removed session was dropped");
    assert_eq!((0..6).filter(|&id| store.get(id).is_some()).count(), 2);
    assert_eq!(store.len(), 2 + 3);
}

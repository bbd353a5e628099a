//! Model-based property tests for [`SessionMap`] (arc-swap's `tests/random.rs` pattern).
//!
//! The model is one `BTreeMap` shared by every handle (Go's `SessionMap` is one mutable map),
//! plus a validity flag, plus the snapshots taken with `export` together with a copy of the
//! model at that time. Sequences are long enough (up to 700 operations, mostly writes, over
//! 12 keys) to pass the compaction threshold (128 writes; 64 under miri) about twice per case,
//! and every snapshot is re-checked after every operation: compaction must never change what
//! an old snapshot sees.
//! A plain multi-threaded test checks that no concurrent insert is lost.
//!
//! Without the `std` feature and without a global store, every `SessionMap` read registers an
//! epoch handle for its duration (a few microseconds in a debug build), so the properties run
//! fewer cases than proptest's default (24) and read each key through one read path per step, in
//! turn. `PROPTEST_CASES` overrides the case count.

#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use localsession_core::{
    AnySession, CancelHandle, Context, ContextError, DynKey, Key, Session, SessionExt, SessionMap,
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

/// A lower case count than proptest's default, unless `PROPTEST_CASES` overrides it.
fn config(cases: u32) -> ProptestConfig {
    let base = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_some() { base } else { ProptestConfig { cases, ..base } }
}

/// Keys are `u8`s below this.
const KEYS: u8 = 12;

/// How a value is written.
#[derive(Debug, Clone, Copy)]
enum Write {
    /// `map.insert(k, v)`.
    Insert,
    /// `map.with_value(k, v)` (returns the same map).
    WithValue,
    /// `SessionExt::with_value` (the erased `Session::with_value_dyn` path).
    Dyn,
}

#[derive(Debug, Clone)]
enum Op {
    Insert {
        h: usize,
        key: u8,
        value: u32,
        how: Write,
    },
    Remove {
        h: usize,
        key: u8,
    },
    Get {
        h: usize,
        key: u8,
    },
    Export {
        h: usize,
    },
    Len {
        h: usize,
    },
    Disable {
        h: usize,
    },
    /// Cancels the context the map was opened under (if any).
    CancelParent,
    Clone {
        h: usize,
    },
    DropHandle {
        h: usize,
    },
    /// Replaces snapshot `s` by `s.with_value(key, value)`: contexts derived from a snapshot
    /// see the map's keys and their own, never the parent context's (the map's base hides them).
    Derive {
        s: usize,
        key: u8,
        value: u32,
    },
    DropSnapshot {
        s: usize,
    },
}

fn write() -> impl Strategy<Value = Write> {
    prop_oneof![4 => Just(Write::Insert), 1 => Just(Write::WithValue), 1 => Just(Write::Dyn)]
}

fn op() -> impl Strategy<Value = Op> {
    let idx = || 0..16usize;
    prop_oneof![
        12 => (idx(), 0..KEYS, any::<u32>(), write()).prop_map(|(h, key, value, how)| Op::Insert { h, key, value, how }),
        6 => (idx(), 0..KEYS).prop_map(|(h, key)| Op::Remove { h, key }),
        2 => (idx(), 0..KEYS).prop_map(|(h, key)| Op::Get { h, key }),
        1 => idx().prop_map(|h| Op::Export { h }),
        1 => idx().prop_map(|h| Op::Len { h }),
        1 => idx().prop_map(|h| Op::Disable { h }),
        1 => Just(Op::CancelParent),
        1 => idx().prop_map(|h| Op::Clone { h }),
        1 => idx().prop_map(|h| Op::DropHandle { h }),
        1 => idx().prop_map(|s| Op::DropSnapshot { s }),
        2 => (idx(), 0..KEYS, any::<u32>()).prop_map(|(s, key, value)| Op::Derive { s, key, value }),
    ]
}

#[derive(Debug, Default)]
struct Model {
    map: BTreeMap<u8, u32>,
    disabled: bool,
    parent_cancelled: bool,
    /// The model at each live snapshot.
    snapshots: Vec<BTreeMap<u8, u32>>,
}

impl Model {
    fn invalid(&self) -> bool {
        self.disabled || self.parent_cancelled
    }
}

struct Real {
    handles: Vec<SessionMap>,
    snapshots: Vec<Context>,
    parent: Option<(Context, CancelHandle)>,
}

/// A parent context that binds every key the map uses (twice over, so index tables exist under
/// the map's base): the map must not see any of it.
fn parent_context() -> (Context, CancelHandle) {
    let mut ctx = Context::background();
    for round in 0..2u32 {
        for k in 0..KEYS {
            ctx = ctx.with_value(k, 1_000 * (round + 1) + u32::from(k));
        }
    }
    ctx.with_cancel()
}

fn apply(op: &Op, real: &mut Real, model: &mut Model) -> Result<(), TestCaseError> {
    let nh = real.handles.len();
    match *op {
        Op::Insert { h, key, value, how } => {
            let map = &real.handles[h % nh];
            match how {
                Write::Insert => map.insert(key, value),
                Write::WithValue => {
                    let same = map.with_value(key, value);
                    prop_assert!(same.ptr_eq(map), "with_value returned another map");
                }
                Write::Dyn => {
                    let same = SessionExt::with_value(map, key, value);
                    prop_assert!(same.as_map().is_some_and(|m| m.ptr_eq(map)), "with_value_dyn returned another map");
                }
            }
            model.map.insert(key, value);
        }
        Op::Remove { h, key } => {
            let got = real.handles[h % nh].remove(&key);
            let want = model.map.remove(&key).is_some();
            prop_assert_eq!(got, want, "remove({}) return value", key);
        }
        Op::Get { h, key } => {
            let map = &real.handles[h % nh];
            let want = model.map.get(&key).copied();
            prop_assert_eq!(map.value::<u32, _>(&key).map(|v| *v), want, "value({})", key);
            prop_assert_eq!(map.read(&key, |v: Option<&u32>| v.copied()), want, "read({})", key);
            prop_assert_eq!(map.contains(&key), want.is_some(), "contains({})", key);
        }
        Op::Export { h } => {
            real.snapshots.push(real.handles[h % nh].export());
            model.snapshots.push(model.map.clone());
        }
        Op::Len { h } => {
            prop_assert_eq!(real.handles[h % nh].len(), model.map.len(), "len()");
            prop_assert_eq!(real.handles[h % nh].is_empty(), model.map.is_empty(), "is_empty()");
        }
        Op::Disable { h } => {
            let got = real.handles[h % nh].disable();
            let want = !model.invalid();
            model.disabled = true;
            prop_assert_eq!(got, want, "disable() return value");
        }
        Op::CancelParent => {
            if let Some((_, handle)) = &real.parent {
                let got = handle.cancel();
                prop_assert_eq!(got, !model.parent_cancelled, "parent cancel() return value");
                model.parent_cancelled = true;
            }
        }
        Op::Clone { h } => {
            let c = real.handles[h % nh].clone();
            real.handles.push(c);
        }
        Op::DropHandle { h } => {
            // Keep one handle: the map lives as long as any handle (or snapshot) does.
            if nh > 1 {
                drop(real.handles.remove(h % nh));
            }
        }
        Op::Derive { s, key, value } => {
            if !real.snapshots.is_empty() {
                let i = s % real.snapshots.len();
                real.snapshots[i] = real.snapshots[i].with_value(key, value);
                model.snapshots[i].insert(key, value);
            }
        }
        Op::DropSnapshot { s } => {
            if !real.snapshots.is_empty() {
                let i = s % real.snapshots.len();
                drop(real.snapshots.remove(i));
                model.snapshots.remove(i);
            }
        }
    }
    Ok(())
}

fn check(step: usize, real: &Real, model: &Model) -> Result<(), TestCaseError> {
    let invalid = model.invalid();
    // Every handle is the same map: validity on all of them, values on a rotating one.
    for (i, map) in real.handles.iter().enumerate() {
        prop_assert_eq!(map.is_valid(), !invalid, "handle {} is_valid", i);
        prop_assert!(map.ptr_eq(&real.handles[0]), "handle {} is another map", i);
    }
    if let Some((parent, _)) = &real.parent {
        prop_assert_eq!(parent.is_done(), model.parent_cancelled, "the map's parent context is_done");
    }
    let map = &real.handles[step % real.handles.len()];
    prop_assert_eq!(map.err(), invalid.then_some(ContextError::Canceled), "err()");
    prop_assert_eq!(AnySession::from(map.clone()).is_valid(), !invalid, "AnySession::is_valid");
    // Every key through one of the read paths, in turn (each read pins the epoch, which costs
    // a handle registration without a store; see the module docs).
    for k in 0..KEYS {
        let want = model.map.get(&k).copied();
        match step % 4 {
            0 => prop_assert_eq!(map.value::<u32, _>(&k).map(|v| *v), want, "value({})", k),
            1 => prop_assert_eq!(map.read(&k, |v: Option<&u32>| v.copied()), want, "read({})", k),
            2 => prop_assert_eq!(map.value_cloned::<u32, _>(&k), want, "get_with({})", k),
            _ => {
                prop_assert_eq!(map.contains(&k), want.is_some(), "contains({})", k);
                prop_assert_eq!(map.value::<u64, _>(&k), None, "value::<u64>({})", k);
            }
        }
    }
    prop_assert_eq!(map.value::<u32, _>(&KEYS).map(|v| *v), None, "unbound key");
    prop_assert_eq!(map.len(), model.map.len(), "len()");
    prop_assert_eq!(real.snapshots.len(), model.snapshots.len());
    for (s, (snap, want)) in real.snapshots.iter().zip(&model.snapshots).enumerate() {
        for k in 0..KEYS {
            prop_assert_eq!(snap.value::<u32, _>(&k).copied(), want.get(&k).copied(), "snapshot {} key {}", s, k);
        }
        prop_assert_eq!(snap.is_done(), invalid, "snapshot {} is_done", s);
    }
    Ok(())
}

/// Natively long enough to cross the compaction threshold (128 writes for a small map) about
/// twice per case (42 compactions in the 24 cases of one counted run, 2026-12-02). Under miri (an
/// interpreter, one case; the threshold is 64 there) the erased-key sequences stay short:
/// about 60% of their operations are writes, so 80..100 operations made about 55 and rarely the
/// 64 a compaction needs (none in five counted runs, 2026-12-02), and 40..50 never do; miri
/// reaches compaction through the typed sequences (3 compactions in each of three counted runs
/// of 80..100 operations) and the compaction tests below.
fn seq_len() -> std::ops::Range<usize> {
    if cfg!(miri) { 40..50 } else { 300..700 }
}

/// The typed sequences' length: under miri long enough to compact.
fn typed_seq_len() -> std::ops::Range<usize> {
    if cfg!(miri) { 80..100 } else { 300..700 }
}

proptest! {
    #![proptest_config(config(24))]

    /// Long random sequences of writes, removes, snapshots and disables over a few handles of
    /// one map, optionally opened under a context that binds the same keys.
    #[test]
    fn session_map_matches_model(ops in prop::collection::vec(op(), seq_len()), under_parent in any::<bool>()) {
        let _quiesce = Quiesce;
        let parent = under_parent.then(parent_context);
        let map = match &parent {
            Some((ctx, _)) => SessionMap::new_in(ctx),
            None => SessionMap::new(),
        };
        let mut real = Real { handles: vec![map], snapshots: Vec::new(), parent };
        let mut model = Model::default();
        check(0, &real, &model)?;
        for (step, op) in ops.iter().enumerate() {
            apply(op, &mut real, &mut model)?;
            check(step, &real, &model)?;
        }
    }
}

static T0: Key<u32> = Key::new("t0");
static T1: Key<u32> = Key::new("t1");
static T2: Key<u32> = Key::new("t2");
static T3: Key<u32> = Key::new("t3");

fn typed_key(which: usize) -> &'static Key<u32> {
    match which % 4 {
        0 => &T0,
        1 => &T1,
        2 => &T2,
        _ => &T3,
    }
}

#[derive(Debug, Clone)]
enum TypedOp {
    Set {
        which: usize,
        value: u32,
    },
    /// `map.with(&key, v)` (returns the same map).
    With {
        which: usize,
        value: u32,
    },
    RemoveKey {
        which: usize,
    },
    /// `Session::with_value_dyn(DynKey::typed(&key), value)`; with `wrong_type` the value is a
    /// `u64`: the key is bound (it counts in `len`, `remove_key` finds it) but reads as absent.
    SetDyn {
        which: usize,
        value: u32,
        wrong_type: bool,
    },
    /// An untyped key with the same small number: must never be confused with a typed key.
    InsertUntyped {
        key: u8,
        value: u32,
    },
    RemoveUntyped {
        key: u8,
    },
    Export,
}

fn typed_op() -> impl Strategy<Value = TypedOp> {
    prop_oneof![
        6 => (0..4usize, any::<u32>()).prop_map(|(which, value)| TypedOp::Set { which, value }),
        2 => (0..4usize, any::<u32>()).prop_map(|(which, value)| TypedOp::With { which, value }),
        4 => (0..4usize).prop_map(|which| TypedOp::RemoveKey { which }),
        2 => (0..4usize, any::<u32>(), any::<bool>())
            .prop_map(|(which, value, wrong_type)| TypedOp::SetDyn { which, value, wrong_type }),
        2 => (0..4u8, any::<u32>()).prop_map(|(key, value)| TypedOp::InsertUntyped { key, value }),
        1 => (0..4u8).prop_map(|key| TypedOp::RemoveUntyped { key }),
        1 => Just(TypedOp::Export),
    ]
}

/// What a typed key is bound to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum Slot {
    #[default]
    Absent,
    Value(u32),
    /// A value of another type (bound, but unreadable through the typed key).
    WrongType,
}

impl Slot {
    fn readable(self) -> Option<u32> {
        match self {
            Slot::Value(v) => Some(v),
            _ => None,
        }
    }
    fn bound(self) -> bool {
        self != Slot::Absent
    }
}

#[derive(Debug, Clone, Default)]
struct TypedModel {
    typed: [Slot; 4],
    untyped: BTreeMap<u8, u32>,
}

fn check_typed(step: usize, map: &SessionMap, m: &TypedModel) -> Result<(), TestCaseError> {
    for (w, slot) in m.typed.iter().enumerate() {
        let key = typed_key(w);
        let want = &slot.readable();
        match step % 3 {
            0 => prop_assert_eq!(map.get(key).map(|v| *v), *want, "get(T{})", w),
            1 => prop_assert_eq!(map.read_key(key, |v| v.copied()), *want, "read_key(T{})", w),
            _ => prop_assert_eq!(map.get_cloned(key), *want, "get_cloned(T{})", w),
        }
    }
    for k in 0..4u8 {
        prop_assert_eq!(map.value::<u32, _>(&k).map(|v| *v), m.untyped.get(&k).copied(), "value({})", k);
    }
    prop_assert_eq!(map.len(), m.typed.iter().filter(|s| s.bound()).count() + m.untyped.len(), "len()");
    Ok(())
}

proptest! {
    #![proptest_config(config(24))]

    /// Typed keys (`set`, `with`, `get`, `read_key`, `remove_key`) mixed with untyped ones,
    /// across compactions, with snapshots that must not change.
    #[test]
    fn typed_keys_match_model(ops in prop::collection::vec(typed_op(), typed_seq_len())) {
        let _quiesce = Quiesce;
        let map = SessionMap::new();
        let mut model = TypedModel::default();
        let mut snapshots: Vec<(Context, TypedModel)> = Vec::new();
        for (step, op) in ops.iter().enumerate() {
            match *op {
                TypedOp::Set { which, value } => {
                    map.set(typed_key(which), value);
                    model.typed[which] = Slot::Value(value);
                }
                TypedOp::With { which, value } => {
                    prop_assert!(map.with(typed_key(which), value).ptr_eq(&map));
                    model.typed[which] = Slot::Value(value);
                }
                TypedOp::RemoveKey { which } => {
                    let got = map.remove_key(typed_key(which));
                    let want = std::mem::take(&mut model.typed[which]).bound();
                    prop_assert_eq!(got, want, "remove_key(T{})", which);
                }
                TypedOp::SetDyn { which, value, wrong_type } => {
                    let boxed: Arc<dyn std::any::Any + Send + Sync> =
                        if wrong_type { Arc::new(u64::from(value)) } else { Arc::new(value) };
                    let same = map.with_value_dyn(DynKey::typed(typed_key(which)), boxed);
                    prop_assert!(same.as_map().is_some_and(|m| m.ptr_eq(&map)));
                    model.typed[which] = if wrong_type { Slot::WrongType } else { Slot::Value(value) };
                }
                TypedOp::InsertUntyped { key, value } => {
                    map.insert(key, value);
                    model.untyped.insert(key, value);
                }
                TypedOp::RemoveUntyped { key } => {
                    prop_assert_eq!(map.remove(&key), model.untyped.remove(&key).is_some(), "remove({})", key);
                }
                TypedOp::Export => snapshots.push((map.export(), model.clone())),
            }
            check_typed(step, &map, &model)?;
            for (s, (snap, m)) in snapshots.iter().enumerate() {
                for (w, slot) in m.typed.iter().enumerate() {
                    prop_assert_eq!(snap.get(typed_key(w)).copied(), slot.readable(), "snapshot {} T{}", s, w);
                }
                for k in 0..4u8 {
                    prop_assert_eq!(snap.value::<u32, _>(&k).copied(), m.untyped.get(&k).copied(), "snapshot {} key {}", s, k);
                }
            }
        }
    }
}

/// Four writers insert 500 distinct keys each into one map while a reader watches: no insert is
/// lost, and every snapshot the reader takes shows, for each writer, a prefix of its inserts
/// (each writer inserts in order, and a later head contains every earlier write).
#[test]
fn concurrent_inserts_are_never_lost() {
    let _quiesce = Quiesce;
    const WRITERS: u64 = 4;
    // Fewer under miri (an interpreter): the interleavings, not the count, are the point there;
    // 4 x 24 writes still cross miri's compaction threshold (64) while the reader reads;
    // natively 4 x 500 distinct keys compact when the writes reach twice the live keys (three
    // compactions, counted 2026-12-02).
    const PER_WRITER: u64 = if cfg!(miri) { 24 } else { 500 };
    let map = SessionMap::new();
    let stop = Arc::new(AtomicBool::new(false));

    let reader = {
        let map = map.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut last_len = 0;
            let mut rounds = 0u32;
            while !stop.load(Ordering::Acquire) || rounds == 0 {
                rounds += 1;
                let len = map.len();
                assert!(len >= last_len, "len went backwards: {len} after {last_len}");
                last_len = len;
                let snap = map.export();
                for t in 0..WRITERS {
                    let visible: Vec<bool> =
                        (0..PER_WRITER).map(|i| snap.value::<u64, _>(&(t * 1000 + i)).is_some()).collect();
                    let prefix = visible.iter().take_while(|&&v| v).count();
                    assert!(
                        visible[prefix..].iter().all(|&v| !v),
                        "writer {t}: a later insert is visible without an earlier one"
                    );
                    for i in 0..prefix as u64 {
                        let key = t * 1000 + i;
                        assert_eq!(snap.value::<u64, _>(&key), Some(&(key * 2)));
                    }
                }
            }
            rounds
        })
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let map = map.clone();
            std::thread::spawn(move || {
                for i in 0..PER_WRITER {
                    let key = t * 1000 + i;
                    map.insert(key, key * 2);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Release);
    let rounds = reader.join().unwrap();
    assert!(rounds > 0);

    for t in 0..WRITERS {
        for i in 0..PER_WRITER {
            let key = t * 1000 + i;
            assert_eq!(map.value::<u64, _>(&key).map(|v| *v), Some(key * 2), "lost insert of key {key}");
        }
    }
    assert_eq!(map.len(), (WRITERS * PER_WRITER) as usize);
    assert!(map.is_valid());
}

/// Regression: compaction's deferred function used to own the map, so when the map's last
/// handle was dropped before the epoch advanced, the whole map — user values included — was
/// dropped later inside whichever thread collected, typically inside an unrelated map's read,
/// which then unwound if a value's `Drop` panicked. Now the values drop with the last handle,
/// and reads of other maps never run a value's `Drop`.
#[test]
fn a_dropped_maps_values_never_drop_inside_another_maps_read() {
    static DROPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static ARMED: AtomicBool = AtomicBool::new(false);
    struct Tracked;
    impl Drop for Tracked {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::SeqCst);
            assert!(!ARMED.load(Ordering::SeqCst), "a user Drop ran inside another map's read");
        }
    }
    let _quiesce = Quiesce;
    let map = SessionMap::new();
    map.insert("tracked", Tracked);
    // Enough writes for a few compactions (128 writes at least between two; 64 under miri),
    // each of which defers the release of the chain it replaced.
    let writes: u32 = if cfg!(miri) { 200 } else { 600 };
    for i in 0..writes {
        map.insert(i % 4, i);
    }
    drop(map);
    assert_eq!(DROPS.load(Ordering::SeqCst), 1, "the values drop with the map's last handle");

    ARMED.store(true, Ordering::SeqCst);
    let other = SessionMap::new().with_value("k", 1u8);
    let reads = if cfg!(miri) { 20 } else { 2_000 };
    for _ in 0..reads {
        let read =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| other.read(&"k", |v: Option<&u8>| v.copied())));
        assert_eq!(read.ok(), Some(Some(1)));
    }
    drop(other);
    for _ in 0..8 {
        localsession_core::EpochGuard::pin(&localsession_core::EpochHandle::register()).flush();
    }
    ARMED.store(false, Ordering::SeqCst);
    assert_eq!(DROPS.load(Ordering::SeqCst), 1);
}

/// A store that pins an epoch handle of its own: the only handles it can make are of the crate's
/// collector (`EpochHandle::register`).
struct OwnHandleStore;

impl localsession_core::ContextStore for OwnHandleStore {
    fn with_current(&self, f: &mut dyn FnMut(Option<&AnySession>)) {
        f(None);
    }
    fn replace(&self, session: Option<AnySession>) -> Result<Option<AnySession>, localsession_core::BindError> {
        Ok(session)
    }
    fn pin_epoch(&self) -> Option<localsession_core::EpochGuard> {
        thread_local! {
            static HANDLE: localsession_core::EpochHandle = localsession_core::EpochHandle::register();
        }
        HANDLE.with(|h| Some(localsession_core::EpochGuard::pin(h)))
    }
}

/// Regression: `ContextStore::pin_epoch` used to return any `crossbeam_epoch::Guard`, so a
/// store could make `SessionMap` reads pin a collector that the map's writers do not wait for
/// (a use-after-free from safe code). Now crossbeam-epoch is not in the public API at all: an
/// `EpochGuard` comes from an `EpochHandle`, which only the crate's collector registers (a guard
/// of a foreign collector does not type-check). A store's guards pin and unpin as expected.
#[test]
fn pin_epoch_guards_come_from_the_crates_collector() {
    use localsession_core::{ContextStore, EpochGuard, EpochHandle};
    let guard = OwnHandleStore.pin_epoch().expect("the store pins its handle");
    drop(guard);
    let handle = EpochHandle::register();
    let guard = EpochGuard::pin(&handle);
    assert!(handle.is_pinned());
    drop(guard);
    assert!(!handle.is_pinned());
}

/// A batch of writes to a large map: `len` consecutive keys from `start` (wrapping in
/// `0..LARGE_KEYS`), each set to `value` or removed.
#[derive(Debug, Clone)]
struct Batch {
    start: u16,
    len: u16,
    value: Option<u32>,
    snapshot: bool,
}

/// Keys of the large-map model: enough for several index levels (64, 512, 4096 keys); under miri
/// (an interpreter) two levels.
const LARGE_KEYS: u16 = if cfg!(miri) { 130 } else { 5000 };

fn batch() -> impl Strategy<Value = Batch> {
    (
        0..LARGE_KEYS,
        1..if cfg!(miri) { 100u16 } else { 700 },
        prop::option::weighted(0.8, any::<u32>()),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(start, len, value, snapshot)| Batch { start, len, value, snapshot })
}

proptest! {
    #![proptest_config(config(if cfg!(miri) { 1 } else { 12 }))]

    /// Large maps (thousands of keys, so several index-table levels, merges and compactions):
    /// every key reads as the model says, `len()` (O(1), from the tables' live counts) matches
    /// after every batch, and snapshots keep what they saw.
    #[test]
    fn large_map_matches_model(batches in prop::collection::vec(batch(), if cfg!(miri) { 2..3 } else { 4..24 })) {
        let _quiesce = Quiesce;
        let map = SessionMap::new();
        let mut model: BTreeMap<u16, u32> = BTreeMap::new();
        let mut snapshots: Vec<(Context, BTreeMap<u16, u32>)> = Vec::new();
        for (step, b) in batches.iter().enumerate() {
            for i in 0..b.len {
                let k = (b.start + i) % LARGE_KEYS;
                match b.value {
                    Some(v) => {
                        map.insert(k, v.wrapping_add(u32::from(i)));
                        model.insert(k, v.wrapping_add(u32::from(i)));
                    }
                    None => {
                        prop_assert_eq!(map.remove(&k), model.remove(&k).is_some(), "remove({})", k);
                    }
                }
            }
            prop_assert_eq!(map.len(), model.len(), "len() after batch {}", step);
            // A sample of keys each step (every key at the end).
            let probe = b.start.wrapping_mul(7919) % LARGE_KEYS;
            for k in (0..LARGE_KEYS).filter(|k| k % 97 == probe % 97) {
                prop_assert_eq!(map.read(&k, |v: Option<&u32>| v.copied()), model.get(&k).copied(), "read({}) at {}", k, step);
            }
            if b.snapshot {
                snapshots.push((map.export(), model.clone()));
            }
        }
        for k in 0..LARGE_KEYS {
            prop_assert_eq!(map.value::<u32, _>(&k).map(|v| *v), model.get(&k).copied(), "value({})", k);
        }
        for (s, (snap, want)) in snapshots.iter().enumerate() {
            for k in (0..LARGE_KEYS).step_by(13) {
                prop_assert_eq!(snap.value::<u32, _>(&k).copied(), want.get(&k).copied(), "snapshot {} key {}", s, k);
            }
        }
    }
}

/// Contexts with thousands of distinct keys read every key at every depth through the index
/// levels (a context is the same chain as a map, without compaction).
#[test]
fn deep_contexts_with_many_keys_read_every_key() {
    let keys: u32 = if cfg!(miri) { 140 } else { 6000 };
    let mut ctx = Context::background();
    let mut checkpoints = Vec::new();
    for i in 0..keys {
        ctx = ctx.with_value(i % (keys / 2), i);
        if i % 997 == 0 || i == keys - 1 {
            checkpoints.push((i, ctx.clone()));
        }
    }
    for (depth, c) in &checkpoints {
        for k in (0..keys / 2).step_by(if cfg!(miri) { 11 } else { 3 }) {
            // The newest binding of `k` at or below `depth`: `k` or `k + keys / 2`.
            let want = [k + keys / 2, k].into_iter().find(|&i| i <= *depth);
            assert_eq!(c.value::<u32, _>(&k).copied(), want, "key {k} at depth {depth}");
        }
    }
}

/// Contexts stored in maps (typed `insert`, erased `with_value_dyn`: the values a map shares)
/// drop iteratively, however deep the nesting: node reclamation recognises them as values that
/// own a chain.
#[test]
fn contexts_nested_in_maps_drop_iteratively() {
    let levels = if cfg!(miri) { 100 } else { 100_000 };
    let mut in_map = SessionMap::new();
    let mut in_map_dyn = SessionMap::new();
    for _ in 0..levels {
        let map = SessionMap::new();
        map.insert(0u8, in_map.export());
        in_map = map;
        let map = SessionMap::new();
        let _ = map.with_value_dyn(DynKey::new(0u8), Arc::new(in_map_dyn.export()));
        in_map_dyn = map;
    }
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || {
            drop(in_map);
            drop(in_map_dyn);
        })
        .unwrap()
        .join()
        .unwrap();
}

/// Hashes exactly as the `u64` it wraps (a derived `Hash` of one field hashes the field), so
/// its keys get the same tags as `u64` keys (asserted in-crate by `context::tests`).
#[derive(PartialEq, Eq, Hash, Clone, Copy, Debug)]
struct Wrapped(u64);

/// The readers compare keys by static type when the node stores its key inline
/// (`NodePtr::key_is`) and reach the value through its typed `Arc` when it has one
/// (`NodePtr::value_as`); every other node goes through the erased path. Keys of two types
/// with equal tags, values of another type, and keys and values bound through the erased
/// (`dyn Session`) path must all read as they did through the erased path alone.
#[test]
fn typed_reads_agree_with_the_erased_path() {
    let m = SessionMap::new();
    m.insert(9u64, String::from("plain"));
    m.insert(Wrapped(9), 7u32);
    assert_eq!(m.read(&9u64, |v: Option<&String>| v.cloned()).as_deref(), Some("plain"));
    assert_eq!(m.read(&Wrapped(9), |v: Option<&u32>| v.copied()), Some(7));
    // The right key with the wrong value type finds nothing, both ways.
    assert!(m.read(&9u64, |v: Option<&u32>| v.is_none()));
    assert!(m.value::<u32, _>(&9u64).is_none());
    assert_eq!(m.value::<String, _>(&9u64).as_deref().map(String::as_str), Some("plain"));
    assert_eq!(m.len(), 2);

    // Bound through the erased path (a `SharedKey` node holding an `Arc<dyn Any>`): the
    // typed readers fall back to the node's vtable and still see it, and it rebinds the
    // inline `u64` key (one key, not two).
    let _ = SessionExt::with_value(&m, 9u64, 11u32);
    assert_eq!(m.len(), 2);
    assert_eq!(m.read(&9u64, |v: Option<&u32>| v.copied()), Some(11));
    assert_eq!(m.value::<u32, _>(&9u64).as_deref(), Some(&11));
    assert!(m.contains(&9u64) && m.contains(&Wrapped(9)));
    assert_eq!(m.read(&Wrapped(9), |v: Option<&u32>| v.copied()), Some(7));
    // And an inline binding over the erased one wins again.
    m.insert(9u64, 12u32);
    assert_eq!(m.value::<u32, _>(&9u64).as_deref(), Some(&12));
    assert_eq!(m.len(), 2);

    // Through enough writes that the keys sit in index tables and compacted chains.
    for i in 0..300u64 {
        m.insert(i % 5, i);
    }
    assert_eq!(m.read(&Wrapped(9), |v: Option<&u32>| v.copied()), Some(7));
    assert_eq!(m.value::<u32, _>(&9u64).as_deref(), Some(&12));
    assert_eq!(m.read(&3u64, |v: Option<&u64>| v.copied()), Some(298));
    assert!(m.remove(&Wrapped(9)));
    assert!(!m.contains(&Wrapped(9)) && m.contains(&9u64));
    assert_eq!(m.len(), 6);
}

/// The typed-key readers take the typed `Arc` too.
#[test]
fn typed_key_reads_check_the_value_type() {
    static N: Key<u32> = Key::new("n");
    let m = SessionMap::new();
    m.set(&N, 5);
    assert_eq!(m.read_key(&N, |v| v.copied()), Some(5));
    assert_eq!(m.get(&N).as_deref(), Some(&5));
    let handle = m.get(&N).unwrap();
    m.set(&N, 6);
    assert_eq!((*handle, *m.get(&N).unwrap()), (5, 6), "a handle keeps the value it was given");
}

/// Keys whose `Hash` is degenerate (every key hashes alike, so every binding has the same tag)
/// stay distinct keys through index tables, compaction (which lists the bindings from the
/// tables: with one tag for all, every entry goes to the exact key comparison) and `len()`: 100
/// keys, so that the tables have two levels, each re-bound many times, some removed. (The chain
/// walk's handling of equal tags, which compaction no longer reaches, has a unit test in
/// `core/src/node.rs`: `listing_from_the_tables_and_walking_the_chain_agree`.)
#[test]
fn keys_that_hash_alike_stay_distinct_through_compaction() {
    #[derive(Clone, PartialEq, Eq, Debug)]
    struct SameHash(u32);
    impl std::hash::Hash for SameHash {
        fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
    }
    let _quiesce = Quiesce;
    let keys = if cfg!(miri) { 40 } else { 100 };
    let m = SessionMap::new();
    let mut model = BTreeMap::new();
    for round in 0..if cfg!(miri) { 3 } else { 6 } {
        for k in 0..keys {
            m.insert(SameHash(k), k * 10 + round);
            model.insert(k, k * 10 + round);
        }
        // Mixed with keys of another type, hashed normally.
        m.insert(u64::from(round), round);
        for k in (round..keys).step_by(7) {
            assert_eq!(m.remove(&SameHash(k)), model.remove(&k).is_some(), "remove({k}) in round {round}");
        }
        assert_eq!(m.len(), model.len() + round as usize + 1, "len() after round {round}");
        for k in 0..keys {
            assert_eq!(m.read(&SameHash(k), |v: Option<&u32>| v.copied()), model.get(&k).copied(), "key {k}");
        }
    }
}

/// Compaction lists a map's bindings from its index levels (`index::for_each_binding_unordered`),
/// where a key can sit in several levels at once — its newest binding in a small, new level and
/// older ones (maybe a removal) in the larger levels below — and in the few nodes above the top
/// table. Thousands of keys, so that three levels exist; rebinding and removing keys of every
/// age, re-inserting removed ones; after each round every key, absent ones included, and
/// `len()` match a model. A binding listed from an older level than its key's newest would
/// bring back an old value or a removed key.
#[test]
fn compaction_from_index_levels_keeps_each_key_newest_binding() {
    let _quiesce = Quiesce;
    let keys: u64 = if cfg!(miri) { 100 } else { 3000 };
    let m = SessionMap::new();
    let mut model = BTreeMap::new();
    // A fixed pseudo-random sequence (xorshift), so that a failure names a reproducible step.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for k in 0..keys {
        m.insert(k, k);
        model.insert(k, k);
    }
    for round in 0..if cfg!(miri) { 2 } else { 8 } {
        // Enough writes for at least one compaction per round (twice the live keys).
        for step in 0..keys * 5 / 2 {
            let r = next();
            let k = r % keys;
            if r % 5 == 0 {
                assert_eq!(m.remove(&k), model.remove(&k).is_some(), "remove({k}), round {round} step {step}");
            } else {
                let v = (round << 32) | step;
                m.insert(k, v);
                model.insert(k, v);
            }
        }
        assert_eq!(m.len(), model.len(), "len() after round {round}");
        for k in 0..keys {
            assert_eq!(m.read(&k, |v: Option<&u64>| v.copied()), model.get(&k).copied(), "key {k} after round {round}");
        }
    }
}

/// Index levels whose keys all have distinct tags merge and list without reading a node: an
/// equal tag is taken for the same key (`index::Table::distinct_tags`). This checks that a
/// shared tag is noticed however it arrives, and the levels then compare keys again. Keys are
/// hashed in pairs (`2k` and `2k + 1` hash alike); the even ones come first, alone for
/// thousands of writes and a few compactions. Then, in one map, each odd key is bound long
/// after its even twin (its lookup meets the twin in an older level); in another, fresh pairs
/// are bound back to back (one segment: no older entry of their tag exists). Then both maps see
/// rebinds and removals of every key. A shared tag taken for the same key loses one of the two
/// keys when levels merge or a compaction lists them.
#[test]
fn a_tag_shared_late_is_told_apart_in_every_level() {
    #[derive(Clone, PartialEq, Eq, Debug)]
    struct Paired(u64);
    impl std::hash::Hash for Paired {
        fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
            (self.0 / 2).hash(h);
        }
    }
    let _quiesce = Quiesce;
    // Under miri: enough keys for two levels, fewer writes (about 50 s per miri pass).
    let pairs: u64 = if cfg!(miri) { 36 } else { 2000 };
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let check = |m: &SessionMap, model: &BTreeMap<u64, u64>, at: &str| {
        assert_eq!(m.len(), model.len(), "len() {at}");
        for k in 0..pairs * 4 {
            assert_eq!(m.read(&Paired(k), |v: Option<&u64>| v.copied()), model.get(&k).copied(), "key {k} {at}");
        }
    };
    for twins_late in [true, false] {
        let m = SessionMap::new();
        let mut model = BTreeMap::new();
        // Even keys only: distinct tags; rebinds for a few compactions.
        for k in 0..pairs {
            m.insert(Paired(2 * k), k);
            model.insert(2 * k, k);
        }
        for step in 0..pairs * if cfg!(miri) { 4 } else { 6 } {
            let k = 2 * (next() % pairs);
            m.insert(Paired(k), step);
            model.insert(k, step);
        }
        check(&m, &model, "with the even keys alone");
        if twins_late {
            // Each odd twin long after its even key, between rebinds of the evens.
            for k in 0..pairs {
                m.insert(Paired(2 * k + 1), k);
                model.insert(2 * k + 1, k);
                let e = 2 * (next() % pairs);
                m.insert(Paired(e), k);
                model.insert(e, k);
            }
            check(&m, &model, "after the odd twins");
        } else {
            // Fresh pairs back to back.
            for k in pairs..pairs * 2 {
                for key in [2 * k, 2 * k + 1] {
                    m.insert(Paired(key), key);
                    model.insert(key, key);
                }
            }
            check(&m, &model, "after the fresh pairs");
        }
        for round in 0..if cfg!(miri) { 1 } else { 2 } {
            for step in 0..pairs * 8 {
                let r = next();
                let k = r % (pairs * 4);
                if r % 7 == 0 {
                    let at = format!("remove({k}), twins late: {twins_late}, round {round} step {step}");
                    assert_eq!(m.remove(&Paired(k)), model.remove(&k).is_some(), "{at}");
                } else {
                    m.insert(Paired(k), step);
                    model.insert(k, step);
                }
            }
            check(&m, &model, &format!("after round {round}, twins late: {twins_late}"));
        }
    }
}

//! Fuzz interpreter: operation sequences over sessions, contexts, slots and a sharded store,
//! checked against a plain sequential model.
//!
//! [`run`] decodes the input into at most [`MAX_OPS`] operations (any byte string decodes; the
//! run stops where the bytes run out) and applies each to the real library and to the model:
//!
//! - a pool of sessions ([`SessionCtx`] and [`SessionMap`] handles, as [`AnySession`]s), made
//!   over the background context or over pooled contexts, with or without a deadline, derived
//!   with `with_value` (three write paths, two value types, untyped `u8` keys and one typed
//!   [`Key`]), forked, disabled, cloned and dropped;
//! - a pool of contexts ([`Context::with_cancel`], `with_deadline`, `with_value`,
//!   `without_cancel`, and snapshots exported from sessions) with their [`CancelHandle`]s,
//!   cancelled with [`ContextError::Canceled`], two user causes or `DeadlineExceeded`;
//! - three *virtual threads*, each a [`LocalSlot`] holding its current session: `bind`,
//!   `unbind`, `enter`/exit (a stack of guards modelled with [`LocalSlot::replace`], checking
//!   that exit restores the previous session), reads through [`LocalSlot::with`], and replacing
//!   or disabling the session while it is borrowed (also one that only the slot owns, so that
//!   only the slot's retired list keeps the borrow alive);
//! - one [`ShardedStore`] (1 to 4 shards, from the first byte): bind, remove, get, gc, and its
//!   [`ContextStore`] face (its id function names no unit);
//! - a manual clock (per OS thread) for deadlines, [`Done`] futures polled with a no-op waker,
//!   and [`AfterCancel`] callbacks that count their runs; with bit 2 of the first byte set, the
//!   clock has a timer whose expiries operations fire (module `timer`);
//! - large maps and contexts (thousands of `u16` keys: every index level, many compactions)
//!   and a two-thread mode, where a second OS thread writes, reads and snapshots a map while
//!   the main thread does too (module `big`);
//! - user sessions ([`AnySession::custom`]), some of which panic on reads, and a key whose
//!   `Eq` panics inside the library's lookups and index builds (module `custom`);
//! - [`MetaInfo`](localsession_core::MetaInfo) values on contexts, and the backup functions
//!   over the global store (module `meta`);
//! - the global store through the free functions and a
//!   [`SingleSlotStore`](localsession_core::SingleSlotStore) through the `_in` functions, with
//!   enter guards dropped in any order (module `stores`); [`WithSession`](localsession_core::WithSession)
//!   futures over both (module `future`); a [`TaskTable`] (module `tasks`).
//!
//! Panics the interpreter provokes carry a private payload: they are caught, and the panic hook
//! the fuzz target installs (libFuzzer's, which aborts) never sees them. Any other panic is a
//! finding. Runs in one process are serialized (the global store is process-wide).
//!
//! The model is sequential and says nothing about propagation: a cancel scope has a parent, an
//! effective deadline (the minimum along its path) and, once *settled*, a cause. A scope is done
//! when settled or past its deadline; settling reaches every unsettled scope under it, each
//! taking `DeadlineExceeded` instead of the cause when its own deadline has passed (Go's timer
//! would have fired first). Deadlines alone settle nothing (the clock has no timer); polling a
//! [`Done`] or registering a callback on an expired scope settles it. A session's values are a
//! map (a `SessionCtx`'s own, or its `SessionMap`'s shared one), and a snapshot's values never
//! change.
//!
//! Every observable answer is asserted: values (including wrong-type and missing keys), `len`,
//! `is_valid`, `err` (kind and cause identity), `deadline`, the `bool`s of `disable`, `cancel`,
//! `remove` and `AfterCancel::stop`, the sessions returned by slot and store operations
//! (identity via [`AnySession::ptr_eq`], and non-identity with every unrelated pooled session),
//! `gc`'s count, `shard_lens`, poll results and callback counts. Operations check what they
//! touch; cancellations re-check every validity; the end of the run checks everything and unwinds
//! every guard.

use core::fmt;
use core::pin::Pin;
use core::task::{Context as TaskContext, Waker};
use core::time::Duration;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError};

use localsession_core::{
    AfterCancel, AnySession, CancelHandle, Clock, Context, ContextError, ContextStore, Done, DynKey, Expiry, Instant,
    Key, LocalSlot, ManagerOptions, Session, SessionCtx, SessionExt, SessionMap, ShardedStore, TaskTable,
    with_current_in,
};

mod big;
mod custom;
mod future;
mod meta;
mod stores;
mod tasks;
mod timer;

use custom::PANIC_CODES;
use meta::MetaModel;

/// Operations decoded from one input, at most.
pub const MAX_OPS: usize = 256;
/// Virtual threads, each with its own slot.
const THREADS: usize = 3;
/// Untyped keys are `u8`s below this; key code `KEYS` is the typed key.
const KEYS: u8 = 6;
const TYPED_CODE: u8 = KEYS;
const CODES: u8 = KEYS + 1;
/// A `u8` key that is never bound.
const MISSING: u8 = 200;
const MAX_SESSIONS: usize = 48;
const MAX_CONTEXTS: usize = 32;
const MAX_HANDLES: usize = 16;
const MAX_DONES: usize = 8;
const MAX_CALLBACKS: usize = 16;
/// Store ids: `0..STORE_IDS`, and a few near `u64::MAX`.
const STORE_IDS: u8 = 12;

static TYPED: Key<u32> = Key::new("fuzz_typed");

thread_local! {
    /// The manual clocks' time in milliseconds, per OS thread (so parallel replays do not
    /// share it).
    static NOW_MS: Cell<u64> = const { Cell::new(0) };
    /// The timers [`TimerClock`] was asked for, in order: `(at, expiry)`.
    static TIMERS: RefCell<Vec<(Duration, Expiry)>> = const { RefCell::new(Vec::new()) };
}

/// A manual clock without a timer: expiry is only observed lazily.
struct FuzzClock;

impl Clock for FuzzClock {
    fn now(&self) -> Duration {
        Duration::from_millis(NOW_MS.with(Cell::get))
    }
}

/// The same manual time, with a timer: `schedule` records the expiry, and
/// [`Op::FireTimers`] fires the due ones (as an adapter's timer would).
struct TimerClock;

impl Clock for TimerClock {
    fn now(&self) -> Duration {
        Duration::from_millis(NOW_MS.with(Cell::get))
    }
    fn schedule(&self, at: Duration, expiry: Expiry) {
        TIMERS.with(|t| t.borrow_mut().push((at, expiry)));
    }
}

static CLOCK: FuzzClock = FuzzClock;
static TIMER_CLOCK: TimerClock = TimerClock;

/// The payload of every panic the interpreter provokes on purpose (a user session's read, a
/// key's `Eq`, a future's `poll`): the panic hook stays quiet for it, and only it is caught.
#[derive(Debug)]
struct FuzzPanic;

/// Panics with [`FuzzPanic`].
fn fuzz_panic() -> ! {
    std::panic::panic_any(FuzzPanic)
}

/// Runs `f`; `Err(())` if it panicked with [`FuzzPanic`]. Any other panic (an assertion, a
/// library bug) goes on unwinding.
fn catch_fuzz<R>(f: impl FnOnce() -> R) -> Result<R, ()> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => Ok(r),
        Err(payload) if payload.is::<FuzzPanic>() => Err(()),
        Err(payload) => resume_unwind(payload),
    }
}

/// Installs (once) a panic hook that ignores [`FuzzPanic`] and hands every other panic to the
/// previous hook (libFuzzer's aborts: a provoked, caught panic must not count as a crash).
fn quiet_fuzz_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<FuzzPanic>() {
                previous(info);
            }
        }));
    });
}

/// Serializes runs in one process (the corpus replay tests run in parallel): the global store,
/// the store statics and the panic flags are process-wide.
static RUN_LOCK: Mutex<()> = Mutex::new(());

/// A user cancellation cause.
#[derive(Debug)]
struct FuzzCause(u8);

impl fmt::Display for FuzzCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fuzz cause {}", self.0)
    }
}

impl core::error::Error for FuzzCause {}

/// One decoded operation. Index fields are raw bytes, taken modulo the pool's size when the
/// operation runs (and skipped when the pool is empty).
#[derive(Debug, Clone, Copy)]
enum Op {
    NewCtx { over: u8 },
    NewCtxDeadline { over: u8, delta: u8 },
    NewMap { over: u8 },
    NewMapDeadline { delta: u8 },
    WithValue { s: u8, key: u8, value: u8, how: u8 },
    Fork { s: u8 },
    Disable { s: u8, via_any: bool },
    CloneSession { s: u8 },
    DropSession { s: u8 },
    MapRemove { s: u8, key: u8 },
    Get { s: u8, key: u8 },
    CtxWithCancel { over: u8 },
    CtxWithDeadline { over: u8, delta: u8 },
    CtxWithValue { ctx: u8, key: u8, value: u8, wide: bool },
    CtxWithoutCancel { ctx: u8 },
    Cancel { handle: u8, cause: u8 },
    DropCtx { ctx: u8 },
    DropHandle { handle: u8 },
    Export { s: u8 },
    CheckCtx { ctx: u8 },
    CheckSession { s: u8 },
    Bind { thread: usize, s: u8 },
    Unbind { thread: usize },
    Enter { thread: usize, s: u8 },
    Exit { thread: usize },
    GetCurrent { thread: usize, key: u8 },
    CurrentAction { thread: usize, action: u8, s: u8, key: u8, value: u8 },
    StoreBind { id: u64, s: u8 },
    StoreRemove { id: u64 },
    StoreGet { id: u64 },
    StoreGc { with: bool },
    Advance { ms: u64 },
    DonePoll { target: u8 },
    DoneRepoll { i: u8 },
    DoneDrop { i: u8 },
    AfterCancel { target: u8 },
    StopCallback { i: u8 },
    // Large maps and contexts (`big`).
    BulkInsert { s: u8, count: u8, start: u8, salt: u8 },
    BulkRemove { s: u8, count: u8, start: u8 },
    TwoThreads { s: u8, n: u8, mode: u8 },
    // User sessions and a key whose `Eq` panics (`custom`).
    NewCustom { value: u8, panicky: bool },
    CustomInvalidate { s: u8 },
    PanicKeyWrite { s: u8, k: u8, value: u8, armed: bool },
    PanicKeyRead { s: u8, k: u8 },
    // Metainfo and backup (`meta`).
    Meta { ctx: u8, kind: u8, k: u8, v: u8 },
    Backup { ctx: u8 },
    BackupQuery { kind: u8, ctx: u8, mode: u8 },
    // The global store and a `SingleSlotStore` through the free functions and guards (`stores`).
    Stores { store: u8, kind: u8, s: u8 },
    // `WithSession` futures (`future`).
    FutNew { s: u8, kind: u8 },
    FutPoll { i: u8, action: u8, s: u8 },
    FutDrop { i: u8 },
    // The task table (`tasks`).
    Task { kind: u8, id: u8, s: u8 },
    TaskTerminateMany { n: u8, base: u8 },
    // Timers of the timer clock (`timer`).
    FireTimers { i: u8, how: u8 },
}

const OP_KINDS: u8 = 54;

struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }
}

fn store_id(b: u8) -> u64 {
    if b >= 250 { u64::MAX - u64::from(b - 250) } else { u64::from(b % STORE_IDS) }
}

fn decode_op(input: &mut Input<'_>) -> Option<Op> {
    let mut b = || input.byte();
    Some(match b()? % OP_KINDS {
        0 => Op::NewCtx { over: b()? },
        1 => Op::NewCtxDeadline { over: b()?, delta: b()? % 16 },
        2 => Op::NewMap { over: b()? },
        3 => Op::NewMapDeadline { delta: b()? % 16 },
        4 => Op::WithValue { s: b()?, key: b()? % CODES, value: b()?, how: b()? % 4 },
        5 => Op::Fork { s: b()? },
        6 => {
            let s = b()?;
            Op::Disable { s, via_any: b()? % 2 == 0 }
        }
        7 => Op::CloneSession { s: b()? },
        8 => Op::DropSession { s: b()? },
        9 => Op::MapRemove { s: b()?, key: b()? % CODES },
        10 => Op::Get { s: b()?, key: b()? % CODES },
        11 => Op::CtxWithCancel { over: b()? },
        12 => Op::CtxWithDeadline { over: b()?, delta: b()? % 16 },
        13 => {
            let (ctx, key, value) = (b()?, b()? % CODES, b()?);
            Op::CtxWithValue { ctx, key, value, wide: value % 2 == 1 }
        }
        14 => Op::CtxWithoutCancel { ctx: b()? },
        15 => Op::Cancel { handle: b()?, cause: b()? % 4 },
        16 => Op::DropCtx { ctx: b()? },
        17 => Op::DropHandle { handle: b()? },
        18 => Op::Export { s: b()? },
        19 => Op::CheckCtx { ctx: b()? },
        20 => Op::CheckSession { s: b()? },
        21 => Op::Bind { thread: usize::from(b()?) % THREADS, s: b()? },
        22 => Op::Unbind { thread: usize::from(b()?) % THREADS },
        23 => Op::Enter { thread: usize::from(b()?) % THREADS, s: b()? },
        24 => Op::Exit { thread: usize::from(b()?) % THREADS },
        25 => Op::GetCurrent { thread: usize::from(b()?) % THREADS, key: b()? % CODES },
        26 => Op::CurrentAction {
            thread: usize::from(b()?) % THREADS,
            action: b()? % 5,
            s: b()?,
            key: b()? % CODES,
            value: b()?,
        },
        27 => Op::StoreBind { id: store_id(b()?), s: b()? },
        28 => Op::StoreRemove { id: store_id(b()?) },
        29 => Op::StoreGet { id: store_id(b()?) },
        30 => Op::StoreGc { with: b()? % 2 == 0 },
        31 => Op::Advance { ms: 1 + u64::from(b()? % 8) },
        32 => Op::DonePoll { target: b()? },
        33 => Op::DoneRepoll { i: b()? },
        34 => Op::DoneDrop { i: b()? },
        35 => Op::AfterCancel { target: b()? },
        36 => Op::StopCallback { i: b()? },
        37 => Op::BulkInsert { s: b()?, count: b()?, start: b()?, salt: b()? },
        38 => Op::BulkRemove { s: b()?, count: b()?, start: b()? },
        39 => Op::TwoThreads { s: b()?, n: b()?, mode: b()? },
        40 => {
            let value = b()?;
            Op::NewCustom { value, panicky: b()? % 2 == 1 }
        }
        41 => Op::CustomInvalidate { s: b()? },
        42 => {
            let (s, k, value) = (b()?, b()? % PANIC_CODES, b()?);
            Op::PanicKeyWrite { s, k, value, armed: b()? % 2 == 1 }
        }
        43 => Op::PanicKeyRead { s: b()?, k: b()? % PANIC_CODES },
        44 => Op::Meta { ctx: b()?, kind: b()?, k: b()?, v: b()? },
        45 => Op::Backup { ctx: b()? },
        46 => Op::BackupQuery { kind: b()?, ctx: b()?, mode: b()? },
        47 => Op::Stores { store: b()?, kind: b()?, s: b()? },
        48 => Op::FutNew { s: b()?, kind: b()? },
        49 => Op::FutPoll { i: b()?, action: b()?, s: b()? },
        50 => Op::FutDrop { i: b()? },
        51 => Op::Task { kind: b()?, id: b()?, s: b()? },
        52 => Op::TaskTerminateMany { n: b()?, base: b()? },
        _ => Op::FireTimers { i: b()?, how: b()? },
    })
}

/// The shard count (1 to 4, from the first byte's low bits), whether deadlines use the timer
/// clock (its bit 2), and the operations `data` decodes to.
fn decode(data: &[u8]) -> (usize, bool, Vec<Op>) {
    let mut input = Input { data };
    let Some(first) = input.byte() else { return (1, false, Vec::new()) };
    let shards = 1 + usize::from(first % 4);
    let timers = first & 4 != 0;
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS {
        match decode_op(&mut input) {
            Some(op) => ops.push(op),
            None => break,
        }
    }
    (shards, timers, ops)
}

/// The decoded operations, one per line, for reporting a reproducer.
#[must_use]
pub fn describe(data: &[u8]) -> String {
    let (shards, timers, ops) = decode(data);
    let mut out = format!("shards: {shards}, timer clock: {timers}\n");
    for (i, op) in ops.iter().enumerate() {
        out.push_str(&format!("{i:3}: {op:?}\n"));
    }
    out
}

/// Decodes `data` into operations and runs them against the library and the model; panics on
/// any disagreement.
pub fn run(data: &[u8]) {
    quiet_fuzz_panics();
    let _serial = RUN_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let (shards, timers, ops) = decode(data);
    NOW_MS.with(|n| n.set(0));
    drop(TIMERS.with(RefCell::take));
    custom::disarm();
    stores::reset();
    let mut interp = Interp::new(shards, timers);
    for op in ops {
        interp.apply(op);
    }
    interp.finish();
    stores::reset();
    drop(TIMERS.with(RefCell::take));
}

// ---------------------------------------------------------------------------------------------
// The model.

/// A bound value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    U32(u32),
    U64(u64),
}

impl Val {
    fn as_u32(self) -> Option<u32> {
        match self {
            Val::U32(v) => Some(v),
            Val::U64(_) => None,
        }
    }
    fn as_u64(self) -> Option<u64> {
        match self {
            Val::U64(v) => Some(v),
            Val::U32(_) => None,
        }
    }
}

/// Key code -> value (`TYPED_CODE` is the typed key, always a `u32`; codes from
/// [`custom::PANIC_BASE`] are [`PanicKey`]s).
type Values = BTreeMap<u8, Val>;

/// The `u16` keys of large maps and contexts (`big`): key -> `u32` value.
type BigValues = BTreeMap<u16, u32>;

/// Why a scope is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Canceled,
    Deadline,
    A,
    B,
}

#[derive(Debug)]
struct ScopeModel {
    /// Effective deadline in ms: the minimum along the path.
    deadline: Option<u64>,
    settled: Option<Cause>,
    children: Vec<usize>,
    /// The timer clock was asked for this scope's expiry (it asks once per scope).
    armed: bool,
}

#[derive(Debug)]
struct MapModel {
    scope: usize,
    values: Values,
    big: BigValues,
}

#[derive(Debug, Clone)]
enum SessionModel {
    Ctx {
        scope: usize,
        values: Values,
        big: Arc<BigValues>,
        meta: MetaModel,
    },
    Map {
        map: usize,
    },
    /// An [`AnySession::custom`] user session: valid until `CustomInvalidate` settles its
    /// scope (which nothing else reaches); `panicky` ones panic on reads of odd codes.
    Custom {
        scope: usize,
        values: Values,
        panicky: bool,
    },
}

/// A pooled session: the real handle, what it should show, and its identity class (entries
/// with the same `ident` are the same session).
#[derive(Debug, Clone)]
struct Entry {
    real: AnySession,
    model: SessionModel,
    ident: u32,
}

struct CtxEntry {
    real: Context,
    scope: Option<usize>,
    values: Values,
    meta: MetaModel,
}

struct HandleEntry {
    real: CancelHandle,
    scope: usize,
}

struct DoneEntry {
    fut: Done,
    scope: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallbackState {
    /// Registered on a context without a scope: never runs.
    Never,
    Registered,
    Ran,
    Stopped,
}

struct CallbackEntry {
    handle: Option<AfterCancel>,
    runs: Arc<AtomicU32>,
    scope: Option<usize>,
    state: CallbackState,
}

/// A virtual thread: its slot, the session the slot should hold, and its enter guards.
struct Thread {
    slot: LocalSlot,
    current: Option<Entry>,
    guards: Vec<Guard>,
}

/// What `enter` replaced: restored on exit.
struct Guard {
    prev_real: Option<AnySession>,
    prev_model: Option<Entry>,
}

struct Interp {
    now: u64,
    scopes: Vec<ScopeModel>,
    maps: Vec<MapModel>,
    sessions: Vec<Entry>,
    ctxs: Vec<CtxEntry>,
    handles: Vec<HandleEntry>,
    dones: Vec<DoneEntry>,
    callbacks: Vec<CallbackEntry>,
    threads: Vec<Thread>,
    store: ShardedStore,
    store_model: HashMap<u64, Entry>,
    shards: usize,
    next_ident: u32,
    cause_a: ContextError,
    cause_b: ContextError,
    /// The clock of every deadline of this run.
    clock: &'static dyn Clock,
    /// Whether `clock` is the timer clock. (Not told by comparing addresses: the two clocks
    /// are zero-sized statics, which may share one address, and did in debug and fuzz builds.)
    timer_clock: bool,
    /// Timers the timer clock holds: `(at, scope)`, in the order of `TIMERS`.
    timers: Vec<(u64, usize)>,
    /// Keys the bulk operations may still write in this run (keeps each run fast).
    bulk_budget: usize,
    /// Two-thread batches run so far.
    two_thread_runs: u8,
    /// The global store and the second `SingleSlotStore` (`stores`).
    stores: stores::StoresModel,
    futures: Vec<future::FutEntry>,
    tasks: TaskTable,
    task_model: tasks::TaskModel,
    /// The validity flag of each user session's scope.
    custom_flags: HashMap<usize, Arc<AtomicBool>>,
}

fn pick(b: u8, len: usize) -> Option<usize> {
    (len > 0).then(|| usize::from(b) % len)
}

fn noop_poll(fut: &mut Done) -> bool {
    let mut cx = TaskContext::from_waker(Waker::noop());
    Pin::new(fut).poll(&mut cx).is_ready()
}

/// Reads key `code` as a `u32` and as a `u64` from a session.
fn read_session(s: &AnySession, code: u8) -> (Option<u32>, Option<u64>) {
    if code == TYPED_CODE {
        (s.read_key(&TYPED, |v| v.copied()), None)
    } else if let Some(k) = custom::panic_key(code) {
        (s.read(&k, |v: Option<&u32>| v.copied()), s.read(&k, |v: Option<&u64>| v.copied()))
    } else {
        (s.read(&code, |v: Option<&u32>| v.copied()), s.read(&code, |v: Option<&u64>| v.copied()))
    }
}

/// Reads key `code` as a `u32` and as a `u64` from a context.
fn read_ctx(c: &Context, code: u8) -> (Option<u32>, Option<u64>) {
    if code == TYPED_CODE {
        (c.get(&TYPED).copied(), None)
    } else if let Some(k) = custom::panic_key(code) {
        (c.value::<u32, _>(&k).copied(), c.value::<u64, _>(&k).copied())
    } else {
        (c.value::<u32, _>(&code).copied(), c.value::<u64, _>(&code).copied())
    }
}

fn want(values: &Values, code: u8) -> (Option<u32>, Option<u64>) {
    let v = values.get(&code).copied();
    (v.and_then(Val::as_u32), v.and_then(Val::as_u64))
}

fn same_session(got: Option<&AnySession>, want: Option<&Entry>, what: &str) {
    match (got, want) {
        (None, None) => {}
        (Some(g), Some(w)) => assert!(g.ptr_eq(&w.real), "{what}: got another session than {:?}", w.model),
        (Some(_), None) => panic!("{what}: got a session, expected none"),
        (None, Some(w)) => panic!("{what}: got no session, expected {:?}", w.model),
    }
}

/// Every key code a check reads: the `u8` keys, the typed key and the [`PanicKey`]s.
fn all_codes() -> impl Iterator<Item = u8> {
    (0..CODES).chain(custom::PANIC_BASE..custom::PANIC_BASE + PANIC_CODES)
}

impl Interp {
    fn new(shards: usize, timers: bool) -> Interp {
        let store = ShardedStore::new(ManagerOptions { shard_number: shards, ..Default::default() }, || None)
            .expect("1 to 4 shards are valid");
        Interp {
            now: 0,
            scopes: Vec::new(),
            maps: Vec::new(),
            sessions: Vec::new(),
            ctxs: Vec::new(),
            handles: Vec::new(),
            dones: Vec::new(),
            callbacks: Vec::new(),
            threads: (0..THREADS)
                .map(|_| Thread { slot: LocalSlot::new(), current: None, guards: Vec::new() })
                .collect(),
            store,
            store_model: HashMap::new(),
            shards,
            next_ident: 0,
            cause_a: ContextError::cause(FuzzCause(1)),
            cause_b: ContextError::cause(FuzzCause(2)),
            clock: if timers { &TIMER_CLOCK } else { &CLOCK },
            timer_clock: timers,
            timers: Vec::new(),
            bulk_budget: big::BULK_BUDGET,
            two_thread_runs: 0,
            stores: stores::StoresModel::default(),
            futures: Vec::new(),
            tasks: TaskTable::new(),
            task_model: tasks::TaskModel::default(),
            custom_flags: HashMap::new(),
        }
    }

    fn instant(&self, ms: u64) -> Instant {
        Instant::from_clock_time(self.clock, Duration::from_millis(ms))
    }

    /// `s`'s read of `code`, or — when the model says the read panics (a panicky user
    /// session) — a check that it does, and the model's answer.
    fn read_model(&self, s: &AnySession, m: &SessionModel, code: u8) -> (Option<u32>, Option<u64>) {
        if custom::read_panics(m, code) {
            assert!(catch_fuzz(|| read_session(s, code)).is_err(), "read of code {code} of {m:?} did not panic");
            return want(self.values_of(m), code);
        }
        read_session(s, code)
    }

    // --- scopes ---

    fn open_scope(&mut self, parent: Option<usize>, own_deadline: Option<u64>) -> usize {
        let id = self.scopes.len();
        let parent_deadline = parent.and_then(|p| self.scopes[p].deadline);
        let deadline = match (own_deadline, parent_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Born settled (with the parent's cause) under a settled parent.
        let settled = parent.and_then(|p| self.scopes[p].settled);
        if let Some(p) = parent {
            self.scopes[p].children.push(id);
        }
        self.scopes.push(ScopeModel { deadline, settled, children: Vec::new(), armed: false });
        id
    }

    fn expired(&self, s: usize) -> bool {
        self.scopes[s].deadline.is_some_and(|d| self.now >= d)
    }

    fn done(&self, s: Option<usize>) -> bool {
        s.is_some_and(|s| self.scopes[s].settled.is_some() || self.expired(s))
    }

    fn err(&self, s: Option<usize>) -> Option<Cause> {
        let s = s?;
        self.scopes[s].settled.or_else(|| self.expired(s).then_some(Cause::Deadline))
    }

    fn real_err(&self, c: Cause) -> ContextError {
        match c {
            Cause::Canceled => ContextError::Canceled,
            Cause::Deadline => ContextError::DeadlineExceeded,
            Cause::A => self.cause_a.clone(),
            Cause::B => self.cause_b.clone(),
        }
    }

    /// Settles `s` and every unsettled scope under it; `false` if `s` was settled already.
    fn settle(&mut self, s: usize, cause: Cause) -> bool {
        if self.scopes[s].settled.is_some() {
            return false;
        }
        let mut newly = Vec::new();
        let mut stack = vec![s];
        while let Some(t) = stack.pop() {
            if self.scopes[t].settled.is_some() {
                continue; // its subtree settled with it
            }
            let c = if cause != Cause::Deadline && self.expired(t) { Cause::Deadline } else { cause };
            self.scopes[t].settled = Some(c);
            newly.push(t);
            stack.extend_from_slice(&self.scopes[t].children);
        }
        for cb in &mut self.callbacks {
            if cb.state == CallbackState::Registered && cb.scope.is_some_and(|sc| newly.contains(&sc)) {
                cb.state = CallbackState::Ran;
            }
        }
        true
    }

    /// `CancelHandle::cancel_with_cause` / `disable` on scope `s`: what it returns.
    fn cancel(&mut self, s: usize, cause: Cause) -> bool {
        let expired = cause != Cause::Deadline && self.expired(s);
        let settled = self.settle(s, if expired { Cause::Deadline } else { cause });
        settled && !expired
    }

    fn fresh_ident(&mut self) -> u32 {
        self.next_ident += 1;
        self.next_ident
    }

    fn scope_of(&self, m: &SessionModel) -> usize {
        match m {
            SessionModel::Ctx { scope, .. } | SessionModel::Custom { scope, .. } => *scope,
            SessionModel::Map { map } => self.maps[*map].scope,
        }
    }

    fn values_of<'a>(&'a self, m: &'a SessionModel) -> &'a Values {
        match m {
            SessionModel::Ctx { values, .. } | SessionModel::Custom { values, .. } => values,
            SessionModel::Map { map } => &self.maps[*map].values,
        }
    }

    /// The `u16` keys a session holds (none for user sessions).
    fn big_of<'a>(&'a self, m: &'a SessionModel) -> Option<&'a BigValues> {
        match m {
            SessionModel::Ctx { big, .. } => Some(big),
            SessionModel::Map { map } => Some(&self.maps[*map].big),
            SessionModel::Custom { .. } => None,
        }
    }

    fn push_session(&mut self, e: Entry) {
        self.check_session(&e, "new session");
        if self.sessions.len() < MAX_SESSIONS {
            self.sessions.push(e);
        }
    }

    fn push_ctx(&mut self, c: CtxEntry) {
        self.check_ctx(&c, "new context");
        if self.ctxs.len() < MAX_CONTEXTS {
            self.ctxs.push(c);
        }
    }

    /// A context to build on: pooled context `b % len`, or the background when `b % (len + 1)`
    /// is `len`.
    fn base_ctx(&self, b: u8) -> (Context, Option<usize>, Values) {
        match pick(b, self.ctxs.len() + 1).and_then(|i| self.ctxs.get(i)) {
            Some(c) => (c.real.clone(), c.scope, c.values.clone()),
            None => (Context::background(), None, Values::new()),
        }
    }

    /// The metainfo of the context `base_ctx(b)` picks.
    fn base_meta(&self, b: u8) -> MetaModel {
        match pick(b, self.ctxs.len() + 1).and_then(|i| self.ctxs.get(i)) {
            Some(c) => c.meta.clone(),
            None => MetaModel::default(),
        }
    }

    // --- checks ---

    fn check_session(&self, e: &Entry, what: &str) {
        let scope = self.scope_of(&e.model);
        let want_err = self.err(Some(scope));
        assert_eq!(e.real.is_valid(), want_err.is_none(), "{what}: is_valid of {:?}", e.model);
        assert_eq!(Session::is_valid(&e.real), want_err.is_none(), "{what}: Session::is_valid");
        let real_err = match (&e.real, &e.model) {
            (AnySession::Ctx(s), SessionModel::Ctx { .. }) => s.err(),
            (AnySession::Map(m), SessionModel::Map { .. }) => m.err(),
            (AnySession::Custom(_), SessionModel::Custom { .. }) => e.real.err(),
            _ => panic!("{what}: session kind differs from the model: {:?} vs {:?}", e.real, e.model),
        };
        assert_eq!(real_err, want_err.map(|c| self.real_err(c)), "{what}: err of {:?}", e.model);
        let values = self.values_of(&e.model);
        for code in all_codes() {
            let got = self.read_model(&e.real, &e.model, code);
            assert_eq!(got, want(values, code), "{what}: key {code} of {:?}", e.model);
        }
        assert_eq!(e.real.read(&MISSING, |v: Option<&u32>| v.copied()), None, "{what}: missing key");
        assert_eq!(e.real.read(&1u16, |v: Option<&u32>| v.copied()), None, "{what}: u16 key read as a u8 key");
        if let Some(big) = self.big_of(&e.model) {
            big::check_big_sample(&e.real, big, what);
        }
        if let AnySession::Map(m) = &e.real {
            let len = values.len() + self.big_of(&e.model).map_or(0, BTreeMap::len);
            assert_eq!(m.len(), len, "{what}: len of {:?}", e.model);
            assert_eq!(m.is_empty(), len == 0, "{what}: is_empty");
        }
    }

    fn check_session_validity(&self, e: &Entry, what: &str) {
        let valid = !self.done(Some(self.scope_of(&e.model)));
        assert_eq!(e.real.is_valid(), valid, "{what}: is_valid of {:?}", e.model);
    }

    fn check_ctx_validity(&self, c: &CtxEntry, what: &str) {
        assert_eq!(c.real.is_done(), self.done(c.scope), "{what}: is_done");
        assert_eq!(c.real.err(), self.err(c.scope).map(|e| self.real_err(e)), "{what}: err");
    }

    fn check_ctx(&self, c: &CtxEntry, what: &str) {
        self.check_ctx_validity(c, what);
        let deadline = c.real.deadline().map(|d| d.since_origin());
        let want_deadline = c.scope.and_then(|s| self.scopes[s].deadline).map(Duration::from_millis);
        assert_eq!(deadline, want_deadline, "{what}: deadline");
        for code in all_codes() {
            assert_eq!(read_ctx(&c.real, code), want(&c.values, code), "{what}: key {code}");
        }
        assert_eq!(c.real.value::<u32, _>(&MISSING), None, "{what}: missing key");
        assert_eq!(c.real.value::<u32, _>(&1u16), None, "{what}: u16 key read as a u8 key");
        meta::check_meta(&c.real, &c.meta, what);
    }

    fn check_callbacks(&self) {
        for (i, cb) in self.callbacks.iter().enumerate() {
            let want = u32::from(cb.state == CallbackState::Ran);
            assert_eq!(cb.runs.load(Ordering::Relaxed), want, "callback {i} ({:?}) runs", cb.state);
        }
    }

    /// After anything that can change validity: every session, context, handle and callback.
    fn check_all_validity(&self, what: &str) {
        for e in &self.sessions {
            self.check_session_validity(e, what);
        }
        for c in &self.ctxs {
            self.check_ctx_validity(c, what);
        }
        for h in &self.handles {
            assert_eq!(h.real.is_cancelled(), self.done(Some(h.scope)), "{what}: handle is_cancelled");
        }
        self.check_callbacks();
    }

    fn check_current(&self, t: usize, what: &str) {
        let th = &self.threads[t];
        th.slot.with(|cur| same_session(cur, th.current.as_ref(), what));
        assert_eq!(th.slot.is_set(), th.current.is_some(), "{what}: is_set");
    }

    fn check_store(&self, what: &str) {
        assert_eq!(self.store.len(), self.store_model.len(), "{what}: store len");
        assert_eq!(self.store.is_empty(), self.store_model.is_empty(), "{what}: store is_empty");
    }

    // --- operations ---

    fn apply(&mut self, op: Op) {
        match op {
            Op::NewCtx { over } => {
                let (ctx, scope, values) = self.base_ctx(over);
                let meta = self.base_meta(over);
                let real = SessionCtx::new(&ctx);
                let scope = self.open_scope(scope, None);
                let ident = self.fresh_ident();
                let model = SessionModel::Ctx { scope, values, big: Arc::default(), meta };
                self.push_session(Entry { real: real.into(), model, ident });
            }
            Op::NewCtxDeadline { over, delta } => {
                let (ctx, scope, values) = self.base_ctx(over);
                let meta = self.base_meta(over);
                let at = self.now + u64::from(delta);
                let real = SessionCtx::with_deadline(&ctx, self.instant(at));
                let scope = self.open_scope(scope, Some(at));
                let ident = self.fresh_ident();
                let model = SessionModel::Ctx { scope, values, big: Arc::default(), meta };
                self.push_session(Entry { real: real.into(), model, ident });
            }
            Op::NewMap { over } => {
                let background = pick(over, self.ctxs.len() + 1).is_none_or(|i| i == self.ctxs.len());
                let (real, parent) = if background {
                    (SessionMap::new(), None)
                } else {
                    let (ctx, scope, _) = self.base_ctx(over);
                    (SessionMap::new_in(&ctx), scope)
                };
                let scope = self.open_scope(parent, None);
                self.new_map_entry(real, scope);
            }
            Op::NewMapDeadline { delta } => {
                let at = self.now + u64::from(delta);
                let real = SessionMap::with_deadline(self.instant(at));
                let scope = self.open_scope(None, Some(at));
                self.new_map_entry(real, scope);
            }
            Op::WithValue { s, key, value, how } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let e = self.sessions[i].clone();
                let derived = self.derive(&e, key, value, how);
                self.push_session(derived);
            }
            Op::Fork { s } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let e = self.sessions[i].clone();
                match (&e.real, &e.model) {
                    (AnySession::Ctx(real), SessionModel::Ctx { scope, values, big, meta }) => {
                        let forked = real.fork();
                        let (values, big, meta) = (values.clone(), big.clone(), meta.clone());
                        let scope = self.open_scope(Some(*scope), None);
                        let ident = self.fresh_ident();
                        let model = SessionModel::Ctx { scope, values, big, meta };
                        self.push_session(Entry { real: forked.into(), model, ident });
                    }
                    // A map has no fork: another handle to the same map.
                    _ => self.push_session(e),
                }
            }
            Op::Disable { s, via_any } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let e = &self.sessions[i];
                let got = match (&e.real, via_any) {
                    (real, true) => real.disable(),
                    (AnySession::Ctx(real), false) => real.disable(),
                    (AnySession::Map(real), false) => real.disable(),
                    (AnySession::Custom(_), false) => e.real.disable(),
                };
                let scope = self.scope_of(&e.model);
                // A user session cannot be disabled through `AnySession`.
                let custom = matches!(e.model, SessionModel::Custom { .. });
                let want = !custom && self.cancel(scope, Cause::Canceled);
                assert_eq!(got, want, "disable() of session {i} (scope {scope})");
                self.check_all_validity("after disable");
            }
            Op::CloneSession { s } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let e = self.sessions[i].clone();
                self.push_session(e);
            }
            Op::DropSession { s } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                drop(self.sessions.swap_remove(i));
            }
            Op::MapRemove { s, key } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let AnySession::Map(map) = &self.sessions[i].real else { return };
                let SessionModel::Map { map: m } = self.sessions[i].model else { unreachable!("a map entry") };
                let got = if key == TYPED_CODE { map.remove_key(&TYPED) } else { map.remove(&key) };
                let want = self.maps[m].values.remove(&key).is_some();
                assert_eq!(got, want, "remove({key}) on map {m}");
                assert_eq!(map.len(), self.maps[m].values.len() + self.maps[m].big.len(), "len after remove");
            }
            Op::Get { s, key } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let e = &self.sessions[i];
                let values = self.values_of(&e.model);
                let want_v = want(values, key);
                assert_eq!(self.read_model(&e.real, &e.model, key), want_v, "get key {key} of {:?}", e.model);
                match &e.real {
                    AnySession::Map(map) if key == TYPED_CODE => {
                        assert_eq!(map.get(&TYPED).map(|v| *v), want_v.0, "map.get(TYPED)");
                    }
                    AnySession::Map(map) => {
                        assert_eq!(map.value::<u32, _>(&key).map(|v| *v), want_v.0, "map.value::<u32>({key})");
                        assert_eq!(map.value::<u64, _>(&key).map(|v| *v), want_v.1, "map.value::<u64>({key})");
                        assert_eq!(map.contains(&key), values.contains_key(&key), "map.contains({key})");
                    }
                    AnySession::Ctx(ctx) if key == TYPED_CODE => {
                        assert_eq!(ctx.get(&TYPED).copied(), want_v.0, "ctx.get(TYPED)");
                    }
                    AnySession::Ctx(ctx) => {
                        assert_eq!(ctx.value::<u32, _>(&key).copied(), want_v.0, "ctx.value::<u32>({key})");
                    }
                    AnySession::Custom(_) => {
                        if !custom::read_panics(&e.model, key) && key != TYPED_CODE {
                            assert_eq!(e.real.value_cloned::<u32, _>(&key), want_v.0, "custom value_cloned({key})");
                            assert_eq!(
                                e.real.try_value_cloned::<u32, _>(&key).ok(),
                                want_v.0,
                                "custom try_value_cloned"
                            );
                        }
                    }
                }
            }
            Op::CtxWithCancel { over } => {
                let (ctx, scope, values) = self.base_ctx(over);
                let meta = self.base_meta(over);
                let (real, handle) = ctx.with_cancel();
                let scope = self.open_scope(scope, None);
                self.push_handle(handle, scope);
                self.push_ctx(CtxEntry { real, scope: Some(scope), values, meta });
            }
            Op::CtxWithDeadline { over, delta } => {
                let (ctx, scope, values) = self.base_ctx(over);
                let meta = self.base_meta(over);
                let at = self.now + u64::from(delta);
                let (real, handle) = ctx.with_deadline(self.instant(at));
                let scope = self.open_scope(scope, Some(at));
                self.push_handle(handle, scope);
                self.push_ctx(CtxEntry { real, scope: Some(scope), values, meta });
            }
            Op::CtxWithValue { ctx, key, value, wide } => {
                let Some(i) = pick(ctx, self.ctxs.len()) else { return };
                let c = &self.ctxs[i];
                let mut values = c.values.clone();
                let real = if key == TYPED_CODE {
                    values.insert(key, Val::U32(u32::from(value)));
                    c.real.with(&TYPED, u32::from(value))
                } else if wide {
                    values.insert(key, Val::U64(u64::from(value) << 32));
                    c.real.with_value(key, u64::from(value) << 32)
                } else {
                    values.insert(key, Val::U32(u32::from(value)));
                    c.real.with_value(key, u32::from(value))
                };
                let (scope, meta) = (c.scope, c.meta.clone());
                self.push_ctx(CtxEntry { real, scope, values, meta });
            }
            Op::CtxWithoutCancel { ctx } => {
                let Some(i) = pick(ctx, self.ctxs.len()) else { return };
                let c = &self.ctxs[i];
                let entry = CtxEntry {
                    real: c.real.without_cancel(),
                    scope: None,
                    values: c.values.clone(),
                    meta: c.meta.clone(),
                };
                self.push_ctx(entry);
            }
            Op::Cancel { handle, cause } => {
                let Some(i) = pick(handle, self.handles.len()) else { return };
                let cause = [Cause::Canceled, Cause::A, Cause::B, Cause::Deadline][usize::from(cause)];
                let got = match cause {
                    Cause::Canceled => self.handles[i].real.cancel(),
                    c => self.handles[i].real.cancel_with_cause(self.real_err(c)),
                };
                let want = self.cancel(self.handles[i].scope, cause);
                assert_eq!(got, want, "cancel({cause:?}) return value");
                self.check_all_validity("after cancel");
            }
            Op::DropCtx { ctx } => {
                if let Some(i) = pick(ctx, self.ctxs.len()) {
                    drop(self.ctxs.swap_remove(i));
                }
            }
            Op::DropHandle { handle } => {
                if let Some(i) = pick(handle, self.handles.len()) {
                    drop(self.handles.swap_remove(i));
                }
            }
            Op::Export { s } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let e = &self.sessions[i];
                let (real, meta) = match (&e.real, &e.model) {
                    (AnySession::Ctx(s), SessionModel::Ctx { meta, .. }) => (s.export(), meta.clone()),
                    // A map's base hides the context it was made in: no metainfo.
                    (AnySession::Map(m), _) => (m.export(), MetaModel::default()),
                    _ => {
                        assert!(e.real.export().is_none(), "AnySession::export of a user session");
                        return;
                    }
                };
                assert!(e.real.export().is_some(), "AnySession::export of a built-in session");
                let entry = CtxEntry {
                    real,
                    scope: Some(self.scope_of(&e.model)),
                    values: self.values_of(&e.model).clone(),
                    meta,
                };
                self.push_ctx(entry);
            }
            Op::CheckCtx { ctx } => {
                if let Some(i) = pick(ctx, self.ctxs.len()) {
                    self.check_ctx(&self.ctxs[i], "check context");
                }
            }
            Op::CheckSession { s } => {
                if let Some(i) = pick(s, self.sessions.len()) {
                    self.check_session(&self.sessions[i], "check session");
                }
            }
            Op::Bind { thread, s } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let e = self.sessions[i].clone();
                let th = &mut self.threads[thread];
                let prev = th.slot.replace(Some(e.real.clone()));
                same_session(prev.as_ref(), th.current.as_ref(), "bind: previous session");
                th.current = Some(e);
                self.check_current(thread, "after bind");
            }
            Op::Unbind { thread } => {
                let th = &mut self.threads[thread];
                let prev = th.slot.replace(None);
                same_session(prev.as_ref(), th.current.as_ref(), "unbind: previous session");
                th.current = None;
                self.check_current(thread, "after unbind");
            }
            Op::Enter { thread, s } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let e = self.sessions[i].clone();
                let th = &mut self.threads[thread];
                let prev_real = th.slot.replace(Some(e.real.clone()));
                same_session(prev_real.as_ref(), th.current.as_ref(), "enter: previous session");
                let prev_model = th.current.replace(e);
                th.guards.push(Guard { prev_real, prev_model });
                self.check_current(thread, "after enter");
            }
            Op::Exit { thread } => self.exit(thread),
            Op::GetCurrent { thread, key } => self.get_current(thread, key),
            Op::CurrentAction { thread, action, s, key, value } => self.current_action(thread, action, s, key, value),
            Op::StoreBind { id, s } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let e = self.sessions[i].clone();
                let prev = self.store.bind(id, e.real.clone());
                same_session(prev.as_ref(), self.store_model.get(&id), "store bind: previous session");
                self.store_model.insert(id, e);
                self.check_store("after store bind");
            }
            Op::StoreRemove { id } => {
                let got = self.store.remove(id);
                let want = self.store_model.remove(&id);
                same_session(got.as_ref(), want.as_ref(), "store remove");
                self.check_store("after store remove");
            }
            Op::StoreGet { id } => {
                same_session(self.store.get(id).as_ref(), self.store_model.get(&id), "store get");
                // Its `ContextStore` face: the id function names no unit, so there is no current
                // session and binding hands the session back.
                with_current_in(&self.store, |cur| assert!(cur.is_none(), "store current without a unit"));
                if let Some(e) = self.sessions.first() {
                    let err = self.store.replace(Some(e.real.clone())).expect_err("replace without a unit");
                    same_session(err.into_session().as_ref(), Some(e), "session handed back by replace");
                }
                self.check_store("after store get");
            }
            Op::StoreGc { with } => {
                let got = if with { self.store.gc_with(AnySession::is_valid) } else { self.store.gc() };
                let before = self.store_model.len();
                let model = std::mem::take(&mut self.store_model);
                self.store_model =
                    model.into_iter().filter(|(_, e)| !self.done(Some(self.scope_of(&e.model)))).collect();
                assert_eq!(got, before - self.store_model.len(), "gc() count");
                self.check_store("after gc");
            }
            Op::Advance { ms } => {
                self.now += ms;
                NOW_MS.with(|n| n.set(self.now));
                self.check_all_validity("after advancing the clock");
            }
            Op::DonePoll { target } => {
                let Some((mut fut, scope)) = self.done_future(target) else { return };
                if !self.poll_done(&mut fut, scope) && self.dones.len() < MAX_DONES {
                    self.dones.push(DoneEntry { fut, scope });
                }
            }
            Op::DoneRepoll { i } => {
                let Some(i) = pick(i, self.dones.len()) else { return };
                let mut d = self.dones.swap_remove(i);
                if !self.poll_done(&mut d.fut, d.scope) {
                    self.dones.push(d);
                }
            }
            Op::DoneDrop { i } => {
                if let Some(i) = pick(i, self.dones.len()) {
                    drop(self.dones.swap_remove(i));
                }
            }
            Op::AfterCancel { target } => self.after_cancel(target),
            Op::BulkInsert { s, count, start, salt } => self.bulk_insert(s, count, start, salt),
            Op::BulkRemove { s, count, start } => self.bulk_remove(s, count, start),
            Op::TwoThreads { s, n, mode } => self.two_threads(s, n, mode),
            Op::NewCustom { value, panicky } => self.new_custom(value, panicky),
            Op::CustomInvalidate { s } => self.custom_invalidate(s),
            Op::PanicKeyWrite { s, k, value, armed } => self.panic_key_write(s, k, value, armed),
            Op::PanicKeyRead { s, k } => self.panic_key_read(s, k),
            Op::Meta { ctx, kind, k, v } => self.meta_op(ctx, kind, k, v),
            Op::Backup { ctx } => self.backup(ctx),
            Op::BackupQuery { kind, ctx, mode } => self.backup_query(kind, ctx, mode),
            Op::Stores { store, kind, s } => self.store_op(store, kind, s),
            Op::FutNew { s, kind } => self.fut_new(s, kind),
            Op::FutPoll { i, action, s } => self.fut_poll(i, action, s),
            Op::FutDrop { i } => self.fut_drop(i),
            Op::Task { kind, id, s } => self.task_op(kind, id, s),
            Op::TaskTerminateMany { n, base } => self.task_terminate_many(n, base),
            Op::FireTimers { i, how } => self.fire_timers(i, how),
            Op::StopCallback { i } => {
                let Some(i) = pick(i, self.callbacks.len()) else { return };
                let cb = &mut self.callbacks[i];
                let Some(handle) = cb.handle.take() else { return };
                let got = handle.stop();
                let want = match cb.state {
                    CallbackState::Never => true,
                    CallbackState::Registered => {
                        cb.state = CallbackState::Stopped;
                        true
                    }
                    CallbackState::Ran => false,
                    CallbackState::Stopped => unreachable!("a stopped callback has no handle"),
                };
                assert_eq!(got, want, "AfterCancel::stop() in state {:?}", cb.state);
                self.check_callbacks();
            }
        }
    }

    fn new_map_entry(&mut self, real: SessionMap, scope: usize) {
        let map = self.maps.len();
        self.maps.push(MapModel { scope, values: Values::new(), big: BigValues::new() });
        let ident = self.fresh_ident();
        self.push_session(Entry { real: real.into(), model: SessionModel::Map { map }, ident });
    }

    fn push_handle(&mut self, real: CancelHandle, scope: usize) {
        if self.handles.len() < MAX_HANDLES {
            self.handles.push(HandleEntry { real, scope });
        }
    }

    /// `e` with `key` bound to `value`, through one of four write paths: a new session for a
    /// `SessionCtx`, the same (updated) map for a `SessionMap`.
    fn derive(&mut self, e: &Entry, key: u8, value: u8, how: u8) -> Entry {
        let wide = how == 3 && key != TYPED_CODE;
        let real: AnySession = match (how, key == TYPED_CODE) {
            // `AnySession::with_value` / `with`.
            (0, false) => e.real.with_value(key, u32::from(value)),
            (0, true) => e.real.with(&TYPED, u32::from(value)),
            // The erased `Session::with_value_dyn` path stores use.
            (1, false) => SessionExt::with_value(&e.real, key, u32::from(value)),
            (1, true) => e.real.with_value_dyn(DynKey::typed(&TYPED), Arc::new(u32::from(value))),
            // The concrete types' own methods.
            (2, typed) => match &e.real {
                AnySession::Ctx(s) if typed => s.with(&TYPED, u32::from(value)).into(),
                AnySession::Ctx(s) => s.with_value(key, u32::from(value)).into(),
                AnySession::Map(m) => {
                    if typed {
                        m.set(&TYPED, u32::from(value));
                    } else {
                        m.insert(key, u32::from(value));
                    }
                    m.clone().into()
                }
                AnySession::Custom(_) if typed => e.real.with(&TYPED, u32::from(value)),
                AnySession::Custom(_) => e.real.with_value(key, u32::from(value)),
            },
            (_, true) => e.real.with(&TYPED, u32::from(value)),
            (_, false) => e.real.with_value(key, u64::from(value) << 32),
        };
        let val = if wide { Val::U64(u64::from(value) << 32) } else { Val::U32(u32::from(value)) };
        self.derived(e, key, val, real)
    }

    /// Models `real`, derived from `e` with `key` bound to `val`.
    fn derived(&mut self, e: &Entry, key: u8, val: Val, real: AnySession) -> Entry {
        match &e.model {
            SessionModel::Ctx { scope, values, big, meta } => {
                assert!(real.as_ctx().is_some(), "with_value of a SessionCtx is not a SessionCtx");
                assert!(!real.ptr_eq(&e.real), "with_value of a SessionCtx returned the same session");
                let mut values = values.clone();
                values.insert(key, val);
                let model = SessionModel::Ctx { scope: *scope, values, big: big.clone(), meta: meta.clone() };
                let ident = self.fresh_ident();
                Entry { real, model, ident }
            }
            SessionModel::Custom { scope, values, panicky } => {
                // The user session keeps `u8` keys with `u32` values and ignores the rest.
                assert!(matches!(real, AnySession::Custom(_)), "with_value of a user session: {real:?}");
                assert!(!real.ptr_eq(&e.real), "with_value of a user session returned the same session");
                let mut values = values.clone();
                if key < KEYS && matches!(val, Val::U32(_)) {
                    values.insert(key, val);
                }
                let model = SessionModel::Custom { scope: *scope, values, panicky: *panicky };
                let ident = self.fresh_ident();
                Entry { real, model, ident }
            }
            SessionModel::Map { map } => {
                assert!(real.ptr_eq(&e.real), "with_value of a SessionMap returned another map");
                self.maps[*map].values.insert(key, val);
                Entry { real, model: e.model.clone(), ident: e.ident }
            }
        }
    }

    fn exit(&mut self, thread: usize) {
        let th = &mut self.threads[thread];
        let Some(guard) = th.guards.pop() else { return };
        let replaced = th.slot.replace(guard.prev_real);
        same_session(replaced.as_ref(), th.current.as_ref(), "exit: session replaced by the restore");
        th.current = guard.prev_model;
        self.check_current(thread, "after exit (restored)");
    }

    fn get_current(&self, thread: usize, key: u8) {
        let th = &self.threads[thread];
        if th.current.as_ref().is_some_and(|e| custom::read_panics(&e.model, key)) {
            // The read panics inside the slot's borrow: the slot must come out of it intact.
            assert!(catch_fuzz(|| th.slot.with(|cur| cur.map(|c| read_session(c, key)))).is_err(), "no panic");
            self.check_current(thread, "after a panic inside the slot's borrow");
            return;
        }
        th.slot.with(|cur| {
            same_session(cur, th.current.as_ref(), "current");
            let (Some(cur), Some(want_e)) = (cur, &th.current) else { return };
            assert_eq!(cur.is_valid(), !self.done(Some(self.scope_of(&want_e.model))), "current is_valid");
            let values = self.values_of(&want_e.model);
            assert_eq!(read_session(cur, key), want(values, key), "current key {key}");
            // Identity: the same session as every pooled handle of it, and no other.
            for e in &self.sessions {
                assert_eq!(cur.ptr_eq(&e.real), e.ident == want_e.ident, "current ptr_eq {:?}", e.model);
            }
        });
    }

    fn current_action(&mut self, thread: usize, action: u8, s: u8, key: u8, value: u8) {
        match action {
            // Replace the session while it is borrowed; the borrow stays readable.
            0 => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let new = self.sessions[i].clone();
                let th = &self.threads[thread];
                th.slot.with(|cur| {
                    same_session(cur, th.current.as_ref(), "current before replace");
                    let old = th.slot.replace(Some(new.real.clone()));
                    same_session(old.as_ref(), th.current.as_ref(), "replace while borrowed: previous");
                    drop(old);
                    if let (Some(cur), Some(m)) = (cur, &th.current) {
                        let values = self.values_of(&m.model);
                        for code in 0..CODES {
                            let got = self.read_model(cur, &m.model, code);
                            assert_eq!(got, want(values, code), "borrowed old session");
                        }
                    }
                    th.slot.with(|inner| same_session(inner, Some(&new), "nested read after replace"));
                });
                self.threads[thread].current = Some(new);
            }
            // Nested borrows, each replacing the slot; the slot ends up empty.
            1 => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let new = self.sessions[i].clone();
                let th = &self.threads[thread];
                th.slot.with(|outer| {
                    drop(th.slot.replace(Some(new.real.clone())));
                    th.slot.with(|inner| {
                        same_session(inner, Some(&new), "nested borrow");
                        let old = th.slot.replace(None);
                        same_session(old.as_ref(), Some(&new), "nested replace: previous");
                        drop(old);
                        let inner = inner.expect("checked above");
                        let values = self.values_of(&new.model);
                        let got = self.read_model(inner, &new.model, key);
                        assert_eq!(got, want(values, key), "inner borrow after replace");
                    });
                    if let (Some(outer), Some(m)) = (outer, &th.current) {
                        let got = self.read_model(outer, &m.model, key);
                        assert_eq!(got, want(self.values_of(&m.model), key), "outer borrow");
                    }
                    assert!(!th.slot.is_set(), "slot emptied inside the borrows");
                });
                self.threads[thread].current = None;
            }
            // Disable the current session through the borrow.
            2 => {
                let th = &self.threads[thread];
                let got = th.slot.with(|cur| cur.map(AnySession::disable));
                let Some(e) = th.current.as_ref() else {
                    assert_eq!(got, None, "disable of no current session");
                    return;
                };
                let custom = matches!(e.model, SessionModel::Custom { .. });
                let m = self.scope_of(&e.model);
                let want = !custom && self.cancel(m, Cause::Canceled);
                assert_eq!(got, Some(want), "disable() of the current session");
                self.check_all_validity("after disabling the current session");
            }
            // A fresh session owned by the slot alone, replaced while borrowed: the borrow must
            // stay readable although nothing but the slot's retired list keeps it alive.
            4 => {
                let code = key % KEYS;
                let fresh: AnySession = if value.is_multiple_of(2) {
                    SessionCtx::new(&Context::background()).with_value(code, u32::from(value)).into()
                } else {
                    let map = SessionMap::new();
                    map.insert(code, u32::from(value));
                    map.into()
                };
                let th = &self.threads[thread];
                let prev = th.slot.replace(Some(fresh));
                same_session(prev.as_ref(), th.current.as_ref(), "fresh bind: previous session");
                drop(prev);
                th.slot.with(|view| {
                    let view = view.expect("the fresh session is bound");
                    let old = th.slot.replace(None).expect("the fresh session is bound");
                    assert!(old.ptr_eq(view), "replace returned another session than the borrowed one");
                    drop(old);
                    th.slot.with(|inner| assert!(inner.is_none(), "slot emptied inside the borrow"));
                    assert!(view.is_valid(), "borrowed fresh session");
                    let got = view.read(&code, |v: Option<&u32>| v.copied());
                    assert_eq!(got, Some(u32::from(value)), "borrowed fresh session after its last handle dropped");
                });
                self.threads[thread].current = None;
                self.check_current(thread, "after the fresh session");
            }
            // Go's `BindSession(CurSession().WithValue(k, v))`.
            _ => {
                let Some(cur) = self.threads[thread].current.clone() else {
                    assert!(!self.threads[thread].slot.is_set(), "slot set without a current session");
                    return;
                };
                let derived_real = self.threads[thread].slot.with(|c| {
                    let c = c.expect("a current session");
                    if key == TYPED_CODE {
                        c.with(&TYPED, u32::from(value))
                    } else {
                        c.with_value(key, u32::from(value))
                    }
                });
                let derived = self.derived(&cur, key, Val::U32(u32::from(value)), derived_real);
                let th = &mut self.threads[thread];
                let prev = th.slot.replace(Some(derived.real.clone()));
                same_session(prev.as_ref(), Some(&cur), "rebind: previous session");
                th.current = Some(derived.clone());
                self.check_current(thread, "after rebind");
                self.push_session(derived);
            }
        }
    }

    fn done_future(&self, target: u8) -> Option<(Done, Option<usize>)> {
        if target.is_multiple_of(2) {
            let i = pick(target / 2, self.sessions.len())?;
            let e = &self.sessions[i];
            let fut = match &e.real {
                AnySession::Ctx(s) => s.done(),
                AnySession::Map(m) => m.done(),
                // A user session has no scope: its `done()` never resolves.
                AnySession::Custom(_) => return Some((e.real.done(), None)),
            };
            Some((fut, Some(self.scope_of(&e.model))))
        } else {
            let i = pick(target / 2, self.ctxs.len())?;
            Some((self.ctxs[i].real.done(), self.ctxs[i].scope))
        }
    }

    /// Polls once; `true` when ready. A poll past the deadline settles the scope.
    fn poll_done(&mut self, fut: &mut Done, scope: Option<usize>) -> bool {
        let want = self.done(scope);
        let got = noop_poll(fut);
        assert_eq!(got, want, "Done ready");
        if let Some(s) = scope.filter(|&s| self.scopes[s].settled.is_none() && self.expired(s)) {
            self.settle(s, Cause::Deadline);
        }
        if let (false, Some(s)) = (got, scope) {
            self.expect_arm(s, "a pending poll of done()");
        }
        self.check_all_validity("after polling done()");
        got
    }

    fn after_cancel(&mut self, target: u8) {
        if self.callbacks.len() >= MAX_CALLBACKS {
            return;
        }
        let (ctx, scope) = if target.is_multiple_of(2) {
            let Some(i) = pick(target / 2, self.sessions.len()) else { return };
            let e = &self.sessions[i];
            let Some(ctx) = e.real.export() else {
                assert!(matches!(e.model, SessionModel::Custom { .. }), "export of a built-in session");
                return;
            };
            (ctx, Some(self.scope_of(&e.model)))
        } else {
            let Some(i) = pick(target / 2, self.ctxs.len()) else { return };
            (self.ctxs[i].real.clone(), self.ctxs[i].scope)
        };
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        let handle = ctx.after_cancel(move || {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        let state = match scope {
            None => CallbackState::Never,
            Some(s) if self.scopes[s].settled.is_some() => CallbackState::Ran,
            Some(_) => CallbackState::Registered,
        };
        self.callbacks.push(CallbackEntry { handle: Some(handle), runs, scope, state });
        // Registering on an expired scope settles it (running the callback); otherwise a
        // registration asks the clock for the scope's timer.
        if let Some(s) = scope.filter(|&s| self.scopes[s].settled.is_none()) {
            if self.expired(s) {
                self.settle(s, Cause::Deadline);
            } else {
                self.expect_arm(s, "after_cancel");
            }
        }
        self.check_all_validity("after after_cancel");
    }

    /// Checks everything, then unwinds every thread's guards.
    fn finish(mut self) {
        self.check_all_validity("final");
        for e in &self.sessions {
            self.check_session(e, "final");
        }
        for c in &self.ctxs {
            self.check_ctx(c, "final");
        }
        for t in 0..THREADS {
            self.check_current(t, "final current");
            if let Some(e) = &self.threads[t].current {
                self.check_session(e, "final current");
            }
        }
        for id in (0..u64::from(STORE_IDS)).chain((0..6).map(|i| u64::MAX - i)) {
            same_session(self.store.get(id).as_ref(), self.store_model.get(&id), "final store get");
        }
        let mut lens = vec![0; self.shards];
        for &id in self.store_model.keys() {
            lens[(id % self.shards as u64) as usize] += 1;
        }
        assert_eq!(self.store.shard_lens(), lens, "shard_lens (id i lives in shard i % shards)");
        self.check_store("final");
        self.check_stores("final");
        self.check_tasks("final");
        self.check_timers("final");
        for t in 0..THREADS {
            while !self.threads[t].guards.is_empty() {
                self.exit(t);
            }
        }
        self.finish_stores();
        self.finish_futures();
    }
}

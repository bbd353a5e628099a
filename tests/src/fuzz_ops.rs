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
//!   and [`AfterCancel`] callbacks that count their runs.
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
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use localsession_core::{
    AfterCancel, AnySession, CancelHandle, Clock, Context, ContextError, ContextStore, Done, DynKey, Instant, Key,
    LocalSlot, ManagerOptions, Session, SessionCtx, SessionExt, SessionMap, ShardedStore, with_current_in,
};

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
    /// The manual clock's time in milliseconds, per OS thread (so parallel replays do not
    /// share it).
    static NOW_MS: Cell<u64> = const { Cell::new(0) };
}

/// A manual clock without a timer: expiry is only observed lazily.
struct FuzzClock;

impl Clock for FuzzClock {
    fn now(&self) -> Duration {
        Duration::from_millis(NOW_MS.with(Cell::get))
    }
}

static CLOCK: FuzzClock = FuzzClock;

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
}

const OP_KINDS: u8 = 37;

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
        _ => Op::StopCallback { i: b()? },
    })
}

/// The shard count (1 to 4, from the first byte) and the operations `data` decodes to.
fn decode(data: &[u8]) -> (usize, Vec<Op>) {
    let mut input = Input { data };
    let Some(first) = input.byte() else { return (1, Vec::new()) };
    let shards = 1 + usize::from(first % 4);
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS {
        match decode_op(&mut input) {
            Some(op) => ops.push(op),
            None => break,
        }
    }
    (shards, ops)
}

/// The decoded operations, one per line, for reporting a reproducer.
#[must_use]
pub fn describe(data: &[u8]) -> String {
    let (shards, ops) = decode(data);
    let mut out = format!("shards: {shards}\n");
    for (i, op) in ops.iter().enumerate() {
        out.push_str(&format!("{i:3}: {op:?}\n"));
    }
    out
}

/// Decodes `data` into operations and runs them against the library and the model; panics on
/// any disagreement.
pub fn run(data: &[u8]) {
    let (shards, ops) = decode(data);
    NOW_MS.with(|n| n.set(0));
    let mut interp = Interp::new(shards);
    for op in ops {
        interp.apply(op);
    }
    interp.finish();
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

/// Key code -> value (`TYPED_CODE` is the typed key, always a `u32`).
type Values = BTreeMap<u8, Val>;

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
}

#[derive(Debug)]
struct MapModel {
    scope: usize,
    values: Values,
}

#[derive(Debug, Clone)]
enum SessionModel {
    Ctx { scope: usize, values: Values },
    Map { map: usize },
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
}

fn pick(b: u8, len: usize) -> Option<usize> {
    (len > 0).then(|| usize::from(b) % len)
}

fn instant(ms: u64) -> Instant {
    Instant::from_clock_time(&CLOCK, Duration::from_millis(ms))
}

fn noop_poll(fut: &mut Done) -> bool {
    let mut cx = TaskContext::from_waker(Waker::noop());
    Pin::new(fut).poll(&mut cx).is_ready()
}

/// Reads key `code` as a `u32` and as a `u64` from a session.
fn read_session(s: &AnySession, code: u8) -> (Option<u32>, Option<u64>) {
    if code == TYPED_CODE {
        (s.read_key(&TYPED, |v| v.copied()), None)
    } else {
        (s.read(&code, |v: Option<&u32>| v.copied()), s.read(&code, |v: Option<&u64>| v.copied()))
    }
}

/// Reads key `code` as a `u32` and as a `u64` from a context.
fn read_ctx(c: &Context, code: u8) -> (Option<u32>, Option<u64>) {
    if code == TYPED_CODE {
        (c.get(&TYPED).copied(), None)
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

impl Interp {
    fn new(shards: usize) -> Interp {
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
        }
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
        self.scopes.push(ScopeModel { deadline, settled, children: Vec::new() });
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
            SessionModel::Ctx { scope, .. } => *scope,
            SessionModel::Map { map } => self.maps[*map].scope,
        }
    }

    fn values_of<'a>(&'a self, m: &'a SessionModel) -> &'a Values {
        match m {
            SessionModel::Ctx { values, .. } => values,
            SessionModel::Map { map } => &self.maps[*map].values,
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

    // --- checks ---

    fn check_session(&self, e: &Entry, what: &str) {
        let scope = self.scope_of(&e.model);
        let want_err = self.err(Some(scope));
        assert_eq!(e.real.is_valid(), want_err.is_none(), "{what}: is_valid of {:?}", e.model);
        assert_eq!(Session::is_valid(&e.real), want_err.is_none(), "{what}: Session::is_valid");
        let real_err = match (&e.real, &e.model) {
            (AnySession::Ctx(s), SessionModel::Ctx { .. }) => s.err(),
            (AnySession::Map(m), SessionModel::Map { .. }) => m.err(),
            _ => panic!("{what}: session kind differs from the model: {:?} vs {:?}", e.real, e.model),
        };
        assert_eq!(real_err, want_err.map(|c| self.real_err(c)), "{what}: err of {:?}", e.model);
        let values = self.values_of(&e.model);
        for code in 0..CODES {
            assert_eq!(read_session(&e.real, code), want(values, code), "{what}: key {code} of {:?}", e.model);
        }
        assert_eq!(e.real.read(&MISSING, |v: Option<&u32>| v.copied()), None, "{what}: missing key");
        assert_eq!(e.real.read(&1u16, |v: Option<&u32>| v.copied()), None, "{what}: u16 key read as a u8 key");
        if let AnySession::Map(m) = &e.real {
            assert_eq!(m.len(), values.len(), "{what}: len of {:?}", e.model);
            assert_eq!(m.is_empty(), values.is_empty(), "{what}: is_empty");
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
        for code in 0..CODES {
            assert_eq!(read_ctx(&c.real, code), want(&c.values, code), "{what}: key {code}");
        }
        assert_eq!(c.real.value::<u32, _>(&MISSING), None, "{what}: missing key");
        assert_eq!(c.real.value::<u32, _>(&1u16), None, "{what}: u16 key read as a u8 key");
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
                let real = SessionCtx::new(&ctx);
                let scope = self.open_scope(scope, None);
                let ident = self.fresh_ident();
                self.push_session(Entry { real: real.into(), model: SessionModel::Ctx { scope, values }, ident });
            }
            Op::NewCtxDeadline { over, delta } => {
                let (ctx, scope, values) = self.base_ctx(over);
                let at = self.now + u64::from(delta);
                let real = SessionCtx::with_deadline(&ctx, instant(at));
                let scope = self.open_scope(scope, Some(at));
                let ident = self.fresh_ident();
                self.push_session(Entry { real: real.into(), model: SessionModel::Ctx { scope, values }, ident });
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
                let real = SessionMap::with_deadline(instant(at));
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
                    (AnySession::Ctx(real), SessionModel::Ctx { scope, values }) => {
                        let forked = real.fork();
                        let values = values.clone();
                        let scope = self.open_scope(Some(*scope), None);
                        let ident = self.fresh_ident();
                        let entry = Entry { real: forked.into(), model: SessionModel::Ctx { scope, values }, ident };
                        self.push_session(entry);
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
                    (AnySession::Custom(_), false) => unreachable!("no custom sessions here"),
                };
                let scope = self.scope_of(&e.model);
                let want = self.cancel(scope, Cause::Canceled);
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
                assert_eq!(map.len(), self.maps[m].values.len(), "len after remove");
            }
            Op::Get { s, key } => {
                let Some(i) = pick(s, self.sessions.len()) else { return };
                let e = &self.sessions[i];
                let values = self.values_of(&e.model);
                let want_v = want(values, key);
                assert_eq!(read_session(&e.real, key), want_v, "get key {key} of {:?}", e.model);
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
                    AnySession::Custom(_) => unreachable!("no custom sessions here"),
                }
            }
            Op::CtxWithCancel { over } => {
                let (ctx, scope, values) = self.base_ctx(over);
                let (real, handle) = ctx.with_cancel();
                let scope = self.open_scope(scope, None);
                self.push_handle(handle, scope);
                self.push_ctx(CtxEntry { real, scope: Some(scope), values });
            }
            Op::CtxWithDeadline { over, delta } => {
                let (ctx, scope, values) = self.base_ctx(over);
                let at = self.now + u64::from(delta);
                let (real, handle) = ctx.with_deadline(instant(at));
                let scope = self.open_scope(scope, Some(at));
                self.push_handle(handle, scope);
                self.push_ctx(CtxEntry { real, scope: Some(scope), values });
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
                let scope = c.scope;
                self.push_ctx(CtxEntry { real, scope, values });
            }
            Op::CtxWithoutCancel { ctx } => {
                let Some(i) = pick(ctx, self.ctxs.len()) else { return };
                let c = &self.ctxs[i];
                let entry = CtxEntry { real: c.real.without_cancel(), scope: None, values: c.values.clone() };
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
                let real = match &e.real {
                    AnySession::Ctx(s) => s.export(),
                    AnySession::Map(m) => m.export(),
                    AnySession::Custom(_) => unreachable!("no custom sessions here"),
                };
                assert!(e.real.export().is_some(), "AnySession::export of a built-in session");
                let entry =
                    CtxEntry { real, scope: Some(self.scope_of(&e.model)), values: self.values_of(&e.model).clone() };
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
        self.maps.push(MapModel { scope, values: Values::new() });
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
                AnySession::Custom(_) => unreachable!("no custom sessions here"),
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
            SessionModel::Ctx { scope, values } => {
                assert!(real.as_ctx().is_some(), "with_value of a SessionCtx is not a SessionCtx");
                assert!(!real.ptr_eq(&e.real), "with_value of a SessionCtx returned the same session");
                let mut values = values.clone();
                values.insert(key, val);
                let model = SessionModel::Ctx { scope: *scope, values };
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
                            assert_eq!(read_session(cur, code), want(values, code), "borrowed old session");
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
                        assert_eq!(read_session(inner, key), want(values, key), "inner borrow after replace");
                    });
                    if let (Some(outer), Some(m)) = (outer, &th.current) {
                        assert_eq!(read_session(outer, key), want(self.values_of(&m.model), key), "outer borrow");
                    }
                    assert!(!th.slot.is_set(), "slot emptied inside the borrows");
                });
                self.threads[thread].current = None;
            }
            // Disable the current session through the borrow.
            2 => {
                let th = &self.threads[thread];
                let got = th.slot.with(|cur| cur.map(AnySession::disable));
                let Some(m) = th.current.as_ref().map(|e| self.scope_of(&e.model)) else {
                    assert_eq!(got, None, "disable of no current session");
                    return;
                };
                let want = self.cancel(m, Cause::Canceled);
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
                AnySession::Custom(_) => unreachable!("no custom sessions here"),
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
            (e.real.export().expect("a built-in session"), Some(self.scope_of(&e.model)))
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
        // Registering on an expired scope settles it (running the callback).
        if let Some(s) = scope.filter(|&s| self.scopes[s].settled.is_none() && self.expired(s)) {
            self.settle(s, Cause::Deadline);
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
        for t in 0..THREADS {
            while !self.threads[t].guards.is_empty() {
                self.exit(t);
            }
        }
    }
}

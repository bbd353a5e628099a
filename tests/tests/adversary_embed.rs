//! Adversarial tests of the "embed the core in your own executor" path: `LocalSlot` reentrancy,
//! `WithSession` over custom stores (panics, drops, moves between threads and stores, nested
//! polls), store generations, `SingleSlotStore` from two threads, `TaskTable` hostile orderings
//! and `ShardedStore` GC racing binds.
//!
//! Global state: the process-wide store of this test binary is `EMBED` (a thread-local
//! `LocalSlot` store, registered by `install`); no test here uses the std adapter's functions.
#![allow(missing_docs)]

use std::cell::Cell;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll, Wake, Waker};

use localsession_core::{
    AnySession, BindError, Context, ContextStore, Key, LocalSlot, ManagerOptions, SessionCtx, ShardedStore,
    SingleSlotStore, TaskTable, WithSession, bind, current, enter_in, enter_option_in, global_store, set_global_store,
    unbind, with_current, with_current_in,
};

static ID: Key<u64> = Key::new("embed-id");

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// Counts sessions made and dropped: `live() == 0` at the end means nothing leaked, and a
/// double drop shows as a negative count.
#[derive(Default, Debug)]
struct Tracker {
    made: AtomicUsize,
    dropped: AtomicUsize,
}

impl Tracker {
    fn live(&self) -> isize {
        self.made.load(Ordering::SeqCst) as isize - self.dropped.load(Ordering::SeqCst) as isize
    }
}

struct Counted(Arc<Tracker>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

/// A session carrying `id` whose drop is counted in `t`.
fn tracked(id: u64, t: &Arc<Tracker>) -> AnySession {
    t.made.fetch_add(1, Ordering::SeqCst);
    SessionCtx::new(&Context::background()).with(&ID, id).with_value("counted", Counted(t.clone())).into()
}

fn plain(id: u64) -> AnySession {
    SessionCtx::new(&Context::background()).with(&ID, id).into()
}

fn id_of(s: Option<&AnySession>) -> Option<u64> {
    s?.get_cloned(&ID)
}

fn silently<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    catch_unwind(AssertUnwindSafe(f))
}

// The executor's store: one `LocalSlot` per thread (README "Embedding", steps 1-3).
thread_local! {
    static SLOT: LocalSlot = const { LocalSlot::new() };
    static SLOT2: LocalSlot = const { LocalSlot::new() };
}

#[derive(Debug)]
struct EmbedStore;

static EMBED: EmbedStore = EmbedStore;

impl ContextStore for EmbedStore {
    fn with_current(&self, f: &mut dyn FnMut(Option<&AnySession>)) {
        SLOT.with(|slot| slot.with(f));
    }

    fn replace(&self, session: Option<AnySession>) -> Result<Option<AnySession>, BindError> {
        let mut session = Some(session);
        SLOT.try_with(|slot| slot.replace(session.take().flatten()))
            .map_err(|_| BindError::new(session.take().flatten(), "thread is shutting down"))
    }

    fn swap(&self, session: &mut Option<AnySession>) -> bool {
        SLOT.try_with(|slot| slot.swap(session)).is_ok()
    }
}

/// A second, independent store (another executor in the same process).
#[derive(Debug)]
struct OtherStore;

static OTHER: OtherStore = OtherStore;

impl ContextStore for OtherStore {
    fn with_current(&self, f: &mut dyn FnMut(Option<&AnySession>)) {
        SLOT2.with(|slot| slot.with(f));
    }

    fn replace(&self, session: Option<AnySession>) -> Result<Option<AnySession>, BindError> {
        Ok(SLOT2.with(|slot| slot.replace(session)))
    }
}

fn install() {
    let _ = set_global_store(&EMBED);
    let ours: &'static dyn ContextStore = &EMBED;
    assert!(std::ptr::addr_eq(global_store().unwrap() as *const dyn ContextStore, ours as *const dyn ContextStore));
}

fn cur_id() -> Option<u64> {
    with_current(id_of)
}

fn other_id() -> Option<u64> {
    with_current_in(&OTHER, id_of)
}

/// Polls `f` to completion on this thread with a waker that does nothing (the futures here
/// wake themselves or are ready on the next poll).
fn run<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = TaskContext::from_waker(Waker::noop());
    for _ in 0..10_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future did not complete")
}

/// Pending once, then ready.
async fn yield_once() {
    struct Y(bool);
    impl Future for Y {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
            if self.0 {
                Poll::Ready(())
            } else {
                self.0 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
    Y(false).await
}

fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut TaskContext::from_waker(Waker::noop()))
}

/// Runs `f` when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

// ---------------------------------------------------------------------------------------------
// LocalSlot reentrancy
// ---------------------------------------------------------------------------------------------

/// A deterministic pseudo-random walk of replace / swap / nested `with` / panics inside nested
/// `with`, checked against a model: every reader keeps seeing the session it borrowed, the slot
/// holds what the model says, and every session is dropped exactly once.
#[test]
fn local_slot_random_reentrant_walk_keeps_every_view_and_drops_each_session_once() {
    let t = Arc::new(Tracker::default());
    let slot = LocalSlot::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut fresh = 1000u64;
    // `model` is what the slot holds; `held` are handles the test keeps (then drops) itself.
    fn walk(
        slot: &LocalSlot,
        t: &Arc<Tracker>,
        next: &mut dyn FnMut() -> u64,
        fresh: &mut u64,
        model: &mut Option<u64>,
        depth: u32,
        views: &mut Vec<(Option<u64>, u32)>,
    ) {
        for _ in 0..16 {
            match next() % 7 {
                0 | 1 => {
                    *fresh += 1;
                    let old = slot.replace(Some(tracked(*fresh, t)));
                    assert_eq!(id_of(old.as_ref()), *model);
                    *model = Some(*fresh);
                    if next().is_multiple_of(2) {
                        drop(old);
                    } else {
                        // Put the old one back right away (the same session re-enters the slot).
                        let new = slot.replace(old);
                        assert_eq!(id_of(new.as_ref()), *model);
                        *model = id_of(slot.cloned().as_ref());
                    }
                }
                2 => {
                    let mut s = if next().is_multiple_of(3) {
                        None
                    } else {
                        *fresh += 1;
                        Some(tracked(*fresh, t))
                    };
                    let want = id_of(s.as_ref());
                    slot.swap(&mut s);
                    assert_eq!(id_of(s.as_ref()), *model);
                    *model = want;
                }
                3 | 4 if depth < 4 => {
                    let expect = *model;
                    slot.with(|view| {
                        assert_eq!(id_of(view), expect);
                        views.push((expect, depth + 1));
                        walk(slot, t, next, fresh, model, depth + 1, views);
                        assert_eq!(id_of(view), expect, "a reader's view changed under it");
                        views.pop();
                    });
                }
                5 if depth < 4 => {
                    // A nested reader that replaces and then panics.
                    let expect = *model;
                    let r = silently(|| {
                        slot.with(|view| {
                            *fresh += 1;
                            drop(slot.replace(Some(tracked(*fresh, t))));
                            *model = Some(*fresh);
                            assert_eq!(id_of(view), expect);
                            panic!("reader panics after a replace");
                        })
                    });
                    assert!(r.is_err());
                }
                _ => {
                    assert_eq!(id_of(slot.cloned().as_ref()), *model);
                    assert_eq!(slot.is_set(), model.is_some());
                }
            }
        }
    }
    let mut model = None;
    let mut views = Vec::new();
    for _ in 0..20 {
        walk(&slot, &t, &mut next, &mut fresh, &mut model, 0, &mut views);
        // Outside every reader only the slot's own session is alive.
        assert_eq!(t.live(), isize::from(model.is_some()), "sessions kept beyond the readers");
    }
    drop(slot.replace(None));
    assert_eq!(t.live(), 0);
}

/// A session released by a reader's end (its only remaining handle was the slot's retired
/// clone) has a value whose drop reads and rebinds the same slot.
#[test]
fn a_session_released_at_a_readers_end_may_reenter_the_slot_in_its_drop() {
    install();
    let t = Arc::new(Tracker::default());
    let seen_in_drop = Arc::new(Mutex::new(Vec::new()));
    let log = seen_in_drop.clone();
    let t2 = t.clone();
    let reentrant: AnySession = SessionCtx::new(&Context::background())
        .with(&ID, 1)
        .with_value(
            "reenter",
            OnDropSend(Box::new(move || {
                // Reads the slot and binds through the global store, from inside the release.
                log.lock().unwrap().push(cur_id());
                bind(tracked(3, &t2)).unwrap();
                log.lock().unwrap().push(cur_id());
            })),
        )
        .into();
    drop(EMBED.replace(Some(reentrant)).unwrap());
    let (in_reader, after_reader) = with_current(|view| {
        // Replace while viewed; drop our handle: only the slot's retired clone keeps it.
        drop(EMBED.replace(Some(tracked(2, &t))).unwrap());
        (id_of(view), cur_id())
    });
    assert_eq!((in_reader, after_reader), (Some(1), Some(2)));
    assert_eq!(*seen_in_drop.lock().unwrap(), vec![Some(2), Some(3)], "the drop ran with the slot usable");
    assert_eq!(cur_id(), Some(3));
    drop(unbind());
    assert_eq!(t.live(), 0);
}

struct OnDropSend(Box<dyn FnMut() + Send + Sync>);

impl Drop for OnDropSend {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// A session value whose drop panics, released when a nested reader returns: the panic comes
/// out of `with`, and the slot's reader list and retired sessions stay consistent.
#[test]
fn a_panicking_session_drop_at_a_readers_end_leaves_the_slot_consistent() {
    let t = Arc::new(Tracker::default());
    let slot = LocalSlot::new();
    let panicky = || -> AnySession {
        SessionCtx::new(&Context::background())
            .with(&ID, 66)
            .with_value("panics", OnDropSend(Box::new(|| panic!("session value drop panics"))))
            .into()
    };
    slot.replace(Some(tracked(1, &t)));
    let r = silently(|| {
        slot.with(|outer| {
            assert_eq!(id_of(outer), Some(1));
            drop(slot.replace(Some(panicky())));
            let inner = silently(|| {
                slot.with(|inner| {
                    assert_eq!(id_of(inner), Some(66));
                    // The panicky session leaves the slot; the inner reader views it.
                    drop(slot.replace(Some(tracked(2, &t))));
                })
            });
            assert!(inner.is_err(), "the release of the panicky session should panic out of `with`");
            assert_eq!(id_of(outer), Some(1), "the outer view survived the inner panic");
            assert_eq!(id_of(slot.cloned().as_ref()), Some(2));
        })
    });
    assert!(r.is_ok(), "the outer reader must not see the inner panic again");
    // No reader is linked any more: a replace now keeps nothing (live = the slot's session).
    drop(slot.replace(Some(tracked(3, &t))));
    assert_eq!(t.live(), 1);
    slot.with(|v| assert_eq!(id_of(v), Some(3)));
    drop(slot.replace(None));
    assert_eq!(t.live(), 0);
}

// ---------------------------------------------------------------------------------------------
// WithSession over custom stores
// ---------------------------------------------------------------------------------------------

#[test]
fn a_panicking_poll_unwinds_with_the_session_and_restores_the_unit() {
    install();
    let t = Arc::new(Tracker::default());
    drop(EMBED.replace(Some(tracked(1, &t))).unwrap());
    let seen_unwinding = Arc::new(Mutex::new(None));
    let s = seen_unwinding.clone();
    let fut = WithSession::new_in_store(
        &EMBED,
        async move {
            let _report = OnDrop(move || *s.lock().unwrap() = Some(cur_id()));
            bind(tracked(3, &t_clone())).unwrap(); // rebinds inside the task, then panics
            yield_once().await;
            panic!("poll panics");
        },
        Some(tracked(2, &t)),
    );
    let mut fut = Box::pin(fut);
    assert!(poll_once(fut.as_mut()).is_pending());
    assert_eq!(cur_id(), Some(1), "the unit's session is back after a pending poll");
    let r = silently(|| poll_once(fut.as_mut()));
    assert!(r.is_err());
    assert_eq!(cur_id(), Some(1), "the unit's session is back after a panicking poll");
    assert_eq!(*seen_unwinding.lock().unwrap(), Some(Some(3)), "locals dropped during unwind saw the task's bind");
    assert_eq!(id_of(fut.session()), Some(3), "the task keeps its session after the panic");
    drop(fut);
    drop(EMBED.replace(None).unwrap());
    assert_eq!(t.live(), 0);
    assert_eq!(t_clone().live(), 0);
}

fn t_clone() -> Arc<Tracker> {
    static T: OnceLock<Arc<Tracker>> = OnceLock::new();
    T.get_or_init(Default::default).clone()
}

/// A waker that panics in `wake_by_ref`: the poll that calls it panics out of `WithSession`.
#[test]
fn a_panicking_waker_inside_the_poll_restores_the_unit() {
    install();
    struct PanicWaker;
    impl Wake for PanicWaker {
        fn wake(self: Arc<Self>) {
            panic!("waker panics");
        }
        fn wake_by_ref(self: &Arc<Self>) {
            panic!("waker panics");
        }
    }
    let waker = Waker::from(Arc::new(PanicWaker));
    let mut fut = Box::pin(WithSession::new_in_store(&EMBED, yield_once(), Some(plain(5))));
    assert!(EMBED.replace(Some(plain(4))).unwrap().is_none());
    let r = silently(|| fut.as_mut().poll(&mut TaskContext::from_waker(&waker)));
    assert!(r.is_err());
    assert_eq!(cur_id(), Some(4));
    assert_eq!(id_of(fut.session()), Some(5));
    drop(EMBED.replace(None).unwrap());
}

#[test]
fn dropping_an_unpolled_or_pending_with_session_drops_its_future_under_its_session() {
    install();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let make = |id: u64| {
        let log = seen.clone();
        let guard = OnDrop(move || log.lock().unwrap().push((id, cur_id(), other_id())));
        WithSession::new_in_store(
            &EMBED,
            async move {
                let _g = guard;
                yield_once().await;
            },
            Some(plain(id)),
        )
    };
    drop(EMBED.replace(Some(plain(100))).unwrap());
    // Never polled.
    drop(make(1));
    // Pending.
    let mut pending = Box::pin(make(2));
    assert!(poll_once(pending.as_mut()).is_pending());
    drop(pending);
    // Dropped inside another WithSession's poll (of another id), then that one reads its own.
    let inner = make(3);
    let outer = WithSession::new_in_store(
        &EMBED,
        async move {
            let before = cur_id();
            drop(inner);
            (before, cur_id())
        },
        Some(plain(4)),
    );
    assert_eq!(run(outer), (Some(4), Some(4)));
    // Dropped on another thread: the drop sees its session there; that thread is left empty.
    let elsewhere = make(5);
    let thread_after = std::thread::spawn(move || {
        drop(elsewhere);
        cur_id()
    })
    .join()
    .unwrap();
    assert_eq!(thread_after, None);
    assert_eq!(cur_id(), Some(100), "the unit's own session survived every drop");
    drop(EMBED.replace(None).unwrap());
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(1, Some(1), None), (2, Some(2), None), (3, Some(3), None), (5, Some(5), None)]
    );
}

/// A WithSession polled on one thread, moved (pending, with a bind made inside) to another
/// thread and finished there; nested polls of other WithSessions inside it.
#[test]
fn a_with_session_moved_between_threads_with_nested_polls_keeps_its_binds() {
    install();
    let fut = WithSession::new_in_store(
        &EMBED,
        async {
            let first = cur_id();
            bind(plain(11)).unwrap();
            yield_once().await;
            let after_move = cur_id();
            // A nested, hand-driven poll of another task inside this poll (a nested block_on).
            let nested = run(WithSession::new_in_store(
                &EMBED,
                async {
                    let n0 = cur_id();
                    bind(plain(21)).unwrap();
                    yield_once().await;
                    (n0, cur_id())
                },
                Some(plain(20)),
            ));
            // And one with no session at all.
            let bare = run(WithSession::new_in_store(&EMBED, async { cur_id() }, None));
            (first, after_move, nested, bare, cur_id())
        },
        Some(plain(10)),
    );
    let mut fut = Box::pin(fut);
    assert!(poll_once(fut.as_mut()).is_pending());
    assert_eq!(cur_id(), None, "this thread kept the task's session after the poll");
    let (out, there) = std::thread::spawn(move || {
        drop(EMBED.replace(Some(plain(99))).unwrap());
        let out = run(fut);
        (out, cur_id())
    })
    .join()
    .unwrap();
    assert_eq!(out, (Some(10), Some(11), (Some(20), Some(21)), None, Some(11)));
    assert_eq!(there, Some(99), "the other thread's own session was not restored");
    assert_eq!(cur_id(), None);
}

/// A future wrapped for two stores (two executors' slots in one process): each store sees only
/// its own session, binds through each stick to the future, and both slots are clean after,
/// on every thread that polled it.
#[test]
fn a_future_wrapped_for_two_stores_keeps_them_apart() {
    install();
    let inner = WithSession::new_in_store(
        &OTHER,
        async {
            let a = (cur_id(), other_id());
            drop(OTHER.replace(Some(plain(31))).unwrap());
            bind(plain(32)).unwrap();
            yield_once().await;
            let b = (cur_id(), other_id());
            (a, b)
        },
        Some(plain(30)),
    );
    let outer = WithSession::new_in_store(&EMBED, inner, Some(plain(40)));
    let mut outer = Box::pin(outer);
    assert!(poll_once(outer.as_mut()).is_pending());
    assert_eq!((cur_id(), other_id()), (None, None));
    let (out, after) = std::thread::spawn(move || (run(outer), (cur_id(), other_id()))).join().unwrap();
    assert_eq!(out, ((Some(40), Some(30)), (Some(32), Some(31))));
    assert_eq!(after, (None, None));
}

// ---------------------------------------------------------------------------------------------
// Generations: a custom store that can be reset
// ---------------------------------------------------------------------------------------------

thread_local! {
    static GEN_SLOT: LocalSlot = const { LocalSlot::new() };
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
struct GenStore;

static GEN_STORE: GenStore = GenStore;

impl ContextStore for GenStore {
    fn with_current(&self, f: &mut dyn FnMut(Option<&AnySession>)) {
        GEN_SLOT.with(|slot| slot.with(f));
    }

    fn replace(&self, session: Option<AnySession>) -> Result<Option<AnySession>, BindError> {
        Ok(GEN_SLOT.with(|slot| slot.replace(session)))
    }

    fn generation(&self) -> u64 {
        GENERATION.load(Ordering::SeqCst)
    }
}

fn gen_id() -> Option<u64> {
    with_current_in(&GEN_STORE, id_of)
}

/// "Reset": bump the generation and clear this thread's slot (a real store clears every
/// thread's lazily).
fn gen_reset() {
    GENERATION.fetch_add(1, Ordering::SeqCst);
    drop(GEN_STORE.replace(None).unwrap());
}

#[test]
fn guards_and_with_session_do_not_restore_a_binding_from_before_a_store_reset() {
    let t = Arc::new(Tracker::default());
    // EnterGuard across a reset.
    drop(GEN_STORE.replace(Some(tracked(1, &t))).unwrap());
    let guard = enter_in(&GEN_STORE, tracked(2, &t));
    assert_eq!(gen_id(), Some(2));
    gen_reset();
    drop(GEN_STORE.replace(Some(tracked(3, &t))).unwrap()); // a post-reset bind inside the scope
    drop(guard);
    assert_eq!(gen_id(), None, "the guard restored the pre-reset binding");

    // enter_option_in(None) across a reset.
    drop(GEN_STORE.replace(Some(tracked(4, &t))).unwrap());
    let guard = enter_option_in(&GEN_STORE, None);
    assert_eq!(gen_id(), None);
    gen_reset();
    drop(guard);
    assert_eq!(gen_id(), None);

    // WithSession: a reset during a poll.
    drop(GEN_STORE.replace(Some(tracked(5, &t))).unwrap());
    let fut = WithSession::new_in_store(
        &GEN_STORE,
        async {
            let before = gen_id();
            gen_reset();
            let after = gen_id();
            yield_once().await;
            (before, after, gen_id())
        },
        Some(tracked(6, &t)),
    );
    let mut fut = Box::pin(fut);
    assert!(poll_once(fut.as_mut()).is_pending());
    assert_eq!(gen_id(), None, "WithSession restored the pre-reset binding");
    let Poll::Ready(out) = poll_once(fut.as_mut()) else { panic!("not ready") };
    assert_eq!(out, (Some(6), None, None));
    drop(fut);
    drop(GEN_STORE.replace(None).unwrap());
    assert_eq!(t.live(), 0, "a session was leaked or dropped twice across resets");
}

// ---------------------------------------------------------------------------------------------
// SingleSlotStore from two threads
// ---------------------------------------------------------------------------------------------

/// Documented as one slot for the whole program and thread-safe: used from two threads at once
/// (guards, `WithSession` polls, reads that rebind from inside the callback) it must not
/// deadlock, and every session must be dropped exactly once.
#[test]
fn single_slot_store_hammered_from_two_threads_loses_and_duplicates_nothing() {
    static SINGLE: SingleSlotStore = SingleSlotStore::new();
    let t = Arc::new(Tracker::default());
    let start = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2u64)
        .map(|k| {
            let (t, start) = (t.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for i in 0..2_000u64 {
                    let id = k * 1_000_000 + i;
                    match i % 4 {
                        0 => drop(enter_in(&SINGLE, tracked(id, &t))),
                        1 => {
                            let f = WithSession::new_in_store(
                                &SINGLE,
                                async { with_current_in(&SINGLE, id_of) },
                                Some(tracked(id, &t)),
                            );
                            let _ = run(f);
                        }
                        2 => with_current_in(&SINGLE, |s| {
                            // Rebind from inside the read: the lock must not be held here.
                            let old = SINGLE.replace(Some(tracked(id, &t))).unwrap();
                            let _ = id_of(s);
                            drop(old);
                        }),
                        _ => drop(SINGLE.replace(None).unwrap()),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    drop(SINGLE.replace(None).unwrap());
    assert_eq!(t.live(), 0);
}

// ---------------------------------------------------------------------------------------------
// TaskTable hostile orderings
// ---------------------------------------------------------------------------------------------

/// The table's shard of an id (mirrors `TaskTable::shard`: a multiplicative mix, top 4 bits).
fn table_shard(id: u64) -> u64 {
    id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60
}

#[test]
fn task_table_hostile_orderings_keep_counts_and_drop_every_session_once() {
    let t = Arc::new(Tracker::default());
    let table = TaskTable::new();

    // Terminate twice, then spawn: the spawn hands its session back, nothing is created.
    assert!(table.terminated(1).is_none());
    assert!(table.terminated(1).is_none());
    let back = table.spawned(1, Some(tracked(1, &t)));
    assert_eq!(id_of(back.as_ref()), Some(1));
    drop(back);
    assert_eq!((table.tasks(), table.sessions()), (0, 0));
    // The tombstone was consumed: a second spawn of the id creates an entry (id reuse).
    assert!(table.spawned(1, Some(tracked(11, &t))).is_none());
    assert_eq!((table.tasks(), table.sessions()), (1, 1));
    // Spawn twice without a terminate: the earlier session comes back.
    let old = table.spawned(1, None);
    assert_eq!(id_of(old.as_ref()), Some(11));
    drop(old);
    assert_eq!((table.tasks(), table.sessions()), (1, 0));
    // Rebinds: of an unknown id, after terminate, and to the same session.
    let mine = tracked(12, &t);
    assert!(table.rebind(2, Some(&mine)).is_none());
    assert!(table.rebind(1, Some(&mine)).is_none());
    assert!(table.rebind(1, Some(&mine)).is_none(), "same session: nothing changes");
    assert_eq!((table.tasks(), table.sessions()), (1, 1));
    let last = table.terminated(1);
    assert_eq!(id_of(last.as_ref()), Some(12));
    drop(last);
    assert!(table.rebind(1, Some(&mine)).is_none(), "a late rebind resurrected an ended task");
    assert_eq!((table.tasks(), table.sessions()), (0, 0));
    assert!(table.terminated(1).is_none(), "terminate twice after a spawn");
    drop(mine);

    // Tombstone eviction: TOMBSTONES_PER_SHARD + 1 unknown terminates in one shard.
    let ids: Vec<u64> = (1000..).filter(|id| table_shard(*id) == 3).take(TaskTable::TOMBSTONES_PER_SHARD + 1).collect();
    for id in &ids {
        assert!(table.terminated(*id).is_none());
    }
    assert_eq!(table.tasks(), 0, "tombstones are not counted as tasks");
    // The newest tombstones are kept: their spawns hand the session back.
    for id in &ids[1..] {
        let back = table.spawned(*id, Some(tracked(*id, &t)));
        assert_eq!(id_of(back.as_ref()), Some(*id), "a recent tombstone was lost");
    }
    // The oldest was evicted (documented): its late spawn creates an entry.
    assert!(table.spawned(ids[0], Some(tracked(ids[0], &t))).is_none());
    assert_eq!((table.tasks(), table.sessions()), (1, 1));
    drop(table.terminated(ids[0]));
    assert_eq!((table.tasks(), table.sessions()), (0, 0));
    assert_eq!(t.live(), 0);
}

#[test]
fn task_table_sweep_with_a_panicking_keep_leaves_a_consistent_table() {
    let t = Arc::new(Tracker::default());
    let table = TaskTable::new();
    let ended = SessionCtx::new(&Context::background()).with(&ID, 0);
    for id in 0..64u64 {
        let s = if id % 2 == 0 { ended.with_value("n", id).into() } else { tracked(id, &t) };
        assert!(table.spawned(id, Some(s)).is_none());
    }
    ended.disable();
    let calls = AtomicUsize::new(0);
    let r = silently(|| {
        table.sweep(|s| {
            if calls.fetch_add(1, Ordering::SeqCst) == 20 {
                panic!("keep panics");
            }
            s.is_valid()
        })
    });
    assert!(r.is_err());
    let (tasks, sessions) = (table.tasks(), table.sessions());
    assert_eq!(tasks, 64);
    assert!((32..=64).contains(&sessions), "{sessions}");
    // The table keeps working: a full sweep clears exactly the ended ones still there.
    let cleared = table.sweep(|s| s.is_valid());
    assert_eq!(cleared.len(), sessions - 32);
    drop(cleared);
    assert_eq!((table.tasks(), table.sessions()), (64, 32));
    for id in 0..64u64 {
        let s = table.terminated(id);
        assert_eq!(s.is_some(), id % 2 == 1);
    }
    assert_eq!((table.tasks(), table.sessions()), (0, 0));
    assert_eq!(t.live(), 0);
}

/// Spawns, rebinds, terminates (some before their spawn) and sweeps from three threads.
#[test]
fn task_table_concurrent_hooks_and_sweeps_end_empty_with_nothing_leaked() {
    let t = Arc::new(Tracker::default());
    let table = Arc::new(TaskTable::new());
    let stop = Arc::new(AtomicBool::new(false));
    let doomed = Arc::new(Mutex::new(Vec::<SessionCtx>::new()));
    let sweeper = {
        let (table, stop, doomed) = (table.clone(), stop.clone(), doomed.clone());
        std::thread::spawn(move || {
            let mut cleared = 0;
            while !stop.load(Ordering::SeqCst) {
                for d in doomed.lock().unwrap().drain(..) {
                    d.disable();
                }
                cleared += table.sweep(|s| s.is_valid()).len();
                std::thread::yield_now();
            }
            cleared
        })
    };
    let workers: Vec<_> = (0..2u64)
        .map(|w| {
            let (table, t, doomed) = (table.clone(), t.clone(), doomed.clone());
            std::thread::spawn(move || {
                for i in 0..3_000u64 {
                    let id = w << 32 | i;
                    let s = SessionCtx::new(&Context::background()).with(&ID, id);
                    if i % 5 == 0 {
                        doomed.lock().unwrap().push(s.clone());
                    }
                    let session: AnySession = s.with_value("counted", Counted(t.clone())).into();
                    t.made.fetch_add(1, Ordering::SeqCst);
                    if i % 7 == 0 {
                        // Terminate before spawn (a runtime shutting down).
                        assert!(table.terminated(id).is_none());
                        assert!(table.spawned(id, Some(session)).is_some());
                        continue;
                    }
                    assert!(table.spawned(id, Some(session)).is_none());
                    let mine = tracked(id + 1, &t);
                    drop(table.rebind(id, Some(&mine)));
                    let seen = table.session(id);
                    assert_eq!(id_of(seen.as_ref()), Some(id + 1), "a valid rebind was swept or lost");
                    drop(table.rebind(id, None));
                    drop(table.rebind(id, Some(&mine)));
                    drop(table.terminated(id));
                    drop(table.terminated(id)); // twice
                    assert!(table.rebind(id, Some(&mine)).is_none());
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let _ = sweeper.join().unwrap();
    assert_eq!((table.tasks(), table.sessions()), (0, 0));
    assert_eq!(t.live(), 0);
}

// ---------------------------------------------------------------------------------------------
// ShardedStore
// ---------------------------------------------------------------------------------------------

#[test]
fn sharded_store_gc_racing_binds_never_removes_a_valid_session() {
    let t = Arc::new(Tracker::default());
    let store = Arc::new(
        ShardedStore::new(ManagerOptions { shard_number: 3, gc_interval: None, implicit_transmit: false }, || None)
            .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let gc = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += store.gc();
            }
            n
        })
    };
    let binders: Vec<_> = (0..2u64)
        .map(|w| {
            let (store, t) = (store.clone(), t.clone());
            std::thread::spawn(move || {
                for i in 0..5_000u64 {
                    let id = (i % 16) * 2 + w; // ids shared across shards, disjoint per thread
                    let s =
                        SessionCtx::new(&Context::background()).with(&ID, i).with_value("counted", Counted(t.clone()));
                    t.made.fetch_add(1, Ordering::SeqCst);
                    if i % 3 == 0 {
                        // Bound, then disabled: the GC may take it at any point from now on.
                        drop(store.bind(id, s.clone()));
                        s.disable();
                    } else {
                        drop(store.bind(id, s.clone()));
                        let got = store.get(id);
                        assert!(
                            got.as_ref().and_then(|g| g.as_ctx()).is_some_and(|g| g.ptr_eq(&s)),
                            "a valid session bound by this unit was removed or replaced"
                        );
                        if i % 5 == 0 {
                            assert!(store.remove(id).is_some());
                        }
                    }
                }
            })
        })
        .collect();
    for b in binders {
        b.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let _ = gc.join().unwrap();
    store.gc();
    for id in 0..32 {
        drop(store.remove(id));
    }
    assert!(store.is_empty());
    assert_eq!(t.live(), 0);
}

/// A ShardedStore as the store of an executor whose tasks have ids: `WithSession` and
/// `enter_in` over it, outside any unit (id function says none), and an id function that
/// panics.
#[test]
fn sharded_store_as_an_executor_store_with_unknown_and_panicking_ids() {
    thread_local! {
        static UNIT: Cell<Option<u64>> = const { Cell::new(None) };
        /// 0: never; n: the n-th call of the id function from now on panics.
        static PANIC_AT: Cell<u32> = const { Cell::new(0) };
    }
    static STORE: OnceLock<ShardedStore> = OnceLock::new();
    let store: &'static ShardedStore = STORE.get_or_init(|| {
        ShardedStore::new(ManagerOptions { shard_number: 4, gc_interval: None, implicit_transmit: false }, || {
            let n = PANIC_AT.with(Cell::get);
            if n > 0 {
                PANIC_AT.with(|p| p.set(n - 1));
                assert_ne!(n, 1, "id function panics");
            }
            UNIT.with(Cell::get)
        })
        .unwrap()
    });
    let read = || with_current_in(store, id_of);

    // Outside any unit: binding fails (the session comes back), WithSession runs without.
    let err = store.replace(Some(plain(1))).unwrap_err();
    assert_eq!(id_of(err.into_session().as_ref()), Some(1));
    assert_eq!(run(WithSession::new_in_store(store, async move { read() }, Some(plain(2)))), None);
    let g = enter_in(store, plain(3));
    assert_eq!(read(), None);
    drop(g);

    // Inside unit 7: the task's session around each poll, the unit's own afterwards.
    UNIT.with(|u| u.set(Some(7)));
    store.bind(7, plain(70));
    let fut = WithSession::new_in_store(
        store,
        async move {
            let a = read();
            yield_once().await;
            drop(store.replace(Some(plain(72))).unwrap());
            yield_once().await;
            (a, read())
        },
        Some(plain(71)),
    );
    let mut fut = Box::pin(fut);
    assert!(poll_once(fut.as_mut()).is_pending());
    assert_eq!(read(), Some(70));
    // The GC sweeps between polls: the task's session is not in the store now, so not touched.
    assert_eq!(store.gc(), 0);
    // The id function panics while the poll installs the task's session (its 1st call).
    PANIC_AT.with(|p| p.set(1));
    let r = silently(|| poll_once(fut.as_mut()));
    PANIC_AT.with(|p| p.set(0));
    assert!(r.is_err());
    let on_entry = (read(), id_of(fut.session()));
    drop(fut);
    // The id function panics while the poll swaps the task's session back out (its 2nd call:
    // the body itself does not touch the store).
    drop(store.replace(Some(plain(70))).unwrap());
    let mut fut = Box::pin(WithSession::new_in_store(store, yield_once(), Some(plain(73))));
    PANIC_AT.with(|p| p.set(2));
    let r = silently(|| poll_once(fut.as_mut()));
    PANIC_AT.with(|p| p.set(0));
    assert!(r.is_err());
    let on_exit = (read(), id_of(fut.session()));
    drop(fut);
    drop(store.remove(7));
    UNIT.with(|u| u.set(None));
    // What a user checks after catching the panic. On entry (the id is asked before anything
    // moves): the unit still has its own session (70) and the task its own (71). (Failed
    // before: the default `swap` moved 71 into `replace` first, and the panic dropped it.) On
    // exit the swap back cannot happen without the id function, so the task's 73 stays in the
    // unit's place and the unit's 70 in the future: nothing is lost, and no third session
    // appears.
    assert_eq!(on_entry, (Some(70), Some(71)), "a panicking id function on entry lost the task's session");
    let mut exit_sessions = [on_exit.0, on_exit.1];
    exit_sessions.sort();
    assert_eq!(exit_sessions, [Some(70), Some(73)], "a panicking id function on exit lost a session");
    UNIT.with(|u| u.set(None));
}

// ---------------------------------------------------------------------------------------------
// The README's hand-written executor loop (step 5) against hostile tasks
// ---------------------------------------------------------------------------------------------

/// Tasks of a two-worker executor built on WithSession over `EMBED`: some bind, some unbind,
/// some panic (the executor catches it), some spawn children that inherit. No task ever sees
/// another task's session, and the workers end clean.
#[test]
fn a_two_worker_executor_with_panicking_and_rebinding_tasks_keeps_tasks_apart() {
    install();
    type Task = Pin<Box<dyn Future<Output = ()> + Send>>;
    let queue: Arc<Mutex<std::collections::VecDeque<Task>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let spawn = {
        let queue = queue.clone();
        move |session: Option<AnySession>, f: Task| {
            queue.lock().unwrap().push_back(Box::pin(WithSession::new_in_store(&EMBED, f, session)));
        }
    };
    for id in 0..300u64 {
        let (errs, spawn2) = (errors.clone(), spawn.clone());
        spawn(
            Some(plain(id)),
            Box::pin(async move {
                for step in 0..3 {
                    if cur_id() != Some(id) {
                        errs.lock().unwrap().push(format!("{id}@{step}: {:?}", cur_id()));
                    }
                    yield_once().await;
                }
                match id % 4 {
                    0 => {
                        bind(plain(id + 1000)).unwrap();
                        yield_once().await;
                        if cur_id() != Some(id + 1000) {
                            errs.lock().unwrap().push(format!("{id} lost its bind"));
                        }
                        // A child inheriting the task's current session (step 4).
                        let (errs, inherited) = (errs.clone(), with_current_in(&EMBED, |s| s.cloned()));
                        spawn2(
                            inherited,
                            Box::pin(async move {
                                yield_once().await;
                                if cur_id() != Some(id + 1000) {
                                    errs.lock().unwrap().push(format!("child of {id}: {:?}", cur_id()));
                                }
                            }),
                        );
                    }
                    1 => {
                        drop(unbind());
                        yield_once().await;
                        if current().is_some() {
                            errs.lock().unwrap().push(format!("{id} saw a session after unbind"));
                        }
                    }
                    2 => {
                        bind(plain(id + 2000)).unwrap();
                        panic!("task {id} panics with a bound session");
                    }
                    _ => {}
                }
            }),
        );
    }
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let queue = queue.clone();
            std::thread::spawn(move || {
                let mut idle = 0;
                loop {
                    let task = queue.lock().unwrap().pop_front();
                    let Some(mut task) = task else {
                        idle += 1;
                        if idle > 1_000 {
                            break;
                        }
                        std::thread::yield_now();
                        continue;
                    };
                    idle = 0;
                    match silently(|| poll_once(task.as_mut())) {
                        Ok(Poll::Pending) => queue.lock().unwrap().push_back(task),
                        Ok(Poll::Ready(())) | Err(_) => {}
                    }
                    // Between polls the worker's slot is empty.
                    assert!(current().is_none(), "a task's session stayed on the worker after its poll");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert!(errors.lock().unwrap().is_empty(), "{:#?}", errors.lock().unwrap());
}

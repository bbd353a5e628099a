//! Adversarial tests of the cancel rule: "every cancel / disable returns only once its whole
//! subtree is cancelled, also the one that lost the race" (core/src/scope.rs, "Synchronization").
//!
//! Deep chains and wide trees cancelled at several levels from four threads at once; user code
//! (`after_cancel` callbacks, `done()` wakers whose `clone` / `wake` / `drop` re-enter) that
//! cancels ancestors, descendants and siblings, forks, and disables sessions of the same tree;
//! deadlines on the std clock racing explicit cancels; `SessionMap` and `SessionCtx` disables,
//! `with_value` chains; panicking callbacks and wakers.
//!
//! Checked: no hang (every racing part runs under a watchdog, the riskiest in a child process
//! killed after a timeout), every descendant reads invalid as soon as any cancel of an ancestor
//! returned, `err()` never changes once `Some`, each callback runs at most once (exactly once
//! when nothing panicked), and every value and closure is dropped exactly once.
#![allow(missing_docs)]

mod common;
use common::{Cause, Rng, Token, Tracker, in_child_within, silently, within};

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::task::{Context as TaskContext, RawWaker, RawWakerVTable, Waker};
use std::time::Duration;

use localsession_core::{CancelHandle, Context, ContextError, SessionCtx, SessionMap};
use localsession_std::STD_CLOCK;

/// A hang detector, never a performance assertion.
const HANG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// The first index in `nodes[from..]` that still reads valid, if any.
fn first_valid(nodes: &[SessionCtx], from: usize) -> Option<usize> {
    nodes[from..].iter().position(SessionCtx::is_valid).map(|i| i + from)
}

// ---------------------------------------------------------------------------------------------
// 1. Deep chains and wide trees
// ---------------------------------------------------------------------------------------------

/// One level of a deep chain: a session whose scope is a child of the previous level's, made
/// by `fork`, by `with_value` + `fork`, by a new session over a `with_value` context, or under a
/// `with_cancel` context (whose handle is kept).
fn deep_chain(levels: usize, tokens: &Arc<Tracker>) -> (Vec<SessionCtx>, Vec<Option<CancelHandle>>) {
    let mut nodes: Vec<SessionCtx> = Vec::with_capacity(levels);
    let mut handles = Vec::with_capacity(levels);
    nodes.push(SessionCtx::new(&Context::background().with_value("level", tokens.token())));
    handles.push(None);
    for i in 1..levels {
        let prev = &nodes[i - 1];
        let (next, handle) = match i % 4 {
            0 => (prev.fork(), None),
            1 => (prev.with_value("v", tokens.token()).fork(), None),
            2 => (SessionCtx::new(&prev.context().with_value("w", tokens.token())), None),
            _ => {
                let (ctx, cancel) = prev.context().with_cancel();
                (SessionCtx::new(&ctx), Some(cancel))
            }
        };
        nodes.push(next);
        handles.push(handle);
    }
    (nodes, handles)
}

/// A chain of 10 000 levels cancelled at four levels at once from four threads (disable of the
/// level's session, or the `CancelHandle` of a `with_cancel` level, with its own cause). As
/// soon as a thread's cancel returns — won or lost — every level below it reads invalid; the
/// `err()` each level reported first never changes; every value is dropped once.
#[test]
fn deep_chain_cancelled_at_four_levels_at_once_is_cancelled_below_each_on_return() {
    in_child_within(
        "deep_chain_cancelled_at_four_levels_at_once_is_cancelled_below_each_on_return",
        Duration::from_secs(60),
        || {
            const LEVELS: usize = 10_000;
            within("deep chain cancels", HANG, || {
                for round in 0..40u64 {
                    let tokens = Tracker::new();
                    let (nodes, handles) = deep_chain(LEVELS, &tokens);
                    let nodes = Arc::new(nodes);
                    let handles = Arc::new(handles);
                    let start = Arc::new(Barrier::new(4));
                    // Level 0, and three deeper ones (a `with_cancel` level each: i % 4 == 3).
                    let spots = [0usize, 2_503, 5_003 + (round as usize % 3) * 4, 7_503];
                    let threads: Vec<_> = spots
                        .iter()
                        .enumerate()
                        .map(|(t, &level)| {
                            let (nodes, handles, start) = (nodes.clone(), handles.clone(), start.clone());
                            std::thread::spawn(move || {
                                start.wait();
                                let won = match (&handles[level], t % 2) {
                                    (Some(h), 0) => h.cancel_with_cause(ContextError::cause(Cause(t as u64))),
                                    _ => nodes[level].disable(),
                                };
                                (level, won, first_valid(&nodes, level))
                            })
                        })
                        .collect();
                    for t in threads {
                        let (level, won, valid) = t.join().expect("a cancelling thread");
                        assert_eq!(
                            valid, None,
                            "round {round}: the cancel at level {level} returned {won} while level {valid:?} below \
                             it was still valid"
                        );
                    }
                    let errs: Vec<_> = nodes.iter().map(SessionCtx::err).collect();
                    assert!(errs.iter().all(Option::is_some), "round {round}: a level is not cancelled");
                    // A level's cause is the one of the nearest cancelled level at or above it:
                    // the same for each run of levels between two cancelled spots.
                    for (i, e) in errs.iter().enumerate() {
                        assert_eq!(e, &nodes[i].err(), "round {round}: level {i}'s err() changed");
                    }
                    drop(errs);
                    drop(handles);
                    assert!(Arc::try_unwrap(nodes).is_ok(), "the threads are joined: the chain is dropped here");
                    tokens.assert_balanced("deep chain values");
                }
            });
        },
    );
}

/// A root with 10 000 children, each with a grandchild (every third made through `with_value`);
/// four threads: two disable the root (one wins, one loses), two disable children and
/// grandchildren from both ends of the list. Each disable, once returned, leaves its whole
/// subtree invalid; the losing root disable too.
#[test]
fn wide_tree_disabled_at_root_and_children_from_four_threads_leaves_no_valid_descendant() {
    const CHILDREN: usize = 10_000;
    within("wide tree disables", HANG, || {
        for round in 0..30u64 {
            let tokens = Tracker::new();
            let root = SessionCtx::new(&Context::background());
            let children: Vec<SessionCtx> = (0..CHILDREN)
                .map(|i| if i % 3 == 0 { root.with_value("c", tokens.token()).fork() } else { root.fork() })
                .collect();
            let grandchildren: Vec<SessionCtx> = children.iter().map(SessionCtx::fork).collect();
            let tree = Arc::new((root, children, grandchildren));
            let start = Arc::new(Barrier::new(4));
            let threads: Vec<_> = (0..4usize)
                .map(|t| {
                    let (tree, start) = (tree.clone(), start.clone());
                    std::thread::spawn(move || {
                        let (root, children, grand) = &*tree;
                        start.wait();
                        let mut problems = Vec::new();
                        match t {
                            0 | 1 => {
                                if t == 1 {
                                    std::hint::spin_loop();
                                }
                                let won = root.disable();
                                let c = first_valid(children, 0);
                                let g = first_valid(grand, 0);
                                if c.is_some() || g.is_some() {
                                    problems.push(format!(
                                        "root disable (returned {won}) returned with child {c:?} / grandchild {g:?} \
                                         valid"
                                    ));
                                }
                            }
                            _ => {
                                let mut rng = Rng(round * 7 + t as u64 + 1);
                                for k in 0..400 {
                                    let i = if t == 2 { k * 25 } else { CHILDREN - 1 - k * 25 };
                                    let won =
                                        if rng.below(3) == 0 { grand[i].disable() } else { children[i].disable() };
                                    if grand[i].is_valid() && !children[i].is_valid() {
                                        problems.push(format!(
                                            "child {i}'s disable (returned {won}) left its grandchild valid"
                                        ));
                                    }
                                }
                            }
                        }
                        problems
                    })
                })
                .collect();
            let problems: Vec<String> = threads.into_iter().flat_map(|t| t.join().expect("a thread")).collect();
            assert!(problems.is_empty(), "round {round}: {problems:#?}");
            drop(tree);
            tokens.assert_balanced("wide tree values");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 2. Callbacks that re-enter the tree
// ---------------------------------------------------------------------------------------------

/// A small tree: root, 16 children, 4 grandchildren each (ids: 0 root, 1..=16 children,
/// then grandchildren).
struct Tree {
    nodes: Vec<SessionCtx>,
    parent: Vec<Option<usize>>,
}

impl Tree {
    fn new(map_children: bool) -> Tree {
        let root = SessionCtx::new(&Context::background());
        let mut nodes = vec![root];
        let mut parent = vec![None];
        for c in 0..16 {
            // Some children are `SessionMap`s' scopes seen through a session over their export
            // (disabling either disables the same scope).
            let child = if map_children && c % 4 == 0 {
                let map = SessionMap::new_in(nodes[0].context());
                map.insert("c", c);
                SessionCtx::new(&map.export())
            } else {
                nodes[0].fork()
            };
            nodes.push(child);
            parent.push(Some(0));
        }
        for c in 1..=16 {
            for g in 0..4 {
                let gc = if g % 2 == 0 { nodes[c].fork() } else { nodes[c].with_value("g", g).fork() };
                nodes.push(gc);
                parent.push(Some(c));
            }
        }
        Tree { nodes, parent }
    }

    fn is_under(&self, mut node: usize, ancestor: usize) -> bool {
        loop {
            if node == ancestor {
                return true;
            }
            match self.parent[node] {
                Some(p) => node = p,
                None => return false,
            }
        }
    }

    /// Descendants of `node` (itself included) that read valid.
    fn valid_under(&self, node: usize) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&n| self.is_under(n, node) && self.nodes[n].is_valid()).collect()
    }
}

/// Every node gets `after_cancel` callbacks that re-enter the tree: they disable the root (an
/// ancestor), a sibling, their own descendants, fork a new child (born invalid, and its own
/// callback runs inline), and register another callback (runs inline). Four threads disable
/// random nodes at once, 300 rounds. Each disable, once returned, leaves its subtree invalid;
/// every callback ran exactly once; every closure is dropped once.
#[test]
fn callbacks_that_disable_ancestors_siblings_and_descendants_run_once_and_never_deadlock() {
    within("re-entrant callbacks", HANG, || {
        for round in 0..1_500u64 {
            let closures = Tracker::new();
            let tree = Arc::new(Tree::new(round % 2 == 0));
            let n = tree.nodes.len();
            let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect());
            let inline_problems = Arc::new(Mutex::new(Vec::<String>::new()));
            let mut handles = Vec::new();
            for id in 0..n {
                let (t2, r2, p2, token) =
                    (Arc::downgrade(&tree), runs.clone(), inline_problems.clone(), closures.token());
                let inner_token = closures.token();
                handles.push(tree.nodes[id].after_cancel(move || {
                    let _keep = token;
                    r2[id].fetch_add(1, Ordering::SeqCst);
                    let Some(tree) = t2.upgrade() else { return };
                    let me = &tree.nodes[id];
                    if me.is_valid() {
                        p2.lock().unwrap().push(format!("node {id}: valid inside its own callback"));
                    }
                    match id % 5 {
                        0 => {
                            let _ = tree.nodes[0].disable();
                        }
                        1 => {
                            // A sibling (or the next node).
                            let _ = tree.nodes[(id + 1) % tree.nodes.len()].disable();
                        }
                        2 => {
                            for d in 0..tree.nodes.len() {
                                if d != id && tree.is_under(d, id) {
                                    let _ = tree.nodes[d].disable();
                                }
                            }
                        }
                        3 => {
                            let born = me.fork();
                            let ran = Arc::new(AtomicBool::new(false));
                            let r3 = ran.clone();
                            let h = born.after_cancel(move || {
                                r3.store(true, Ordering::SeqCst);
                                drop(inner_token);
                            });
                            if born.is_valid() || !ran.load(Ordering::SeqCst) || h.stop() {
                                p2.lock().unwrap().push(format!("node {id}: a fork in its callback is not born done"));
                            }
                            return;
                        }
                        _ => {
                            let ran = Arc::new(AtomicBool::new(false));
                            let r3 = ran.clone();
                            let h = me.after_cancel(move || {
                                r3.store(true, Ordering::SeqCst);
                                drop(inner_token);
                            });
                            if !ran.load(Ordering::SeqCst) || h.stop() {
                                p2.lock()
                                    .unwrap()
                                    .push(format!("node {id}: a callback registered in a callback did not run inline"));
                            }
                            return;
                        }
                    }
                    drop(inner_token);
                }));
            }
            let start = Arc::new(Barrier::new(4));
            let threads: Vec<_> = (0..4u64)
                .map(|t| {
                    let (tree, start) = (tree.clone(), start.clone());
                    std::thread::spawn(move || {
                        let mut rng = Rng(round * 131 + t + 7);
                        start.wait();
                        let mut problems = Vec::new();
                        for _ in 0..3 {
                            let target = rng.below(tree.nodes.len() as u64) as usize;
                            let won = tree.nodes[target].disable();
                            let valid = tree.valid_under(target);
                            if !valid.is_empty() {
                                problems.push(format!("disable of {target} (returned {won}) left {valid:?} valid"));
                            }
                        }
                        // Everything ends: the root.
                        let won = tree.nodes[0].disable();
                        let valid = tree.valid_under(0);
                        if !valid.is_empty() {
                            problems.push(format!("root disable (returned {won}) left {valid:?} valid"));
                        }
                        problems
                    })
                })
                .collect();
            let problems: Vec<String> = threads.into_iter().flat_map(|t| t.join().expect("a thread")).collect();
            assert!(problems.is_empty(), "round {round}: {problems:#?}");
            let inline = inline_problems.lock().unwrap().clone();
            assert!(inline.is_empty(), "round {round}: {inline:#?}");
            for (id, r) in runs.iter().enumerate() {
                assert_eq!(r.load(Ordering::SeqCst), 1, "round {round}: node {id}'s callback ran != once");
            }
            drop(handles);
            drop(tree);
            closures.assert_balanced("callback closures");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 3. done() wakers whose clone / wake / drop re-enter
// ---------------------------------------------------------------------------------------------

/// A waker whose `clone`, `wake` and `drop` are user code that re-enters the tree. The token
/// is only held, so that a waker never dropped shows as a leak.
#[allow(dead_code)]
struct Hostile {
    tree: std::sync::Weak<Tree>,
    node: usize,
    wakes: AtomicUsize,
    token: Mutex<Option<Token>>,
}

fn hostile_act(h: &Hostile, what: u8) {
    let Some(tree) = h.tree.upgrade() else { return };
    let n = tree.nodes.len();
    match what {
        // clone: fork a child of the node (born done if cancelled) and disable it at once.
        0 => {
            let f = tree.nodes[h.node].fork();
            let _ = f.disable();
        }
        // wake: disable the root and a sibling.
        1 => {
            h.wakes.fetch_add(1, Ordering::SeqCst);
            let _ = tree.nodes[0].disable();
            let _ = tree.nodes[(h.node + 3) % n].disable();
        }
        // drop: disable the node's parent, if any.
        _ => {
            if let Some(p) = tree.parent[h.node] {
                let _ = tree.nodes[p].disable();
            }
        }
    }
}

unsafe fn hostile_clone(data: *const ()) -> RawWaker {
    // SAFETY: `data` is an `Arc<Hostile>` made by `hostile_waker`; one more strong count.
    let arc = unsafe {
        Arc::increment_strong_count(data.cast::<Hostile>());
        Arc::from_raw(data.cast::<Hostile>())
    };
    hostile_act(&arc, 0);
    RawWaker::new(Arc::into_raw(arc).cast(), &HOSTILE_VTABLE)
}

unsafe fn hostile_wake(data: *const ()) {
    // SAFETY: consumes the waker's strong count.
    let arc = unsafe { Arc::from_raw(data.cast::<Hostile>()) };
    hostile_act(&arc, 1);
    hostile_act(&arc, 2);
}

unsafe fn hostile_wake_by_ref(data: *const ()) {
    // SAFETY: borrowed; the count is not consumed.
    let arc = std::mem::ManuallyDrop::new(unsafe { Arc::from_raw(data.cast::<Hostile>()) });
    hostile_act(&arc, 1);
}

unsafe fn hostile_drop(data: *const ()) {
    // SAFETY: consumes the waker's strong count.
    let arc = unsafe { Arc::from_raw(data.cast::<Hostile>()) };
    hostile_act(&arc, 2);
}

static HOSTILE_VTABLE: RawWakerVTable =
    RawWakerVTable::new(hostile_clone, hostile_wake, hostile_wake_by_ref, hostile_drop);

fn hostile_waker(h: Arc<Hostile>) -> Waker {
    // SAFETY: the vtable's functions treat the data as the `Arc<Hostile>` given here.
    unsafe { Waker::from_raw(RawWaker::new(Arc::into_raw(h).cast(), &HOSTILE_VTABLE)) }
}

/// Four threads poll `done()` of tree nodes with hostile wakers (re-polled with fresh wakers,
/// so `update_waker` clones and drops them) and disable nodes; the wakers' `clone`, `wake` and
/// `drop` fork and disable nodes of the same tree. 200 rounds in a child process. No hang;
/// after each disable returned its subtree reads invalid; every `done()` resolves; every waker
/// is dropped (its token released).
#[test]
fn done_wakers_whose_clone_wake_and_drop_reenter_the_tree_never_deadlock() {
    in_child_within(
        "done_wakers_whose_clone_wake_and_drop_reenter_the_tree_never_deadlock",
        Duration::from_secs(60),
        || {
            within("hostile wakers", HANG, || {
                for round in 0..1_000u64 {
                    let tokens = Tracker::new();
                    let tree = Arc::new(Tree::new(round % 3 == 0));
                    let n = tree.nodes.len();
                    let start = Arc::new(Barrier::new(4));
                    let threads: Vec<_> = (0..4u64)
                        .map(|t| {
                            let (tree, start, tokens) = (tree.clone(), start.clone(), tokens.clone());
                            std::thread::spawn(move || {
                                let mut rng = Rng(round * 37 + t + 11);
                                let mut pending = Vec::new();
                                let mut problems = Vec::new();
                                let waker_for = |node: usize| {
                                    hostile_waker(Arc::new(Hostile {
                                        tree: Arc::downgrade(&tree),
                                        node,
                                        wakes: AtomicUsize::new(0),
                                        token: Mutex::new(Some(tokens.token())),
                                    }))
                                };
                                for i in 0..6 {
                                    let node = rng.below(n as u64) as usize;
                                    let mut done = Box::pin(tree.nodes[node].done());
                                    for _ in 0..2 {
                                        let w = waker_for(node);
                                        let _ = done.as_mut().poll(&mut TaskContext::from_waker(&w));
                                    }
                                    pending.push((node, done));
                                    if i == 0 {
                                        start.wait();
                                    }
                                    let target = rng.below(n as u64) as usize;
                                    let won = tree.nodes[target].disable();
                                    let valid = tree.valid_under(target);
                                    if !valid.is_empty() {
                                        problems.push(format!("disable of {target} ({won}) left {valid:?} valid"));
                                    }
                                }
                                let won = tree.nodes[0].disable();
                                let valid = tree.valid_under(0);
                                if !valid.is_empty() {
                                    problems.push(format!("root disable ({won}) left {valid:?} valid"));
                                }
                                for (node, mut done) in pending {
                                    let w = waker_for(node);
                                    if done.as_mut().poll(&mut TaskContext::from_waker(&w)).is_pending() {
                                        problems.push(format!("done() of {node} pending after the root's disable"));
                                    }
                                }
                                problems
                            })
                        })
                        .collect();
                    let problems: Vec<String> = threads.into_iter().flat_map(|t| t.join().expect("a thread")).collect();
                    assert!(problems.is_empty(), "round {round}: {problems:#?}");
                    drop(tree);
                    tokens.assert_balanced("hostile wakers");
                }
            });
        },
    );
}

/// `done()` wakers whose `wake` panics, on a tree with `after_cancel` callbacks: the panic
/// reaches the canceller, but only after the whole subtree is cancelled; no callback runs
/// twice; every closure is dropped once (run or dropped unrun); `done()` resolves.
#[test]
fn a_waker_whose_wake_panics_still_leaves_the_tree_cancelled_and_nothing_leaked() {
    static PANICKY: RawWakerVTable = RawWakerVTable::new(
        |d| RawWaker::new(d, &PANICKY),
        |_| panic!("hostile waker: wake"),
        |_| panic!("hostile waker: wake_by_ref"),
        |_| {},
    );
    static DATA: u8 = 0;
    within("panicking wakers", HANG, || {
        for round in 0..100u64 {
            let closures = Tracker::new();
            let tree = Tree::new(round % 2 == 0);
            let mut dones = Vec::new();
            for id in [0usize, 1, 5, 17, 30] {
                let mut d = Box::pin(tree.nodes[id].done());
                // SAFETY: the vtable ignores the data pointer (a static byte).
                let w = unsafe { Waker::from_raw(RawWaker::new(std::ptr::from_ref(&DATA).cast(), &PANICKY)) };
                assert!(d.as_mut().poll(&mut TaskContext::from_waker(&w)).is_pending());
                dones.push(d);
            }
            let ran: Arc<Vec<AtomicUsize>> = Arc::new((0..tree.nodes.len()).map(|_| AtomicUsize::new(0)).collect());
            let _handles: Vec<_> = (0..tree.nodes.len())
                .map(|id| {
                    let (r, tok) = (ran.clone(), closures.token());
                    tree.nodes[id].after_cancel(move || {
                        let _t = tok;
                        r[id].fetch_add(1, Ordering::SeqCst);
                    })
                })
                .collect();
            let target = [0usize, 1, 5][round as usize % 3];
            let out = silently(|| tree.nodes[target].disable());
            assert!(out.is_err(), "round {round}: the waker's panic reached the canceller");
            let valid = tree.valid_under(target);
            assert!(valid.is_empty(), "round {round}: a panicking waker left {valid:?} valid under {target}");
            assert!(ran.iter().all(|r| r.load(Ordering::SeqCst) <= 1), "round {round}: a callback ran twice");
            // Whatever else: a second disable of the root completes.
            let _ = silently(|| tree.nodes[0].disable());
            assert!(tree.valid_under(0).is_empty());
            for d in &mut dones {
                assert!(d.as_mut().poll(&mut TaskContext::from_waker(Waker::noop())).is_ready());
            }
            drop(dones);
            drop(_handles);
            drop(tree);
            closures.assert_balanced("callbacks next to a panicking waker");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 4. Deadlines (std clock) racing explicit cancels
// ---------------------------------------------------------------------------------------------

/// A tree whose nodes have short deadlines on the std clock (0..3 ms, some inherited) and an
/// `after_cancel` callback each (so the std timer fires them), while four threads disable
/// random nodes and cancel `with_cancel` contexts with causes. Each explicit cancel, once
/// returned, leaves its subtree invalid; every node's first `err()` never changes; every node
/// ends `DeadlineExceeded`, `Canceled` or a thread's cause; every callback runs exactly once
/// (the timer fires the rest); every closure is dropped once.
#[test]
fn std_clock_deadlines_racing_explicit_cancels_keep_err_stable_and_callbacks_once() {
    within("deadlines racing cancels", HANG, || {
        for round in 0..40u64 {
            let closures = Tracker::new();
            let mut rng = Rng(round * 977 + 3);
            let (base, base_cancel) = Context::background().with_cancel();
            let mut nodes: Vec<SessionCtx> = vec![SessionCtx::with_deadline(
                &base,
                STD_CLOCK.after(Duration::from_micros(1_000 + rng.below(3_000))),
            )];
            let mut parent = vec![None];
            let mut handles: Vec<Option<CancelHandle>> = vec![None];
            for i in 1..120usize {
                let p = rng.below(i as u64) as usize;
                let (node, h) = match rng.below(4) {
                    0 => (nodes[p].fork(), None),
                    1 => (
                        SessionCtx::with_deadline(
                            nodes[p].context(),
                            STD_CLOCK.after(Duration::from_micros(rng.below(3_000))),
                        ),
                        None,
                    ),
                    2 => {
                        let (ctx, c) = nodes[p].with_value("i", i).context().with_cancel();
                        (SessionCtx::new(&ctx), Some(c))
                    }
                    _ => (nodes[p].with_value("j", i).fork(), None),
                };
                nodes.push(node);
                parent.push(Some(p));
                handles.push(h);
            }
            let tree = Arc::new(Tree { nodes, parent });
            let handles = Arc::new(handles);
            let ran: Arc<Vec<AtomicUsize>> = Arc::new((0..tree.nodes.len()).map(|_| AtomicUsize::new(0)).collect());
            let regs: Vec<_> = (0..tree.nodes.len())
                .map(|id| {
                    let (r, tok) = (ran.clone(), closures.token());
                    tree.nodes[id].after_cancel(move || {
                        let _t = tok;
                        r[id].fetch_add(1, Ordering::SeqCst);
                    })
                })
                .collect();
            let first: Arc<Vec<OnceLock<ContextError>>> =
                Arc::new((0..tree.nodes.len()).map(|_| OnceLock::new()).collect());
            let start = Arc::new(Barrier::new(4));
            let threads: Vec<_> = (0..4u64)
                .map(|t| {
                    let (tree, handles, first, start) = (tree.clone(), handles.clone(), first.clone(), start.clone());
                    std::thread::spawn(move || {
                        let mut rng = Rng(round * 53 + t + 5);
                        let mut problems = Vec::new();
                        start.wait();
                        for k in 0..30 {
                            let target = rng.below(tree.nodes.len() as u64) as usize;
                            let won = match &handles[target] {
                                Some(h) if k % 2 == 0 => h.cancel_with_cause(ContextError::cause(Cause(t))),
                                _ => tree.nodes[target].disable(),
                            };
                            let valid = tree.valid_under(target);
                            if !valid.is_empty() {
                                problems.push(format!("cancel of {target} ({won}) left {valid:?} valid"));
                            }
                            for (id, node) in tree.nodes.iter().enumerate() {
                                if let Some(e) = node.err() {
                                    let f = first[id].get_or_init(|| e.clone());
                                    if *f != e {
                                        problems.push(format!("node {id}: err() was {f:?}, now {e:?}"));
                                    }
                                }
                            }
                            if k % 8 == 0 {
                                std::thread::sleep(Duration::from_micros(300));
                            }
                        }
                        problems
                    })
                })
                .collect();
            let problems: Vec<String> = threads.into_iter().flat_map(|t| t.join().expect("a thread")).collect();
            assert!(problems.is_empty(), "round {round}: {problems:#?}");
            // Every deadline is at most ~4 ms away: the std timer fires what nobody cancelled.
            let start = std::time::Instant::now();
            while ran.iter().any(|r| r.load(Ordering::SeqCst) == 0) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(2));
            }
            for (id, node) in tree.nodes.iter().enumerate() {
                let e = node.err().expect("every node is done");
                if let Some(f) = first[id].get() {
                    assert_eq!(f, &e, "round {round}: node {id}'s err() changed");
                }
                let text = e.to_string();
                let known = e == ContextError::DeadlineExceeded
                    || e == ContextError::Canceled
                    || (0..4).any(|t| text.contains(&format!("cause {t}")));
                assert!(known, "round {round}: node {id}: unexpected err() {e:?}");
                assert_eq!(ran[id].load(Ordering::SeqCst), 1, "round {round}: node {id}'s callback ran != once");
            }
            drop(regs);
            drop((tree, handles, base, base_cancel));
            closures.assert_balanced("deadline callbacks");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 5. Panicking callbacks, SessionMap disables, with_value chains
// ---------------------------------------------------------------------------------------------

/// `SessionMap`s opened under a tree (and sessions under their exports, through `with_value`
/// chains) with callbacks of which some panic; four threads disable maps, sessions and the root
/// at once, catching the panics. Whether the disable returned or unwound with a callback's
/// panic, its subtree reads invalid by then; no callback runs twice; every closure is dropped
/// once; a later disable of anything returns `false` and the maps still work as maps.
#[test]
fn panicking_callbacks_on_maps_and_sessions_never_leave_a_subtree_valid() {
    within("panicking callbacks, maps", HANG, || {
        for round in 0..200u64 {
            let closures = Tracker::new();
            let root = SessionCtx::new(&Context::background());
            let maps: Vec<SessionMap> = (0..8)
                .map(|i| {
                    let m = SessionMap::new_in(root.with_value("m", i).context());
                    m.insert("k", i);
                    m
                })
                .collect();
            // Under each map: a with_value chain ending in a session, and a fork of it.
            let unders: Vec<(SessionCtx, SessionCtx)> = maps
                .iter()
                .map(|m| {
                    let s = SessionCtx::new(&m.export()).with_value("a", 1u8).with_value("b", 2u8);
                    let f = s.fork();
                    (s, f)
                })
                .collect();
            let ran: Arc<Vec<AtomicUsize>> = Arc::new((0..64).map(|_| AtomicUsize::new(0)).collect());
            let mut handles = Vec::new();
            for (i, m) in maps.iter().enumerate() {
                for j in 0..4usize {
                    let slot = i * 8 + j;
                    let (r, tok) = (ran.clone(), closures.token());
                    let panics = (slot as u64 + round).is_multiple_of(5);
                    let f = move || {
                        let _t = tok;
                        r[slot].fetch_add(1, Ordering::SeqCst);
                        assert!(!panics, "hostile after_cancel callback");
                    };
                    handles.push(if j % 2 == 0 { m.after_cancel(f) } else { unders[i].1.after_cancel(f) });
                }
            }
            let world = Arc::new((root, maps, unders));
            let start = Arc::new(Barrier::new(4));
            let threads: Vec<_> = (0..4usize)
                .map(|t| {
                    let (world, start) = (world.clone(), start.clone());
                    std::thread::spawn(move || {
                        let (root, maps, unders) = &*world;
                        let mut problems = Vec::new();
                        start.wait();
                        for i in (t..8).step_by(2) {
                            let r = silently(|| if t % 2 == 0 { maps[i].disable() } else { unders[i].0.disable() });
                            let (s, f) = &unders[i];
                            // A map's disable reaches the sessions under its export; a disable
                            // of such a session reaches its fork (not the map above it).
                            if (t % 2 == 0 && maps[i].is_valid()) || s.is_valid() || f.is_valid() {
                                problems.push(format!("disable of map {i} ({r:?}) left its subtree valid"));
                            }
                        }
                        let r = silently(|| root.disable());
                        if maps.iter().any(SessionMap::is_valid)
                            || unders.iter().any(|(s, f)| s.is_valid() || f.is_valid())
                        {
                            problems.push(format!("root disable ({r:?}) left a map or session under it valid"));
                        }
                        problems
                    })
                })
                .collect();
            let problems: Vec<String> = threads.into_iter().flat_map(|t| t.join().expect("a thread")).collect();
            assert!(problems.is_empty(), "round {round}: {problems:#?}");
            let (root, maps, unders) = &*world;
            assert!(!root.disable());
            for (i, m) in maps.iter().enumerate() {
                assert!(!m.disable() && !unders[i].0.disable() && !unders[i].1.disable());
                m.insert("after", i);
                assert_eq!(m.value::<usize, _>(&"after").as_deref(), Some(&i), "a disabled map is still a map");
            }
            assert!(ran.iter().all(|r| r.load(Ordering::SeqCst) <= 1), "round {round}: a callback ran twice");
            drop(handles);
            drop(world);
            closures.assert_balanced("map callbacks");
        }
    });
}

/// A panicking `wake` or callback must not cost the other callbacks of the same cancel their
/// run (with `std`, which this package enables): before, the panic unwound out of the cancel's
/// loop and every callback after it was dropped unrun — a cleanup (closing a connection,
/// releasing a permit) silently lost. The first panic still reaches the cancelling caller.
#[test]
fn a_panicking_waker_or_callback_does_not_keep_the_other_callbacks_from_running() {
    fn panicking_waker() -> Waker {
        fn clone(p: *const ()) -> RawWaker {
            RawWaker::new(p, &VTABLE)
        }
        fn wake(_: *const ()) {
            panic!("hostile wake");
        }
        fn noop(_: *const ()) {}
        static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, noop);
        // SAFETY: the vtable's functions ignore the data pointer.
        unsafe { Waker::from_raw(RawWaker::new(std::ptr::null(), &VTABLE)) }
    }
    for waker_panics in [true, false] {
        let (ctx, cancel) = Context::background().with_cancel();
        let ran = Arc::new(AtomicUsize::new(0));
        // A waiting `done()` whose waker panics when woken.
        let mut done = Box::pin(ctx.done());
        if waker_panics {
            let waker = panicking_waker();
            assert!(done.as_mut().poll(&mut TaskContext::from_waker(&waker)).is_pending());
        }
        let r = ran.clone();
        let _first = ctx.after_cancel(move || {
            r.fetch_add(1, Ordering::SeqCst);
            if !waker_panics {
                panic!("hostile callback");
            }
        });
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let r = ran.clone();
                ctx.after_cancel(move || {
                    r.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        let outcome = silently(|| cancel.cancel());
        assert!(outcome.is_err(), "the panic reaches the cancelling caller (waker panics: {waker_panics})");
        assert_eq!(
            ran.load(Ordering::SeqCst),
            4,
            "every callback ran despite the panicking {}",
            if waker_panics { "waker" } else { "callback" }
        );
        assert_eq!(ctx.err(), Some(ContextError::Canceled));
        drop(handles);
    }
}

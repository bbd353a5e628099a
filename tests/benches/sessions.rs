//! localsession against its peers, side by side in one run (P1–P8, P9: bridges, P10: rayon; targets and
//! results in `docs/performance.md`).
//!
//! `cargo bench -p localsession-benches --bench sessions` measures every figure with criterion and
//! then prints a table: operation, ours, peer, ratio, target, met. The implicit tokio mode
//! (P6 implicit) needs `RUSTFLAGS="--cfg tokio_unstable"`; `tests/benches/report.sh` runs the
//! whole suite that way. No figure here is asserted: machines are shared and noisy.
//!
//! Peers: a raw `thread_local!` pointer read doing the same list walk (the floor), tokio's
//! `task_local!` (`sync_scope`, `scope`, `with`), `opentelemetry::Context` (`current`, `attach`,
//! `with_value`), plain `tokio::spawn` and `std::thread::spawn`. Go's figures (the upstream's
//! benchmarks, measured on this machine kind) are printed for reference.
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
#[cfg(tokio_unstable)]
use floors::floor_hooks;
use floors::{EpochFloor, FILLER};
use localsession_core::{Context, Key, SessionCtx, SessionMap};
use localsession_std::{current, enter, go, scope, with_current};

#[path = "floors.rs"]
mod floors;

// ---------------------------------------------------------------------------------------------
// Allocation counting (only while `COUNTING` is set, outside timed loops).
// ---------------------------------------------------------------------------------------------

struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static ALLOC_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; the counters do not affect allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            ALLOC_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn count_allocs<R>(n: usize, mut f: impl FnMut() -> R) -> (f64, f64) {
    ALLOCS.store(0, Ordering::SeqCst);
    ALLOC_BYTES.store(0, Ordering::SeqCst);
    let mut keep = Vec::with_capacity(n);
    COUNTING.store(true, Ordering::SeqCst);
    for _ in 0..n {
        keep.push(f());
    }
    COUNTING.store(false, Ordering::SeqCst);
    drop(keep);
    (ALLOCS.load(Ordering::SeqCst) as f64 / n as f64, ALLOC_BYTES.load(Ordering::SeqCst) as f64 / n as f64)
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Keys and peers
// ---------------------------------------------------------------------------------------------

static K: Key<u64> = Key::new("k");

/// The floor: a raw thread-local pointer to a hand-written list, walked the same way.
struct RawNode {
    key: usize,
    value: u64,
    next: *const RawNode,
}

thread_local! {
    static RAW: Cell<*const RawNode> = const { Cell::new(std::ptr::null()) };
}

#[inline(never)]
fn raw_get(key: usize) -> u64 {
    RAW.with(|head| {
        let mut p = head.get();
        // SAFETY: the list is leaked for the benchmark's lifetime.
        unsafe {
            while !p.is_null() {
                if (*p).key == key {
                    return (*p).value;
                }
                p = (*p).next;
            }
        }
        0
    })
}

tokio::task_local! {
    static TL: u64;
    /// P6's `task_local` peer: a shared value carried into each spawned task by hand.
    static TL_ARC: Arc<u64>;
}

#[derive(Clone, Copy)]
struct OtelValue(u64);

/// A session context of `depth` typed bindings with `K` bound first (deepest).
fn session_of_depth(depth: usize) -> SessionCtx {
    floors::session_of_depth(&K, depth)
}

// ---------------------------------------------------------------------------------------------
// Benchmarks
// ---------------------------------------------------------------------------------------------

/// P1's read: the current session's `K`, borrowed.
#[inline(always)]
fn p1_read() -> u64 {
    with_current(|s| s.map_or(0, |s| s.read_key(&K, |v| v.copied().unwrap_or(0))))
}

/// P1's read `iters` times, timed as a whole: the loop of the rows that compare a task with a
/// plain thread. Not inlined, so that each row runs this one copy.
#[inline(never)]
fn p1_read_loop(iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        black_box(p1_read());
    }
    start.elapsed()
}

fn p1_current_get(c: &mut Criterion) {
    let mut g = c.benchmark_group("p1_current_get");
    // Ours: `current()`'s borrowed form plus a typed get, through the std thread store.
    let _bound = enter(session_of_depth(1));
    g.bench_function("localsession", |b| b.iter(p1_read));
    // The same read through the task row's loop (one function, so that both rows run the same
    // machine code: the task row alone measured 2.1, 2.4 or 3.4 ns in builds that differed only
    // in other benchmarks' code, its peer 2.0 ns in each), on this thread.
    g.bench_function("localsession_loop", |b| b.iter_custom(p1_read_loop));
    // The same read inside a task of an implicit-mode runtime, with an inherited session: the
    // hooks install it in the worker's slot, so the read path is the plain thread's.
    #[cfg(tokio_unstable)]
    {
        let rt = tokio_runtime(true);
        g.bench_function("localsession_in_implicit_task", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    localsession_std::scope(session_of_depth(1), || tokio::spawn(async move { p1_read_loop(iters) }))
                        .await
                        .unwrap()
                })
            })
        });
    }
    // The floor: one list node behind a thread-local pointer.
    let node = Box::leak(Box::new(RawNode { key: 1, value: 7, next: std::ptr::null() }));
    RAW.with(|h| h.set(node));
    g.bench_function("raw_thread_local", |b| b.iter(|| raw_get(black_box(1))));
    // tokio task_local inside sync_scope.
    TL.sync_scope(7, || g.bench_function("tokio_task_local", |b| b.iter(|| TL.with(|v| *v))));
    // opentelemetry: Context::current() + get.
    let _otel = opentelemetry::Context::current_with_value(OtelValue(7)).attach();
    g.bench_function("opentelemetry", |b| {
        b.iter(|| opentelemetry::Context::current().get::<OtelValue>().map_or(0, |v| v.0))
    });
    g.finish();
}

fn p2_enter(c: &mut Criterion) {
    let mut g = c.benchmark_group("p2_enter");
    let s: localsession_core::AnySession = session_of_depth(1).into();
    g.bench_function("localsession", |b| {
        b.iter(|| {
            let guard = enter(s.clone());
            drop(black_box(guard));
        })
    });
    // Same without the clone of the session handle: what `WithSession` does around each poll
    // (and an executor embedding the core), an in-place swap in and out.
    let store: &dyn localsession_core::ContextStore = &localsession_std::THREAD_STORE;
    let mut held = Some(s.clone());
    g.bench_function("localsession_swap", |b| {
        b.iter(|| {
            let token = store.enter_scope(black_box(&mut held)).unwrap_or(0);
            store.exit_scope(black_box(&mut held), token);
        })
    });
    // A sticky `bind`-style exchange (also asks the task probe whom the binding belongs to).
    g.bench_function("localsession_sticky_swap", |b| {
        b.iter(|| {
            store.swap(black_box(&mut held));
            store.swap(black_box(&mut held));
        })
    });
    g.bench_function("tokio_sync_scope", |b| b.iter(|| TL.sync_scope(black_box(7), || ())));
    let otel = opentelemetry::Context::new().with_value(OtelValue(7));
    g.bench_function("opentelemetry_attach", |b| {
        b.iter(|| {
            let guard = otel.clone().attach();
            drop(black_box(guard));
        })
    });
    g.finish();
}

fn p3_with_value(c: &mut Criterion) {
    let mut g = c.benchmark_group("p3_with_value");
    let base = session_of_depth(1);
    // The derived context is dropped outside the measurement (criterion's large-drop form):
    // the figure is the cost of deriving, as Go's WithValue figure is.
    g.bench_function("localsession", |b| b.iter_with_large_drop(|| base.with(&FILLER[0], 1)));
    g.bench_function("localsession_any_key", |b| b.iter_with_large_drop(|| base.with_value("a", 1u64)));
    let otel = opentelemetry::Context::new().with_value(OtelValue(1));
    g.bench_function("opentelemetry", |b| b.iter_with_large_drop(|| otel.with_value(7u64)));
    g.finish();
}

fn p4_depth(c: &mut Criterion) {
    let mut g = c.benchmark_group("p4_get_depth");
    for depth in [1usize, 10, 64] {
        let s = session_of_depth(depth);
        g.bench_with_input(BenchmarkId::new("localsession", depth), &s, |b, s| {
            b.iter(|| s.get(black_box(&K)).copied().unwrap_or(0))
        });
        let mut ctx = Context::background().with_value("k", 7u64);
        for i in 1..depth {
            ctx = ctx.with_value(i as u32, 1u64);
        }
        g.bench_with_input(BenchmarkId::new("localsession_any_key", depth), &ctx, |b, ctx| {
            b.iter(|| ctx.value::<u64, _>(black_box(&"k")).copied().unwrap_or(0))
        });
        // The raw list walk at the same depth (key bound deepest).
        let mut head: *const RawNode = Box::leak(Box::new(RawNode { key: 1, value: 7, next: std::ptr::null() }));
        for i in 1..depth {
            head = Box::leak(Box::new(RawNode { key: 100 + i, value: 1, next: head }));
        }
        RAW.with(|h| h.set(head));
        g.bench_function(BenchmarkId::new("raw_list", depth), |b| b.iter(|| raw_get(black_box(1))));
        let mut otel = opentelemetry::Context::new().with_value(OtelValue(7));
        for i in 1..depth {
            otel = otel.with_value(i as u32);
        }
        g.bench_with_input(BenchmarkId::new("opentelemetry", depth), &otel, |b, cx| {
            b.iter(|| cx.get::<OtelValue>().map_or(0, |v| v.0))
        });
    }
    g.finish();
}

fn map_with_10_keys() -> SessionMap {
    let map = SessionMap::new();
    for i in 0..10u64 {
        map.insert(i, i);
    }
    map.set(&K, 7);
    map
}

fn p5_map(c: &mut Criterion) {
    let mut g = c.benchmark_group("p5_session_map");
    let map = map_with_10_keys();
    g.bench_function("read", |b| b.iter(|| map.read_key(black_box(&K), |v| v.copied().unwrap_or(0))));
    g.bench_function("read_pinned", |b| {
        // With the thread already pinned (an outer guard), as inside a batch of reads.
        let guard = crossbeam_epoch::pin();
        b.iter(|| map.read_key(black_box(&K), |v| v.copied().unwrap_or(0)));
        drop(guard);
    });
    g.bench_function("value_arc", |b| b.iter(|| map.get(black_box(&K)).map_or(0, |v| *v)));
    g.bench_function("insert", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i = (i + 1) % 10;
            map.insert(i, i);
        })
    });
    // Readers while another thread writes continuously.
    let writer = {
        let map = map.clone();
        Writer::start(move |i| map.insert(i, i))
    };
    g.bench_function("read_under_writer", |b| b.iter(|| map.read_key(black_box(&K), |v| v.copied().unwrap_or(0))));
    writer.stop();
    // The same pair on the floor of the shape (`EpochFloor`: an epoch-reclaimed root, no map).
    // Its writer also inserts into an unrelated map each time, so that it writes the floor at
    // about the rate the map's writer above writes the map (a floor write alone is ~3x faster).
    let floor = Arc::new(EpochFloor::new());
    floor.insert(7, 7);
    g.bench_function("floor_read", |b| b.iter(|| floor.read(black_box(7))));
    let writer = {
        let floor = floor.clone();
        let pace = map_with_10_keys();
        Writer::start(move |i| {
            floor.insert(7, i);
            pace.insert(i, i);
        })
    };
    g.bench_function("floor_read_under_writer", |b| b.iter(|| floor.read(black_box(7))));
    writer.stop();
    // The least any design with an atomic root adds to a read under a writer: the same quiet
    // map read plus one load of a cache line (an atomic, alone on its line) that the writer
    // stores once per write. The reader's map itself is never written, and the writer paces
    // itself without touching anything the reader touches (three inserts into a private `RwLock`
    // twin, no epoch: about the time of one map write), so the only cross-core traffic is that
    // line. A read that must see every write through a root the write changes pays at least it.
    let shared = Arc::new(crossbeam_utils::CachePadded::new(AtomicU64::new(0)));
    let one_line_read = || map.read_key(black_box(&K), |v| v.copied().unwrap_or(0)) + shared.load(Ordering::Acquire);
    g.bench_function("one_line_read", |b| b.iter(one_line_read));
    let writer = {
        let shared = shared.clone();
        let pace = RwLockMap::with_keys(10);
        Writer::start(move |i| {
            shared.store(i, Ordering::Release);
            for k in 0..3 {
                pace.insert((i + k) % 10, i);
            }
        })
    };
    g.bench_function("one_line_read_under_writer", |b| b.iter(one_line_read));
    writer.stop();
    // The peer (Go's design: a read-write lock) quiet and under a writer that writes
    // continuously, as the map's writer above does.
    let twin = Arc::new(RwLockMap::with_keys(10));
    g.bench_function("rwlock_read", |b| b.iter(|| twin.read(black_box(&7))));
    let writer = {
        let twin = twin.clone();
        Writer::start(move |i| twin.insert(i, i))
    };
    g.bench_function("rwlock_read_under_writer", |b| b.iter(|| twin.read(black_box(&7))));
    writer.stop();
    g.finish();
}

/// A thread that writes continuously (`write(i)` with `i` cycling over `0..10`) until stopped:
/// the concurrent writer of P5's "read under a writer" rows.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(mut write: impl FnMut(u64) + Send + 'static) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) {
                i = (i + 1) % 10;
                write(i);
            }
        });
        Writer { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

/// Go's `SessionMap` design done in Rust: a read-write lock over a hash map of shared values
/// (the peer P5 is measured against, in the same run).
struct RwLockMap(std::sync::RwLock<std::collections::HashMap<u64, Arc<u64>>>);

impl RwLockMap {
    fn with_keys(n: u64) -> RwLockMap {
        RwLockMap(std::sync::RwLock::new((0..n).map(|i| (i, Arc::new(i))).collect()))
    }
    fn insert(&self, k: u64, v: u64) {
        self.0.write().unwrap().insert(k, Arc::new(v));
    }
    fn get(&self, k: &u64) -> Option<Arc<u64>> {
        self.0.read().unwrap().get(k).cloned()
    }
    fn read(&self, k: &u64) -> u64 {
        self.0.read().unwrap().get(k).map_or(0, |v| **v)
    }
}

/// A cheap, repeatable key sequence over `0..n` (a multiplicative walk: consecutive keys land
/// far apart, so a large map is not read in insertion order).
fn next_key(i: &mut u64, n: u64) -> u64 {
    *i = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (*i >> 17) % n
}

/// P5 at 10, 1 000 and 100 000 keys: inserts (re-binding existing keys, as a request updates its
/// metadata) and reads of any key, hashed `u64` keys and a typed key, against the `RwLock` twin.
fn p5_map_scale(c: &mut Criterion) {
    let mut g = c.benchmark_group("p5_map_scale");
    for &n in &[10u64, 1_000, 100_000] {
        let map = SessionMap::new();
        for i in 0..n {
            map.insert(i, i);
        }
        map.set(&K, 7);
        let twin = RwLockMap::with_keys(n);
        g.bench_with_input(BenchmarkId::new("insert", n), &n, |b, &n| {
            let mut i = 0;
            b.iter(|| {
                let k = next_key(&mut i, n);
                map.insert(k, k);
            })
        });
        g.bench_with_input(BenchmarkId::new("rwlock_insert", n), &n, |b, &n| {
            let mut i = 0;
            b.iter(|| {
                let k = next_key(&mut i, n);
                twin.insert(k, k);
            })
        });
        if n == 10 {
            // Independent of the map's size: once.
            let floor = EpochFloor::new();
            g.bench_function("floor_epoch_insert", |b| {
                let mut i = 0;
                b.iter(|| {
                    let k = next_key(&mut i, n);
                    floor.insert(k, k);
                })
            });
            g.bench_function("floor_epoch_read", |b| {
                let mut i = 0;
                b.iter(|| floor.read(next_key(&mut i, n)))
            });
        }
        g.bench_with_input(BenchmarkId::new("read", n), &n, |b, &n| {
            let mut i = 0;
            b.iter(|| {
                let k = next_key(&mut i, n);
                map.read(&k, |v: Option<&u64>| v.copied().unwrap_or(0))
            })
        });
        g.bench_with_input(BenchmarkId::new("value_arc", n), &n, |b, &n| {
            let mut i = 0;
            b.iter(|| {
                let k = next_key(&mut i, n);
                map.value::<u64, _>(&k).map_or(0, |v| *v)
            })
        });
        g.bench_with_input(BenchmarkId::new("rwlock_read", n), &n, |b, &n| {
            let mut i = 0;
            b.iter(|| twin.read(&next_key(&mut i, n)))
        });
        g.bench_with_input(BenchmarkId::new("rwlock_get", n), &n, |b, &n| {
            let mut i = 0;
            b.iter(|| twin.get(&next_key(&mut i, n)).map_or(0, |v| *v))
        });
        g.bench_with_input(BenchmarkId::new("read_typed", n), &n, |b, _| {
            b.iter(|| map.read_key(black_box(&K), |v| v.copied().unwrap_or(0)))
        });
        g.bench_with_input(BenchmarkId::new("len", n), &n, |b, _| b.iter(|| map.len()));
        // A persistent hash trie (rpds's HAMT, 32-way, `Arc` nodes): the layout issue 15 names
        // for the large-map case. Every write copies its path (`insert`, not `insert_mut`), as
        // a map whose readers may still hold the previous root must.
        let mut trie = (0..n).fold(rpds::HashTrieMapSync::new_sync(), |t, k| t.insert(k, Arc::new(k)));
        g.bench_with_input(BenchmarkId::new("trie_insert", n), &n, |b, &n| {
            let mut i = 0;
            b.iter(|| {
                let k = next_key(&mut i, n);
                trie = trie.insert(k, Arc::new(k));
            })
        });
        g.bench_with_input(BenchmarkId::new("trie_read", n), &n, |b, &n| {
            let mut i = 0;
            b.iter(|| trie.get(&next_key(&mut i, n)).map_or(0, |v| **v))
        });
    }
    g.finish();
}

fn tokio_runtime(implicit: bool) -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2).enable_all();
    #[cfg(tokio_unstable)]
    if implicit {
        localsession_tokio::enable_implicit_sessions(&mut b);
    }
    #[cfg(not(tokio_unstable))]
    let _ = implicit;
    b.build().unwrap()
}

/// A runtime with the four task hooks implicit mode uses, each empty: what tokio's hook
/// machinery costs by itself (the floor under P6 implicit).
#[cfg(tokio_unstable)]
fn tokio_runtime_noop_hooks() -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2)
        .enable_all()
        .on_task_spawn(|m| {
            black_box(m.id());
        })
        .on_before_task_poll(|m| {
            black_box(m.id());
        })
        .on_after_task_poll(|m| {
            black_box(m.id());
        })
        .on_task_terminate(|m| {
            black_box(m.id());
        });
    b.build().unwrap()
}

/// A runtime with [`floor_hooks`] installed.
#[cfg(tokio_unstable)]
fn tokio_runtime_floor_hooks(borrowed: bool) -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(2).enable_all();
    floor_hooks::install(&mut b, borrowed);
    b.build().unwrap()
}

/// Times `iters` spawn+join rounds from inside a worker task.
fn spawn_join_rounds(rt: &tokio::runtime::Runtime, iters: u64, kind: SpawnKind) -> Duration {
    rt.block_on(async move {
        // The measuring task runs with a session: installed around each of its polls by
        // `spawn_with` on the plain runtime, inherited by a plain spawn on the implicit one (how
        // each mode is used).
        let measure = async move {
            // The `task_local` peer's shared value (cloned into each child, as a session is).
            let shared = Arc::new(7u64);
            let start = Instant::now();
            for _ in 0..iters {
                match kind {
                    SpawnKind::Plain => tokio::spawn(async { black_box(1u64) }).await.unwrap(),
                    SpawnKind::Explicit => localsession_tokio::spawn(async { black_box(1u64) }).await.unwrap(),
                    SpawnKind::TaskLocal => {
                        tokio::spawn(TL_ARC.scope(Arc::clone(&shared), async { black_box(1u64) })).await.unwrap()
                    }
                };
            }
            start.elapsed()
        };
        match kind {
            SpawnKind::Plain if IMPLICIT_RT.with(std::cell::Cell::get) => {
                localsession_std::scope(session_of_depth(1), || tokio::spawn(measure)).await.unwrap()
            }
            _ => localsession_tokio::spawn_with(session_of_depth(1), measure).await.unwrap(),
        }
    })
}

thread_local! {
    /// Set while the implicit runtime (or one of its floors) is measured: the measuring task
    /// then inherits its session.
    static IMPLICIT_RT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[derive(Clone, Copy)]
enum SpawnKind {
    Plain,
    Explicit,
    /// The peer of explicit mode: each child wrapped by hand in `TL_ARC.scope(value.clone(), ..)`.
    TaskLocal,
}

fn p6_tokio_spawn(c: &mut Criterion) {
    let mut g = c.benchmark_group("p6_tokio_spawn");
    let rt = tokio_runtime(false);
    g.bench_function("plain", |b| b.iter_custom(|iters| spawn_join_rounds(&rt, iters, SpawnKind::Plain)));
    g.bench_function("explicit", |b| b.iter_custom(|iters| spawn_join_rounds(&rt, iters, SpawnKind::Explicit)));
    g.bench_function("task_local_arc", |b| b.iter_custom(|iters| spawn_join_rounds(&rt, iters, SpawnKind::TaskLocal)));
    #[cfg(tokio_unstable)]
    {
        let rt_implicit = tokio_runtime(true);
        IMPLICIT_RT.with(|f| f.set(true));
        g.bench_function("implicit", |b| {
            b.iter_custom(|iters| spawn_join_rounds(&rt_implicit, iters, SpawnKind::Plain))
        });
        IMPLICIT_RT.with(|f| f.set(false));
        let rt_hooks = tokio_runtime_noop_hooks();
        g.bench_function("plain_noop_hooks", |b| {
            b.iter_custom(|iters| spawn_join_rounds(&rt_hooks, iters, SpawnKind::Plain))
        });
        // The floors inherit like implicit mode: the measuring task too (`IMPLICIT_RT`).
        IMPLICIT_RT.with(|f| f.set(true));
        let rt_floor = tokio_runtime_floor_hooks(false);
        g.bench_function("floor_table_hooks", |b| {
            b.iter_custom(|iters| spawn_join_rounds(&rt_floor, iters, SpawnKind::Plain))
        });
        let rt_floor_borrowed = tokio_runtime_floor_hooks(true);
        g.bench_function("floor_table_hooks_borrowed", |b| {
            b.iter_custom(|iters| spawn_join_rounds(&rt_floor_borrowed, iters, SpawnKind::Plain))
        });
        IMPLICIT_RT.with(|f| f.set(false));
        g.finish();
        // The same variants interleaved (one batch of each per round, medians over the rounds), as
        // for P9: load that changes during the run hits every variant alike. Printed only; the
        // table keeps criterion's figures.
        if group_selected("p6") {
            let (batches, batch) = (31, 20_000u64);
            let variants: [(&str, &tokio::runtime::Runtime, SpawnKind, bool); 7] = [
                ("plain", &rt, SpawnKind::Plain, false),
                ("explicit", &rt, SpawnKind::Explicit, false),
                ("task_local_arc", &rt, SpawnKind::TaskLocal, false),
                ("implicit", &rt_implicit, SpawnKind::Plain, true),
                ("plain_noop_hooks", &rt_hooks, SpawnKind::Plain, false),
                ("floor_table_hooks", &rt_floor, SpawnKind::Plain, true),
                ("floor_table_hooks_borrowed", &rt_floor_borrowed, SpawnKind::Plain, true),
            ];
            let mut samples = vec![Vec::with_capacity(batches); variants.len()];
            for _ in 0..batches {
                for (i, (_, runtime, kind, implicit)) in variants.iter().enumerate() {
                    IMPLICIT_RT.with(|f| f.set(*implicit));
                    samples[i].push(spawn_join_rounds(runtime, batch, *kind).as_nanos() as f64 / batch as f64);
                }
            }
            IMPLICIT_RT.with(|f| f.set(false));
            println!("P6 interleaved ({batches} rounds of {batch} spawn+join per variant; medians):");
            let medians = medians_of(&mut samples);
            for ((id, ..), median) in variants.iter().zip(&medians) {
                println!("P6 interleaved {id:<24} {median:>8.1} ns  {:.2}x plain", median / medians[0]);
            }
            println!("P6 interleaved explicit / task_local peer: {:.2}x", medians[1] / medians[2]);
            println!("P6 interleaved implicit / empty hooks: {:.2}x", medians[3] / medians[4]);
            println!("P6 interleaved implicit / floor table hooks: {:.2}x", medians[3] / medians[5]);
            println!("P6 interleaved floor borrowed / floor cloning: {:.2}x", medians[6] / medians[5]);
        }
    }
    #[cfg(not(tokio_unstable))]
    g.finish();
}

/// The median of each variant's samples (interleaved rounds of P6 and P9).
#[cfg(tokio_unstable)]
fn medians_of(samples: &mut [Vec<f64>]) -> Vec<f64> {
    samples
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect()
}

/// Whether this run has no benchmark filter or one that mentions `prefix` (e.g. `p6`): the
/// extra, printed-only measurements of a group (interleaved rounds) run only then.
#[cfg(tokio_unstable)]
fn group_selected(prefix: &str) -> bool {
    let args: Vec<String> = std::env::args().collect();
    bench_filter(&args).is_none_or(|filter| filter.contains(prefix))
}

#[cfg(tokio_unstable)]
#[derive(Clone, Copy)]
enum ByHand {
    Nothing,
    InCurrentSpan,
    WithContext,
}

/// P9: the bridges on implicit spawns. The same implicit runtime, subscriber (a
/// `tracing_subscriber` registry, the global default) and measuring task — inside a span, with a
/// session holding an OpenTelemetry context (a remote span) — timed with the span bridge, the
/// OpenTelemetry context bridge, both, and neither switched on. `off` is the P6 implicit code
/// path (features compiled in, switches off); `p6_tokio_spawn/implicit` ran in the same process
/// without a subscriber. The peers: the same spawns with the bridges off and each child wrapped
/// by hand, `.in_current_span()` (tracing) or `.with_context(cx)` (OpenTelemetry), where the
/// measuring task's context is attached.
#[cfg(tokio_unstable)]
fn p9_bridges(c: &mut Criterion) {
    use localsession_core::SessionExt;
    use localsession_std::{OTEL_CONTEXT, set_carry_otel_context, set_carry_spans};
    use tracing::Instrument;

    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    let session = SessionCtx::new(&Context::background()).with(&K, 1).with(&OTEL_CONTEXT, floors::p9_remote_context());
    // The measuring task runs inside the span `request` and with the session's context attached
    // (by the bridge when it is on, by hand otherwise): what the peers' `.in_current_span()` and
    // `Context::current()` pick up.
    let rt = tokio_runtime(true);
    // `by_hand`: each child spawned `.in_current_span()` / `.with_context(cx)` (the peers), with
    // the bridges off.
    let rounds = |iters: u64, by_hand: ByHand| {
        let session = session.clone();
        rt.block_on(async move {
            let measure = async move {
                let cx = opentelemetry::Context::current();
                let start = Instant::now();
                for _ in 0..iters {
                    let child = async { black_box(1u64) };
                    match by_hand {
                        ByHand::Nothing => tokio::spawn(child).await.unwrap(),
                        ByHand::InCurrentSpan => tokio::spawn(child.in_current_span()).await.unwrap(),
                        ByHand::WithContext => {
                            use opentelemetry::context::FutureExt as _;
                            tokio::spawn(child.with_context(cx.clone())).await.unwrap()
                        }
                    };
                }
                start.elapsed()
            };
            let measure = measure.instrument(tracing::info_span!("request"));
            // The session's context attached by hand only where the bridge does not attach it
            // (an outer `with_context` under the bridge would attach a second context around
            // every poll of the measuring task, which the bridge variants would pay alone).
            if localsession_std::carries_otel_context() {
                scope(session, || tokio::spawn(measure)).await.unwrap()
            } else {
                let cx = session.get_cloned(&OTEL_CONTEXT).unwrap_or_default();
                let measure = opentelemetry::context::FutureExt::with_context(measure, cx);
                scope(session, || tokio::spawn(measure)).await.unwrap()
            }
        })
    };
    let mut g = c.benchmark_group("p9_bridges");
    for (id, spans, otel, by_hand) in [
        ("off", false, false, ByHand::Nothing),
        ("spans", true, false, ByHand::Nothing),
        ("otel", false, true, ByHand::Nothing),
        ("both", true, true, ByHand::Nothing),
        ("by_hand_in_current_span", false, false, ByHand::InCurrentSpan),
        ("by_hand_with_context", false, false, ByHand::WithContext),
    ] {
        set_carry_spans(spans);
        set_carry_otel_context(otel);
        g.bench_function(id, |b| b.iter_custom(|iters| rounds(iters, by_hand)));
    }
    g.finish();
    if !group_selected("p9") {
        set_carry_spans(false);
        set_carry_otel_context(false);
        return;
    }
    // The same variants interleaved (one batch of each per round, medians over the rounds), so
    // that load changing during the run (these machines are shared) hits every variant alike.
    // Printed here; criterion's sequential figures go to the table.
    let variants = [
        ("off", false, false, ByHand::Nothing),
        ("spans", true, false, ByHand::Nothing),
        ("otel", false, true, ByHand::Nothing),
        ("both", true, true, ByHand::Nothing),
        ("by_hand_in_current_span", false, false, ByHand::InCurrentSpan),
        ("by_hand_with_context", false, false, ByHand::WithContext),
    ];
    let (batches, batch) = (31, 20_000u64);
    let mut samples = vec![Vec::with_capacity(batches); variants.len()];
    for _ in 0..batches {
        for (i, (_, spans, otel, by_hand)) in variants.iter().enumerate() {
            set_carry_spans(*spans);
            set_carry_otel_context(*otel);
            samples[i].push(rounds(batch, *by_hand).as_nanos() as f64 / batch as f64);
        }
    }
    let medians = medians_of(&mut samples);
    println!("P9 interleaved ({batches} rounds of {batch} spawn+join per variant; medians):");
    for ((id, ..), median) in variants.iter().zip(&medians) {
        println!("P9 interleaved {id:<24} {median:>8.1} ns  {:.2}x off", median / medians[0]);
    }
    println!(
        "P9 interleaved span bridge / .in_current_span() by hand: {:.2}x; OTel bridge / .with_context(cx) by hand: {:.2}x",
        medians[1] / medians[4],
        medians[2] / medians[5]
    );
    set_carry_spans(false);
    set_carry_otel_context(false);
}

fn p7_go(c: &mut Criterion) {
    let mut g = c.benchmark_group("p7_thread_spawn");
    g.sample_size(30);
    let _bound = enter(session_of_depth(1));
    g.bench_function("std_thread_spawn", |b| b.iter(|| std::thread::spawn(|| black_box(1u64)).join().unwrap()));
    g.bench_function("go", |b| b.iter(|| go(|| black_box(1u64)).join().unwrap()));
    g.finish();
}

/// P10: a rayon `par_iter().map().sum()` over 10^6 u64 on a 2-thread pool, with the caller's
/// session carried into every job (`.in_current_session()`, created on the caller, which has a
/// session bound) and without (the plain iterator). Both run the same way: built on the caller,
/// consumed inside `pool.install`.
fn p10_rayon(c: &mut Criterion) {
    use localsession_rayon::ParallelIteratorExt;
    use rayon::prelude::*;
    let mut g = c.benchmark_group("p10_rayon");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let data: Vec<u64> = (0..1_000_000).collect();
    let _bound = enter(session_of_depth(1));
    g.bench_function("plain", |b| {
        b.iter(|| {
            let it = data.par_iter().map(|&x| black_box(x) * 3);
            pool.install(move || it.sum::<u64>())
        })
    });
    g.bench_function("in_current_session", |b| {
        b.iter(|| {
            let it = data.par_iter().map(|&x| black_box(x) * 3).in_current_session();
            pool.install(move || it.sum::<u64>())
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn output_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("criterion")
}

/// When this run started: the table only shows figures measured since (a filtered run leaves
/// the other benchmarks' files from earlier runs, which another build may have written).
static RUN_STARTED: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();

/// Criterion's median for one benchmark, if this run measured it.
fn median_ns(group: &str, id: &str) -> Option<f64> {
    let path = output_dir().join(group).join(id).join("new").join("estimates.json");
    let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    if RUN_STARTED.get().is_some_and(|started| written < *started) {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["median"]["point_estimate"].as_f64()
}

struct Row {
    label: &'static str,
    ours: Option<f64>,
    peer_label: &'static str,
    peer: Option<f64>,
    target: &'static str,
    /// Decides "met" from (ours, peer).
    check: fn(f64, Option<f64>) -> bool,
}

fn fmt_ns(v: Option<f64>) -> String {
    match v {
        Some(ns) if ns >= 10_000.0 => format!("{:.1} µs", ns / 1000.0),
        Some(ns) => format!("{ns:.1} ns"),
        None => "—".into(),
    }
}

/// Prints the table; with `only` (a filtered run such as `-- p10`), just the rows of the groups
/// that ran: those whose number (`P10`) is the first `_`-separated part of the filter (or of one
/// of its `|`-separated alternatives). A figure this run did not measure (its benchmark was
/// filtered out) prints as "—".
fn report(memory: &[String], only: Option<&str>) {
    let m = median_ns;
    let rows = [
        Row {
            label: "P1 current()+get, depth 1 (std)",
            ours: m("p1_current_get", "localsession"),
            peer_label: "raw thread_local walk",
            peer: m("p1_current_get", "raw_thread_local"),
            target: "<= 2x raw; <= 8 ns",
            check: |o, p| o <= 8.0 && p.is_some_and(|p| o <= 2.0 * p),
        },
        Row {
            label: "P1 current()+get inside an implicit task",
            ours: m("p1_current_get", "localsession_in_implicit_task"),
            peer_label: "the same loop on a plain thread",
            peer: m("p1_current_get", "localsession_loop"),
            target: "<= 1.1x plain thread",
            check: |o, p| p.is_some_and(|p| o <= 1.1 * p),
        },
        Row {
            label: "P1 (peer) tokio task_local with",
            ours: m("p1_current_get", "localsession"),
            peer_label: "tokio task_local",
            peer: m("p1_current_get", "tokio_task_local"),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P1 (peer) otel Context::current+get",
            ours: m("p1_current_get", "localsession"),
            peer_label: "opentelemetry",
            peer: m("p1_current_get", "opentelemetry"),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P2 enter + drop guard",
            ours: m("p2_enter", "localsession"),
            peer_label: "tokio sync_scope",
            peer: m("p2_enter", "tokio_sync_scope"),
            target: "<= 1x tokio sync_scope",
            check: |o, p| p.is_some_and(|p| o <= p),
        },
        Row {
            label: "P2 enter + drop guard",
            ours: m("p2_enter", "localsession"),
            peer_label: "otel attach",
            peer: m("p2_enter", "opentelemetry_attach"),
            target: "<= 0.5x otel attach",
            check: |o, p| p.is_some_and(|p| o <= 0.5 * p),
        },
        Row {
            label: "P2 swap in/out (per poll)",
            ours: m("p2_enter", "localsession_swap"),
            peer_label: "tokio sync_scope",
            peer: m("p2_enter", "tokio_sync_scope"),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P2 sticky swap in/out (bind-style)",
            ours: m("p2_enter", "localsession_sticky_swap"),
            peer_label: "scoped swap (per poll)",
            peer: m("p2_enter", "localsession_swap"),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P3 SessionCtx::with (typed key)",
            ours: m("p3_with_value", "localsession"),
            peer_label: "otel with_value",
            peer: m("p3_with_value", "opentelemetry"),
            target: "<= 25 ns, 1 alloc",
            check: |o, _| o <= 25.0,
        },
        Row {
            label: "P3 SessionCtx::with_value(\"a\")",
            ours: m("p3_with_value", "localsession_any_key"),
            peer_label: "Go WithValue 123 ns",
            peer: Some(123.0),
            target: "<= 25 ns",
            check: |o, _| o <= 25.0,
        },
        Row {
            label: "P4 get, depth 1",
            ours: m("p4_get_depth", "localsession/1"),
            peer_label: "raw list walk",
            peer: m("p4_get_depth", "raw_list/1"),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P4 get, depth 10",
            ours: m("p4_get_depth", "localsession/10"),
            peer_label: "raw list walk",
            peer: m("p4_get_depth", "raw_list/10"),
            target: "<= 10 ns",
            check: |o, _| o <= 10.0,
        },
        Row {
            label: "P4 get, depth 64",
            ours: m("p4_get_depth", "localsession/64"),
            peer_label: "ours at depth 1",
            peer: m("p4_get_depth", "localsession/1"),
            target: "<= 2x depth 1",
            check: |o, p| p.is_some_and(|p| o <= 2.0 * p),
        },
        Row {
            label: "P4 get(\"k\"), depth 64",
            ours: m("p4_get_depth", "localsession_any_key/64"),
            peer_label: "any-key at depth 1",
            peer: m("p4_get_depth", "localsession_any_key/1"),
            target: "<= 2x depth 1",
            check: |o, p| p.is_some_and(|p| o <= 2.0 * p),
        },
        Row {
            label: "P4 (peer) otel get, depth 64",
            ours: m("p4_get_depth", "localsession/64"),
            peer_label: "opentelemetry",
            peer: m("p4_get_depth", "opentelemetry/64"),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P5 SessionMap read (10 keys)",
            ours: m("p5_session_map", "read"),
            peer_label: "Go SessionMap.Get 26.5 ns",
            peer: Some(26.5),
            target: "<= 13 ns (0.5x Go)",
            check: |o, _| o <= 13.0,
        },
        Row {
            label: "P5 SessionMap read, thread pinned",
            ours: m("p5_session_map", "read_pinned"),
            peer_label: "Go SessionMap.Get 26.5 ns",
            peer: Some(26.5),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P5 SessionMap insert (10 keys)",
            ours: m("p5_session_map", "insert"),
            peer_label: "Go WithValue 50 ns",
            peer: Some(50.0),
            target: "<= 100 ns",
            check: |o, _| o <= 100.0,
        },
        Row {
            label: "P5 read under a concurrent writer",
            ours: m("p5_session_map", "read_under_writer"),
            peer_label: "read, no writer",
            peer: m("p5_session_map", "read"),
            target: "<= 1.5x",
            check: |o, p| p.is_some_and(|p| o <= 1.5 * p),
        },
        Row {
            label: "P5 (floor) read under a concurrent writer, epoch-reclaimed root",
            ours: m("p5_session_map", "floor_read_under_writer"),
            peer_label: "floor read, no writer",
            peer: m("p5_session_map", "floor_read"),
            target: "(information)",
            check: |_, p| p.is_some(),
        },
        Row {
            label: "P5 (floor) quiet read + one cache line the writer stores per write",
            ours: m("p5_session_map", "one_line_read_under_writer"),
            peer_label: "the same, no writer",
            peer: m("p5_session_map", "one_line_read"),
            target: "(information)",
            check: |_, p| p.is_some(),
        },
        Row {
            label: "P5 (peer) RwLock<HashMap> read under a concurrent writer",
            ours: m("p5_session_map", "rwlock_read_under_writer"),
            peer_label: "RwLock<HashMap> read, no writer",
            peer: m("p5_session_map", "rwlock_read"),
            target: "(information)",
            check: |_, p| p.is_some(),
        },
        Row {
            label: "P5 insert, 10 keys",
            ours: m("p5_map_scale", "insert/10"),
            peer_label: "RwLock<HashMap> insert",
            peer: m("p5_map_scale", "rwlock_insert/10"),
            target: "<= 1x peer",
            check: |o, p| p.is_some_and(|p| o <= p),
        },
        Row {
            label: "P5 read, 10 keys (hashed key)",
            ours: m("p5_map_scale", "read/10"),
            peer_label: "RwLock<HashMap> read",
            peer: m("p5_map_scale", "rwlock_read/10"),
            target: "<= 0.6x peer",
            check: |o, p| p.is_some_and(|p| o <= 0.6 * p),
        },
        Row {
            label: "P5 (floor) epoch-reclaimed root: pin, 1 allocation, swap, deferred free",
            ours: m("p5_map_scale", "floor_epoch_insert"),
            peer_label: "RwLock<HashMap> insert",
            peer: m("p5_map_scale", "rwlock_insert/10"),
            target: "(information)",
            check: |_, p| p.is_some(),
        },
        Row {
            label: "P5 (floor) epoch-reclaimed root: pin, load, read",
            ours: m("p5_map_scale", "floor_epoch_read"),
            peer_label: "RwLock<HashMap> read",
            peer: m("p5_map_scale", "rwlock_read/10"),
            target: "(information)",
            check: |_, p| p.is_some(),
        },
        Row {
            label: "P5 insert, 1 000 keys",
            ours: m("p5_map_scale", "insert/1000"),
            peer_label: "RwLock<HashMap> insert",
            peer: m("p5_map_scale", "rwlock_insert/1000"),
            target: "<= 1x peer",
            check: |o, p| p.is_some_and(|p| o <= p),
        },
        Row {
            label: "P5 read, 1 000 keys",
            ours: m("p5_map_scale", "read/1000"),
            peer_label: "RwLock<HashMap> read",
            peer: m("p5_map_scale", "rwlock_read/1000"),
            target: "<= 0.6x peer",
            check: |o, p| p.is_some_and(|p| o <= 0.6 * p),
        },
        Row {
            label: "P5 insert, 100 000 keys",
            ours: m("p5_map_scale", "insert/100000"),
            peer_label: "RwLock<HashMap> insert",
            peer: m("p5_map_scale", "rwlock_insert/100000"),
            target: "<= 100 ns",
            check: |o, _| o <= 100.0,
        },
        Row {
            label: "P5 read, 100 000 keys",
            ours: m("p5_map_scale", "read/100000"),
            peer_label: "RwLock<HashMap> read",
            peer: m("p5_map_scale", "rwlock_read/100000"),
            target: "<= 50 ns",
            check: |o, _| o <= 50.0,
        },
        Row {
            label: "P5 (layout) persistent hash trie (rpds) insert, 100 000 keys",
            ours: m("p5_map_scale", "trie_insert/100000"),
            peer_label: "RwLock<HashMap> insert",
            peer: m("p5_map_scale", "rwlock_insert/100000"),
            target: "(information)",
            check: |_, p| p.is_some(),
        },
        Row {
            label: "P5 (layout) persistent hash trie (rpds) read, 100 000 keys",
            ours: m("p5_map_scale", "trie_read/100000"),
            peer_label: "RwLock<HashMap> read",
            peer: m("p5_map_scale", "rwlock_read/100000"),
            target: "(information)",
            check: |_, p| p.is_some(),
        },
        Row {
            label: "P5 len(), 100 000 keys",
            ours: m("p5_map_scale", "len/100000"),
            peer_label: "len(), 10 keys",
            peer: m("p5_map_scale", "len/10"),
            target: "O(1)",
            check: |o, p| p.is_some_and(|p| o <= 20.0 * p),
        },
        Row {
            label: "P6 tokio spawn+join, explicit",
            ours: m("p6_tokio_spawn", "explicit"),
            peer_label: "plain tokio::spawn",
            peer: m("p6_tokio_spawn", "plain"),
            target: "<= 1.10x",
            check: |o, p| p.is_some_and(|p| o <= 1.10 * p),
        },
        Row {
            label: "P6 (peer) explicit vs task_local scope(arc.clone()) by hand",
            ours: m("p6_tokio_spawn", "explicit"),
            peer_label: "tokio task_local + Arc",
            peer: m("p6_tokio_spawn", "task_local_arc"),
            target: "(information)",
            check: |_, p| p.is_some(),
        },
        Row {
            label: "P6 tokio spawn+join, implicit",
            ours: m("p6_tokio_spawn", "implicit"),
            peer_label: "plain tokio::spawn",
            peer: m("p6_tokio_spawn", "plain"),
            target: "<= 1.15x",
            check: |o, p| p.is_some_and(|p| o <= 1.15 * p),
        },
        Row {
            label: "P6 (floor) plain spawn+join, runtime with 4 empty task hooks",
            ours: m("p6_tokio_spawn", "plain_noop_hooks"),
            peer_label: "plain tokio::spawn",
            peer: m("p6_tokio_spawn", "plain"),
            target: "(information)",
            check: |_, p| p.is_some(),
        },
        Row {
            label: "P6 (floor) plain spawn+join, minimal table hooks carrying a session",
            ours: m("p6_tokio_spawn", "floor_table_hooks"),
            peer_label: "plain tokio::spawn",
            peer: m("p6_tokio_spawn", "plain"),
            target: "(information)",
            check: |_, p| p.is_some(),
        },
        Row {
            label: "P6 (floor) the same, hooks borrowing the session instead of cloning it per poll",
            ours: m("p6_tokio_spawn", "floor_table_hooks_borrowed"),
            peer_label: "plain tokio::spawn",
            peer: m("p6_tokio_spawn", "plain"),
            target: "(information)",
            check: |_, p| p.is_some(),
        },
        Row {
            label: "P7 go() + join",
            ours: m("p7_thread_spawn", "go"),
            peer_label: "std::thread::spawn",
            peer: m("p7_thread_spawn", "std_thread_spawn"),
            target: "<= 1.05x",
            check: |o, p| p.is_some_and(|p| o <= 1.05 * p),
        },
        Row {
            label: "P9 implicit spawn+join, span bridge on",
            ours: m("p9_bridges", "spans"),
            peer_label: "bridges off",
            peer: m("p9_bridges", "off"),
            target: "<= 1.10x",
            check: |o, p| p.is_some_and(|p| o <= 1.10 * p),
        },
        Row {
            label: "P9 implicit spawn+join, OTel context bridge on",
            ours: m("p9_bridges", "otel"),
            peer_label: "bridges off",
            peer: m("p9_bridges", "off"),
            target: "<= 1.10x",
            check: |o, p| p.is_some_and(|p| o <= 1.10 * p),
        },
        Row {
            label: "P9 implicit spawn+join, both bridges on",
            ours: m("p9_bridges", "both"),
            peer_label: "bridges off",
            peer: m("p9_bridges", "off"),
            target: "<= 1.10x",
            check: |o, p| p.is_some_and(|p| o <= 1.10 * p),
        },
        Row {
            label: "P9 (peer) .in_current_span() by hand, bridges off",
            ours: m("p9_bridges", "by_hand_in_current_span"),
            peer_label: "bridges off",
            peer: m("p9_bridges", "off"),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P9 (peer) .with_context(cx) by hand, bridges off",
            ours: m("p9_bridges", "by_hand_with_context"),
            peer_label: "bridges off",
            peer: m("p9_bridges", "off"),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P9 span bridge vs .in_current_span() by hand",
            ours: m("p9_bridges", "spans"),
            peer_label: "by hand",
            peer: m("p9_bridges", "by_hand_in_current_span"),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P9 OTel bridge vs .with_context(cx) by hand",
            ours: m("p9_bridges", "otel"),
            peer_label: "by hand",
            peer: m("p9_bridges", "by_hand_with_context"),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P9 bridges off, measuring task in a span with its context attached",
            ours: m("p9_bridges", "off"),
            peer_label: "P6 implicit (bare task)",
            peer: m("p6_tokio_spawn", "implicit"),
            target: "(reference)",
            check: |_, _| true,
        },
        Row {
            label: "P10 rayon par_iter map+sum, 10^6 u64, 2 threads",
            ours: m("p10_rayon", "in_current_session"),
            peer_label: "plain par_iter",
            peer: m("p10_rayon", "plain"),
            target: "<= 1.05x",
            check: |o, p| p.is_some_and(|p| o <= 1.05 * p),
        },
    ];
    println!();
    println!("| # | operation | ours | peer | peer figure | ratio | target | met |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, r) in rows.iter().enumerate() {
        let number = r.label.split_whitespace().next().unwrap_or_default().to_lowercase();
        // A filter `p6|p9` (a criterion regex) keeps the rows of both groups.
        if only.is_some_and(|f| !f.split('|').any(|g| g.split('_').next().unwrap_or_default().to_lowercase() == number))
        {
            continue;
        }
        let ratio = match (r.ours, r.peer) {
            (Some(o), Some(p)) if p > 0.0 => format!("{:.2}x", o / p),
            _ => "—".into(),
        };
        let met = match r.ours {
            Some(o) if r.target == "(reference)" => {
                let _ = o;
                "—"
            }
            Some(o) => {
                if (r.check)(o, r.peer) {
                    "yes"
                } else {
                    "no"
                }
            }
            None => "not run",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            r.label,
            fmt_ns(r.ours),
            r.peer_label,
            fmt_ns(r.peer),
            ratio,
            r.target,
            met
        );
    }
    println!();
    for line in memory {
        println!("{line}");
    }
}

/// P8: bytes per `with_value` node, allocations per call, RSS over 10^6 bind/spawn cycles.
fn p8_memory() -> Vec<String> {
    let mut out = Vec::new();
    // Each count on a fresh thread: a thread that has freed value nodes reuses their blocks (up
    // to 4 096, the core's per-thread cache) without asking the allocator, and this benchmark
    // thread has freed thousands; the figures below are what each node takes from the heap.
    fn fresh<R: Send + 'static>(count: impl FnOnce() -> R + Send + 'static) -> R {
        std::thread::spawn(count).join().expect("a counting thread panicked")
    }
    let (allocs, bytes) = fresh(|| {
        let base = session_of_depth(1);
        count_allocs(10_000, || base.with(&FILLER[0], 1u64))
    });
    let (value_allocs, value_bytes) = fresh(|| {
        let base = session_of_depth(1);
        count_allocs(10_000, || base.with_value("a", 1u64))
    });
    // Depth 1..64 builds: amortized allocations (index tables every 8 bindings).
    let (deep, _) = fresh(|| count_allocs(200, || session_of_depth(64)));
    out.push(format!(
        "P8 SessionCtx::with(typed key, u64): {allocs:.2} allocations/call, {bytes:.1} bytes/call \
         ({:.1} bytes besides the 8-byte value; target <= 48)",
        bytes - 8.0
    ));
    out.push(format!(
        "P8 SessionCtx::with_value(&str key, u64): {value_allocs:.2} allocations/call, {value_bytes:.1} bytes/call"
    ));
    out.push(format!(
        "P8 building a 64-deep session: {:.3} allocations per binding (incl. the scope node and index tables)",
        deep / 64.0
    ));
    let rt = tokio_runtime(false);
    let before = rss_kib();
    let start = Instant::now();
    for round in 0..10u64 {
        for i in 0..100_000u64 {
            let s = SessionCtx::new(&Context::background()).with(&K, i);
            scope(s.clone(), || black_box(current().is_some()));
            if i % 1000 == 0 {
                let _ = go(|| black_box(current().is_some())).join();
            }
            s.disable();
        }
        let session = SessionCtx::new(&Context::background()).with(&K, round);
        rt.block_on(async move {
            localsession_tokio::spawn_with(session, async {
                let mut handles = Vec::with_capacity(1000);
                for _ in 0..1000 {
                    handles.push(localsession_tokio::spawn(async { black_box(current().is_some()) }));
                }
                for h in handles {
                    let _ = h.await;
                }
            })
            .await
        })
        .unwrap();
    }
    let after = rss_kib();
    out.push(format!(
        "P8 RSS over 10^6 bind/disable cycles (+1 000 go() and 10 000 tokio spawns): {} KiB -> {} KiB in {:.1} s",
        before.map_or("?".into(), |v| v.to_string()),
        after.map_or("?".into(), |v| v.to_string()),
        start.elapsed().as_secs_f64()
    ));
    out.push(format!("P8 node header: {} bytes", localsession_core::__private::NODE_HEADER_BYTES));
    out
}

/// The filter of a criterion command line: the first argument that is neither an option nor an
/// option's value (`--measurement-time 5`).
fn bench_filter(args: &[String]) -> Option<&String> {
    const TAKES_VALUE: &[&str] = &[
        "--warm-up-time",
        "--measurement-time",
        "--sample-size",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--profile-time",
        "--output-format",
        "--color",
        "--plotting-backend",
        "--format",
    ];
    args.iter()
        .enumerate()
        .skip(1)
        .find(|(i, a)| !a.starts_with('-') && !TAKES_VALUE.contains(&args[i - 1].as_str()))
        .map(|(_, a)| a)
}

fn main() {
    RUN_STARTED.get_or_init(std::time::SystemTime::now);
    let mut c = Criterion::default()
        .output_directory(&output_dir())
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(40)
        .configure_from_args();
    p1_current_get(&mut c);
    p2_enter(&mut c);
    p3_with_value(&mut c);
    p4_depth(&mut c);
    p5_map(&mut c);
    p5_map_scale(&mut c);
    p6_tokio_spawn(&mut c);
    p7_go(&mut c);
    p10_rayon(&mut c);
    // Last: it installs a global tracing subscriber.
    #[cfg(tokio_unstable)]
    p9_bridges(&mut c);
    c.final_summary();
    // Only `--bench` runs print the report (not `--test` or `--list`); the full run prints all
    // of it, a filtered run (`-- p10`) the rows of the groups it ran.
    let args: Vec<String> = std::env::args().collect();
    let filter = bench_filter(&args);
    if args.iter().any(|a| a == "--bench") {
        match filter {
            None => report(&p8_memory(), None),
            Some(filter) => report(&[], Some(filter)),
        }
    }
}

//! One hot-path operation of the benchmark suite, repeated: the program that
//! `tests/benches/instructions.sh` runs under valgrind's callgrind to count *instructions per
//! operation* — a figure that, unlike time on a shared 2-vCPU VM (±8–15% between identical
//! runs), does not move with the load, so that a change of a few percent can be seen at all.
//!
//! `cargo run -p localsession-benches --release --example ops -- <scenario> <iterations>` runs a
//! scenario (`list` prints them) and prints its wall-clock time per operation. The script runs
//! each scenario twice, with `n` and `2n` iterations, and reports the difference divided by `n`:
//! setup (building maps, starting runtimes) cancels out. `OPS_THREADED=1` starts and joins one
//! thread first, as the criterion suite has by P3: glibc's `malloc` then locks its arena on every
//! allocation its thread cache cannot serve (see `docs/performance.md`, stop 23).
//!
//! Instructions are not time — a cache miss or a contended atomic costs far more than an add —
//! so these figures complement the criterion suite (`sessions.rs`); they do not replace it. The
//! tokio scenarios use a current-thread runtime: with worker threads, what the idle workers do
//! while parking depends on timing, which callgrind (one thread at a time) distorts.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use localsession_core::{Context, Key, SessionCtx, SessionMap};

#[path = "../floors.rs"]
mod floors;
use floors::EpochFloor;

static USER: Key<u64> = Key::new("user");

tokio::task_local! {
    static TASK_VALUE: Arc<u64>;
}

/// The scenarios: name, what it measures.
const SCENARIOS: &[(&str, &str)] = &[
    ("p1_get", "with_current + typed get, depth 1 (std)"),
    ("p1_current", "current() (a clone) + drop (std)"),
    ("p3_with", "SessionCtx::with (typed key) + drop"),
    ("p3_with_batch", "SessionCtx::with, 10 000 kept then dropped (criterion's large-drop form), no thread started"),
    ("p3_with_batch_threaded", "the same after the process has started (and joined) one thread"),
    ("p4_get_1", "SessionCtx::get, typed key, depth 1"),
    ("p4_get_64", "SessionCtx::get, typed key bound deepest, depth 64"),
    ("p4_any_key_1", "Context::value, hashed &str key, depth 1"),
    ("p4_any_key_64", "Context::value, hashed &str key bound deepest, depth 64"),
    ("p5_read_10", "SessionMap::read, hashed u64 key, 10 keys"),
    ("p5_read_1000", "SessionMap::read, hashed u64 key, 1 000 keys"),
    ("p5_rwlock_read_10", "peer: RwLock<HashMap<u64, Arc<u64>>> read, 10 keys"),
    ("p5_rwlock_read_1000", "peer: RwLock<HashMap<u64, Arc<u64>>> read, 1 000 keys"),
    ("p5_read_100000", "SessionMap::read, hashed u64 key, 100 000 keys"),
    ("p5_rwlock_read_100000", "peer: RwLock<HashMap<u64, Arc<u64>>> read, 100 000 keys"),
    ("p5_insert_10", "SessionMap::insert, rebinding one of 10 keys"),
    ("p5_insert_100", "SessionMap::insert, rebinding one of 100 keys"),
    ("p5_insert_1000", "SessionMap::insert, rebinding one of 1 000 keys"),
    ("p5_rwlock_insert_10", "peer: RwLock<HashMap<u64, Arc<u64>>> insert, 10 keys"),
    ("p5_rwlock_insert_1000", "peer: RwLock<HashMap<u64, Arc<u64>>> insert, 1 000 keys"),
    ("p5_insert_100000", "SessionMap::insert, rebinding one of 100 000 keys"),
    ("p5_rwlock_insert_100000", "peer: RwLock<HashMap<u64, Arc<u64>>> insert, 100 000 keys"),
    (
        "p5_insert_pauses_100000",
        "SessionMap::insert at 100 000 keys: prints the slowest inserts (compactions, index merges, frees)",
    ),
    ("p5_trie_read_100000", "layout: persistent hash trie (rpds) read, 100 000 keys"),
    ("p5_trie_insert_100000", "layout: persistent hash trie (rpds) insert (path copy), 100 000 keys"),
    ("p5_floor_read", "floor: epoch pin + root load + read (the shape SessionMap keeps, no map)"),
    ("p5_floor_insert", "floor: epoch pin + one allocation + root swap + deferred free (no map)"),
    ("p6_plain", "tokio::spawn + join (current-thread runtime)"),
    ("p6_task_local_arc", "peer: tokio::spawn of TASK_VALUE.scope(arc.clone(), ..) + join"),
    ("p6_explicit", "localsession_tokio::spawn + join, with a session"),
    ("p6_implicit", "tokio::spawn + join on an implicit-mode runtime, with a session (tokio_unstable)"),
    ("p6_floor_cloning", "floor: tokio::spawn + join, minimal table hooks cloning the session per poll"),
    ("p6_floor_borrowed", "floor: tokio::spawn + join, minimal table hooks borrowing the session per poll"),
    ("p9_off", "implicit spawn + join inside a span, session with an OTel context, bridges off"),
    ("p9_spans", "the same, span bridge on"),
    ("p9_otel", "the same, OpenTelemetry context bridge on"),
    ("p9_both", "the same, both bridges on"),
    ("p9_by_hand_span", "peer: bridges off, each child .in_current_span() by hand"),
    ("p9_by_hand_otel", "peer: bridges off, each child .with_context(cx) by hand"),
];

fn main() {
    let mut args = std::env::args().skip(1);
    let scenario = args.next().unwrap_or_else(|| "list".to_owned());
    let iterations: u64 = match args.next().map(|n| n.parse()) {
        None => 100_000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("ops: the iteration count must be a positive integer ({e})");
            std::process::exit(2);
        }
    };
    if scenario == "list" {
        for (name, what) in SCENARIOS {
            println!("{name:<24} {what}");
        }
        return;
    }
    if std::env::var_os("OPS_THREADED").is_some() {
        // As in the criterion suite (and any server) from P1 on: the process has had a second
        // thread, so glibc's malloc locks its arena on every allocation its thread cache misses.
        std::thread::spawn(|| ()).join().unwrap();
    }
    let start = Instant::now();
    match scenario.as_str() {
        "p1_get" => p1(iterations, false),
        "p1_current" => p1(iterations, true),
        "p3_with" => p3(iterations),
        "p3_with_batch" => p3_batch(iterations),
        "p3_with_batch_threaded" => {
            // glibc's malloc takes its arena lock on every allocation the thread cache cannot
            // serve once the process has ever had a second thread; the criterion suite has one
            // by P3 (P1's runtime), as every server process has.
            std::thread::spawn(|| ()).join().unwrap();
            p3_batch(iterations)
        }
        "p4_get_1" => p4_get(1, iterations),
        "p4_get_64" => p4_get(64, iterations),
        "p4_any_key_1" => p4_any_key(1, iterations),
        "p4_any_key_64" => p4_any_key(64, iterations),
        "p5_read_10" => map_read(10, iterations),
        "p5_read_1000" => map_read(1000, iterations),
        "p5_rwlock_read_10" => rwlock_read(10, iterations),
        "p5_rwlock_read_1000" => rwlock_read(1000, iterations),
        "p5_read_100000" => map_read(100_000, iterations),
        "p5_rwlock_read_100000" => rwlock_read(100_000, iterations),
        "p5_insert_10" => map_insert(10, iterations),
        "p5_insert_100" => map_insert(100, iterations),
        "p5_insert_1000" => map_insert(1000, iterations),
        "p5_rwlock_insert_10" => rwlock_insert(10, iterations),
        "p5_rwlock_insert_1000" => rwlock_insert(1000, iterations),
        "p5_insert_100000" => map_insert(100_000, iterations),
        "p5_rwlock_insert_100000" => rwlock_insert(100_000, iterations),
        "p5_insert_pauses_100000" => map_insert_pauses(100_000, iterations),
        "p5_trie_read_100000" => trie_read(100_000, iterations),
        "p5_trie_insert_100000" => trie_insert(100_000, iterations),
        "p5_floor_read" => floor_read(iterations),
        "p5_floor_insert" => floor_insert(iterations),
        "p9_off" | "p9_spans" | "p9_otel" | "p9_both" | "p9_by_hand_span" | "p9_by_hand_otel" => {
            bridges(&scenario, iterations);
        }
        "p6_plain" | "p6_task_local_arc" | "p6_explicit" | "p6_implicit" | "p6_floor_cloning" | "p6_floor_borrowed" => {
            spawn_join(&scenario, iterations)
        }
        other => {
            eprintln!("ops: unknown scenario `{other}` (run with `list` to see them)");
            std::process::exit(2);
        }
    }
    println!("{scenario}: {:.1} ns/op (wall clock)", start.elapsed().as_nanos() as f64 / iterations as f64);
}

/// A pseudo-random key below `n` (the same sequence for ours and the peer).
fn keys(n: u64) -> impl FnMut() -> u64 {
    let mut x = 0u64;
    move || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        (x >> 17) % n
    }
}

fn p1(iterations: u64, clone: bool) {
    localsession_std::bind(SessionCtx::new(&Context::background()).with(&USER, 5)).unwrap();
    let mut acc = 0u64;
    for _ in 0..iterations {
        if clone {
            let current = localsession_std::current();
            acc += u64::from(current.is_some());
            drop(black_box(current));
        } else {
            acc += localsession_std::with_current(|s| s.and_then(|s| s.read_key(&USER, |u| u.copied()))).unwrap_or(0);
        }
    }
    black_box(acc);
}

fn p3(iterations: u64) {
    let base = SessionCtx::new(&Context::background()).with(&USER, 5);
    for i in 0..iterations {
        drop(black_box(base.with(&USER, i)));
    }
}

/// The criterion suite's `p3_with_value/localsession` (`iter_with_large_drop`): derived sessions
/// kept in batches of 10 000 and dropped after each batch, so that allocations outrun the thread's
/// malloc cache as in the suite. The wall time printed includes the drops.
fn p3_batch(iterations: u64) {
    const BATCH: u64 = 10_000;
    let base = SessionCtx::new(&Context::background()).with(&USER, 5);
    let mut kept = Vec::with_capacity(BATCH as usize);
    for i in 0..iterations {
        kept.push(base.with(&USER, i));
        if kept.len() as u64 == BATCH {
            kept.clear();
        }
    }
    black_box(kept);
}

/// The criterion suite's `p4_get_depth/localsession`: the key bound deepest, 63 other typed
/// keys above it.
fn p4_get(depth: usize, iterations: u64) {
    let s = floors::session_of_depth(&USER, depth);
    let mut acc = 0u64;
    for _ in 0..iterations {
        acc += s.get(black_box(&USER)).copied().unwrap_or(0);
    }
    black_box(acc);
}

/// The criterion suite's `p4_get_depth/localsession_any_key`: the key bound deepest.
fn p4_any_key(depth: u32, iterations: u64) {
    let mut ctx = Context::background().with_value("k", 7u64);
    for i in 1..depth {
        ctx = ctx.with_value(i, 1u64);
    }
    let mut acc = 0u64;
    for _ in 0..iterations {
        acc += ctx.value::<u64, _>(black_box(&"k")).copied().unwrap_or(0);
    }
    black_box(acc);
}

fn filled_map(n: u64) -> SessionMap {
    let map = SessionMap::new();
    for k in 0..n {
        map.insert(k, k);
    }
    map
}

fn filled_rwlock(n: u64) -> RwLock<HashMap<u64, Arc<u64>>> {
    RwLock::new((0..n).map(|k| (k, Arc::new(k))).collect())
}

fn map_read(n: u64, iterations: u64) {
    let map = filled_map(n);
    let mut key = keys(n);
    let mut acc = 0u64;
    for _ in 0..iterations {
        acc = acc.wrapping_add(map.read(&key(), |v: Option<&u64>| v.copied().unwrap_or(0)));
    }
    black_box(acc);
}

fn rwlock_read(n: u64, iterations: u64) {
    let map = filled_rwlock(n);
    let mut key = keys(n);
    let mut acc = 0u64;
    for _ in 0..iterations {
        acc = acc.wrapping_add(map.read().unwrap().get(&key()).map_or(0, |v| **v));
    }
    black_box(acc);
}

fn map_insert(n: u64, iterations: u64) {
    let map = filled_map(n);
    let mut key = keys(n);
    for _ in 0..iterations {
        let k = key();
        map.insert(k, k);
    }
    black_box(map);
}

fn rwlock_insert(n: u64, iterations: u64) {
    let map = filled_rwlock(n);
    let mut key = keys(n);
    for _ in 0..iterations {
        let k = key();
        map.write().unwrap().insert(k, Arc::new(k));
    }
    black_box(map);
}

/// Times every insert and prints the slowest ones: the amortized figure hides the writes that
/// compact the map, merge large index levels or free old nodes.
fn map_insert_pauses(n: u64, iterations: u64) {
    let map = filled_map(n);
    let mut key = keys(n);
    let mut times: Vec<u64> = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        let k = key();
        let start = Instant::now();
        map.insert(k, k);
        times.push(start.elapsed().as_nanos() as u64);
    }
    black_box(map);
    let mut longest: Vec<(u64, usize)> = times.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    longest.sort_unstable_by(|a, b| b.cmp(a));
    longest.truncate(8);
    let longest: Vec<String> = longest.iter().map(|(t, i)| format!("{} us at #{i}", t / 1000)).collect();
    eprintln!("longest: {}", longest.join(", "));
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    eprintln!(
        "inserts at {n} keys: median {} ns, 99.9% {} ns, 99.99% {} ns, max {} ns",
        at(0.5),
        at(0.999),
        at(0.9999),
        times.last().copied().unwrap_or(0)
    );
}

fn filled_trie(n: u64) -> rpds::HashTrieMapSync<u64, Arc<u64>> {
    (0..n).fold(rpds::HashTrieMapSync::new_sync(), |t, k| t.insert(k, Arc::new(k)))
}

fn trie_read(n: u64, iterations: u64) {
    let trie = filled_trie(n);
    let mut key = keys(n);
    let mut acc = 0u64;
    for _ in 0..iterations {
        acc = acc.wrapping_add(trie.get(&key()).map_or(0, |v| **v));
    }
    black_box(acc);
}

fn trie_insert(n: u64, iterations: u64) {
    let mut trie = filled_trie(n);
    let mut key = keys(n);
    for _ in 0..iterations {
        let k = key();
        // Path copy, as a map whose readers may hold the previous root must.
        trie = trie.insert(k, Arc::new(k));
    }
    black_box(trie);
}

/// The floor under P5 (`EpochFloor`, shared with the criterion suite).
fn floor_read(iterations: u64) {
    let floor = EpochFloor::new();
    floor.insert(3, 4);
    let mut key = keys(10);
    let mut acc = 0u64;
    for _ in 0..iterations {
        acc = acc.wrapping_add(floor.read(key()));
    }
    black_box(acc);
}

fn floor_insert(iterations: u64) {
    let floor = EpochFloor::new();
    let mut key = keys(10);
    for _ in 0..iterations {
        let k = key();
        floor.insert(k, k);
    }
}

fn spawn_join(scenario: &str, iterations: u64) {
    // `OPS_WORKERS=n`: a multi-thread runtime with n workers instead (for `perf record`; under
    // callgrind, which runs one thread at a time, the workers' parking distorts the counts).
    let mut builder = match std::env::var("OPS_WORKERS").ok().and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_current_thread(),
    };
    builder.enable_all();
    // Implicit mode and its floors: every task, the measuring one too, inherits through hooks.
    let inherits = matches!(scenario, "p6_implicit" | "p6_floor_cloning" | "p6_floor_borrowed");
    if inherits {
        #[cfg(tokio_unstable)]
        match scenario {
            "p6_implicit" => {
                localsession_tokio::enable_implicit_sessions(&mut builder);
            }
            other => floors::floor_hooks::install(&mut builder, other == "p6_floor_borrowed"),
        }
        #[cfg(not(tokio_unstable))]
        {
            eprintln!("ops: {scenario} needs RUSTFLAGS=\"--cfg tokio_unstable\" (instructions.sh sets it)");
            std::process::exit(2);
        }
    }
    let rt = builder.build().unwrap();
    let session = SessionCtx::new(&Context::background()).with(&USER, 5);
    let arc = Arc::new(5u64);
    let kind = scenario.to_owned();
    rt.block_on(async move {
        // The measuring task runs with a session, as in the criterion suite's P6.
        let measure = async move {
            for _ in 0..iterations {
                match kind.as_str() {
                    "p6_explicit" => localsession_tokio::spawn(async { black_box(1u64) }).await.unwrap(),
                    "p6_task_local_arc" => {
                        tokio::spawn(TASK_VALUE.scope(arc.clone(), async { black_box(1u64) })).await.unwrap()
                    }
                    _ => tokio::spawn(async { black_box(1u64) }).await.unwrap(),
                };
            }
        };
        if inherits {
            // Inherited by a plain spawn, as implicit mode is used (and as P6 measures it).
            localsession_std::scope(session, || tokio::spawn(measure)).await.unwrap();
        } else {
            localsession_tokio::spawn_with(session, measure).await.unwrap();
        }
    });
}

/// P9 (as `p9_bridges` in `sessions.rs`, on a current-thread runtime): implicit spawns from a
/// measuring task that runs inside the span `request`, with a session holding an OpenTelemetry
/// context, under a `tracing_subscriber` registry; the bridges switched by the scenario, or each
/// child wrapped by hand (`.in_current_span()`, `.with_context(cx)`) with the bridges off.
fn bridges(scenario: &str, iterations: u64) {
    #[cfg(not(tokio_unstable))]
    {
        let _ = iterations;
        eprintln!("ops: {scenario} needs RUSTFLAGS=\"--cfg tokio_unstable\" (instructions.sh sets it)");
        std::process::exit(2);
    }
    #[cfg(tokio_unstable)]
    {
        use localsession_core::SessionExt;
        use localsession_std::{OTEL_CONTEXT, set_carry_otel_context, set_carry_spans};
        use tracing::Instrument;

        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        set_carry_spans(matches!(scenario, "p9_spans" | "p9_both"));
        set_carry_otel_context(matches!(scenario, "p9_otel" | "p9_both"));
        let session =
            SessionCtx::new(&Context::background()).with(&USER, 1).with(&OTEL_CONTEXT, floors::p9_remote_context());
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_all();
        localsession_tokio::enable_implicit_sessions(&mut builder);
        let rt = builder.build().unwrap();
        let kind = scenario.to_owned();
        rt.block_on(async move {
            let measure = async move {
                let cx = opentelemetry::Context::current();
                for _ in 0..iterations {
                    let child = async { black_box(1u64) };
                    match kind.as_str() {
                        "p9_by_hand_span" => tokio::spawn(child.in_current_span()).await.unwrap(),
                        "p9_by_hand_otel" => {
                            use opentelemetry::context::FutureExt as _;
                            tokio::spawn(child.with_context(cx.clone())).await.unwrap()
                        }
                        _ => tokio::spawn(child).await.unwrap(),
                    };
                }
            };
            let measure = measure.instrument(tracing::info_span!("request"));
            // The session's context attached by hand only where the bridge does not attach it.
            if localsession_std::carries_otel_context() {
                localsession_std::scope(session, || tokio::spawn(measure)).await.unwrap();
            } else {
                let cx = session.get_cloned(&OTEL_CONTEXT).unwrap_or_default();
                let measure = opentelemetry::context::FutureExt::with_context(measure, cx);
                localsession_std::scope(session, || tokio::spawn(measure)).await.unwrap();
            }
        });
    }
}

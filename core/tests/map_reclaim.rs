//! How a `SessionMap` frees the bindings its writes replaced: a few old nodes per write, or a
//! batch of 1 024 while a long chain waits, on the writing thread (see
//! `SessionMap::free_graves`). In a test binary
//! of its own: whether old chains can be freed depends on the epoch, which other tests' threads
//! pinning in parallel (the model tests) would hold back.
//!
//! Run under miri by `.ci/run` (Tree Borrows, with and without `std`), with small counts.

use std::sync::atomic::{AtomicBool, Ordering};

use localsession_core::{EpochGuard, EpochHandle, SessionMap};

/// Lets the epoch advance (each collection advances it one step at most).
fn flush_epoch() {
    for _ in 0..8 {
        EpochGuard::pin(&EpochHandle::register()).flush();
    }
}

/// One test at a time (and the collector's pending deferred functions run when it ends): a
/// test's writers pinning in parallel with another's hold the epoch back, and the bounds below
/// assume one writer.
struct Quiesce(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Quiesce {
    fn start() -> Quiesce {
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        Quiesce(ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

impl Drop for Quiesce {
    fn drop(&mut self) {
        flush_epoch();
    }
}

/// Values that count their creations and drops (one pair of counters per test).
struct Counted {
    dropped: &'static std::sync::atomic::AtomicUsize,
}

impl Counted {
    fn new(created: &'static std::sync::atomic::AtomicUsize, dropped: &'static std::sync::atomic::AtomicUsize) -> Self {
        created.fetch_add(1, Ordering::SeqCst);
        Counted { dropped }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

/// Writes (`write(i)`) until at most `bound` values are `alive()`, or gives up; returns how many
/// are alive. Old chains wait for the epoch: this lets it advance between rounds of writes.
/// With fewer nodes freed per write than writes make, the backlog would only grow.
fn settle(bound: usize, alive: impl Fn() -> usize, mut write: impl FnMut(u32)) -> usize {
    for round in 0..if cfg!(miri) { 4 } else { 400 } {
        if alive() <= bound {
            break;
        }
        flush_epoch();
        for i in 0..64 {
            write(round * 64 + i);
        }
    }
    alive()
}

/// Values a write replaced are dropped while the map is still being written — a few old nodes
/// per write, or a batch while a long chain waits — not only when the map goes: the number alive stays
/// bounded by the live keys plus three chains' worth, at 10, 100 and 1 000 keys; and once the
/// map is dropped every value has been dropped exactly once.
#[test]
fn replaced_values_are_freed_while_the_map_is_written() {
    use std::sync::atomic::AtomicUsize;
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    static DROPPED: AtomicUsize = AtomicUsize::new(0);
    let _quiesce = Quiesce::start();
    let sizes: &[u32] = if cfg!(miri) { &[10] } else { &[10, 100, 1000] };
    for &keys in sizes {
        let writes = if cfg!(miri) { 400 } else { 40 * keys.max(500) };
        let map = SessionMap::new();
        for i in 0..writes {
            map.insert(i % keys, Counted::new(&CREATED, &DROPPED));
        }
        // A chain since the last compaction holds at most max(min, 2 * keys) + keys bindings,
        // `min` being the map's `COMPACT_MIN_WRITES` (64 under miri, 128 otherwise).
        let min_writes: usize = if cfg!(miri) { 64 } else { 128 };
        let chain = min_writes.max(2 * keys as usize) + keys as usize;
        let alive = settle(
            keys as usize + 3 * chain,
            || CREATED.load(Ordering::SeqCst) - DROPPED.load(Ordering::SeqCst),
            |i| map.insert(i % keys, Counted::new(&CREATED, &DROPPED)),
        );
        assert!(
            alive <= keys as usize + 3 * chain,
            "{keys} keys, {writes} writes: {alive} values alive (bound {})",
            keys as usize + 3 * chain
        );
        drop(map);
        assert_eq!(DROPPED.load(Ordering::SeqCst), CREATED.load(Ordering::SeqCst), "{keys} keys");
    }
}

/// No single write frees a whole long chain: the old chain a compaction of a large map leaves
/// (three nodes per key) is freed over several writes, at most 1 024 nodes — so at most 1 024
/// values dropped — by any one write, instead of every node of it in the first write after its
/// grace period (at 10^5 keys, 3·10^5 frees: a pause of milliseconds inside one `insert`). The
/// values are still all freed while the map is written.
#[test]
fn no_write_frees_more_than_a_batch_of_a_long_chain() {
    use std::sync::atomic::AtomicUsize;
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    static DROPPED: AtomicUsize = AtomicUsize::new(0);
    const BATCH: usize = 1024;
    let _quiesce = Quiesce::start();
    let keys: u32 = if cfg!(miri) { 100 } else { 4000 };
    let map = SessionMap::new();
    let mut most = 0usize;
    let mut freed_during_writes = 0usize;
    // Enough writes for several compactions (one every 2 * keys writes) and their graves.
    let rounds: u32 = if cfg!(miri) { 8 } else { 12 };
    for i in 0..rounds * keys {
        if i % 64 == 0 {
            flush_epoch();
        }
        let before = DROPPED.load(Ordering::SeqCst);
        map.insert(i % keys, Counted::new(&CREATED, &DROPPED));
        let freed = DROPPED.load(Ordering::SeqCst) - before;
        most = most.max(freed);
        freed_during_writes += freed;
    }
    assert!(most <= BATCH, "one insert dropped {most} values (at most {BATCH} expected)");
    // Most replaced values went while the map was written: all but those of the last two
    // compactions' chains (about 3 * keys each) and the live keys.
    let expected = (rounds as usize - 7) * keys as usize;
    assert!(
        freed_during_writes >= expected,
        "{freed_during_writes} of {} replaced values dropped during the writes (expected >= {expected})",
        (rounds - 1) * keys
    );
    drop(map);
    assert_eq!(DROPPED.load(Ordering::SeqCst), CREATED.load(Ordering::SeqCst));
}

/// A value whose `Drop` writes to the map it was bound in — run while that map frees old nodes,
/// inside a write — neither deadlocks (the freeing writer holds no lock anybody waits for) nor
/// loses a value.
#[test]
fn a_value_whose_drop_writes_to_its_own_map_does_not_deadlock() {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    static DROPPED: AtomicUsize = AtomicUsize::new(0);
    static SINK: Mutex<Option<SessionMap>> = Mutex::new(None);
    struct WritesOnDrop(#[allow(dead_code)] Counted);
    impl Drop for WritesOnDrop {
        fn drop(&mut self) {
            let map = SINK.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(map) = map {
                map.insert("written by a drop", DROPPED.load(Ordering::SeqCst));
            }
        }
    }
    let _quiesce = Quiesce::start();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let map = SessionMap::new();
        *SINK.lock().unwrap() = Some(map.clone());
        let writes = if cfg!(miri) { 300 } else { 20_000 };
        for i in 0..writes {
            if i % 64 == 0 {
                // Let compactions' graves ripen.
                flush_epoch();
            }
            map.insert(i % 10, WritesOnDrop(Counted::new(&CREATED, &DROPPED)));
        }
        let written = map.value::<usize, _>(&"written by a drop").is_some();
        SINK.lock().unwrap().take();
        drop(map);
        done_tx.send(written).unwrap();
    });
    let written = done_rx
        .recv_timeout(std::time::Duration::from_secs(if cfg!(miri) { 3600 } else { 120 }))
        .expect("the writes finished (a deadlock would hang here)");
    assert!(written, "replaced values were dropped (and wrote) while the map was written");
    assert_eq!(DROPPED.load(Ordering::SeqCst), CREATED.load(Ordering::SeqCst));
}

/// A value whose `Drop` panics while a write frees old nodes: the panic reaches that write's
/// caller, later writes go on, and no other value is lost — each is dropped exactly once by the
/// time the map is gone.
#[test]
fn a_panicking_value_drop_during_freeing_loses_nothing() {
    use std::sync::atomic::AtomicUsize;
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    static DROPPED: AtomicUsize = AtomicUsize::new(0);
    static ARMED: AtomicBool = AtomicBool::new(false);
    struct Bomb(#[allow(dead_code)] Counted);
    impl Drop for Bomb {
        fn drop(&mut self) {
            if ARMED.swap(false, Ordering::SeqCst) {
                panic!("a value's Drop panics");
            }
        }
    }
    let _quiesce = Quiesce::start();
    let map = SessionMap::new();
    let writes = if cfg!(miri) { 400 } else { 5_000 };
    let mut panics = 0;
    for i in 0..writes {
        if i == writes / 4 {
            ARMED.store(true, Ordering::SeqCst);
        }
        if i % 64 == 0 {
            // Let compactions' graves ripen.
            flush_epoch();
        }
        let write = std::panic::AssertUnwindSafe(|| map.insert(i % 10, Bomb(Counted::new(&CREATED, &DROPPED))));
        if std::panic::catch_unwind(write).is_err() {
            panics += 1;
        }
    }
    // Disarmed before asserting: a failed assertion must not make the map's drop panic again.
    let exploded = !ARMED.swap(false, Ordering::SeqCst);
    assert!(exploded && panics == 1, "the one panicking Drop reached one write's caller ({panics} panics)");
    assert_eq!(map.len(), 10);
    let alive = settle(
        300,
        || CREATED.load(Ordering::SeqCst) - DROPPED.load(Ordering::SeqCst),
        |i| map.insert(i % 10, Bomb(Counted::new(&CREATED, &DROPPED))),
    );
    assert!(alive <= 300, "old nodes are still freed after the panic ({alive} values alive)");
    drop(map);
    assert_eq!(DROPPED.load(Ordering::SeqCst), CREATED.load(Ordering::SeqCst));
}

/// Four writers and two readers on one map, freeing old chains as they go: a reader never sees a
/// value whose `Drop` has run (it borrows values while writers free old nodes), and once the map
/// is gone every value has been dropped exactly once.
#[test]
fn four_writers_and_two_readers_free_nothing_twice_or_early() {
    use std::sync::atomic::AtomicUsize;
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    static DROPPED: AtomicUsize = AtomicUsize::new(0);
    struct Live(AtomicBool, #[allow(dead_code)] Counted);
    impl Drop for Live {
        fn drop(&mut self) {
            assert!(self.0.swap(false, Ordering::SeqCst), "dropped twice");
        }
    }
    let _quiesce = Quiesce::start();
    let map = SessionMap::new();
    let writes = if cfg!(miri) { 40 } else { 20_000 };
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2u32)
        .map(|r| {
            let (map, stop) = (map.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = r;
                while !stop.load(Ordering::SeqCst) {
                    map.read(&(i % 10), |v: Option<&Live>| {
                        assert!(v.is_none_or(|v| v.0.load(Ordering::SeqCst)), "a reader saw a dropped value");
                    });
                    i = i.wrapping_add(1);
                }
            })
        })
        .collect();
    let writers: Vec<_> = (0..4u32)
        .map(|w| {
            let map = map.clone();
            std::thread::spawn(move || {
                for i in 0..writes {
                    map.insert((w + i) % 10, Live(AtomicBool::new(true), Counted::new(&CREATED, &DROPPED)));
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for reader in readers {
        reader.join().unwrap();
    }
    assert_eq!(map.len(), 10);
    drop(map);
    assert_eq!(DROPPED.load(Ordering::SeqCst), CREATED.load(Ordering::SeqCst));
}

/// Maps bound as values in maps (and in sessions, and maps in sessions in maps) drop
/// iteratively: dropping the outermost releases every level without one native stack frame
/// group per level. Failed before (natively, 10^5 levels on a 256 KiB stack: "has overflowed
/// its stack", the process aborted; the map's `Drop` released its chain, whose value dropped
/// the next map, and so on).
#[test]
fn nested_maps_drop_iteratively() {
    use localsession_core::{AnySession, Context, SessionCtx, SessionExt};
    let _quiet = Quiesce::start();
    let levels = if cfg!(miri) { 100 } else { 100_000 };
    let mut maps = SessionMap::new();
    for _ in 0..levels {
        maps = SessionMap::new().with_value("inner", maps);
    }
    // Erased (`AnySession::Map` behind the `dyn Session` path), alternating with sessions.
    let mut mixed: AnySession = SessionMap::new().into();
    for level in 0..levels {
        mixed = if level % 2 == 0 {
            SessionExt::with_value(&SessionMap::new(), "inner", mixed)
        } else {
            SessionCtx::new(&Context::background()).with_value("inner", mixed).into()
        };
    }
    // Shared inner maps are kept by their other handle, and released with it.
    let shared = SessionMap::new().with_value("k", 1u8);
    let outer = SessionMap::new().with_value("inner", shared.clone());
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || {
            drop(maps);
            drop(mixed);
            drop(outer);
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(shared.value::<u8, _>(&"k").as_deref(), Some(&1));
}

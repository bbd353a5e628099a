//! [`SessionMap`]: Go's `SessionMap`, one shared, mutable map that every holder sees.
//!
//! # Synchronization
//!
//! The map is an atomic root pointer to the newest node of an immutable chain — the same nodes
//! a [`Context`] is made of, so a snapshot ([`SessionMap::export`]) is just another reference
//! to the current head. The chain's base is the map's validity scope.
//!
//! - **Readers** pin the epoch (crossbeam-epoch), load the root (`Acquire`) and look the key up
//!   in the immutable chain. They never wait for a writer and never write shared memory
//!   themselves (the pin is a thread-local operation).
//! - **Writers** allocate one node above the current head and publish it with a
//!   compare-and-swap (`AcqRel`); on failure they re-link the same node above the new head and
//!   retry. Every successful CAS includes every earlier one, so no update is ever lost (loom
//!   model `map_concurrent_writers`). The new node is linked with the root's own reference to
//!   the old head, *lent* until the exchange succeeds (then it has moved into the node): an
//!   insert touches no reference count of the head — whose header readers are reading — and
//!   frees nothing.
//! - **Compaction** keeps memory bounded: after enough writes a writer rebuilds the newest
//!   binding of each live key into a fresh chain over the base and swaps it in with one CAS.
//!   Only then can a reader still be walking a chain that nothing references any more, so the
//!   root's reference to the old head goes to a per-map *graveyard*, and a `Guard::defer`red
//!   function marks that grave *ripe* once every reader pinned at that time has unpinned; the
//!   next writer moves the ripe graves to the map's *dying* list, and every write frees a few
//!   nodes of that list (see [`SessionMap::free_graves`] for why not all at once). Crossbeam
//!   runs deferred functions on whichever thread happens to collect — typically a reader of any
//!   map, inside its `pin` — so the deferred function owns nothing but two reference-counted
//!   flags: it never holds the map itself nor any user value, so no user `Drop` code (and no
//!   map's last release) ever runs inside epoch reclamation, and readers never pay for freeing
//!   a chain. A compaction that loses its CAS
//!   race drops its private chain and leaves the work to a later writer. An idle map keeps its
//!   last graves and dying nodes until it is written to or dropped; dropping the map frees them
//!   all (no reader of a map can outlive the map).
//!
//! Values are stored behind an `Arc`, so reads can hand out owned handles ([`SessionMap::value`])
//! as well as borrows ([`SessionMap::read`]), and compaction can re-bind a value without copying
//! it.
//!
//! # Large maps
//!
//! Lookups below the newest few nodes go through index tables, which past 64 keys form levels
//! (`index::Table`: a log-structured merge of persistent hash tables); `len()` is O(1). At 10^5
//! keys this layout does not reach the speed of Go's design (a read-write lock over a hash map),
//! measured side by side in the criterion suite (`tests/benches/report.sh -- p5_`, 2026-12-01,
//! release, this project's 2-vCPU machine): insert 1 072 ns against 105 ns, read of any key
//! 195 ns against 51.5 ns. Why, from profiles (`perf record` on `ops p5_read_100000` /
//! `p5_insert_100000`):
//!
//! - A read makes three dependent cache misses where the lock-based map makes two: the table
//!   slot (10% of the read's samples), the node, whose key it must compare (43%), and the `Arc`
//!   the value lives in (39%). The lock-based map keeps the key in its bucket. Removing a miss
//!   would need the value in the node (then `value()` could not return the `Arc<V>` it returns)
//!   or the key in the table slot (then the tables, which are shared by every snapshot and
//!   copied level by level, would store user keys).
//! - A write is one allocation and a CAS, but keeping the persistent index costs O(log n) per
//!   write: every `SEGMENT` writes a table is built (26% of an insert's samples, most of it
//!   looking each new key up in every level: a slot, then the node, whose key is compared),
//!   large levels are re-allocated when merged into (page faults and zeroing: ~11%), the
//!   allocator serves and frees the nodes (~25%), and compaction lists the live bindings (1%).
//!   Merging reads no node while the levels' keys have distinct tags (the usual case; a level
//!   records it), and a merge into the largest level starts from a copy of it: such a merge
//!   at 10^5 keys pauses one write for 2.8–4.3 ms, where re-inserting every entry and comparing
//!   the two nodes of every key found in two levels took 11.5–12.9 ms (`ops
//!   p5_insert_pauses_100000`, both builds alternated, 2026-12-01).
//! - The layout a persistent map would otherwise use, a hash array mapped trie below the linked
//!   head, does worse on both counts: `rpds::HashTrieMapSync`, path-copying inserts, in the same
//!   run: insert 3 287 ns, read 299 ns (a trie lookup is four dependent node loads at 10^5 keys).
//!
//! Meeting "insert <= 100 ns at 10^5 keys" would take a table mutated in place (lock-free reads
//! of slots a writer overwrites), which gives up what this design keeps: `export` as an O(1),
//! consistent snapshot that shares the map's nodes, and one node format with [`Context`]. The
//! lock-free reads pay off under contention: in the same run, a read while another thread
//! writes continuously took 29.3 ns here and 562 ns with the lock (21.9x its quiet read).
//!
//! Compaction runs inside one write, once per 2·10^5 writes at 10^5 keys, and is O(live keys). It
//! lists the live bindings from the index levels (a scan of arrays) rather than by walking the
//! chain (up to three nodes per live key, one dependent cache miss each), and copies them in
//! address order. At 10^5 keys that pauses the write for 17–31 ms (listing ~5.5 ms, sorting
//! 1.2 ms, copying 8–13 ms, indexing ~2 ms), where walking the chain paused it for 36–53 ms
//! (`ops p5_insert_pauses_100000`, which prints the longest inserts; both builds alternated,
//! four runs each, on 2026-12-01). The old chain it replaces is freed in batches over later writes (see
//! [`SessionMap::free_graves`]).

use core::any::Any;
use core::fmt;
use core::hash::Hash;
use core::ptr::NonNull;
use core::time::Duration;

use alloc::sync::Arc;
use alloc::vec::Vec;

use crossbeam_utils::CachePadded;

use crate::context::Context;
use crate::error::ContextError;
use crate::index::{for_each_binding_unordered, live_len};
use crate::key::{DynKey, Key, KeyQuery, hashed_tag};
use crate::node::{
    ChainOwner, Dying, F_NO_INDEX, F_TOMBSTONE, F_VALUE, InlineKey, NodePtr, NodeRef, SharedKey, SharedValue,
    Tombstone, TypedKey, lookup, lookup_by, register_chain_owner,
};
use crate::primitive::epoch::{self, Guard};
use crate::primitive::{AtomicPtr, AtomicUsize, Mutex, Ordering};
use crate::scope::Done;
use crate::time::{Instant, NoClockError, global_clock};

/// Nodes of old chains each write frees (see [`SessionMap::free_graves`]): more than the at most
/// 1.5 nodes per write that writes and compactions make, so the dying list never grows without
/// bound. 1 under loom, so that the models leave nodes for later writes and the map's drop.
#[cfg(not(localsession_loom))]
const FREE_PER_WRITE: usize = 2;
#[cfg(localsession_loom)]
const FREE_PER_WRITE: usize = 1;

/// While more than this many old nodes wait to be freed, a write frees [`FREE_BATCH`] of them
/// instead of [`FREE_PER_WRITE`] (see [`SessionMap::free_graves`]). 2 under loom, whose models'
/// chains are a few nodes long, so that they free in batches too.
#[cfg(not(localsession_loom))]
const INCREMENTAL_CHAIN: usize = 256;
#[cfg(localsession_loom)]
const INCREMENTAL_CHAIN: usize = 2;

/// Old nodes one write frees while more than [`INCREMENTAL_CHAIN`] wait: enough to free a
/// compaction's old chain while its walk has just brought it into the cache, few enough to
/// bound the pause of any one write (a 10^5-key map's old chain is 3·10^5 nodes). 2 under loom.
#[cfg(not(localsession_loom))]
const FREE_BATCH: usize = 1024;
#[cfg(localsession_loom)]
const FREE_BATCH: usize = 2;

/// Writes after which a compaction is attempted, at least: a map compacts after
/// `max(COMPACT_MIN_WRITES, 2 * live keys)` writes, so this sets the rhythm of small maps only.
///
/// 128 since stop 30 (was 64). A compaction of a 10-key map (rebind the live keys, one table,
/// hand the old chain to the epoch with a `Guard::flush`) was 13% of its inserts'
/// instructions; at 128 it is paid half as often: `ops p5_insert_10` 1 086 -> 989 instructions
/// per insert (`tests/benches/instructions.sh`), 97.6 -> 84.4 ns wall clock (medians of five
/// alternations of the two builds, 2026-12-02); reads do the same work either way (a lookup
/// never walks more than `SEGMENT` nodes above a table). 256 gave 971 instructions, not worth
/// doubling again what a small map holds between compactions: up to 128 replaced bindings
/// besides its live ones, about 14 KiB with `u64` keys and values, where 64 held half that (a
/// binding requests 88 bytes, the node 64 and its value's `Arc` 24, counted with a counting
/// global allocator on a fresh thread; about 112 with glibc's chunk headers).
///
/// 64 under miri, whose model tests are sized to cross that threshold within what an
/// interpreter runs in CI's budget (the compaction code is the same; it runs twice as often).
/// 2 under loom, so that the models explore compaction racing with writers and readers.
#[cfg(all(not(localsession_loom), not(miri)))]
const COMPACT_MIN_WRITES: usize = 128;
#[cfg(all(not(localsession_loom), miri))]
const COMPACT_MIN_WRITES: usize = 64;
#[cfg(localsession_loom)]
const COMPACT_MIN_WRITES: usize = 2;

/// Go's `SessionMap`: a shared, mutable session. `with_value`/`insert` change the one map that
/// every holder (and every thread) sees.
///
/// Reads are lock-free and never wait for writers; writes are lock-free and never lost. Values
/// come back as `Arc` handles ([`value`](SessionMap::value), [`get`](SessionMap::get)) or as
/// borrows inside a closure ([`read`](SessionMap::read), [`read_key`](SessionMap::read_key)),
/// which pins the epoch but clones nothing.
///
/// # Examples
/// ```
/// use localsession_core::SessionMap;
///
/// let map = SessionMap::new();
/// let seen_by_other_holder = map.clone();
/// map.insert("user", 42u64);
/// assert_eq!(seen_by_other_holder.value::<u64, _>(&"user").as_deref(), Some(&42));
///
/// let snapshot = map.export();
/// map.insert("user", 43u64);
/// assert_eq!(snapshot.value::<u64, _>(&"user"), Some(&42)); // a consistent snapshot
///
/// map.disable();
/// assert!(!seen_by_other_holder.is_valid());
/// ```
#[derive(Clone)]
pub struct SessionMap {
    shared: Arc<MapShared>,
}

struct MapShared {
    /// The newest node; owns one reference. Never null. On its own cache line: every write
    /// changes it, and nothing else should bounce with it.
    root: CachePadded<AtomicPtr<crate::node::Header>>,
    /// The validity scope: the chain's base (`top` is the scope node).
    base: Context,
    /// Successful writes since the last compaction (a heuristic; relaxed).
    writes: CachePadded<AtomicUsize>,
    /// Live keys after the last compaction (a heuristic; relaxed).
    live: AtomicUsize,
    /// Old chains replaced by a compaction, each moved to `dying` by the first writer that finds
    /// its grace period over (see [`SessionMap::compact`]).
    graveyard: Mutex<Vec<Grave>>,
    /// Nodes of ripe graves whose last reference is gone, freed a few per write. Only ever
    /// `try_lock`ed: the holder runs values' `Drop` (user code, which may write to this map).
    dying: Mutex<Dying>,
    /// Whether `dying` may hold nodes (a hint that spares writers the lock; written under it).
    dying_hint: AtomicUsize,
    /// Whether a grave may have ripened (a hint that spares writers the lock). Shared with the
    /// deferred functions, which must not own the map.
    graves: Arc<AtomicUsize>,
}

/// An old chain waiting for its epoch grace period to end.
struct Grave {
    /// Set (by a deferred function, on any thread) once no reader can still walk `chain`.
    ripe: Arc<AtomicUsize>,
    chain: NodeRef,
    /// About how many nodes `chain` has above the base (the writes since the compaction before
    /// and the live keys it left).
    len: usize,
}

impl Drop for MapShared {
    fn drop(&mut self) {
        let root = self.root.load(Ordering::Relaxed);
        // Null once `take_map_chain` moved the chain out, for node reclamation to release.
        if let Some(root) = NonNull::new(root) {
            // SAFETY: the root owns one reference; nobody else can reach the map any more.
            drop(unsafe { NodeRef::from_raw(root) });
        }
    }
}

/// The root chain of a [`SessionMap`] value about to be dropped, if it holds the map's last
/// handle: so that maps nested as values in maps (or in contexts and sessions) drop
/// iteratively, not one native stack frame group per level (see `node::register_chain_owner`).
/// `AnySession::Map` values are recognised by the session module, which calls
/// [`SessionMap::take_chain`].
fn take_map_chain(value: &mut (dyn Any + Send + Sync)) -> Option<NodeRef> {
    value.downcast_mut::<SessionMap>().and_then(SessionMap::take_chain)
}

impl SessionMap {
    /// Moves the root chain out of a map whose last handle this is (`None` otherwise), for node
    /// reclamation to release iteratively; the map's own `Drop` then releases only its old
    /// chains (graves, dying nodes), as before.
    pub(crate) fn take_chain(&mut self) -> Option<NodeRef> {
        // The last handle: no reader can walk the chain (reading needs a handle), and the
        // deferred functions of compactions hold only `graves`, never the map.
        let shared = Arc::get_mut(&mut self.shared)?;
        let root = shared.root.swap(core::ptr::null_mut(), Ordering::Relaxed);
        // SAFETY: the root owned one reference, which moves into the returned `NodeRef`; the
        // null left behind tells `MapShared::drop` there is nothing more to release.
        NonNull::new(root).map(|root| unsafe { NodeRef::from_raw(root) })
    }

    /// An empty map with its own validity scope (Go `NewSessionMap(map{})`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// assert!(SessionMap::new().is_valid());
    /// ```
    #[must_use]
    pub fn new() -> SessionMap {
        SessionMap::new_in(&Context::background())
    }

    /// An empty map whose validity scope is opened under `ctx`: cancelling `ctx` (or reaching
    /// its deadline) invalidates the map. The map holds only its own keys, as in Go: `ctx`'s
    /// values are not visible through it (nor through its [`export`](SessionMap::export)).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, SessionMap};
    /// let (ctx, cancel) = Context::background().with_value("tenant", "acme").with_cancel();
    /// let map = SessionMap::new_in(&ctx);
    /// assert!(map.value::<&str, _>(&"tenant").is_none());
    /// assert!(map.is_valid());
    /// cancel.cancel();
    /// assert!(!map.is_valid());
    /// ```
    #[must_use]
    pub fn new_in(ctx: &Context) -> SessionMap {
        Self::from_base(ctx.open_scope_ctx(None, true))
    }

    /// An empty map that becomes invalid after `timeout` on the global clock (Go
    /// `NewSessionMapWithTimeout`, without a goroutine per map).
    ///
    /// # Errors
    /// [`NoClockError`] if no clock is registered.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::SessionMap;
    /// assert!(SessionMap::with_timeout(Duration::from_secs(1)).is_err()); // no clock here
    /// ```
    pub fn with_timeout(timeout: Duration) -> Result<SessionMap, NoClockError> {
        let clock = global_clock().ok_or(NoClockError(()))?;
        Ok(SessionMap::with_deadline(Instant::now(clock) + timeout))
    }

    /// An empty map that becomes invalid at `deadline`.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::{Clock, Instant, SessionMap};
    /// struct Fixed;
    /// impl Clock for Fixed { fn now(&self) -> Duration { Duration::from_secs(1) } }
    /// static CLOCK: Fixed = Fixed;
    /// let map = SessionMap::with_deadline(Instant::from_clock_time(&CLOCK, Duration::ZERO));
    /// assert!(!map.is_valid());
    /// ```
    #[must_use]
    pub fn with_deadline(deadline: Instant) -> SessionMap {
        Self::from_base(Context::background().open_scope_ctx(Some(deadline), true))
    }

    fn from_base(base: Context) -> SessionMap {
        // Before any map can be bound as a value: nested maps drop iteratively.
        register_chain_owner(ChainOwner::Map, take_map_chain);
        let root = base.top().cloned().expect("a scope context has a head").into_raw();
        SessionMap {
            shared: Arc::new(MapShared {
                root: CachePadded::new(AtomicPtr::new(root.as_ptr())),
                base,
                writes: CachePadded::new(AtomicUsize::new(0)),
                live: AtomicUsize::new(0),
                graveyard: Mutex::new(Vec::new()),
                dying: Mutex::new(Dying::new()),
                dying_hint: AtomicUsize::new(0),
                graves: Arc::new(AtomicUsize::new(0)),
            }),
        }
    }

    /// Binds `key` to `value` in the shared map (every holder sees it).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// let m = SessionMap::new();
    /// m.insert(1u32, "one");
    /// m.insert(1u32, "uno");
    /// assert_eq!(m.value::<&str, _>(&1u32).as_deref(), Some(&"uno"));
    /// ```
    pub fn insert<K, V>(&self, key: K, value: V)
    where
        K: Eq + Hash + Any + Send + Sync + Clone,
        V: Any + Send + Sync,
    {
        Context::note_value_type::<V>();
        let tag = hashed_tag(&key);
        let node = if core::mem::needs_drop::<V>() {
            NodeRef::new_rebindable(None, tag, F_VALUE, InlineKey(key), SharedValue::<true, _>(Arc::new(value)))
        } else {
            // No drop glue: the value cannot own a chain (see `SharedValue`).
            NodeRef::new_rebindable(None, tag, F_VALUE, InlineKey(key), SharedValue::<false, _>(Arc::new(value)))
        };
        self.publish(node, |_| true);
    }

    /// Binds a typed key in the shared map.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Key, SessionMap};
    /// static N: Key<u32> = Key::new("n");
    /// let m = SessionMap::new();
    /// m.set(&N, 5);
    /// assert_eq!(m.get(&N).as_deref(), Some(&5));
    /// ```
    pub fn set<T: Any + Send + Sync>(&self, key: &'static Key<T>, value: T) {
        Context::note_value_type::<T>();
        let node = if core::mem::needs_drop::<T>() {
            NodeRef::new_rebindable(None, key.tag(), F_VALUE, TypedKey, SharedValue::<true, _>(Arc::new(value)))
        } else {
            NodeRef::new_rebindable(None, key.tag(), F_VALUE, TypedKey, SharedValue::<false, _>(Arc::new(value)))
        };
        self.publish(node, |_| true);
    }

    /// Inserts and returns the map itself (Go `WithValue`, which mutates and returns the
    /// receiver).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// let m = SessionMap::new();
    /// let same = m.with_value("k", 1u8);
    /// assert!(same.ptr_eq(&m));
    /// assert_eq!(m.value::<u8, _>(&"k").as_deref(), Some(&1));
    /// ```
    #[must_use = "the map is updated in place; the returned handle is the same map"]
    pub fn with_value<K, V>(&self, key: K, value: V) -> SessionMap
    where
        K: Eq + Hash + Any + Send + Sync + Clone,
        V: Any + Send + Sync,
    {
        self.insert(key, value);
        self.clone()
    }

    /// Sets a typed key and returns the map itself.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Key, SessionMap};
    /// static N: Key<u8> = Key::new("n");
    /// let m = SessionMap::new().with(&N, 2);
    /// assert_eq!(m.get(&N).as_deref(), Some(&2));
    /// ```
    #[must_use = "the map is updated in place; the returned handle is the same map"]
    pub fn with<T: Any + Send + Sync>(&self, key: &'static Key<T>, value: T) -> SessionMap {
        self.set(key, value);
        self.clone()
    }

    /// Removes `key`. Returns whether it was present.
    ///
    /// The removed value is not dropped here: like a replaced one, it stays in the map's chain
    /// (snapshots and concurrent readers may still reach it) until a later compaction or the
    /// map's drop releases it. A value that holds a handle to its own map is a reference cycle
    /// that `remove` therefore does not break at once: the map (and the value) is freed once
    /// enough later writes compact it, or never if none come. Keep such back-references out of
    /// the map's values (or drop them from inside the value before removing it).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// let m = SessionMap::new().with_value("k", 1u8);
    /// assert!(m.remove(&"k"));
    /// assert!(!m.remove(&"k"));
    /// assert!(m.value::<u8, _>(&"k").is_none());
    /// ```
    pub fn remove<K: Eq + Hash + Any + Send + Sync + Clone>(&self, key: &K) -> bool {
        let q = KeyQuery::new(key);
        let node = NodeRef::new_rebindable(None, q.tag, F_VALUE | F_TOMBSTONE, InlineKey(key.clone()), Tombstone);
        // SAFETY: `publish` calls the precheck with the head it loaded while pinned.
        self.publish(node, |head| unsafe { Self::present(head, &q) })
    }

    /// Removes a typed key. Returns whether it was present.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Key, SessionMap};
    /// static N: Key<u8> = Key::new("n");
    /// let m = SessionMap::new().with(&N, 1);
    /// assert!(m.remove_key(&N));
    /// assert!(m.get(&N).is_none());
    /// ```
    pub fn remove_key<T>(&self, key: &'static Key<T>) -> bool {
        let q = KeyQuery::typed(key);
        let node = NodeRef::new_rebindable(None, q.tag, F_VALUE | F_TOMBSTONE, TypedKey, Tombstone);
        // SAFETY: `publish` calls the precheck with the head it loaded while pinned.
        self.publish(node, |head| unsafe { Self::present(head, &q) })
    }

    /// Whether `q` is bound (and not removed) at or below `head`.
    ///
    /// # Safety
    /// `head` and its chain are alive for the call (the caller is pinned and loaded `head` from
    /// the root while pinned).
    unsafe fn present(head: NodePtr, q: &KeyQuery<'_>) -> bool {
        // SAFETY: forwarded from the caller.
        unsafe { lookup(head, q) }.is_some_and(|n| !unsafe { n.header() }.is_tombstone())
    }

    /// Publishes `node` above the current head if `precheck(head)` holds; returns whether it
    /// was published. `precheck` is only called with a head loaded from the root while pinned.
    fn publish(&self, mut node: NodeRef, precheck: impl Fn(NodePtr) -> bool) -> bool {
        /// Links the unpublished node above the head with the *root's* reference to the head,
        /// lent rather than copied (no reference-count traffic on the head, whose header readers
        /// are reading). Unless the exchange succeeds — the root's reference then moves into the
        /// node — the loan is given back when this is dropped, also during unwinding (a user
        /// `Eq` may panic while the node's index table is built).
        struct Loan<'a> {
            node: &'a mut NodeRef,
            published: bool,
        }
        impl Drop for Loan<'_> {
            fn drop(&mut self) {
                if !self.published {
                    // SAFETY: the node was never shared; relinking above nothing runs no user
                    // code. The parent it returns is the lent reference: not ours to release.
                    core::mem::forget(unsafe { self.node.relink(None) });
                }
            }
        }

        let guard = epoch::pin();
        let root = &self.shared.root;
        // Acquire: the head's contents (and the chain under it) were published with Release.
        let mut head = root.load(Ordering::Acquire);
        loop {
            // SAFETY: `head` is non-null; we are pinned, so it is alive even if a compaction
            // has already replaced it (its reference is then released only after we unpin).
            let head_ptr = NodePtr(unsafe { NonNull::new_unchecked(head) });
            if !precheck(head_ptr) {
                return false;
            }
            let mut loan = Loan { node: &mut node, published: false };
            // SAFETY: `node` was never shared and has no parent (a failed attempt gave its loan
            // back); the lent reference stays the root's until the exchange below succeeds.
            drop(unsafe { loan.node.relink(Some(NodeRef::from_raw(head_ptr.0))) });
            // AcqRel: Release publishes the node; Acquire on failure sees the new head's chain.
            match root.compare_exchange(head, loan.node.ptr().0.as_ptr(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // The root's reference to `head` is now the node's parent, and the root owns
                    // the node's initial reference.
                    loan.published = true;
                    drop(loan);
                    let _ = node.into_raw();
                    break;
                }
                Err(actual) => head = actual,
            }
        }
        // A heuristic count (load + store, not a read-modify-write: a lost increment under
        // concurrent writers only delays a compaction).
        let writes = self.shared.writes.load(Ordering::Relaxed) + 1;
        self.shared.writes.store(writes, Ordering::Relaxed);
        if writes >= COMPACT_MIN_WRITES.max(2 * self.shared.live.load(Ordering::Relaxed)) {
            self.compact(&guard);
        }
        drop(guard);
        self.free_graves();
        true
    }

    /// Frees [`FREE_PER_WRITE`] nodes of the old chains whose grace period is over (on the
    /// writer's thread, off the readers' path), after moving newly ripe graves to the dying list.
    ///
    /// A few nodes per write, not a whole chain at once: a chain is dozens of nodes and replaced
    /// values, and freeing them in a row overflows the allocator's per-thread cache, so those
    /// frees and the next writes' allocations went to the shared heap — under glibc's arena lock
    /// once the process has had a second thread (an insert into a 10-key map cost 150 ns in a
    /// single-threaded process and 199 ns after one thread had been started; `ops p5_insert_10`
    /// with and without `OPS_THREADED`, `docs/performance.md`, stop 23). Freed a few per write, a
    /// writer's frees match its allocations. A long chain is not spread that thin: freed two
    /// nodes per write, its nodes had left the CPU cache that the compaction's walk had just
    /// filled (+45% per insert at 1 000 keys). So while more than
    /// [`INCREMENTAL_CHAIN`] nodes wait, a write frees [`FREE_BATCH`] of them: a chain of a few
    /// thousand nodes goes in the next few writes, still warm, and no write frees more than a
    /// batch (freeing a 10^5-key map's old chain at once, 3·10^5 nodes and values, paused one
    /// write for milliseconds).
    ///
    /// The dying list is only `try_lock`ed: a writer that finds it taken (by another writer, or
    /// by this thread — a value's `Drop` that writes to the map) leaves the freeing to the holder
    /// and later writes, so user code never runs under a lock anybody waits for.
    fn free_graves(&self) {
        // SeqCst on the ripe hint and flags: the deferred function sets `ripe` then the hint,
        // and we clear the hint then read `ripe`, so a grave that ripens concurrently is either
        // seen here or leaves the hint set for the next writer.
        let ripe = self.shared.graves.load(Ordering::SeqCst) != 0;
        // Relaxed: a stale "empty" only leaves the freeing to a later write.
        if !ripe && self.shared.dying_hint.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(mut dying) = self.shared.dying.try_lock() else { return };
        if ripe {
            // The hint is cleared only by a writer that can take the graves now.
            let mut yard = self.shared.graveyard.lock();
            self.shared.graves.store(0, Ordering::SeqCst);
            let mut i = 0;
            while i < yard.len() {
                // SeqCst (so Acquire): the readers' last uses of the chain happen before the
                // deferred function's store, hence before we free it.
                if yard[i].ripe.load(Ordering::SeqCst) != 0 {
                    let grave = yard.swap_remove(i);
                    // Releasing the root's old reference runs no user code (nothing is freed
                    // yet).
                    dying.push_chain(grave.chain, grave.len);
                } else {
                    i += 1;
                }
            }
        }
        // Set before freeing: if a value's `Drop` panics out of here, later writes still know
        // that nodes are left.
        if !dying.is_empty() {
            self.shared.dying_hint.store(1, Ordering::Relaxed);
        }
        // Values' `Drop` runs here: under the dying list's lock alone, which nobody waits for.
        let budget = if dying.backlog() > INCREMENTAL_CHAIN { FREE_BATCH } else { FREE_PER_WRITE };
        dying.free_some(budget);
        self.shared.dying_hint.store(usize::from(!dying.is_empty()), Ordering::Relaxed);
    }

    /// Rebuilds the live bindings into a fresh chain over the base and swaps it in.
    fn compact(&self, guard: &Guard) {
        let root = &self.shared.root;
        let head = root.load(Ordering::Acquire);
        // SAFETY: non-null; alive while pinned.
        let head_ptr = NodePtr(unsafe { NonNull::new_unchecked(head) });
        let base = self.shared.base.top().expect("a map's base has a head");
        let chain_len = self.shared.writes.load(Ordering::Relaxed) + self.shared.live.load(Ordering::Relaxed);
        // Sized for the live keys of the last compaction plus a few: one allocation, no regrowth.
        let mut bindings: Vec<NodePtr> = Vec::with_capacity(self.shared.live.load(Ordering::Relaxed) + 8);
        // SAFETY: pinned, so the chain is alive.
        unsafe { for_each_binding_unordered(head_ptr, Some(base.ptr()), |n| bindings.push(n)) };
        // The bindings come in table order, which is random in memory. Rebinding copies each
        // node and increments its value's reference count, a locked instruction that waits for
        // its cache line: in random order one miss after another (13 ms of a 10^5-key map's
        // compaction), in address order (about the order the nodes were written in) 8 ms. The
        // sort costs 1.2 ms there. Tombstones are skipped here, not while listing: reading a
        // node's flags in table order was one more random miss per key.
        bindings.sort_unstable_by_key(|n| n.0.as_ptr() as usize);
        let mut live = 0usize;
        let mut top = base.clone();
        for n in &bindings {
            // SAFETY: `n` is alive (pinned).
            if unsafe { n.header() }.is_tombstone() {
                continue;
            }
            live += 1;
            // SAFETY: map nodes are made with a rebindable vtable; `n` is alive (pinned).
            let rebind = unsafe { n.header() }.vtable_rebind().expect("map nodes are rebindable");
            // SAFETY: as above. The inner nodes get no index tables (that would cost O(log n)
            // table work per node); the new head gets one table of them all below.
            top = unsafe { rebind(n.0, Some(top), F_NO_INDEX) };
        }
        if live > 0 {
            // SAFETY: `top` is the fresh head of our private chain, unshared until the exchange
            // below; `rebind` linked it with `F_NO_INDEX`, so it owns no table.
            unsafe { top.index_chain() };
        }
        let new_head = top.ptr().0.as_ptr();
        // AcqRel: publishes the new chain / observes a concurrent writer's.
        if root.compare_exchange(head, new_head, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            let _ = top.into_raw();
            self.shared.writes.store(0, Ordering::Relaxed);
            self.shared.live.store(live, Ordering::Relaxed);
            // SAFETY: the root owned this reference to the old head until the exchange.
            let old = unsafe { NodeRef::from_raw(head_ptr.0) };
            // Readers pinned before the exchange may still walk the old chain: release the
            // root's reference only once they have all unpinned. crossbeam runs deferred
            // functions from whichever thread collects — usually a reader of any map, inside
            // its `pin` — so the chain goes to the graveyard now and the deferred function only
            // flags it ripe; the next writer frees it (`free_graves`). The deferred function owns
            // no map and no user value: nothing it drops runs user code, so a reader's `pin`
            // never runs (or unwinds from) a value's `Drop`, and never frees a chain.
            let ripe = Arc::new(AtomicUsize::new(0));
            self.shared.graveyard.lock().push(Grave { ripe: Arc::clone(&ripe), chain: old, len: chain_len });
            let hint = Arc::clone(&self.shared.graves);
            guard.defer(move || {
                // SeqCst: see `free_graves`.
                ripe.store(1, Ordering::SeqCst);
                hint.store(1, Ordering::SeqCst);
            });
            // Hand the deferred function to the collector now: crossbeam keeps a thread's
            // deferred functions in a local bag of 64 until it fills, so without this a grave
            // ripened only after 64 compactions on this thread (about 8 000 dead bindings held
            // by a 10-key map that one thread writes to).
            guard.flush();
        }
        // Else: a writer got in first; our private chain is dropped here.
    }

    /// Calls `f` with a borrow of the current head (pinned for the call).
    #[inline]
    /// The head and everything reached from it stay alive while the guard `f` is given lives.
    fn with_head<R>(&self, f: impl FnOnce(NodePtr, &Guard) -> R) -> R {
        let guard = epoch::pin();
        // Acquire: see the node's contents published by the writer's Release.
        let head = self.shared.root.load(Ordering::Acquire);
        // SAFETY: never null; alive while pinned.
        f(NodePtr(unsafe { NonNull::new_unchecked(head) }), &guard)
    }

    /// Calls `f` with the node binding the key whose tag is `tag` and whose node `matches`
    /// (tombstones read as absent), and the guard that keeps it alive. The readers below pass
    /// [`NodePtr::key_is`] for a hashed key (its type is known here, so keys compare without an
    /// indirect call) and nothing for a typed key (its tag is its identity).
    #[inline]
    fn find<R>(&self, tag: u64, matches: impl Fn(NodePtr) -> bool, f: impl FnOnce(Option<NodePtr>, &Guard) -> R) -> R {
        self.with_head(|head, guard| {
            // SAFETY: pinned by `with_head`; the node found lives as long as the pin, and
            // `matches` is only called with live nodes of the chain.
            let node = unsafe { lookup_by(head, tag, matches) }.filter(|n| !unsafe { n.header() }.is_tombstone());
            f(node, guard)
        })
    }

    /// [`find`](SessionMap::find) for a hashed key.
    #[inline]
    fn find_key<K: Eq + Hash + Any + Send + Sync, R>(
        &self,
        key: &K,
        f: impl FnOnce(Option<NodePtr>, &Guard) -> R,
    ) -> R {
        // SAFETY: `find` calls `matches` with live value nodes (they have the key's tag).
        self.find(hashed_tag(key), |n| unsafe { n.key_is(key) }, f)
    }

    /// Calls `f` with the value bound to `key` if it is a `V`, borrowed for the call. Clones
    /// nothing.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// let m = SessionMap::new().with_value("name", String::from("ann"));
    /// assert_eq!(m.read(&"name", |v: Option<&String>| v.map(|s| s.len())), Some(3));
    /// ```
    #[inline]
    pub fn read<V: Any, K: Eq + Hash + Any + Send + Sync, R>(&self, key: &K, f: impl FnOnce(Option<&V>) -> R) -> R {
        // SAFETY: the node is alive while `guard` is (pinned).
        self.find_key(key, |n, guard| f(n.and_then(|n| unsafe { n.value_as::<V, _>(guard) })))
    }

    /// Calls `f` with the value bound to a typed key, borrowed for the call.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Key, SessionMap};
    /// static N: Key<u16> = Key::new("n");
    /// let m = SessionMap::new().with(&N, 9);
    /// assert_eq!(m.read_key(&N, |v| v.copied()), Some(9));
    /// ```
    #[inline]
    pub fn read_key<T: Any, R>(&self, key: &'static Key<T>, f: impl FnOnce(Option<&T>) -> R) -> R {
        // SAFETY: the node is alive while `guard` is (pinned).
        self.find(key.tag(), |_| true, |n, guard| f(n.and_then(|n| unsafe { n.value_as::<T, _>(guard) })))
    }

    /// An owned handle to the value bound to `key`, if it is a `V`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// let m = SessionMap::new().with_value("k", vec![1, 2]);
    /// let v = m.value::<Vec<i32>, _>(&"k").unwrap();
    /// m.insert("k", vec![3]);
    /// assert_eq!(*v, vec![1, 2]); // the handle keeps the value it was given
    /// ```
    #[must_use]
    pub fn value<V: Any + Send + Sync, K: Eq + Hash + Any + Send + Sync>(&self, key: &K) -> Option<Arc<V>> {
        // SAFETY: the node is alive for the closure (pinned).
        self.find_key(key, |n, _| n.and_then(|n| unsafe { n.shared_as::<V>() }))
    }

    /// An owned handle to the value bound to a typed key.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Key, SessionMap};
    /// static N: Key<u8> = Key::new("n");
    /// assert!(SessionMap::new().get(&N).is_none());
    /// ```
    #[must_use]
    pub fn get<T: Any + Send + Sync>(&self, key: &'static Key<T>) -> Option<Arc<T>> {
        // SAFETY: the node is alive for the closure (pinned).
        self.find(key.tag(), |_| true, |n, _| n.and_then(|n| unsafe { n.shared_as::<T>() }))
    }

    /// Whether `key` is bound.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// let m = SessionMap::new().with_value(1u8, ());
    /// assert!(m.contains(&1u8) && !m.contains(&2u8));
    /// ```
    #[must_use]
    pub fn contains<K: Eq + Hash + Any + Send + Sync>(&self, key: &K) -> bool {
        self.find_key(key, |n, _| n.is_some())
    }

    /// The number of keys bound in the map itself (not counting the context it was opened
    /// under). O(1): the map's index tables count the live keys.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// let m = SessionMap::new().with_value("a", 1u8).with_value("b", 2u8).with_value("a", 3u8);
    /// assert_eq!(m.len(), 2);
    /// ```
    #[must_use]
    pub fn len(&self) -> usize {
        let base = self.shared.base.top().map(NodeRef::ptr);
        // SAFETY: pinned by `with_head`; the base is a barrier no table reaches under.
        self.with_head(|head, _| unsafe { live_len(head, base) })
    }

    /// Whether the map has no keys of its own.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// assert!(SessionMap::new().is_empty());
    /// ```
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A consistent snapshot of the map as a [`Context`] (Go `Export`): later writes do not
    /// change it; disabling the map cancels it.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// let map = SessionMap::new().with_value("k", 1u8);
    /// let snapshot = map.export();
    /// map.insert("k", 2u8);
    /// assert_eq!(snapshot.value::<u8, _>(&"k"), Some(&1)); // later writes do not change it
    /// map.disable();
    /// assert!(snapshot.is_done()); // disabling the map cancels it
    /// ```
    ///
    /// See also [`SessionMap`].
    #[must_use]
    pub fn export(&self) -> Context {
        // SAFETY: pinned by `with_head`, so the head is alive while we take a reference.
        let top = self.with_head(|head, _| unsafe { NodeRef::clone_from_ptr(head) });
        // SAFETY: every chain the root points to is built over the base's head, so the base's
        // scope is in `top`'s chain.
        unsafe { Context::from_parts(Some(top), self.shared.base.scope_ptr()) }
    }

    /// Invalidates the map for every holder (Go `Disable`). Returns `false` if it was invalid
    /// already (disabled, expired, or its parent context cancelled).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// let m = SessionMap::new();
    /// assert!(m.disable());
    /// assert!(!m.is_valid());
    /// ```
    pub fn disable(&self) -> bool {
        self.shared.base.scope().is_some_and(|s| s.cancel(ContextError::Canceled))
    }

    /// Whether the map is valid: not disabled, not expired, its parent context not cancelled.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// assert!(SessionMap::new().is_valid());
    /// ```
    #[inline]
    #[must_use]
    pub fn is_valid(&self) -> bool {
        !self.shared.base.is_done()
    }

    /// Why the map is invalid, or `None`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{ContextError, SessionMap};
    /// let m = SessionMap::new();
    /// m.disable();
    /// assert_eq!(m.err(), Some(ContextError::Canceled));
    /// ```
    #[must_use]
    pub fn err(&self) -> Option<ContextError> {
        self.shared.base.err()
    }

    /// A future that resolves when the map becomes invalid.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// # futures::executor::block_on(async {
    /// let m = SessionMap::new();
    /// let other_holder = m.clone();
    /// std::thread::spawn(move || other_holder.disable());
    /// m.done().await; // woken by the other holder's `disable`
    /// assert!(!m.is_valid());
    /// # });
    /// ```
    pub fn done(&self) -> Done {
        self.shared.base.done()
    }

    /// Runs `f` once when the map becomes invalid (see [`Context::after_cancel`]).
    ///
    /// # Examples
    /// ```
    /// use std::sync::mpsc;
    /// use localsession_core::SessionMap;
    /// let m = SessionMap::new();
    /// let (tx, rx) = mpsc::channel();
    /// let _h = m.after_cancel(move || tx.send(()).unwrap());
    /// m.disable();
    /// assert_eq!(rx.try_recv(), Ok(())); // ran on the disabling thread, before `disable` returned
    /// ```
    pub fn after_cancel(&self, f: impl FnOnce() + Send + 'static) -> crate::AfterCancel {
        self.shared.base.after_cancel(f)
    }

    /// Calls `f` with the value bound to `q` (borrowed for the call, pinned): the map's
    /// [`Session::get_with`](crate::Session::get_with).
    pub(crate) fn get_erased(&self, q: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) {
        // SAFETY: the node is alive while `guard` is (pinned).
        // SAFETY: also, `matches` is only called with live nodes of the chain.
        self.find(q.tag, |n| unsafe { n.matches(q) }, |n, guard| f(n.map(|n| unsafe { n.value(guard) })));
    }

    /// Binds an erased key to a shared value: the map's
    /// [`Session::with_value_dyn`](crate::Session::with_value_dyn).
    pub(crate) fn insert_erased(&self, key: DynKey, value: Arc<dyn Any + Send + Sync>) {
        let node = match key.key {
            Some(k) => NodeRef::new_rebindable(None, key.tag, F_VALUE, SharedKey(k), SharedValue::<true, _>(value)),
            None => NodeRef::new_rebindable(None, key.tag, F_VALUE, TypedKey, SharedValue::<true, _>(value)),
        };
        self.publish(node, |_| true);
    }

    /// Whether both handles are the same map.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// let m = SessionMap::new();
    /// assert!(m.ptr_eq(&m.clone()) && !m.ptr_eq(&SessionMap::new()));
    /// ```
    #[must_use]
    pub fn ptr_eq(&self, other: &SessionMap) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Default for SessionMap {
    fn default() -> Self {
        SessionMap::new()
    }
}

impl<K, V> FromIterator<(K, V)> for SessionMap
where
    K: Eq + Hash + Any + Send + Sync + Clone,
    V: Any + Send + Sync,
{
    /// Go `NewSessionMap(m)`.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let map = SessionMap::new();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

impl fmt::Debug for SessionMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionMap").field("valid", &self.is_valid()).field("len", &self.len()).finish()
    }
}

/// Loom models only: pins and flushes the epoch a few times, so that deferred functions run and
/// a compaction's grave ripens inside a model (`core/tests/loom.rs`).
#[cfg(localsession_loom)]
#[doc(hidden)]
pub fn loom_collect() {
    for _ in 0..3 {
        epoch::pin().flush();
    }
}

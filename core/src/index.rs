//! Index tables: the levelled hash tables that let a lookup skip over a deep chain.
//!
//! Every `SEGMENT`-th value node of a chain (see [`node`](crate::node)) carries an index table:
//! an open-addressing hash table of every distinct key at or below it (newest binding wins).
//! [`Table`] explains the layout and its levels; [`find_by`](Table::find_by) is the table half of a
//! lookup (the bloom-filter walk above the nearest table is the node half, `node::lookup`).
//! This module also holds the other walks that need a chain's *distinct* bindings:
//! [`for_each_binding_unordered`] (`SessionMap` compaction, from the tables), [`for_each_binding`]
//! (the same by walking the chain, where no table covers it) and [`live_len`] (`SessionMap::len`).
//!
//! # Layering
//!
//! The tables sit *below* the node storage: `node` builds a table when it links a node, and
//! frees it with the node. So that this module does not name the node types back, everything
//! here is generic over [`ChainNode`], the handful of header reads and key comparisons a table
//! needs; `node::NodePtr` is its one implementation (so the generic code is compiled once, as
//! the concrete code was).

use core::ptr;

use alloc::boxed::Box;
use alloc::vec::Vec;

/// What the tables need to know about a node of the chain they index: a non-owning pointer to
/// a node, with the node's tag, flags, parent and key comparisons.
///
/// # Safety
/// `to_entry` and `from_entry` round-trip (a table stores nodes as `*const ()` and gives them
/// back through `from_entry`); `from_entry` is only called with a pointer `to_entry` made.
/// Every method that reads the node may be called only while the node is alive, which the
/// `unsafe` functions of this module require of their callers.
pub(crate) unsafe trait ChainNode: Copy + Eq {
    /// The pointer a table entry stores.
    fn to_entry(self) -> *const ();

    /// The node back from a table entry.
    ///
    /// # Safety
    /// `entry` is non-null and was made by [`to_entry`](ChainNode::to_entry).
    unsafe fn from_entry(entry: *const ()) -> Self;

    /// The key's tag (0 for non-value nodes).
    ///
    /// # Safety
    /// The node is alive.
    unsafe fn tag(self) -> u64;

    /// Whether the node binds a key (or removes one: a tombstone).
    ///
    /// # Safety
    /// The node is alive.
    unsafe fn is_value(self) -> bool;

    /// Whether the binding removes its key.
    ///
    /// # Safety
    /// The node is alive.
    unsafe fn is_tombstone(self) -> bool;

    /// Whether lookups from above stop at this node (a `SessionMap`'s base).
    ///
    /// # Safety
    /// The node is alive.
    unsafe fn is_barrier(self) -> bool;

    /// The nearest index table at or below the node, or null.
    ///
    /// # Safety
    /// The node is alive.
    unsafe fn table(self) -> *const Entry;

    /// Whether `table` was built for this node (and is freed with it).
    ///
    /// # Safety
    /// The node is alive.
    unsafe fn owns_table(self, table: *const Entry) -> bool;

    /// The parent node, if any.
    ///
    /// # Safety
    /// The node is alive.
    unsafe fn parent(self) -> Option<Self>;

    /// Whether `self` and `other` bind the same key.
    ///
    /// # Safety
    /// Both are live value nodes.
    unsafe fn same_key(self, other: Self) -> bool;
}

/// Spreads a key tag over all 64 bits (Fibonacci hashing): the home slots of the tables take
/// its top bits, and the nodes' bloom filters its top five.
#[inline]
pub(crate) fn mix(tag: u64) -> u64 {
    tag.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Calls `f` with the newest binding of every key at or below `top` and above `stop` (tombstones
/// included), newest first. Allocates the set of keys seen; used by `SessionMap` compaction (when
/// no index table covers the chain) and `len` (the same), never by reads.
///
/// Linear in the chain's length: the keys seen are a short list while there are few, then a
/// hash set by key tag (an earlier linear scan made compaction, and so every insert into a large
/// map, quadratic in its size).
///
/// # Safety
/// `top` is alive while this runs.
pub(crate) unsafe fn for_each_binding<N: ChainNode>(top: N, stop: Option<N>, mut f: impl FnMut(N)) {
    /// Distinct keys kept in a plain list before switching to the hash set.
    const LINEAR: usize = 32;
    // Sized for the whole linear phase at once: growing it 4 -> 8 -> 16 -> 32 was three
    // allocations and copies per compaction of a small map (4% of its inserts' instructions).
    let mut seen: Vec<N> = Vec::with_capacity(LINEAR + 1);
    // Past the linear phase: the first key seen with each tag, and in `collided` the keys whose
    // tag an earlier, different key already had (two keys with one tag: rare, unless a key
    // type's `Hash` is degenerate). One entry per key, no allocation per key (a `Vec` per tag
    // was 10^5 allocations in each compaction of a 10^5-key map).
    let mut by_tag: Option<hashbrown::HashMap<u64, N>> = None;
    let mut collided: Vec<N> = Vec::new();
    let mut node = Some(top);
    // SAFETY: every node reached is an ancestor of `top`, so alive.
    unsafe {
        while let Some(n) = node {
            if Some(n) == stop {
                return;
            }
            if n.is_value() {
                let tag = n.tag();
                let fresh = match &mut by_tag {
                    Some(set) => match set.entry(tag) {
                        hashbrown::hash_map::Entry::Vacant(slot) => {
                            slot.insert(n);
                            true
                        }
                        hashbrown::hash_map::Entry::Occupied(first) => {
                            let fresh =
                                !first.get().same_key(n) && !collided.iter().any(|&s| s.tag() == tag && s.same_key(n));
                            if fresh {
                                collided.push(n);
                            }
                            fresh
                        }
                    },
                    None => {
                        let fresh = !seen.iter().any(|s| s.same_key(n));
                        if fresh {
                            seen.push(n);
                            if seen.len() > LINEAR {
                                let mut set: hashbrown::HashMap<u64, N> = hashbrown::HashMap::new();
                                for s in seen.drain(..) {
                                    if let hashbrown::hash_map::Entry::Vacant(slot) = set.entry(s.tag()) {
                                        slot.insert(s);
                                    } else {
                                        collided.push(s);
                                    }
                                }
                                by_tag = Some(set);
                            }
                        }
                        fresh
                    }
                };
                if fresh {
                    f(n);
                }
            }
            node = n.parent();
        }
    }
}

/// Calls `f` with the newest binding of every key at or below `top` and above `stop` (tombstones
/// included), like [`for_each_binding`] but in no particular order, read from `top`'s index
/// tables where it has them: the at most `SEGMENT` nodes above the table's owner, then every
/// level's entries, each skipped when a newer level (or a node above) binds its key.
///
/// This is compaction's walk. A chain holds up to three nodes per live key (compaction runs
/// when the writes since the last one reach twice the live keys), and walking it is one
/// dependent cache miss per node: 25 of the 40 ms that one compaction of a 10^5-key map took.
/// The tables list the same bindings in arrays: a sequential scan, whose few node reads (to
/// compare keys where two levels hold the same tag) do not depend on each other and overlap.
///
/// Falls back to [`for_each_binding`] when `top` has no table, or when the walk down to the
/// table's owner meets `stop` or a barrier first (a table then does not cover the range).
///
/// # Safety
/// `top` is alive while this runs; `stop`, if given, is the barrier that ends `top`'s chain
/// (tables never reach below a barrier).
pub(crate) unsafe fn for_each_binding_unordered<N: ChainNode>(top: N, stop: Option<N>, mut f: impl FnMut(N)) {
    // SAFETY: `top` is alive.
    let table = unsafe { top.table() };
    if table.is_null() {
        // SAFETY: forwarded.
        return unsafe { for_each_binding(top, stop, f) };
    }
    // The distinct keys of the nodes above the table's owner, newest first, with their tags.
    let mut above: Few<(u64, N), SEGMENT_KEYS> = Few::new();
    let mut node = Some(top);
    // SAFETY: every node reached is an ancestor of `top`, so alive.
    unsafe {
        loop {
            let Some(n) = node else {
                // The chain ended without reaching the table's owner: not a layout tables make.
                return for_each_binding(top, stop, f);
            };
            if n.owns_table(table) {
                break;
            }
            if Some(n) == stop || n.is_barrier() {
                return for_each_binding(top, stop, f);
            }
            if n.is_value() {
                let tag = n.tag();
                if !above.any(|(t, a)| t == tag && a.same_key(n)) {
                    above.push((tag, n));
                }
            }
            node = n.parent();
        }
    }
    // Calls go out after the walk, which may still fall back to the full walk above.
    for (_, n) in above.iter() {
        f(n);
    }
    // A bitmap of the tags of the nodes above and of the levels scanned so far, sized at 16
    // bits per such binding (about 3% of the tags that are not in it hit a set bit). Most
    // entries of the large lower levels have no newer binding: one bit test, in a bitmap that
    // stays in the L2 cache, settles that for them instead of a probe of every newer table (up
    // to 37 000 keys in four tables at 10^5 keys): listing a 10^5-key map's bindings took
    // 5.2–7.1 ms with it, 6.3–8.0 ms without.
    let newer_total = above.len() + {
        // SAFETY: `table` (`top`'s) is live.
        unsafe { levels_above_last(table) }
    };
    let bits = newer_total.saturating_mul(16).next_power_of_two().max(64);
    let shift = 64 - bits.trailing_zeros();
    // A small map (one level, a few nodes above it) gets no bitmap: an empty one answers "maybe"
    // for every tag, and a compaction of a 10-key map allocates nothing for it.
    let mut bitmap: Vec<u64> = if bits > 64 { alloc::vec![0; bits / 64] } else { Vec::new() };
    let bit = |tag: u64| {
        let b = (mix(tag) >> shift) as usize;
        (b / 64, 1u64 << (b % 64))
    };
    if !bitmap.is_empty() {
        for (tag, _) in above.iter() {
            let (word, mask) = bit(tag);
            bitmap[word] |= mask;
        }
    }
    // Whether an equal tag in a newer level is the same key (the nodes above are not covered:
    // their keys are always compared).
    // SAFETY: `table` is live.
    let distinct = unsafe { Table::distinct_tags(table) };
    // The levels scanned so far (newer than the one being scanned).
    let mut newer: Few<*const Entry, 8> = Few::new();
    let mut level = table;
    // SAFETY: `table` is live (`top`'s), and so is each base below it (see [`Table`]); their
    // non-null entries were made by `to_entry` from live nodes of this chain.
    unsafe {
        while !level.is_null() {
            // The last level shadows nothing: its tags need no bits.
            let marking = !bitmap.is_empty() && !Table::base(level).is_null();
            Table::for_each_entry(level, |e| {
                let n = N::from_entry(e.node);
                let (word, mask) = bit(e.tag);
                // A bit set by an earlier entry of this same level (whose keys are distinct)
                // only sends this entry to the exact check below, which does not look at this
                // level: marking as we go gives the same answers as marking after the scan.
                let shadowed = bitmap.get(word).is_none_or(|w| w & mask != 0) && {
                    let same = |m: N| m.same_key(n);
                    // In the newer levels, with distinct tags, an equal tag is the same key.
                    let same_in_levels = |m: N| distinct || same(m);
                    above.any(|(t, a)| t == e.tag && same(a))
                        || newer.any(|t| Table::probe(t, e.tag, &same_in_levels).is_some())
                };
                if !shadowed {
                    f(n);
                }
                if marking {
                    bitmap[word] |= mask;
                }
            });
            newer.push(level);
            level = Table::base(level);
        }
    }
}

/// The entries of every level of `table` but the last (the bindings that can shadow another).
///
/// # Safety
/// `table` is a live table.
unsafe fn levels_above_last(mut table: *const Entry) -> usize {
    let mut n = 0;
    // SAFETY: a live table's bases are live.
    unsafe {
        while !Table::base(table).is_null() {
            n += Table::len(table);
            table = Table::base(table);
        }
    }
    n
}

/// A slot of an index table; the first [`HEAD`] slots of every table hold its header instead.
#[derive(Clone, Copy)]
pub(crate) struct Entry {
    tag: u64,
    node: *const (),
}

impl Entry {
    const EMPTY: Entry = Entry { tag: 0, node: ptr::null() };
}

/// Header slots at the start of a table: `[0].tag = mask << 32 | len`, `[0].node` = the next
/// level down (a table, or null); `[1].tag = live << 16 | flags << 8 | level`.
const HEAD: usize = 2;
/// Header flag: no two distinct keys in the table and its bases have the same tag (see
/// [`Table::distinct_tags`]).
const DISTINCT_TAGS: u64 = 1 << 8;
/// Distinct keys the top level holds before it is merged into the level below.
pub(crate) const LEVEL0: usize = 64;
/// Each level holds this many times the keys of the level above it.
const LEVEL_RATIO: usize = 8;

/// A tag's home slot in a table of `mask + 1` slots: the *top* bits of its mixed hash, so that
/// slot order is hash order at every table size. Merging a table into a larger one then writes
/// the larger table front to back (one sequential pass per merged table) instead of at random.
#[inline]
fn home(tag: u64, mask: usize) -> usize {
    // `mask + 1` is a power of two >= 16: shift by 64 - log2(mask + 1). `trailing_ones` of
    // `2^k - 1` is `k`, one bit-scan instruction on every x86-64; `count_ones` gives the same
    // `k` but compiles to a 20-instruction bit-twiddling sequence without the `popcnt` target
    // feature (12% of a 10-key map read's instructions).
    (mix(tag) >> (64 - mask.trailing_ones())) as usize
}

/// The most distinct keys a table of `level` holds before it is merged one level down.
fn level_capacity(level: u32) -> usize {
    LEVEL0.saturating_mul(LEVEL_RATIO.saturating_pow(level))
}

/// Index tables, in levels (a log-structured merge of persistent tables, the layout LSM trees
/// use for the same reason: a persistent index that must not be copied whole on every update).
///
/// A table is `[head, head, slot 0, .., slot mask]` in one allocation: open addressing with
/// linear probing at load factor <= 1/2, mapping key tags to the newest node binding the key.
/// A table may sit on a *base*: the table of the next level down, holding older bindings, which
/// the top table shadows. A lookup probes the top table, then each base in turn (at most
/// `log8(keys / 64) + 1` tables, so 3 at 10^4 keys and 5 at 10^5).
///
/// Every `SEGMENT` bindings a node gets a new top table: the segment's keys, plus the old top
/// table's entries if that was level 0. When level `l` would exceed [`level_capacity`]`(l)` keys
/// it is merged into level `l + 1` (which may cascade). Each binding is thus copied O(1) times
/// per level, `log8(n)` levels in all: a write costs O(log n) amortized instead of the O(n) of
/// copying one flat table, and small contexts (<= 64 keys) keep the single table they always had.
///
/// Every table also records the number of *live* keys (newest binding not a tombstone) in it and
/// its bases, so that `SessionMap::len` is O(1), and whether their keys have distinct tags
/// ([`distinct_tags`](Table::distinct_tags)): then a merge tells a re-binding from a hash
/// collision by the tags alone, without reading the two nodes, and a merge into the deepest
/// level it takes starts from a copy of that level's slots (slot order is hash order at every
/// size, so a copy is a valid table), on which the newer bindings are written, oldest level
/// first.
///
/// A table's base is owned by an ancestor of the node owning the table (it is the table of a
/// node at or below that node's parent), so it outlives every table built on it.
pub(crate) struct Table;

impl Table {
    /// # Safety
    /// `table` is a live table.
    #[inline]
    unsafe fn mask(table: *const Entry) -> usize {
        // SAFETY: forwarded; the first slot of a live table is its head.
        unsafe { ((*table).tag >> 32) as usize }
    }

    /// Entries in this level.
    ///
    /// # Safety
    /// `table` is a live table.
    #[inline]
    unsafe fn len(table: *const Entry) -> usize {
        // SAFETY: forwarded.
        unsafe { ((*table).tag & 0xffff_ffff) as usize }
    }

    /// The next level down, or null.
    ///
    /// # Safety
    /// `table` is a live table.
    #[inline]
    unsafe fn base(table: *const Entry) -> *const Entry {
        // SAFETY: forwarded.
        unsafe { (*table).node.cast::<Entry>() }
    }

    /// # Safety
    /// `table` is a live table.
    #[inline]
    unsafe fn level(table: *const Entry) -> u32 {
        // SAFETY: forwarded; the second slot is the rest of the head.
        unsafe { ((*table.add(1)).tag & 0xff) as u32 }
    }

    /// Whether no two distinct keys bound in `table` and its bases have the same tag (true for
    /// null). Then an equal tag *is* the same key, among the entries of these tables: merging
    /// levels, and compaction's test for a newer binding, compare tags only, and read no node.
    /// (Tags are 64-bit hashes: distinct keys share one only when a key type's `Hash` is
    /// degenerate, or under a deliberate collision.) A lookup still compares keys: the key it
    /// looks for need not be in the table.
    ///
    /// Kept by induction as tables are built: a table built from scratch records whether its
    /// fill met two distinct keys of one tag; a table built on `below` is distinct-tagged if
    /// `below` is, the segment's keys have distinct tags, and no segment key's lookup in `below`
    /// met an entry of its tag that is another key. (If that lookup found the key at some
    /// level, no *other* key of that tag can be anywhere in `below`, which is distinct-tagged;
    /// if it found nothing, it probed every level and compared every entry of that tag.)
    ///
    /// # Safety
    /// `table` is null or a live table.
    #[inline]
    unsafe fn distinct_tags(table: *const Entry) -> bool {
        // SAFETY: forwarded.
        table.is_null() || unsafe { (*table.add(1)).tag & DISTINCT_TAGS != 0 }
    }

    /// Live keys in this table and its bases; 0 for null.
    ///
    /// # Safety
    /// `table` is null or a live table.
    #[inline]
    pub(crate) unsafe fn live(table: *const Entry) -> usize {
        if table.is_null() {
            return 0;
        }
        // SAFETY: forwarded.
        unsafe { ((*table.add(1)).tag >> 16) as usize }
    }

    /// `(slots, entries)` of one level (for tests of the table sizes).
    ///
    /// # Safety
    /// `table` is a live table.
    #[cfg(test)]
    pub(crate) unsafe fn shape(table: *const Entry) -> (usize, usize) {
        // SAFETY: forwarded.
        unsafe { (Self::mask(table) + 1, Self::len(table)) }
    }

    /// Probes one level for a node whose tag is `tag` and that `matches`.
    ///
    /// # Safety
    /// `table` is a live table; `matches` may be called with any live node of the chain.
    #[inline]
    unsafe fn probe<N: ChainNode>(table: *const Entry, tag: u64, matches: &impl Fn(N) -> bool) -> Option<N> {
        // SAFETY: a live table has `mask + 1` slots after its head; its non-null entries were
        // made by `to_entry` from live nodes.
        unsafe {
            let mask = Self::mask(table);
            let slots = table.add(HEAD);
            let mut i = home(tag, mask);
            loop {
                let e = *slots.add(i);
                if e.node.is_null() {
                    return None;
                }
                let node = N::from_entry(e.node);
                if e.tag == tag && matches(node) {
                    return Some(node);
                }
                i = (i + 1) & mask;
            }
        }
    }

    /// The newest binding in `table` or its bases of a key whose tag is `tag` and whose node
    /// `matches` (which is only called with nodes of that tag): the table half of every
    /// lookup (`node::lookup_by`; the caller compares keys: a reader that knows its key type
    /// does so without indirect calls).
    ///
    /// # Safety
    /// `table` is null or a live table; `matches` may be called with any live node of the chain.
    #[inline]
    pub(crate) unsafe fn find_by<N: ChainNode>(
        table: *const Entry,
        tag: u64,
        matches: impl Fn(N) -> bool,
    ) -> Option<N> {
        // SAFETY: forwarded (the unused depth count compiles away).
        unsafe { Self::find_with_depth(table, tag, &matches).0 }
    }

    /// [`find_by`](Table::find_by), also returning the depth of the level that held the binding
    /// (0 for `table` itself; `usize::MAX` if none did).
    ///
    /// # Safety
    /// `table` is null or a live table; `matches` may be called with any live node of the chain.
    #[inline]
    unsafe fn find_with_depth<N: ChainNode>(
        mut table: *const Entry,
        tag: u64,
        matches: &impl Fn(N) -> bool,
    ) -> (Option<N>, usize) {
        let mut depth = 0;
        // SAFETY: forwarded; a live table's base is live (see [`Table`]).
        unsafe {
            while !table.is_null() {
                if let Some(node) = Self::probe(table, tag, matches) {
                    return (Some(node), depth);
                }
                table = Self::base(table);
                depth += 1;
            }
        }
        (None, usize::MAX)
    }

    /// Calls `f` with every non-null entry of one level, in slot order.
    ///
    /// # Safety
    /// `table` is a live table.
    #[inline]
    unsafe fn for_each_entry(table: *const Entry, mut f: impl FnMut(Entry)) {
        // SAFETY: a live table has `mask + 1` slots after its head.
        unsafe {
            let slots = table.add(HEAD);
            for i in 0..=Self::mask(table) {
                let e = *slots.add(i);
                if !e.node.is_null() {
                    f(e);
                }
            }
        }
    }

    /// Loads, for each of `keys`, its home slot in every level of `table`, and the node of that
    /// slot if its tag is the key's: the cache lines [`find_with_depth`](Table::find_with_depth)
    /// will read for them, requested all at once. Looked up one after another, each key waited
    /// for its own misses (in a large map: a slot of each large level, then the node found there
    /// to compare keys), which were a third of the table builds' time at 10^5 keys. Levels
    /// under [`WARM_MIN_SLOTS`] slots (64 KiB) are skipped: they are in the L1 or L2 cache
    /// already, and warming them only repeats the lookup's work.
    ///
    /// # Safety
    /// `table` is null or a live table; `keys` are live nodes of its chain.
    unsafe fn warm<N: ChainNode>(mut table: *const Entry, keys: &Few<N, SEGMENT_KEYS>) {
        /// The smallest level worth warming (every level under miri, so that it checks these
        /// reads with the small maps it runs).
        const WARM_MIN_SLOTS: usize = if cfg!(miri) { 16 } else { 4096 };
        // SAFETY: a live table has `mask + 1` slots after its head and live bases; its non-null
        // entries were made by `to_entry` from live nodes.
        unsafe {
            while !table.is_null() {
                let mask = Self::mask(table);
                if mask >= WARM_MIN_SLOTS - 1 {
                    let slots = table.add(HEAD);
                    for n in keys.iter() {
                        let tag = n.tag();
                        let e = *slots.add(home(tag, mask));
                        if e.tag == tag && !e.node.is_null() {
                            core::hint::black_box(N::from_entry(e.node).tag());
                        }
                    }
                }
                table = Self::base(table);
            }
        }
    }

    /// Builds the table for the fresh node `top`: the bindings of the last segment (from `top`
    /// down to the node owning `below`), merged with as many levels of `below` as the level
    /// capacities require.
    ///
    /// # Safety
    /// `top` is a fresh node linked above a live chain; `below` is the table of its parent.
    pub(crate) unsafe fn build<N: ChainNode>(top: N, below: *const Entry) -> *const Entry {
        // The segment's distinct keys, newest first, and the live count they make.
        // With each, the depth (0 = `below`) of the level of `below` holding its key, or
        // `usize::MAX`.
        //
        // Both lists live on the stack: a build runs every `SEGMENT` writes, and as heap lists
        // they were two of its three allocations (3.5% of a 10-key map insert's instructions).
        let mut segment: Few<N, SEGMENT_KEYS> = Few::new();
        // SAFETY: `top` and the chain below it are alive while we build.
        unsafe {
            let mut node = Some(top);
            while let Some(n) = node {
                if n.is_value() && !segment.any(|f| f.same_key(n)) {
                    segment.push(n);
                }
                if n.owns_table(below) || n.is_barrier() {
                    break;
                }
                node = n.parent();
            }
            Self::warm(below, &segment);
        }
        let mut fresh: Few<(N, usize), SEGMENT_KEYS> = Few::new();
        // SAFETY: `below` is null or live; the segment's nodes are live.
        let mut live = unsafe { Self::live(below) };
        // Whether the new table keeps `below`'s distinct tags (see `distinct_tags`): the
        // segment's keys have distinct tags, and their lookups meet no other key of their tag.
        // SAFETY: as above.
        let mut distinct = unsafe {
            Self::distinct_tags(below)
                && segment.iter().enumerate().all(|(i, n)| segment.iter().take(i).all(|m| m.tag() != n.tag()))
        };
        for n in segment.iter() {
            // A lookup calls its `matches` with the entries of the key's tag only.
            let clash = core::cell::Cell::new(false);
            let matches = |p: N| {
                // SAFETY: `p` and `n` are live nodes of this chain.
                let same = unsafe { p.same_key(n) };
                clash.set(clash.get() | !same);
                same
            };
            // SAFETY: `n` is a live node of this chain; `below` is null or live.
            unsafe {
                let (prev, depth) = Self::find_with_depth::<N>(below, n.tag(), &matches);
                distinct &= !clash.get();
                fresh.push((n, depth));
                let was = prev.is_some_and(|p| !p.is_tombstone());
                match (was, !n.is_tombstone()) {
                    (false, true) => live += 1,
                    (true, false) => live -= 1,
                    _ => {}
                }
            }
        }
        // Which levels of `below` merge into the new table, and the new table's level.
        let mut merged: Few<*const Entry, 8> = Few::new();
        let mut size = fresh.len();
        let mut level = 0u32;
        let mut rest = below;
        // SAFETY: `below` and its bases are live.
        unsafe {
            while !rest.is_null() {
                let rest_level = Self::level(rest);
                if rest_level > level {
                    if size <= level_capacity(level) {
                        break; // `rest` stays below as its own level
                    }
                    level += 1;
                    continue;
                }
                merged.push(rest);
                size += Self::len(rest);
                level = level.max(rest_level);
                while size > level_capacity(level) {
                    level += 1;
                }
                rest = Self::base(rest);
            }
        }
        // The segment's keys already in a merged table are counted twice in `size`: the table
        // would be sized for up to twice its keys, and the allocator's behaviour changes at
        // 1 KiB (glibc serves larger requests only after consolidating its fast bins, which
        // showed as 7% of a 10-key map's inserts). The merged tables are the top levels of
        // `below`, so a fresh key is in one of them iff its lookup above hit at a shallower depth.
        let dups = fresh.iter().filter(|&(_, depth)| depth < merged.len()).count();
        let keys = size - dups;
        // With trusted tags, the new table starts as a copy of the deepest merged level (the
        // largest), and the newer bindings are written over it, oldest first, each replacing
        // its key's entry. This replaces re-inserting every entry of the largest level (10^5
        // probes at 10^5 keys, 4-6 ms) by one copy of its slot array (1.3-2.3 ms for the
        // whole merge). Taken when the copy is no larger than the table sized for `keys` (an
        // upper bound: it counts a key once per merged level holding it) and the newer entries
        // cannot fill it; if they take it past load 1/2, it is doubled afterwards. Sized for
        // `keys` instead, a steady 10^5-key map's largest level had 2^19 slots (8 MiB) where
        // 2^18 hold it, and every read there probed the larger table.
        let deepest = merged.iter_rev().next().filter(|&t| {
            // SAFETY: the merged tables are live.
            distinct
                && unsafe {
                    let slots = Self::mask(t) + 1;
                    let newer_entries = fresh.len() + merged.iter_rev().skip(1).map(|u| Self::len(u)).sum::<usize>();
                    slots <= Filling::slots_for(keys) && Self::len(t) + newer_entries < slots
                }
        });
        // SAFETY: the merged tables are live; each has `mask + 1` slots after its head, whose
        // non-null entries were made by `to_entry` from live nodes of this chain; the fresh
        // nodes are live nodes of this chain.
        unsafe {
            if let Some(deepest) = deepest {
                let mut table = Filling::copy_of(deepest, distinct);
                for t in merged.iter_rev().skip(1) {
                    Self::for_each_entry(t, |e| table.replace(e.tag, e.node));
                }
                // The segment's keys are distinct: their order does not matter.
                for (n, _) in fresh.iter() {
                    table.replace(n.tag(), n.to_entry());
                }
                if table.len * 2 > table.mask + 1 {
                    table.double();
                }
                return table.finish(rest, live, level, distinct);
            }
            let mut table = Filling::with_capacity(keys, distinct);
            for (n, _) in fresh.iter() {
                table.insert(n.tag(), n);
            }
            for t in merged.iter() {
                // The tag comes from the entry, so that the node itself is only read (a cache
                // miss, at random) when another entry has the same tag and tags are not trusted.
                Self::for_each_entry(t, |e| {
                    table.insert(e.tag, N::from_entry(e.node));
                });
            }
            table.finish(rest, live, level, distinct)
        }
    }

    /// One table of every binding from `top` down to the nearest barrier (or the chain's end),
    /// with no base: see `NodeRef::index_chain`.
    ///
    /// # Safety
    /// `top` and the chain below it are alive while this runs.
    pub(crate) unsafe fn build_bulk<N: ChainNode>(top: N) -> *const Entry {
        let mut nodes: Vec<N> = Vec::new();
        // SAFETY: forwarded; every node reached is an ancestor of `top`.
        unsafe {
            let mut node = Some(top);
            while let Some(n) = node {
                if n.is_value() {
                    nodes.push(n);
                }
                if n.is_barrier() {
                    break;
                }
                node = n.parent();
            }
        }
        let mut level = 0;
        while nodes.len() > level_capacity(level) {
            level += 1;
        }
        let mut table = Filling::with_capacity(nodes.len(), false);
        let mut live = 0usize;
        for n in nodes {
            // SAFETY: `n` is a live node of this chain.
            if unsafe { table.insert(n.tag(), n) } {
                // SAFETY: as above.
                live += usize::from(!unsafe { n.is_tombstone() });
            }
        }
        let distinct = !table.clashed;
        table.finish(ptr::null(), live, level, distinct)
    }

    /// # Safety
    /// `table` is a table built by [`Table::build`] that nothing uses any more.
    pub(crate) unsafe fn free(table: *const Entry) {
        // SAFETY: rebuilds the boxed slice `build` leaked: `mask + 1 + HEAD` entries. The base
        // is not ours (an ancestor's table).
        unsafe {
            let slice = ptr::slice_from_raw_parts_mut(table.cast_mut(), Self::mask(table) + 1 + HEAD);
            drop(Box::from_raw(slice));
        }
    }
}

/// Keys a segment binds, at most, when its table is built (the node module's `SEGMENT`;
/// checked there). More would spill to the heap.
pub(crate) const SEGMENT_KEYS: usize = 8;

/// A short list on the stack that spills to the heap past `C` items: the scratch lists of
/// [`Table::build`] (a segment's keys, the levels it merges), which are short but not bounded
/// by the type system.
struct Few<T: Copy, const C: usize> {
    inline: [Option<T>; C],
    len: usize,
    spill: Vec<T>,
}

impl<T: Copy, const C: usize> Few<T, C> {
    fn new() -> Self {
        Few { inline: [None; C], len: 0, spill: Vec::new() }
    }

    fn push(&mut self, item: T) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = Some(item),
            None => self.spill.push(item),
        }
        self.len += 1;
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Whether `f` holds for any item. A plain loop over the inline part: the `iter` chain
    /// below, once the compiler stopped inlining it into `Table::build` (when `same_key` grew
    /// its inline-key fast path), cost more than the comparisons it saved.
    #[inline]
    fn any(&self, mut f: impl FnMut(T) -> bool) -> bool {
        for item in self.inline[..self.len.min(C)].iter().flatten() {
            if f(*item) {
                return true;
            }
        }
        self.spill.iter().any(|item| f(*item))
    }

    /// The items in the order pushed.
    fn iter(&self) -> impl Iterator<Item = T> + '_ {
        self.inline.iter().flatten().copied().chain(self.spill.iter().copied())
    }

    /// The items, last pushed first.
    fn iter_rev(&self) -> impl Iterator<Item = T> + '_ {
        self.spill.iter().rev().copied().chain(self.inline.iter().rev().flatten().copied())
    }
}

/// A table being filled: open addressing with linear probing at load factor <= 1/2, newest
/// binding first (later inserts of a key already in are skipped). Shared by [`Table::build`] and
/// [`Table::build_bulk`].
struct Filling {
    slots: Vec<Entry>,
    mask: usize,
    len: usize,
    /// Whether an equal tag means the same key (the keys filled in are known to have distinct
    /// tags: see [`Table::distinct_tags`]), so that no node is read to compare keys.
    trust_tags: bool,
    /// Whether two distinct keys of one tag were filled in (only noticed without `trust_tags`).
    clashed: bool,
}

impl Filling {
    /// The slots a table for `keys` distinct keys has (load factor <= 1/2).
    fn slots_for(keys: usize) -> usize {
        (keys * 2).next_power_of_two().max(16)
    }

    /// Room for `keys` distinct keys; `trust_tags` as the field.
    fn with_capacity(keys: usize, trust_tags: bool) -> Filling {
        let cap = Self::slots_for(keys);
        Filling { slots: alloc::vec![Entry::EMPTY; cap + HEAD], mask: cap - 1, len: 0, trust_tags, clashed: false }
    }

    /// A copy of the level `table` (its entries; the head is written by `finish`), to be
    /// updated with newer bindings by [`replace`](Filling::replace).
    ///
    /// # Safety
    /// `table` is a live table.
    unsafe fn copy_of(table: *const Entry, trust_tags: bool) -> Filling {
        // SAFETY: a live table is `mask + 1 + HEAD` initialized entries.
        let (slots, mask, len) = unsafe {
            let mask = Table::mask(table);
            (core::slice::from_raw_parts(table, mask + 1 + HEAD).to_vec(), mask, Table::len(table))
        };
        Filling { slots, mask, len, trust_tags, clashed: false }
    }

    /// Doubles the slots, keeping every entry (whose keys are distinct).
    fn double(&mut self) {
        debug_assert!(self.trust_tags);
        let old = core::mem::replace(self, Filling::with_capacity(self.mask + 1, true));
        for e in &old.slots[HEAD..] {
            if !e.node.is_null() {
                self.replace(e.tag, e.node);
            }
        }
    }

    /// Writes a binding newer than every entry already in: over the entry of its tag if there
    /// is one, else into the first free slot. Only for tables whose tags are trusted (an equal
    /// tag is the same key).
    fn replace(&mut self, tag: u64, node: *const ()) {
        debug_assert!(self.trust_tags);
        let mut i = home(tag, self.mask);
        loop {
            let e = &mut self.slots[i + HEAD];
            if e.node.is_null() || e.tag == tag {
                self.len += usize::from(e.node.is_null());
                *e = Entry { tag, node };
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Inserts `node` (whose tag is `tag`) unless a binding of the same key is already in;
    /// returns whether it was inserted.
    ///
    /// # Safety
    /// `node` and every node already in the table are live nodes of one chain; `tag` is
    /// `node`'s tag; with `trust_tags`, no two distinct keys among them have the same tag.
    unsafe fn insert<N: ChainNode>(&mut self, tag: u64, node: N) -> bool {
        let mut i = home(tag, self.mask);
        loop {
            let e = self.slots[i + HEAD];
            if e.node.is_null() {
                self.slots[i + HEAD] = Entry { tag, node: node.to_entry() };
                self.len += 1;
                return true;
            }
            if e.tag == tag {
                // SAFETY: non-null entries were made by `to_entry` from live nodes (the
                // caller's guarantee), and so is `node`.
                if self.trust_tags || unsafe { N::from_entry(e.node).same_key(node) } {
                    return false; // a newer binding of the same key is already in
                }
                self.clashed = true;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Writes the head (`base`: the next level down, or null; `distinct`: whether the table
    /// and its bases have distinct tags) and leaks the table.
    fn finish(mut self, base: *const Entry, live: usize, level: u32, distinct: bool) -> *const Entry {
        debug_assert!(self.mask <= u32::MAX as usize && self.len <= u32::MAX as usize && level < 256);
        debug_assert!(!(distinct && self.clashed));
        debug_assert!(self.len * 2 <= self.mask + 1, "load factor over 1/2");
        let flags = if distinct { DISTINCT_TAGS } else { 0 };
        self.slots[0] = Entry { tag: ((self.mask as u64) << 32) | self.len as u64, node: base.cast::<()>() };
        self.slots[1] = Entry { tag: ((live as u64) << 16) | flags | u64::from(level), node: ptr::null() };
        let boxed: Box<[Entry]> = self.slots.into_boxed_slice();
        Box::into_raw(boxed).cast::<Entry>().cast_const()
    }
}

/// The number of keys whose newest binding at or below `top` (and above `stop`) is not a
/// tombstone: O(1) when `top` is indexed (the live count of its table, corrected for the at most
/// `SEGMENT` bindings above that table), a walk otherwise.
///
/// # Safety
/// `top` is alive while this runs; `stop` is null or an ancestor of `top` under which no table
/// reaches (a barrier, such as a `SessionMap`'s base).
pub(crate) unsafe fn live_len<N: ChainNode>(top: N, stop: Option<N>) -> usize {
    // SAFETY: forwarded; every node reached is `top` or an ancestor.
    unsafe {
        let table = top.table();
        if table.is_null() {
            let mut n = 0;
            for_each_binding(top, stop, |b: N| n += usize::from(!b.is_tombstone()));
            return n;
        }
        let mut live = Table::live(table);
        let mut seen: Vec<N> = Vec::new();
        let mut node = Some(top);
        while let Some(n) = node {
            if n.owns_table(table) || Some(n) == stop {
                break;
            }
            if n.is_value() && !seen.iter().any(|s| s.same_key(n)) {
                seen.push(n);
                let was = Table::find_by::<N>(table, n.tag(), |p| p.same_key(n)).is_some_and(|p| !p.is_tombstone());
                match (was, !n.is_tombstone()) {
                    (false, true) => live += 1,
                    (true, false) => live -= 1,
                    _ => {}
                }
            }
            node = n.parent();
        }
        live
    }
}

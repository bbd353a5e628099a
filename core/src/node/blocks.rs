//! A per-thread cache of freed value-node blocks (with the `std` feature).
//!
//! A `SessionMap` frees its nodes in bursts and allocates them in another rhythm: a compaction
//! allocates a node per live key at once, and the old chains go back a batch at a time once their
//! grace period is over. glibc's per-thread cache holds 7 blocks of a size; every other block goes
//! through its shared bins, and its requests of 1 KiB or more (index tables) first consolidate its
//! fast bins. At 1 000 keys that was a quarter of an insert's instructions (callgrind, `ops
//! p5_insert_1000`: 2 117 per insert, 1 471 with `GLIBC_TUNABLES=glibc.malloc.tcache_count=4000`).
//! So a value node's block, once the node's contents are dropped, is kept here for the thread's
//! next node of the same layout, up to [`CAP`] blocks in all and [`CLASSES`] layouts (the
//! pattern of an allocator's thread cache — glibc's tcache, mimalloc's free lists — kept by the
//! one client that knows its sizes and rhythm).
//!
//! Blocks are plain memory from the global allocator, allocated for some `ValueNode<K, V>` of
//! exactly that layout: a node of another type with the same layout may take it (the allocator
//! only requires that a block be freed with the layout it was allocated with, which it is — by
//! whoever holds it last, with that same layout). A thread keeps at most [`CAP`] blocks (256 KiB
//! of 64-byte nodes) and frees them when it exits; during its thread-local teardown nothing is
//! cached. Without `std` (no thread-locals) and under loom every block goes back to the
//! allocator at once.

use core::alloc::Layout;
use core::ptr::NonNull;

/// The most blocks one thread keeps: a compaction cycle of a 1 000-key map frees about 3 000
/// nodes (two writes' worth per key plus the previous compacted chain); with 1 024 the cache
/// saved nothing there (callgrind: 2 017 instructions per insert against 2 117 without it and
/// 1 577 with 4 096).
#[cfg_attr(not(all(feature = "std", not(localsession_loom))), allow(dead_code))]
pub(super) const CAP: usize = 4096;

/// The most node layouts one thread keeps blocks of (a map's nodes have one layout per key
/// type; a context's per value type).
#[cfg_attr(not(all(feature = "std", not(localsession_loom))), allow(dead_code))]
pub(super) const CLASSES: usize = 4;

#[cfg(all(feature = "std", not(localsession_loom)))]
mod cache {
    extern crate std;

    use core::alloc::Layout;
    use core::cell::RefCell;
    use core::ptr::NonNull;

    use alloc::vec::Vec;

    use super::{CAP, CLASSES};

    /// A layout no node has (nodes start with a non-empty header): marks a free class.
    const UNCLAIMED: Layout = Layout::new::<()>();

    /// One thread's blocks, by layout.
    struct Blocks {
        classes: [(Layout, Vec<NonNull<u8>>); CLASSES],
        total: usize,
    }

    impl Drop for Blocks {
        fn drop(&mut self) {
            for (layout, blocks) in &mut self.classes {
                for block in blocks.drain(..) {
                    // SAFETY: every cached block was allocated by the global allocator with its
                    // class's layout and is owned by this cache alone.
                    unsafe { alloc::alloc::dealloc(block.as_ptr(), *layout) };
                }
            }
        }
    }

    std::thread_local! {
        static BLOCKS: RefCell<Blocks> = const {
            RefCell::new(Blocks {
                classes: [
                    (UNCLAIMED, Vec::new()),
                    (UNCLAIMED, Vec::new()),
                    (UNCLAIMED, Vec::new()),
                    (UNCLAIMED, Vec::new()),
                ],
                total: 0,
            })
        };
    }

    #[inline]
    pub(in crate::node) fn take(layout: Layout) -> Option<NonNull<u8>> {
        BLOCKS
            .try_with(|b| {
                let mut b = b.try_borrow_mut().ok()?;
                let (_, blocks) = b.classes.iter_mut().find(|(l, _)| *l == layout)?;
                let block = blocks.pop()?;
                b.total -= 1;
                Some(block)
            })
            .ok()
            .flatten()
    }

    /// # Safety
    /// As [`keep`](super::keep).
    #[inline]
    pub(in crate::node) unsafe fn keep(block: NonNull<u8>, layout: Layout) -> bool {
        BLOCKS
            .try_with(|b| {
                let Ok(mut b) = b.try_borrow_mut() else { return false };
                if b.total >= CAP {
                    return false;
                }
                // The layout's class, or a class holding no block (claimed for this layout).
                let class = match b.classes.iter().position(|(l, _)| *l == layout) {
                    Some(i) => i,
                    None => match b.classes.iter().position(|(_, blocks)| blocks.is_empty()) {
                        Some(i) => i,
                        None => return false,
                    },
                };
                let (l, blocks) = &mut b.classes[class];
                *l = layout;
                // Growing the list may fail only by aborting (out of memory), never by
                // unwinding out of a node's reclamation.
                blocks.push(block);
                b.total += 1;
                true
            })
            .unwrap_or(false)
    }

    #[cfg(test)]
    pub(in crate::node) fn cached() -> usize {
        BLOCKS.try_with(|b| b.borrow().total).unwrap_or(0)
    }
}

#[cfg(not(all(feature = "std", not(localsession_loom))))]
mod cache {
    use core::alloc::Layout;
    use core::ptr::NonNull;

    #[inline]
    pub(in crate::node) fn take(_: Layout) -> Option<NonNull<u8>> {
        None
    }

    /// # Safety
    /// As [`keep`](super::keep).
    #[inline]
    pub(in crate::node) unsafe fn keep(_: NonNull<u8>, _: Layout) -> bool {
        false
    }

    #[cfg(test)]
    pub(in crate::node) fn cached() -> usize {
        0
    }
}

/// A block of exactly `layout` that this thread cached, if it has one. The block is owned by
/// the caller: uninitialized memory from the global allocator, to be freed with `layout`.
#[inline]
pub(super) fn take(layout: Layout) -> Option<NonNull<u8>> {
    cache::take(layout)
}

/// Offers this thread's cache a block of `layout` whose contents are dropped (or were never
/// written). Returns `false` if it was not kept: the caller then frees it.
///
/// # Safety
/// The block was allocated by the global allocator with `layout` and is owned by the caller:
/// nothing reads or frees it after this call unless it returned `false`.
#[inline]
pub(super) unsafe fn keep(block: NonNull<u8>, layout: Layout) -> bool {
    // SAFETY: forwarded.
    unsafe { cache::keep(block, layout) }
}

/// How many blocks this thread keeps (tests).
#[cfg(test)]
pub(super) fn cached() -> usize {
    cache::cached()
}

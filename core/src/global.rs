//! Set-once, process-wide registration of a `&'static` value (the global store, the clocks).
//!
//! The three-state protocol of `log::set_logger` and tracing-core's `set_global_default`:
//! `UNINIT -> INITIALIZING` by compare-and-swap (only one caller wins), the winner writes the
//! value, then `INITIALIZING -> SET` with `Release`; readers load the state with `Acquire` and
//! read the value only in state `SET`, after which it never changes. A loser of the race gets an
//! error, never a silent no-op. `core` atomics are used directly: a `static` needs a `const`
//! initializer, which loom's atomics lack, and the protocol has no interleaving left to explore
//! once the compare-and-swap decides the single writer.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, Ordering};

const UNINIT: u8 = 0;
const INITIALIZING: u8 = 1;
const SET: u8 = 2;

pub(crate) struct Global<T: ?Sized + 'static> {
    state: AtomicU8,
    value: UnsafeCell<Option<&'static T>>,
}

// SAFETY: `value` is written once, by the single winner of the `UNINIT -> INITIALIZING`
// exchange, before the `Release` store of `SET`; it is read only after an `Acquire` load sees
// `SET`. `&'static T` is shared across threads, so `T: Sync` is required.
unsafe impl<T: ?Sized + Sync + 'static> Sync for Global<T> {}

impl<T: ?Sized + Sync + 'static> Global<T> {
    pub(crate) const fn new() -> Self {
        Global { state: AtomicU8::new(UNINIT), value: UnsafeCell::new(None) }
    }

    /// Sets the value; fails if it was set (or is being set) already.
    pub(crate) fn set(&self, value: &'static T) -> Result<(), ()> {
        // Acquire/Relaxed: the winner only needs exclusivity; publication is the Release below.
        match self.state.compare_exchange(UNINIT, INITIALIZING, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => {
                // SAFETY: we won the exchange, so nobody else writes, and nobody reads before SET.
                unsafe { *self.value.get() = Some(value) };
                // Release: publishes the write above to every reader that sees SET.
                self.state.store(SET, Ordering::Release);
                Ok(())
            }
            Err(_) => Err(()),
        }
    }

    #[inline]
    pub(crate) fn get(&self) -> Option<&'static T> {
        // Acquire: pairs with the Release store of SET, so the value write is visible.
        if self.state.load(Ordering::Acquire) == SET {
            // SAFETY: SET is final and the value was written before it.
            unsafe { *self.value.get() }
        } else {
            None
        }
    }
}

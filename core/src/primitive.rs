//! The one place that chooses between real and model-checked synchronization primitives.
//!
//! Follows crossbeam-epoch's `primitive` module: under `--cfg localsession_loom` every atomic,
//! `UnsafeCell` and lock the crate's protocols use comes from `loom`, so the loom models in
//! `tests/loom.rs` explore their interleavings; otherwise they are `core`'s atomics and `spin`'s
//! lock. Nothing outside this module names `core::sync::atomic` directly.
//!
//! Crossbeam-epoch itself is switched with `--cfg crossbeam_loom` (and its `loom` feature, which
//! this crate enables under the same cfg), so that epoch pinning is modelled too. The epoch entry
//! points used by the crate live in [`epoch`].

#[cfg(localsession_loom)]
pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};

#[cfg(not(localsession_loom))]
pub(crate) use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};

/// `UnsafeCell` with loom's closure-based access API, so that loom can check that no access
/// races with another. Outside loom the closures compile down to plain pointer use.
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(
    #[cfg(localsession_loom)] loom::cell::UnsafeCell<T>,
    #[cfg(not(localsession_loom))] core::cell::UnsafeCell<T>,
);

impl<T> UnsafeCell<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(localsession_loom)]
        {
            Self(loom::cell::UnsafeCell::new(value))
        }
        #[cfg(not(localsession_loom))]
        {
            Self(core::cell::UnsafeCell::new(value))
        }
    }

    /// Shared access to the contents.
    ///
    /// # Safety
    /// No mutable access may happen while `f` runs.
    #[inline]
    pub(crate) unsafe fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        #[cfg(localsession_loom)]
        {
            self.0.with(f)
        }
        #[cfg(not(localsession_loom))]
        {
            f(self.0.get())
        }
    }

    /// Exclusive access to the contents.
    ///
    /// # Safety
    /// No other access may happen while `f` runs.
    #[inline]
    pub(crate) unsafe fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        #[cfg(localsession_loom)]
        {
            self.0.with_mut(f)
        }
        #[cfg(not(localsession_loom))]
        {
            f(self.0.get())
        }
    }
}

/// A mutual-exclusion lock for short critical sections that never run user code.
///
/// `spin::Mutex` normally (the core has no OS to park on); `loom::sync::Mutex` under loom, which
/// loom can schedule around (a spinning lock would never yield to loom's scheduler).
#[derive(Debug)]
pub(crate) struct Mutex<T>(
    #[cfg(localsession_loom)] loom::sync::Mutex<T>,
    #[cfg(not(localsession_loom))] spin::Mutex<T>,
);

#[cfg(localsession_loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;
#[cfg(not(localsession_loom))]
pub(crate) type MutexGuard<'a, T> = spin::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(localsession_loom)]
        {
            Self(loom::sync::Mutex::new(value))
        }
        #[cfg(not(localsession_loom))]
        {
            Self(spin::Mutex::new(value))
        }
    }

    #[inline]
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        #[cfg(localsession_loom)]
        {
            // A poisoned loom mutex only means a model thread panicked; the model reports that.
            self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
        }
        #[cfg(not(localsession_loom))]
        {
            self.0.lock()
        }
    }
}

/// Epoch-based reclamation entry points (crossbeam-epoch).
///
/// Which collector a reader pins depends on the build:
/// - under loom, a per-model collector and a per-model-thread handle (crossbeam-epoch's own
///   `default.rs` does the same under loom);
/// - with the `std` feature, crossbeam-epoch's default collector and its thread-local handle;
/// - in `no_std`, a process-wide [`Collector`](crossbeam_epoch::Collector) owned by this crate
///   ([`collector`]); the global [`ContextStore`](crate::ContextStore) can hand out a guard from
///   a handle its execution unit registered ([`ContextStore::pin_epoch`](crate::ContextStore::pin_epoch)),
///   and without one a handle is registered for the duration of the read.
pub(crate) mod epoch {
    pub(crate) use crossbeam_epoch::Guard;

    #[cfg(localsession_loom)]
    loom::lazy_static! {
        static ref COLLECTOR: crossbeam_epoch::Collector = crossbeam_epoch::Collector::new();
    }
    #[cfg(localsession_loom)]
    loom::thread_local! {
        static HANDLE: crossbeam_epoch::LocalHandle = COLLECTOR.register();
    }

    /// Pins the current execution unit.
    #[inline]
    pub(crate) fn pin() -> Guard {
        #[cfg(localsession_loom)]
        {
            HANDLE.with(|h| h.pin())
        }
        #[cfg(all(not(localsession_loom), feature = "std"))]
        {
            crossbeam_epoch::pin()
        }
        #[cfg(all(not(localsession_loom), not(feature = "std")))]
        {
            // An `EpochGuard` is always pinned in `collector()`, the collector writers defer
            // to: a store cannot hand out a guard of another collector.
            if let Some(guard) = crate::store::global_store().and_then(|s| s.pin_epoch()) {
                return guard.into_inner();
            }
            // No handle available from the execution unit: register one for this read. The
            // handle is released when the guard is dropped (crossbeam keeps the participant
            // alive until then).
            crate::store::collector().register().pin()
        }
    }
}

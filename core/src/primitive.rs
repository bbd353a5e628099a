//! The loom/std switch: the atomics, cells, locks and epoch pinning the crate's protocols use.
//!
//! Follows crossbeam-epoch's `primitive` module: under `--cfg localsession_loom` every atomic,
//! `UnsafeCell` and lock the crate's protocols use comes from `loom`, so the loom models in
//! `tests/loom.rs` explore their interleavings; otherwise they are `core`'s atomics and `spin`'s
//! lock. (Two deliberate exceptions use `core`'s atomics directly, and say why: the set-once
//! statics of [`global`](crate::global) and the node reference counts of
//! [`node`](crate::node).)
//!
//! Crossbeam-epoch itself is switched with `--cfg crossbeam_loom` (and its `loom` feature, which
//! this crate enables under the same cfg), so that epoch pinning is modelled too. The epoch entry
//! points used by the crate, and the crate's collector, live in [`epoch`].
//!
//! This module sits at the bottom of the crate's module graph: it imports nothing from the
//! crate but the set-once cell of [`global`](crate::global) (see `docs/architecture.md`,
//! "Module layering").

#[cfg(localsession_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};

#[cfg(not(localsession_loom))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};

/// One step of a wait loop on an atomic that another thread will change soon (the wait for a
/// cancel's propagation in [`scope`](mod@crate::scope)): lets the awaited thread run.
///
/// Under loom, `loom::thread::yield_now`, which tells loom's scheduler that this thread cannot
/// progress until another one does (a loop without it would never end in a model); with the
/// `std` feature, `std::thread::yield_now`, so a waiter on a busy machine gives its core to the
/// thread it waits for; in `no_std`, `core::hint::spin_loop` (there is no scheduler to yield to).
#[inline]
pub(crate) fn spin_wait() {
    #[cfg(localsession_loom)]
    {
        loom::thread::yield_now();
    }
    #[cfg(all(not(localsession_loom), feature = "std"))]
    {
        extern crate std;
        std::thread::yield_now();
    }
    #[cfg(all(not(localsession_loom), not(feature = "std")))]
    {
        core::hint::spin_loop();
    }
}

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

/// A mutual-exclusion lock for short critical sections that never run user code — or, taken
/// only with [`try_lock`](Mutex::try_lock), for a section that may run user code but that
/// nobody ever waits for (a reentrant attempt fails instead of deadlocking).
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

    /// The lock if it is free now; `None` if anybody (this thread included) holds it.
    #[inline]
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        #[cfg(localsession_loom)]
        {
            match self.0.try_lock() {
                Ok(guard) => Some(guard),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }
        #[cfg(not(localsession_loom))]
        {
            self.0.try_lock()
        }
    }
}

/// Epoch-based reclamation entry points (crossbeam-epoch): the crate's collector, and how a
/// `SessionMap` read pins it.
///
/// Which collector a reader pins depends on the build:
/// - under loom, a per-model collector and a per-model-thread handle (crossbeam-epoch's own
///   `default.rs` does the same under loom);
/// - with the `std` feature, crossbeam-epoch's default collector and its thread-local handle;
/// - in `no_std`, a process-wide [`Collector`](crossbeam_epoch::Collector) owned by this crate
///   ([`collector`]). The execution unit may have a handle registered already: the global
///   [`ContextStore`](crate::ContextStore) can hand out a guard pinned from it
///   ([`ContextStore::pin_epoch`](crate::ContextStore::pin_epoch)). This module cannot name the
///   store (the store sits above the sessions, which sit above this module), so the store module
///   registers a *pin source* here ([`set_pin_source`]) before the store becomes visible;
///   without a source, or when it has no guard, a handle is registered for the duration of the
///   read.
pub(crate) mod epoch {
    pub(crate) use crossbeam_epoch::{Collector, Guard};

    /// Asks the execution unit for a guard pinned in [`collector`] (see [`set_pin_source`]).
    pub(crate) type PinSource = fn() -> Option<Guard>;

    #[cfg(localsession_loom)]
    loom::lazy_static! {
        static ref COLLECTOR: crossbeam_epoch::Collector = crossbeam_epoch::Collector::new();
    }
    #[cfg(localsession_loom)]
    loom::thread_local! {
        static HANDLE: crossbeam_epoch::LocalHandle = COLLECTOR.register();
    }

    #[cfg(all(not(localsession_loom), not(feature = "std")))]
    static PIN_SOURCE: crate::global::Global<PinSource> = crate::global::Global::new();

    /// The collector `SessionMap` writers defer reclamation to and readers pin: crossbeam-epoch's
    /// default collector with the `std` feature, otherwise one owned by this crate.
    pub(crate) fn collector() -> &'static Collector {
        #[cfg(feature = "std")]
        {
            crossbeam_epoch::default_collector()
        }
        #[cfg(not(feature = "std"))]
        {
            static COLLECTOR: spin::Once<Collector> = spin::Once::new();
            COLLECTOR.call_once(Collector::new)
        }
    }

    /// Registers where `no_std` reads get their guard from (the first registration wins; the
    /// store module registers one function, so later calls change nothing). Every guard the
    /// source returns must be pinned in [`collector`]: the store's source only returns the
    /// inner guard of an `EpochGuard`, which can only be pinned from an `EpochHandle` of
    /// [`collector`]. Does nothing where reads do not use a source (`std`, loom).
    pub(crate) fn set_pin_source(source: &'static PinSource) {
        #[cfg(all(not(localsession_loom), not(feature = "std")))]
        {
            // A failed `set` means a source is registered already (it is the same function).
            let _ = PIN_SOURCE.set(source);
        }
        #[cfg(any(localsession_loom, feature = "std"))]
        {
            let _ = source;
        }
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
            if let Some(guard) = PIN_SOURCE.get().and_then(|source| source()) {
                return guard;
            }
            // No handle available from the execution unit: register one for this read. The
            // handle is released when the guard is dropped (crossbeam keeps the participant
            // alive until then).
            collector().register().pin()
        }
    }
}

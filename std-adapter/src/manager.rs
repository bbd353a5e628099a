//! The default manager: Go's `InitDefaultManager`, `ResetDefaultManager` and
//! `DefaultManagerOptions`, over the thread-local store.
//!
//! In Go the default manager is a sharded map from goroutine id to session, swept by a GC
//! goroutine, because Go has no goroutine-local storage and cannot tell when a goroutine ends.
//! Rust threads have thread-local storage that is freed when the thread exits, so the default
//! manager here is the [`ThreadStore`](crate::ThreadStore): reads are a thread-local access,
//! nothing leaks when a thread ends, and nothing needs sweeping. The options are still parsed,
//! validated and kept (including from `CLOUDWEGO_SESSION_CONFIG_KEY`):
//! - `shard_number` and `gc_interval` configure [`ShardedManager`](crate::ShardedManager)s
//!   made with [`ShardedManager::from_default_options`](crate::ShardedManager::from_default_options),
//!   for executors that key sessions by task id;
//! - `implicit_transmit` is read by `localsession_tokio::runtime_builder` /
//!   `apply_manager_options`, which install the implicit-mode task hooks (and sweep ended
//!   sessions every `gc_interval`), or fail if tokio's hooks are unavailable; std threads have no
//!   spawn hook, so [`go`](crate::go) is the way to hand a session to a new thread.
//!
//! As in Go, a session stays bound — and visible to `current()` — after it is disabled, until it
//! is unbound or replaced; check [`is_valid`](localsession_core::AnySession::is_valid).

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{PoisonError, RwLock};

use localsession_core::config::{ConfigError, ENV_KEY, ManagerOptions};
use localsession_core::{ContextStore, global_store, registered_clock, set_global_clock, set_global_store};

use crate::clock::STD_CLOCK;
use crate::store::{THREAD_STORE, bump_generation};

const UNINIT: u8 = 0;
const INITIALIZING: u8 = 1;
const INITIALIZED: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
static OPTIONS: RwLock<Option<ManagerOptions>> = RwLock::new(None);

/// Go's `DefaultManagerOptions()`: 100 shards, GC every 10 minutes, no implicit transmission.
///
/// # Examples
/// ```
/// let opts = localsession_std::default_manager_options();
/// assert_eq!(opts.shard_number, 100);
/// assert!(!opts.implicit_transmit);
/// ```
#[must_use]
pub fn default_manager_options() -> ManagerOptions {
    ManagerOptions::default()
}

/// Initializes the default manager (Go `InitDefaultManager`): registers the thread-local store
/// and the std clock process-wide, and records `opts`, overridden field by field by the
/// `CLOUDWEGO_SESSION_CONFIG_KEY` environment variable (format `[implicit][,shards][,gc]`, e.g.
/// `true,10,1h`).
///
/// # Errors
/// - [`InitError::AlreadyInitialized`] on a second call (Go silently does nothing; use
///   [`reset_default_manager`] to replace the manager on purpose);
/// - [`InitError::Env`] if the variable is malformed — naming the field and the value (Go
///   silently ignores it) — and [`InitError::Options`] if `opts` itself is invalid;
/// - [`InitError::ForeignStore`] if another store was registered as the process-wide default.
///
/// # Examples
/// ```
/// use localsession_std::{init_default_manager, default_manager_options, InitError};
/// init_default_manager(default_manager_options()).unwrap();
/// assert!(matches!(init_default_manager(default_manager_options()), Err(InitError::AlreadyInitialized)));
/// ```
pub fn init_default_manager(opts: ManagerOptions) -> Result<(), InitError> {
    let opts = resolve(opts)?;
    // Acquire (both ways): only one caller proceeds, and one that sees `INITIALIZED` sees what
    // the winner published before its Release store below.
    while let Err(state) = STATE.compare_exchange(UNINIT, INITIALIZING, Ordering::Acquire, Ordering::Acquire) {
        if state == INITIALIZED {
            return Err(InitError::AlreadyInitialized);
        }
        // Another thread is initializing: wait for it, so that `AlreadyInitialized` means the
        // store and the clock are registered (a caller may use `with_timeout` right after).
        // If it fails, it resets the state and this caller tries.
        std::thread::yield_now();
    }
    let registered = register_globals();
    if let Err(e) = registered {
        STATE.store(UNINIT, Ordering::Release);
        return Err(e);
    }
    *OPTIONS.write().unwrap_or_else(PoisonError::into_inner) = Some(opts);
    STATE.store(INITIALIZED, Ordering::Release);
    Ok(())
}

/// Get-or-init: initializes the default manager with `opts` (as [`init_default_manager`]) unless
/// it already is, in which case the options it runs with stay (see [`manager_options`]). For
/// libraries, tests and `main`s that may each be the first to need the manager.
///
/// # Errors
/// As [`init_default_manager`], except that an initialized manager is not an error.
///
/// # Examples
/// ```
/// use localsession_std::{default_manager_options, ensure_default_manager};
/// ensure_default_manager(default_manager_options()).unwrap();
/// ensure_default_manager(default_manager_options()).unwrap(); // already initialized: fine
/// ```
pub fn ensure_default_manager(opts: ManagerOptions) -> Result<(), InitError> {
    match init_default_manager(opts) {
        Ok(()) | Err(InitError::AlreadyInitialized) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Replaces the default manager (Go `ResetDefaultManager`): every session bound before the
/// call, on every thread, is unbound (each thread drops its stale binding the next time it
/// reads or binds; `enter` guards and future wrappers opened before the reset do not restore
/// the old bindings when they end), and `opts` (with the environment override) become the
/// options. Safe while
/// other threads call `current()`/`bind()`: a racing bind lands before or after the reset,
/// never half-way. Initializes the manager if it was not.
///
/// # Errors
/// [`InitError::Env`] / [`InitError::Options`] for invalid options (nothing changes then), and
/// [`InitError::ForeignStore`] as for [`init_default_manager`].
///
/// # Examples
/// ```
/// use localsession_core::{Context, SessionCtx};
/// use localsession_std::{bind, current, reset_default_manager, ManagerOptions};
///
/// bind(SessionCtx::new(&Context::background())).unwrap();
/// reset_default_manager(ManagerOptions { shard_number: 10, ..Default::default() }).unwrap();
/// assert!(current().is_none());
/// assert_eq!(localsession_std::manager_options().unwrap().shard_number, 10);
/// ```
pub fn reset_default_manager(opts: ManagerOptions) -> Result<(), InitError> {
    let opts = resolve(opts)?;
    register_globals()?;
    // Before the bump: a hook clears what an executor keeps outside the slots (the tokio
    // adapter's task table); a unit that read such a record before the hook and installs it
    // after the bump gets it stamped with the old generation (`ThreadStore::enter_unit`).
    crate::store::run_reset_hooks();
    bump_generation();
    // And after it: a record written between the first run and the bump (a scope of a hooked
    // task closing then, whose exchange could not yet see the reset, restoring a pre-reset
    // session into its task's record) is cleared too. An exchange that read the generation
    // before the bump and records after this second run takes its record back itself
    // (`exchange_slow`).
    crate::store::run_reset_hooks();
    *OPTIONS.write().unwrap_or_else(PoisonError::into_inner) = Some(opts);
    STATE.store(INITIALIZED, Ordering::Release);
    Ok(())
}

/// The options of the default manager, once it is initialized.
///
/// # Examples
/// ```
/// assert!(localsession_std::manager_options().is_none()); // not initialized in this doctest
/// ```
#[must_use]
pub fn manager_options() -> Option<ManagerOptions> {
    *OPTIONS.read().unwrap_or_else(PoisonError::into_inner)
}

fn resolve(opts: ManagerOptions) -> Result<ManagerOptions, InitError> {
    opts.validate().map_err(InitError::Options)?;
    match std::env::var(ENV_KEY) {
        Ok(value) => ManagerOptions::parse_env(&value, opts).map_err(InitError::Env),
        Err(std::env::VarError::NotPresent) => Ok(opts),
        Err(std::env::VarError::NotUnicode(raw)) => Err(InitError::EnvNotUnicode(raw.to_string_lossy().into_owned())),
    }
}

/// Registers the thread store and the std clock as the process-wide defaults if nothing else
/// is registered; fails if another store is. An adapter's clock (tokio's, async-io's) or a
/// user's registered before stays.
pub(crate) fn register_globals() -> Result<(), InitError> {
    register_store()?;
    if registered_clock().is_none() {
        // Losing a race to another registration keeps the other clock: fine.
        let _ = set_global_clock(&STD_CLOCK);
    }
    Ok(())
}

/// Registers the thread store as the process-wide default store if none is; fails if another is.
pub(crate) fn register_store() -> Result<(), InitError> {
    let ours: &'static dyn ContextStore = &THREAD_STORE;
    if global_store().is_none() {
        // Losing a race to another registration is checked just below.
        let _ = set_global_store(ours);
    }
    match global_store() {
        Some(s) if std::ptr::addr_eq(s as *const dyn ContextStore, ours as *const dyn ContextStore) => Ok(()),
        _ => Err(InitError::ForeignStore),
    }
}

/// Registers `clock` as the process-wide clock for an adapter's init; fails if another clock
/// is registered already (deadlines would silently run on that one).
///
/// # Errors
/// [`InitError::ForeignClock`] if a different clock is registered.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use localsession_core::Clock;
/// use localsession_std::{register_adapter_clock, InitError, STD_CLOCK};
/// struct Other;
/// impl Clock for Other { fn now(&self) -> Duration { Duration::ZERO } }
/// static OTHER: Other = Other;
///
/// assert_eq!(register_adapter_clock(&STD_CLOCK), Ok(()));
/// assert_eq!(register_adapter_clock(&STD_CLOCK), Ok(())); // the same clock again is fine
/// assert_eq!(register_adapter_clock(&OTHER), Err(InitError::ForeignClock));
/// ```
#[doc(hidden)]
pub fn register_adapter_clock(clock: &'static dyn localsession_core::Clock) -> Result<(), InitError> {
    let _ = set_global_clock(clock);
    match registered_clock() {
        Some(c) if std::ptr::addr_eq(c as *const dyn localsession_core::Clock, clock as *const _) => Ok(()),
        _ => Err(InitError::ForeignClock),
    }
}

/// Why the default manager could not be initialized.
///
/// # Examples
/// ```
/// use localsession_core::{set_global_store, SingleSlotStore};
/// use localsession_std::{default_manager_options, init_default_manager, InitError, ManagerOptions};
///
/// let bad = ManagerOptions { shard_number: 0, ..Default::default() };
/// let err = init_default_manager(bad).unwrap_err();
/// assert!(matches!(err, InitError::Options(_)));
/// assert!(std::error::Error::source(&err).is_some()); // the `ConfigError`
///
/// static OTHER: SingleSlotStore = SingleSlotStore::new();
/// set_global_store(&OTHER).unwrap();
/// assert_eq!(init_default_manager(default_manager_options()), Err(InitError::ForeignStore));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitError {
    /// `init_default_manager` was called before.
    AlreadyInitialized,
    /// The options passed in are invalid.
    Options(ConfigError),
    /// `CLOUDWEGO_SESSION_CONFIG_KEY` is malformed.
    Env(ConfigError),
    /// `CLOUDWEGO_SESSION_CONFIG_KEY` is not valid Unicode (lossy rendering inside).
    EnvNotUnicode(String),
    /// Another store is registered as the process-wide default store.
    ForeignStore,
    /// An adapter's init found another clock registered as the process-wide clock (register
    /// yours after the adapter's init, or do not call both).
    ForeignClock,
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::AlreadyInitialized => f.write_str(
                "the default session manager is already initialized (use reset_default_manager to replace it)",
            ),
            InitError::Options(e) => write!(f, "invalid session manager options: {e}"),
            InitError::Env(e) => write!(f, "invalid {ENV_KEY} environment variable: {e}"),
            InitError::EnvNotUnicode(v) => write!(f, "invalid {ENV_KEY} environment variable: not Unicode: {v:?}"),
            InitError::ForeignClock => f.write_str(
                "another clock is registered as the process-wide clock, so this runtime's clock cannot be \
                 (deadlines would fire on the other one)",
            ),
            InitError::ForeignStore => f.write_str(
                "another context store is registered as the process-wide default, so the thread-local store cannot be registered",
            ),
        }
    }
}

impl std::error::Error for InitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InitError::Options(e) | InitError::Env(e) => Some(e),
            _ => None,
        }
    }
}

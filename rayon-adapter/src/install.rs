//! The scoped install every entry point of this crate uses: the core's `EnterGuard` on the
//! std thread store, with an optional session (a job may run with *no* session), and the
//! [`Bridges`] captured with it (features `tracing` / `opentelemetry`: the span where the work
//! was created, the session's OpenTelemetry context), entered inside the session's install.

use localsession_core::{AnySession, EnterGuard};
use localsession_std::{BridgeGuard, Bridges, THREAD_STORE};

/// Installs a session (or none) on the current thread for the guard's lifetime; on drop, puts
/// back exactly what the thread had bound before (also during unwinding), whatever the code in
/// between bound itself, unless the default manager was reset meanwhile. `!Send`, like the
/// guard it wraps: it must drop on the thread it was created on, which rayon guarantees for the
/// folders and jobs that hold one (a leaf job folds on one thread; a stolen job runs nested on
/// the stealing thread's stack, so installs nest last-in first-out).
pub(crate) struct Installed {
    // Dropped in declaration order: the bridges are exited before the session is restored.
    _bridges: BridgeGuard<'static>,
    _guard: EnterGuard,
}

impl Installed {
    #[inline]
    pub(crate) fn new(session: Option<AnySession>, bridges: Bridges) -> Installed {
        let guard = localsession_core::enter_option_in(&THREAD_STORE, session);
        Installed { _bridges: bridges.into_guard(), _guard: guard }
    }
}

//! The scoped install every entry point of this crate uses.

use std::marker::PhantomData;

use localsession_core::{AnySession, ContextStore};
use localsession_std::THREAD_STORE;

/// Installs a session (or none) on the current thread for the guard's lifetime; on drop, puts
/// back exactly what the thread had bound before (also during unwinding), whatever the code in
/// between bound itself. Unlike [`localsession_std::enter`], it can install "no session", which
/// an isolated job needs.
///
/// `!Send`: it must be dropped on the thread it was created on, which rayon guarantees for the
/// folders and jobs that hold one (a leaf job folds on one thread; a stolen job runs nested on
/// the stealing thread's stack, so installs nest last-in first-out).
pub(crate) struct Installed {
    /// What the thread had before, `None` during thread teardown (then nothing was installed).
    previous: Option<AnySession>,
    /// The store's reset generation at install: a binding from before a reset does not come back.
    generation: u64,
    /// The scope token, `None` if nothing was installed (thread teardown).
    token: Option<u64>,
    _not_send: PhantomData<*const ()>,
}

impl Installed {
    #[inline]
    pub(crate) fn new(session: Option<AnySession>) -> Installed {
        let generation = THREAD_STORE.generation();
        let mut slot = session;
        let token = THREAD_STORE.enter_scope_in_place(&mut slot);
        let previous = if token.is_some() { slot } else { None };
        Installed { previous, generation, token, _not_send: PhantomData }
    }
}

impl Drop for Installed {
    #[inline]
    fn drop(&mut self) {
        if let Some(token) = self.token {
            let mut restored = self.previous.take();
            if THREAD_STORE.generation() != self.generation {
                restored = None;
            }
            THREAD_STORE.exit_scope_in_place(&mut restored, token);
            // What the scope ended with (our session, or what the job bound) is dropped here,
            // outside the slot.
            drop(restored);
        }
    }
}

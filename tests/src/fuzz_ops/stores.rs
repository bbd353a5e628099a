//! The store API: the global store through the free functions, and a [`SingleSlotStore`]
//! through [`ContextStore`] itself and the `_in` functions.
//!
//! Store 0 is a `SingleSlotStore` registered as the global store (when nothing else was
//! registered in the process first; otherwise its operations are skipped): `bind`, `unbind`,
//! `current`, `with_current`, `enter`, `scope`, and the backup functions (`meta`). Store 1 is
//! another `SingleSlotStore`, used through `replace`, `swap`, `with_current_in`, `enter_in` and
//! `enter_option_in`. Each keeps a model of its current session and of its live
//! [`EnterGuard`]s, which may be dropped in any order: dropping one restores the session it
//! replaced.

use localsession_core::{
    EnterGuard, SingleSlotStore, bind, current, enter, enter_in, enter_option_in, global_store, scope,
    set_global_store, unbind, with_current,
};

use super::{
    AnySession, CODES, ContextStore, Entry, Interp, catch_fuzz, custom, pick, read_session, same_session, want,
    with_current_in,
};

static GLOBAL: SingleSlotStore = SingleSlotStore::new();
pub(super) static SLOT_STORE: SingleSlotStore = SingleSlotStore::new();

/// Registers [`GLOBAL`] (once); whether it is the global store.
pub(super) fn global_ours() -> bool {
    let _ = set_global_store(&GLOBAL);
    global_store().is_some_and(|s| core::ptr::addr_eq(s, &GLOBAL))
}

/// Store `i`.
pub(super) fn store(i: usize) -> &'static dyn ContextStore {
    if i == 0 { &GLOBAL } else { &SLOT_STORE }
}

/// Empties both stores (between runs).
pub(super) fn reset() {
    drop(GLOBAL.replace(None));
    drop(SLOT_STORE.replace(None));
}

#[derive(Default)]
struct StoreModel {
    current: Option<Entry>,
    /// Live guards and the session each replaced.
    guards: Vec<(EnterGuard, Option<Entry>)>,
}

#[derive(Default)]
pub(super) struct StoresModel {
    stores: [StoreModel; 2],
}

impl StoresModel {
    pub(super) fn current(&self, i: usize) -> Option<&Entry> {
        self.stores[i].current.as_ref()
    }
    pub(super) fn set_current(&mut self, i: usize, e: Option<Entry>) {
        self.stores[i].current = e;
    }
}

impl Interp {
    pub(super) fn check_stores(&self, what: &str) {
        for i in 0..2 {
            if i == 0 && !global_ours() {
                continue;
            }
            with_current_in(store(i), |cur| same_session(cur, self.stores.current(i), what));
        }
    }

    pub(super) fn store_op(&mut self, which: u8, kind: u8, s: u8) {
        let i = usize::from(which % 2);
        if i == 0 && !global_ours() {
            return;
        }
        let st = store(i);
        let entry = pick(s, self.sessions.len()).map(|j| self.sessions[j].clone());
        let model = &mut self.stores.stores[i];
        match kind % 8 {
            // Bind.
            0 => {
                let Some(e) = entry else { return };
                let prev = if i == 0 {
                    let prev = current();
                    bind(e.real.clone()).expect("a global store is registered");
                    prev
                } else {
                    st.replace(Some(e.real.clone())).expect("a single slot binds")
                };
                same_session(prev.as_ref(), model.current.as_ref(), "bind: previous session");
                model.current = Some(e);
            }
            // Unbind.
            1 => {
                let prev = if i == 0 { unbind() } else { st.replace(None).expect("a single slot binds") };
                same_session(prev.as_ref(), model.current.as_ref(), "unbind: previous session");
                model.current = None;
            }
            // Read, through every reader; a panicking read leaves the store as it was.
            2 => {
                let key = s % CODES;
                let cur = model.current.clone();
                if i == 0 {
                    same_session(current().as_ref(), cur.as_ref(), "current()");
                }
                let panics = cur.as_ref().is_some_and(|e| custom::read_panics(&e.model, key));
                let read = |c: Option<&AnySession>| c.map(|c| read_session(c, key));
                let got = catch_fuzz(|| if i == 0 { with_current(read) } else { with_current_in(st, read) });
                match (got, &cur) {
                    (Err(()), _) => assert!(panics, "a read of the current session panicked"),
                    (Ok(v), Some(e)) => {
                        assert!(!panics, "a panicking read returned");
                        assert_eq!(v, Some(want(self.values_of(&e.model), key)), "current key {key}");
                    }
                    (Ok(v), None) => assert_eq!(v, None, "no current session"),
                }
            }
            // Enter a session; enter nothing.
            3 | 4 => {
                let e = if kind % 8 == 3 {
                    let Some(e) = entry else { return };
                    Some(e)
                } else {
                    None
                };
                if model.guards.len() >= 8 {
                    return;
                }
                let guard = match (&e, i) {
                    (Some(e), 0) => enter(e.real.clone()),
                    (Some(e), _) => enter_in(st, e.real.clone()),
                    (None, _) => enter_option_in(st, None),
                };
                let prev = std::mem::replace(&mut model.current, e);
                model.guards.push((guard, prev));
            }
            // Drop a guard, in any order.
            5 => {
                let Some(g) = pick(s, model.guards.len()) else { return };
                let (guard, prev) = model.guards.remove(g);
                drop(guard);
                model.current = prev;
            }
            // A closure scope.
            6 => {
                let Some(e) = entry else { return };
                let inside = |what: &str| with_current_in(st, |cur| same_session(cur, Some(&e), what));
                if i == 0 {
                    scope(e.real.clone(), || inside("inside scope()"));
                } else {
                    let _guard = enter_in(st, e.real.clone());
                    inside("inside enter_in");
                }
            }
            // Swap in place.
            _ => {
                let mut slot = entry.as_ref().map(|e| e.real.clone());
                assert!(st.swap(&mut slot), "a single slot always swaps");
                same_session(slot.as_ref(), model.current.as_ref(), "swap: previous session");
                model.current = entry;
            }
        }
        self.check_stores("after a store operation");
    }

    /// Drops every guard, newest first, checking each restore; then empties the stores.
    pub(super) fn finish_stores(&mut self) {
        for i in 0..2 {
            while let Some((guard, prev)) = self.stores.stores[i].guards.pop() {
                drop(guard);
                self.stores.stores[i].current = prev;
                self.check_stores("after dropping a guard at the end");
            }
        }
    }
}

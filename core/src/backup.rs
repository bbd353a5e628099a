//! Context backup (Kitex `WithContextBackup`): recovering a lost context's metainfo from the session.
//!
//! The request's context is kept in the session, so that code which lost it (a callee handed
//! `Context::background()`, a spawned task) can recover its metainfo.
//!
//! A server backs each request's context up with [`backup_ctx`] when the request starts and
//! [`clear_ctx`] when it ends; a client about to send an RPC with context `cur` calls
//! [`recover_ctx_on_demands`], which consults the backup through a handler.

use crate::context::Context;
use crate::metainfo::MetaInfo;
use crate::session::{AnySession, SessionCtx};
use crate::store::{global_store, unbind};

/// Binds `SessionCtx::new(ctx)` to the running unit in the default store (Kitex `BackupCtx`).
/// Does nothing — and allocates nothing — when no store is registered.
///
/// # Examples
/// ```
/// use localsession_core::{backup_ctx, current, Context};
/// backup_ctx(&Context::background()); // no store in this doctest: a no-op
/// assert!(current().is_none());
/// ```
pub fn backup_ctx(ctx: &Context) {
    if let Some(store) = global_store() {
        drop(store.replace(Some(AnySession::Ctx(SessionCtx::new(ctx)))));
    }
}

/// Removes the backup of the running unit (Kitex `ClearCtx`).
///
/// # Examples
/// ```
/// use localsession_core::{backed_up_ctx, backup_ctx, clear_ctx, set_global_store, Context, SingleSlotStore};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// set_global_store(&STORE).unwrap();
///
/// backup_ctx(&Context::background()); // the request starts
/// assert!(backed_up_ctx().is_some());
/// clear_ctx(); // the request ends
/// assert!(backed_up_ctx().is_none());
/// clear_ctx(); // nothing bound: nothing to do
/// ```
pub fn clear_ctx() {
    drop(unbind());
}

/// The backed-up context of the running unit, if a valid one is bound (Kitex `CurCtx`).
///
/// # Examples
/// ```
/// assert!(localsession_core::backed_up_ctx().is_none());
/// ```
#[must_use]
pub fn backed_up_ctx() -> Option<Context> {
    crate::store::with_current(|s| s.filter(|s| s.is_valid()).and_then(AnySession::export))
}

/// Recovers what `cur` lacks from the backed-up context (Kitex `RecoverCtxOnDemands`).
///
/// Without a valid backup, returns `cur` unchanged. Otherwise calls `handler(prev, cur)`, where
/// `prev` is the backup, and gets `(ctx, backup)`:
/// - `backup == false`: `ctx` is returned as is (Go drops the handler's context here — a known
///   defect this port does not copy);
/// - `backup == true`: `prev`'s persistent metainfo is merged into `ctx` for the keys `ctx`
///   lacks — the current context wins, and transient values never merge.
///
/// # Examples
/// ```
/// use localsession_core::{recover_ctx_on_demands, scope, set_global_store, Context, MetaInfo, SessionCtx, SingleSlotStore};
/// static STORE: SingleSlotStore = SingleSlotStore::new();
/// set_global_store(&STORE).unwrap();
///
/// let request = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
/// let request = MetaInfo::with_transient(&request, "hop", "1");
/// localsession_core::backup_ctx(&request);
///
/// // Deep in the handler, a client is called with an empty context:
/// let out = recover_ctx_on_demands(&Context::background(), |_prev, cur| (cur.clone(), true));
/// assert_eq!(MetaInfo::of(&out).persistent("tenant"), Some("acme"));
/// assert_eq!(MetaInfo::of(&out).transient("hop"), None); // transient never merges
/// localsession_core::clear_ctx();
/// ```
pub fn recover_ctx_on_demands(cur: &Context, handler: impl FnOnce(&Context, &Context) -> (Context, bool)) -> Context {
    let Some(prev) = backed_up_ctx() else { return cur.clone() };
    let (ctx, backup) = handler(&prev, cur);
    if !backup {
        return ctx;
    }
    let prev_meta = MetaInfo::of(&prev);
    if prev_meta.count_persistent() == 0 {
        return ctx;
    }
    let cur_meta = MetaInfo::of(&ctx);
    let missing = prev_meta.persistent_values().filter(|(k, _)| cur_meta.persistent(k).is_none()).count();
    if missing == 0 {
        return ctx;
    }
    let mut merged = cur_meta.clone();
    for (k, v) in prev_meta.persistent_values() {
        if cur_meta.persistent(k).is_none() {
            merged.set_persistent(k, v);
        }
    }
    MetaInfo::attach(&ctx, merged)
}

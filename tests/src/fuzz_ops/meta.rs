//! [`MetaInfo`] values on pooled contexts, and the context backup in the global store.
//!
//! Every pooled context (and context session) carries a [`MetaModel`]: its persistent,
//! transient and upstream maps and, when [`MetaInfo::with_backward_values_to_send`] prepared
//! it, the backward cell it shares with every context derived from it. `check_ctx` compares
//! every reader of [`MetaInfo`] with it. `Backup` binds `SessionCtx::new(ctx)` in the global
//! store ([`backup_ctx`]) and pools that session; `BackupQuery` reads it back
//! ([`backed_up_ctx`]), merges it into a pooled context ([`recover_ctx_on_demands`], with four
//! handlers) or clears it ([`clear_ctx`]).

use std::cell::RefCell;
use std::rc::Rc;

use localsession_core::{MetaInfo, backed_up_ctx, backup_ctx, clear_ctx, recover_ctx_on_demands};

use super::{AnySession, Arc, BTreeMap, Context, CtxEntry, Entry, Interp, SessionModel, Values, pick, stores};

/// The metainfo a context should show.
#[derive(Debug, Clone, Default)]
pub(super) struct MetaModel {
    persistent: BTreeMap<String, String>,
    transient: BTreeMap<String, String>,
    upstream: BTreeMap<String, String>,
    backward: Option<Rc<RefCell<BTreeMap<String, String>>>>,
}

fn meta_key(k: u8) -> String {
    format!("k{}", k % 4)
}

fn pairs<'a>(it: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<(String, String)> {
    it.map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

fn model_pairs(m: &BTreeMap<String, String>) -> Vec<(String, String)> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Checks every reader of `ctx`'s metainfo against `m`.
pub(super) fn check_meta(ctx: &Context, m: &MetaModel, what: &str) {
    let meta = MetaInfo::of(ctx);
    for k in (0..4).map(meta_key).chain([String::from("absent")]) {
        assert_eq!(meta.persistent(&k), m.persistent.get(&k).map(String::as_str), "{what}: persistent {k}");
        let transient = m.transient.get(&k).or_else(|| m.upstream.get(&k)).map(String::as_str);
        assert_eq!(meta.transient(&k), transient, "{what}: transient {k}");
    }
    assert_eq!(pairs(meta.persistent_values()), model_pairs(&m.persistent), "{what}: persistent_values");
    assert_eq!(pairs(meta.outgoing_transient_values()), model_pairs(&m.transient), "{what}: outgoing");
    let mut transient = model_pairs(&m.transient);
    transient
        .extend(m.upstream.iter().filter(|(k, _)| !m.transient.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())));
    assert_eq!(pairs(meta.transient_values()), transient, "{what}: transient_values");
    assert_eq!(meta.count_persistent(), m.persistent.len(), "{what}: count_persistent");
    assert_eq!(meta.count_transient(), transient.len(), "{what}: count_transient");
    let empty = m.persistent.is_empty() && m.transient.is_empty() && m.upstream.is_empty();
    assert_eq!(meta.is_empty(), empty, "{what}: is_empty");
    assert_eq!(MetaInfo::has(ctx), !empty, "{what}: has");
    let forward = meta.transfer_forward();
    assert_eq!(pairs(forward.persistent_values()), model_pairs(&m.persistent), "{what}: forwarded persistent");
    assert_eq!(pairs(forward.transient_values()), model_pairs(&m.transient), "{what}: forwarded transient");
    assert_eq!(forward.outgoing_transient_values().count(), 0, "{what}: forwarded outgoing");
    let backward = m.backward.as_ref().map(|cell| model_pairs(&cell.borrow())).unwrap_or_default();
    assert_eq!(MetaInfo::backward_values_to_send(ctx), backward, "{what}: backward values");
}

impl Interp {
    /// The pooled context `b` picks, or the background when there is none (or `b` picks the
    /// slot after the last).
    fn meta_base(&self, b: u8) -> CtxEntry {
        match pick(b, self.ctxs.len() + 1).and_then(|i| self.ctxs.get(i)) {
            Some(c) => {
                CtxEntry { real: c.real.clone(), scope: c.scope, values: c.values.clone(), meta: c.meta.clone() }
            }
            None => {
                CtxEntry { real: Context::background(), scope: None, values: Values::new(), meta: MetaModel::default() }
            }
        }
    }

    pub(super) fn meta_op(&mut self, ctx: u8, kind: u8, k: u8, v: u8) {
        let base = self.meta_base(ctx);
        let (key, value) = (meta_key(k), format!("v{v}"));
        let mut meta = base.meta.clone();
        let real = match kind % 8 {
            0 => {
                meta.persistent.insert(key.clone(), value.clone());
                MetaInfo::with_persistent(&base.real, &key, &value)
            }
            1 => {
                meta.transient.insert(key.clone(), value.clone());
                MetaInfo::with_transient(&base.real, &key, &value)
            }
            2 => {
                meta.persistent.remove(&key);
                MetaInfo::without_persistent(&base.real, &key)
            }
            3 => {
                // What the next service receives.
                meta.upstream = std::mem::take(&mut meta.transient);
                MetaInfo::attach(&base.real, MetaInfo::of(&base.real).transfer_forward())
            }
            4 => {
                meta.persistent.clear();
                meta.transient.clear();
                meta.upstream.clear();
                MetaInfo::attach(&base.real, MetaInfo::default())
            }
            5 => {
                meta.backward = Some(Rc::default());
                MetaInfo::with_backward_values_to_send(&base.real)
            }
            6 => {
                let sent = MetaInfo::send_backward_value(&base.real, &key, &value);
                assert_eq!(sent, meta.backward.is_some(), "send_backward_value");
                if let Some(cell) = &meta.backward {
                    cell.borrow_mut().insert(key, value);
                }
                check_meta(&base.real, &meta, "after send_backward_value");
                return;
            }
            _ => {
                let mut m = MetaInfo::of(&base.real).clone();
                m.set_upstream(&key, &value);
                meta.upstream.insert(key, value);
                MetaInfo::attach(&base.real, m)
            }
        };
        check_meta(&base.real, &base.meta, "metainfo of the parent context");
        self.push_ctx(CtxEntry { real, scope: base.scope, values: base.values, meta });
    }

    /// `backup_ctx(ctx)`: the global store's session becomes a fresh `SessionCtx` over `ctx`.
    pub(super) fn backup(&mut self, ctx: u8) {
        if !stores::global_ours() {
            return;
        }
        let base = self.meta_base(ctx);
        backup_ctx(&base.real);
        let real = localsession_core::current().expect("backup_ctx binds a session");
        let scope = self.open_scope(base.scope, None);
        let model = SessionModel::Ctx { scope, values: base.values, big: Arc::default(), meta: base.meta };
        let ident = self.fresh_ident();
        let entry = Entry { real, model, ident };
        self.stores.set_current(0, Some(entry.clone()));
        self.push_session(entry);
        self.check_stores("after backup_ctx");
    }

    /// What `backed_up_ctx()` should return: the global session's export, when it is valid.
    fn backed_up_model(&self) -> Option<CtxEntry> {
        let e = self.stores.current(0)?;
        let scope = self.scope_of(&e.model);
        if self.done(Some(scope)) {
            return None;
        }
        let meta = match &e.model {
            SessionModel::Ctx { meta, .. } => meta.clone(),
            SessionModel::Map { .. } => MetaModel::default(),
            SessionModel::Custom { .. } => return None,
        };
        let (AnySession::Ctx(_) | AnySession::Map(_)) = &e.real else { return None };
        let real = e.real.export().expect("a built-in session");
        Some(CtxEntry { real, scope: Some(scope), values: self.values_of(&e.model).clone(), meta })
    }

    pub(super) fn backup_query(&mut self, kind: u8, ctx: u8, mode: u8) {
        if !stores::global_ours() {
            return;
        }
        match kind % 3 {
            0 => {
                let got = backed_up_ctx();
                let want = self.backed_up_model();
                assert_eq!(got.is_some(), want.is_some(), "backed_up_ctx is_some");
                if let (Some(real), Some(want)) = (got, want) {
                    self.push_ctx(CtxEntry { real, ..want });
                }
            }
            1 => {
                let cur = self.meta_base(ctx);
                let prev = self.backed_up_model();
                let mut called = false;
                let out = recover_ctx_on_demands(&cur.real, |p, c| {
                    called = true;
                    let prev = prev.as_ref().expect("the handler runs only with a valid backup");
                    check_meta(p, &prev.meta, "the handler's backup");
                    check_meta(c, &cur.meta, "the handler's current context");
                    match mode % 4 {
                        0 => (c.clone(), true),
                        1 => (c.clone(), false),
                        2 => (p.clone(), true),
                        _ => (MetaInfo::with_persistent(c, "k0", "handler"), true),
                    }
                });
                assert_eq!(called, prev.is_some(), "the handler runs iff there is a valid backup");
                let want = match prev {
                    None => cur,
                    Some(prev) => {
                        let (mut ctx, merge) = match mode % 4 {
                            0 => (cur, true),
                            1 => (cur, false),
                            2 => (prev.clone_model(), true),
                            _ => {
                                let mut c = cur;
                                c.meta.persistent.insert("k0".into(), "handler".into());
                                (c, true)
                            }
                        };
                        if merge {
                            for (k, v) in &prev.meta.persistent {
                                ctx.meta.persistent.entry(k.clone()).or_insert_with(|| v.clone());
                            }
                        }
                        ctx
                    }
                };
                self.push_ctx(CtxEntry { real: out, ..want });
            }
            _ => {
                clear_ctx();
                self.stores.set_current(0, None);
                self.check_stores("after clear_ctx");
            }
        }
    }
}

impl CtxEntry {
    /// The model half of an entry, with the same context (a clone).
    fn clone_model(&self) -> CtxEntry {
        CtxEntry { real: self.real.clone(), scope: self.scope, values: self.values.clone(), meta: self.meta.clone() }
    }
}

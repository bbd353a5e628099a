//! Model-based property tests for [`SessionCtx`] (arc-swap's `tests/random.rs` pattern).
//!
//! The model: every session has a validity scope and a map of values. `with_value` derives a
//! session in the *same* scope, `fork` opens a child scope, `SessionCtx::new(ctx)` opens a scope
//! under `ctx`'s nearest scope. A scope is invalid iff it or one of its ancestors was disabled
//! or cancelled (`disable` reaches the scope and every descendant, never an ancestor or a
//! sibling; cancelling a root context invalidates every session opened under it).

#![allow(missing_docs)]

use std::collections::BTreeMap;

use std::sync::Arc;

use localsession_core::{
    AnySession, CancelHandle, Context, ContextError, DynKey, Key, Session, SessionCtx, SessionExt,
};
use proptest::prelude::*;

static TYPED: Key<u32> = Key::new("typed");

/// Untyped keys are `u8`s below this.
const KEYS: u8 = 6;
/// A `u8` key that is never bound.
const MISSING: u8 = 100;
/// The key each root context binds (to its own index).
const ROOT_KEY: &str = "root";
/// Root contexts: 0 and 1 are independent, 2 is opened under 1.
const ROOTS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// `SessionCtx::new(&Context::background())`.
    New,
    /// `SessionCtx::new(&roots[root])`.
    NewUnder { root: usize },
    /// `s.with_value(key, value)`.
    WithValue { s: usize, key: u8, value: u32 },
    /// `Session::with_value_dyn` through `SessionExt::with_value` (the erased path stores use).
    WithValueDyn { s: usize, key: u8, value: u32 },
    /// `s.with(&TYPED, value)`.
    WithTyped { s: usize, value: u32 },
    /// `Session::with_value_dyn(DynKey::typed(&TYPED), value)`; with `wrong_type` the value is
    /// a `u64`, which is stored but reads as absent through `TYPED` (and shadows older values).
    WithTypedDyn { s: usize, value: u32, wrong_type: bool },
    /// `s.fork()`.
    Fork { s: usize },
    /// `s.disable()`, directly or through `AnySession::disable`.
    Disable { s: usize, via_any: bool },
    /// Cancels root context `root`.
    CancelRoot { root: usize },
    /// Drops a session.
    Drop { s: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let idx = || 0..64usize;
    prop_oneof![
        2 => Just(Op::New),
        2 => (0..ROOTS).prop_map(|root| Op::NewUnder { root }),
        4 => (idx(), 0..KEYS, any::<u32>()).prop_map(|(s, key, value)| Op::WithValue { s, key, value }),
        2 => (idx(), 0..KEYS, any::<u32>()).prop_map(|(s, key, value)| Op::WithValueDyn { s, key, value }),
        1 => (idx(), any::<u32>()).prop_map(|(s, value)| Op::WithTyped { s, value }),
        1 => (idx(), any::<u32>(), any::<bool>())
            .prop_map(|(s, value, wrong_type)| Op::WithTypedDyn { s, value, wrong_type }),
        3 => idx().prop_map(|s| Op::Fork { s }),
        2 => (idx(), any::<bool>()).prop_map(|(s, via_any)| Op::Disable { s, via_any }),
        1 => (0..ROOTS).prop_map(|root| Op::CancelRoot { root }),
        2 => idx().prop_map(|s| Op::Drop { s }),
    ]
}

#[derive(Debug, Clone)]
struct SessionModel {
    scope: usize,
    values: BTreeMap<u8, u32>,
    typed: Option<u32>,
    /// The value of `ROOT_KEY` in the wrapped context.
    root: Option<u32>,
}

#[derive(Debug, Default)]
struct Model {
    /// Per scope: itself, then its ancestors.
    scope_paths: Vec<Vec<usize>>,
    /// Per scope: disabled / cancelled explicitly.
    cancelled: Vec<bool>,
    sessions: Vec<SessionModel>,
}

impl Model {
    fn open_scope(&mut self, parent: Option<usize>) -> usize {
        let id = self.scope_paths.len();
        let mut path = vec![id];
        if let Some(p) = parent {
            path.extend_from_slice(&self.scope_paths[p]);
        }
        self.scope_paths.push(path);
        self.cancelled.push(false);
        id
    }

    fn invalid(&self, scope: usize) -> bool {
        self.scope_paths[scope].iter().any(|&s| self.cancelled[s])
    }

    /// Disables / cancels `scope`; `false` if it was invalid already.
    fn cancel(&mut self, scope: usize) -> bool {
        let was_invalid = self.invalid(scope);
        self.cancelled[scope] = true;
        !was_invalid
    }
}

struct Roots {
    ctxs: Vec<Context>,
    handles: Vec<CancelHandle>,
}

/// Roots 0 and 1 under the background context, root 2 under root 1; each binds `ROOT_KEY`.
/// Their scopes are model scopes 0, 1 and 2.
fn roots(model: &mut Model) -> Roots {
    let (c0, h0) = Context::background().with_value(ROOT_KEY, 0u32).with_cancel();
    let (c1, h1) = Context::background().with_value(ROOT_KEY, 1u32).with_cancel();
    let (c2, h2) = c1.with_value(ROOT_KEY, 2u32).with_cancel();
    let s0 = model.open_scope(None);
    let s1 = model.open_scope(None);
    let s2 = model.open_scope(Some(s1));
    assert_eq!((s0, s1, s2), (0, 1, 2));
    Roots { ctxs: vec![c0, c1, c2], handles: vec![h0, h1, h2] }
}

fn apply(op: &Op, roots: &Roots, real: &mut Vec<SessionCtx>, model: &mut Model) -> Result<(), TestCaseError> {
    let n = real.len();
    match *op {
        Op::New => {
            real.push(SessionCtx::new(&Context::background()));
            let scope = model.open_scope(None);
            model.sessions.push(SessionModel { scope, values: BTreeMap::new(), typed: None, root: None });
        }
        Op::NewUnder { root } => {
            real.push(SessionCtx::new(&roots.ctxs[root]));
            let scope = model.open_scope(Some(root));
            model.sessions.push(SessionModel { scope, values: BTreeMap::new(), typed: None, root: Some(root as u32) });
        }
        Op::WithValue { s, key, value } if n > 0 => {
            let i = s % n;
            real.push(real[i].with_value(key, value));
            let mut m = model.sessions[i].clone();
            m.values.insert(key, value);
            model.sessions.push(m);
        }
        Op::WithValueDyn { s, key, value } if n > 0 => {
            let i = s % n;
            let derived = SessionExt::with_value(&real[i], key, value);
            let Some(derived) = derived.as_ctx() else {
                return Err(TestCaseError::fail("with_value_dyn of a SessionCtx is not a SessionCtx"));
            };
            real.push(derived.clone());
            let mut m = model.sessions[i].clone();
            m.values.insert(key, value);
            model.sessions.push(m);
        }
        Op::WithTyped { s, value } if n > 0 => {
            let i = s % n;
            real.push(real[i].with(&TYPED, value));
            let mut m = model.sessions[i].clone();
            m.typed = Some(value);
            model.sessions.push(m);
        }
        Op::WithTypedDyn { s, value, wrong_type } if n > 0 => {
            let i = s % n;
            let boxed: Arc<dyn std::any::Any + Send + Sync> =
                if wrong_type { Arc::new(u64::from(value)) } else { Arc::new(value) };
            let derived = real[i].with_value_dyn(DynKey::typed(&TYPED), boxed);
            let Some(derived) = derived.as_ctx() else {
                return Err(TestCaseError::fail("with_value_dyn of a SessionCtx is not a SessionCtx"));
            };
            real.push(derived.clone());
            let mut m = model.sessions[i].clone();
            m.typed = (!wrong_type).then_some(value);
            model.sessions.push(m);
        }
        Op::Fork { s } if n > 0 => {
            let i = s % n;
            real.push(real[i].fork());
            let mut m = model.sessions[i].clone();
            m.scope = model.open_scope(Some(m.scope));
            model.sessions.push(m);
        }
        Op::Disable { s, via_any } if n > 0 => {
            let i = s % n;
            let got = if via_any { AnySession::from(real[i].clone()).disable() } else { real[i].disable() };
            let want = model.cancel(model.sessions[i].scope);
            prop_assert_eq!(got, want, "disable() return value");
        }
        Op::CancelRoot { root } => {
            let got = roots.handles[root].cancel();
            let want = model.cancel(root);
            prop_assert_eq!(got, want, "root cancel() return value");
        }
        Op::Drop { s } if n > 0 => {
            let i = s % n;
            drop(real.remove(i));
            model.sessions.remove(i);
        }
        _ => {}
    }
    Ok(())
}

fn check(roots: &Roots, real: &[SessionCtx], model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(real.len(), model.sessions.len());
    for (r, ctx) in roots.ctxs.iter().enumerate() {
        prop_assert_eq!(ctx.is_done(), model.invalid(r), "root {} is_done", r);
    }
    for (i, (s, m)) in real.iter().zip(&model.sessions).enumerate() {
        let invalid = model.invalid(m.scope);
        prop_assert_eq!(s.is_valid(), !invalid, "session {} is_valid", i);
        prop_assert_eq!(Session::is_valid(s), !invalid, "session {} Session::is_valid", i);
        prop_assert_eq!(s.err(), invalid.then_some(ContextError::Canceled), "session {} err", i);
        let exported = s.export();
        prop_assert_eq!(exported.is_done(), invalid, "session {} export().is_done", i);
        for k in 0..KEYS {
            let want = m.values.get(&k).copied();
            prop_assert_eq!(s.value::<u32, _>(&k).copied(), want, "session {} key {}", i, k);
            prop_assert_eq!(s.value_cloned::<u32, _>(&k), want, "session {} key {} via get_with", i, k);
            prop_assert_eq!(exported.value::<u32, _>(&k).copied(), want, "session {} export key {}", i, k);
            prop_assert_eq!(s.value::<u64, _>(&k), None, "session {} key {} as u64", i, k);
        }
        prop_assert_eq!(s.value::<u32, _>(&MISSING), None, "session {} missing key", i);
        prop_assert_eq!(s.get(&TYPED).copied(), m.typed, "session {} typed key", i);
        prop_assert_eq!(s.get_cloned(&TYPED), m.typed, "session {} typed key via get_with", i);
        prop_assert_eq!(s.value::<u32, _>(&ROOT_KEY).copied(), m.root, "session {} root key", i);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    /// Random derivations, forks, disables and root cancellations: every session agrees with
    /// the model after every operation.
    #[test]
    fn session_ctx_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut model = Model::default();
        let roots = roots(&mut model);
        let mut real = Vec::new();
        apply(&Op::New, &roots, &mut real, &mut model)?;
        apply(&Op::NewUnder { root: 2 }, &roots, &mut real, &mut model)?;
        check(&roots, &real, &model)?;
        for op in &ops {
            apply(op, &roots, &mut real, &mut model)?;
            check(&roots, &real, &model)?;
        }
    }

    /// The seed program's rule: sessions derived from one another with `with_value` share one
    /// scope, so disabling any of them disables all of them (and every fork taken from any of
    /// them), while a fork's own `disable` and unrelated sessions are left alone.
    #[test]
    fn with_value_family_shares_one_scope(
        derivations in prop::collection::vec((0..64usize, 0..KEYS, any::<u32>()), 0..30),
        fork_points in prop::collection::vec(0..64usize, 0..6),
        victim in 0..64usize,
        under_root in any::<bool>(),
    ) {
        let (root, _root_handle) = Context::background().with_cancel();
        let background = Context::background();
        let base = SessionCtx::new(if under_root { &root } else { &background });
        let mut family = vec![base];
        for &(parent, k, v) in &derivations {
            let p = parent % family.len();
            let derived = family[p].with_value(k, v);
            family.push(derived);
        }
        let forks: Vec<SessionCtx> = fork_points.iter().map(|&f| family[f % family.len()].fork()).collect();
        let other = SessionCtx::new(&Context::background()).with_value(0u8, 0u32);
        let other_fork = other.fork();

        // A fork's disable stays in the fork.
        if let Some(first) = forks.first() {
            prop_assert!(first.disable());
            prop_assert!(!first.is_valid());
            prop_assert!(family.iter().all(SessionCtx::is_valid), "a fork's disable reached the family");
            prop_assert!(forks[1..].iter().all(SessionCtx::is_valid), "a fork's disable reached a sibling fork");
        }

        let v = victim % family.len();
        prop_assert!(family[v].disable(), "first disable of the family returns true");
        for (i, s) in family.iter().enumerate() {
            prop_assert!(!s.is_valid(), "family member {} still valid after disabling member {}", i, v);
            prop_assert_eq!(s.err(), Some(ContextError::Canceled));
        }
        for (i, f) in forks.iter().enumerate() {
            prop_assert!(!f.is_valid(), "fork {} still valid after disabling its family", i);
        }
        prop_assert!(other.is_valid() && other_fork.is_valid(), "an unrelated session was disabled");
        prop_assert!(!root.is_done(), "disable reached the wrapped context");
        for (i, s) in family.iter().enumerate() {
            prop_assert!(!s.disable(), "member {} disable() returned true after the family was disabled", i);
        }
    }
}

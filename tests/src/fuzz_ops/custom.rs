//! User sessions ([`AnySession::custom`]) and a key whose `Eq` panics.
//!
//! - [`UserSession`] implements [`Session`] over a `BTreeMap<u8, u32>` and a validity flag that
//!   `CustomInvalidate` clears (modelled as a scope of its own that only that operation
//!   settles). A *panicky* one panics (with [`FuzzPanic`]) when an odd `u8` key is read: the
//!   read must unwind through whatever borrowed the session (a [`LocalSlot`] borrow, a store's
//!   `with_current`) and leave it intact.
//! - [`PanicKey`]s all hash alike, so every lookup or index build that meets two of them calls
//!   their `Eq`, which panics while [`ARMED`] is set. A write that panics must leave the map or
//!   context as it was *or* with the write done — never torn: the interpreter reads back with
//!   the flag cleared, accepts either, and checks every other key and `len`.

use super::{
    AnySession, Arc, AtomicBool, BTreeMap, Cause, Cell, DynKey, Entry, Interp, KEYS, Ordering, SessionModel, Val,
    catch_fuzz, fuzz_panic, pick,
};
use core::any::Any;
use core::hash::{Hash, Hasher};
use localsession_core::{KeyQuery, Session};

/// [`PanicKey`] codes in the model's value maps: `PANIC_BASE + k` for `PanicKey(k)`.
pub(super) const PANIC_BASE: u8 = 100;
/// `PanicKey(0)` to `PanicKey(PANIC_CODES - 1)`.
pub(super) const PANIC_CODES: u8 = 4;

thread_local! {
    /// `PanicKey::eq` panics while set.
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

pub(super) fn disarm() {
    ARMED.with(|a| a.set(false));
}

/// A key whose hash is constant and whose `Eq` panics while [`ARMED`] is set.
#[derive(Debug, Clone, Copy)]
pub(super) struct PanicKey(pub(super) u8);

impl PartialEq for PanicKey {
    fn eq(&self, other: &Self) -> bool {
        if ARMED.with(Cell::get) {
            fuzz_panic();
        }
        self.0 == other.0
    }
}

impl Eq for PanicKey {}

impl Hash for PanicKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Every `PanicKey` has the same tag: lookups and index builds must compare them.
        state.write_u8(0);
    }
}

/// The `PanicKey` behind a model code, if it is one.
pub(super) fn panic_key(code: u8) -> Option<PanicKey> {
    (PANIC_BASE..PANIC_BASE + PANIC_CODES).contains(&code).then(|| PanicKey(code - PANIC_BASE))
}

/// Whether reading `code` from a session modelled by `m` panics.
pub(super) fn read_panics(m: &SessionModel, code: u8) -> bool {
    matches!(m, SessionModel::Custom { panicky: true, .. }) && code < KEYS && code % 2 == 1
}

/// A user session.
struct UserSession {
    values: BTreeMap<u8, u32>,
    valid: Arc<AtomicBool>,
    panicky: bool,
}

impl Session for UserSession {
    fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Relaxed)
    }

    fn get_with(&self, key: &KeyQuery<'_>, f: &mut dyn FnMut(Option<&(dyn Any + Send + Sync)>)) {
        match key.downcast::<u8>() {
            Some(k) if self.panicky && k % 2 == 1 => fuzz_panic(),
            Some(k) => f(self.values.get(k).map(|v| v as &(dyn Any + Send + Sync))),
            None => f(None),
        }
    }

    fn with_value_dyn(&self, key: DynKey, value: Arc<dyn Any + Send + Sync>) -> AnySession {
        let mut values = self.values.clone();
        if let (Some(&k), Some(&v)) = (key.query().downcast::<u8>(), value.downcast_ref::<u32>()) {
            values.insert(k, v);
        }
        AnySession::custom(UserSession { values, valid: Arc::clone(&self.valid), panicky: self.panicky })
    }
}

impl Interp {
    pub(super) fn new_custom(&mut self, value: u8, panicky: bool) {
        let valid = Arc::new(AtomicBool::new(true));
        let mut values = BTreeMap::new();
        values.insert(value % KEYS, u32::from(value));
        let scope = self.open_scope(None, None);
        self.custom_flags.insert(scope, Arc::clone(&valid));
        let model_values = values.iter().map(|(&k, &v)| (k, Val::U32(v))).collect();
        let real = AnySession::custom(UserSession { values, valid, panicky });
        let ident = self.fresh_ident();
        self.push_session(Entry { real, model: SessionModel::Custom { scope, values: model_values, panicky }, ident });
    }

    pub(super) fn custom_invalidate(&mut self, s: u8) {
        let Some(i) = pick(s, self.sessions.len()) else { return };
        let SessionModel::Custom { scope, .. } = self.sessions[i].model else { return };
        self.custom_flags[&scope].store(false, Ordering::Relaxed);
        self.settle(scope, Cause::Canceled);
        self.check_all_validity("after invalidating a user session");
    }

    /// Binds `PanicKey(k)` in session `s` (a map: in place; a context session: a derived one),
    /// with `Eq` panicking when `armed`.
    pub(super) fn panic_key_write(&mut self, s: u8, k: u8, value: u8, armed: bool) {
        let Some(i) = pick(s, self.sessions.len()) else { return };
        let e = self.sessions[i].clone();
        let code = PANIC_BASE + k;
        let val = Val::U32(u32::from(value));
        ARMED.with(|a| a.set(armed));
        let got = catch_fuzz(|| match &e.real {
            AnySession::Map(m) => {
                m.insert(PanicKey(k), u32::from(value));
                None
            }
            AnySession::Ctx(c) => Some(AnySession::from(c.with_value(PanicKey(k), u32::from(value)))),
            // A user session ignores keys it does not know.
            AnySession::Custom(_) => Some(e.real.with_value(PanicKey(k), u32::from(value))),
        });
        disarm();
        match (&e.model, got) {
            (SessionModel::Map { map }, Ok(_)) => {
                self.maps[*map].values.insert(code, val);
            }
            (SessionModel::Map { map }, Err(())) => {
                // Published or not, never torn.
                let now = e.real.read(&PanicKey(k), |v: Option<&u32>| v.copied()).map(Val::U32);
                let before = self.maps[*map].values.get(&code).copied();
                assert!(now == before || now == Some(val), "a panicking insert left {now:?} (was {before:?})");
                if let Some(now) = now {
                    self.maps[*map].values.insert(code, now);
                }
            }
            (SessionModel::Ctx { .. }, Ok(Some(real))) => {
                let derived = self.derived(&e, code, val, real);
                self.push_session(derived);
            }
            (SessionModel::Custom { .. }, Ok(Some(real))) => {
                // `derived` ignores codes a user session does not keep.
                let derived = self.derived(&e, code, val, real);
                self.push_session(derived);
            }
            (_, Err(())) => {} // nothing was derived
            (m, Ok(r)) => panic!("panic-key write on {m:?} gave {r:?}"),
        }
        self.check_session(&e, "after a panic-key write");
    }

    /// Reads `PanicKey(k)` with `Eq` armed: the read may panic; if it returns, it is right.
    pub(super) fn panic_key_read(&mut self, s: u8, k: u8) {
        let Some(i) = pick(s, self.sessions.len()) else { return };
        let e = &self.sessions[i];
        let code = PANIC_BASE + k;
        ARMED.with(|a| a.set(true));
        let got = catch_fuzz(|| {
            let v = e.real.read(&PanicKey(k), |v: Option<&u32>| v.copied());
            let len = e.real.as_map().map(|m| m.len());
            (v, len)
        });
        disarm();
        if let Ok((v, len)) = got {
            assert_eq!(v.map(Val::U32), self.values_of(&e.model).get(&code).copied(), "armed read of {code}");
            if let Some(len) = len {
                let big = self.big_of(&e.model).map_or(0, BTreeMap::len);
                assert_eq!(len, self.values_of(&e.model).len() + big, "armed len");
            }
        }
        self.check_session(e, "after an armed read");
    }
}

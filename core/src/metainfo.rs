//! Metainfo: string key-values on a [`Context`] that travel with RPCs (Kitex `metainfo`).
//!
//! - *Persistent* values travel across every hop: a request's persistent values are sent to
//!   the next service, which sends them on, RPC after RPC.
//! - *Transient* values travel one hop: set here, they are sent to the next service, which can
//!   read them ([`MetaInfo::transient`] after [`MetaInfo::transfer_forward`]) but does not send
//!   them further.
//!
//! A context's metainfo is one immutable [`MetaInfo`] value bound under a private typed key;
//! setting a value copies the (small) maps into a new binding, so deriving never changes the
//! parent context, like every other binding.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use core::fmt;

use crate::context::Context;
use crate::key::Key;

static META: Key<MetaInfo> = Key::new("localsession.metainfo");

/// The string key-values of a context: persistent, transient, and transient received from
/// upstream.
///
/// # Examples
/// ```
/// use localsession_core::{Context, MetaInfo};
///
/// let ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
/// let ctx = MetaInfo::with_transient(&ctx, "hop", "1");
/// let meta = MetaInfo::of(&ctx);
/// assert_eq!(meta.persistent("tenant"), Some("acme"));
/// assert_eq!(meta.transient("hop"), Some("1"));
///
/// // What the next service receives: persistent stays, transient becomes upstream-only.
/// let next = meta.transfer_forward();
/// assert_eq!(next.persistent("tenant"), Some("acme"));
/// assert_eq!(next.transient("hop"), Some("1"));
/// assert_eq!(next.transfer_forward().transient("hop"), None);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct MetaInfo {
    persistent: BTreeMap<Arc<str>, Arc<str>>,
    transient: BTreeMap<Arc<str>, Arc<str>>,
    upstream: BTreeMap<Arc<str>, Arc<str>>,
}

static EMPTY: MetaInfo =
    MetaInfo { persistent: BTreeMap::new(), transient: BTreeMap::new(), upstream: BTreeMap::new() };

impl MetaInfo {
    /// The metainfo of `ctx` (empty if none was set).
    #[must_use]
    pub fn of(ctx: &Context) -> &MetaInfo {
        ctx.get(&META).unwrap_or(&EMPTY)
    }

    /// Whether `ctx` carries any metainfo.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// assert!(!MetaInfo::has(&Context::background()));
    /// ```
    #[must_use]
    pub fn has(ctx: &Context) -> bool {
        ctx.get(&META).is_some_and(|m| !m.is_empty())
    }

    /// A context carrying `meta` (replacing the metainfo of `ctx`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// let mut meta = MetaInfo::default();
    /// meta.set_persistent("k", "v");
    /// let ctx = MetaInfo::attach(&Context::background(), meta);
    /// assert_eq!(MetaInfo::of(&ctx).persistent("k"), Some("v"));
    /// ```
    #[must_use]
    pub fn attach(ctx: &Context, meta: MetaInfo) -> Context {
        ctx.with(&META, meta)
    }

    /// `ctx` with one more persistent value (Kitex `WithPersistentValue`).
    #[must_use]
    pub fn with_persistent(ctx: &Context, key: &str, value: &str) -> Context {
        let mut meta = MetaInfo::of(ctx).clone();
        meta.set_persistent(key, value);
        MetaInfo::attach(ctx, meta)
    }

    /// `ctx` with one more transient value (Kitex `WithValue`).
    #[must_use]
    pub fn with_transient(ctx: &Context, key: &str, value: &str) -> Context {
        let mut meta = MetaInfo::of(ctx).clone();
        meta.set_transient(key, value);
        MetaInfo::attach(ctx, meta)
    }

    /// `ctx` without the persistent value `key` (Kitex `DelPersistentValue`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// let ctx = MetaInfo::with_persistent(&Context::background(), "k", "v");
    /// let ctx = MetaInfo::without_persistent(&ctx, "k");
    /// assert_eq!(MetaInfo::of(&ctx).persistent("k"), None);
    /// ```
    #[must_use]
    pub fn without_persistent(ctx: &Context, key: &str) -> Context {
        let mut meta = MetaInfo::of(ctx).clone();
        meta.persistent.remove(key);
        MetaInfo::attach(ctx, meta)
    }

    /// Sets a persistent value.
    pub fn set_persistent(&mut self, key: &str, value: &str) {
        self.persistent.insert(Arc::from(key), Arc::from(value));
    }

    /// Sets a transient value.
    pub fn set_transient(&mut self, key: &str, value: &str) {
        self.transient.insert(Arc::from(key), Arc::from(value));
    }

    /// Sets a transient value received from upstream (readable here, not sent further).
    pub fn set_upstream(&mut self, key: &str, value: &str) {
        self.upstream.insert(Arc::from(key), Arc::from(value));
    }

    /// A persistent value (Kitex `GetPersistentValue`).
    #[must_use]
    pub fn persistent(&self, key: &str) -> Option<&str> {
        self.persistent.get(key).map(|v| &**v)
    }

    /// A transient value: set here, or received from upstream (Kitex `GetValue`).
    #[must_use]
    pub fn transient(&self, key: &str) -> Option<&str> {
        self.transient.get(key).or_else(|| self.upstream.get(key)).map(|v| &**v)
    }

    /// Persistent values, in key order (Kitex `GetAllPersistentValues`).
    pub fn persistent_values(&self) -> impl Iterator<Item = (&str, &str)> {
        self.persistent.iter().map(|(k, v)| (&**k, &**v))
    }

    /// Transient values set here and received from upstream (this hop's wins), in key order.
    pub fn transient_values(&self) -> impl Iterator<Item = (&str, &str)> {
        let local = self.transient.iter().map(|(k, v)| (&**k, &**v));
        let upstream =
            self.upstream.iter().filter(|(k, _)| !self.transient.contains_key(*k)).map(|(k, v)| (&**k, &**v));
        local.chain(upstream)
    }

    /// Transient values to send to the next hop (set here only).
    pub fn outgoing_transient_values(&self) -> impl Iterator<Item = (&str, &str)> {
        self.transient.iter().map(|(k, v)| (&**k, &**v))
    }

    /// Number of persistent values (Kitex `CountPersistentValues`).
    #[must_use]
    pub fn count_persistent(&self) -> usize {
        self.persistent.len()
    }

    /// Number of transient values, local and upstream (Kitex `CountValues`).
    #[must_use]
    pub fn count_transient(&self) -> usize {
        self.transient_values().count()
    }

    /// Whether there is nothing at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.persistent.is_empty() && self.transient.is_empty() && self.upstream.is_empty()
    }

    /// The metainfo the next hop receives (Kitex `TransferForward`): persistent values unchanged,
    /// this hop's transient values as upstream values, upstream values dropped.
    #[must_use]
    pub fn transfer_forward(&self) -> MetaInfo {
        MetaInfo { persistent: self.persistent.clone(), transient: BTreeMap::new(), upstream: self.transient.clone() }
    }
}

impl fmt::Debug for MetaInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetaInfo")
            .field("persistent", &self.persistent)
            .field("transient", &self.transient)
            .field("upstream", &self.upstream)
            .finish()
    }
}

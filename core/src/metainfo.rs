//! Metainfo: string key-values on a [`Context`] that travel with RPCs (Kitex `metainfo`).
//!
//! - *Persistent* values travel across every hop: a request's persistent values are sent to
//!   the next service, which sends them on, RPC after RPC.
//! - *Transient* values travel one hop: set here, they are sent to the next service, which can
//!   read them ([`MetaInfo::transient`] after [`MetaInfo::transfer_forward`]) but does not send
//!   them further.
//!
//! - *Backward* values travel the other way, from a server back to its caller in the response
//!   (Kitex `SendBackwardValue`): a server context prepared with
//!   [`MetaInfo::with_backward_values_to_send`] records them in a cell shared by every context
//!   derived from it, so code deep in the handler can add them with no context returned.
//!
//! A context's metainfo is one immutable [`MetaInfo`] value bound under a private typed key;
//! setting a value copies the (small) maps into a new binding, so deriving never changes the
//! parent context, like every other binding.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use crate::context::Context;
use crate::key::Key;

static META: Key<MetaInfo> = Key::new("localsession.metainfo");
static BACKWARD: Key<BackwardCell> = Key::new("localsession.metainfo.backward");

/// The backward values a server context records for its response: shared (not copied) by every
/// context derived from the one that carries it.
#[derive(Default)]
struct BackwardCell(spin::Mutex<BTreeMap<Arc<str>, Arc<str>>>);

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
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// assert!(MetaInfo::of(&Context::background()).is_empty()); // none set: empty
    /// let ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
    /// assert_eq!(MetaInfo::of(&ctx).persistent("tenant"), Some("acme"));
    /// ```
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
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// let parent = Context::background().with_value("trace", 1u8);
    /// let ctx = MetaInfo::with_persistent(&parent, "tenant", "acme");
    /// assert_eq!(MetaInfo::of(&ctx).persistent("tenant"), Some("acme"));
    /// assert_eq!(ctx.value::<u8, _>(&"trace"), Some(&1)); // other values stay
    /// assert!(!MetaInfo::has(&parent)); // the parent is unchanged
    /// ```
    #[must_use]
    pub fn with_persistent(ctx: &Context, key: &str, value: &str) -> Context {
        let mut meta = MetaInfo::of(ctx).clone();
        meta.set_persistent(key, value);
        MetaInfo::attach(ctx, meta)
    }

    /// `ctx` with one more transient value (Kitex `WithValue`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// let ctx = MetaInfo::with_transient(&Context::background(), "hop", "1");
    /// assert_eq!(MetaInfo::of(&ctx).transient("hop"), Some("1"));
    /// assert_eq!(MetaInfo::of(&ctx).persistent("hop"), None);
    /// ```
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
    ///
    /// # Examples
    /// ```
    /// use localsession_core::MetaInfo;
    /// let mut meta = MetaInfo::default();
    /// meta.set_persistent("tenant", "acme");
    /// meta.set_persistent("tenant", "globex"); // replaces
    /// assert_eq!(meta.persistent("tenant"), Some("globex"));
    /// assert_eq!(meta.count_persistent(), 1);
    /// ```
    pub fn set_persistent(&mut self, key: &str, value: &str) {
        self.persistent.insert(Arc::from(key), Arc::from(value));
    }

    /// Sets a transient value.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::MetaInfo;
    /// let mut meta = MetaInfo::default();
    /// meta.set_transient("hop", "1");
    /// assert_eq!(meta.transient("hop"), Some("1"));
    /// assert_eq!(meta.outgoing_transient_values().count(), 1); // sent to the next hop
    /// ```
    pub fn set_transient(&mut self, key: &str, value: &str) {
        self.transient.insert(Arc::from(key), Arc::from(value));
    }

    /// Sets a transient value received from upstream (readable here, not sent further).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::MetaInfo;
    /// let mut meta = MetaInfo::default();
    /// meta.set_upstream("caller", "svc-a");
    /// assert_eq!(meta.transient("caller"), Some("svc-a")); // readable here
    /// assert_eq!(meta.outgoing_transient_values().count(), 0); // not sent further
    /// ```
    pub fn set_upstream(&mut self, key: &str, value: &str) {
        self.upstream.insert(Arc::from(key), Arc::from(value));
    }

    /// A persistent value (Kitex `GetPersistentValue`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// let ctx = MetaInfo::with_persistent(&Context::background(), "tenant", "acme");
    /// assert_eq!(MetaInfo::of(&ctx).persistent("tenant"), Some("acme"));
    /// assert_eq!(MetaInfo::of(&ctx).persistent("region"), None);
    /// ```
    #[must_use]
    pub fn persistent(&self, key: &str) -> Option<&str> {
        self.persistent.get(key).map(|v| &**v)
    }

    /// A transient value: set here, or received from upstream (Kitex `GetValue`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::MetaInfo;
    /// let mut meta = MetaInfo::default();
    /// meta.set_upstream("hop", "1");
    /// assert_eq!(meta.transient("hop"), Some("1"));
    /// meta.set_transient("hop", "2");
    /// assert_eq!(meta.transient("hop"), Some("2")); // this hop's value wins
    /// ```
    #[must_use]
    pub fn transient(&self, key: &str) -> Option<&str> {
        self.transient.get(key).or_else(|| self.upstream.get(key)).map(|v| &**v)
    }

    /// Persistent values, in key order (Kitex `GetAllPersistentValues`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::MetaInfo;
    /// let mut meta = MetaInfo::default();
    /// meta.set_persistent("b", "2");
    /// meta.set_persistent("a", "1");
    /// assert_eq!(meta.persistent_values().collect::<Vec<_>>(), [("a", "1"), ("b", "2")]);
    /// ```
    pub fn persistent_values(&self) -> impl Iterator<Item = (&str, &str)> {
        self.persistent.iter().map(|(k, v)| (&**k, &**v))
    }

    /// Transient values: first those set at this hop (in key order), then those received from
    /// upstream that this hop did not set (in key order).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::MetaInfo;
    /// let mut meta = MetaInfo::default();
    /// meta.set_transient("a", "here");
    /// meta.set_upstream("a", "up"); // shadowed by this hop's value
    /// meta.set_upstream("b", "up");
    /// assert_eq!(meta.transient_values().collect::<Vec<_>>(), [("a", "here"), ("b", "up")]);
    /// ```
    pub fn transient_values(&self) -> impl Iterator<Item = (&str, &str)> {
        let local = self.transient.iter().map(|(k, v)| (&**k, &**v));
        let upstream =
            self.upstream.iter().filter(|(k, _)| !self.transient.contains_key(*k)).map(|(k, v)| (&**k, &**v));
        local.chain(upstream)
    }

    /// Transient values to send to the next hop (set here only).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::MetaInfo;
    /// let mut meta = MetaInfo::default();
    /// meta.set_transient("hop", "2");
    /// meta.set_upstream("from", "svc-a");
    /// assert_eq!(meta.outgoing_transient_values().collect::<Vec<_>>(), [("hop", "2")]);
    /// ```
    pub fn outgoing_transient_values(&self) -> impl Iterator<Item = (&str, &str)> {
        self.transient.iter().map(|(k, v)| (&**k, &**v))
    }

    /// Number of persistent values (Kitex `CountPersistentValues`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// let ctx = MetaInfo::with_persistent(&Context::background(), "a", "1");
    /// let ctx = MetaInfo::with_persistent(&ctx, "b", "2");
    /// assert_eq!(MetaInfo::of(&ctx).count_persistent(), 2);
    /// ```
    #[must_use]
    pub fn count_persistent(&self) -> usize {
        self.persistent.len()
    }

    /// Number of transient values, local and upstream (Kitex `CountValues`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::MetaInfo;
    /// let mut meta = MetaInfo::default();
    /// meta.set_transient("a", "1");
    /// meta.set_upstream("a", "0"); // the same key: counted once
    /// meta.set_upstream("b", "2");
    /// assert_eq!(meta.count_transient(), 2);
    /// ```
    #[must_use]
    pub fn count_transient(&self) -> usize {
        self.transient_values().count()
    }

    /// Whether there is nothing at all.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::MetaInfo;
    /// let mut meta = MetaInfo::default();
    /// assert!(meta.is_empty());
    /// meta.set_upstream("a", "1");
    /// assert!(!meta.is_empty());
    /// ```
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.persistent.is_empty() && self.transient.is_empty() && self.upstream.is_empty()
    }

    /// The metainfo the next hop receives (Kitex `TransferForward`): persistent values unchanged,
    /// this hop's transient values as upstream values, upstream values dropped.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::MetaInfo;
    /// let mut meta = MetaInfo::default();
    /// meta.set_persistent("tenant", "acme");
    /// meta.set_transient("hop", "2");
    /// meta.set_upstream("prev", "1");
    /// let next = meta.transfer_forward();
    /// assert_eq!(next.persistent("tenant"), Some("acme"));
    /// assert_eq!(next.transient("hop"), Some("2")); // readable at the next hop...
    /// assert_eq!(next.outgoing_transient_values().count(), 0); // ...but not sent on
    /// assert_eq!(next.transient("prev"), None); // one hop only
    /// ```
    #[must_use]
    pub fn transfer_forward(&self) -> MetaInfo {
        MetaInfo { persistent: self.persistent.clone(), transient: BTreeMap::new(), upstream: self.transient.clone() }
    }
}

impl MetaInfo {
    /// `ctx` prepared to record backward values (Kitex `WithBackwardValuesToSend`): values sent
    /// with [`send_backward_value`](MetaInfo::send_backward_value) on it or on any context
    /// derived from it are kept in one shared cell, read back with
    /// [`backward_values_to_send`](MetaInfo::backward_values_to_send). A server middleware calls
    /// this once per request; backward values sent on a previously prepared context are not
    /// carried over (a fresh cell).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// let ctx = MetaInfo::with_backward_values_to_send(&Context::background());
    /// let deeper = ctx.with_value("k", 1u8); // derived contexts share the cell
    /// assert!(MetaInfo::send_backward_value(&deeper, "STATUS", "cached"));
    /// assert_eq!(MetaInfo::backward_values_to_send(&ctx), [("STATUS".to_owned(), "cached".to_owned())]);
    /// ```
    #[must_use]
    pub fn with_backward_values_to_send(ctx: &Context) -> Context {
        ctx.with(&BACKWARD, BackwardCell::default())
    }

    /// Records a backward value to send back to the caller (Kitex `SendBackwardValue`); replaces
    /// a value of the same key. Returns `false`, recording nothing, if `ctx` was not prepared
    /// with [`with_backward_values_to_send`](MetaInfo::with_backward_values_to_send) (no server
    /// middleware would send it).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// assert!(!MetaInfo::send_backward_value(&Context::background(), "K", "v")); // nowhere to record it
    /// let ctx = MetaInfo::with_backward_values_to_send(&Context::background());
    /// assert!(MetaInfo::send_backward_value(&ctx, "K", "v1"));
    /// assert!(MetaInfo::send_backward_value(&ctx, "K", "v2"));
    /// assert_eq!(MetaInfo::backward_values_to_send(&ctx), [("K".to_owned(), "v2".to_owned())]);
    /// ```
    pub fn send_backward_value(ctx: &Context, key: &str, value: &str) -> bool {
        match ctx.get(&BACKWARD) {
            Some(cell) => {
                cell.0.lock().insert(Arc::from(key), Arc::from(value));
                true
            }
            None => false,
        }
    }

    /// The backward values recorded so far on `ctx`'s cell, in key order (Kitex
    /// `AllBackwardValuesToSend`); empty if `ctx` was not prepared.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, MetaInfo};
    /// let ctx = MetaInfo::with_backward_values_to_send(&Context::background());
    /// MetaInfo::send_backward_value(&ctx, "B", "2");
    /// MetaInfo::send_backward_value(&ctx, "A", "1");
    /// let sent = MetaInfo::backward_values_to_send(&ctx);
    /// assert_eq!(sent, [("A".to_owned(), "1".to_owned()), ("B".to_owned(), "2".to_owned())]);
    /// assert!(MetaInfo::backward_values_to_send(&Context::background()).is_empty());
    /// ```
    #[must_use]
    pub fn backward_values_to_send(ctx: &Context) -> Vec<(String, String)> {
        ctx.get(&BACKWARD).map_or_else(Vec::new, |cell| {
            cell.0.lock().iter().map(|(k, v)| (String::from(&**k), String::from(&**v))).collect()
        })
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

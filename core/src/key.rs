//! Keys: any `Eq + Hash + Any + Send + Sync` value, or a typed, named [`Key<T>`] static.
//!
//! Every binding in a context chain carries a 64-bit *tag* that lookups compare before anything
//! else:
//! - a [`Key<T>`] is identified by its address; its tag is that address, which is even because a
//!   `Key` is at least 4-byte aligned. A match of two typed tags is a match of the keys, and since
//!   a `Key<T>` fixes the value type at compile time, the value needs no runtime type check.
//! - any other key is hashed (foldhash with a fixed seed, so tags are stable for the life of the
//!   process); its tag is that hash with the low bit set, so it can never equal a typed tag. Two
//!   such keys match when their tags are equal *and* they have the same type and compare equal,
//!   which is checked through the node's vtable (the Go semantics of `interface{}` keys, with
//!   Rust's types: `"a"` as `&'static str` and `String::from("a")` are different keys).
//!
//! A [`KeyQuery`] is the erased form of a key used by the object-safe [`Session`](crate::Session)
//! trait; building one hashes the key once.

use core::any::Any;
use core::fmt;
use core::hash::{BuildHasher, Hash};
use core::marker::PhantomData;

use alloc::sync::Arc;

/// The fixed hasher for key tags (seeded once, identical in every thread).
const TAG_HASHER: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x6c6f_6361_6c73_6573);

/// Computes the tag of a hashed key: never zero, always odd.
#[inline]
pub(crate) fn hashed_tag<K: Hash + ?Sized>(key: &K) -> u64 {
    TAG_HASHER.hash_one(key) | 1
}

/// A typed, named key whose value type is fixed at compile time.
///
/// Declare keys as statics; they are compared by identity (their address), so lookups need no
/// hashing and no runtime type check, and two keys with the same name are still different keys.
///
/// # Examples
/// ```
/// use localsession_core::{Context, Key};
///
/// #[derive(Debug, PartialEq)]
/// struct User { id: u64 }
///
/// static USER: Key<User> = Key::new("user");
///
/// let ctx = Context::background().with(&USER, User { id: 7 });
/// assert_eq!(ctx.get(&USER), Some(&User { id: 7 }));
/// assert_eq!(USER.name(), "user");
/// ```
pub struct Key<T> {
    name: &'static str,
    // Interior mutability keeps the compiler from ever merging two key statics into one address
    // (statics with `UnsafeCell` are never deduplicated). Never written.
    _identity: core::sync::atomic::AtomicU8,
    _value: PhantomData<fn() -> T>,
}

impl<T> Key<T> {
    /// Creates a key with a name used in `Debug` output.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Key;
    /// static TRACE_ID: Key<u128> = Key::new("trace_id");
    /// assert_eq!(TRACE_ID.name(), "trace_id");
    /// ```
    #[must_use]
    pub const fn new(name: &'static str) -> Self {
        Key { name, _identity: core::sync::atomic::AtomicU8::new(0), _value: PhantomData }
    }

    /// The key's name.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Key;
    /// static DEADLINE_MS: Key<u64> = Key::new("deadline_ms");
    /// assert_eq!(DEADLINE_MS.name(), "deadline_ms");
    /// ```
    #[must_use]
    pub const fn name(&self) -> &'static str {
        self.name
    }

    #[inline]
    pub(crate) fn tag(&'static self) -> u64 {
        self as *const Self as usize as u64
    }
}

impl<T> fmt::Debug for Key<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("name", &self.name).field("type", &core::any::type_name::<T>()).finish()
    }
}

/// An erased key: what a lookup compares nodes against.
///
/// Built from any key with [`KeyQuery::new`] or from a typed key with [`KeyQuery::typed`].
/// User implementations of [`Session`](crate::Session) receive one in
/// [`Session::get_with`](crate::Session::get_with) and can recover the key with
/// [`KeyQuery::downcast`] or test it with [`KeyQuery::is`].
///
/// # Examples
/// ```
/// use localsession_core::{Key, KeyQuery};
/// static USER: Key<String> = Key::new("user");
///
/// let q = KeyQuery::new(&"a");
/// assert_eq!(q.downcast::<&str>(), Some(&"a"));
/// assert!(!q.is(&USER));
/// assert!(KeyQuery::typed(&USER).is(&USER));
/// ```
#[derive(Clone, Copy)]
pub struct KeyQuery<'a> {
    pub(crate) tag: u64,
    pub(crate) key: Option<&'a (dyn Any + Send + Sync)>,
}

impl<'a> KeyQuery<'a> {
    /// A query for any hashable key.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, KeyQuery};
    /// let ctx = Context::background().with_value("tenant", "acme");
    /// let found = ctx.lookup(&KeyQuery::new(&"tenant")).and_then(|v| v.downcast_ref::<&str>());
    /// assert_eq!(found, Some(&"acme"));
    /// // The key's type is part of the key: a `String` does not find a `&str` binding.
    /// assert!(ctx.lookup(&KeyQuery::new(&String::from("tenant"))).is_none());
    /// ```
    #[inline]
    #[must_use]
    pub fn new<K: Eq + Hash + Any + Send + Sync>(key: &'a K) -> Self {
        KeyQuery { tag: hashed_tag(key), key: Some(key) }
    }

    /// A query for a typed key.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, Key, KeyQuery};
    /// static RETRIES: Key<u32> = Key::new("retries");
    /// let ctx = Context::background().with(&RETRIES, 3);
    /// let found = ctx.lookup(&KeyQuery::typed(&RETRIES)).and_then(|v| v.downcast_ref::<u32>());
    /// assert_eq!(found, Some(&3));
    /// ```
    #[inline]
    #[must_use]
    pub fn typed<T>(key: &'static Key<T>) -> Self {
        KeyQuery { tag: key.tag(), key: None }
    }

    /// The key, if this query was built from a `K`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::KeyQuery;
    /// let q = KeyQuery::new(&42u64);
    /// assert_eq!(q.downcast::<u64>(), Some(&42));
    /// assert_eq!(q.downcast::<u32>(), None); // another type
    /// ```
    #[must_use]
    pub fn downcast<K: Any>(&self) -> Option<&'a K> {
        self.key.and_then(|k| k.downcast_ref::<K>())
    }

    /// Whether this query is for the typed key `key`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Key, KeyQuery};
    /// static A: Key<u8> = Key::new("same name");
    /// static B: Key<u8> = Key::new("same name");
    /// assert!(KeyQuery::typed(&A).is(&A));
    /// assert!(!KeyQuery::typed(&A).is(&B)); // compared by identity, not by name
    /// assert!(!KeyQuery::new(&"same name").is(&A));
    /// ```
    #[must_use]
    pub fn is<T>(&self, key: &'static Key<T>) -> bool {
        self.key.is_none() && self.tag == key.tag()
    }

    /// The key as `&dyn Any` (`None` for a typed key).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Key, KeyQuery};
    /// static ID: Key<u64> = Key::new("id");
    /// assert!(KeyQuery::new(&"id").as_any().is_some_and(|k| k.is::<&str>()));
    /// assert!(KeyQuery::typed(&ID).as_any().is_none());
    /// ```
    #[must_use]
    pub fn as_any(&self) -> Option<&'a (dyn Any + Send + Sync)> {
        self.key
    }

    #[inline]
    pub(crate) fn is_typed(&self) -> bool {
        self.key.is_none()
    }
}

impl fmt::Debug for KeyQuery<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyQuery")
            .field("tag", &format_args!("{:#x}", self.tag))
            .field("typed", &self.is_typed())
            .finish()
    }
}

/// Object-safe equality for stored keys.
pub(crate) trait ErasedKey: Any + Send + Sync {
    fn erased_eq(&self, other: &(dyn Any + Send + Sync)) -> bool;
    fn as_any(&self) -> &(dyn Any + Send + Sync);
}

impl<K: Eq + Any + Send + Sync> ErasedKey for K {
    #[inline]
    fn erased_eq(&self, other: &(dyn Any + Send + Sync)) -> bool {
        other.downcast_ref::<K>().is_some_and(|o| o == self)
    }
    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }
}

/// An owned, erased, cheaply clonable key: what [`Session::with_value_dyn`](crate::Session::with_value_dyn) takes.
///
/// # Examples
/// ```
/// use localsession_core::{DynKey, Key};
/// static N: Key<u32> = Key::new("n");
/// let a = DynKey::new("a");
/// let b = DynKey::typed(&N);
/// assert!(a.query().downcast::<&str>().is_some());
/// assert!(b.query().is(&N));
/// ```
#[derive(Clone)]
pub struct DynKey {
    pub(crate) tag: u64,
    pub(crate) key: Option<Arc<dyn ErasedKey>>,
}

impl DynKey {
    /// Erases a hashable key.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use localsession_core::{Context, DynKey, Session, SessionCtx};
    /// let s = SessionCtx::new(&Context::background());
    /// let s = s.with_value_dyn(DynKey::new("user"), Arc::new(7u32));
    /// assert_eq!(s.value_cloned::<u32, _>(&"user"), Some(7)); // found by the original key
    /// ```
    #[must_use]
    pub fn new<K: Eq + Hash + Any + Send + Sync>(key: K) -> Self {
        DynKey { tag: hashed_tag(&key), key: Some(Arc::new(key)) }
    }

    /// Erases a typed key. The value bound under it must be a `T`; a value of another type is
    /// stored but reads as absent through `key`.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use localsession_core::{Context, DynKey, Key, Session, SessionCtx};
    /// static N: Key<u32> = Key::new("n");
    /// let s = SessionCtx::new(&Context::background());
    /// assert_eq!(s.with_value_dyn(DynKey::typed(&N), Arc::new(5u32)).get_cloned(&N), Some(5));
    /// // A value of another type is stored, but reads as absent through the key:
    /// assert_eq!(s.with_value_dyn(DynKey::typed(&N), Arc::new("five")).get_cloned(&N), None);
    /// ```
    #[must_use]
    pub fn typed<T>(key: &'static Key<T>) -> Self {
        DynKey { tag: key.tag(), key: None }
    }

    /// A query that finds what was bound under this key.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Context, DynKey};
    /// let key = DynKey::new(7u16);
    /// let ctx = Context::background().with_value(7u16, "seven");
    /// assert!(ctx.lookup(&key.query()).is_some());
    /// assert_eq!(key.query().downcast::<u16>(), Some(&7));
    /// ```
    #[must_use]
    pub fn query(&self) -> KeyQuery<'_> {
        KeyQuery { tag: self.tag, key: self.key.as_deref().map(|k| k.as_any()) }
    }
}

impl fmt::Debug for DynKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynKey")
            .field("tag", &format_args!("{:#x}", self.tag))
            .field("typed", &self.key.is_none())
            .finish()
    }
}

//! Node storage and reference counting: the persistent chain under contexts, sessions and maps.
//!
//! [`Context`](crate::Context), [`SessionCtx`](crate::SessionCtx) and
//! [`SessionMap`](crate::SessionMap) are all made of these nodes.
//!
//! # Layout
//!
//! A context is a pointer to the newest node of an immutable chain; every node owns one reference
//! to its parent, so cloning a context is one reference-count increment and `with_value` is one
//! allocation plus one increment (the persistent-list shape of rpds' `List`). Every node starts
//! with the same `#[repr(C)]` [`Header`] (48 bytes on 64-bit targets):
//!
//! | field    | bytes | meaning |
//! |----------|-------|---------|
//! | `refs`   | 8 | strong count (there are no weak references) |
//! | `vtable` | 8 | drop, detach, key equality and value access for the concrete node type |
//! | `parent` | 8 | owning pointer to the parent node |
//! | `tag`    | 8 | the key's tag (see [`key`](crate::key)); 0 for non-value nodes |
//! | `table`  | 8 | the nearest index table at or below this node (or null) |
//! | `bloom`, `seg`, `flags` | 8 | lookup filter, segment length, node kind |
//!
//! A value node bound under a typed [`Key`](crate::Key) stores nothing else but the value: the
//! tag *is* the key. Cancel scopes ([`scope`](crate::scope)) are nodes of the same chain whose
//! tag is 0, so value lookups pass over them.
//!
//! # Lookup: segments, a bloom filter and index tables
//!
//! A plain walk costs one dependent load per binding, which makes deep contexts slow. Instead,
//! every [`SEGMENT`]-th value node carries an *index table*: an open-addressing hash table of
//! every distinct key at or below it (newest binding wins), built by copying the previous table
//! and adding the last segment. Every node points at the nearest table (`table`) and keeps a
//! 32-bit bloom filter of the keys bound *above* that table (`bloom`, one bit per key). A lookup
//! walks from the newest node while the filter says the key may be above the table, and otherwise
//! jumps straight to the table:
//!
//! - a key bound in the newest node is found at the first node;
//! - a key bound deep in the chain (or absent) costs one filter test and one table probe,
//!   whatever the depth — this is what keeps a depth-64 read within 2x of a depth-1 read.
//!
//! A reader that knows its key and value types (`Context::value`, `SessionMap::read` and
//! friends) compares keys and reaches the value with no indirect call: the node's [`VTable`]
//! records the `TypeId` and offset of a key stored inline and of a value stored inline or as an
//! `Arc<V>` ([`NodePtr::key_is`], [`NodePtr::value_as`]), constants of the node type; only nodes
//! whose key or value is erased (bound through `Session::with_value_dyn`) go through the vtable's
//! functions. Table builds compare two inline keys of one type the same way
//! ([`ChainNode::same_key`](crate::index::ChainNode::same_key)).
//!
//! The tables themselves live in [`index`](crate::index). Tables come in levels (see
//! [`Table`]): a new table copies only the top level (at most 64 keys) and merges a level into the next one down when it outgrows it, so building tables costs
//! O(log n) per binding at any size, and a lookup that misses the top level probes at most
//! `log8(keys / 64) + 1` tables. Building a table is the one case where `with_value` allocates
//! twice; it happens at most once every [`SEGMENT`] bindings.
//!
//! # Reclamation
//!
//! Reference counting follows `alloc::sync::Arc` (relaxed increment, release decrement, acquire
//! fence before freeing). Dropping the last reference to a node frees it and then releases its
//! parent *in a loop*, so a chain of 100 000 nodes drops without recursion. The counts use
//! `core`'s atomics even under loom: the protocol is `Arc`'s, and modelling every count would
//! drown the loom models of the protocols that are this crate's own.
//!
//! A value that is itself a context (or a session over one) would drop its chain recursively,
//! one drop of a whole chain per nesting level. The modules that define such values register a
//! [`TakeChain`] function here ([`register_chain_owner`]); reclamation moves the chain out of
//! every value a registered function recognises and releases it in the same loop.
//!
//! A freed value node's memory goes to a per-thread cache (`blocks`, with `std`) rather than
//! straight back to the allocator, and the thread's next value node of the same layout takes
//! it: a `SessionMap` frees nodes by the thousand when a grace period ends and allocates them
//! by the thousand when it compacts, a rhythm the allocator's own small thread cache does not
//! absorb. The block is kept or freed after the node's contents are dropped, also when a
//! value's `Drop` unwinds.
//!
//! # Layering
//!
//! This module names no module above it. Node kinds defined elsewhere hook into it through their
//! [`VTable`]: a cancel scope's `detach` leaves its parent scope's list before the scope is freed
//! ([`scope`](crate::scope) provides it). The values that own chains are recognised through the
//! registered [`TakeChain`] functions, not by naming `Context` or the session types. The index
//! tables sit below this module, generic over the node accessors they need.

use core::alloc::Layout;
use core::any::{Any, TypeId};
use core::mem::{ManuallyDrop, offset_of};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicUsize, Ordering, fence};

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::index::{ChainNode, Entry, Table, mix};
use crate::key::{ErasedKey, KeyQuery};

mod blocks;

/// Value nodes per segment: a new index table is built every `SEGMENT` bindings.
pub(crate) const SEGMENT: u16 = 8;
// A table build keeps a segment's keys on the stack (`index::Few`).
const _: () = assert!(SEGMENT as usize <= crate::index::SEGMENT_KEYS);

/// The node binds a key to a value.
pub(crate) const F_VALUE: u16 = 1;
/// The binding removes the key (a `SessionMap::remove`).
pub(crate) const F_TOMBSTONE: u16 = 2;
/// `table` was built for this node and is freed with it.
pub(crate) const F_OWNS_TABLE: u16 = 4;
/// The node is a cancel scope (`scope::ScopeNode`).
pub(crate) const F_SCOPE: u16 = 8;
/// The value is `InlineValue<T>` for the `T` of the typed key whose address is the tag.
pub(crate) const F_TYPED_INLINE: u16 = 16;
/// Lookups from above do not see the bindings below this (scope) node: a `SessionMap`'s base.
pub(crate) const F_BARRIER: u16 = 32;
/// Linking builds no index table for this node: it is an inner node of a chain that a
/// `SessionMap` compaction rebuilds and then indexes at once ([`NodeRef::index_chain`]). Such a
/// node is only ever reached as the parent of an indexed node, so no lookup starts at it.
pub(crate) const F_NO_INDEX: u16 = 64;

/// Refcounts above this abort, like `Arc` (unreachable in practice: it needs `isize::MAX`
/// live contexts).
const MAX_REFS: usize = isize::MAX as usize;

/// The common prefix of every node.
#[repr(C)]
pub(crate) struct Header {
    refs: AtomicUsize,
    vtable: &'static VTable,
    parent: Option<NodeRef>,
    pub(crate) tag: u64,
    table: *const Entry,
    bloom: u32,
    seg: u16,
    pub(crate) flags: u16,
}

/// Re-binds a node's key and value on another parent, adding `flags` (only [`F_NO_INDEX`]).
pub(crate) type RebindFn = unsafe fn(NonNull<Header>, Option<NodeRef>, u16) -> NodeRef;

/// Operations that depend on the concrete node type.
pub(crate) struct VTable {
    /// Drops the node's payload and frees its allocation. The `parent` has been moved out. A
    /// value that is itself a context hands its chain to the `Vec` instead of dropping it, so
    /// that [`drop_chain`] releases it iteratively.
    pub(crate) drop_and_free: unsafe fn(NonNull<Header>, &mut Vec<NodeRef>),
    /// Whether the node's (hashed) key equals `key`.
    pub(crate) key_eq: unsafe fn(NonNull<Header>, &(dyn Any + Send + Sync)) -> bool,
    /// Whether the node's inline key equals the key at the pointer, which the caller has checked
    /// to be a key of the same type (the other node's, through [`inline_key`](VTable::inline_key)):
    /// [`NodePtr::same_key`] for two inline keys, with one indirect call instead of three.
    /// Only called on nodes whose `inline_key` is `Some`.
    pub(crate) key_eq_same_type: unsafe fn(NonNull<Header>, *const ()) -> bool,
    /// The node's hashed key, if it has one.
    pub(crate) key_any: unsafe fn(NonNull<Header>) -> Option<*const (dyn Any + Send + Sync)>,
    /// The node's value.
    pub(crate) value: unsafe fn(NonNull<Header>) -> *const (dyn Any + Send + Sync),
    /// The value as a shared handle, when stored as one.
    pub(crate) shared: unsafe fn(NonNull<Header>) -> Option<Arc<dyn Any + Send + Sync>>,
    /// Re-binds the same key and value on another parent (`SessionMap` compaction).
    pub(crate) rebind: Option<RebindFn>,
    /// Runs when the node's count reached zero, before its parent link is released and before
    /// anything is freed: a cancel scope removes itself from its parent scope's list here (see
    /// [`scope`](crate::scope)). Only shared references to the node may be formed.
    pub(crate) detach: Option<unsafe fn(NonNull<Header>)>,
    /// For a key stored inline ([`InlineKey<K>`]): `K`'s type and the key's offset in the node,
    /// so that a reader that knows its key type compares keys without an indirect call
    /// ([`NodePtr::key_is`]). `None` for every other node (erased, typed or no key).
    pub(crate) inline_key: Option<(TypeId, usize)>,
    /// For a value stored as a typed shared handle ([`SharedValue`] over a sized `V`): `V`'s type
    /// and the offset of the node's `Arc<V>`, so that a reader that knows the value type reaches
    /// the value without an indirect call ([`NodePtr::value_as`], [`NodePtr::shared_as`]). `None` for every other
    /// node (inline, erased or no value).
    pub(crate) shared_value: Option<(TypeId, usize)>,
    /// For a value stored inline ([`InlineValue<V>`], a context's): `V`'s type and the value's
    /// offset in the node, as `shared_value` is for an `Arc<V>`. `None` for every other node.
    pub(crate) inline_value: Option<(TypeId, usize)>,
}

// ---------------------------------------------------------------------------------------------
// Key and value storage
// ---------------------------------------------------------------------------------------------

/// How a value node stores its key.
pub(crate) trait KeySlot: Send + Sync + 'static {
    /// The key's type if the slot stores a key of one static type inline (see
    /// [`VTable::inline_key`]). The slot must then be `#[repr(transparent)]` over that key.
    const INLINE_TYPE: Option<TypeId> = None;
    fn eq_any(&self, key: &(dyn Any + Send + Sync)) -> bool;
    fn as_any(&self) -> Option<&(dyn Any + Send + Sync)>;
    /// Whether the key equals the one at `other`.
    ///
    /// # Safety
    /// Only for a slot with an [`INLINE_TYPE`](KeySlot::INLINE_TYPE): `other` points to a live
    /// key of that type.
    unsafe fn eq_same_type(&self, other: *const ()) -> bool {
        let _ = other;
        false
    }
}

/// A typed key: the tag is the key's address, nothing is stored.
#[derive(Clone, Copy)]
pub(crate) struct TypedKey;

impl KeySlot for TypedKey {
    fn eq_any(&self, _: &(dyn Any + Send + Sync)) -> bool {
        // Typed tags are even and hashed tags odd: a typed node never meets a hashed query.
        false
    }
    fn as_any(&self) -> Option<&(dyn Any + Send + Sync)> {
        None
    }
}

/// A hashed key stored inline. Transparent, so that the key is at the slot's offset (see
/// [`VTable::inline_key`]).
#[derive(Clone)]
#[repr(transparent)]
pub(crate) struct InlineKey<K>(pub(crate) K);

impl<K: Eq + Any + Send + Sync> KeySlot for InlineKey<K> {
    const INLINE_TYPE: Option<TypeId> = Some(TypeId::of::<K>());
    #[inline]
    unsafe fn eq_same_type(&self, other: *const ()) -> bool {
        // SAFETY: the caller's guarantee: `other` is a live `K`.
        self.0 == *unsafe { &*other.cast::<K>() }
    }
    #[inline]
    fn eq_any(&self, key: &(dyn Any + Send + Sync)) -> bool {
        key.downcast_ref::<K>().is_some_and(|k| *k == self.0)
    }
    fn as_any(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.0)
    }
}

/// A hashed key behind an erased shared pointer (the `dyn Session` path).
#[derive(Clone)]
pub(crate) struct SharedKey(pub(crate) Arc<dyn ErasedKey>);

impl KeySlot for SharedKey {
    fn eq_any(&self, key: &(dyn Any + Send + Sync)) -> bool {
        self.0.erased_eq(key)
    }
    fn as_any(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(self.0.as_any())
    }
}

/// How a value node stores its value.
pub(crate) trait ValueSlot: Send + Sync + 'static {
    /// The value's type if the slot is an `Arc` of one static, sized type (see
    /// [`VTable::shared_value`]). The slot must then be `#[repr(transparent)]` over that `Arc`.
    const SHARED_TYPE: Option<TypeId> = None;
    /// The value's type if the slot stores a value of one static type inline (see
    /// [`VTable::inline_value`]). The slot must then be `#[repr(transparent)]` over that value.
    const INLINE_TYPE: Option<TypeId> = None;
    fn as_any(&self) -> &(dyn Any + Send + Sync);
    /// Moves the chain of a value that is a context (or a session over one) into `out`, for the
    /// caller to release iteratively: nested contexts would otherwise drop recursively.
    fn take_nested(&mut self, out: &mut Vec<NodeRef>) {
        let _ = out;
    }
    fn shared(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        None
    }
}

/// The value stored inline (contexts and `SessionCtx`). Transparent, so that the value is at the
/// slot's offset (see [`VTable::inline_value`]).
#[repr(transparent)]
pub(crate) struct InlineValue<V>(pub(crate) V);

impl<V: Any + Send + Sync> ValueSlot for InlineValue<V> {
    const INLINE_TYPE: Option<TypeId> = Some(TypeId::of::<V>());
    #[inline]
    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        &self.0
    }
    fn take_nested(&mut self, out: &mut Vec<NodeRef>) {
        // A value without drop glue owns no `NodeRef` (a compile-time constant).
        if core::mem::needs_drop::<V>() {
            take_nested_chain(&mut self.0, out);
        }
    }
}

/// The value behind a shared pointer (`SessionMap`, which hands out owned handles and re-binds
/// values when it compacts): `Arc<V>` for a value of a static type `V`, or `Arc<dyn Any + Send +
/// Sync>` for one bound through the erased (`dyn Session`) path. `MAY_OWN_CHAIN` is `false` for
/// value types without drop glue (`u64`, `&'static str`, ...): such a value cannot own a chain,
/// so reclaiming its node skips [`take_nested`](ValueSlot::take_nested)'s checks (a
/// compare-and-swap on the `Arc`'s weak count, then one type check per registered chain owner),
/// 5% of a small `SessionMap`'s inserts.
///
/// A typed `Arc<V>` (rather than the `Arc<dyn Any>` every value was stored as before) lets a
/// reader that asks for a `V` find it through [`VTable::shared_value`] with no indirect call.
#[repr(transparent)]
pub(crate) struct SharedValue<const MAY_OWN_CHAIN: bool, V: ?Sized + Shareable>(pub(crate) Arc<V>);

impl<const MAY_OWN_CHAIN: bool, V: ?Sized + Shareable> Clone for SharedValue<MAY_OWN_CHAIN, V> {
    fn clone(&self) -> Self {
        SharedValue(Arc::clone(&self.0))
    }
}

/// What [`SharedValue`] may hold: any sized `Any + Send + Sync` type, or such a value already
/// erased to `dyn Any + Send + Sync`. The methods are named apart from every `as_any` of this
/// crate: the trait is implemented for *every* sized `Any + Send + Sync` type, an `Arc` of a
/// trait object included, so a method named like another trait's would win method resolution on
/// such a receiver before auto-deref reached the intended one (a `same_key` bug that the
/// `SessionMap` model test caught while this was written).
pub(crate) trait Shareable: Send + Sync + 'static {
    /// `Some(TypeId::of::<Self>())` for a sized type, `None` for the erased one.
    const TYPE: Option<TypeId>;
    fn erase(&self) -> &(dyn Any + Send + Sync);
    fn erase_mut(&mut self) -> &mut (dyn Any + Send + Sync);
    fn erase_arc(this: &Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<T: Any + Send + Sync> Shareable for T {
    const TYPE: Option<TypeId> = Some(TypeId::of::<T>());
    fn erase(&self) -> &(dyn Any + Send + Sync) {
        self
    }
    fn erase_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
    fn erase_arc(this: &Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        Arc::clone(this) as Arc<dyn Any + Send + Sync>
    }
}

impl Shareable for dyn Any + Send + Sync {
    const TYPE: Option<TypeId> = None;
    fn erase(&self) -> &(dyn Any + Send + Sync) {
        self
    }
    fn erase_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
    fn erase_arc(this: &Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        Arc::clone(this)
    }
}

impl<const MAY_OWN_CHAIN: bool, V: ?Sized + Shareable> ValueSlot for SharedValue<MAY_OWN_CHAIN, V> {
    const SHARED_TYPE: Option<TypeId> = V::TYPE;
    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        V::erase(&*self.0)
    }
    fn shared(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        Some(V::erase_arc(&self.0))
    }
    fn take_nested(&mut self, out: &mut Vec<NodeRef>) {
        // Only the last handle to the value drops it.
        if MAY_OWN_CHAIN && let Some(value) = Arc::get_mut(&mut self.0) {
            take_nested_chain(V::erase_mut(value), out);
        }
    }
}

/// No value: the key was removed.
#[derive(Clone, Copy)]
pub(crate) struct Tombstone;

impl ValueSlot for Tombstone {
    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        &()
    }
}

/// A node binding a key to a value.
#[repr(C)]
pub(crate) struct ValueNode<K, V> {
    header: Header,
    key: K,
    value: V,
}

impl<K: KeySlot, V: ValueSlot> ValueNode<K, V> {
    const VTABLE: VTable = VTable {
        drop_and_free: Self::drop_and_free,
        key_eq: Self::key_eq,
        key_eq_same_type: Self::key_eq_same_type,
        key_any: Self::key_any,
        value: Self::value,
        shared: Self::shared,
        rebind: None,
        detach: None,
        inline_key: match K::INLINE_TYPE {
            Some(t) => Some((t, offset_of!(Self, key))),
            None => None,
        },
        shared_value: match V::SHARED_TYPE {
            Some(t) => Some((t, offset_of!(Self, value))),
            None => None,
        },
        inline_value: match V::INLINE_TYPE {
            Some(t) => Some((t, offset_of!(Self, value))),
            None => None,
        },
    };

    /// # Safety
    /// `node` is a `ValueNode<K, V>` with no other references, whose parent was moved out.
    unsafe fn drop_and_free(node: NonNull<Header>, nested: &mut Vec<NodeRef>) {
        /// Hands the block to this thread's cache or frees it when dropped: after the node's
        /// contents are dropped, or while a value's `Drop` unwinds (as `Box` would free it).
        struct Block(NonNull<u8>, Layout);
        impl Drop for Block {
            fn drop(&mut self) {
                // SAFETY: the block was allocated with this layout (by `new_node`, fresh or
                // from the cache) and is ours: its contents are dropped, nothing refers to it.
                unsafe {
                    if !blocks::keep(self.0, self.1) {
                        alloc::alloc::dealloc(self.0.as_ptr(), self.1);
                    }
                }
            }
        }
        let node = node.cast::<Self>();
        let _block = Block(node.cast(), Layout::new::<Self>());
        // SAFETY: the caller owns the node, a live `ValueNode<K, V>` that `new_node` wrote;
        // its contents are dropped once, here, and the block outlives them.
        unsafe {
            (*node.as_ptr()).value.take_nested(nested);
            ptr::drop_in_place(node.as_ptr());
        }
    }

    /// # Safety
    /// `node` is a live `ValueNode<K, V>`.
    unsafe fn key_eq(node: NonNull<Header>, key: &(dyn Any + Send + Sync)) -> bool {
        // SAFETY: the caller guarantees the type and liveness; `key` is immutable.
        unsafe { (*node.cast::<Self>().as_ptr()).key.eq_any(key) }
    }

    /// # Safety
    /// `node` is a live `ValueNode<K, V>` with an inline key; `other` points to a live key of
    /// the same type.
    unsafe fn key_eq_same_type(node: NonNull<Header>, other: *const ()) -> bool {
        // SAFETY: forwarded from the caller.
        unsafe { (*node.cast::<Self>().as_ptr()).key.eq_same_type(other) }
    }

    /// # Safety
    /// `node` is a live `ValueNode<K, V>`.
    unsafe fn key_any(node: NonNull<Header>) -> Option<*const (dyn Any + Send + Sync)> {
        // SAFETY: as above.
        unsafe { (*node.cast::<Self>().as_ptr()).key.as_any().map(|k| k as *const _) }
    }

    /// # Safety
    /// `node` is a live `ValueNode<K, V>`.
    unsafe fn value(node: NonNull<Header>) -> *const (dyn Any + Send + Sync) {
        // SAFETY: as above.
        unsafe { (*node.cast::<Self>().as_ptr()).value.as_any() }
    }

    /// # Safety
    /// `node` is a live `ValueNode<K, V>`.
    unsafe fn shared(node: NonNull<Header>) -> Option<Arc<dyn Any + Send + Sync>> {
        // SAFETY: as above.
        unsafe { (*node.cast::<Self>().as_ptr()).value.shared() }
    }
}

impl<K: KeySlot + Clone, V: ValueSlot + Clone> ValueNode<K, V> {
    const REBINDABLE_VTABLE: VTable = VTable { rebind: Some(Self::rebind), ..Self::VTABLE };

    /// # Safety
    /// `node` is a live `ValueNode<K, V>` created with the rebindable vtable.
    unsafe fn rebind(node: NonNull<Header>, parent: Option<NodeRef>, flags: u16) -> NodeRef {
        // SAFETY: the caller guarantees the type and liveness.
        let this = unsafe { &*node.cast::<Self>().as_ptr() };
        NodeRef::new_node(
            parent,
            this.header.tag,
            this.header.flags & (F_VALUE | F_TOMBSTONE) | (flags & F_NO_INDEX),
            this.key.clone(),
            this.value.clone(),
            &Self::REBINDABLE_VTABLE,
        )
    }
}

impl Drop for Header {
    fn drop(&mut self) {
        if self.flags & F_OWNS_TABLE != 0 {
            // SAFETY: the table was built for this node and nothing else frees it; every node
            // that points at it is a descendant, and all of them are gone.
            unsafe { Table::free(self.table) };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Values that own a chain
// ---------------------------------------------------------------------------------------------

/// Moves the chain out of a value that owns one (`None` for any other value). The value is
/// about to be dropped.
pub(crate) type TakeChain = fn(&mut (dyn Any + Send + Sync)) -> Option<NodeRef>;

/// The kinds of values that own a chain of nodes, each registered by the module that defines
/// it (this module cannot name those types: they sit above it).
#[derive(Clone, Copy, Debug)]
pub(crate) enum ChainOwner {
    /// `Context`, registered by [`context`](crate::context).
    Context = 0,
    /// `SessionCtx`, `AnySession::Ctx` and `AnySession::Map`, registered by
    /// [`session`](crate::session).
    Session = 1,
    /// `SessionMap` (the map's root chain, when the value held the map's last handle),
    /// registered by [`map`](crate::map); `AnySession::Map` is the session module's.
    Map = 2,
}

/// One [`TakeChain`] per [`ChainOwner`], set once. `spin::Once` rather than the crate's
/// `Global`: a second registrant waits until the first one's function is in place, so whoever
/// registered can rely on it from then on.
static CHAIN_OWNERS: [spin::Once<TakeChain>; 3] = [spin::Once::new(), spin::Once::new(), spin::Once::new()];

/// Registers how to take the chain out of `owner`'s values, so that [`drop_chain`] releases
/// the chains of such values iteratively.
///
/// Each owner's module calls this before a value of its kind can be stored in a node: `context`
/// when a `Context` is bound as a value, `session` when the first `SessionCtx` is made (no
/// `SessionCtx` or `AnySession::Ctx` exists before that). The thread that drops the node got
/// the value through whatever synchronized its hand-over, so it sees the registration. Missing
/// one would only make that drop recursive, never unsound. After the first call, one `Acquire`
/// load.
#[inline]
pub(crate) fn register_chain_owner(owner: ChainOwner, take: TakeChain) {
    CHAIN_OWNERS[owner as usize].call_once(|| take);
}

/// If a registered [`ChainOwner`] recognises `value`, moves its chain into `out`, so that node
/// reclamation releases nested contexts iteratively instead of recursing once per nesting
/// level.
fn take_nested_chain(value: &mut (dyn Any + Send + Sync), out: &mut Vec<NodeRef>) {
    for owner in &CHAIN_OWNERS {
        if let Some(top) = owner.get().and_then(|take| take(value)) {
            out.push(top);
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NodeRef
// ---------------------------------------------------------------------------------------------

/// An owning, reference-counted pointer to a node.
pub(crate) struct NodeRef(NonNull<Header>);

// SAFETY: nodes are immutable once published, except for the atomic reference count and the
// cancel-scope state, which is atomic or behind a lock; every key and value stored in a node is
// `Send + Sync`.
unsafe impl Send for NodeRef {}
// SAFETY: as above.
unsafe impl Sync for NodeRef {}

impl NodeRef {
    /// Allocates a node and links it above `parent` (taking over that reference).
    pub(crate) fn new_value<K: KeySlot, V: ValueSlot>(
        parent: Option<NodeRef>,
        tag: u64,
        flags: u16,
        key: K,
        value: V,
    ) -> NodeRef {
        Self::new_node(parent, tag, flags, key, value, &ValueNode::<K, V>::VTABLE)
    }

    /// Like [`NodeRef::new_value`], for nodes a `SessionMap` can re-bind when it compacts.
    pub(crate) fn new_rebindable<K: KeySlot + Clone, V: ValueSlot + Clone>(
        parent: Option<NodeRef>,
        tag: u64,
        flags: u16,
        key: K,
        value: V,
    ) -> NodeRef {
        Self::new_node(parent, tag, flags, key, value, &ValueNode::<K, V>::REBINDABLE_VTABLE)
    }

    fn new_node<K: KeySlot, V: ValueSlot>(
        parent: Option<NodeRef>,
        tag: u64,
        flags: u16,
        key: K,
        value: V,
        vtable: &'static VTable,
    ) -> NodeRef {
        debug_assert!(tag != 0 && flags & F_VALUE != 0);
        let node = ValueNode { header: Header::new(vtable, tag, flags), key, value };
        // A block this thread freed from a node of the same layout, else a fresh allocation
        // (see `blocks`); either way freed by `drop_and_free` with that layout.
        let ptr = match blocks::take(Layout::new::<ValueNode<K, V>>()) {
            Some(block) => {
                let block = block.cast::<ValueNode<K, V>>();
                // SAFETY: `take` hands over an unused block of exactly this type's layout.
                unsafe { block.as_ptr().write(node) };
                block.cast::<Header>()
            }
            None => NonNull::from(Box::leak(Box::new(node))).cast::<Header>(),
        };
        // Owned from here on: if linking unwinds (a user `Eq` panicking while the index table is
        // built), dropping `node` frees it — key and value included — and releases the parent,
        // instead of leaking the node and its whole chain. Until `link` marks a table as owned,
        // the node frees none.
        let node = NodeRef(ptr);
        // SAFETY: the node is fresh and unshared (`node` is its only reference, used by no one
        // while `link` runs).
        unsafe { link(ptr, parent) };
        node
    }

    /// Wraps a freshly allocated node whose header is initialized, linking it above `parent`.
    ///
    /// # Safety
    /// `ptr` points to an unshared node starting with a [`Header`] made by [`Header::new`],
    /// allocated so that its vtable's `drop_and_free` frees it.
    pub(crate) unsafe fn from_new(ptr: NonNull<Header>, parent: Option<NodeRef>) -> NodeRef {
        // Owned before linking, so that an unwind frees it (see `new_node`).
        let node = NodeRef(ptr);
        // SAFETY: forwarded from the caller.
        unsafe { link(ptr, parent) };
        node
    }

    /// Links a node that was never shared above another parent, returning the old parent.
    ///
    /// # Safety
    /// `self` has never been shared with another thread or cloned.
    pub(crate) unsafe fn relink(&mut self, parent: Option<NodeRef>) -> Option<NodeRef> {
        let h = self.0.as_ptr();
        // SAFETY: exclusive access (the caller's guarantee); the old table was built for this
        // node alone.
        unsafe {
            if (*h).flags & F_OWNS_TABLE != 0 {
                Table::free((*h).table);
                (*h).flags &= !F_OWNS_TABLE;
            }
            let old = ptr::replace(ptr::addr_of_mut!((*h).parent), None);
            link(self.0, parent);
            old
        }
    }

    /// Gives a fresh node one index table of its whole chain (down to the nearest barrier), as
    /// its only lookup structure: the bulk build after a `SessionMap` compaction, whose inner
    /// nodes were linked with [`F_NO_INDEX`]. O(chain length).
    ///
    /// # Safety
    /// `self` has never been shared with another thread or cloned, and owns no table.
    pub(crate) unsafe fn index_chain(&mut self) {
        let h = self.0.as_ptr();
        // SAFETY: exclusive access (the caller's guarantee); the chain below is alive (owned).
        unsafe {
            debug_assert!((*h).flags & F_OWNS_TABLE == 0);
            (*h).table = Table::build_bulk(NodePtr(self.0));
            (*h).flags = ((*h).flags | F_OWNS_TABLE) & !F_NO_INDEX;
            (*h).bloom = 0;
            (*h).seg = 0;
        }
    }

    #[inline]
    pub(crate) fn header(&self) -> &Header {
        // SAFETY: we hold a reference, so the node is alive.
        unsafe { self.0.as_ref() }
    }

    #[inline]
    pub(crate) fn ptr(&self) -> NodePtr {
        NodePtr(self.0)
    }

    /// Gives up the reference without releasing it.
    pub(crate) fn into_raw(self) -> NonNull<Header> {
        ManuallyDrop::new(self).0
    }

    /// Takes over a reference previously given up with [`NodeRef::into_raw`] (or one that a
    /// container owns and hands over).
    ///
    /// # Safety
    /// `ptr` carries one reference that nobody else will release.
    pub(crate) unsafe fn from_raw(ptr: NonNull<Header>) -> NodeRef {
        NodeRef(ptr)
    }

    /// A new reference to a node that is kept alive by someone else for the duration of the call.
    ///
    /// # Safety
    /// `ptr` points to a live node.
    pub(crate) unsafe fn clone_from_ptr(ptr: NodePtr) -> NodeRef {
        // SAFETY: the node is alive; incrementing its count gives us our own reference.
        unsafe { ptr.header() }.acquire_ref();
        NodeRef(ptr.0)
    }

    #[inline]
    pub(crate) fn ptr_eq(a: &NodeRef, b: &NodeRef) -> bool {
        a.0 == b.0
    }
}

impl Clone for NodeRef {
    #[inline]
    fn clone(&self) -> Self {
        self.header().acquire_ref();
        NodeRef(self.0)
    }
}

impl Drop for NodeRef {
    #[inline]
    fn drop(&mut self) {
        // Release: our uses of the node happen before whoever frees it (`Arc::drop`).
        if self.header().refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Acquire: every other holder's uses happen before we free.
        fence(Ordering::Acquire);
        // SAFETY: the count reached zero, so this was the last reference.
        unsafe { drop_chain(self.0) };
    }
}

impl core::fmt::Debug for NodeRef {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("NodeRef").field(&self.0).finish()
    }
}

/// Frees `ptr` and then every ancestor whose last reference it held, iteratively; and, also
/// iteratively, the chains of values that are contexts themselves (a `Context` stored in a
/// `Context`, a million levels deep, must not drop recursively). Such chains go to a work list
/// that allocates only when one is met.
///
/// # Safety
/// `ptr`'s reference count has reached zero.
unsafe fn drop_chain(ptr: NonNull<Header>) {
    let mut nested: Vec<NodeRef> = Vec::new();
    let mut next = Some(ptr);
    loop {
        while let Some(ptr) = next.take() {
            // SAFETY: the count reached zero (the caller's guarantee, then `release`'s).
            let parent = unsafe { unlink(ptr) };
            // SAFETY: the node is unreachable now; its vtable knows how it was allocated.
            unsafe { ((*ptr.as_ptr()).vtable.drop_and_free)(ptr, &mut nested) };
            if let Some(parent) = parent {
                next = release(parent);
            }
        }
        match nested.pop() {
            Some(chain) => next = release(chain),
            None => return,
        }
    }
}

/// The first step of freeing a node: detaches a cancel scope from its parent scope and moves the
/// parent reference out, for the caller to release. Shared by [`drop_chain`] and [`Dying`].
///
/// # Safety
/// `ptr`'s reference count has reached zero and the caller alone has it.
unsafe fn unlink(ptr: NonNull<Header>) -> Option<NodeRef> {
    // SAFETY: nothing else owns the node. A cancel scope may still be listed in its parent
    // scope; its vtable's `detach` removes it (taking the parent's lock) before anything is
    // freed, and only shared references are formed until then.
    unsafe {
        if let Some(detach) = (*ptr.as_ptr()).vtable.detach {
            detach(ptr);
        }
        ptr::replace(ptr::addr_of_mut!((*ptr.as_ptr()).parent), None)
    }
}

/// Gives up `node` without recursing: returns its pointer if that was the last reference (the
/// caller then frees it), `None` otherwise.
#[inline]
fn release(node: NodeRef) -> Option<NonNull<Header>> {
    let node = ManuallyDrop::new(node);
    // Release/Acquire: as in `NodeRef::drop`.
    if node.header().refs.fetch_sub(1, Ordering::Release) != 1 {
        return None;
    }
    fence(Ordering::Acquire);
    Some(node.0)
}

/// Nodes whose last reference is gone, freed a few at a time: a `SessionMap`'s old chains after
/// compaction (see `SessionMap::free_graves`). Freeing a whole chain at once — one free per node
/// and per replaced value, dozens in a row — overflows the allocator's per-thread cache (glibc
/// keeps 7 chunks per size), and every free past it, and every allocation of the writes after
/// it, goes to the shared heap (under a lock, once the process has had a second thread). Freed a
/// few per write instead, a writer's frees match its allocations and stay in that cache.
///
/// Freeing is [`drop_chain`]'s walk, cut into steps: a step frees one node and queues its parent
/// (and any chain a value of it held) if that was the last reference. What a step queues is
/// queued *before* the node's contents are dropped, so a panicking value `Drop` loses nothing:
/// the rest of the chain stays queued for the next step instead of being dropped during the
/// unwind. Dropping the list frees everything still queued; if a value's `Drop` panics then,
/// what is still queued is leaked rather than dropped during that unwind (where a second panic
/// would abort the process).
pub(crate) struct Dying {
    /// Nodes whose reference count has reached zero, not yet freed.
    pending: Vec<NonNull<Header>>,
    /// About how many nodes are still to free: the lengths of the chains pushed with
    /// [`push_chain`](Dying::push_chain), less the nodes freed since (an estimate: a chain's
    /// nodes still shared with a snapshot are not freed, and nested chains are not counted).
    backlog: usize,
    /// References to chains that freed values held (a `Context` stored in a map), not yet
    /// released. Not dropped by unwinding (see the type's docs); released by `free_some`, and its
    /// buffer freed at the end of `drop`.
    nested: ManuallyDrop<Vec<NodeRef>>,
}

// SAFETY: the queued nodes are owned by the list alone (their count reached zero), and nodes
// hold only `Send + Sync` keys and values (they are shared across threads while alive).
unsafe impl Send for Dying {}

impl Dying {
    pub(crate) const fn new() -> Dying {
        Dying { pending: Vec::new(), backlog: 0, nested: ManuallyDrop::new(Vec::new()) }
    }

    /// Queues a chain of about `len` nodes (see [`push`](Dying::push)) and counts it in the
    /// [`backlog`](Dying::backlog).
    pub(crate) fn push_chain(&mut self, chain: NodeRef, len: usize) {
        self.backlog = self.backlog.saturating_add(len);
        self.push(chain);
    }

    /// About how many nodes are still to free (0 once nothing is queued).
    pub(crate) fn backlog(&self) -> usize {
        self.backlog
    }

    /// Queues `node` for freeing if this was its last reference.
    pub(crate) fn push(&mut self, node: NodeRef) {
        if let Some(last) = release(node) {
            self.pending.push(last);
        }
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.nested.is_empty()
    }

    /// Frees up to `budget` nodes (runs their keys' and values' `Drop`, user code).
    pub(crate) fn free_some(&mut self, mut budget: usize) {
        while budget > 0 {
            if let Some(chain) = self.nested.pop() {
                self.push(chain);
                continue;
            }
            let Some(ptr) = self.pending.pop() else {
                self.backlog = 0;
                return;
            };
            budget -= 1;
            self.backlog = self.backlog.saturating_sub(1);
            // SAFETY: the node's count reached zero and only this list has it.
            let parent = unsafe { unlink(ptr) };
            // Queued before the contents run user code (see the type's docs).
            if let Some(parent) = parent {
                self.push(parent);
            }
            // SAFETY: the node is unreachable; its vtable knows how it was allocated. Nested
            // chains go to `self.nested`, kept if a later field's drop unwinds.
            unsafe { ((*ptr.as_ptr()).vtable.drop_and_free)(ptr, &mut self.nested) };
        }
    }
}

impl Drop for Dying {
    fn drop(&mut self) {
        while !self.is_empty() {
            self.free_some(usize::MAX);
        }
        // SAFETY: `nested` is empty and never used again (this is the list's drop).
        unsafe { ManuallyDrop::drop(&mut self.nested) };
    }
}

/// Sets a fresh node's parent and its lookup fields (segment, bloom filter, index table).
///
/// # Safety
/// `ptr` is a fresh, unshared node with an initialized header.
unsafe fn link(ptr: NonNull<Header>, parent: Option<NodeRef>) {
    let (table, bloom, seg) = match &parent {
        Some(p) => {
            let ph = p.header();
            (ph.table, ph.bloom, ph.seg)
        }
        None => (ptr::null(), 0, 0),
    };
    let h = ptr.as_ptr();
    // SAFETY: a barrier hides everything below it: start from an empty filter and no table.
    let (table, bloom, seg) =
        if unsafe { (*h).flags } & F_BARRIER != 0 { (ptr::null(), 0, 0) } else { (table, bloom, seg) };
    // SAFETY: exclusive access to a fresh node (the caller's guarantee). Fields are written
    // through the raw pointer so that no reference outlives the table build below, which reads
    // the node through `ptr` again.
    unsafe {
        (*h).parent = parent;
        (*h).table = table;
        if (*h).flags & F_VALUE == 0 {
            // Scopes are transparent to lookups.
            (*h).bloom = bloom;
            (*h).seg = seg;
            return;
        }
        (*h).bloom = bloom | bloom_bit((*h).tag);
        (*h).seg = seg.saturating_add(1);
        if (*h).seg >= SEGMENT && (*h).flags & F_NO_INDEX == 0 {
            // The chain below the fresh node is alive: the node owns its parent.
            (*h).table = Table::build(NodePtr(ptr), table);
            (*h).flags |= F_OWNS_TABLE;
            (*h).bloom = 0;
            (*h).seg = 0;
        }
    }
}

impl Header {
    pub(crate) fn new(vtable: &'static VTable, tag: u64, flags: u16) -> Header {
        Header { refs: AtomicUsize::new(1), vtable, parent: None, tag, table: ptr::null(), bloom: 0, seg: 0, flags }
    }

    #[inline]
    fn acquire_ref(&self) {
        // Relaxed: a new reference can only be made from an existing one (`Arc::clone`).
        let old = self.refs.fetch_add(1, Ordering::Relaxed);
        if old > MAX_REFS {
            abort_on_overflow();
        }
    }

    /// Takes a new reference unless the count already reached zero (the node is being freed).
    /// Used by a cancel scope to reach its children, under the lock their `detach` needs.
    pub(crate) fn try_acquire_ref(&self) -> bool {
        let mut n = self.refs.load(Ordering::Relaxed);
        loop {
            if n == 0 {
                return false;
            }
            if n > MAX_REFS {
                abort_on_overflow();
            }
            // Relaxed: as in `acquire_ref`; the caller's lock orders it with `detach`.
            match self.refs.compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => n = actual,
            }
        }
    }

    #[inline]
    pub(crate) fn is_value(&self) -> bool {
        self.flags & F_VALUE != 0
    }

    #[inline]
    pub(crate) fn is_tombstone(&self) -> bool {
        self.flags & F_TOMBSTONE != 0
    }

    /// The node type's re-binding function, for nodes made with [`NodeRef::new_rebindable`].
    #[inline]
    pub(crate) fn vtable_rebind(&self) -> Option<RebindFn> {
        self.vtable.rebind
    }
}

/// A non-owning pointer to a live node, with the provenance of the whole allocation.
///
/// Everything that reaches past the [`Header`] into a node's key or value goes through a
/// `NodePtr`, never through a `&Header`: a reference to the header only grants access to the
/// header's bytes (Stacked Borrows), while the pointer kept in a [`NodeRef`] or a table entry
/// was made from the allocation itself.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct NodePtr(pub(crate) NonNull<Header>);

impl NodePtr {
    /// The header, for reading its fields.
    ///
    /// # Safety
    /// The node is alive for `'a`.
    #[inline]
    pub(crate) unsafe fn header<'a>(self) -> &'a Header {
        // SAFETY: forwarded from the caller.
        unsafe { &*self.0.as_ptr() }
    }

    /// # Safety
    /// The node is alive.
    #[inline]
    pub(crate) unsafe fn parent(self) -> Option<NodePtr> {
        // SAFETY: forwarded; the parent pointer read out keeps its own provenance.
        unsafe { (*self.0.as_ptr()).parent.as_ref().map(|p| NodePtr(p.0)) }
    }

    /// The node's value (value nodes only), borrowed for as long as `_owner` — what keeps the
    /// node alive: a reference to the chain, or an epoch guard — is borrowed.
    ///
    /// # Safety
    /// The node is a value node that `_owner` keeps alive while it is borrowed.
    #[inline]
    pub(crate) unsafe fn value<O: ?Sized>(self, _owner: &O) -> &(dyn Any + Send + Sync) {
        // SAFETY: forwarded; the value lives as long as the node.
        unsafe { &*((*self.0.as_ptr()).vtable.value)(self.0) }
    }

    /// The node's value as a shared handle, when stored as one.
    ///
    /// # Safety
    /// The node is a live value node.
    pub(crate) unsafe fn shared_value(self) -> Option<Arc<dyn Any + Send + Sync>> {
        // SAFETY: forwarded.
        unsafe { ((*self.0.as_ptr()).vtable.shared)(self.0) }
    }

    /// The node's hashed key (`None` for a typed key).
    ///
    /// # Safety
    /// The node is a value node alive for `'a`.
    pub(crate) unsafe fn key_any<'a>(self) -> Option<&'a (dyn Any + Send + Sync)> {
        // SAFETY: forwarded; the key lives as long as the node.
        unsafe { ((*self.0.as_ptr()).vtable.key_any)(self.0).map(|k| &*k) }
    }

    /// The value of a node made by the typed API for `T` (see [`F_TYPED_INLINE`]), borrowed for
    /// as long as `_owner`, which keeps the node alive, is borrowed.
    ///
    /// # Safety
    /// `_owner` keeps the node alive while it is borrowed, the node's flags have
    /// [`F_TYPED_INLINE`] and its tag is the address of a `Key<T>`.
    #[inline]
    pub(crate) unsafe fn typed_value<T, O: ?Sized>(self, _owner: &O) -> &T {
        let node = self.0.as_ptr().cast::<ValueNode<TypedKey, InlineValue<T>>>();
        // SAFETY: only `Context::with` sets the flag, on a `ValueNode<TypedKey, InlineValue<T>>`
        // whose tag is the address of its `&'static Key<T>`; a static address names one key, so
        // one `T`.
        unsafe { &(*node).value.0 }
    }

    /// The field at `offset` bytes into the node, as a `*const T`, with the provenance of the
    /// whole allocation (the offsets come from the node's [`VTable`]).
    ///
    /// # Safety
    /// The node is alive and a `T` lives at `offset` in it.
    #[inline]
    unsafe fn field_at<T>(self, offset: usize) -> *const T {
        // SAFETY: forwarded; `offset` is within the node's allocation.
        unsafe { self.0.as_ptr().cast::<u8>().add(offset).cast::<T>() }
    }

    /// Whether this value node binds `key` (its tag already compared): for a key stored inline
    /// as a `K`, a type check and `K::eq` with no indirect call; for an erased key, the node's
    /// `key_eq`, as [`matches`](NodePtr::matches) does. `KeyQuery::new(key)` and `matches`
    /// agree with this on every node.
    ///
    /// # Safety
    /// The node is a live value node.
    #[inline]
    pub(crate) unsafe fn key_is<K: Eq + Any + Send + Sync>(self, key: &K) -> bool {
        // SAFETY: the vtable is the node's own; `inline_key` is `Some` only for a
        // `ValueNode<InlineKey<K'>, _>` (`K'`'s type id and the offset of its `key` field, which
        // is a transparent `InlineKey<K'>`), so equal type ids make the bytes at that offset a
        // live `K`, in the allocation `self` has provenance over.
        unsafe {
            let vtable = (*self.0.as_ptr()).vtable;
            match vtable.inline_key {
                Some((t, offset)) => t == TypeId::of::<K>() && *self.field_at::<K>(offset) == *key,
                None => (vtable.key_eq)(self.0, key),
            }
        }
    }

    /// The node's value if it is a `V`, borrowed for as long as `_owner` — what keeps the node
    /// alive — is borrowed. For a value stored inline as a `V` (a context's) or as an `Arc<V>` (a
    /// `SessionMap`'s), a type check and a load with no indirect call; otherwise
    /// [`value`](NodePtr::value) and a downcast.
    ///
    /// # Safety
    /// The node is a value node that `_owner` keeps alive while it is borrowed.
    #[inline]
    pub(crate) unsafe fn value_as<V: Any, O: ?Sized>(self, owner: &O) -> Option<&V> {
        // SAFETY: `shared_value` is `Some` only for a `ValueNode<_, SharedValue<_, V'>>` (`V'`
        // sized; its type id and the offset of its `value` field, a transparent `Arc<V'>`), and
        // `inline_value` only for a `ValueNode<_, InlineValue<V'>>` (the offset of its `value`
        // field, a transparent `V'`), so equal type ids make the bytes at that offset a live
        // `Arc<V>` or `V`, in the allocation `self` has provenance over, living as long as the
        // node. Otherwise forwarded.
        unsafe {
            let vtable = (*self.0.as_ptr()).vtable;
            if let Some((t, offset)) = vtable.shared_value {
                (t == TypeId::of::<V>()).then(|| &**self.field_at::<Arc<V>>(offset))
            } else if let Some((t, offset)) = vtable.inline_value {
                (t == TypeId::of::<V>()).then(|| &*self.field_at::<V>(offset))
            } else {
                self.value(owner).downcast_ref::<V>()
            }
        }
    }

    /// The node's value as an owned `Arc<V>`, if it is stored as a shared handle to a `V`
    /// ([`shared_value`](NodePtr::shared_value) and a downcast, with no indirect call for a
    /// value stored as an `Arc<V>`).
    ///
    /// # Safety
    /// The node is a live value node.
    #[inline]
    pub(crate) unsafe fn shared_as<V: Any + Send + Sync>(self) -> Option<Arc<V>> {
        // SAFETY: as in `value_as`.
        unsafe {
            match (*self.0.as_ptr()).vtable.shared_value {
                Some((t, offset)) => (t == TypeId::of::<V>()).then(|| Arc::clone(&*self.field_at::<Arc<V>>(offset))),
                None => self.shared_value()?.downcast::<V>().ok(),
            }
        }
    }

    /// Whether this node binds the key `q` asks for.
    ///
    /// # Safety
    /// The node is alive.
    #[inline]
    pub(crate) unsafe fn matches(self, q: &KeyQuery<'_>) -> bool {
        // SAFETY: forwarded. A non-zero tag means a value node, whose vtable has `key_eq`.
        unsafe {
            (*self.0.as_ptr()).tag == q.tag
                && match q.key {
                    None => true,
                    Some(key) => ((*self.0.as_ptr()).vtable.key_eq)(self.0, key),
                }
        }
    }

    /// Whether `self` and `other` bind the same key.
    ///
    /// # Safety
    /// Both are live value nodes.
    unsafe fn same_key(self, other: NodePtr) -> bool {
        // SAFETY: forwarded. Two inline keys of one type: `other`'s `inline_key` offset locates
        // a live key of the type `self`'s `key_eq_same_type` compares with (see `key_is`).
        unsafe {
            if (*self.0.as_ptr()).tag != (*other.0.as_ptr()).tag {
                return false;
            }
            let (a, b) = ((*self.0.as_ptr()).vtable, (*other.0.as_ptr()).vtable);
            if let (Some((ta, _)), Some((tb, offset))) = (a.inline_key, b.inline_key) {
                return ta == tb && (a.key_eq_same_type)(self.0, other.field_at::<()>(offset));
            }
            self.same_key_erased(other)
        }
    }

    /// [`same_key`](NodePtr::same_key) when either key is not inline (tags already equal):
    /// through the nodes' vtables. Out of line, so that the inline-key case stays small enough
    /// to inline into the table builds' loops.
    ///
    /// # Safety
    /// Both are live value nodes.
    #[inline(never)]
    unsafe fn same_key_erased(self, other: NodePtr) -> bool {
        // SAFETY: forwarded.
        unsafe {
            match other.key_any() {
                None => true,
                Some(key) => ((*self.0.as_ptr()).vtable.key_eq)(self.0, key),
            }
        }
    }
}

// SAFETY: a table entry is the node's allocation pointer, and `from_entry` rebuilds the
// `NodePtr` from it with the same provenance; every method below only reads the header or calls
// the node's vtable, as the inherent methods do, under the caller's liveness guarantee.
unsafe impl ChainNode for NodePtr {
    #[inline]
    fn to_entry(self) -> *const () {
        self.0.as_ptr().cast_const().cast()
    }

    #[inline]
    unsafe fn from_entry(entry: *const ()) -> NodePtr {
        // SAFETY: non-null (the caller's guarantee); made from a `NodePtr` by `to_entry`.
        NodePtr(unsafe { NonNull::new_unchecked(entry.cast::<Header>().cast_mut()) })
    }

    #[inline]
    unsafe fn tag(self) -> u64 {
        // SAFETY: forwarded.
        unsafe { self.header() }.tag
    }

    #[inline]
    unsafe fn is_value(self) -> bool {
        // SAFETY: forwarded.
        unsafe { self.header() }.is_value()
    }

    #[inline]
    unsafe fn is_tombstone(self) -> bool {
        // SAFETY: forwarded.
        unsafe { self.header() }.is_tombstone()
    }

    #[inline]
    unsafe fn is_barrier(self) -> bool {
        // SAFETY: forwarded.
        unsafe { self.header() }.flags & F_BARRIER != 0
    }

    #[inline]
    unsafe fn table(self) -> *const Entry {
        // SAFETY: forwarded.
        unsafe { self.header() }.table
    }

    #[inline]
    unsafe fn owns_table(self, table: *const Entry) -> bool {
        // SAFETY: forwarded.
        let h = unsafe { self.header() };
        h.flags & F_OWNS_TABLE != 0 && h.table == table
    }

    #[inline]
    unsafe fn parent(self) -> Option<NodePtr> {
        // SAFETY: forwarded.
        unsafe { NodePtr::parent(self) }
    }

    #[inline]
    unsafe fn same_key(self, other: NodePtr) -> bool {
        // SAFETY: forwarded.
        unsafe { NodePtr::same_key(self, other) }
    }
}

#[cold]
fn abort_on_overflow() -> ! {
    // A panic while panicking aborts, also without `std::process::abort`.
    struct Abort;
    impl Drop for Abort {
        fn drop(&mut self) {
            panic!("localsession: node reference count overflow");
        }
    }
    let _abort = Abort;
    panic!("localsession: node reference count overflow");
}

#[inline]
fn bloom_bit(tag: u64) -> u32 {
    1 << (mix(tag) >> 59)
}

/// Finds the newest node at or below `top` that binds `q` (a tombstone included).
///
/// # Safety
/// `top` is alive; the result lives as long as `top` does.
#[inline]
pub(crate) unsafe fn lookup(top: NodePtr, q: &KeyQuery<'_>) -> Option<NodePtr> {
    // SAFETY: forwarded; `matches` reads live nodes only.
    unsafe { lookup_by(top, q.tag, |n| n.matches(q)) }
}

/// Finds the newest node at or below `top` whose tag is `tag` and that `matches` (a tombstone
/// included): [`lookup`] for a caller that compares keys itself, without the indirect calls of
/// [`NodePtr::matches`] ([`NodePtr::key_is`]). `matches` is only called with nodes of that tag.
///
/// # Safety
/// `top` is alive; the result lives as long as `top` does; `matches` may be called with any
/// live node of the chain.
#[inline]
pub(crate) unsafe fn lookup_by(top: NodePtr, tag: u64, matches: impl Fn(NodePtr) -> bool) -> Option<NodePtr> {
    let bit = bloom_bit(tag);
    let mut node = top;
    // SAFETY: every node reached is `top` or an ancestor, alive as long as `top`. `table` is
    // null or the table of a node at or below `node`; its entries point to nodes at or below that.
    unsafe {
        while node.header().bloom & bit != 0 {
            if node.header().tag == tag && matches(node) {
                return Some(node);
            }
            node = node.parent()?;
        }
        Table::find_by(node.header().table, tag, matches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::hashed_tag;

    fn bind(parent: Option<NodeRef>, k: u64, v: u64) -> NodeRef {
        NodeRef::new_value(parent, hashed_tag(&k), F_VALUE, InlineKey(k), InlineValue(v))
    }

    fn get(top: &NodeRef, k: u64) -> Option<u64> {
        let q = KeyQuery::new(&k);
        // SAFETY: `top` is alive for the call.
        unsafe { lookup(top.ptr(), &q).map(|n| *n.value(top).downcast_ref::<u64>().unwrap()) }
    }

    #[test]
    fn header_is_48_bytes_on_64_bit() {
        if core::mem::size_of::<usize>() == 8 {
            assert_eq!(core::mem::size_of::<Header>(), 48);
            assert_eq!(core::mem::size_of::<ValueNode<TypedKey, InlineValue<()>>>(), 48);
        }
    }

    /// The two ways compaction lists a chain's bindings agree: from the index levels
    /// (`for_each_binding_unordered`) and, where no table covers the chain, by walking it
    /// (`for_each_binding`, past its short list: its hash set by tag and the side list of keys
    /// whose tag another key has). Keys re-bound three times each, with their own tags and
    /// with one tag shared by every key; each listing must give exactly the newest binding of
    /// every key.
    #[test]
    fn listing_from_the_tables_and_walking_the_chain_agree() {
        let keys: u64 = if cfg!(miri) { 40 } else { 300 };
        for shared_tag in [false, true] {
            let tag_of = |k: u64| if shared_tag { 7 } else { hashed_tag(&k) };
            let (mut indexed, mut walked): (Option<NodeRef>, Option<NodeRef>) = (None, None);
            for i in 0..keys * 3 {
                let k = (i * 7919) % keys;
                indexed = Some(NodeRef::new_value(indexed.take(), tag_of(k), F_VALUE, InlineKey(k), InlineValue(i)));
                let flags = F_VALUE | F_NO_INDEX;
                walked = Some(NodeRef::new_value(walked.take(), tag_of(k), flags, InlineKey(k), InlineValue(i)));
            }
            let newest: Vec<u64> = (keys * 2..keys * 3).collect();
            for (top, indexed) in [(indexed.unwrap(), true), (walked.unwrap(), false)] {
                assert_eq!(!top.header().table.is_null(), indexed, "shared tag {shared_tag}");
                let mut listed = Vec::new();
                // SAFETY: `top` (and so its chain) is alive for the call.
                unsafe {
                    crate::index::for_each_binding_unordered(top.ptr(), None, |n: NodePtr| {
                        listed.push(*n.value(&top).downcast_ref::<u64>().unwrap());
                    });
                }
                listed.sort_unstable();
                assert_eq!(listed, newest, "indexed {indexed}, shared tag {shared_tag}");
            }
        }
    }

    #[test]
    fn lookups_across_tables_see_the_newest_binding() {
        let mut top = bind(None, 0, 0);
        for i in 1..200u64 {
            top = bind(Some(top), i % 37, i);
        }
        for k in 0..37u64 {
            let newest = (0..200u64).filter(|i| i % 37 == k).max().unwrap();
            assert_eq!(get(&top, k), Some(newest), "key {k}");
        }
        assert_eq!(get(&top, 1000), None);
    }

    /// A chain that keeps rebinding 10 keys gets a new top table every `SEGMENT` bindings, each
    /// merging the previous one: the table is sized for its distinct keys (32 slots for 10 keys
    /// at load <= 1/2), not for the segment's keys counted once more (64 slots, a > 1 KiB
    /// allocation: glibc consolidates its fast bins before serving one, 7% of a small map's
    /// inserts).
    #[test]
    fn tables_over_rebound_keys_are_sized_for_their_distinct_keys() {
        let mut top = bind(None, 0, 0);
        for i in 1..400u64 {
            top = bind(Some(top), i % 10, i);
            let table = top.header().table;
            if !table.is_null() {
                // SAFETY: the table of a live node is live.
                let (slots, len) = unsafe { crate::index::Table::shape(table) };
                assert!(len <= 10, "a table of 10 keys holds {len} entries");
                assert!(slots <= 32, "a table of {len} keys has {slots} slots");
            }
        }
        for k in 0..10u64 {
            assert_eq!(get(&top, k), (0..400u64).filter(|i| i % 10 == k).max());
        }
    }

    #[test]
    fn every_depth_finds_every_key() {
        let mut nodes = Vec::new();
        let mut top: Option<NodeRef> = None;
        let depth: u64 = if cfg!(miri) { 30 } else { 100 };
        for i in 0..depth {
            let n = bind(top.take(), i, i * 10);
            nodes.push(n.clone());
            top = Some(n);
        }
        for (d, n) in nodes.iter().enumerate() {
            for k in 0..depth {
                let expect = (k as usize <= d).then_some(k * 10);
                assert_eq!(get(n, k), expect, "depth {d} key {k}");
            }
        }
    }

    #[test]
    fn deep_chain_drops_iteratively() {
        let mut top = bind(None, 0, 0);
        for i in 1..if cfg!(miri) { 2_000 } else { 100_000 } {
            top = bind(Some(top), i & 7, i);
        }
        drop(top);
    }

    /// Regression: a user `Eq` panicking while `Context::with_value` builds an index table used
    /// to leak the fresh node and, through its parent link, the whole chain under it.
    #[test]
    fn panicking_eq_while_indexing_leaks_nothing() {
        extern crate std;
        use core::panic::AssertUnwindSafe;
        use core::sync::atomic::AtomicUsize;
        use std::panic::catch_unwind;

        static COMPARISONS: AtomicUsize = AtomicUsize::new(0);
        static PANIC_AT: AtomicUsize = AtomicUsize::new(100);
        static DROPS: AtomicUsize = AtomicUsize::new(0);

        /// Every key hashes alike, so building a table compares keys; the comparison numbered
        /// `PANIC_AT` panics (and moves `PANIC_AT` further on).
        struct PanicKey(u32);
        impl core::hash::Hash for PanicKey {
            fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
                state.write_u8(0);
            }
        }
        impl PartialEq for PanicKey {
            fn eq(&self, other: &Self) -> bool {
                let n = COMPARISONS.fetch_add(1, Ordering::SeqCst) + 1;
                if n == PANIC_AT.load(Ordering::SeqCst) {
                    PANIC_AT.store(n * 3, Ordering::SeqCst);
                    panic!("Eq panics after {n} comparisons");
                }
                self.0 == other.0
            }
        }
        impl Eq for PanicKey {}
        struct Counted;
        impl Drop for Counted {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::SeqCst);
            }
        }

        let depth: u32 = if cfg!(miri) { 40 } else { 200 };
        let mut ctx = crate::Context::background();
        let mut panics = 0;
        for i in 0..depth {
            match catch_unwind(AssertUnwindSafe(|| ctx.with_value(PanicKey(i), Counted))) {
                Ok(deeper) => ctx = deeper,
                Err(_) => panics += 1,
            }
        }
        assert!(panics >= 1, "no comparison panicked");
        drop(ctx);
        assert_eq!(DROPS.load(Ordering::SeqCst), depth as usize, "every value was dropped");
    }

    /// A freed value node's block goes to this thread's cache and the thread's next node of the
    /// same layout takes it; a node of another layout does not; at most `blocks::CAP` are kept
    /// (with `std`; without it nothing is kept). Each test runs on its own thread, so the cache
    /// starts empty.
    #[test]
    fn freed_node_blocks_are_reused_by_the_next_node_of_their_layout() {
        let cache = cfg!(feature = "std");
        assert_eq!(blocks::cached(), 0);
        let first = bind(None, 1, 1);
        let address = first.ptr().0.as_ptr() as usize;
        drop(first);
        assert_eq!(blocks::cached(), usize::from(cache));
        // Another layout (a `u32` key): not this block.
        let other = NodeRef::new_value(None, hashed_tag(&2u32), F_VALUE, InlineKey(2u32), InlineValue(2u8));
        assert_ne!(other.ptr().0.as_ptr() as usize, address);
        assert_eq!(blocks::cached(), usize::from(cache));
        let second = bind(None, 3, 3);
        // (Without the cache the allocator may or may not hand out the same address.)
        if cache {
            assert_eq!(second.ptr().0.as_ptr() as usize, address);
        }
        assert_eq!(get(&second, 3), Some(3), "the reused block holds the new node");
        assert_eq!(blocks::cached(), 0);
        drop((other, second));
        assert_eq!(blocks::cached(), 2 * usize::from(cache));

        // A chain longer than the cap: the rest goes back to the allocator. (Only with the
        // cache: without it there is nothing to bound, and miri runs this without `std`.)
        if cache {
            let mut top = None;
            for k in 0..(blocks::CAP as u64 + 10) {
                top = Some(bind(top, k, k));
            }
            drop(top);
            assert_eq!(blocks::cached(), blocks::CAP);
        }
    }

    /// A value whose `Drop` panics: the panic reaches the caller, and the node's block is still
    /// kept or freed (not leaked), and a later node takes it.
    #[test]
    fn a_panicking_value_drop_still_gives_the_block_back() {
        extern crate std;
        use core::panic::AssertUnwindSafe;
        use std::panic::catch_unwind;

        struct Boom;
        impl Drop for Boom {
            fn drop(&mut self) {
                panic!("a value's Drop panics");
            }
        }
        let cache = cfg!(feature = "std");
        let node = NodeRef::new_value(None, hashed_tag(&7u64), F_VALUE, InlineKey(7u64), InlineValue(Boom));
        let address = node.ptr().0.as_ptr() as usize;
        assert!(catch_unwind(AssertUnwindSafe(|| drop(node))).is_err(), "the panic reaches the caller");
        assert_eq!(blocks::cached(), usize::from(cache));
        // `Boom` and `()` are both zero-sized: a node of the same layout.
        let next = NodeRef::new_value(None, hashed_tag(&8u64), F_VALUE, InlineKey(8u64), InlineValue(()));
        if cache {
            assert_eq!(next.ptr().0.as_ptr() as usize, address);
        }
        drop(next);
    }
}

//! The probe tree: an ordered map from a key `K` to a probe, read without locks.
//!
//! # Algorithm: a copy-on-write B-tree published by one pointer
//!
//! Nodes are immutable once published. A writer never changes a node: it copies the nodes on
//! the path from the root to the leaf it changes (splitting or merging on the way, as a B-tree
//! does), then publishes the new root with one release store. Readers load the root (acquire)
//! and walk down; whatever root they loaded is a complete, consistent tree, forever — until
//! a grace period after it was replaced, when the nodes that only the old version used are freed.
//!
//! So a lookup takes no lock, writes nothing, never retries, and finishes in at most
//! `height × B` key comparisons (`B` = [`NODE_CAPACITY`], height ≤ log_{B/4}(n) + 1): bounded,
//! and safe inside a signal handler or an interrupt (no allocation, no lock, no spin).
//!
//! A write costs `O(height)` node copies (allocation may fail: the write then returns
//! [`Error::NoMemory`] and publishes nothing) and one grace period, deferred, to free the copies'
//! originals. Writers are serialized by the caller (the registry's tree lock). Probe writes are
//! rare next to probe hits, which is the trade this structure makes.
//!
//! Why not the kernel's single rbtree under a seqcount (lock-free readers that retry, or fall back
//! to the lock, when a writer ran)? Rotations in place make a reader's result unusable whenever any
//! writer ran, and the rbtree's pointer chasing costs a cache miss per level; a B-tree node holds
//! 16 keys in four cache lines, so a 100 000-probe tree is 5 levels deep instead of ~17. The
//! measurement behind the choice is in ARCHITECTURE.md.
//!
//! # Invariants
//!
//! * INVARIANT: a published node is never written again; it is freed only through a deferred
//!   callback queued after the root that last reached it was replaced.
//! * INVARIANT: leaves hold 1..=B entries sorted by key; internal nodes hold 1..=B children, and
//!   for i ≥ 1 every key of child i-1 is `< keys[i] ≤` every key of child i (`keys[0]` is not
//!   used for routing and may be stale).
//! * INVARIANT: after a removal, a child with fewer than [`NODE_MIN`] entries is merged with or
//!   refilled from a sibling, so the height stays logarithmic in the number of entries.
//! * The tree does not own its values: it stores `*const V` and never dereferences them — except
//!   through the hot-word hook of a tree made by [`CowTree::with_hot`], under the write lock.
//! * INVARIANT (hot words): each leaf entry has one atomic *hot word* beside it, outside the
//!   immutable body: what a reader needs next from the value (the registry's: the probe's
//!   consumer list), so a lookup reaches it without loading the value first. A fresh leaf's
//!   hot words are filled from the hook before the root that publishes it is stored; after
//!   that they are written only by [`CowTree::set_hot`], under the write lock — so a copy of a
//!   leaf (also made under the write lock) always carries the current word.

use crate::alloc_util::{try_box, try_vec_with_capacity};
use crate::error::{Error, Result};
use crate::rcu::{Deferred, Rcu};
use crate::sync::{AtomicPtr, AtomicUsize, FreeCheck, Ordering, UnsafeCell};
use crate::types::ProbeKey;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr;

/// Maximum entries per node.
pub const NODE_CAPACITY: usize = 16;
/// Below this a node is rebalanced with a sibling after a removal.
pub const NODE_MIN: usize = NODE_CAPACITY / 4;

const B: usize = NODE_CAPACITY;

struct Body<K, V> {
    leaf: bool,
    len: usize,
    keys: [K; B],
    /// Leaf: `*const V`. Internal: `*mut Node<K, V>`.
    ptrs: [*const (); B],
    _v: core::marker::PhantomData<*const V>,
}

impl<K: TreeKey, V> Clone for Body<K, V> {
    fn clone(&self) -> Self {
        Self {
            leaf: self.leaf,
            len: self.len,
            keys: self.keys,
            ptrs: self.ptrs,
            _v: self._v,
        }
    }
}

impl<K: TreeKey, V> Body<K, V> {
    fn empty(leaf: bool) -> Self {
        Self {
            leaf,
            len: 0,
            keys: [K::MIN; B],
            ptrs: [ptr::null(); B],
            _v: core::marker::PhantomData,
        }
    }

    /// Index of the child that routes `key`: the last `i` with `keys[i] <= key`, or 0.
    #[inline]
    fn route(&self, key: &K) -> usize {
        let mut i = 1;
        while i < self.len && self.keys[i] <= *key {
            i += 1;
        }
        i - 1
    }

    /// Leaf: `Ok(i)` if `keys[i] == key`, else `Err(insertion point)`.
    #[inline]
    fn find(&self, key: &K) -> core::result::Result<usize, usize> {
        let mut i = 0;
        while i < self.len {
            if self.keys[i] >= *key {
                return if self.keys[i] == *key { Ok(i) } else { Err(i) };
            }
            i += 1;
        }
        Err(self.len)
    }

    fn insert_at(&mut self, i: usize, k: K, p: *const ()) {
        debug_assert!(self.len < B);
        self.keys.copy_within(i..self.len, i + 1);
        self.ptrs.copy_within(i..self.len, i + 1);
        self.keys[i] = k;
        self.ptrs[i] = p;
        self.len += 1;
    }

    fn remove_at(&mut self, i: usize) {
        self.keys.copy_within(i + 1..self.len, i);
        self.ptrs.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.keys[self.len] = K::MIN;
        self.ptrs[self.len] = ptr::null();
    }

    /// Splits a body of up to `2B` entries (given as slices) into two halves.
    fn halves(leaf: bool, keys: &[K], ptrs: &[*const ()]) -> (Self, Self) {
        Self::split_at(leaf, keys, ptrs, keys.len() / 2)
    }

    /// Splits a body of up to `2B` entries (given as slices): the first `mid` to the left.
    fn split_at(leaf: bool, keys: &[K], ptrs: &[*const ()], mid: usize) -> (Self, Self) {
        debug_assert!(mid <= B && keys.len() - mid <= B);
        let mut l = Self::empty(leaf);
        let mut r = Self::empty(leaf);
        l.keys[..mid].copy_from_slice(&keys[..mid]);
        l.ptrs[..mid].copy_from_slice(&ptrs[..mid]);
        l.len = mid;
        r.keys[..keys.len() - mid].copy_from_slice(&keys[mid..]);
        r.ptrs[..keys.len() - mid].copy_from_slice(&ptrs[mid..]);
        r.len = keys.len() - mid;
        (l, r)
    }
}

/// Cache-line aligned so a node's header and first keys share a line and no key straddles two.
#[repr(align(64))]
struct Node<K, V> {
    /// Written once, before publication; read through the facade's `UnsafeCell` so loom checks
    /// that publication orders the write before every read.
    body: UnsafeCell<Body<K, V>>,
    /// Leaves: entry `i`'s hot word (see the module's invariants). Unused in internal nodes.
    hot: [AtomicPtr<()>; B],
    free_check: FreeCheck,
}

/// Reads a node's body.
///
/// # Safety
///
/// `n` is a node reachable from a root the caller loaded with Acquire (or owns), and the caller
/// holds a read guard of the domain that retires this tree's nodes, or the tree's write lock.
#[inline(always)]
unsafe fn body<'a, K, V>(n: *const Node<K, V>) -> &'a Body<K, V> {
    // SAFETY: the caller's contract keeps the node allocated for 'a.
    let node = unsafe { &*n };
    node.free_check.check();
    // SAFETY: published bodies are never written again (INVARIANT), so a shared borrow is fine.
    node.body.with(|b| unsafe { &*b })
}

/// Frees a node that no reader can reach any more.
///
/// # Safety
///
/// `n` came from `Box::into_raw` in [`Builder::node`], and no reader can still reach it.
unsafe fn free_node<K, V>(n: *mut Node<K, V>) {
    // SAFETY: the caller's contract.
    let node = unsafe { Box::from_raw(n) };
    node.free_check.mark_freed();
    crate::sync::quarantine(node);
}

/// Builds the new version of a path: records fresh nodes (freed if the write fails) and the old
/// nodes they replace (freed a grace period after the write publishes).
struct Builder<K, V> {
    fresh: Vec<*mut Node<K, V>>,
    retired: Vec<*mut Node<K, V>>,
}

impl<K, V> Builder<K, V> {
    fn new() -> Result<Self> {
        Ok(Self {
            fresh: try_vec_with_capacity(16)?,
            retired: try_vec_with_capacity(16)?,
        })
    }

    fn node(&mut self, body: Body<K, V>) -> Result<*mut Node<K, V>> {
        if self.fresh.len() == self.fresh.capacity() {
            self.fresh
                .try_reserve(self.fresh.len())
                .map_err(|_| Error::NoMemory)?;
        }
        let n = Box::into_raw(try_box(Node {
            body: UnsafeCell::new(body),
            hot: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            free_check: FreeCheck::new(),
        })?);
        self.fresh.push(n);
        Ok(n)
    }

    fn retire(&mut self, n: *const Node<K, V>) -> Result<()> {
        if self.retired.len() == self.retired.capacity() {
            self.retired
                .try_reserve(self.retired.len())
                .map_err(|_| Error::NoMemory)?;
        }
        self.retired.push(n as *mut Node<K, V>);
        Ok(())
    }

    /// The write failed before publishing: free what it built.
    fn abort(self) {
        for n in self.fresh {
            // SAFETY: fresh nodes were never published, so no reader can reach them.
            unsafe { free_node(n) };
        }
    }
}

enum Ins<K, V> {
    One(*mut Node<K, V>),
    Split(*mut Node<K, V>, K, *mut Node<K, V>),
}

/// A key of a [`CowTree`]: ordered, copyable, with a least value.
pub trait TreeKey: Copy + Ord + 'static {
    /// The least key (fills unused slots; never compared as a real entry).
    const MIN: Self;
}

impl TreeKey for ProbeKey {
    const MIN: Self = ProbeKey::MIN;
}

impl TreeKey for u64 {
    const MIN: Self = 0;
}

/// The probe tree: probes by (object, offset).
pub type ProbeTree<V> = CowTree<ProbeKey, V>;

/// The copy-on-write B-tree. See the [module docs](self).
pub struct CowTree<K, V> {
    /// The published root: stored (Release) only by writers, loaded (Acquire) only by readers.
    root: AtomicPtr<Node<K, V>>,
    /// The published entry count (a snapshot for readers).
    len: AtomicUsize,
    /// The writers' own copy of root and count, read and written only under the write lock.
    /// Writers never load the published root: a writer's own load of it would be a second
    /// access that hides, from loom's race tracking, the race between its store and a reader's
    /// earlier load (tokio-rs/loom#392-style); and it keeps writers off the readers' line.
    writer: UnsafeCell<WriterView<K, V>>,
    /// The hot-word hook ([`CowTree::with_hot`]): a value's current hot word, read under the
    /// write lock when a fresh leaf is published.
    hot_of: Option<HotOf<V>>,
}

/// A tree's hot-word hook: the current hot word of a value in the tree.
///
/// # Safety
///
/// Called only under the tree's write lock, with a value that is in the tree (or being put in
/// it by the batch being published).
pub type HotOf<V> = unsafe fn(*const V) -> *mut ();

struct WriterView<K, V> {
    root: *mut Node<K, V>,
    len: usize,
}

// SAFETY: the tree hands out `*const V` only; nodes are shared immutably after publication and
// freed through the RCU domain.
unsafe impl<K: Send, V> Send for CowTree<K, V> {}
// SAFETY: as above; every shared mutation is the atomic root store.
unsafe impl<K: Sync, V> Sync for CowTree<K, V> {}

impl<K: TreeKey, V> core::fmt::Debug for CowTree<K, V> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ProbeTree")
            .field("len", &self.len())
            .finish()
    }
}

impl<K: TreeKey, V> Default for CowTree<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: TreeKey, V> CowTree<K, V> {
    /// An empty tree.
    pub fn new() -> Self {
        Self {
            root: AtomicPtr::new(ptr::null_mut()),
            len: AtomicUsize::new(0),
            writer: UnsafeCell::new(WriterView {
                root: ptr::null_mut(),
                len: 0,
            }),
            hot_of: None,
        }
    }

    /// An empty tree whose leaf entries carry a hot word ([`CowTree::get_hot`]): `hot_of` gives
    /// a value's current word when a leaf holding it is built, and [`CowTree::set_hot`] changes
    /// it in place. The registry's word is the probe's consumer list, so that a hit goes from
    /// the leaf straight to its consumers — one dependent cache miss fewer than through the
    /// probe.
    pub fn with_hot(hot_of: HotOf<V>) -> Self {
        let mut t = Self::new();
        t.hot_of = Some(hot_of);
        t
    }

    /// Number of entries (exact under the write lock; a snapshot otherwise).
    pub fn len(&self) -> usize {
        // Relaxed: a counter maintained by the serialized writers, read as a snapshot.
        self.len.load(Ordering::Relaxed)
    }

    /// `len() == 0`.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline(always)]
    fn load_root(&self) -> *mut Node<K, V> {
        // Acquire pairs with the Release store in `publish`: the new nodes' bodies were written
        // before the root that reaches them.
        self.root.load(Ordering::Acquire)
    }

    /// The writers' root.
    ///
    /// # Safety
    ///
    /// The caller holds the write lock.
    #[inline(always)]
    unsafe fn writer_root(&self) -> *mut Node<K, V> {
        // SAFETY: the write lock serializes every access to the writer view.
        self.writer.with(|w| unsafe { (*w).root })
    }

    /// Looks `key` up (the reader side).
    ///
    /// # Safety
    ///
    /// The caller holds a read guard of the RCU domain this tree's writers retire nodes through,
    /// for as long as it uses the result's pointee through the tree.
    #[inline]
    pub unsafe fn get(&self, key: &K) -> Option<*const V> {
        // SAFETY: the caller's contract.
        unsafe { Self::get_from(self.load_root(), key) }
    }

    /// Looks `key` up from the writer side.
    ///
    /// # Safety
    ///
    /// The caller holds the tree's write lock.
    #[inline]
    pub unsafe fn get_locked(&self, key: &K) -> Option<*const V> {
        // SAFETY: the caller's contract: nothing reachable from the writers' root is freed while
        // the write lock is held.
        unsafe { Self::get_from(self.writer_root(), key) }
    }

    /// The entry with the greatest key `<= key` (the reader side): for an address-keyed tree,
    /// the mapping that may contain an address.
    ///
    /// # Safety
    ///
    /// As for [`CowTree::get`].
    #[inline]
    pub unsafe fn floor(&self, key: &K) -> Option<(K, *const V)> {
        let n = self.load_root();
        // SAFETY: the caller's contract.
        if n.is_null() {
            return None;
        }
        // SAFETY: the caller's contract.
        unsafe { Self::floor_in(n, key) }
    }

    /// [`CowTree::floor`] from the writer side.
    ///
    /// # Safety
    ///
    /// The caller holds the tree's write lock.
    #[inline]
    pub unsafe fn floor_locked(&self, key: &K) -> Option<(K, *const V)> {
        // SAFETY: the caller's contract.
        let n = unsafe { self.writer_root() };
        if n.is_null() {
            return None;
        }
        // SAFETY: as above.
        unsafe { Self::floor_in(n, key) }
    }

    /// Bounded: a routing key may be smaller than its subtree's least key (after removals), so a
    /// miss in the routed child falls back to the greatest entry of its left sibling — at most
    /// one extra descent per level visited, and only along the rightmost path.
    unsafe fn floor_in(n: *const Node<K, V>, key: &K) -> Option<(K, *const V)> {
        // SAFETY: the caller's contract (a reachable node under a guard or the lock).
        let b = unsafe { body(n) };
        if b.leaf {
            let mut i = b.len;
            while i > 0 && b.keys[i - 1] > *key {
                i -= 1;
            }
            return (i > 0).then(|| (b.keys[i - 1], b.ptrs[i - 1] as *const V));
        }
        let i = b.route(key);
        // SAFETY: a child of a reachable node.
        if let Some(hit) = unsafe { Self::floor_in(b.ptrs[i] as *const Node<K, V>, key) } {
            return Some(hit);
        }
        if i == 0 {
            return None;
        }
        // The greatest entry of child i-1: walk its rightmost path.
        let mut m = b.ptrs[i - 1] as *const Node<K, V>;
        loop {
            // SAFETY: as above.
            let mb = unsafe { body(m) };
            if mb.leaf {
                return Some((mb.keys[mb.len - 1], mb.ptrs[mb.len - 1] as *const V));
            }
            m = mb.ptrs[mb.len - 1] as *const Node<K, V>;
        }
    }

    /// Looks `key` up (the reader side) and returns its value with its hot word, loaded from
    /// the leaf (null in a tree without a hook).
    ///
    /// # Safety
    ///
    /// As for [`CowTree::get`]; the hot word's pointee is the hook's business (the registry's
    /// lists are retired through the same domain as the nodes).
    #[inline]
    pub unsafe fn get_hot(&self, key: &K) -> Option<(*const V, *mut ())> {
        let mut n = self.load_root();
        if n.is_null() {
            return None;
        }
        loop {
            // SAFETY: `n` was reached from a root loaded with Acquire, under the caller's guard.
            let b = unsafe { body(n) };
            if b.leaf {
                let i = b.find(key).ok()?;
                // Acquire pairs with the Release store in `set_hot` (a word changed in place);
                // a word filled before publication is ordered by the root's Acquire load.
                // SAFETY: `n` is allocated (as above).
                let hot = unsafe { &(*n).hot[i] }.load(Ordering::Acquire);
                return Some((b.ptrs[i] as *const V, hot));
            }
            n = b.ptrs[b.route(key)] as *mut Node<K, V>;
        }
    }

    /// Sets the hot word of the entry `key → val` in the current tree. `false` (and nothing
    /// changed) if `key` is absent or maps to another value.
    ///
    /// # Safety
    ///
    /// The caller holds the write lock, and the word's old pointee stays valid for readers until
    /// a grace period of the tree's domain after this call.
    pub unsafe fn set_hot(&self, key: &K, val: *const V, hot: *mut ()) -> bool {
        // SAFETY: the caller holds the write lock.
        let mut n = unsafe { self.writer_root() };
        if n.is_null() {
            return false;
        }
        loop {
            // SAFETY: reachable from the writers' root under the write lock.
            let b = unsafe { body(n) };
            if b.leaf {
                let Ok(i) = b.find(key) else { return false };
                if b.ptrs[i] != val as *const () {
                    return false;
                }
                #[cfg(loom)]
                let order = if crate::seeded::is(crate::seeded::Bug::HotWordRelaxed) {
                    Ordering::Relaxed
                } else {
                    Ordering::Release
                };
                #[cfg(not(loom))]
                let order = Ordering::Release;
                // Release pairs with the Acquire load in `get_hot`: whatever the word points to
                // was written before the word.
                // SAFETY: allocated (as above).
                unsafe { &(*n).hot[i] }.store(hot, order);
                return true;
            }
            n = b.ptrs[b.route(key)] as *mut Node<K, V>;
        }
    }

    #[inline(always)]
    unsafe fn get_from(mut n: *mut Node<K, V>, key: &K) -> Option<*const V> {
        if n.is_null() {
            return None;
        }
        loop {
            // SAFETY: `n` was reached from a root loaded with Acquire, under the caller's guard.
            let b = unsafe { body(n) };
            if b.leaf {
                return b.find(key).ok().map(|i| b.ptrs[i] as *const V);
            }
            n = b.ptrs[b.route(key)] as *mut Node<K, V>;
        }
    }

    /// Calls `f` on every entry with `lo <= key < hi`, in key order; stops early if `f` returns
    /// `false`.
    ///
    /// # Safety
    ///
    /// As for [`CowTree::get`].
    pub unsafe fn range(&self, lo: &K, hi: &K, mut f: impl FnMut(&K, *const V) -> bool) {
        let n = self.load_root();
        if !n.is_null() && lo < hi {
            // SAFETY: the caller's contract.
            unsafe { Self::range_in(n, lo, Some(hi), &mut f) };
        }
    }

    /// Calls `f` on every entry, in key order, until it returns `false`.
    ///
    /// # Safety
    ///
    /// As for [`CowTree::get`].
    pub unsafe fn for_each(&self, mut f: impl FnMut(&K, *const V) -> bool) {
        let n = self.load_root();
        if !n.is_null() {
            // SAFETY: the caller's contract.
            unsafe { Self::range_in(n, &K::MIN, None, &mut f) };
        }
    }

    /// Returns `false` once the walk should stop.
    unsafe fn range_in(
        n: *const Node<K, V>,
        lo: &K,
        hi: Option<&K>,
        f: &mut impl FnMut(&K, *const V) -> bool,
    ) -> bool {
        let past = |k: &K| hi.is_some_and(|h| k >= h);
        // SAFETY: `range`'s contract.
        let b = unsafe { body(n) };
        if b.leaf {
            let start = match b.find(lo) {
                Ok(i) | Err(i) => i,
            };
            for i in start..b.len {
                if past(&b.keys[i]) || !f(&b.keys[i], b.ptrs[i] as *const V) {
                    return false;
                }
            }
            return true;
        }
        for i in b.route(lo)..b.len {
            if i > 0 && past(&b.keys[i]) {
                return false;
            }
            // SAFETY: a child of a reachable node.
            if !unsafe { Self::range_in(b.ptrs[i] as *const Node<K, V>, lo, hi, f) } {
                return false;
            }
        }
        true
    }
}

/// An open batch of changes to a [`CowTree`]: each change is made on unpublished copies, and
/// [`CowTree::batch`] publishes them all with one store — readers see all of them or none, and
/// if any step fails, nothing is published.
pub struct Batch<K, V> {
    bld: Builder<K, V>,
    root: *mut Node<K, V>,
    len: usize,
}

// The tree stores values as opaque pointers and never dereferences them, so taking a raw pointer
// in a safe method is sound.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
impl<K: TreeKey, V: 'static> Batch<K, V> {
    /// Inserts `key → val` in the batch, returning the value it replaces.
    pub fn insert(&mut self, key: K, val: *const V) -> Result<Option<*const V>> {
        let mut old = None;
        let new_root = if self.root.is_null() {
            let mut b = Body::empty(true);
            b.insert_at(0, key, val as *const ());
            self.bld.node(b)?
        } else {
            // SAFETY: the batch's root is the published root (kept alive by the write lock the
            // batch's creator holds) or a fresh node of this batch.
            match unsafe { CowTree::ins(&mut self.bld, self.root, key, val, &mut old)? } {
                Ins::One(n) => n,
                Ins::Split(l, sep, r) => {
                    let mut b = Body::empty(false);
                    // SAFETY: `l` is fresh and ours.
                    b.insert_at(0, unsafe { body(l) }.keys[0], l as *const ());
                    b.insert_at(1, sep, r as *const ());
                    self.bld.node(b)?
                }
            }
        };
        self.root = new_root;
        self.len += usize::from(old.is_none());
        Ok(old)
    }

    /// Removes `key` in the batch, returning its value (`None` if absent).
    pub fn remove(&mut self, key: &K) -> Result<Option<*const V>> {
        if self.root.is_null() {
            return Ok(None);
        }
        let mut old = None;
        // SAFETY: as in `insert`.
        let new_root = match unsafe { CowTree::rem(&mut self.bld, self.root, key, &mut old)? } {
            None => return Ok(None),
            Some(None) => ptr::null_mut(),
            Some(Some(n)) => {
                // SAFETY: `n` is fresh and ours.
                let b = unsafe { body(n) };
                if !b.leaf && b.len == 1 {
                    // Collapse a root with one child.
                    self.bld.retire(n)?;
                    b.ptrs[0] as *mut Node<K, V>
                } else {
                    n
                }
            }
        };
        self.root = new_root;
        self.len -= 1;
        Ok(old)
    }

    /// Looks `key` up in the batch's current state.
    pub fn get(&self, key: &K) -> Option<*const V> {
        // SAFETY: as in `insert`.
        unsafe { CowTree::get_from(self.root, key) }
    }

    /// The entry with the greatest key `<= key` in the batch's current state.
    pub fn floor(&self, key: &K) -> Option<(K, *const V)> {
        if self.root.is_null() {
            return None;
        }
        // SAFETY: as in `insert`.
        unsafe { CowTree::floor_in(self.root, key) }
    }
}

impl<K: TreeKey, V: 'static> CowTree<K, V> {
    /// Runs `f` on a [`Batch`] of changes and publishes them all at once if it returns `Ok`.
    /// On error nothing changed (the batch's copies are freed at once; they were never visible).
    ///
    /// # Safety
    ///
    /// Writers are serialized (the caller holds the tree's write lock), and every writer of this
    /// tree passes the same RCU domain, which readers hold guards of.
    pub unsafe fn batch<R: Rcu, T>(
        &self,
        rcu: &R,
        f: impl FnOnce(&mut Batch<K, V>) -> Result<T>,
    ) -> Result<T> {
        // SAFETY: write lock held (caller): the writer view is ours.
        let (root, len) = self.writer.with(|w| unsafe { ((*w).root, (*w).len) });
        let mut b = Batch {
            bld: Builder::new()?,
            root,
            len,
        };
        match f(&mut b) {
            Ok(t) => {
                let Batch {
                    bld,
                    root: new_root,
                    len,
                } = b;
                if new_root != root || !bld.retired.is_empty() {
                    // SAFETY: the caller's contract.
                    unsafe { self.publish(rcu, bld, new_root, len)? };
                }
                Ok(t)
            }
            Err(e) => {
                b.bld.abort();
                Err(e)
            }
        }
    }

    /// Inserts `key → val`, replacing and returning the previous value if there was one.
    /// On error nothing changed.
    ///
    /// # Safety
    ///
    /// As for [`CowTree::batch`].
    pub unsafe fn insert<R: Rcu>(
        &self,
        rcu: &R,
        key: K,
        val: *const V,
    ) -> Result<Option<*const V>> {
        // SAFETY: the caller's contract.
        unsafe { self.batch(rcu, |b| b.insert(key, val)) }
    }

    /// Removes `key`, returning its value. `Ok(None)` if it was absent (nothing changed).
    /// On error nothing changed.
    ///
    /// # Safety
    ///
    /// As for [`CowTree::batch`].
    pub unsafe fn remove<R: Rcu>(&self, rcu: &R, key: &K) -> Result<Option<*const V>> {
        // SAFETY: the caller's contract.
        unsafe { self.batch(rcu, |b| b.remove(key)) }
    }

    /// Publishes `new_root` (holding `len` entries) and defers the free of the nodes it replaced.
    ///
    /// # Safety
    ///
    /// As for [`CowTree::insert`].
    unsafe fn publish<R: Rcu>(
        &self,
        rcu: &R,
        bld: Builder<K, V>,
        new_root: *mut Node<K, V>,
        len: usize,
    ) -> Result<()> {
        let Builder { fresh, retired } = bld;
        struct SendNodes<K, V>(Vec<*mut Node<K, V>>);
        // SAFETY: the nodes are unreachable once the callback runs; freeing them from any thread
        // is fine.
        unsafe impl<K, V> Send for SendNodes<K, V> {}
        let nodes = SendNodes(retired);
        // Allocate the callback before publishing, so failure changes nothing.
        let cb = Deferred::new(move || {
            let nodes = nodes;
            for n in nodes.0 {
                // SAFETY: a grace period has passed since the root that reached `n` was replaced.
                unsafe { free_node(n) };
            }
        });
        let cb = match cb {
            Ok(cb) => cb,
            Err(e) => {
                Builder {
                    fresh,
                    retired: Vec::new(),
                }
                .abort();
                return Err(e);
            }
        };
        #[cfg(loom)]
        let order = if crate::seeded::is(crate::seeded::Bug::TreePublishRelaxed) {
            Ordering::Relaxed
        } else {
            Ordering::Release
        };
        #[cfg(not(loom))]
        let order = Ordering::Release;
        if let Some(hot_of) = self.hot_of {
            for &n in &fresh {
                // SAFETY: fresh nodes are ours and allocated; write lock held (caller).
                let b = unsafe { body(n) };
                if b.leaf {
                    for i in 0..b.len {
                        // SAFETY: the hook's contract: write lock held, a value of this batch.
                        let hot = unsafe { hot_of(b.ptrs[i] as *const V) };
                        // Relaxed: published by the root's Release store below.
                        // SAFETY: allocated (as above).
                        unsafe { &(*n).hot[i] }.store(hot, Ordering::Relaxed);
                    }
                }
            }
        }
        // SAFETY: write lock held (caller): the writer view is ours.
        self.writer.with_mut(|w| unsafe {
            (*w).root = new_root;
            (*w).len = len;
        });
        // Release pairs with the Acquire load in `load_root`: publishes the fresh nodes' bodies.
        self.root.store(new_root, order);
        // Relaxed: a snapshot for `len()`; written only by serialized writers.
        self.len.store(len, Ordering::Relaxed);
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::TreeFreeNodesEarly) {
            cb.run();
            return Ok(());
        }
        rcu.defer(cb);
        Ok(())
    }

    unsafe fn ins(
        bld: &mut Builder<K, V>,
        n: *const Node<K, V>,
        key: K,
        val: *const V,
        old: &mut Option<*const V>,
    ) -> Result<Ins<K, V>> {
        // SAFETY: write lock held; `n` is reachable from the current root.
        let b = unsafe { body(n) };
        let mut nb = b.clone();
        if b.leaf {
            match b.find(&key) {
                Ok(i) => {
                    *old = Some(b.ptrs[i] as *const V);
                    nb.ptrs[i] = val as *const ();
                }
                Err(i) => {
                    if b.len < B {
                        nb.insert_at(i, key, val as *const ());
                    } else {
                        bld.retire(n)?;
                        return Self::split_with(bld, b, i, key, val as *const ());
                    }
                }
            }
            bld.retire(n)?;
            return Ok(Ins::One(bld.node(nb)?));
        }
        let i = b.route(&key);
        // SAFETY: a child of a reachable node.
        let sub = unsafe { Self::ins(bld, b.ptrs[i] as *const Node<K, V>, key, val, old)? };
        if i == 0 && key < nb.keys[0] {
            nb.keys[0] = key;
        }
        bld.retire(n)?;
        match sub {
            Ins::One(c) => {
                nb.ptrs[i] = c as *const ();
                Ok(Ins::One(bld.node(nb)?))
            }
            Ins::Split(l, sep, r) => {
                nb.ptrs[i] = l as *const ();
                if nb.len < B {
                    nb.insert_at(i + 1, sep, r as *const ());
                    Ok(Ins::One(bld.node(nb)?))
                } else {
                    Self::split_with(bld, &nb, i + 1, sep, r as *const ())
                }
            }
        }
    }

    /// `b` is full: insert `(k, p)` at `i` into a copy and split it in two.
    fn split_with(
        bld: &mut Builder<K, V>,
        b: &Body<K, V>,
        i: usize,
        k: K,
        p: *const (),
    ) -> Result<Ins<K, V>> {
        let mut keys = [K::MIN; B + 1];
        let mut ptrs = [ptr::null(); B + 1];
        keys[..i].copy_from_slice(&b.keys[..i]);
        ptrs[..i].copy_from_slice(&b.ptrs[..i]);
        keys[i] = k;
        ptrs[i] = p;
        keys[i + 1..].copy_from_slice(&b.keys[i..B]);
        ptrs[i + 1..].copy_from_slice(&b.ptrs[i..B]);
        // An append past the node's last key is how a tree is filled in key order (an embedder
        // registering a symbol table, a benchmark building its table): halving there leaves
        // every node of an in-order build half full — twice the nodes, twice the memory a
        // lookup's working set spans, one level more at 100 000 entries. So an append keeps
        // the old node as full as the minimum fill allows the new one to be (13 of 16).
        let mid = if i == B {
            B + 1 - NODE_MIN
        } else {
            keys.len() / 2
        };
        let (l, r) = Body::split_at(b.leaf, &keys, &ptrs, mid);
        let sep = r.keys[0];
        let l = bld.node(l)?;
        let r = bld.node(r)?;
        Ok(Ins::Split(l, sep, r))
    }

    /// `Ok(None)`: key absent, nothing built. `Ok(Some(None))`: the subtree became empty.
    /// `Ok(Some(Some(n)))`: the subtree's new version.
    #[allow(clippy::type_complexity)]
    unsafe fn rem(
        bld: &mut Builder<K, V>,
        n: *const Node<K, V>,
        key: &K,
        old: &mut Option<*const V>,
    ) -> Result<Option<Option<*mut Node<K, V>>>> {
        // SAFETY: write lock held; `n` is reachable from the current root.
        let b = unsafe { body(n) };
        if b.leaf {
            let Ok(i) = b.find(key) else { return Ok(None) };
            *old = Some(b.ptrs[i] as *const V);
            bld.retire(n)?;
            if b.len == 1 {
                return Ok(Some(None));
            }
            let mut nb = b.clone();
            nb.remove_at(i);
            return Ok(Some(Some(bld.node(nb)?)));
        }
        let i = b.route(key);
        // SAFETY: a child of a reachable node.
        let Some(sub) = (unsafe { Self::rem(bld, b.ptrs[i] as *const Node<K, V>, key, old)? })
        else {
            return Ok(None);
        };
        bld.retire(n)?;
        let mut nb = b.clone();
        match sub {
            None => {
                nb.remove_at(i);
                if nb.len == 0 {
                    return Ok(Some(None));
                }
            }
            Some(c) => {
                nb.ptrs[i] = c as *const ();
                // SAFETY: `c` is fresh and ours.
                if unsafe { body(c) }.len < NODE_MIN && nb.len > 1 {
                    Self::rebalance(bld, &mut nb, if i > 0 { i - 1 } else { 0 })?;
                }
            }
        }
        Ok(Some(Some(bld.node(nb)?)))
    }

    /// Merges children `li` and `li + 1` of `parent` into one node, or redistributes them into two
    /// evenly filled ones.
    fn rebalance(bld: &mut Builder<K, V>, parent: &mut Body<K, V>, li: usize) -> Result<()> {
        let ri = li + 1;
        let (ln, rn) = (
            parent.ptrs[li] as *const Node<K, V>,
            parent.ptrs[ri] as *const Node<K, V>,
        );
        // SAFETY: children of a node under construction: fresh or reachable, write lock held.
        let (lb, rb) = unsafe { (body(ln), body(rn)) };
        let total = lb.len + rb.len;
        let mut keys = [K::MIN; 2 * B];
        let mut ptrs = [ptr::null(); 2 * B];
        keys[..lb.len].copy_from_slice(&lb.keys[..lb.len]);
        ptrs[..lb.len].copy_from_slice(&lb.ptrs[..lb.len]);
        keys[lb.len..total].copy_from_slice(&rb.keys[..rb.len]);
        ptrs[lb.len..total].copy_from_slice(&rb.ptrs[..rb.len]);
        if !lb.leaf {
            // The right node's keys[0] is not a routing key; the parent's separator is.
            keys[lb.len] = parent.keys[ri];
        }
        bld.retire(ln)?;
        bld.retire(rn)?;
        if total <= B {
            let mut m = Body::empty(lb.leaf);
            m.keys[..total].copy_from_slice(&keys[..total]);
            m.ptrs[..total].copy_from_slice(&ptrs[..total]);
            m.len = total;
            parent.ptrs[li] = bld.node(m)? as *const ();
            parent.remove_at(ri);
        } else {
            let (l, r) = Body::halves(lb.leaf, &keys[..total], &ptrs[..total]);
            parent.keys[ri] = r.keys[0];
            parent.ptrs[li] = bld.node(l)? as *const ();
            parent.ptrs[ri] = bld.node(r)? as *const ();
        }
        Ok(())
    }
}

impl<K: TreeKey, V> CowTree<K, V> {
    /// Height of the tree (0 when empty). For tests and diagnostics.
    ///
    /// # Safety
    ///
    /// As for [`CowTree::get`].
    pub unsafe fn height(&self) -> usize {
        let mut n = self.load_root();
        let mut h = 0;
        while !n.is_null() {
            h += 1;
            // SAFETY: the caller's contract.
            let b = unsafe { body(n) };
            n = if b.leaf {
                ptr::null_mut()
            } else {
                b.ptrs[0] as *mut Node<K, V>
            };
        }
        h
    }

    /// Checks the structural invariants; returns the number of entries. For tests.
    ///
    /// # Safety
    ///
    /// As for [`CowTree::get`].
    #[cfg(test)]
    pub(crate) unsafe fn check(&self) -> usize {
        unsafe fn walk<K: TreeKey, V>(
            n: *const Node<K, V>,
            lo: Option<K>,
            hi: Option<K>,
            root: bool,
        ) -> (usize, usize) {
            // SAFETY: the caller's contract.
            let b = unsafe { body(n) };
            assert!(b.len >= 1 && b.len <= B);
            if !root {
                assert!(
                    b.len >= NODE_MIN,
                    "a non-root node below the minimum fill: {}",
                    b.len
                );
            }
            if b.leaf {
                for i in 0..b.len {
                    if i > 0 {
                        assert!(b.keys[i - 1] < b.keys[i]);
                    }
                    if let Some(lo) = lo {
                        assert!(b.keys[i] >= lo);
                    }
                    if let Some(hi) = hi {
                        assert!(b.keys[i] < hi);
                    }
                }
                return (b.len, 1);
            }
            let mut total = 0;
            let mut height = None;
            for i in 0..b.len {
                let clo = if i == 0 { lo } else { Some(b.keys[i]) };
                let chi = if i + 1 < b.len {
                    Some(b.keys[i + 1])
                } else {
                    hi
                };
                if i > 0 {
                    assert!(b.keys[i - 1] < b.keys[i] || i == 1);
                }
                // SAFETY: the caller's contract.
                let (c, h) = unsafe { walk(b.ptrs[i] as *const Node<K, V>, clo, chi, false) };
                total += c;
                assert!(height.is_none() || height == Some(h), "unbalanced");
                height = Some(h);
            }
            (total, height.unwrap_or(0) + 1)
        }
        let r = self.load_root();
        if r.is_null() {
            return 0;
        }
        // SAFETY: the caller's contract.
        unsafe { walk(r, None, None, true).0 }
    }
}

impl<K, V> Drop for CowTree<K, V> {
    fn drop(&mut self) {
        unsafe fn free_all<K, V>(n: *mut Node<K, V>) {
            // SAFETY: `&mut self`: no reader is left, and every node is reachable exactly once.
            let b = unsafe { body(n) };
            if !b.leaf {
                for i in 0..b.len {
                    // SAFETY: as above.
                    unsafe { free_all(b.ptrs[i] as *mut Node<K, V>) };
                }
            }
            // SAFETY: as above.
            unsafe { free_node(n) };
        }
        // Relaxed: `&mut self`.
        let r = self.root.load(Ordering::Relaxed);
        if !r.is_null() {
            // SAFETY: see `free_all`. Nodes replaced earlier were handed to the RCU domain.
            unsafe { free_all(r) };
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

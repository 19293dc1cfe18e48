//! The probe tree: an ordered map from [`ProbeKey`] to a probe, read without locks.
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
//! * The tree does not own its values: it stores `*const V` and never dereferences them.

use crate::alloc_util::{try_box, try_vec_with_capacity};
use crate::error::{Error, Result};
use crate::probe::ProbeKey;
use crate::rcu::{Deferred, Rcu};
use crate::sync::{AtomicPtr, AtomicUsize, FreeCheck, Ordering, UnsafeCell};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr;

/// Maximum entries per node.
pub const NODE_CAPACITY: usize = 16;
/// Below this a node is rebalanced with a sibling after a removal.
pub const NODE_MIN: usize = NODE_CAPACITY / 4;

const B: usize = NODE_CAPACITY;

struct Body<V> {
    leaf: bool,
    len: usize,
    keys: [ProbeKey; B],
    /// Leaf: `*const V`. Internal: `*mut Node<V>`.
    ptrs: [*const (); B],
    _v: core::marker::PhantomData<*const V>,
}

impl<V> Clone for Body<V> {
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

impl<V> Body<V> {
    fn empty(leaf: bool) -> Self {
        Self {
            leaf,
            len: 0,
            keys: [ProbeKey::MIN; B],
            ptrs: [ptr::null(); B],
            _v: core::marker::PhantomData,
        }
    }

    /// Index of the child that routes `key`: the last `i` with `keys[i] <= key`, or 0.
    #[inline]
    fn route(&self, key: &ProbeKey) -> usize {
        let mut i = 1;
        while i < self.len && self.keys[i] <= *key {
            i += 1;
        }
        i - 1
    }

    /// Leaf: `Ok(i)` if `keys[i] == key`, else `Err(insertion point)`.
    #[inline]
    fn find(&self, key: &ProbeKey) -> core::result::Result<usize, usize> {
        let mut i = 0;
        while i < self.len {
            if self.keys[i] >= *key {
                return if self.keys[i] == *key { Ok(i) } else { Err(i) };
            }
            i += 1;
        }
        Err(self.len)
    }

    fn insert_at(&mut self, i: usize, k: ProbeKey, p: *const ()) {
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
        self.keys[self.len] = ProbeKey::MIN;
        self.ptrs[self.len] = ptr::null();
    }

    /// Splits a body of up to `2B` entries (given as slices) into two halves.
    fn halves(leaf: bool, keys: &[ProbeKey], ptrs: &[*const ()]) -> (Self, Self) {
        let mid = keys.len() / 2;
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
struct Node<V> {
    /// Written once, before publication; read through the facade's `UnsafeCell` so loom checks
    /// that publication orders the write before every read.
    body: UnsafeCell<Body<V>>,
    free_check: FreeCheck,
}

/// Reads a node's body.
///
/// # Safety
///
/// `n` is a node reachable from a root the caller loaded with Acquire (or owns), and the caller
/// holds a read guard of the domain that retires this tree's nodes, or the tree's write lock.
#[inline(always)]
unsafe fn body<'a, V>(n: *const Node<V>) -> &'a Body<V> {
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
unsafe fn free_node<V>(n: *mut Node<V>) {
    // SAFETY: the caller's contract.
    let node = unsafe { Box::from_raw(n) };
    node.free_check.mark_freed();
    crate::sync::quarantine(node);
}

/// Builds the new version of a path: records fresh nodes (freed if the write fails) and the old
/// nodes they replace (freed a grace period after the write publishes).
struct Builder<V> {
    fresh: Vec<*mut Node<V>>,
    retired: Vec<*mut Node<V>>,
}

impl<V> Builder<V> {
    fn new() -> Result<Self> {
        Ok(Self {
            fresh: try_vec_with_capacity(16)?,
            retired: try_vec_with_capacity(16)?,
        })
    }

    fn node(&mut self, body: Body<V>) -> Result<*mut Node<V>> {
        if self.fresh.len() == self.fresh.capacity() {
            self.fresh
                .try_reserve(self.fresh.len())
                .map_err(|_| Error::NoMemory)?;
        }
        let n = Box::into_raw(try_box(Node {
            body: UnsafeCell::new(body),
            free_check: FreeCheck::new(),
        })?);
        self.fresh.push(n);
        Ok(n)
    }

    fn retire(&mut self, n: *const Node<V>) -> Result<()> {
        if self.retired.len() == self.retired.capacity() {
            self.retired
                .try_reserve(self.retired.len())
                .map_err(|_| Error::NoMemory)?;
        }
        self.retired.push(n as *mut Node<V>);
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

enum Ins<V> {
    One(*mut Node<V>),
    Split(*mut Node<V>, ProbeKey, *mut Node<V>),
}

/// The copy-on-write B-tree. See the [module docs](self).
pub struct ProbeTree<V> {
    /// The published root: stored (Release) only by writers, loaded (Acquire) only by readers.
    root: AtomicPtr<Node<V>>,
    /// The published entry count (a snapshot for readers).
    len: AtomicUsize,
    /// The writers' own copy of root and count, read and written only under the write lock.
    /// Writers never load the published root: a writer's own load of it would be a second
    /// access that hides, from loom's race tracking, the race between its store and a reader's
    /// earlier load (tokio-rs/loom#392-style); and it keeps writers off the readers' line.
    writer: UnsafeCell<WriterView<V>>,
}

struct WriterView<V> {
    root: *mut Node<V>,
    len: usize,
}

// SAFETY: the tree hands out `*const V` only; nodes are shared immutably after publication and
// freed through the RCU domain.
unsafe impl<V> Send for ProbeTree<V> {}
// SAFETY: as above; every shared mutation is the atomic root store.
unsafe impl<V> Sync for ProbeTree<V> {}

impl<V> core::fmt::Debug for ProbeTree<V> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ProbeTree")
            .field("len", &self.len())
            .finish()
    }
}

impl<V> Default for ProbeTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> ProbeTree<V> {
    /// An empty tree.
    pub fn new() -> Self {
        Self {
            root: AtomicPtr::new(ptr::null_mut()),
            len: AtomicUsize::new(0),
            writer: UnsafeCell::new(WriterView {
                root: ptr::null_mut(),
                len: 0,
            }),
        }
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
    fn load_root(&self) -> *mut Node<V> {
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
    unsafe fn writer_root(&self) -> *mut Node<V> {
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
    pub unsafe fn get(&self, key: &ProbeKey) -> Option<*const V> {
        // SAFETY: the caller's contract.
        unsafe { Self::get_from(self.load_root(), key) }
    }

    /// Looks `key` up from the writer side.
    ///
    /// # Safety
    ///
    /// The caller holds the tree's write lock.
    #[inline]
    pub unsafe fn get_locked(&self, key: &ProbeKey) -> Option<*const V> {
        // SAFETY: the caller's contract: nothing reachable from the writers' root is freed while
        // the write lock is held.
        unsafe { Self::get_from(self.writer_root(), key) }
    }

    #[inline(always)]
    unsafe fn get_from(mut n: *mut Node<V>, key: &ProbeKey) -> Option<*const V> {
        if n.is_null() {
            return None;
        }
        loop {
            // SAFETY: `n` was reached from a root loaded with Acquire, under the caller's guard.
            let b = unsafe { body(n) };
            if b.leaf {
                return b.find(key).ok().map(|i| b.ptrs[i] as *const V);
            }
            n = b.ptrs[b.route(key)] as *mut Node<V>;
        }
    }

    /// Calls `f` on every entry with `lo <= key < hi`, in key order; stops early if `f` returns
    /// `false`.
    ///
    /// # Safety
    ///
    /// As for [`ProbeTree::get`].
    pub unsafe fn range(
        &self,
        lo: &ProbeKey,
        hi: &ProbeKey,
        mut f: impl FnMut(&ProbeKey, *const V) -> bool,
    ) {
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
    /// As for [`ProbeTree::get`].
    pub unsafe fn for_each(&self, mut f: impl FnMut(&ProbeKey, *const V) -> bool) {
        let n = self.load_root();
        if !n.is_null() {
            // SAFETY: the caller's contract.
            unsafe { Self::range_in(n, &ProbeKey::MIN, None, &mut f) };
        }
    }

    /// Returns `false` once the walk should stop.
    unsafe fn range_in(
        n: *const Node<V>,
        lo: &ProbeKey,
        hi: Option<&ProbeKey>,
        f: &mut impl FnMut(&ProbeKey, *const V) -> bool,
    ) -> bool {
        let past = |k: &ProbeKey| hi.is_some_and(|h| k >= h);
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
            if !unsafe { Self::range_in(b.ptrs[i] as *const Node<V>, lo, hi, f) } {
                return false;
            }
        }
        true
    }
}

impl<V: 'static> ProbeTree<V> {
    /// Inserts `key → val`, replacing and returning the previous value if there was one.
    /// On error nothing changed.
    ///
    /// # Safety
    ///
    /// Writers are serialized (the caller holds the tree's write lock), and every writer of this
    /// tree passes the same RCU domain, which readers hold guards of.
    pub unsafe fn insert<R: Rcu>(
        &self,
        rcu: &R,
        key: ProbeKey,
        val: *const V,
    ) -> Result<Option<*const V>> {
        let mut bld = Builder::new()?;
        let mut old = None;
        // SAFETY: write lock held (caller).
        let root = unsafe { self.writer_root() };
        let built = if root.is_null() {
            let mut b = Body::empty(true);
            b.insert_at(0, key, val as *const ());
            bld.node(b)
        } else {
            // SAFETY: we hold the write lock (caller), so `root` and its nodes stay allocated.
            match unsafe { Self::ins(&mut bld, root, key, val, &mut old) } {
                Ok(Ins::One(n)) => Ok(n),
                Ok(Ins::Split(l, sep, r)) => {
                    let mut b = Body::empty(false);
                    // SAFETY: `l` is fresh and ours.
                    b.insert_at(0, unsafe { body(l) }.keys[0], l as *const ());
                    b.insert_at(1, sep, r as *const ());
                    bld.node(b)
                }
                Err(e) => Err(e),
            }
        };
        let new_root = match built {
            Ok(n) => n,
            Err(e) => {
                bld.abort();
                return Err(e);
            }
        };
        let grow = usize::from(old.is_none());
        // SAFETY: the caller's contract (serialized writers, one domain).
        unsafe { self.publish(rcu, bld, new_root, grow, 0)? };
        Ok(old)
    }

    /// Removes `key`, returning its value. `Ok(None)` if it was absent (nothing changed).
    /// On error nothing changed.
    ///
    /// # Safety
    ///
    /// As for [`ProbeTree::insert`].
    pub unsafe fn remove<R: Rcu>(&self, rcu: &R, key: &ProbeKey) -> Result<Option<*const V>> {
        // SAFETY: write lock held (caller).
        let root = unsafe { self.writer_root() };
        if root.is_null() {
            return Ok(None);
        }
        let mut bld = Builder::new()?;
        let mut old = None;
        // SAFETY: write lock held (caller).
        let new_root = match unsafe { Self::rem(&mut bld, root, key, &mut old) } {
            Ok(None) => return Ok(None), // absent: `bld` is empty
            Ok(Some(None)) => Ok(ptr::null_mut()),
            Ok(Some(Some(n))) => {
                // SAFETY: `n` is fresh and ours.
                let b = unsafe { body(n) };
                if !b.leaf && b.len == 1 {
                    // Collapse a root with one child.
                    bld.retire(n).map(|()| b.ptrs[0] as *mut Node<V>)
                } else {
                    Ok(n)
                }
            }
            Err(e) => Err(e),
        };
        let new_root = match new_root {
            Ok(n) => n,
            Err(e) => {
                bld.abort();
                return Err(e);
            }
        };
        // SAFETY: the caller's contract.
        unsafe { self.publish(rcu, bld, new_root, 0, 1)? };
        Ok(old)
    }

    /// Publishes `new_root` (with the count changed by `+grow - shrink`) and defers the free of
    /// the nodes it replaced.
    ///
    /// # Safety
    ///
    /// As for [`ProbeTree::insert`].
    unsafe fn publish<R: Rcu>(
        &self,
        rcu: &R,
        bld: Builder<V>,
        new_root: *mut Node<V>,
        grow: usize,
        shrink: usize,
    ) -> Result<()> {
        let Builder { fresh, retired } = bld;
        struct SendNodes<V>(Vec<*mut Node<V>>);
        // SAFETY: the nodes are unreachable once the callback runs; freeing them from any thread
        // is fine.
        unsafe impl<V> Send for SendNodes<V> {}
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
        // SAFETY: write lock held (caller): the writer view is ours.
        let len = self.writer.with_mut(|w| unsafe {
            (*w).root = new_root;
            (*w).len = (*w).len + grow - shrink;
            (*w).len
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
        bld: &mut Builder<V>,
        n: *const Node<V>,
        key: ProbeKey,
        val: *const V,
        old: &mut Option<*const V>,
    ) -> Result<Ins<V>> {
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
        let sub = unsafe { Self::ins(bld, b.ptrs[i] as *const Node<V>, key, val, old)? };
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
        bld: &mut Builder<V>,
        b: &Body<V>,
        i: usize,
        k: ProbeKey,
        p: *const (),
    ) -> Result<Ins<V>> {
        let mut keys = [ProbeKey::MIN; B + 1];
        let mut ptrs = [ptr::null(); B + 1];
        keys[..i].copy_from_slice(&b.keys[..i]);
        ptrs[..i].copy_from_slice(&b.ptrs[..i]);
        keys[i] = k;
        ptrs[i] = p;
        keys[i + 1..].copy_from_slice(&b.keys[i..B]);
        ptrs[i + 1..].copy_from_slice(&b.ptrs[i..B]);
        let (l, r) = Body::halves(b.leaf, &keys, &ptrs);
        let sep = r.keys[0];
        let l = bld.node(l)?;
        let r = bld.node(r)?;
        Ok(Ins::Split(l, sep, r))
    }

    /// `Ok(None)`: key absent, nothing built. `Ok(Some(None))`: the subtree became empty.
    /// `Ok(Some(Some(n)))`: the subtree's new version.
    #[allow(clippy::type_complexity)]
    unsafe fn rem(
        bld: &mut Builder<V>,
        n: *const Node<V>,
        key: &ProbeKey,
        old: &mut Option<*const V>,
    ) -> Result<Option<Option<*mut Node<V>>>> {
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
        let Some(sub) = (unsafe { Self::rem(bld, b.ptrs[i] as *const Node<V>, key, old)? }) else {
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
    fn rebalance(bld: &mut Builder<V>, parent: &mut Body<V>, li: usize) -> Result<()> {
        let ri = li + 1;
        let (ln, rn) = (
            parent.ptrs[li] as *const Node<V>,
            parent.ptrs[ri] as *const Node<V>,
        );
        // SAFETY: children of a node under construction: fresh or reachable, write lock held.
        let (lb, rb) = unsafe { (body(ln), body(rn)) };
        let total = lb.len + rb.len;
        let mut keys = [ProbeKey::MIN; 2 * B];
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

impl<V> ProbeTree<V> {
    /// Height of the tree (0 when empty). For tests and diagnostics.
    ///
    /// # Safety
    ///
    /// As for [`ProbeTree::get`].
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
                b.ptrs[0] as *mut Node<V>
            };
        }
        h
    }

    /// Checks the structural invariants; returns the number of entries. For tests.
    ///
    /// # Safety
    ///
    /// As for [`ProbeTree::get`].
    #[cfg(test)]
    pub(crate) unsafe fn check(&self) -> usize {
        unsafe fn walk<V>(
            n: *const Node<V>,
            lo: Option<ProbeKey>,
            hi: Option<ProbeKey>,
            root: bool,
        ) -> (usize, usize) {
            // SAFETY: the caller's contract.
            let b = unsafe { body(n) };
            assert!(b.len >= 1 && b.len <= B);
            if !root && !b.leaf {
                assert!(b.len >= 2 || b.len >= 1, "internal node too small");
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
                let (c, h) = unsafe { walk(b.ptrs[i] as *const Node<V>, clo, chi, false) };
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

impl<V> Drop for ProbeTree<V> {
    fn drop(&mut self) {
        unsafe fn free_all<V>(n: *mut Node<V>) {
            // SAFETY: `&mut self`: no reader is left, and every node is reachable exactly once.
            let b = unsafe { body(n) };
            if !b.leaf {
                for i in 0..b.len {
                    // SAFETY: as above.
                    unsafe { free_all(b.ptrs[i] as *mut Node<V>) };
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

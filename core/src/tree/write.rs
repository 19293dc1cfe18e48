//! The write side: a [`Batch`] of inserts and removals builds the new path copies, then
//! publishes them with one release store of the root and retires the replaced nodes through the
//! RCU domain; [`CowTree::set_hot`] updates a leaf's hot word in place.

use super::node::{Body, Builder, Ins, Node, body, free_node};
use super::{B, CowTree, NODE_MIN, TreeKey};
use crate::error::Result;
use crate::rcu::{Deferred, Rcu};
use crate::sync::Ordering;
use alloc::vec::Vec;
use core::ptr;

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
    pub(super) unsafe fn publish<R: Rcu>(
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

    pub(super) unsafe fn ins(
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
    pub(super) fn split_with(
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
    pub(super) unsafe fn rem(
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
                if let Some(li) = Self::merge_partner(&nb, i) {
                    Self::rebalance(bld, &mut nb, li)?;
                }
            }
        }
        Ok(Some(Some(bld.node(nb)?)))
    }

    /// Which pair of children of `parent` to [`rebalance`](Self::rebalance) after a removal made
    /// child `i` smaller: `Some(li)` for children `li` and `li + 1`.
    ///
    /// Child `i` is merged with a sibling whenever their entries fit in one node — not only
    /// when it falls below [`NODE_MIN`]. With the minimum alone, an insert that split a full
    /// node and the removal of the same key leave two half-full nodes where there was one,
    /// and a tree whose root was that node one level taller for good: a process that maps and
    /// unmaps one library leaves its 16-mapping VMA index two levels deep, and every hit pays
    /// the extra dependent load and one more node's search. Merging
    /// whenever the pair fits undoes the split, and the root that is left with one child
    /// collapses ([`Batch::remove`]). A child below the minimum with no sibling it fits with is
    /// refilled from its left sibling (the right one for child 0).
    fn merge_partner(parent: &Body<K, V>, i: usize) -> Option<usize> {
        if parent.len < 2 {
            return None;
        }
        // SAFETY: children of a node under construction are fresh nodes of this batch or nodes
        // reachable from the current root, and the caller holds the write lock.
        let len = |j: usize| unsafe { body(parent.ptrs[j] as *const Node<K, V>) }.len;
        let own = len(i);
        if i > 0 && own + len(i - 1) <= B {
            Some(i - 1)
        } else if i + 1 < parent.len && own + len(i + 1) <= B {
            Some(i)
        } else if own < NODE_MIN {
            Some(i.saturating_sub(1))
        } else {
            None
        }
    }

    /// Merges children `li` and `li + 1` of `parent` into one node, or redistributes them into two
    /// evenly filled ones.
    pub(super) fn rebalance(
        bld: &mut Builder<K, V>,
        parent: &mut Body<K, V>,
        li: usize,
    ) -> Result<()> {
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
}

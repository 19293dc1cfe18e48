//! The read side: lookups walk down from a root loaded with Acquire (readers) or from the
//! writers' own copy (under the write lock), through immutable nodes — no lock, no store.

use super::node::{Node, body};
use super::{B, CowTree, TreeKey};
use crate::sync::Ordering;

impl<K: TreeKey, V> CowTree<K, V> {
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
        let root = self.load_root();
        if root.is_null() {
            return None;
        }
        // SAFETY: the caller's contract.
        unsafe { Self::floor_from(root, key) }
    }

    /// The floor below a non-null root: one descent, and the full walk from the root again only
    /// when that descent's leaf holds nothing `<= key` (rare: a stale routing key).
    #[inline]
    unsafe fn floor_from(root: *const Node<K, V>, key: &K) -> Option<(K, *const V)> {
        // SAFETY: the caller's contract.
        unsafe { Self::floor_fast(root, key) }.or_else(|| {
            // SAFETY: as above.
            unsafe { Self::floor_in(root, key) }
        })
    }

    /// The common case of a floor, one descent: route down, and in the leaf take the greatest
    /// key `<= key`. `None` when that leaf has none — then the floor, if any, is in a left
    /// sibling ([`CowTree::floor_in`] finds it). What it returns is the floor: every entry right
    /// of the routed path is `>=` a routing key `> key`.
    ///
    /// Binary searches (`partition_point`), not the forward scans of a probe lookup: the keys
    /// are the address tree's `u64`s, a node's sixteen fill two cache lines, and an address
    /// lands anywhere in its leaf.
    #[inline]
    pub(super) unsafe fn floor_fast(mut n: *const Node<K, V>, key: &K) -> Option<(K, *const V)> {
        loop {
            // SAFETY: the caller's contract (a reachable node under a guard or the lock).
            let b = unsafe { body(n) };
            // How many keys are `<= key`. `len <= B` (INVARIANT of the bodies), so the slice
            // is in bounds.
            let i = b.keys[..b.len.min(B)].partition_point(|k| k <= key);
            if b.leaf {
                let i = i.checked_sub(1)?;
                return Some((b.keys[i], b.ptrs[i] as *const V));
            }
            // `route`: the last key `<= key`, or the first child.
            n = b.ptrs[i.saturating_sub(1)] as *const Node<K, V>;
        }
    }

    /// [`CowTree::floor`] from the writer side.
    ///
    /// # Safety
    ///
    /// The caller holds the tree's write lock.
    #[inline]
    pub unsafe fn floor_locked(&self, key: &K) -> Option<(K, *const V)> {
        // SAFETY: the caller's contract.
        let root = unsafe { self.writer_root() };
        if root.is_null() {
            return None;
        }
        // SAFETY: as above.
        unsafe { Self::floor_from(root, key) }
    }

    /// Bounded: a routing key may be smaller than its subtree's least key (after removals), so a
    /// miss in the routed child falls back to the greatest entry of its left sibling — at most
    /// one extra descent per level visited, and only along the rightmost path.
    pub(super) unsafe fn floor_in(n: *const Node<K, V>, key: &K) -> Option<(K, *const V)> {
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
    // Always inlined: it is the hit path's lookup. With two instantiations of the hit path in
    // one binary (the report's two RCU domains) LLVM left it out of line, which cost 25
    // instructions per resolve (callgrind, 387.6 -> 412.7 at 1 000 probes).
    #[inline(always)]
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

    #[inline(always)]
    pub(super) unsafe fn get_from(mut n: *mut Node<K, V>, key: &K) -> Option<*const V> {
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
    pub(super) unsafe fn range_in(
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

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
//! [`Error::NoMemory`](crate::error::Error::NoMemory) and publishes nothing) and one grace period, deferred, to free the copies'
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
//!   refilled from a sibling, so the height stays logarithmic in the number of entries; and a
//!   child that shrank is merged with a sibling whenever their entries fit in one node, so the
//!   removal of a key undoes the split its insert made (an insert followed by the removal of
//!   the same key never leaves the tree taller).
//! * The tree does not own its values: it stores `*const V` and never dereferences them — except
//!   through the hot-word hook of a tree made by [`CowTree::with_hot`], under the write lock.
//! * INVARIANT (hot words): each leaf entry has one atomic *hot word* beside it, outside the
//!   immutable body: what a reader needs next from the value (the registry's: the probe's
//!   consumer list), so a lookup reaches it without loading the value first. A fresh leaf's
//!   hot words are filled from the hook before the root that publishes it is stored; after
//!   that they are written only by [`CowTree::set_hot`], under the write lock — so a copy of a
//!   leaf (also made under the write lock) always carries the current word.

mod node;
mod read;
#[cfg(all(test, not(loom)))]
mod tests;
mod write;

use crate::lock::CachePadded;
use crate::sync::{AtomicPtr, AtomicUsize, Ordering, UnsafeCell};
use crate::types::ProbeKey;
use core::ptr;
use node::{Node, body, free_node};

pub use write::Batch;

/// Maximum entries per node.
pub const NODE_CAPACITY: usize = 16;
/// Below this a node is rebalanced with a sibling after a removal.
pub const NODE_MIN: usize = NODE_CAPACITY / 4;

const B: usize = NODE_CAPACITY;

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
    /// earlier load (tokio-rs/loom#392-style). Padded onto its own cache line, so a write does
    /// not take the readers' line (`root`, `len`) until it publishes.
    writer: CachePadded<UnsafeCell<WriterView<K, V>>>,
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
            writer: CachePadded::new(UnsafeCell::new(WriterView {
                root: ptr::null_mut(),
                len: 0,
            })),
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

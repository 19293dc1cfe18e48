//! The nodes: an immutable body (keys, child or value pointers, written once before
//! publication), a leaf's hot words beside it, and the [`Builder`] that allocates a write's fresh
//! nodes and records the ones it retires.

use super::{B, TreeKey};
use crate::alloc_util::{try_box, try_vec_with_capacity};
use crate::error::{Error, Result};
use crate::sync::{AtomicPtr, FreeCheck, UnsafeCell};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr;

pub(super) struct Body<K, V> {
    pub(super) leaf: bool,
    pub(super) len: usize,
    pub(super) keys: [K; B],
    /// Leaf: `*const V`. Internal: `*mut Node<K, V>`.
    pub(super) ptrs: [*const (); B],
    pub(super) _v: core::marker::PhantomData<*const V>,
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
    pub(super) fn empty(leaf: bool) -> Self {
        Self {
            leaf,
            len: 0,
            keys: [K::MIN; B],
            ptrs: [ptr::null(); B],
            _v: core::marker::PhantomData,
        }
    }

    /// Index of the child that routes `key`: the last `i` with `keys[i] <= key`, or 0.
    // Always inlined (as `find`): the hit path's loops; out of line they cost a call per node.
    #[inline(always)]
    pub(super) fn route(&self, key: &K) -> usize {
        let mut i = 1;
        while i < self.len && self.keys[i] <= *key {
            i += 1;
        }
        i - 1
    }

    /// Leaf: `Ok(i)` if `keys[i] == key`, else `Err(insertion point)`.
    #[inline(always)]
    pub(super) fn find(&self, key: &K) -> core::result::Result<usize, usize> {
        let mut i = 0;
        while i < self.len {
            if self.keys[i] >= *key {
                return if self.keys[i] == *key { Ok(i) } else { Err(i) };
            }
            i += 1;
        }
        Err(self.len)
    }

    pub(super) fn insert_at(&mut self, i: usize, k: K, p: *const ()) {
        debug_assert!(self.len < B);
        self.keys.copy_within(i..self.len, i + 1);
        self.ptrs.copy_within(i..self.len, i + 1);
        self.keys[i] = k;
        self.ptrs[i] = p;
        self.len += 1;
    }

    pub(super) fn remove_at(&mut self, i: usize) {
        self.keys.copy_within(i + 1..self.len, i);
        self.ptrs.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.keys[self.len] = K::MIN;
        self.ptrs[self.len] = ptr::null();
    }

    /// Splits a body of up to `2B` entries (given as slices) into two halves.
    pub(super) fn halves(leaf: bool, keys: &[K], ptrs: &[*const ()]) -> (Self, Self) {
        Self::split_at(leaf, keys, ptrs, keys.len() / 2)
    }

    /// Splits a body of up to `2B` entries (given as slices): the first `mid` to the left.
    pub(super) fn split_at(leaf: bool, keys: &[K], ptrs: &[*const ()], mid: usize) -> (Self, Self) {
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
pub(super) struct Node<K, V> {
    /// Written once, before publication; read through the facade's `UnsafeCell` so loom checks
    /// that publication orders the write before every read.
    pub(super) body: UnsafeCell<Body<K, V>>,
    /// Leaves: entry `i`'s hot word (see the module's invariants). Unused in internal nodes.
    pub(super) hot: [AtomicPtr<()>; B],
    pub(super) free_check: FreeCheck,
}

/// Reads a node's body.
///
/// # Safety
///
/// `n` is a node reachable from a root the caller loaded with Acquire (or owns), and the caller
/// holds a read guard of the domain that retires this tree's nodes, or the tree's write lock.
#[inline(always)]
pub(super) unsafe fn body<'a, K, V>(n: *const Node<K, V>) -> &'a Body<K, V> {
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
pub(super) unsafe fn free_node<K, V>(n: *mut Node<K, V>) {
    // SAFETY: the caller's contract.
    let node = unsafe { Box::from_raw(n) };
    node.free_check.mark_freed();
    crate::sync::quarantine(node);
}

/// Builds the new version of a path: records fresh nodes (freed if the write fails) and the old
/// nodes they replace (freed a grace period after the write publishes).
pub(super) struct Builder<K, V> {
    pub(super) fresh: Vec<*mut Node<K, V>>,
    pub(super) retired: Vec<*mut Node<K, V>>,
}

impl<K, V> Builder<K, V> {
    pub(super) fn new() -> Result<Self> {
        Ok(Self {
            fresh: try_vec_with_capacity(16)?,
            retired: try_vec_with_capacity(16)?,
        })
    }

    pub(super) fn node(&mut self, body: Body<K, V>) -> Result<*mut Node<K, V>> {
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

    pub(super) fn retire(&mut self, n: *const Node<K, V>) -> Result<()> {
        if self.retired.len() == self.retired.capacity() {
            self.retired
                .try_reserve(self.retired.len())
                .map_err(|_| Error::NoMemory)?;
        }
        self.retired.push(n as *mut Node<K, V>);
        Ok(())
    }

    /// The write failed before publishing: free what it built.
    pub(super) fn abort(self) {
        for n in self.fresh {
            // SAFETY: fresh nodes were never published, so no reader can reach them.
            unsafe { free_node(n) };
        }
    }
}

pub(super) enum Ins<K, V> {
    One(*mut Node<K, V>),
    Split(*mut Node<K, V>, K, *mut Node<K, V>),
}

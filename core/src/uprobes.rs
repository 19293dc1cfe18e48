//! Probes in address spaces: the breakpoint lifecycle and the hit path.
//!
//! [`Uprobes`] ties the [`Registry`] (probes by object and offset) to address spaces (where
//! code runs). It keeps Invariant 4 — *a breakpoint is in the code exactly while some probe wants
//! it, in every executable mapping of its object* — while probes are registered and unregistered
//! and address spaces are mapped, unmapped, split, protected, moved, forked and torn down; and
//! it answers traps ([`Uprobes::resolve`]). Kprobes are the special case of one address space.
//!
//! # Who installs what
//!
//! * **Registering the first consumer** of a probe installs its breakpoint in every address space
//!   that maps the object at that offset executable, found through the reverse map (object →
//!   address spaces and mappings). The last unregistration removes it everywhere.
//! * **Mapping** an executable range installs every wanted probe of the object inside the range;
//!   unmapping takes the code away with it; making a range executable installs, making it
//!   non-executable restores the original bytes.
//! * **Fork** copies the parent's code, breakpoints included, and enters the child in the
//!   reverse map before any registration can walk it.
//! * Installing over a breakpoint already there counts as success — the seed 000 "double add";
//!   registering on an instruction that already is a trap is refused ([`Error::ExistingTrap`]).
//!
//! # Locks, and why nothing is missed
//!
//! Lock order: object registration lock → fork gate → address-space lock → reverse-map lock and
//! tree lock (both leaves, never held together).
//!
//! * A registration publishes its consumer, *then* reads the reverse map; a mapping enters the
//!   reverse map, *then* reads the probes. Both reads are ordered after the other side's write
//!   through the reverse-map lock, so at least one of them sees the other: either the
//!   registration visits the new mapping, or the mapping finds the new probe (and if both do,
//!   the second install is a double add).
//! * Every install and removal re-checks, under the address space's lock, whether the probe is
//!   wanted *now*, so a removal racing a re-registration leaves the breakpoint exactly if wanted.
//! * Unregistration removes the consumer, restores every breakpoint, and only *then* lets the
//!   probe leave the tree (it holds a counted reference meanwhile). A hit that finds a probe with
//!   no consumers runs the displaced instruction; so a trap on one of our breakpoints is never
//!   answered "not ours", which would deliver our trap to the program.
//! * Fork and the registration walks exclude each other through the fork gate (the kernel's
//!   `dup_mmap_sem`): a walk that started before a fork reached the parent before it was copied
//!   (the child inherits the result); one that starts after finds the child in the reverse map.
//!
//! # The hit path
//!
//! [`Uprobes::resolve`]: speculative first (no lock, no shared store — see [`crate::mm`]), and
//! only a found live probe, validated, is trusted; everything else takes the address space's lock and
//! answers one of three things ([`Hit`]): run this probe; *not ours* (a trap instruction really
//! is at that address and no probe owns it: the embedder delivers it to the program); *restart*
//! (no trap there any more — the probe went away between the trap and the lookup: execute the
//! instruction again). A miss never becomes "not ours" unless a trap is really there.
//!
//! A speculation that a writer raced is not sent to the lock at once: it waits, a bounded number
//! of polls, for the address space's write section to end, and speculates again (at most
//! [`SPECULATION_RETRIES`] times). The write section is one index edit; the lock is held for a
//! whole `mmap` (reverse map, breakpoint installs), which a hit sent to it waits out. In the
//! contention report (resolve, 1 000 probes, one hitter, 1 000 maps+unmaps/s, AMD EPYC), an
//! instrumented build counted about 75 hits on the lock per 100 ms window before the retry,
//! averaging 88 000 TSC cycles each; with it, one in a whole run.

use crate::alloc_util::try_vec_with_capacity;
use crate::arch::{Arch, MAX_BREAKPOINT, SavedInsn, TextPatcher};
use crate::error::{Error, Result};
use crate::lock::{DEFAULT_LOCK_SLOTS, LockTable, RawGuard, RawLock, SpinLock};
use crate::mm::{AddressSpace, AddressSpaceOps, MmId, MmWriter, Speculation, VmFlags, VmaInfo};
use crate::probe::{ObjectId, ProbeKey};
use crate::rcu::Rcu;
use crate::registry::{ProbeView, ReadGuard, Registry};
use crate::tree::{CowTree, TreeKey};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

/// A reverse-map entry: `object` is mapped in address space `mm` by the mapping starting at
/// `start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct RmapKey {
    object: ObjectId,
    mm: MmId,
    start: u64,
}

impl TreeKey for RmapKey {
    const MIN: Self = RmapKey {
        object: ObjectId(0),
        mm: MmId(0),
        start: 0,
    };
}

/// Checks that no address space is called `id` and that one more fits in `spaces`.
fn room_for<L: RawLock>(spaces: &mut Vec<Arc<AddressSpace<L>>>, id: MmId) -> Result<()> {
    if spaces.iter().any(|m| m.id() == id) {
        return Err(Error::Overlap);
    }
    spaces.try_reserve(1).map_err(|_| Error::NoMemory)
}

/// What a trap at an address is.
pub enum Hit<'g, C: ?Sized, R: Rcu, L: RawLock, const N: usize> {
    /// A probe owns it: run its consumers (there may be none: it is being unregistered), then the
    /// displaced instruction.
    Run(ProbeView<'g, C, R, L, N>),
    /// A trap instruction is really there and no probe owns it: deliver it to the program.
    NotOurs,
    /// No trap is there any more (the probe went away): execute the instruction again.
    Restart,
}

impl<C: ?Sized, R: Rcu, L: RawLock, const N: usize> fmt::Debug for Hit<'_, C, R, L, N>
where
    C: Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hit::Run(p) => f.debug_tuple("Run").field(&p.key()).finish(),
            Hit::NotOurs => f.write_str("NotOurs"),
            Hit::Restart => f.write_str("Restart"),
        }
    }
}

/// Which path answered a hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The lock-free speculative lookup, validated.
    Speculative,
    /// The address space's lock.
    Locked,
}

/// How many times [`Uprobes::resolve`] speculates again after a writer raced its speculation,
/// before it takes the address space's lock.
pub const SPECULATION_RETRIES: u32 = 2;

/// How many polls (each a spin-loop hint) a raced speculation waits for the address space's
/// write section to end before it speculates again.
#[cfg(not(loom))]
pub const RACED_WAIT_POLLS: u32 = 1024;
/// How many polls a raced speculation waits (under loom, one: each poll is a model yield).
#[cfg(loom)]
pub const RACED_WAIT_POLLS: u32 = 1;

/// One speculation's outcome.
enum Attempt<'g, C: ?Sized, R: Rcu, L: RawLock, const N: usize> {
    /// A live probe, validated.
    Found(ProbeView<'g, C, R, L, N>),
    /// A writer was inside, or changed the address space before validation.
    Raced,
    /// Nothing live there, unraced: only the lock can say what is.
    Nothing,
}

/// Probes, address spaces, and the breakpoints between them. See the [module docs](self).
pub struct Uprobes<
    C: ?Sized,
    R: Rcu,
    A: Arch,
    T: TextPatcher,
    L: RawLock = SpinLock,
    const N: usize = DEFAULT_LOCK_SLOTS,
> {
    registry: Registry<C, R, L, N>,
    text: T,
    spaces: crate::lock::Lock<L, Vec<Arc<AddressSpace<L>>>>,
    rmap: CowTree<RmapKey, ()>,
    rmap_lock: L,
    registering: LockTable<L, N>,
    fork_gate: L,
    _arch: PhantomData<fn() -> A>,
}

impl<C: ?Sized, R: Rcu, A: Arch, T: TextPatcher, L: RawLock, const N: usize> fmt::Debug
    for Uprobes<C, R, A, T, L, N>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uprobes")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl<C, R, A, T, L, const N: usize> Uprobes<C, R, A, T, L, N>
where
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    A: Arch,
    T: TextPatcher,
    L: RawLock + Default,
{
    /// Nothing registered, no address space.
    pub fn new(rcu: R, text: T) -> Self {
        Self {
            registry: Registry::new(rcu),
            text,
            spaces: crate::lock::Lock::new(L::default(), Vec::new()),
            rmap: CowTree::new(),
            rmap_lock: L::default(),
            registering: LockTable::new(),
            fork_gate: L::default(),
            _arch: PhantomData,
        }
    }

    /// A new, empty address space with id `id`.
    ///
    /// # Errors
    ///
    /// [`Error::Overlap`] if an address space with that id exists; [`Error::NoMemory`].
    pub fn create_mm(&self, id: MmId) -> Result<Arc<AddressSpace<L>>> {
        let mut spaces = self.spaces.lock();
        room_for(&mut spaces, id)?;
        let mm = Arc::new(AddressSpace::new(id));
        spaces.push(mm.clone());
        Ok(mm)
    }

    /// Forks `parent` into a new address space `child` (mappings and code, breakpoints included).
    ///
    /// # Errors
    ///
    /// [`Error::Overlap`] if `child` exists; [`Error::NoMemory`] (nothing created).
    pub fn fork(&self, parent: &AddressSpace<L>, child: MmId) -> Result<Arc<AddressSpace<L>>> {
        #[cfg(loom)]
        let _gate = (!crate::seeded::is(crate::seeded::Bug::ForkWithoutGate))
            .then(|| RawGuard::lock(&self.fork_gate));
        #[cfg(not(loom))]
        let _gate = RawGuard::lock(&self.fork_gate);
        let w = parent.write();
        let mut spaces = self.spaces.lock();
        room_for(&mut spaces, child)?;
        let c: AddressSpace<L> = w.fork(self.registry.rcu(), child)?;
        let c = Arc::new(c);
        {
            let cw = c.write();
            if let Err(e) = self.rmap_sync(&cw) {
                let _ = cw.clear(self.registry.rcu());
                let _ = self.rmap_sync(&cw);
                return Err(e);
            }
        }
        self.text.forked(parent.id(), child);
        spaces.push(c.clone());
        Ok(c)
    }
}

impl<C, R, A, T, L, const N: usize> Uprobes<C, R, A, T, L, N>
where
    C: ?Sized + Send + Sync + 'static,
    R: Rcu,
    A: Arch,
    T: TextPatcher,
    L: RawLock,
{
    /// The probe registry (its RCU domain registers readers).
    pub fn registry(&self) -> &Registry<C, R, L, N> {
        &self.registry
    }

    /// The code patcher.
    pub fn text(&self) -> &T {
        &self.text
    }

    /// The address space with id `id`.
    pub fn mm(&self, id: MmId) -> Option<Arc<AddressSpace<L>>> {
        self.spaces.lock().iter().find(|m| m.id() == id).cloned()
    }

    /// Enters a read section for hits.
    pub fn read<'r>(&'r self, reader: &'r R::Reader<'_>) -> ReadGuard<'r, C, R, L, N> {
        self.registry.read(reader)
    }

    /// Waits for a grace period (after it, no hit calls a consumer unregistered before).
    pub fn sync(&self) {
        self.registry.sync();
    }

    // ------------------------------------------------------------------ registration

    /// Registers `consumer` on (object, offset) and, if it is the probe's first, installs the
    /// breakpoint in every executable mapping of the object that covers the offset.
    ///
    /// # Errors
    ///
    /// [`Error::OffsetOutOfRange`] (past the object's end), [`Error::ExistingTrap`] (the
    /// instruction there is a trap), [`Error::DuplicateConsumer`], [`Error::NoMemory`], or the
    /// patcher's error. Nothing changes on error.
    pub fn register(&self, key: ProbeKey, consumer: Arc<C>) -> Result<()> {
        let _reg = RawGuard::lock(self.registering.lock_for(key.object));
        let mut orig = [0u8; MAX_BREAKPOINT];
        let orig = &mut orig[..A::BREAKPOINT.len()];
        self.text.read_object(key.object, key.offset, orig)?;
        if A::is_trap(orig) {
            return Err(Error::ExistingTrap);
        }
        let insn = SavedInsn::new(orig);
        let first = self.registry.register_with(key, consumer.clone(), insn)?;
        let installed = if first {
            self.sync_everywhere(key, insn)
        } else {
            Ok(())
        };
        if let Err(e) = installed {
            // Roll back: the consumer goes, and with it every breakpoint just placed.
            if let Ok(Some(held)) = self.registry.unregister_holding(&key, &consumer) {
                let _ = self.sync_everywhere(key, held.saved_insn());
            }
            return Err(e);
        }
        Ok(())
    }

    /// Unregisters `consumer`; if it was the probe's last, removes the breakpoint everywhere.
    /// Call [`Uprobes::sync`] (once for many) before freeing what the consumer uses.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownProbe`], [`Error::UnknownConsumer`], or the patcher's error (the consumer
    /// is then already removed; the breakpoints are restored on the next change of those
    /// mappings or by a later unregistration). Never [`Error::NoMemory`]: the consumer list was
    /// reserved by the registration and the walk over the mappings uses a fixed buffer.
    pub fn unregister(&self, key: &ProbeKey, consumer: &Arc<C>) -> Result<()> {
        let _reg = RawGuard::lock(self.registering.lock_for(key.object));
        if let Some(held) = self.registry.unregister_holding(key, consumer)? {
            #[cfg(loom)]
            if crate::seeded::is(crate::seeded::Bug::UnregisterDropsProbeFirst) {
                let insn = held.saved_insn();
                drop(held);
                return self.sync_everywhere(*key, insn);
            }
            // The probe stays findable (with no consumers) until every breakpoint is gone: a hit
            // on a breakpoint not yet restored finds it and runs the displaced instruction,
            // instead of finding nothing and calling our trap "not ours".
            self.sync_everywhere(*key, held.saved_insn())?;
            drop(held);
        }
        Ok(())
    }

    /// Brings the breakpoint of `key` in line with whether it is wanted, in every mapping of its
    /// object (the registration walk).
    fn sync_everywhere(&self, key: ProbeKey, insn: SavedInsn) -> Result<()> {
        let _gate = RawGuard::lock(&self.fork_gate);
        let mut first_err = Ok(());
        const CHUNK: usize = 16;
        let mut buf = [RmapKey::MIN; CHUNK];
        let mut after = None;
        loop {
            let n = self.rmap_chunk(key.object, after, &mut buf);
            self.sync_entries(key, insn, &buf[..n], &mut first_err);
            if n < CHUNK {
                break;
            }
            after = Some(buf[n - 1]);
        }
        first_err
    }

    /// The registration walk's body for one chunk of reverse-map entries.
    fn sync_entries(
        &self,
        key: ProbeKey,
        insn: SavedInsn,
        entries: &[RmapKey],
        first_err: &mut Result<()>,
    ) {
        for &e in entries {
            let Some(mm) = self.mm(e.mm) else { continue };
            let w = mm.write();
            let Some(vma) = w.find(e.start) else { continue };
            if vma.start != e.start
                || vma.object != key.object
                || !vma.flags.contains(VmFlags::EXEC)
            {
                continue;
            }
            let Some(addr) = vma.addr_of(key.offset) else {
                continue;
            };
            let r = if self.registry.wanted(&key).is_some() {
                self.install(&w, &vma, addr)
            } else {
                self.restore(&w, &vma, addr, insn)
            };
            if first_err.is_ok() {
                *first_err = r;
            }
        }
    }

    /// Up to `out.len()` reverse-map entries of `object` in key order, strictly after `after`
    /// (from the first when `None`); returns how many. A fixed buffer, so the registration walk
    /// — and with it unregistration — never allocates: the walk takes the entries a chunk at a
    /// time, dropping the reverse-map lock between chunks (it takes each address space's write
    /// lock, which an mmap holds while it takes the reverse-map lock).
    fn rmap_chunk(&self, object: ObjectId, after: Option<RmapKey>, out: &mut [RmapKey]) -> usize {
        let _rmap = RawGuard::lock(&self.rmap_lock);
        let mut n = 0;
        let lo = after.unwrap_or(RmapKey {
            object,
            ..RmapKey::MIN
        });
        let hi = RmapKey {
            object: ObjectId(object.0.wrapping_add(1)),
            ..RmapKey::MIN
        };
        let mut visit = |k: &RmapKey, _: *const ()| {
            if k.object != object {
                return false;
            }
            if Some(*k) == after {
                return true;
            }
            out[n] = *k;
            n += 1;
            n < out.len()
        };
        // SAFETY: the reverse-map lock is held: nothing reachable is freed during the walk.
        unsafe {
            if object.0 == u64::MAX {
                self.rmap.for_each(|k, v| {
                    k.object < object || after.is_some_and(|a| *k < a) || visit(k, v)
                });
            } else {
                self.rmap.range(&lo, &hi, visit);
            }
        }
        n
    }

    fn install(&self, w: &MmWriter<'_, L>, vma: &VmaInfo, addr: u64) -> Result<()> {
        let mut cur = [0u8; MAX_BREAKPOINT];
        let cur = &mut cur[..A::BREAKPOINT.len()];
        self.text.read(w.mm().id(), vma, addr, cur)?;
        if A::is_trap(cur) {
            return Ok(()); // the "double add": a breakpoint is already there
        }
        self.text.write(w.mm().id(), vma, addr, A::BREAKPOINT)
    }

    fn restore(
        &self,
        w: &MmWriter<'_, L>,
        vma: &VmaInfo,
        addr: u64,
        insn: SavedInsn,
    ) -> Result<()> {
        let mut cur = [0u8; MAX_BREAKPOINT];
        let cur = &mut cur[..A::BREAKPOINT.len()];
        self.text.read(w.mm().id(), vma, addr, cur)?;
        if cur == A::BREAKPOINT {
            self.text.write(w.mm().id(), vma, addr, insn.as_bytes())?;
        }
        Ok(())
    }

    /// Installs (or restores) every probe of `vma`'s object inside it.
    fn sync_mapping(&self, w: &MmWriter<'_, L>, vma: &VmaInfo) -> Result<()> {
        let exec = vma.flags.contains(VmFlags::EXEC);
        let mut probes: Vec<(u64, SavedInsn, bool)> = try_vec_with_capacity(0)?;
        let mut err = Ok(());
        self.registry.probes_of(
            vma.object,
            vma.pgoff..vma.pgoff + (vma.end - vma.start),
            |off, insn, wanted| {
                if err.is_ok() {
                    if probes.len() == probes.capacity()
                        && probes.try_reserve(probes.len().max(4)).is_err()
                    {
                        err = Err(Error::NoMemory);
                        return;
                    }
                    probes.push((off, insn, wanted));
                }
            },
        );
        err?;
        for (off, insn, wanted) in probes {
            let Some(addr) = vma.addr_of(off) else {
                continue;
            };
            if exec && wanted {
                self.install(w, vma, addr)?;
            } else {
                self.restore(w, vma, addr, insn)?;
            }
        }
        Ok(())
    }

    /// Makes the reverse map's entries for this address space match its mappings.
    fn rmap_sync(&self, w: &MmWriter<'_, L>) -> Result<()> {
        let id = w.mm().id();
        let want = w.mappings();
        let _rmap = RawGuard::lock(&self.rmap_lock);
        let mut have: Vec<RmapKey> = try_vec_with_capacity(want.len())?;
        let mut err = Ok(());
        // SAFETY: the reverse-map lock is held.
        unsafe {
            self.rmap.for_each(|k, _| {
                if k.mm == id {
                    if have.len() == have.capacity() && have.try_reserve(have.len().max(4)).is_err()
                    {
                        err = Err(Error::NoMemory);
                        return false;
                    }
                    have.push(*k);
                }
                true
            })
        };
        err?;
        // SAFETY: the reverse-map lock serializes its writers; one domain.
        unsafe {
            self.rmap.batch(self.registry.rcu(), |b| {
                for k in &have {
                    if !want
                        .iter()
                        .any(|v| v.start == k.start && v.object == k.object)
                    {
                        b.remove(k)?;
                    }
                }
                for v in &want {
                    b.insert(
                        RmapKey {
                            object: v.object,
                            mm: id,
                            start: v.start,
                        },
                        core::ptr::null(),
                    )?;
                }
                Ok(())
            })
        }
    }

    // ------------------------------------------------------------------ address-space changes

    /// Maps `[start, start + len)` of `mm` to `object` from `pgoff`, installing the object's
    /// wanted probes in range if the mapping is executable.
    ///
    /// # Errors
    ///
    /// As for [`MmWriter::map`], or the patcher's error (the mapping is then undone).
    pub fn mmap(
        &self,
        mm: &AddressSpace<L>,
        start: u64,
        len: u64,
        pgoff: u64,
        object: ObjectId,
        flags: VmFlags,
    ) -> Result<VmaInfo> {
        let w = mm.write();
        let rcu = self.registry.rcu();
        let vma = w.map(rcu, start, len, pgoff, object, flags)?;
        // Into the reverse map *before* reading the probes (see the module docs).
        let r = self
            .rmap_sync(&w)
            .and_then(|()| self.sync_mapping(&w, &vma));
        if let Err(e) = r {
            let _ = w.unmap(rcu, start, len);
            let _ = self.rmap_sync(&w);
            self.text.unmapped(mm.id(), start, start + len);
            return Err(e);
        }
        Ok(vma)
    }

    /// Unmaps `[start, start + len)` of `mm`; its code and breakpoints go with it.
    ///
    /// # Errors
    ///
    /// As for [`MmWriter::unmap`].
    pub fn munmap(&self, mm: &AddressSpace<L>, start: u64, len: u64) -> Result<()> {
        let w = mm.write();
        w.unmap(self.registry.rcu(), start, len)?;
        self.text.unmapped(mm.id(), start, start + len);
        self.rmap_sync(&w)
    }

    /// Sets the flags of `[start, start + len)` of `mm`; becoming executable installs wanted
    /// probes, ceasing to be restores the original bytes.
    ///
    /// # Errors
    ///
    /// As for [`MmWriter::protect`], or the patcher's error.
    pub fn mprotect(
        &self,
        mm: &AddressSpace<L>,
        start: u64,
        len: u64,
        flags: VmFlags,
    ) -> Result<()> {
        let w = mm.write();
        w.protect(self.registry.rcu(), start, len, flags)?;
        self.rmap_sync(&w)?;
        let end = start + len;
        for vma in w
            .mappings()
            .into_iter()
            .filter(|v| v.start >= start && v.end <= end)
        {
            self.sync_mapping(&w, &vma)?;
        }
        Ok(())
    }

    /// Splits the mapping of `mm` containing `addr` at `addr`.
    ///
    /// # Errors
    ///
    /// As for [`MmWriter::split`].
    pub fn split(&self, mm: &AddressSpace<L>, addr: u64) -> Result<()> {
        let w = mm.write();
        w.split(self.registry.rcu(), addr)?;
        self.rmap_sync(&w)
    }

    /// Moves the mapping that is exactly `[old, old + len)` of `mm` to `new`; its code moves too.
    ///
    /// # Errors
    ///
    /// As for [`MmWriter::remap`].
    pub fn mremap(&self, mm: &AddressSpace<L>, old: u64, len: u64, new: u64) -> Result<()> {
        let w = mm.write();
        w.remap(self.registry.rcu(), old, len, new)?;
        self.text.moved(mm.id(), old, new, len);
        self.rmap_sync(&w)
    }

    /// Tears `mm` down (exit): unmaps everything and forgets it.
    ///
    /// # Errors
    ///
    /// [`Error::NoMemory`].
    pub fn exit(&self, mm: &AddressSpace<L>) -> Result<()> {
        let w = mm.write();
        for v in w.clear(self.registry.rcu())? {
            self.text.unmapped(mm.id(), v.start, v.end);
        }
        self.rmap_sync(&w)?;
        drop(w);
        self.spaces.lock().retain(|m| m.id() != mm.id());
        Ok(())
    }

    // ------------------------------------------------------------------ the hit path

    /// Answers a trap at `addr` in `mm`. Speculative first; the locked path otherwise.
    ///
    /// A speculation that a writer raced (the address space was inside a write section, or
    /// changed before validation) is tried again, up to [`SPECULATION_RETRIES`] times, each
    /// after waiting up to [`RACED_WAIT_POLLS`] polls for the write section to end. A write
    /// section is one index edit, far shorter than the address-space lock's hold (a whole
    /// `mmap`, breakpoint installs included), so waiting it out is what keeps a hit racing a
    /// mapping change off the lock. A speculation that found nothing, unraced, goes straight to
    /// the lock: only the locked path may say [`Hit::NotOurs`] or [`Hit::Restart`].
    // Inline: the speculative path is the hit path, and a call returns the (Hit, Path) pair
    // through memory; the locked path stays out of line (`locked_fallback`).
    #[inline]
    pub fn resolve<'g, M: AddressSpaceOps>(
        &self,
        guard: &'g ReadGuard<'_, C, R, L, N>,
        mm: &M,
        addr: u64,
    ) -> (Hit<'g, C, R, L, N>, Path) {
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::ResolveRetryKeepsFind) {
            return self.resolve_retry_keeping_find(guard, mm, addr);
        }
        let mut retries = SPECULATION_RETRIES;
        loop {
            match Self::attempt(guard, mm, addr) {
                Attempt::Found(p) => return (Hit::Run(p), Path::Speculative),
                Attempt::Raced if retries > 0 => {
                    retries -= 1;
                    for _ in 0..RACED_WAIT_POLLS {
                        if mm.stamp().is_some() {
                            break;
                        }
                        crate::sync::spin_loop();
                    }
                }
                Attempt::Raced | Attempt::Nothing => break,
            }
        }
        self.locked_fallback(guard, mm, addr)
    }

    /// [`Uprobes::resolve_locked`], out of line and cold: the hit path's rare case.
    #[cold]
    #[inline(never)]
    fn locked_fallback<'g, M: AddressSpaceOps>(
        &self,
        guard: &'g ReadGuard<'_, C, R, L, N>,
        mm: &M,
        addr: u64,
    ) -> (Hit<'g, C, R, L, N>, Path) {
        (self.resolve_locked(guard, mm, addr), Path::Locked)
    }

    /// The seeded bug [`ResolveRetryKeepsFind`](crate::seeded::Bug::ResolveRetryKeepsFind): a
    /// raced speculation that had found a key retries with a fresh begin and validation around a
    /// lookup of the *old* key.
    #[cfg(loom)]
    fn resolve_retry_keeping_find<'g, M: AddressSpaceOps>(
        &self,
        guard: &'g ReadGuard<'_, C, R, L, N>,
        mm: &M,
        addr: u64,
    ) -> (Hit<'g, C, R, L, N>, Path) {
        let mut kept = None;
        for _ in 0..=SPECULATION_RETRIES {
            let Some(mut spec) = mm.speculate_begin() else {
                crate::sync::spin_loop();
                continue;
            };
            let found = match kept {
                Some(k) => Some(k),
                None => mm.speculate_find(&mut spec, addr),
            };
            let Some((object, offset)) = found else {
                break;
            };
            let p = guard
                .lookup(&ProbeKey::new(object, offset))
                .filter(|p| !p.consumers().is_empty());
            if mm.speculate_validate(&spec) {
                match p {
                    Some(p) => return (Hit::Run(p), Path::Speculative),
                    None => break,
                }
            }
            kept = Some((object, offset));
            crate::sync::spin_loop();
        }
        (self.resolve_locked(guard, mm, addr), Path::Locked)
    }

    /// The speculative path: a validated live probe, or `None` (take the lock).
    #[inline]
    pub fn speculate<'g, M: AddressSpaceOps>(
        guard: &'g ReadGuard<'_, C, R, L, N>,
        mm: &M,
        addr: u64,
    ) -> Option<ProbeView<'g, C, R, L, N>> {
        match Self::attempt(guard, mm, addr) {
            Attempt::Found(p) => Some(p),
            Attempt::Raced | Attempt::Nothing => None,
        }
    }

    /// One speculation, and whether a writer raced it when it found no live probe.
    #[inline]
    fn attempt<'g, M: AddressSpaceOps>(
        guard: &'g ReadGuard<'_, C, R, L, N>,
        mm: &M,
        addr: u64,
    ) -> Attempt<'g, C, R, L, N> {
        let Some(mut spec) = mm.speculate_begin() else {
            return Attempt::Raced;
        };
        // What a speculation that found no live probe says: raced if the address space changed
        // meanwhile (what it read may be torn), otherwise nothing is there to find without the
        // lock.
        let missed = |spec: &Speculation| {
            if mm.speculate_validate(spec) {
                Attempt::Nothing
            } else {
                Attempt::Raced
            }
        };
        let Some((object, offset)) = mm.speculate_find(&mut spec, addr) else {
            return missed(&spec);
        };
        #[cfg(loom)]
        if crate::seeded::is(crate::seeded::Bug::ResolveValidateBeforeLookup) {
            if !mm.speculate_validate(&spec) {
                return Attempt::Raced;
            }
            return match guard
                .lookup(&ProbeKey::new(object, offset))
                .filter(|p| !p.consumers().is_empty())
            {
                Some(p) => Attempt::Found(p),
                None => Attempt::Nothing,
            };
        }
        let Some(p) = guard
            .lookup(&ProbeKey::new(object, offset))
            .filter(|p| !p.consumers().is_empty())
        else {
            return missed(&spec);
        };
        // Validate last: only now is (object, offset) — and so the probe — known to be what
        // `addr` mapped at one instant.
        if mm.speculate_validate(&spec) {
            Attempt::Found(p)
        } else {
            Attempt::Raced
        }
    }

    /// The locked path.
    pub fn resolve_locked<'g, M: AddressSpaceOps>(
        &self,
        guard: &'g ReadGuard<'_, C, R, L, N>,
        mm: &M,
        addr: u64,
    ) -> Hit<'g, C, R, L, N> {
        mm.locked_find(addr, |vma| {
            let Some(vma) = vma.filter(|v| v.flags.contains(VmFlags::EXEC)) else {
                // Nothing executable is mapped there: re-executing gives the right fault.
                return Hit::Restart;
            };
            let key = ProbeKey::new(vma.object, vma.offset_of(addr));
            // A live probe owns the address even with no consumers left (it is being
            // unregistered and its breakpoint may still be there). A dying one does not: its
            // breakpoints were restored before its last reference went.
            if let Some(p) = guard.lookup(&key).filter(|p| !p.probe().is_dying()) {
                return Hit::Run(p);
            }
            #[cfg(loom)]
            if crate::seeded::is(crate::seeded::Bug::ResolveMissIsNotOurs) {
                return Hit::NotOurs;
            }
            let mut cur = [0u8; MAX_BREAKPOINT];
            let cur = &mut cur[..A::BREAKPOINT.len()];
            match self.text.read(mm.id(), &vma, addr, cur) {
                Ok(()) if A::is_trap(cur) => Hit::NotOurs,
                _ => Hit::Restart,
            }
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

//! The implementations the contention report measures, behind one trait.
//!
//! Two questions, two sets of contenders:
//!
//! * **lookup** — a probe key (object, offset) to its consumers, as a trap handler does once it
//!   knows the key. probe-core's [`Registry`]; the [`kprobe`] crate 0.6's `ProbeManager` (a
//!   no_std probe library used by Rust kernels: its break handler takes a mutex and clones the
//!   probe list on every hit); the 2012 kernel design of seed 000 (one spinlock around an
//!   ordered tree, a reference taken on the hit probe); `RwLock<BTreeMap>`; an `ArcSwap` of a
//!   copy-on-write `BTreeMap`; and the ceiling, an unsynchronized `BTreeMap` private to each
//!   thread.
//! * **resolve** — a trap *address* to its probe's consumers: find the mapping, compute (object,
//!   offset), look the probe up. probe-core's speculative [`Uprobes::resolve`]; the 2012 kernel
//!   (the address space under an `RwLock` as `mmap_sem`, then seed 000's locked tree); an address
//!   space under an `RwLock` (the `mmap_lock` read side) or under the `seqlock` crate, each
//!   followed by the `ArcSwap` map (the best lock-free lookup among the alternatives, so the
//!   address-space protocol is what differs); and the ceiling, private copies of both.
//!
//! probe-core appears twice in each table: over its process embedding's RCU domain
//! ([`probe_process::live::hit_rcu`], `SlotRcu` with a `membarrier` grace period: the row the
//! goals judge) and over `EpochRcu` (crossbeam-epoch, the `std` default), so the report shows
//! what the RCU's read side costs.
//!
//! Every lock here that spins (probe-core's, seed 000's, the one `kprobe` is instantiated with)
//! yields the thread when it cannot take the lock: in a user process a pure spin measures the
//! scheduler once threads outnumber cores. The `kprobe` crate keys probes by address, not by
//! (object, offset), and has no address-space model, so it appears in the lookup table only.

use crate::workload::{Consumer, Consumers, Mapping, Regs, Target, Workload};
use arc_swap::ArcSwap;
use probe_core::lock::{Lock, RawLock, SpinLock, YieldRelax};
use probe_core::mm::{AddressSpace, MmId, VmFlags};
use probe_core::probe::{ObjectId, ProbeKey};
use probe_core::rcu::{EpochRcu, Rcu, SlotRcu};
use probe_core::registry::Registry;
use probe_core::testing::{ByteText, Int3};
use probe_core::uprobes::{Hit, Uprobes};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The spinlock every spinning contender uses: test-and-test-and-set, yielding when held.
pub type Spin = SpinLock<YieldRelax>;

/// One implementation under measurement.
pub trait Contender: Sync {
    /// Per-thread state (an RCU reader, private copies, a register file).
    type Local<'a>
    where
        Self: 'a;
    /// Name in the report.
    fn name(&self) -> &'static str;
    /// A hitting thread's state.
    fn local(&self) -> Self::Local<'_>;
    /// One probe hit on `t`: find its probe, call its consumers on `regs`.
    fn hit<'a>(&'a self, local: &mut Self::Local<'a>, t: &Target, regs: &mut Regs);
    /// The churn writer registers `t` with consumer `c`.
    fn register(&self, t: &Target, c: &Arc<Consumer>);
    /// The churn writer unregisters `t` (registered with `c`).
    fn unregister(&self, t: &Target, c: &Arc<Consumer>);
    /// The address-space churn maps `m` (resolve contenders only).
    fn map(&self, _m: &Mapping) {}
    /// The address-space churn unmaps `m` (resolve contenders only).
    fn unmap(&self, _m: &Mapping) {}
    /// Whether the churn writer changes what this contender's hits search (the ceiling's
    /// private copies do not see churn).
    fn sees_churn(&self) -> bool {
        true
    }
    /// Whether this contender's RCU domain needs someone to run its grace periods (one that
    /// does not run its own callbacks). The report then calls [`Contender::grace_period`] every
    /// [`GRACE_PERIOD_EVERY`] from a thread of its own, as a kernel's grace-period kthread runs
    /// `call_rcu` callbacks: the churn writers never wait for readers.
    fn needs_grace_periods(&self) -> bool {
        false
    }
    /// Runs one grace period of this contender's RCU domain and the callbacks queued before it
    /// (only called when [`Contender::needs_grace_periods`]).
    fn grace_period(&self) {}
}

/// The hit probes of a workload with their consumers.
pub struct Probes {
    /// (target, its one consumer).
    pub hit: Vec<(Target, Arc<Consumer>)>,
    /// The churn targets' consumers, by index of [`Workload::churn`].
    pub churn: Vec<Arc<Consumer>>,
}

impl Probes {
    /// One consumer per probe of `w`.
    pub fn new(w: &Workload) -> Self {
        Self {
            hit: w
                .hit
                .iter()
                .map(|t| (*t, crate::workload::consumer(t.tag)))
                .collect(),
            churn: w
                .churn
                .iter()
                .map(|t| crate::workload::consumer(t.tag))
                .collect(),
        }
    }

    fn map(&self) -> BTreeMap<ProbeKey, Consumers> {
        self.hit
            .iter()
            .map(|(t, c)| (t.key, Arc::from([c.clone()])))
            .collect()
    }
}

#[inline(always)]
fn call_all(cs: &[Arc<Consumer>], regs: &mut Regs) {
    for c in cs {
        c(regs);
    }
}

// ------------------------------------------------------------------------------------ lookup

/// An RCU domain probe-core's contenders run over.
pub trait CoreRcu: Rcu + Sized + 'static {
    /// The contender's name in the report.
    const NAME: &'static str;
    /// Whether the domain runs deferred callbacks by itself; if not, the report runs its grace
    /// periods from a thread of their own ([`Contender::grace_period`]).
    const RUNS_OWN_CALLBACKS: bool;
    /// A fresh domain.
    fn make() -> Self;
}

/// The domain probe-core's process embedding runs its hit path over
/// ([`probe_process::live::hit_rcu`]): a slot per reader, the reader's fence a compiler fence,
/// a grace period one `membarrier(PRIVATE_EXPEDITED)` and a scan of the slots (yielding to a
/// reader preempted inside its section).
impl CoreRcu for SlotRcu {
    const NAME: &'static str = crate::report::PROBE_CORE;
    const RUNS_OWN_CALLBACKS: bool = false;
    fn make() -> Self {
        probe_process::live::hit_rcu()
    }
}

/// crossbeam-epoch: a reader's pin is a store and a full fence (on x86 a locked
/// read-modify-write of the reader's own record) and, every 128 pins, a collection step that
/// may run deferred callbacks on the reading thread.
impl CoreRcu for EpochRcu {
    const NAME: &'static str = "probe-core (epoch)";
    const RUNS_OWN_CALLBACKS: bool = true;
    fn make() -> Self {
        EpochRcu::with_relax(std::thread::yield_now)
    }
}

/// How often the report's grace-period thread runs a grace period of a domain that does not run
/// its own callbacks: every write's callbacks wait for the next one, as a kernel's `call_rcu`
/// callbacks wait for the grace period in progress (tens of milliseconds on a loaded kernel).
pub const GRACE_PERIOD_EVERY: Duration = Duration::from_millis(20);

/// probe-core's registry over the RCU domain `R`.
pub struct CoreLookup<R: CoreRcu> {
    reg: Registry<Consumer, R, Spin>,
}

impl<R: CoreRcu> CoreLookup<R> {
    /// Registers every hit probe.
    pub fn new(p: &Probes) -> Self {
        let reg = Registry::new(R::make());
        for (t, c) in &p.hit {
            reg.register(t.key, c.clone()).expect("register");
        }
        reg.rcu().synchronize();
        Self { reg }
    }
}

impl<R: CoreRcu> Contender for CoreLookup<R> {
    type Local<'a> = R::Reader<'a>;
    fn name(&self) -> &'static str {
        R::NAME
    }
    fn local(&self) -> Self::Local<'_> {
        self.reg.rcu().register().expect("rcu reader")
    }
    #[inline]
    fn hit<'a>(&'a self, local: &mut Self::Local<'a>, t: &Target, regs: &mut Regs) {
        let guard = self.reg.read(local);
        if let Some(p) = guard.lookup(&t.key) {
            call_all(p.consumers(), regs);
        }
    }
    fn register(&self, t: &Target, c: &Arc<Consumer>) {
        self.reg.register(t.key, c.clone()).expect("register");
    }
    fn unregister(&self, t: &Target, c: &Arc<Consumer>) {
        self.reg.unregister(&t.key, c).expect("unregister");
    }
    fn needs_grace_periods(&self) -> bool {
        !R::RUNS_OWN_CALLBACKS
    }
    fn grace_period(&self) {
        self.reg.rcu().synchronize();
    }
}

/// Seed 000's design: one spinlock around an ordered tree; a hit takes the lock, finds the
/// probe, takes a reference, drops the lock, runs the consumers, drops the reference.
pub struct Seed000Lookup {
    tree: Lock<Spin, BTreeMap<ProbeKey, Consumers>>,
}

impl Seed000Lookup {
    /// Inserts every hit probe.
    pub fn new(p: &Probes) -> Self {
        Self {
            tree: Lock::new(Spin::new(), p.map()),
        }
    }

    #[inline]
    fn find(&self, key: &ProbeKey) -> Option<Consumers> {
        self.tree.lock().get(key).cloned()
    }
}

impl Contender for Seed000Lookup {
    type Local<'a> = ();
    fn name(&self) -> &'static str {
        "seed-000 lock+tree"
    }
    fn local(&self) {}
    #[inline]
    fn hit(&self, _: &mut (), t: &Target, regs: &mut Regs) {
        if let Some(cs) = self.find(&t.key) {
            call_all(&cs, regs);
        }
    }
    fn register(&self, t: &Target, c: &Arc<Consumer>) {
        self.tree.lock().insert(t.key, Arc::from([c.clone()]));
    }
    fn unregister(&self, t: &Target, _: &Arc<Consumer>) {
        self.tree.lock().remove(&t.key);
    }
}

/// `RwLock<BTreeMap>`: consumers run under the read lock.
pub struct RwLockLookup {
    tree: RwLock<BTreeMap<ProbeKey, Consumers>>,
}

impl RwLockLookup {
    /// Inserts every hit probe.
    pub fn new(p: &Probes) -> Self {
        Self {
            tree: RwLock::new(p.map()),
        }
    }
}

impl Contender for RwLockLookup {
    type Local<'a> = ();
    fn name(&self) -> &'static str {
        "RwLock<BTreeMap>"
    }
    fn local(&self) {}
    #[inline]
    fn hit(&self, _: &mut (), t: &Target, regs: &mut Regs) {
        if let Some(cs) = self.tree.read().unwrap().get(&t.key) {
            call_all(cs, regs);
        }
    }
    fn register(&self, t: &Target, c: &Arc<Consumer>) {
        self.tree
            .write()
            .unwrap()
            .insert(t.key, Arc::from([c.clone()]));
    }
    fn unregister(&self, t: &Target, _: &Arc<Consumer>) {
        self.tree.write().unwrap().remove(&t.key);
    }
}

/// An `ArcSwap` of a `BTreeMap`: lock-free reads, each write copies the map (cheaply: values
/// are shared `Arc`s) and swaps it in.
pub struct ArcSwapLookup {
    map: ArcSwap<BTreeMap<ProbeKey, Consumers>>,
}

impl ArcSwapLookup {
    /// Inserts every hit probe.
    pub fn new(p: &Probes) -> Self {
        Self {
            map: ArcSwap::from_pointee(p.map()),
        }
    }

    #[inline]
    fn hit_key(&self, key: &ProbeKey, regs: &mut Regs) {
        if let Some(cs) = self.map.load().get(key) {
            call_all(cs, regs);
        }
    }

    fn update(&self, f: impl Fn(&mut BTreeMap<ProbeKey, Consumers>)) {
        self.map.rcu(|m| {
            let mut m = BTreeMap::clone(m);
            f(&mut m);
            m
        });
    }
}

impl Contender for ArcSwapLookup {
    type Local<'a> = ();
    fn name(&self) -> &'static str {
        "ArcSwap<BTreeMap>"
    }
    fn local(&self) {}
    #[inline]
    fn hit(&self, _: &mut (), t: &Target, regs: &mut Regs) {
        self.hit_key(&t.key, regs);
    }
    fn register(&self, t: &Target, c: &Arc<Consumer>) {
        self.update(|m| {
            m.insert(t.key, Arc::from([c.clone()]));
        });
    }
    fn unregister(&self, t: &Target, _: &Arc<Consumer>) {
        self.update(|m| {
            m.remove(&t.key);
        });
    }
}

/// The ceiling: each thread looks up in its own private copy, with no synchronization at all.
pub struct CeilingLookup {
    map: BTreeMap<ProbeKey, Consumers>,
}

impl CeilingLookup {
    /// A map every thread copies.
    pub fn new(p: &Probes) -> Self {
        Self { map: p.map() }
    }
}

impl Contender for CeilingLookup {
    type Local<'a> = BTreeMap<ProbeKey, Consumers>;
    fn name(&self) -> &'static str {
        "ceiling (private BTreeMap)"
    }
    fn local(&self) -> Self::Local<'_> {
        self.map.clone()
    }
    #[inline]
    fn hit<'a>(&'a self, local: &mut Self::Local<'a>, t: &Target, regs: &mut Regs) {
        if let Some(cs) = local.get(&t.key) {
            call_all(cs, regs);
        }
    }
    fn register(&self, _: &Target, _: &Arc<Consumer>) {}
    fn unregister(&self, _: &Target, _: &Arc<Consumer>) {}
    fn sees_churn(&self) -> bool {
        false
    }
}

// ----------------------------------------------------------------------------- kprobe 0.6

/// `lock_api::RawMutex` over the report's spinlock, for the `kprobe` crate.
pub struct KSpin(Spin);

// SAFETY: `Spin` is a mutual-exclusion lock (its `RawLock` contract): `lock` returns only to one
// holder at a time and `unlock` is called by the holder only (lock_api's contract for `unlock`).
unsafe impl lock_api::RawMutex for KSpin {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = KSpin(SpinLock::new());
    type GuardMarker = lock_api::GuardSend;
    fn lock(&self) {
        RawLock::lock(&self.0);
    }
    fn try_lock(&self) -> bool {
        RawLock::try_lock(&self.0)
    }
    unsafe fn unlock(&self) {
        // SAFETY: lock_api calls `unlock` only on behalf of the holder.
        unsafe { RawLock::unlock(&self.0) }
    }
}

/// The host operations `kprobe` needs, over plain memory: the "text" is a heap arena of `nop`s
/// that is never executed, only patched.
#[derive(Debug)]
pub struct ArenaOps;

impl kprobe::KprobeAuxiliaryOps for ArenaOps {
    // The trait (the `kprobe` crate's) makes these safe functions taking raw pointers; only
    // `kprobe` calls them, with pointers into memory we handed it.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    fn copy_memory(src: *const u8, dst: *mut u8, len: usize, _: Option<i32>) {
        // SAFETY: `kprobe` copies the instruction bytes at a probe address (inside the arena,
        // which has 15 bytes of slack at its end) into a page it got from us.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
    }
    fn set_writeable_for_address<F: FnOnce(*mut u8)>(
        address: usize,
        _: usize,
        _: Option<i32>,
        action: F,
    ) {
        action(address as *mut u8)
    }
    fn alloc_kernel_exec_memory() -> *mut u8 {
        Box::into_raw(Box::new([0u8; 4096])).cast()
    }
    fn free_kernel_exec_memory(ptr: *mut u8) {
        // SAFETY: `ptr` came from `alloc_kernel_exec_memory`, which boxed a page.
        drop(unsafe { Box::from_raw(ptr.cast::<[u8; 4096]>()) })
    }
    fn alloc_user_exec_memory<F: FnOnce(*mut u8)>(_: Option<i32>, action: F) -> *mut u8 {
        let p = Self::alloc_kernel_exec_memory();
        action(p);
        p
    }
    fn free_user_exec_memory(_: Option<i32>, ptr: *mut u8) {
        Self::free_kernel_exec_memory(ptr)
    }
    fn insert_kretprobe_instance_to_task(_: kprobe::retprobe::RetprobeInstance) {
        unreachable!("the report registers no kretprobes")
    }
    fn pop_kretprobe_instance_from_task() -> kprobe::retprobe::RetprobeInstance {
        unreachable!("the report registers no kretprobes")
    }
}

type KManager = kprobe::ProbeManager<KSpin, ArenaOps>;
type KProbe = kprobe::Kprobe<KSpin, ArenaOps>;

/// What a `kprobe` probe carries: the tag its handler adds.
#[derive(Debug)]
struct Tag(u64);

/// The `kprobe` pre-handler: the same work as [`crate::workload::consumer`], on the crate's
/// register file (`r15` counts, `r14` sums).
fn kprobe_consumer(data: &dyn kprobe::ProbeData, regs: &mut kprobe::PtRegs) {
    if let Some(Tag(tag)) = data.as_any().downcast_ref::<Tag>() {
        regs.r15 += 1;
        regs.r14 = regs.r14.wrapping_add(*tag as usize);
    }
}

struct KState {
    points: kprobe::ProbePointList<ArenaOps>,
    live: HashMap<usize, Arc<KProbe>>,
}

/// The `kprobe` crate 0.6: `ProbeManager` and its break handler, `kprobe_handler_from_break`.
pub struct KprobeLookup {
    manager: Option<KManager>,
    state: Mutex<KState>,
    arena: *mut [u8],
    base: usize,
}

// SAFETY: the arena is written only through `kprobe`'s patching calls, which run under `state`'s
// mutex (registration) or in `Drop` (exclusive); hits only compute addresses from `base`.
unsafe impl Sync for KprobeLookup {}

impl KprobeLookup {
    /// An arena with every object's code, every hit probe registered.
    pub fn new(w: &Workload) -> Self {
        // Every object's bytes, back to back, plus the 15 bytes `kprobe` reads past a probe.
        let arena = Box::into_raw(
            vec![0x90u8; (w.object_len * crate::workload::OBJECTS) as usize + 16]
                .into_boxed_slice(),
        );
        let me = Self {
            manager: Some(KManager::new()),
            state: Mutex::new(KState {
                points: BTreeMap::new(),
                live: HashMap::new(),
            }),
            base: arena as *mut u8 as usize,
            arena,
        };
        for t in &w.hit {
            me.add(t);
        }
        me
    }

    fn manager(&self) -> &KManager {
        self.manager.as_ref().expect("manager lives until drop")
    }

    fn add(&self, t: &Target) {
        let b = kprobe::ProbeBuilder::<ArenaOps>::new()
            .with_symbol_addr(self.base + t.arena)
            .with_pre_handler(kprobe_consumer)
            .with_data(Tag(t.tag))
            .with_enable(true);
        let mut s = self.state.lock().unwrap();
        let p = kprobe::register_kprobe(self.manager(), &mut s.points, b).expect("kprobe install");
        s.live.insert(t.arena, p);
    }
}

impl Drop for KprobeLookup {
    fn drop(&mut self) {
        // Probe points restore their bytes into the arena when dropped: free it last.
        let s = self.state.get_mut().unwrap();
        s.live.clear();
        s.points.clear();
        self.manager = None;
        // SAFETY: `arena` came from `Box::into_raw` in `new`; nothing refers to it any more.
        drop(unsafe { Box::from_raw(self.arena) });
    }
}

impl Contender for KprobeLookup {
    type Local<'a> = kprobe::PtRegs;
    fn name(&self) -> &'static str {
        "kprobe 0.6"
    }
    fn local(&self) -> kprobe::PtRegs {
        // SAFETY: `PtRegs` is `repr(C)` and all `usize`: all-zero is a valid value.
        unsafe { std::mem::zeroed() }
    }
    #[inline]
    fn hit(&self, pt: &mut kprobe::PtRegs, t: &Target, regs: &mut Regs) {
        // The trap leaves the instruction pointer after the one-byte int3.
        pt.rip = self.base + t.arena + 1;
        pt.r15 = regs.hits as usize;
        pt.r14 = regs.sum as usize;
        kprobe::kprobe_handler_from_break(self.manager(), pt);
        regs.hits = pt.r15 as u64;
        regs.sum = pt.r14 as u64;
    }
    fn register(&self, t: &Target, _: &Arc<Consumer>) {
        self.add(t);
    }
    fn unregister(&self, t: &Target, _: &Arc<Consumer>) {
        let mut s = self.state.lock().unwrap();
        if let Some(p) = s.live.remove(&t.arena) {
            kprobe::unregister_kprobe(self.manager(), &mut s.points, p);
        }
    }
}

// ----------------------------------------------------------------------------- resolve

type CoreU<R> = Uprobes<Consumer, R, Int3, ByteText<Spin>, Spin>;

/// probe-core's `Uprobes::resolve` (speculative, locked fallback) over its own address space.
pub struct CoreResolve<R: CoreRcu> {
    u: CoreU<R>,
    mm: Arc<AddressSpace<Spin>>,
}

impl<R: CoreRcu> CoreResolve<R> {
    /// Every object mapped executable, every hit probe registered (breakpoints installed).
    pub fn new(w: &Workload, p: &Probes) -> Self {
        let text = ByteText::new();
        for m in &w.mappings {
            text.add_object(ObjectId(m.object), vec![0x90; w.object_len as usize]);
        }
        text.add_object(
            ObjectId(w.churn_mapping.object),
            vec![0x90; (w.churn_mapping.end - w.churn_mapping.start) as usize],
        );
        let u: CoreU<R> = Uprobes::new(R::make(), text);
        let mm = u.create_mm(MmId(1)).expect("create mm");
        for m in &w.mappings {
            u.mmap(
                &mm,
                m.start,
                m.end - m.start,
                m.pgoff,
                ObjectId(m.object),
                VmFlags::EXEC,
            )
            .expect("mmap");
        }
        for (t, c) in &p.hit {
            u.register(t.key, c.clone()).expect("register");
        }
        u.registry().rcu().synchronize();
        Self { u, mm }
    }
}

impl<R: CoreRcu> Contender for CoreResolve<R> {
    type Local<'a> = R::Reader<'a>;
    fn name(&self) -> &'static str {
        R::NAME
    }
    fn local(&self) -> Self::Local<'_> {
        self.u.registry().rcu().register().expect("rcu reader")
    }
    #[inline]
    fn hit<'a>(&'a self, local: &mut Self::Local<'a>, t: &Target, regs: &mut Regs) {
        let guard = self.u.read(local);
        if let Hit::Run(p) = self.u.resolve(&guard, &*self.mm, t.addr).0 {
            call_all(p.consumers(), regs);
        }
    }
    fn register(&self, t: &Target, c: &Arc<Consumer>) {
        self.u.register(t.key, c.clone()).expect("register");
    }
    fn unregister(&self, t: &Target, c: &Arc<Consumer>) {
        self.u.unregister(&t.key, c).expect("unregister");
    }
    fn map(&self, m: &Mapping) {
        self.u
            .mmap(
                &self.mm,
                m.start,
                m.end - m.start,
                m.pgoff,
                ObjectId(m.object),
                VmFlags::EXEC,
            )
            .expect("mmap");
    }
    fn unmap(&self, m: &Mapping) {
        self.u
            .munmap(&self.mm, m.start, m.end - m.start)
            .expect("munmap");
    }
    fn needs_grace_periods(&self) -> bool {
        !R::RUNS_OWN_CALLBACKS
    }
    fn grace_period(&self) {
        self.u.registry().rcu().synchronize();
    }
}

/// The mapping containing `addr` in a sorted slice.
#[inline]
fn find(ms: &[Mapping], addr: u64) -> Option<&Mapping> {
    let i = ms.partition_point(|m| m.start <= addr).checked_sub(1)?;
    Some(&ms[i]).filter(|m| addr < m.end)
}

#[inline]
fn key_of(m: &Mapping, addr: u64) -> ProbeKey {
    ProbeKey::new(ObjectId(m.object), addr - m.start + m.pgoff)
}

fn insert_sorted(ms: &mut Vec<Mapping>, m: &Mapping) {
    let i = ms.partition_point(|x| x.start < m.start);
    ms.insert(i, *m);
}

/// An address space under a reader-writer lock: `mmap_sem` in 2012, the `mmap_lock` read side.
struct RwLockMm(RwLock<Vec<Mapping>>);

impl RwLockMm {
    fn new(w: &Workload) -> Self {
        Self(RwLock::new(w.mappings.clone()))
    }

    /// `f` of the key `addr` maps to, under the read lock.
    #[inline]
    fn with_key<T>(&self, addr: u64, f: impl FnOnce(ProbeKey) -> Option<T>) -> Option<T> {
        let mm = self.0.read().unwrap();
        find(&mm, addr).and_then(|m| f(key_of(m, addr)))
    }

    fn map(&self, m: &Mapping) {
        insert_sorted(&mut self.0.write().unwrap(), m);
    }

    fn unmap(&self, m: &Mapping) {
        self.0.write().unwrap().retain(|x| x.start != m.start);
    }
}

/// The 2012 kernel: under the address space's read lock (`mmap_sem`), find the mapping and
/// look the probe up in seed 000's locked tree, taking a reference; then, with no lock, run the
/// consumers and drop the reference.
pub struct Seed000Resolve {
    mm: RwLockMm,
    tree: Seed000Lookup,
}

impl Seed000Resolve {
    /// Every object mapped, every hit probe inserted.
    pub fn new(w: &Workload, p: &Probes) -> Self {
        Self {
            mm: RwLockMm::new(w),
            tree: Seed000Lookup::new(p),
        }
    }
}

impl Contender for Seed000Resolve {
    type Local<'a> = ();
    fn name(&self) -> &'static str {
        "seed-000 mmap_sem+lock+tree"
    }
    fn local(&self) {}
    #[inline]
    fn hit(&self, _: &mut (), t: &Target, regs: &mut Regs) {
        if let Some(cs) = self.mm.with_key(t.addr, |k| self.tree.find(&k)) {
            call_all(&cs, regs);
        }
    }
    fn register(&self, t: &Target, c: &Arc<Consumer>) {
        self.tree.register(t, c);
    }
    fn unregister(&self, t: &Target, c: &Arc<Consumer>) {
        self.tree.unregister(t, c);
    }
    fn map(&self, m: &Mapping) {
        self.mm.map(m);
    }
    fn unmap(&self, m: &Mapping) {
        self.mm.unmap(m);
    }
}

/// The address space under an `RwLock` (the `mmap_lock` read side), then, after unlocking, the
/// `ArcSwap` map.
pub struct RwLockResolve {
    mm: RwLockMm,
    probes: ArcSwapLookup,
}

impl RwLockResolve {
    /// Every object mapped, every hit probe inserted.
    pub fn new(w: &Workload, p: &Probes) -> Self {
        Self {
            mm: RwLockMm::new(w),
            probes: ArcSwapLookup::new(p),
        }
    }
}

impl Contender for RwLockResolve {
    type Local<'a> = ();
    fn name(&self) -> &'static str {
        "RwLock mm + ArcSwap map"
    }
    fn local(&self) {}
    #[inline]
    fn hit(&self, _: &mut (), t: &Target, regs: &mut Regs) {
        if let Some(key) = self.mm.with_key(t.addr, Some) {
            self.probes.hit_key(&key, regs);
        }
    }
    fn register(&self, t: &Target, c: &Arc<Consumer>) {
        self.probes.register(t, c);
    }
    fn unregister(&self, t: &Target, c: &Arc<Consumer>) {
        self.probes.unregister(t, c);
    }
    fn map(&self, m: &Mapping) {
        self.mm.map(m);
    }
    fn unmap(&self, m: &Mapping) {
        self.mm.unmap(m);
    }
}

/// Mappings a [`SeqLockResolve`] address space holds at most.
pub const SEQ_MAPPINGS: usize = 20;

/// The address space as the `seqlock` crate needs it: `Copy`, read whole.
#[derive(Clone, Copy)]
pub struct MappingTable {
    len: usize,
    m: [Mapping; SEQ_MAPPINGS],
}

impl MappingTable {
    fn new(ms: &[Mapping]) -> Self {
        assert!(
            ms.len() <= SEQ_MAPPINGS,
            "MappingTable holds {SEQ_MAPPINGS} mappings"
        );
        let mut t = Self {
            len: ms.len(),
            m: [Mapping::default(); SEQ_MAPPINGS],
        };
        t.m[..ms.len()].copy_from_slice(ms);
        t
    }
}

/// The address space under the `seqlock` crate (each read copies the table, retrying while a
/// writer is inside), then the `ArcSwap` map.
pub struct SeqLockResolve {
    mm: seqlock::SeqLock<MappingTable>,
    probes: ArcSwapLookup,
}

impl SeqLockResolve {
    /// Every object mapped, every hit probe inserted.
    pub fn new(w: &Workload, p: &Probes) -> Self {
        Self {
            mm: seqlock::SeqLock::new(MappingTable::new(&w.mappings)),
            probes: ArcSwapLookup::new(p),
        }
    }
}

impl Contender for SeqLockResolve {
    type Local<'a> = ();
    fn name(&self) -> &'static str {
        "seqlock mm + ArcSwap map"
    }
    fn local(&self) {}
    #[inline]
    fn hit(&self, _: &mut (), t: &Target, regs: &mut Regs) {
        let table = self.mm.read();
        if let Some(m) = find(&table.m[..table.len], t.addr) {
            self.probes.hit_key(&key_of(m, t.addr), regs);
        }
    }
    fn register(&self, t: &Target, c: &Arc<Consumer>) {
        self.probes.register(t, c);
    }
    fn unregister(&self, t: &Target, c: &Arc<Consumer>) {
        self.probes.unregister(t, c);
    }
    fn map(&self, m: &Mapping) {
        let mut w = self.mm.lock_write();
        let mut v = w.m[..w.len].to_vec();
        insert_sorted(&mut v, m);
        *w = MappingTable::new(&v);
    }
    fn unmap(&self, m: &Mapping) {
        let mut w = self.mm.lock_write();
        let v: Vec<Mapping> = w.m[..w.len]
            .iter()
            .filter(|x| x.start != m.start)
            .copied()
            .collect();
        *w = MappingTable::new(&v);
    }
}

/// The ceiling: each thread resolves in private copies of the mappings and the map.
pub struct CeilingResolve {
    mm: Vec<Mapping>,
    map: BTreeMap<ProbeKey, Consumers>,
}

impl CeilingResolve {
    /// The mappings and the map every thread copies.
    pub fn new(w: &Workload, p: &Probes) -> Self {
        Self {
            mm: w.mappings.clone(),
            map: p.map(),
        }
    }
}

impl Contender for CeilingResolve {
    type Local<'a> = (Vec<Mapping>, BTreeMap<ProbeKey, Consumers>);
    fn name(&self) -> &'static str {
        "ceiling (private copies)"
    }
    fn local(&self) -> Self::Local<'_> {
        (self.mm.clone(), self.map.clone())
    }
    #[inline]
    fn hit<'a>(&'a self, local: &mut Self::Local<'a>, t: &Target, regs: &mut Regs) {
        if let Some(m) = find(&local.0, t.addr)
            && let Some(cs) = local.1.get(&key_of(m, t.addr))
        {
            call_all(cs, regs);
        }
    }
    fn register(&self, _: &Target, _: &Arc<Consumer>) {}
    fn unregister(&self, _: &Target, _: &Arc<Consumer>) {}
    fn sees_churn(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::STREAM;

    /// Every contender, before and after churn, finds the same probes for the same stream.
    fn same_answers<C: Contender>(c: &C, w: &Workload, p: &Probes) {
        fn run<'a, C: Contender>(c: &'a C, local: &mut C::Local<'a>, w: &Workload) -> Regs {
            let mut r = Regs::default();
            for t in w.stream(1) {
                c.hit(local, t, &mut r);
            }
            r
        }
        let mut local = c.local();
        let expected = Workload::expected(w.stream(1));
        assert_eq!(run(c, &mut local, w), expected, "{}", c.name());
        for (t, k) in w.churn.iter().zip(&p.churn).take(64) {
            c.register(t, k);
            c.map(&w.churn_mapping);
            assert_eq!(run(c, &mut local, w).hits, STREAM as u64, "{}", c.name());
            c.unmap(&w.churn_mapping);
            c.unregister(t, k);
        }
        assert_eq!(run(c, &mut local, w), expected, "{}", c.name());
    }

    #[test]
    fn every_contender_finds_every_probe() {
        let w = Workload::new(1000, 2);
        let p = Probes::new(&w);
        same_answers(&CoreLookup::<SlotRcu>::new(&p), &w, &p);
        same_answers(&CoreLookup::<EpochRcu>::new(&p), &w, &p);
        same_answers(&KprobeLookup::new(&w), &w, &p);
        same_answers(&Seed000Lookup::new(&p), &w, &p);
        same_answers(&RwLockLookup::new(&p), &w, &p);
        same_answers(&ArcSwapLookup::new(&p), &w, &p);
        same_answers(&CeilingLookup::new(&p), &w, &p);
        same_answers(&CoreResolve::<SlotRcu>::new(&w, &p), &w, &p);
        same_answers(&CoreResolve::<EpochRcu>::new(&w, &p), &w, &p);
        same_answers(&Seed000Resolve::new(&w, &p), &w, &p);
        same_answers(&RwLockResolve::new(&w, &p), &w, &p);
        same_answers(&SeqLockResolve::new(&w, &p), &w, &p);
        same_answers(&CeilingResolve::new(&w, &p), &w, &p);
    }

    #[test]
    fn grace_periods_run_where_the_domain_needs_them() {
        // SlotRcu runs callbacks only in a grace period: the report's grace-period thread runs
        // them (and a churn probe's old consumer list is freed). crossbeam runs its own.
        let w = Workload::new(1000, 1);
        let p = Probes::new(&w);
        let slot = CoreLookup::<SlotRcu>::new(&p);
        let (t, k) = (&w.churn[0], &p.churn[0]);
        slot.register(t, k);
        let before = Arc::strong_count(k);
        slot.unregister(t, k);
        assert!(slot.needs_grace_periods());
        slot.grace_period();
        assert!(
            Arc::strong_count(k) < before,
            "the grace period ran no callback"
        );
        assert!(CoreResolve::<SlotRcu>::new(&w, &p).needs_grace_periods());
        assert!(!CoreLookup::<EpochRcu>::new(&p).needs_grace_periods());
        assert!(!CoreResolve::<EpochRcu>::new(&w, &p).needs_grace_periods());
        assert!(!CeilingLookup::new(&p).needs_grace_periods());
    }

    #[test]
    fn a_churn_probe_is_found_while_registered() {
        // The churn must really change what the trees hold: a hit on a churn target finds it
        // only between register and unregister.
        let w = Workload::new(1000, 1);
        let p = Probes::new(&w);
        let c = CoreLookup::<SlotRcu>::new(&p);
        let (t, k) = (&w.churn[3], &p.churn[3]);
        let mut local = c.local();
        let mut r = Regs::default();
        c.hit(&mut local, t, &mut r);
        assert_eq!(r.hits, 0);
        c.register(t, k);
        c.hit(&mut local, t, &mut r);
        assert_eq!(
            r,
            Regs {
                hits: 1,
                sum: t.tag
            }
        );
        c.unregister(t, k);
        c.hit(&mut local, t, &mut r);
        assert_eq!(r.hits, 1);
    }
}

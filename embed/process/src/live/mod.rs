//! Probes on the running process itself (x86_64 Linux): the process is the
//! "kernel", its threads are the "CPUs", its code pages are the "text".
//!
//! # What happens on a hit
//!
//! ```text
//!  thread runs INT3 at addr ──SIGTRAP──▶ handler (SA_SIGINFO, on the thread's stack, below the red zone)
//!     claim a pooled pair of RCU readers          (one atomic swap on this thread's own line)
//!     optimizer.on_breakpoint(addr)               (lock-free tree lookup, no store)
//!       Probe { fire, then }        → if fire: resolve addr → (object, file offset) by
//!                                     speculating on the address-space model, then run the
//!                                     consumers found in the registry under that key
//!         then: Step                → RIP = the probe's XOL copy (relocated insn + jmp back)
//!         then: Detour(d)           → RIP = d.displaced (the trampoline's displaced code)
//!       Restart                     → RIP = addr (the breakpoint went away meanwhile)
//!       NotOurs                     → the program's previous SIGTRAP handler
//!     release the readers; return (sigreturn resumes at RIP)
//! ```
//!
//! # Why the handler may do this
//!
//! A signal can interrupt a thread anywhere — inside `malloc`, holding any lock, or inside
//! probe-core's own writer paths. The handler therefore allocates nothing and takes no lock:
//! the optimizer's and the registry's read paths are lock-free and store-free (core proves this
//! with a test), and RCU readers come from a pool allocated at [`Live::install`], claimed with an
//! atomic swap. The interrupted thread can never hold a pooled reader (only handlers do, and
//! SIGTRAP is blocked while its own handler runs), so a claim waits at most for other threads'
//! handlers, which do not wait for anything. Writers (`attach`, `detach`) take a mutex the handler
//! never touches.
//!
//! # Writing code without W+X
//!
//! Code is written through `/proc/self/mem` (what debuggers use): the kernel writes the page for
//! us, breaking copy-on-write of the file-backed text, and the page's protection never changes —
//! no page is ever writable and executable. Multi-byte changes go through the int3-first protocol
//! ([`probe_arch_x86_64::live_patch`]) with `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)` as the
//! cross-core sync. XOL copies live in a memfd mapped twice near the code: read+execute for the
//! threads, read+write for us.
//!
//! # XOL copies are per probe, not per thread
//!
//! Linux gives each thread its own XOL slot because its copy is single-stepped and fixed up
//! afterwards. Our copies ([`probe_arch_x86_64::xol`]) are pure code ending in a jump back — nothing to fix
//! up — so one copy per probe serves every thread at once, prepared when the probe is attached;
//! a hit only sets RIP.
//!
//! # The jump path
//!
//! Each optimizable probe gets a trampoline in the same near area: it steps over the red zone,
//! pushes the general registers and flags as the consumers' [`Regs`], and calls
//! `trampoline_entry` with the probe's own context (a trampoline serves one probe, so no lookup:
//! the context holds the probe's current consumer list, published by attach/detach under RCU).
//! If any consumer is a closure ([`Live::attach`]) the entry saves the whole extended state
//! with the cheapest correct instruction for this CPU ([`probe_arch_x86_64::xstate`]: `XSAVEC` over XCR0
//! here), hands the consumers the ABI's clean state, and restores it after; if every consumer is
//! register-only ([`Live::attach_raw`]) it saves nothing more. Then the trampoline pops
//! everything, runs the displaced instructions (relocated) and jumps back. The optimizer turns
//! probes into `jmp rel32` in delayed batches ([`Live::run_optimizer`], or the thread of
//! [`Live::start_optimizer`]) with the int3-first protocol.
//!
//! # Quiescence: when no thread can be inside
//!
//! Before a jump goes in, no thread may be stopped strictly inside the bytes it covers; before a
//! trampoline is reused, no thread may be inside it or running consumers called from it. A
//! process has no `synchronize_rcu_tasks`, so the wait ([`CodeSpace::quiesce`]) asks every other
//! thread: it sends each a real-time signal carrying a round number, and each answers from its
//! handler whether the interrupted RIP is strictly inside a prepared jump range, in an XOL copy
//! that jumps back into one, or in a retired trampoline (or whether it is running that
//! trampoline's consumers, a thread-local flag). A trampoline is retired when core says nothing
//! can enter it any more ([`CodeSpace::retire_detour`]: its probe left the table), never merely
//! when its jump goes out: a probe forced back to its breakpoint by a collision keeps sending
//! its hits into its trampoline, and a wait that looked for threads there would never end on a
//! hot probe. A round with every thread answering "outside"
//! ends the wait ([`probe_core::scan`]; the round number keeps late answers to an abandoned round
//! from completing a new one — loom-checked with its seeded bug). The SIGTRAP handler blocks the
//! scan's signal, so a thread redirected into a trampoline answers from there, never from just
//! before. Threads hitting *other* probes do not hold the wait up.
//!
//! Two cases the scan does not see, both narrow:
//!
//! * a thread interrupted inside a retired trampoline by the program's own signal handler,
//!   still running that handler when the scan asks (the scan sees the innermost frame only).
//!   Trampolines are reused only after such a wait, so the window is a program handler that
//!   outlives a whole optimizer batch at exactly that spot;
//! * a thread between the end of `trampoline_entry`'s bookkeeping (the thread-local flag is
//!   back to its outer value) and its return into the trampoline: a few instructions of the
//!   function's epilogue. It answers "outside" and then returns into the retired trampoline;
//!   that is safe unless the trampoline is freed *and* reused and rewritten before the thread,
//!   after answering, executes its next few instructions.
//!
//! Every thread must be able to take the scan's signal (`SIGRTMIN + 7`): a thread that blocks
//! it for good keeps every quiescence wait, and so the optimizer, waiting.
//!
//! XOL copies are not freed: there is one per probed address, reused when the address is probed
//! again, so their memory is bounded by the number of distinct addresses ever probed. Freeing
//! them would take the same scan; not done.

use probe_core::arch::{CodeSpace, Detour, NotOptimizable, Patch};
use probe_core::mm::{AddressSpace, AddressSpaceOps, MmId};
use probe_core::optimizer::{Optimizer, Then, Trap};
use probe_core::probe::{ObjectId, ProbeKey};
use probe_core::rcu::{Rcu, SlotRcu};
use probe_core::registry::Registry;
use probe_core::sync::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::boxed::Box;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::string::{String, ToString};
use std::sync::{Arc, Mutex, OnceLock};
use std::vec::Vec;

mod area;
mod code;
mod image;
mod pool;
mod quiesce;
#[cfg(target_arch = "x86_64")]
mod trampoline;
mod trap;

/// The instruction set's half: registers, boundaries, XOL copies, the trap handler's frame, the
/// `CodeSpace` (how code is written, what a detour is).
#[cfg_attr(target_arch = "x86_64", path = "isa_x86_64.rs")]
#[cfg_attr(target_arch = "aarch64", path = "isa_aarch64.rs")]
mod isa;

use area::*;
use code::*;
use image::*;
use isa::*;
use pool::*;
use quiesce::*;
#[cfg(target_arch = "x86_64")]
use trampoline::*;
use trap::*;

pub use isa::{Refusal, Regs};

/// A consumer: runs on every hit of its probe, in the signal handler of the thread that hit it,
/// so it must be async-signal-safe (no allocation, no locks another thread might hold).
pub type Consumer = dyn Fn(&Regs) + Send + Sync;

/// A register-only consumer ([`Live::attach_raw`]): integer code that touches no x87, MXCSR or
/// vector state — what an eBPF program's JIT output or a kernel optprobe handler is. Called with
/// the registers and the context pointer given at attach.
pub type RawConsumer = unsafe extern "C" fn(regs: &Regs, ctx: *mut core::ffi::c_void);

/// What the registry holds per consumer: a closure that may use any register state, or a
/// register-only function with its context.
enum Hook {
    /// A closure: its hits save and restore the whole extended state around it.
    Full(Arc<Consumer>),
    /// A register-only function: hits whose every consumer is one skip the extended state.
    Raw {
        /// The function.
        f: RawConsumer,
        /// Its context pointer, passed back on every call.
        ctx: usize,
    },
}

impl Hook {
    /// Calls it.
    #[inline(always)]
    fn call(&self, regs: &Regs) {
        match self {
            Hook::Full(c) => c(regs),
            // SAFETY: `attach_raw`'s contract: `f` may be called with any registers and `ctx`
            // until its detach returned (the hit holds a read section detach waits for).
            Hook::Raw { f, ctx } => unsafe { f(regs, *ctx as *mut core::ffi::c_void) },
        }
    }
}

/// The executable, as an object name for [`Live::attach_symbol`], [`Live::function`] and
/// [`Live::functions`] (a path that names it in every process).
pub const EXE: &str = "/proc/self/exe";

/// A function symbol of a mapped object ([`Live::functions`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Its name, exactly as in the symbol table (an alias is an entry of its own).
    pub name: String,
    /// The object's path.
    pub object: String,
    /// Its file offset in the object (what a probe on it is keyed by).
    pub offset: u64,
    /// Its runtime address, if the object is mapped executable now.
    pub addr: Option<u64>,
    /// Its size in bytes.
    pub size: u64,
}

/// How a probe runs ([`Live::optimization`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optimization {
    /// No probe at that address.
    NotProbed,
    /// A jump to its trampoline.
    Jump,
    /// A breakpoint now, queued to become a jump at the optimizer's next run.
    Queued,
    /// A breakpoint, and it stays one until what is named changes.
    Breakpoint(WhyBreakpoint),
}

/// Why a probe stays a breakpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhyBreakpoint {
    /// The arch analysis refuses a jump here (too few bytes left, a branch target or an
    /// unrelocatable instruction inside the range, an indirect jump in the function, …).
    NotOptimizable(probe_core::arch::NotOptimizable),
    /// Another armed probe sits inside its jump range (retried when that one goes).
    Blocked,
    /// Pinned to a breakpoint (single-step semantics).
    SingleStep,
    /// Disabled.
    Disabled,
}

/// Why a live operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum LiveError {
    /// [`Live::install`] was already called in this process.
    AlreadyInstalled,
    /// A system call failed.
    Os {
        /// What was being done.
        what: &'static str,
        /// `errno`.
        errno: i32,
    },
    /// An object's file could not be read or parsed (or `/proc/self/maps` could not be read).
    Object {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// No object of that name is mapped (and the name is not a path to an ELF file).
    NoObject(String),
    /// No function symbol of that name in that object.
    NoSymbol {
        /// The object, as given.
        object: String,
        /// The symbol, as given.
        name: String,
    },
    /// No function symbol of the object mapped there contains that address (it is in code,
    /// between functions).
    NoFunctionAt(u64),
    /// Nothing is mapped at that address.
    NotMapped(u64),
    /// The address is in the vdso (or vsyscall page): the kernel's code, not probeable here.
    Vdso(u64),
    /// The address is in anonymous memory (heap, stack, JIT code), which has no file to key it by.
    Anonymous(u64),
    /// The address is mapped but not executable.
    NotExecutable(u64),
    /// The instruction there cannot be probed.
    Refused(Refusal),
    /// probe-core refused (inside an instruction, already a trap there, no memory, …).
    Core(probe_core::Error),
    /// The XOL area is full.
    Full,
    /// [`Live::attach_raw`] was given no function.
    NullConsumer,
    /// [`Live::uninstall`] ran: no more probes in this process.
    Uninstalled,
}

impl fmt::Display for LiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyInstalled => f.write_str("live probes are already installed"),
            Self::Os { what, errno } => write!(f, "{what}: errno {errno}"),
            Self::Object { path, why } => write!(f, "reading {path}: {why}"),
            Self::NoObject(name) => write!(
                f,
                "no mapped object is named `{name}` (give a path, a file name such as `libz.so.1`, or `live::EXE`)"
            ),
            Self::NoSymbol { object, name } => write!(
                f,
                "no function symbol named `{name}` in {object} (names are spelled exactly, compiler clones such as `f.constprop.0` included; `Live::functions` lists them)"
            ),
            Self::NoFunctionAt(a) => {
                write!(f, "no function of the object mapped at {a:#x} contains it")
            }
            Self::NotMapped(a) => write!(f, "nothing is mapped at {a:#x}"),
            Self::Vdso(a) => write!(
                f,
                "{a:#x} is in the vdso, the kernel's code: it cannot be probed"
            ),
            Self::Anonymous(a) => write!(
                f,
                "{a:#x} is in anonymous memory (heap, stack or generated code), which has no file to key a probe by"
            ),
            Self::NotExecutable(a) => write!(f, "{a:#x} is mapped but not executable"),
            Self::Refused(r) => write!(f, "cannot probe this instruction: {r}"),
            Self::Core(e) => write!(f, "{e}"),
            Self::Full => f.write_str("the XOL area is full"),
            Self::NullConsumer => f.write_str("attach_raw was given a null function"),
            Self::Uninstalled => f.write_str("live probes were uninstalled from this process"),
        }
    }
}

impl std::error::Error for LiveError {}

impl From<probe_core::Error> for LiveError {
    fn from(e: probe_core::Error) -> Self {
        Self::Core(e)
    }
}

fn os(what: &'static str) -> LiveError {
    LiveError::Os {
        what,
        errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
    }
}

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;

const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

/// The heavy half of the hit path's asymmetric fence ([`SlotRcu::with_heavy_barrier`]): every
/// running thread of the process executes a full barrier. Registered at install, after which
/// the kernel does not fail it; if it ever did, the grace period it belongs to would be unsound,
/// so the process stops rather than free memory a reader may hold.
fn heavy_barrier() {
    if membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED).is_err() {
        std::process::abort();
    }
}

/// The RCU domain of the hit path (shared by the optimizer and the registry): asymmetric
/// (readers pay a compiler fence, grace periods a membarrier) when the kernel has
/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED`, symmetric otherwise.
///
/// Public so that a process using probe-core without the live patcher (the contention report,
/// an embedder with its own trap handler) gets the same domain: nothing queued on it runs until
/// someone calls [`Rcu::synchronize`], which costs one `membarrier` system call per grace period
/// and yields the thread while it waits for a reader that stays inside its section.
///
/// # Example
///
/// ```
/// use probe_core::rcu::Rcu;
///
/// let rcu = probe_process::live::hit_rcu();
/// let reader = rcu.register().unwrap();
/// drop(rcu.read_lock(&reader));
/// rcu.synchronize();
/// ```
pub fn hit_rcu() -> SlotRcu {
    if membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED).is_ok() {
        // SAFETY: registered, so `heavy_barrier` makes every thread of this process (the only
        // ones that hold our readers) execute a full barrier before it returns.
        unsafe { SlotRcu::with_heavy_barrier(heavy_barrier) }.with_relax(std::thread::yield_now)
    } else {
        SlotRcu::new().with_relax(std::thread::yield_now)
    }
}

fn membarrier(cmd: libc::c_int) -> Result<(), LiveError> {
    // SAFETY: membarrier takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(os("membarrier"))
    }
}

/// The optimizer and the registry share one RCU domain (clones of one `Arc`), as the kprobes
/// layer's do: a trap's one read section covers the optimizer's site, the address-space model
/// and the consumer list, and a grace period costs one heavy barrier, not one per domain.
type Opt = Optimizer<ProcessCode, Arc<SlotRcu>>;
type Reg = Registry<Hook, Arc<SlotRcu>>;

/// Serializes attach/detach/run_optimizer (the handler never takes it), and holds the writers'
/// reader of the registry (to read a probe's consumers when its hit list is rebuilt).
struct Writer {
    reader: <SlotRcu as Rcu>::Reader<'static>,
    /// Every probe armed in the code now: its key and where its object has it mapped. A key
    /// with consumers whose object is not mapped is in the registry only (armed again when it
    /// is mapped: `refresh_mappings`).
    armed: std::collections::BTreeMap<ProbeKey, u64>,
}

/// Per probed address, for the life of the process (like its XOL copy, which it names): what a
/// hit at that address needs without looking anything up.
///
/// # Invariants
///
/// * INVARIANT: `list` is null or a `HitList` built from the registry's consumers of this
///   address's key, published by a writer (under the writer mutex) with a Release swap; a list
///   swapped out is freed only after a grace period of the registry's RCU domain, and every hit
///   reads `list` inside one of that domain's read sections.
/// * INVARIANT: `list` is null exactly while the probe has no consumer (the last detach clears it
///   before the optimizer hears of it), so a trampoline still in the code after its probe was
///   unregistered fires nothing — the optimizer's `on_trampoline` answer, without its lookup.
/// * INVARIANT: `xol` and `object` change only while no probe is armed at `addr` (a different
///   object mapped there since), so no hit reads them mid-change.
struct ProbeCtx {
    addr: u64,
    /// The address's XOL copy (for the object `object`).
    xol: AtomicU64,
    /// The instruction, when a hit simulates it instead of running a copy (aarch64's
    /// PC-relative instructions, from the original PC); 0 otherwise.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    simulated: AtomicU32,
    /// The object whose code at `addr` the copy and the probe are for.
    object: AtomicU64,
    list: AtomicPtr<HitList>,
}

/// Where a thread that trapped goes next ([`Live::breakpoint_hit`]).
enum Next {
    /// The probe's step: its XOL copy, or (aarch64) its simulation.
    Xol(&'static ProbeCtx),
    /// This PC.
    Pc(u64),
    /// Not ours: the program's handler.
    NotOurs,
}

/// A probe's consumers as its trampoline runs them.
struct HitList {
    /// Some consumer may use any register state: save and restore the extended state (x86-64;
    /// the aarch64 trampoline saves its FP/SIMD registers always).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    full: bool,
    hooks: Box<[Arc<Hook>]>,
}

std::thread_local! {
    /// The trampoline whose consumers this thread is running (its return address is inside it),
    /// and how deep such calls are nested: the quiescence scan counts the thread as inside it.
    static IN_TRAMPOLINE: core::cell::Cell<(u64, u32)> = const { core::cell::Cell::new((0, 0)) };
    /// Set while this thread writes the address-space model, to the mappings as they were
    /// before the write: a trap taken by this very thread then must not wait for the write to
    /// end (it never would), and resolves in these instead.
    static IN_MM_WRITE: core::cell::Cell<*const [probe_core::mm::VmaInfo]> =
        const { core::cell::Cell::new(&[] as *const [probe_core::mm::VmaInfo]) };
}

/// The live embedding. One per process: [`Live::install`].
pub struct Live {
    opt: &'static Opt,
    reg: &'static Reg,
    pool: Box<[Pooled]>,
    writer: Mutex<Writer>,
    previous: libc::sigaction,
    /// The quiescence signal's disposition before [`Live::install`] (restored by `uninstall`).
    previous_quiesce: libc::sigaction,
    /// aarch64: the stop signal's disposition before [`Live::install`] (restored by
    /// `uninstall`).
    #[cfg(target_arch = "aarch64")]
    previous_stop: libc::sigaction,
    /// Every attached probe, for [`Live::uninstall`] (under `writer`'s lock).
    attached: Mutex<Vec<Attached>>,
    /// Set by [`Live::uninstall`]: attaching fails from then on.
    uninstalled: AtomicBool,
}

// SAFETY: `previous` is a plain C struct read by the handler; everything else is Sync.
unsafe impl Sync for Live {}
// SAFETY: as above.
unsafe impl Send for Live {}

static LIVE: OnceLock<&'static Live> = OnceLock::new();

/// The delayed optimizer's thread, once started ([`Live::start_optimizer`]).
static OPTIMIZER_THREAD: OnceLock<std::thread::Thread> = OnceLock::new();

/// A probe attached by [`Live::attach`] or [`Live::attach_raw`]; give it back to
/// [`Live::detach`].
#[derive(Clone)]
pub struct Attached {
    addr: Option<u64>,
    key: ProbeKey,
    consumer: Arc<Hook>,
}

impl fmt::Debug for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attached")
            .field("addr", &self.addr.map(|a| format!("{a:#x}")))
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Attached {
    /// Where the probe was armed when it was attached (`None`: its object was not mapped
    /// then). A probe follows its object, so after a `dlclose` and `dlopen` it may be armed
    /// elsewhere: [`Live::address_of`] says where it is now.
    pub fn addr(&self) -> Option<u64> {
        self.addr
    }
    /// Its (inode, file offset) key.
    pub fn key(&self) -> ProbeKey {
        self.key
    }
}

impl Live {
    /// Installs the SIGTRAP handler (remembering the program's, which still gets every trap that
    /// is not ours), reads the executable's symbols, registers for membarrier SYNC_CORE and maps
    /// the XOL area near the code. Once per process.
    ///
    /// ```no_run
    /// use probe_process::live::{Consumer, EXE, Live, Regs};
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    ///
    /// let live = Live::install()?;
    /// live.start_optimizer(std::time::Duration::from_millis(5)); // kprobes' delayed optimizer
    /// let hits = Arc::new(AtomicU64::new(0));
    /// let h = hits.clone();
    /// // Runs in the hitting thread's signal handler or trampoline: keep it async-signal-safe.
    /// // (`Regs` is the arch's: `r.rdi` on x86_64, `r.x[0]` on aarch64.)
    /// let consumer: Arc<Consumer> = Arc::new(move |_r: &Regs| {
    ///     h.fetch_add(1, Ordering::Relaxed);
    /// });
    /// let probe = live.attach_symbol(EXE, "my_function", 0, consumer)?; // or `attach(addr, …)`
    /// // … threads call my_function: a breakpoint hit now, a jump hit once optimized …
    /// live.detach(probe)?; // original bytes back; the consumer never runs again
    /// # Ok::<(), probe_process::live::LiveError>(())
    /// ```
    pub fn install() -> Result<&'static Live, LiveError> {
        #[cfg(target_arch = "x86_64")]
        return Self::install_xstate(XState::detect());
        #[cfg(not(target_arch = "x86_64"))]
        return Self::install_xstate(());
    }

    /// [`Live::install`] with the extended-state save forced to `save` where this CPU has it
    /// ([`XState::with`], which sizes it for this CPU; `install` uses [`XState::detect`], the
    /// cheapest correct choice). Forcing [`SaveInsn::Fxsave`] on a CPU with AVX corrupts the
    /// interrupted code's vector registers — what some interceptors ship; it exists so a test
    /// can show that its oracle catches exactly that. It takes the instruction, not an
    /// [`XState`], so no caller can hand the trampolines an area size this CPU overflows.
    #[cfg(target_arch = "x86_64")]
    pub fn install_with(save: SaveInsn) -> Result<&'static Live, LiveError> {
        Self::install_xstate(XState::with(save))
    }

    fn install_xstate(
        #[cfg(target_arch = "x86_64")] xstate: XState,
        #[cfg(not(target_arch = "x86_64"))] _none: (),
    ) -> Result<&'static Live, LiveError> {
        static ONCE: Mutex<bool> = Mutex::new(false);
        let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return Err(LiveError::AlreadyInstalled);
        }
        membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE)?;
        let mem = File::options()
            .read(true)
            .write(true)
            .open("/proc/self/mem")
            .map_err(|e| LiveError::Object {
                path: "/proc/self/mem".into(),
                why: e.to_string(),
            })?;
        let rcu = Arc::new(hit_rcu());
        let opt: &'static Opt = Box::leak(Box::new(Optimizer::new(
            ProcessCode {
                images: Images::new(),
                mm: AddressSpace::new(MmId(1)),
                mem: ProcMem(mem),
                areas: Areas::new(),
                ranges: RangeTable::new(),
                #[cfg(target_arch = "x86_64")]
                xstate,
                xol_map: XolMap::new(),
                retiring: (0..RETIRING).map(|_| AtomicU64::new(0)).collect(),
                retiring_overflow: AtomicU64::new(0),
                overflowed: Mutex::new(Vec::new()),
                trampolines_made: AtomicU64::new(0),
                trampolines_reused: AtomicU64::new(0),
                trampolines_freed: AtomicU64::new(0),
            },
            rcu.clone(),
        )));
        let reg: &'static Reg = Box::leak(Box::new(Registry::new(rcu)));
        let mut pool = Vec::with_capacity(POOL);
        for _ in 0..POOL {
            pool.push(Pooled {
                busy: AtomicBool::new(false),
                reader: reg.rcu().register()?,
            });
        }
        // The program's handler, which keeps every trap that is not ours.
        // SAFETY: a zeroed sigaction is valid for sigaction to fill; a null `act` only queries.
        let mut previous: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::sigaction(libc::SIGTRAP, core::ptr::null(), &mut previous) } != 0 {
            return Err(os("sigaction"));
        }
        // SAFETY: as above.
        let mut previous_quiesce: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::sigaction(quiesce_signal(), core::ptr::null(), &mut previous_quiesce) }
            != 0
        {
            return Err(os("sigaction"));
        }
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        let mut previous_stop: libc::sigaction = unsafe { core::mem::zeroed() };
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        if unsafe { libc::sigaction(isa::stop_signal(), core::ptr::null(), &mut previous_stop) }
            != 0
        {
            return Err(os("sigaction"));
        }
        let live: &'static Live = Box::leak(Box::new(Live {
            opt,
            reg,
            pool: pool.into_boxed_slice(),
            writer: Mutex::new(Writer {
                reader: reg.rcu().register()?,
                armed: std::collections::BTreeMap::new(),
            }),
            previous,
            previous_quiesce,
            #[cfg(target_arch = "aarch64")]
            previous_stop,
            attached: Mutex::new(Vec::new()),
            uninstalled: AtomicBool::new(false),
        }));
        {
            let mut w = live.writer.lock().unwrap_or_else(|e| e.into_inner());
            live.refresh_locked(&mut w, false)?;
        }
        // Publish before the handler can run.
        let _ = LIVE.set(live);
        // SAFETY: installing a handler that follows the rules in the module docs.
        unsafe {
            let mut sa: libc::sigaction = core::mem::zeroed();
            sa.sa_sigaction = on_sigtrap as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            // The quiescence signal waits while a SIGTRAP handler runs: its answer then names
            // the RIP the trap handler chose (an XOL copy, a trampoline), never a stale one.
            libc::sigaddset(&mut sa.sa_mask, quiesce_signal());
            if libc::sigaction(libc::SIGTRAP, &sa, core::ptr::null_mut()) != 0 {
                return Err(os("sigaction"));
            }
            let mut q: libc::sigaction = core::mem::zeroed();
            q.sa_sigaction = on_quiesce as *const () as usize;
            q.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut q.sa_mask);
            if libc::sigaction(quiesce_signal(), &q, core::ptr::null_mut()) != 0 {
                return Err(os("sigaction"));
            }
            // aarch64: the signal that parks threads for a stopped code change.
            #[cfg(target_arch = "aarch64")]
            {
                let mut st: libc::sigaction = core::mem::zeroed();
                st.sa_sigaction = isa::on_stop as *const () as usize;
                st.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
                libc::sigemptyset(&mut st.sa_mask);
                if libc::sigaction(isa::stop_signal(), &st, core::ptr::null_mut()) != 0 {
                    return Err(os("sigaction"));
                }
            }
        }
        *done = true;
        Ok(live)
    }

    /// The image of the object named `object` ([`EXE`], a path, or a file name such as
    /// `libz.so.1`): a mapped one, else (a path only) the file, read now.
    fn image_named(&self, object: &str) -> Result<Arc<Image>, LiveError> {
        let space = self.opt.space();
        {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            self.refresh_locked(&mut w, false)?;
        }
        if let Some(i) = space.images.mapped_named(object)? {
            return Ok(i);
        }
        if object.contains('/') {
            let path = image::resolve(object);
            let meta = std::fs::metadata(&path).map_err(|_| LiveError::NoObject(object.into()))?;
            return space.images.get_or_load(image::object_of(&meta), &path);
        }
        Err(LiveError::NoObject(object.into()))
    }

    /// Where the object `image` is mapped, as a bias added to a file offset (`None`: unmapped).
    fn runtime(&self, image: &Image, off: u64) -> Option<u64> {
        self.opt.space().address_of(ProbeKey {
            object: image.id,
            offset: off,
        })
    }

    /// The runtime address of function `name` of `object` (see [`Live::function`]).
    pub fn symbol(&self, object: &str, name: &str) -> Option<u64> {
        self.function(object, name).ok().and_then(|f| f.addr)
    }

    /// The function named `name` (any of its aliases) in the object named `object`: [`EXE`]
    /// for the executable, a path, or the file name of a mapped object (`libz.so.1` names
    /// `libz.so.1.2.13`).
    ///
    /// # Errors
    ///
    /// [`LiveError::NoObject`], [`LiveError::NoSymbol`], [`LiveError::Object`] (unreadable).
    pub fn function(&self, object: &str, name: &str) -> Result<Function, LiveError> {
        let image = self.image_named(object)?;
        let (start, end) = image.named(name).ok_or_else(|| LiveError::NoSymbol {
            object: object.into(),
            name: name.into(),
        })?;
        Ok(Function {
            name: name.into(),
            object: image.path.clone(),
            offset: start,
            addr: self.runtime(&image, start),
            size: end - start,
        })
    }

    /// Every function symbol of `object` (named as in [`Live::function`]) with its address and
    /// size, aliases included (several names at one address are several entries), sorted by
    /// address, then name.
    pub fn functions(&self, object: &str) -> Result<Vec<Function>, LiveError> {
        let image = self.image_named(object)?;
        Ok(image
            .names
            .iter()
            .map(|f| Function {
                name: f.2.clone(),
                object: image.path.clone(),
                offset: f.0,
                addr: self.runtime(&image, f.0),
                size: f.1 - f.0,
            })
            .collect())
    }

    /// The objects mapped executable now: their paths (the executable first).
    pub fn objects(&self) -> Result<Vec<String>, LiveError> {
        {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            self.refresh_locked(&mut w, false)?;
        }
        Ok(self.opt.space().images.mapped_paths())
    }

    /// The offsets of every instruction boundary of the function `name` of `object` (0 first):
    /// the places a probe may go.
    ///
    /// # Errors
    ///
    /// As [`Live::function`]; [`LiveError::Refused`] if the function does not decode to its end
    /// (the refusal says why).
    pub fn instruction_boundaries(&self, object: &str, name: &str) -> Result<Vec<u64>, LiveError> {
        let image = self.image_named(object)?;
        let (start, end) = image.named(name).ok_or_else(|| LiveError::NoSymbol {
            object: object.into(),
            name: name.into(),
        })?;
        let mut code = std::vec![0u8; (end - start) as usize];
        image
            .original(start, &mut code)
            .ok_or(LiveError::NoFunctionAt(start))?;
        // Decoded at its runtime address where mapped (RIP-relative lengths do not depend on it).
        let at = self.runtime(&image, start).unwrap_or(start);
        isa::boundaries(&code, at).map_err(LiveError::Refused)
    }

    /// How the probe at `addr` runs, and if it stays a breakpoint, why.
    pub fn optimization(&self, addr: u64) -> Optimization {
        use probe_core::optimizer::{Code, Queue};
        let Ok(st) = self.opt.state(addr) else {
            return Optimization::NotProbed;
        };
        match (st.code, st.queue, st.not_optimizable) {
            (Code::Jump, _, _) => Optimization::Jump,
            (_, Queue::Optimizing, _) => Optimization::Queued,
            (_, _, Some(why)) => Optimization::Breakpoint(WhyBreakpoint::NotOptimizable(why)),
            _ if !st.enabled => Optimization::Breakpoint(WhyBreakpoint::Disabled),
            _ if st.single_step => Optimization::Breakpoint(WhyBreakpoint::SingleStep),
            _ => Optimization::Breakpoint(WhyBreakpoint::Blocked),
        }
    }

    /// Attaches `consumer` to the function `name` of `object` (named as in [`Live::function`]),
    /// at `offset` bytes into it (any instruction boundary). The probe is keyed by the object's
    /// file and offset, as a uprobe is: it follows the object — armed in every mapping of it,
    /// taken out with the mapping at `dlclose`, armed again when the object is mapped again
    /// ([`Live::refresh_mappings`]). `object` may be a path to an object that is not mapped yet;
    /// the probe is armed when it is.
    ///
    /// ```no_run
    /// use probe_process::live::{Consumer, Live, Regs};
    /// use std::sync::Arc;
    ///
    /// let live = Live::install()?;
    /// // zlib's crc32_z(crc, buf, len): every call from any thread (the registers are the
    /// // arch's: `buf` is `r.rsi` on x86_64, `r.x[1]` on aarch64).
    /// let seen: Arc<Consumer> = Arc::new(|_r: &Regs| {});
    /// let probe = live.attach_symbol("libz.so.1", "crc32_z", 0, seen)?;
    /// live.detach(probe)?;
    /// # Ok::<(), probe_process::live::LiveError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Live::function`]; [`probe_core::Error::OffsetOutOfRange`] past the function's end,
    /// [`probe_core::Error::InsideInstruction`] inside an instruction; then as [`Live::attach`].
    pub fn attach_symbol(
        &self,
        object: &str,
        name: &str,
        offset: u64,
        consumer: Arc<Consumer>,
    ) -> Result<Attached, LiveError> {
        let image = self.image_named(object)?;
        let (start, end) = image.named(name).ok_or_else(|| LiveError::NoSymbol {
            object: object.into(),
            name: name.into(),
        })?;
        if offset >= end - start {
            // Past the function's end (into the next function, or padding).
            return Err(LiveError::Core(probe_core::Error::OffsetOutOfRange));
        }
        let mut code = std::vec![0u8; (end - start) as usize];
        image
            .original(start, &mut code)
            .ok_or(LiveError::NoFunctionAt(start))?;
        isa::check_boundary(&code, start, start + offset)?;
        let key = ProbeKey {
            object: image.id,
            offset: start + offset,
        };
        self.attach_key(key, Hook::Full(consumer))
    }

    /// Attaches `consumer` at `addr`, which must start an instruction of a function in the
    /// symbol table of the object mapped there (the executable or any shared library). Hits on
    /// any thread run it from then on, until [`Live::detach`]. The consumer may use any register
    /// state: its jump-path hits save and restore the whole extended state (x87, SSE, AVX,
    /// AVX-512, AMX) around it. The probe is keyed by (object, file offset): see
    /// [`Live::attach_symbol`] for what happens when the object is unmapped and mapped again.
    ///
    /// # Errors
    ///
    /// [`LiveError::NotMapped`], [`LiveError::Vdso`], [`LiveError::Anonymous`],
    /// [`LiveError::NotExecutable`], [`LiveError::NoFunctionAt`] for an address no probe can go
    /// to; [`probe_core::Error::InsideInstruction`]; [`LiveError::Refused`] for an instruction the
    /// arch refuses. A failed attach changes nothing.
    pub fn attach(&self, addr: u64, consumer: Arc<Consumer>) -> Result<Attached, LiveError> {
        let key = self.key_for(addr)?;
        self.attach_key(key, Hook::Full(consumer))
    }

    /// Attaches a register-only consumer at `addr`: `f(regs, ctx)` runs on every hit until
    /// [`Live::detach`]. A probe whose every consumer is register-only is hit without saving the
    /// extended state (general registers and flags only — the kernel optprobe's cost class); one
    /// with any [`Live::attach`] consumer takes the full-state path, for all its consumers.
    /// Where the instruction cannot be optimized the probe stays a breakpoint, with the same
    /// contract.
    ///
    /// Errors: [`LiveError::NullConsumer`] for `None`; otherwise as [`Live::attach`].
    ///
    /// # Safety
    ///
    /// `f` touches no x87, MXCSR, SSE/AVX/AVX-512 or AMX state (integer code: eBPF JIT output,
    /// code built without SSE), is async-signal-safe (it runs in signal handlers and in the
    /// middle of arbitrary code: no allocation, no lock another thread may hold), and may be
    /// called with `ctx` from any thread until `detach` of this probe returned.
    pub unsafe fn attach_raw(
        &self,
        addr: u64,
        f: Option<RawConsumer>,
        ctx: *mut core::ffi::c_void,
    ) -> Result<Attached, LiveError> {
        let f = f.ok_or(LiveError::NullConsumer)?;
        let key = self.key_for(addr)?;
        self.attach_key(
            key,
            Hook::Raw {
                f,
                ctx: ctx as usize,
            },
        )
    }

    /// The key of a probe at `addr`, checked: a function of a mapped object, an instruction
    /// boundary.
    fn key_for(&self, addr: u64) -> Result<ProbeKey, LiveError> {
        {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            self.refresh_locked(&mut w, false)?;
        }
        let space = self.opt.space();
        if space.areas.resume_of(addr).is_some() {
            // Our own XOL copies and trampolines.
            return Err(LiveError::Anonymous(addr));
        }
        let Some((image, off)) = space.locate(addr) else {
            return Err(image::why_not_probeable(addr));
        };
        if image.function_at(off).is_none() {
            return Err(LiveError::NoFunctionAt(addr));
        }
        space.check_boundary(addr)?;
        Ok(ProbeKey {
            object: image.id,
            offset: off,
        })
    }

    fn attach_key(&self, key: ProbeKey, hook: Hook) -> Result<Attached, LiveError> {
        let consumer = Arc::new(hook);
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        // Relaxed: written under this lock.
        if self.uninstalled.load(Ordering::Relaxed) {
            return Err(LiveError::Uninstalled);
        }
        // The maps were read just before, by `key_for` or `image_named` (each caller's first
        // step): not read a second time per attach.
        let space = self.opt.space();
        let addr = match w.armed.get(&key) {
            Some(&a) => Some(a),
            None => match space.address_of(key) {
                // Not armed yet: its XOL copy first (an instruction the arch refuses fails
                // here, before anything changed).
                Some(a) => {
                    self.prepare_ctx(a, key.object)?;
                    Some(a)
                }
                None => None,
            },
        };
        let fresh = addr.is_some() && !w.armed.contains_key(&key);
        self.reg.register(key, consumer.clone())?;
        if let (true, Some(a)) = (fresh, addr) {
            if let Err(e) = self.opt.register(a) {
                let _ = self.reg.unregister(&key, &consumer);
                self.reg.sync();
                return Err(e.into());
            }
            w.armed.insert(key, a);
        }
        if let Some(a) = addr {
            self.publish(&w, a, key);
        }
        let attached = Attached {
            addr,
            key,
            consumer,
        };
        self.attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(attached.clone());
        Ok(attached)
    }

    /// Makes sure the probe address `addr` has its context and an XOL copy of `object`'s
    /// instruction there (a context made for another object once mapped at `addr` gets a new
    /// copy: the ProbeCtx invariant says when that may happen).
    fn prepare_ctx(&self, addr: u64, object: ObjectId) -> Result<(), LiveError> {
        let space = self.opt.space();
        let existing = space.xol_map.get(addr);
        // Relaxed: `object` is written under the writer lock, which we hold.
        if existing.is_some_and(|c| c.object.load(Ordering::Relaxed) == object.0) {
            return Ok(());
        }
        let (start, func) = space
            .function_code(addr)
            .ok_or(LiveError::NoFunctionAt(addr))?;
        let plan = StepPlan::new(&func[(addr - start) as usize..], addr)?;
        let slot = space
            .areas
            .push_xol(addr, plan.resume(), |at| plan.copy(at))?;
        let simulated = plan.simulated();
        match existing {
            Some(ctx) => {
                // INVARIANT (ProbeCtx): nothing is armed at `addr` now. Relaxed: read by hits
                // only after the optimizer arms the probe, which publishes with its own Release.
                ctx.xol.store(slot, Ordering::Relaxed);
                ctx.simulated.store(simulated, Ordering::Relaxed);
                ctx.object.store(object.0, Ordering::Relaxed);
            }
            None => {
                // Kept for the life of the process, like the XOL copy it names (bounded by the
                // number of distinct addresses ever probed).
                let ctx: &'static ProbeCtx = Box::leak(Box::new(ProbeCtx {
                    addr,
                    xol: AtomicU64::new(slot),
                    simulated: AtomicU32::new(simulated),
                    object: AtomicU64::new(object.0),
                    list: AtomicPtr::new(core::ptr::null_mut()),
                }));
                space.xol_map.insert(addr, ctx)?;
            }
        }
        Ok(())
    }

    /// Takes every probe out and gives the program its own signal handlers back: each attached
    /// probe is detached (its consumer never runs again, its original bytes are back), the
    /// optimizer finishes (every trampoline out of the code), and the SIGTRAP and quiescence
    /// signal dispositions are what they were before [`Live::install`]. Returns how many probes
    /// were detached. From then on attaching fails with [`LiveError::Uninstalled`]; installing
    /// again is not possible (one `Live` per process), and the delayed optimizer's thread, if
    /// started, stays parked.
    ///
    /// # Errors
    ///
    /// A detach or a `sigaction` that failed (the rest is still done).
    pub fn uninstall(&self) -> Result<usize, LiveError> {
        // Relaxed: read under the writer lock by attach (which takes it too).
        {
            let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            self.uninstalled.store(true, Ordering::Relaxed);
        }
        let all: Vec<Attached> =
            core::mem::take(&mut *self.attached.lock().unwrap_or_else(|e| e.into_inner()));
        let n = all.len();
        let mut first = Ok(());
        for a in all {
            if let Err(e) = self.detach(a) {
                first = first.and(Err(e));
            }
        }
        self.opt.wait_for_optimizer();
        self.reg.sync();
        // SAFETY: restoring dispositions the process had (saved by `install`).
        unsafe {
            if libc::sigaction(libc::SIGTRAP, &self.previous, core::ptr::null_mut()) != 0 {
                first = first.and(Err(os("sigaction")));
            }
            if libc::sigaction(
                quiesce_signal(),
                &self.previous_quiesce,
                core::ptr::null_mut(),
            ) != 0
            {
                first = first.and(Err(os("sigaction")));
            }
            #[cfg(target_arch = "aarch64")]
            if libc::sigaction(
                isa::stop_signal(),
                &self.previous_stop,
                core::ptr::null_mut(),
            ) != 0
            {
                first = first.and(Err(os("sigaction")));
            }
        }
        first.map(|()| n)
    }

    /// Detaches a probe: once this returns its consumer never runs again, and if it was the
    /// last one of its key the original instruction is back (wherever its object is mapped).
    pub fn detach(&self, a: Attached) -> Result<(), LiveError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.reg.unregister(&a.key, &a.consumer)?;
        self.attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|b| !(b.key == a.key && Arc::ptr_eq(&b.consumer, &a.consumer)));
        if let Some(&addr) = w.armed.get(&a.key) {
            // The trampoline's list loses it (and becomes null with the last one) before the
            // optimizer hears of the detach.
            self.publish(&w, addr, a.key);
            if self.reg.with_consumers(&a.key, |c| c.len()).unwrap_or(0) == 0 {
                w.armed.remove(&a.key);
                self.opt.unregister(addr)?;
                self.opt.wait_for_optimizer();
            }
        }
        // No hit still holds the old consumer list after this.
        self.reg.sync();
        Ok(())
    }

    /// Where the probe `a` is armed now (`None`: its object is not mapped).
    pub fn address_of(&self, a: &Attached) -> Option<u64> {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.armed.get(&a.key).copied()
    }

    /// Takes the probe of `key` out of the code at `addr`, where its object is no longer
    /// mapped (or was mapped again, with fresh pages): its trampoline list goes, the optimizer
    /// forgets it (its code writes there are dropped: `ProcessCode::patch`), the registry keeps
    /// its consumers for the next mapping.
    fn disarm(&self, w: &mut Writer, key: ProbeKey, addr: u64) -> Result<(), LiveError> {
        w.armed.remove(&key);
        if let Some(ctx) = self.opt.space().xol_map.get(addr) {
            // AcqRel: as in `publish`.
            let old = ctx.list.swap(core::ptr::null_mut(), Ordering::AcqRel);
            if !old.is_null() {
                self.reg.sync();
                // SAFETY: as in `publish`: from `Box::into_raw`, unreachable, a grace period
                // passed.
                drop(unsafe { Box::from_raw(old) });
            }
        }
        self.opt.unregister(addr)?;
        self.opt.wait_for_optimizer();
        Ok(())
    }

    /// Arms the probe of `key` where its object is mapped now (at `addr`).
    fn arm(&self, w: &mut Writer, key: ProbeKey, addr: u64) -> Result<(), LiveError> {
        self.prepare_ctx(addr, key.object)?;
        self.opt.register(addr)?;
        w.armed.insert(key, addr);
        self.publish(w, addr, key);
        Ok(())
    }

    /// Rebuilds the hit list of the probe at `addr` from the registry's consumers of `key` and
    /// publishes it; frees the old one after a grace period (the [`ProbeCtx`] invariants).
    fn publish(&self, w: &Writer, addr: u64, key: ProbeKey) {
        let Some(ctx) = self.opt.space().xol_map.get(addr) else {
            return;
        };
        let hooks: Vec<Arc<Hook>> = {
            let read = self.reg.read(&w.reader);
            read.lookup(&key)
                .map(|p| p.consumers().to_vec())
                .unwrap_or_default()
        };
        let full = hooks.iter().any(|h| matches!(**h, Hook::Full(_)));
        let new = if hooks.is_empty() {
            core::ptr::null_mut()
        } else {
            Box::into_raw(Box::new(HitList {
                full,
                hooks: hooks.into_boxed_slice(),
            }))
        };
        // AcqRel: Release publishes the new list to hits (pairs with their Acquire load in
        // `trampoline_entry`); Acquire orders our later free after the previous publisher's
        // writes to the old one.
        let old = ctx.list.swap(new, Ordering::AcqRel);
        if !old.is_null() {
            // Every hit that may hold `old` is inside a registry read section.
            self.reg.sync();
            // SAFETY: `old` came from `Box::into_raw` here, is unreachable now, and a grace period
            // passed since it was (INVARIANT of ProbeCtx).
            drop(unsafe { Box::from_raw(old) });
        }
        isa::after_publish(self.opt, addr, full);
    }

    /// Trampolines prepared, of them reused after a quiescence wait, and freed so far.
    pub fn trampoline_stats(&self) -> (u64, u64, u64) {
        let s = self.opt.space();
        // Relaxed: statistics.
        (
            s.trampolines_made.load(Ordering::Relaxed),
            s.trampolines_reused.load(Ordering::Relaxed),
            s.trampolines_freed.load(Ordering::Relaxed),
        )
    }

    /// How many hits so far found their thread's pooled reader taken and moved to another entry.
    /// Every other hit writes only lines of its own thread's entry (and its RCU slot), so this
    /// staying flat while threads hit is the proof that the common case shares no line.
    pub fn pool_moves(&self) -> u64 {
        // Relaxed: a statistic.
        POOL_MOVES.load(Ordering::Relaxed)
    }

    /// Runs the consumers of the probe at `addr` (hit path: lock-free, allocation-free).
    fn run_consumers(&self, reader: &<SlotRcu as Rcu>::Reader<'static>, addr: u64, regs: &Regs) {
        let Some(key) = self.key_of(reader, addr) else {
            return;
        };
        let read = self.reg.read(reader);
        if let Some(p) = read.lookup(&key) {
            for c in p.consumers() {
                c.call(regs);
            }
        }
    }

    /// The (object, file offset) mapped executable at `addr`, by speculation on the address-space
    /// model (hit path: lock-free, allocation-free).
    ///
    /// The kernel falls back to taking the mm lock when speculation fails; a signal handler may
    /// not (the interrupted thread may hold it). Here a failed speculation is retried: the only
    /// writer is `refresh_mappings`, a short write section on an ordinary thread that never
    /// waits for a trap handler, so the retry ends. The one thread that cannot wait for it — the
    /// writer itself, trapping inside its own write section — uses the executable's static
    /// mapping, computed from its ELF segments, instead.
    fn key_of(&self, reader: &<SlotRcu as Rcu>::Reader<'static>, addr: u64) -> Option<ProbeKey> {
        let before = IN_MM_WRITE.with(|w| w.get());
        // SAFETY: set by this very thread to the mappings `refresh_locked` holds alive for the
        // whole write (and reset to an empty slice before they go).
        let before = unsafe { &*before };
        if !before.is_empty() {
            return before.iter().find(|v| v.contains(addr)).map(|v| ProbeKey {
                object: v.object,
                offset: v.offset_of(addr),
            });
        }
        loop {
            // The model's VMAs are freed through the registry's domain: hold one of
            // its read sections while speculating.
            let _guard = self.reg.rcu().read_lock(reader);
            let mm = &self.opt.space().mm;
            let Some(mut spec) = mm.speculate_begin() else {
                core::hint::spin_loop();
                continue;
            };
            let found = mm.speculate_find(&mut spec, addr);
            if mm.speculate_validate(&spec) {
                return found.map(|(object, offset)| ProbeKey { object, offset });
            }
        }
    }

    /// Re-reads `/proc/self/maps` and brings the probes up to date with it: call it after
    /// `dlopen` or `dlclose` (attaching does it too). Linux's `uprobe_mmap` rule: every probe
    /// whose object was unmapped leaves the code with the mapping (the registry keeps it), and
    /// every probe whose object is mapped and not armed is armed now — in a new mapping, or in
    /// the same range mapped again with fresh pages (found by checking each armed probe's code
    /// holds what the optimizer put there). Between the program's `dlopen` and this call, hits
    /// on the new mapping are missed: the process has no mmap hook.
    ///
    /// # Errors
    ///
    /// The first probe that could not be armed (the rest are), or the maps unreadable.
    pub fn refresh_mappings(&self) -> Result<(), LiveError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh_locked(&mut w, true)
    }

    fn refresh_locked(&self, w: &mut Writer, verify: bool) -> Result<(), LiveError> {
        let space = self.opt.space();
        let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| LiveError::Object {
            path: "/proc/self/maps".into(),
            why: e.to_string(),
        })?;
        let mut want: Vec<probe_core::mm::VmaInfo> = Vec::new();
        let mut objects: Vec<(ObjectId, String)> = Vec::new();
        for m in maps.lines().filter_map(image::maps_line) {
            if let Some(v) = m.vma {
                if v.flags.contains(probe_core::mm::VmFlags::EXEC)
                    && space.areas.resume_of(v.start).is_none()
                {
                    objects.push((v.object, m.path.to_string()));
                }
                want.push(v);
            }
        }
        space.images.set_mapped(objects);
        let have = space.mm.mappings();
        if have != want {
            // Apply the difference only: a mapping that did not change is never taken out, so
            // a hit resolving in it never finds it missing between two write sections (a
            // clear-and-refill did exactly that; the exact-hit test caught it).
            IN_MM_WRITE.with(|c| c.set(&have[..] as *const [probe_core::mm::VmaInfo]));
            let result = (|| {
                let mw = space.mm.write();
                let rcu = self.reg.rcu();
                for m in have.iter().filter(|m| !want.contains(m)) {
                    mw.unmap(rcu, m.start, m.end - m.start)?;
                }
                for m in want.iter().filter(|m| !have.contains(m)) {
                    mw.map(rcu, m.start, m.end - m.start, m.pgoff, m.object, m.flags)?;
                }
                Ok::<(), probe_core::Error>(())
            })();
            IN_MM_WRITE.with(|c| c.set(&[] as *const [probe_core::mm::VmaInfo]));
            result.map_err(LiveError::Core)?;
        } else if !verify {
            return Ok(());
        }
        let mut first = Ok(());
        // Probes whose object left their address, or whose code there is not ours any more.
        let armed: Vec<(ProbeKey, u64)> = w.armed.iter().map(|(k, a)| (*k, *a)).collect();
        for (key, addr) in armed {
            let moved = space.address_of(key) != Some(addr);
            if (moved || (verify && !self.code_is_ours(addr)))
                && let Err(e) = self.disarm(w, key, addr)
            {
                first = first.and(Err(e));
            }
        }
        // Probes whose object is mapped now and that are not armed.
        let mut keys: Vec<ProbeKey> = Vec::new();
        for m in want
            .iter()
            .filter(|m| m.flags.contains(probe_core::mm::VmFlags::EXEC))
        {
            self.reg.probes_of(
                m.object,
                m.pgoff..m.pgoff + (m.end - m.start),
                |off, _, _| {
                    keys.push(ProbeKey {
                        object: m.object,
                        offset: off,
                    });
                },
            );
        }
        for key in keys {
            if w.armed.contains_key(&key) {
                continue;
            }
            if let Some(addr) = space.address_of(key)
                && let Err(e) = self.arm(w, key, addr)
            {
                first = first.and(Err(e));
            }
        }
        first
    }

    /// Whether the code at `addr` holds what the optimizer put there (a mapping replaced by
    /// fresh pages of the same file holds the original instead).
    fn code_is_ours(&self, addr: u64) -> bool {
        let mut want = [0u8; probe_core::arch::MAX_DETOUR];
        let Ok(n) = self.opt.expected_code(addr, &mut want) else {
            return false;
        };
        let mut have = [0u8; probe_core::arch::MAX_DETOUR];
        self.opt
            .space()
            .mem
            .0
            .read_exact_at(&mut have[..n], addr)
            .is_ok()
            && have[..n] == want[..n]
    }

    /// The (object, file offset) key the address-space model gives `addr` (for tests and tools;
    /// takes the model's lock).
    pub fn key_at(&self, addr: u64) -> Option<ProbeKey> {
        self.opt.space().mm.locked_find(addr, |v| {
            v.map(|v| ProbeKey {
                object: v.object,
                offset: v.offset_of(addr),
            })
        })
    }

    /// Starts kprobes' delayed optimizer: a thread that, `delay` after an attach or detach
    /// queued work, applies everything queued meanwhile in one batch ([`Live::run_optimizer`]).
    /// Without it, the embedder calls `run_optimizer` itself. Returns `false` if already started.
    pub fn start_optimizer(&'static self, delay: std::time::Duration) -> bool {
        let mut started = false;
        OPTIMIZER_THREAD.get_or_init(|| {
            started = true;
            std::thread::Builder::new()
                .name("probe-optimizer".into())
                .spawn(move || {
                    loop {
                        // Woken by `kick` (spurious wake-ups just cost an empty run).
                        std::thread::park();
                        std::thread::sleep(delay);
                        self.run_optimizer();
                    }
                })
                .map(|h| h.thread().clone())
                .unwrap_or_else(|_| std::thread::current())
        });
        started
    }

    /// Turns queued probes into jumps (and jumps of detached probes back), in one batch:
    /// kprobes' delayed optimizer. Attach queues, this applies. Call it from a timer thread, or
    /// after a burst of attaches.
    pub fn run_optimizer(&self) {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.opt.wait_for_optimizer();
    }

    /// Whether the probe at `addr` is a jump in the code now (not merely queued to become one).
    pub fn is_optimized(&self, addr: u64) -> bool {
        self.opt
            .state(addr)
            .is_ok_and(|s| s.code == probe_core::optimizer::Code::Jump)
    }

    /// The breakpoint handler's own work for a trap at `addr` (a breakpoint executed there):
    /// claim the pooled readers, ask the optimizer, run the consumers with `regs()`, pick where
    /// the thread goes next, release.
    fn breakpoint_hit(&self, addr: u64, regs: impl FnOnce() -> Regs) -> Next {
        let pooled = self.claim();
        let answer = {
            // One domain: this read section covers the consumers' lookup below too (their own
            // sections nest in it, a counter on this reader).
            let guard = self.opt.rcu().read_lock(&pooled.reader);
            match self.opt.on_breakpoint(&guard, addr) {
                Trap::Probe { fire, then } => {
                    if fire {
                        self.run_consumers(&pooled.reader, addr, &regs());
                    }
                    match then {
                        Then::Step => match self.opt.space().xol_map.get(addr) {
                            Some(ctx) => Next::Xol(ctx),
                            None => Next::Pc(addr),
                        },
                        Then::Detour(d) => Next::Pc(d.displaced),
                    }
                }
                // No probe at addr and no breakpoint there now: ours was removed after the
                // thread trapped on it (re-execute the restored instruction) — or the trap was
                // one the arch can tell is the program's.
                Trap::Restart if isa::restart_is_foreign(self.opt.space(), addr) => Next::NotOurs,
                Trap::Restart => Next::Pc(addr),
                Trap::NotOurs => Next::NotOurs,
            }
        };
        Live::release(pooled);
        answer
    }

    /// The SIGTRAP handler's own work for a hit at `addr` — everything it does except the
    /// signal's delivery and return — run directly, for measuring (`live_hits` times it against
    /// the whole breakpoint path). Returns where the thread would continue.
    #[doc(hidden)]
    pub fn breakpoint_work(&self, addr: u64) -> Option<u64> {
        let regs = || {
            #[cfg(target_arch = "x86_64")]
            return Regs {
                rip: addr,
                ..Regs::default()
            };
            #[cfg(not(target_arch = "x86_64"))]
            return Regs {
                pc: addr,
                ..Regs::default()
            };
        };
        match self.breakpoint_hit(addr, regs) {
            // Relaxed: as in the handler.
            Next::Xol(ctx) => Some(ctx.xol.load(Ordering::Relaxed)),
            Next::Pc(pc) => Some(pc),
            Next::NotOurs => None,
        }
    }
}

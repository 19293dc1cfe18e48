//! The vocabulary: the small value types every layer of probe-core speaks.
//!
//! Which object a probe is in ([`ObjectId`]) and where ([`ProbeKey`]); which address space
//! ([`MmId`]) and what one of its mappings maps ([`VmaInfo`], [`VmFlags`]); the bytes a
//! breakpoint replaced ([`SavedInsn`]). They are plain `Copy` data with no protocol of their
//! own, so they sit on the bottom floor of the crate: every module may use them and they use
//! no module. Each is re-exported where it is first met ([`crate::probe`], [`crate::mm`],
//! [`crate::arch`]) and in the [prelude](crate::prelude).
//!
//! ```
//! use probe_core::types::{ObjectId, ProbeKey, VmFlags, VmaInfo};
//!
//! let vma = VmaInfo {
//!     start: 0x40_0000,
//!     end: 0x40_2000,
//!     pgoff: 0x1000,
//!     flags: VmFlags::EXEC,
//!     object: ObjectId(7),
//! };
//! // A trap at 0x40_0010 is the probe at offset 0x1010 of object 7.
//! let key = ProbeKey::new(vma.object, vma.offset_of(0x40_0010));
//! assert_eq!(key, ProbeKey::new(ObjectId(7), 0x1010));
//! assert_eq!(vma.addr_of(0x1010), Some(0x40_0010));
//! assert!(ProbeKey::new(ObjectId(7), 0x1010) < ProbeKey::new(ObjectId(8), 0));
//! ```

use core::fmt;
use core::ops::BitOr;

// ---------------------------------------------------------------- probes

/// The object a probe lives in: an inode for uprobes, the kernel image or a module for kprobes,
/// a guest-physical region for a hypervisor. Opaque to probe-core; only compared and hashed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId(pub u64);

/// Where a probe is: an offset inside an object.
///
/// Ordered by object, then offset. The three-way `cmp` is the derived one (two 64-bit
/// compares: `BTreeMap`'s search, which branches three ways, is cheapest with it); `<`, `<=`,
/// `>`, `>=` compare the key as one 128-bit integer. The tree walk makes those two-way
/// comparisons on every hit, and the derived operators go through `Option<Ordering>`: by
/// callgrind, a 1 000-probe lookup took 333 instructions with them, 247 without.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Ord, Hash)]
// The manual `PartialOrd` agrees with the derived `Ord` (the property test
// `probe_key_orders_as_its_tuple` checks every operator against the (object, offset) tuple).
#[allow(clippy::derive_ord_xor_partial_ord)]
pub struct ProbeKey {
    /// The object.
    pub object: ObjectId,
    /// The byte offset inside the object (a file offset for uprobes).
    pub offset: u64,
}

impl ProbeKey {
    /// The smallest key.
    pub const MIN: ProbeKey = ProbeKey {
        object: ObjectId(0),
        offset: 0,
    };

    /// `ProbeKey { object, offset }`.
    pub const fn new(object: ObjectId, offset: u64) -> Self {
        Self { object, offset }
    }

    /// The key as one integer of the same order: object in the high half, offset in the low.
    #[inline(always)]
    const fn rank(&self) -> u128 {
        ((self.object.0 as u128) << 64) | self.offset as u128
    }
}

impl PartialOrd for ProbeKey {
    #[inline(always)]
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(Ord::cmp(self, other))
    }
    #[inline(always)]
    fn lt(&self, other: &Self) -> bool {
        self.rank() < other.rank()
    }
    #[inline(always)]
    fn le(&self, other: &Self) -> bool {
        self.rank() <= other.rank()
    }
    #[inline(always)]
    fn gt(&self, other: &Self) -> bool {
        self.rank() > other.rank()
    }
    #[inline(always)]
    fn ge(&self, other: &Self) -> bool {
        self.rank() >= other.rank()
    }
}

// ---------------------------------------------------------------- address spaces

/// The page size of the reference model: mappings start, end and map offsets at multiples of it.
pub const PAGE_SIZE: u64 = 4096;

/// Which address space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MmId(pub u64);

/// Mapping flags.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct VmFlags(u32);

impl VmFlags {
    /// No flags.
    pub const NONE: VmFlags = VmFlags(0);
    /// Executable: only executable mappings carry breakpoints.
    pub const EXEC: VmFlags = VmFlags(1);
    /// Shared mapping.
    pub const SHARED: VmFlags = VmFlags(2);
    /// Backed by huge pages.
    pub const HUGE: VmFlags = VmFlags(4);

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// From raw bits (unknown bits are kept, not interpreted).
    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }
    /// Every flag of `other` is set.
    pub const fn contains(self, other: VmFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for VmFlags {
    type Output = VmFlags;
    fn bitor(self, o: VmFlags) -> VmFlags {
        VmFlags(self.0 | o.0)
    }
}

impl fmt::Debug for VmFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut l = f.debug_set();
        for (flag, name) in [
            (Self::EXEC, "EXEC"),
            (Self::SHARED, "SHARED"),
            (Self::HUGE, "HUGE"),
        ] {
            if self.contains(flag) {
                l.entry(&format_args!("{name}"));
            }
        }
        l.finish()
    }
}

/// A trusted snapshot of one mapping (read under the address space's lock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmaInfo {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Object offset mapped at `start`.
    pub pgoff: u64,
    /// Flags.
    pub flags: VmFlags,
    /// The object mapped.
    pub object: ObjectId,
}

impl VmaInfo {
    /// The object offset mapped at `addr` (which must be inside).
    pub fn offset_of(&self, addr: u64) -> u64 {
        addr - self.start + self.pgoff
    }
    /// The address at which object offset `offset` is mapped, if it is.
    pub fn addr_of(&self, offset: u64) -> Option<u64> {
        let len = self.end - self.start;
        (offset >= self.pgoff && offset - self.pgoff < len)
            .then(|| self.start + (offset - self.pgoff))
    }
    /// `start <= addr < end`.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

// ---------------------------------------------------------------- instructions

/// The most bytes a breakpoint replaces (x86: 1, aarch64: 4).
pub const MAX_BREAKPOINT: usize = 8;

/// The original bytes a breakpoint replaced, saved when the probe was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SavedInsn {
    bytes: [u8; MAX_BREAKPOINT],
    len: u8,
}

impl SavedInsn {
    /// Saves `bytes` (at most [`MAX_BREAKPOINT`]; longer input is cut).
    pub fn new(bytes: &[u8]) -> Self {
        let n = bytes.len().min(MAX_BREAKPOINT);
        let mut b = [0; MAX_BREAKPOINT];
        b[..n].copy_from_slice(&bytes[..n]);
        Self {
            bytes: b,
            len: n as u8,
        }
    }
    /// The saved bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{ObjectId, ProbeKey};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// `ProbeKey`'s integer comparison orders as (object, offset) tuples do, operator by operator.
    #[test]
    fn probe_key_orders_as_its_tuple(a in any::<(u64, u64)>(), b in any::<(u64, u64)>(), eq in any::<bool>()) {
        let b = if eq { a } else { b };
        let (ka, kb) = (ProbeKey::new(ObjectId(a.0), a.1), ProbeKey::new(ObjectId(b.0), b.1));
        prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        prop_assert_eq!(ka.partial_cmp(&kb), Some(a.cmp(&b)));
        prop_assert_eq!((ka < kb, ka <= kb, ka > kb, ka >= kb), (a < b, a <= b, a > b, a >= b));
    }
    }
}

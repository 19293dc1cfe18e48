//! The executable as loaded (bytes, segments, functions from `.symtab`) and the lines of
//! `/proc/self/maps` the address-space model is filled from.

use super::*;

/// The executable as loaded: its bytes (the original code), segments, functions, load bias.
pub(super) struct Image {
    pub(super) bytes: Vec<u8>,
    /// (vaddr, file offset, file size), link-time addresses.
    pub(super) segments: Vec<(u64, u64, u64)>,
    /// (runtime start, runtime end, name), sorted by start, one per address (for lookups by
    /// address).
    pub(super) functions: Vec<(u64, u64, String)>,
    /// Every function symbol, aliases included (folded identical code has several names at one
    /// address; compiler clones such as `f.constprop.0` are names of their own), sorted by
    /// (start, name).
    pub(super) names: Vec<(u64, u64, String)>,
    pub(super) bias: u64,
    pub(super) inode: u64,
}

impl Image {
    pub(super) fn load() -> Result<Self, LiveError> {
        use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};
        let exe = |e: &dyn fmt::Display| LiveError::Executable(e.to_string());
        let meta = std::fs::metadata("/proc/self/exe").map_err(|e| exe(&e))?;
        let inode = object_id(libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino()).0;
        let bytes = std::fs::read("/proc/self/exe").map_err(|e| exe(&e))?;
        let obj = object::File::parse(&*bytes).map_err(|e| exe(&e))?;
        let segments: Vec<(u64, u64, u64)> = obj
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (s.address(), off, size)
            })
            .collect();
        // The bias: where the mapping of file offset 0 starts, minus the segment's address.
        let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| exe(&e))?;
        let start = maps
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let ino = parse_maps_line(l)?.object.0;
                let off = u64::from_str_radix(f.get(2)?, 16).ok()?;
                let start = u64::from_str_radix(f.first()?.split('-').next()?, 16).ok()?;
                (ino == inode && off == 0).then_some(start)
            })
            .ok_or_else(|| LiveError::Executable("not in /proc/self/maps".into()))?;
        let seg0 = segments.iter().find(|s| s.1 == 0).map_or(0, |s| s.0);
        let bias = start.wrapping_sub(seg0 & !0xFFF);
        let mut functions: Vec<(u64, u64, String)> = obj
            .symbols()
            .chain(obj.dynamic_symbols())
            .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
            .filter_map(|s| {
                let a = s.address().wrapping_add(bias);
                Some((a, a.checked_add(s.size())?, s.name().ok()?.to_string()))
            })
            .collect();
        functions.sort();
        functions.dedup();
        let names = functions.clone();
        functions.dedup_by_key(|f| f.0);
        Ok(Self {
            bytes,
            segments,
            functions,
            names,
            bias,
            inode,
        })
    }

    /// The file offset of runtime address `addr`, if a segment holds it in the file.
    pub(super) fn file_offset(&self, addr: u64) -> Option<u64> {
        let link = addr.wrapping_sub(self.bias);
        self.segments.iter().find_map(|&(va, off, size)| {
            (link >= va && link - va < size).then(|| off + (link - va))
        })
    }

    pub(super) fn original(&self, addr: u64, buf: &mut [u8]) -> Option<()> {
        let off = usize::try_from(self.file_offset(addr)?).ok()?;
        buf.copy_from_slice(self.bytes.get(off..off.checked_add(buf.len())?)?);
        Some(())
    }

    pub(super) fn function_at(&self, addr: u64) -> Option<&(u64, u64, String)> {
        let i = self
            .functions
            .partition_point(|f| f.0 <= addr)
            .checked_sub(1)?;
        let f = &self.functions[i];
        (addr < f.1).then_some(f)
    }
}

/// An object's identity: its device and inode, folded into one `u64` (device numbers in the top
/// 24 bits, the inode in the low 40 — inodes of real filesystems stay far below 2⁴⁰).
pub(super) fn object_id(major: u32, minor: u32, inode: u64) -> ObjectId {
    ObjectId(
        (u64::from(major & 0xFFF) << 52)
            | (u64::from(minor & 0xFFF) << 40)
            | (inode & ((1 << 40) - 1)),
    )
}

/// What is mapped at `addr` when it is not in a function of the executable: the error that says
/// so (reads `/proc/self/maps`; not for the hit path).
pub(super) fn why_not_probeable(addr: u64, exe_inode: u64) -> LiveError {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return LiveError::NoFunctionAt(addr);
    };
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let Some((lo, hi)) = f.first().and_then(|r| r.split_once('-')) else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        if addr < lo || addr >= hi {
            continue;
        }
        let path = f.get(5).copied().unwrap_or("");
        let exec = f.get(1).is_some_and(|p| p.as_bytes().get(2) == Some(&b'x'));
        return match parse_maps_line(l) {
            _ if path == "[vdso]" || path == "[vsyscall]" => LiveError::Vdso(addr),
            None => LiveError::Anonymous(addr),
            Some(_) if !exec => LiveError::NotExecutable(addr),
            Some(v) if v.object.0 != exe_inode => LiveError::OtherObject {
                addr,
                path: path.to_string(),
            },
            Some(_) => LiveError::NoFunctionAt(addr),
        };
    }
    LiveError::NotMapped(addr)
}

/// One file-backed line of `/proc/self/maps`: `start-end perms offset major:minor inode path`.
pub(super) fn parse_maps_line(l: &str) -> Option<probe_core::mm::VmaInfo> {
    use probe_core::mm::{VmFlags, VmaInfo};
    let f: Vec<&str> = l.split_whitespace().collect();
    let (lo, hi) = f.first()?.split_once('-')?;
    let perms = f.get(1)?.as_bytes();
    let pgoff = u64::from_str_radix(f.get(2)?, 16).ok()?;
    let (major, minor) = f.get(3)?.split_once(':')?;
    let inode: u64 = f.get(4)?.parse().ok()?;
    if inode == 0 {
        return None;
    }
    let mut flags = VmFlags::NONE;
    if perms.get(2) == Some(&b'x') {
        flags = flags | VmFlags::EXEC;
    }
    if perms.get(3) == Some(&b's') {
        flags = flags | VmFlags::SHARED;
    }
    Some(VmaInfo {
        start: u64::from_str_radix(lo, 16).ok()?,
        end: u64::from_str_radix(hi, 16).ok()?,
        pgoff,
        flags,
        object: object_id(
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
            inode,
        ),
    })
}

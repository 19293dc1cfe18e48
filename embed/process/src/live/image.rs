//! Object images: every executable file the process maps (the executable, its shared libraries,
//! what `dlopen` maps later), read from its file once, with its functions from `.symtab` and
//! `.dynsym`; and the lines of `/proc/self/maps` the address-space model is filled from.
//!
//! An image is keyed the way a probe is: by the file's identity ([`ObjectId`], device and inode)
//! and file offsets. Nothing in it is a runtime address, because the same file may be mapped at
//! another address after a `dlclose` and `dlopen`: runtime addresses come from the address-space
//! model's mappings (`Mapped`), which say where each file offset is now.

use super::*;

/// One ELF file as the process maps it: its bytes (the original code), its loadable segments
/// and its functions, all in file offsets.
pub(super) struct Image {
    /// The path it was read from (what `/proc/self/maps` names).
    pub(super) path: String,
    /// Its identity (device and inode), the object of its probes' keys.
    pub(super) id: ObjectId,
    pub(super) bytes: Vec<u8>,
    /// (link address, file offset, file size) of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
    /// (start, end, name) in file offsets, sorted by start, one per start (lookups by offset).
    functions: Vec<(u64, u64, String)>,
    /// Every function symbol, aliases included (folded identical code has several names at one
    /// address; compiler clones such as `f.constprop.0` are names of their own), sorted by
    /// (start, name), in file offsets.
    pub(super) names: Vec<(u64, u64, String)>,
}

impl Image {
    /// Reads the file at `path`, which must be the object `id` (a file replaced on disk since it
    /// was mapped is refused rather than read as the wrong code).
    pub(super) fn load(path: &str, id: ObjectId) -> Result<Self, LiveError> {
        use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};
        let bad = |e: &dyn fmt::Display| LiveError::Object {
            path: path.to_string(),
            why: e.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(&e))?;
        if object_of(&meta) != id {
            return Err(bad(&"the file was replaced since it was mapped"));
        }
        let bytes = std::fs::read(path).map_err(|e| bad(&e))?;
        let obj = object::File::parse(&*bytes).map_err(|e| bad(&e))?;
        let segments: Vec<(u64, u64, u64)> = obj
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (s.address(), off, size)
            })
            .collect();
        let to_off = |vaddr: u64| {
            segments.iter().find_map(|&(va, off, size)| {
                (vaddr >= va && vaddr - va < size).then(|| off + (vaddr - va))
            })
        };
        let mut names: Vec<(u64, u64, String)> = obj
            .symbols()
            .chain(obj.dynamic_symbols())
            .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
            .filter_map(|s| {
                let start = to_off(s.address())?;
                Some((
                    start,
                    start.checked_add(s.size())?,
                    s.name().ok()?.to_string(),
                ))
            })
            .collect();
        names.sort();
        names.dedup();
        let mut functions = names.clone();
        functions.dedup_by_key(|f| f.0);
        Ok(Self {
            path: path.to_string(),
            id,
            bytes,
            segments,
            functions,
            names,
        })
    }

    /// The original bytes at file offset `off`.
    pub(super) fn original(&self, off: u64, buf: &mut [u8]) -> Option<()> {
        let off = usize::try_from(off).ok()?;
        buf.copy_from_slice(self.bytes.get(off..off.checked_add(buf.len())?)?);
        Some(())
    }

    /// The function containing file offset `off`: (start, end, name) in file offsets.
    pub(super) fn function_at(&self, off: u64) -> Option<&(u64, u64, String)> {
        let i = self
            .functions
            .partition_point(|f| f.0 <= off)
            .checked_sub(1)?;
        let f = &self.functions[i];
        (off < f.1).then_some(f)
    }

    /// The function named `name` (any alias): (start, end) in file offsets.
    pub(super) fn named(&self, name: &str) -> Option<(u64, u64)> {
        self.names.iter().find(|f| f.2 == name).map(|f| (f.0, f.1))
    }

    /// The link address of file offset `off` (for tools that print link addresses).
    #[allow(dead_code)]
    pub(super) fn link_address(&self, off: u64) -> Option<u64> {
        self.segments
            .iter()
            .find_map(|&(va, o, size)| (off >= o && off - o < size).then(|| va + (off - o)))
    }
}

/// The images read so far, by object (an object unmapped and mapped again keeps its image),
/// and which objects are mapped executable now (writers only; never the hit path).
pub(super) struct Images {
    list: Mutex<Vec<Arc<Image>>>,
    /// (object, path) of every executable file mapping, as of the last `refresh_mappings`, in
    /// maps order (the executable first).
    mapped: Mutex<Vec<(ObjectId, String)>>,
}

impl Images {
    pub(super) fn new() -> Self {
        Self {
            list: Mutex::new(Vec::new()),
            mapped: Mutex::new(Vec::new()),
        }
    }

    /// The image of `id`, read from `path` the first time.
    pub(super) fn get_or_load(&self, id: ObjectId, path: &str) -> Result<Arc<Image>, LiveError> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = list.iter().find(|i| i.id == id) {
            return Ok(i.clone());
        }
        let image = Arc::new(Image::load(path, id)?);
        list.push(image.clone());
        Ok(image)
    }

    /// The image of `id`: read already, or read now from the path it is mapped from.
    pub(super) fn get(&self, id: ObjectId) -> Option<Arc<Image>> {
        {
            let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = list.iter().find(|i| i.id == id) {
                return Some(i.clone());
            }
        }
        let path = {
            let mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
            mapped.iter().find(|m| m.0 == id)?.1.clone()
        };
        self.get_or_load(id, &path).ok()
    }

    /// Records the executable file mappings read from the maps (`refresh_mappings`).
    pub(super) fn set_mapped(&self, now: Vec<(ObjectId, String)>) {
        *self.mapped.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    /// The paths of the objects mapped executable now, each once, in maps order.
    pub(super) fn mapped_paths(&self) -> Vec<String> {
        let mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = Vec::new();
        for (_, p) in mapped.iter() {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        out
    }

    /// The mapped object `name` names (a path, through symlinks; or a file name, with or
    /// without the version suffix: `libz.so.1` names `libz.so.1.2.13`), read if need be.
    pub(super) fn mapped_named(&self, name: &str) -> Result<Option<Arc<Image>>, LiveError> {
        let found = {
            let mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
            if name.contains('/') {
                let Ok(meta) = std::fs::metadata(resolve(name)) else {
                    return Ok(None);
                };
                let id = object_of(&meta);
                mapped.iter().find(|m| m.0 == id).cloned()
            } else {
                mapped
                    .iter()
                    .find(|m| file_name_matches(&m.1, name))
                    .cloned()
            }
        };
        match found {
            Some((id, path)) => self.get_or_load(id, &path).map(Some),
            None => Ok(None),
        }
    }
}

/// `path` with its symlinks resolved (`/proc/self/exe` becomes the executable's path — which
/// is also what an emulator such as qemu-user answers for its guest, where a `stat` of
/// `/proc/self/exe` would describe the emulator itself).
pub(super) fn resolve(path: &str) -> String {
    std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.into_os_string().into_string().ok())
        .unwrap_or_else(|| path.to_string())
}

/// Whether the file name of `path` is `name`, or `name` followed by a version suffix.
fn file_name_matches(path: &str, name: &str) -> bool {
    let file = path.rsplit('/').next().unwrap_or("");
    file == name
        || file
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('.'))
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

/// The identity of the file `meta` describes.
pub(super) fn object_of(meta: &std::fs::Metadata) -> ObjectId {
    object_id(libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino())
}

/// One line of `/proc/self/maps`, parsed: `start-end perms offset major:minor inode path`.
pub(super) struct MapsLine<'a> {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) exec: bool,
    /// The file-backed mapping as the model holds it (`None`: anonymous).
    pub(super) vma: Option<probe_core::mm::VmaInfo>,
    pub(super) path: &'a str,
}

pub(super) fn maps_line(l: &str) -> Option<MapsLine<'_>> {
    let f: Vec<&str> = l.split_whitespace().collect();
    let (lo, hi) = f.first()?.split_once('-')?;
    Some(MapsLine {
        start: u64::from_str_radix(lo, 16).ok()?,
        end: u64::from_str_radix(hi, 16).ok()?,
        exec: f.get(1).is_some_and(|p| p.as_bytes().get(2) == Some(&b'x')),
        vma: parse_maps_line(l),
        path: maps_path(l),
    })
}

/// The path field of a maps line: everything after the fifth field (a path may hold spaces,
/// and a deleted file ends in ` (deleted)`).
pub(super) fn maps_path(l: &str) -> &str {
    let mut rest = l;
    for _ in 0..5 {
        rest = rest.trim_start();
        rest = rest.find(char::is_whitespace).map_or("", |i| &rest[i..]);
    }
    rest.trim()
}

/// What is mapped at `addr` when no probe can go there: the error that says so (reads
/// `/proc/self/maps`; not for the hit path).
pub(super) fn why_not_probeable(addr: u64) -> LiveError {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return LiveError::NoFunctionAt(addr);
    };
    for m in maps.lines().filter_map(maps_line) {
        if addr < m.start || addr >= m.end {
            continue;
        }
        return match m.vma {
            _ if m.path == "[vdso]" || m.path == "[vsyscall]" => LiveError::Vdso(addr),
            None => LiveError::Anonymous(addr),
            Some(_) if !m.exec => LiveError::NotExecutable(addr),
            Some(_) => LiveError::NoFunctionAt(addr),
        };
    }
    LiveError::NotMapped(addr)
}

/// One file-backed line of `/proc/self/maps` as the address-space model holds it.
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

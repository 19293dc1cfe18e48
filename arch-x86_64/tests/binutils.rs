//! Cross-check against an independent oracle, GNU binutils: a corpus of several hundred
//! instructions (every RIP-relative form we know of: legacy, SSE, VEX, EVEX, with immediates
//! after the displacement, with segment and lock prefixes; every relative branch; every refused
//! class) is assembled with `as`, and for each instruction
//!
//! * our decoder's length equals the length `objdump` decodes;
//! * our [`Kind`] / [`Refusal`] equals the class read off `objdump`'s disassembly text
//!   (mnemonic, operands, and the target address objdump computes);
//! * our relocated XOL copy of every RIP-relative instruction, disassembled by `objdump` at the
//!   slot's address, addresses the same memory as the original;
//! * our `jmp rel32` encoding equals the assembler's.
//!
//! Needs `as` and `objdump` (Debian `binutils`, present here); skipped with a printed reason if
//! they are missing.

use probe_arch_x86_64::insn::{Insn, Kind, Refusal};
use probe_arch_x86_64::{X86_64, jmp_rel32, xol};
use probe_core::arch::Arch;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tool(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| {
        Command::new(n)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| n.to_string())
    })
}

struct Tools {
    as_: String,
    objdump: String,
    dir: PathBuf,
}

fn tools(test: &str) -> Option<Tools> {
    let as_ = tool(&["x86_64-linux-gnu-as", "as"]);
    let objdump = tool(&["x86_64-linux-gnu-objdump", "objdump"]);
    let (Some(as_), Some(objdump)) = (as_, objdump) else {
        println!("skipped: GNU as/objdump not found (apt-get install binutils-x86-64-linux-gnu)");
        return None;
    };
    let dir = std::env::temp_dir().join(format!("probe-x86-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Some(Tools { as_, objdump, dir })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One instruction as objdump sees it.
#[derive(Debug)]
struct Dis {
    addr: u64,
    bytes: Vec<u8>,
    text: String,
}

/// Parses `objdump -d -w` output (instruction lines only).
fn parse(out: &str) -> Vec<Dis> {
    out.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, '\t');
            let addr = parts.next()?.trim().strip_suffix(':')?;
            let addr = u64::from_str_radix(addr, 16).ok()?;
            let bytes = parts
                .next()?
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16))
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let text = parts.next().unwrap_or("").trim().to_string();
            Some(Dis { addr, bytes, text })
        })
        .collect()
}

fn assemble(t: &Tools, name: &str, src: &str) -> Vec<Dis> {
    let s = t.dir.join(format!("{name}.s"));
    let o = t.dir.join(format!("{name}.o"));
    std::fs::write(&s, src).unwrap();
    run(Command::new(&t.as_).arg(&s).arg("-o").arg(&o));
    parse(&run(Command::new(&t.objdump)
        .args(["-d", "-w", "-M", "intel"])
        .arg(&o)))
}

fn objdump_binary(t: &Tools, name: &str, blob: &[u8], vma: u64) -> Vec<Dis> {
    let f: &Path = &t.dir.join(format!("{name}.bin"));
    std::fs::write(f, blob).unwrap();
    parse(&run(Command::new(&t.objdump)
        .args([
            "-D",
            "-w",
            "-M",
            "intel",
            "-b",
            "binary",
            "-m",
            "i386:x86-64",
        ])
        .arg(format!("--adjust-vma={vma:#x}"))
        .arg(f)))
}

/// The corpus, in Intel syntax. `data` and `tgt` are labels placed after it.
fn corpus() -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    let r64 = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    // Integer ALU against RIP-relative memory, both directions, and with immediates.
    for op in ["add", "or", "adc", "sbb", "and", "sub", "xor", "cmp", "mov"] {
        v.push(format!("{op} rax, [rip+data]"));
        v.push(format!("{op} [rip+data], r9"));
        v.push(format!("{op} ecx, dword ptr [rip+data]"));
        v.push(format!("{op} word ptr [rip+data], dx"));
        v.push(format!("{op} byte ptr [rip+data], 0x7f"));
        v.push(format!("{op} dword ptr [rip+data], 0x12345678"));
        v.push(format!("{op} qword ptr [rip+data], -3"));
    }
    v.push("test dword ptr [rip+data], 0x1000".into());
    v.push("test [rip+data], rbx".into());
    for r in r64 {
        v.push(format!("lea {r}, [rip+data]"));
        v.push(format!("mov {r}, [rip+data]"));
    }
    for op in ["shl", "shr", "sar", "rol", "ror", "rcl", "rcr"] {
        v.push(format!("{op} dword ptr [rip+data], 1"));
        v.push(format!("{op} qword ptr [rip+data], cl"));
        v.push(format!("{op} word ptr [rip+data], 5"));
    }
    for op in ["inc", "dec", "neg", "not", "mul", "imul", "div", "idiv"] {
        v.push(format!("{op} qword ptr [rip+data]"));
        v.push(format!("{op} byte ptr [rip+data]"));
    }
    v.extend(
        [
            "imul eax, [rip+data], 100",
            "movzx eax, byte ptr [rip+data]",
            "movzx rax, word ptr [rip+data]",
            "movsx ecx, byte ptr [rip+data]",
            "movsxd rdx, dword ptr [rip+data]",
            "push qword ptr [rip+data]",
            "pop qword ptr [rip+data]",
            "lock add dword ptr [rip+data], 1",
            "lock cmpxchg [rip+data], rcx",
            "lock xadd [rip+data], rdx",
            "xchg [rip+data], rsi",
            "bt dword ptr [rip+data], 3",
            "lock bts qword ptr [rip+data], 63",
            "cmovne rax, [rip+data]",
            "sete byte ptr [rip+data]",
            "mov rax, fs:[rip+data]",
            "mov gs:[rip+data], ecx",
            "crc32 eax, byte ptr [rip+data]",
            "popcnt rax, [rip+data]",
            "movbe eax, [rip+data]",
            "prefetcht0 [rip+data]",
            "clflush [rip+data]",
            "fld qword ptr [rip+data]",
            "fstp dword ptr [rip+data]",
            "fnstcw [rip+data]",
            "ldmxcsr [rip+data]",
            "fxsave [rip+data]",
            "movaps xmm1, [rip+data]",
            "movups [rip+data], xmm2",
            "movdqa xmm3, [rip+data]",
            "movdqu xmm12, [rip+data]",
            "movsd xmm0, qword ptr [rip+data]",
            "movss dword ptr [rip+data], xmm5",
            "addps xmm1, [rip+data]",
            "mulsd xmm2, qword ptr [rip+data]",
            "xorps xmm0, [rip+data]",
            "pxor xmm7, [rip+data]",
            "paddd xmm8, [rip+data]",
            "pshufd xmm1, [rip+data], 0x1b",
            "cmpps xmm2, [rip+data], 4",
            "roundsd xmm3, qword ptr [rip+data], 9",
            "pinsrq xmm4, qword ptr [rip+data], 1",
            "pextrd dword ptr [rip+data], xmm5, 2",
            "cvtsi2sd xmm0, qword ptr [rip+data]",
            "ucomisd xmm1, qword ptr [rip+data]",
            "pshufb xmm2, [rip+data]",
            "aesenc xmm3, [rip+data]",
            "pclmulqdq xmm4, [rip+data], 0x11",
            "vmovdqu ymm0, [rip+data]",
            "vmovaps [rip+data], ymm9",
            "vaddps ymm1, ymm2, [rip+data]",
            "vpxor xmm3, xmm4, [rip+data]",
            "vbroadcastss ymm5, dword ptr [rip+data]",
            "vpermq ymm6, [rip+data], 0x4e",
            "vfmadd231ps ymm7, ymm8, [rip+data]",
            "vpblendd ymm1, ymm2, [rip+data], 0xf0",
            "andn rax, rbx, [rip+data]",
            "bextr ecx, [rip+data], edx",
            "shlx rax, [rip+data], rcx",
            "vmovdqu64 zmm0, [rip+data]",
            "vaddps zmm1, zmm2, dword ptr [rip+data]{1to16}",
            "vpternlogd zmm1, zmm2, [rip+data], 0x96",
            "vmovdqu8 zmm3{k1}{z}, [rip+data]",
            "kmovw k1, word ptr [rip+data]",
        ]
        .map(String::from),
    );
    // Indirect branches through RIP-relative memory.
    v.push("jmp qword ptr [rip+data]".into());
    v.push("call qword ptr [rip+data]".into());
    v.push("notrack jmp qword ptr [rip+data]".into());
    // Relative branches.
    v.push("jmp tgt".into());
    v.push("jmp far_tgt".into());
    v.push("call tgt".into());
    v.push("call far_tgt".into());
    v.push("bnd jmp tgt".into());
    for cc in [
        "o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g",
    ] {
        v.push(format!("j{cc} tgt"));
        v.push(format!("j{cc} far_tgt"));
    }
    // rel8 only: to themselves (`.`) and a little back.
    for op in ["loop", "loope", "loopne", "jrcxz"] {
        v.push(format!("{op} ."));
        v.push(format!("addr32 {op} . - 100"));
    }
    v.push("jecxz . + 50".into());
    // Indirect calls and jumps through registers and memory.
    for r in r64 {
        v.push(format!("call {r}"));
        v.push(format!("jmp {r}"));
    }
    v.extend(
        [
            "call qword ptr [rax+8]",
            "call qword ptr [rbx+rcx*8+0x40]",
            "call qword ptr [rsp+8]",
            "call qword ptr [rsp+rax*8]",
            "call qword ptr fs:[0x28]",
            "jmp qword ptr [rax+rcx*8]",
            "ret",
            "ret 16",
        ]
        .map(String::from),
    );
    // Refused classes.
    v.extend(
        [
            "int3",
            "int 3",
            "int 0x80",
            "int1",
            "syscall",
            "sysenter",
            "sysexitq",
            "sysretq",
            "iretq",
            "iretd",
            "ud2",
            "ud1 eax, [rax]",
            "xbegin tgt",
            "call fword ptr [rax]",
            "jmp fword ptr [rax]",
            "data16 jmp tgt",
        ]
        .map(String::from),
    );
    // Ordinary instructions.
    for r in r64 {
        v.push(format!("push {r}"));
        v.push(format!("mov {r}, 0x123456789"));
    }
    v.extend(
        [
            "nop",
            "nop dword ptr [rax+rax*1+0]",
            "xchg ax, ax",
            "pause",
            "lfence",
            "rdtsc",
            "cpuid",
            "cld",
            "rep movsb",
            "repne scasb",
            "leave",
            "endbr64",
            "mov rax, [rsp+8]",
            "mov [rbp-0x10], edi",
            "lea rax, [rbx+rcx*4+0x100]",
            "mov rax, qword ptr [0x1000]",
            "movabs rax, 0x1122334455667788",
            "mov eax, dword ptr fs:[0x28]",
            "xor eax, eax",
            "vzeroupper",
        ]
        .map(String::from),
    );
    v
}

/// The class objdump's text implies.
fn oracle(text: &str) -> Result<&'static str, Refusal> {
    let prefixes = [
        "lock", "rep", "repz", "repnz", "bnd", "notrack", "data16", "addr32", "fs", "gs", "cs",
        "ds",
    ];
    let mut toks = text.split_whitespace().skip_while(|t| prefixes.contains(t));
    let mnem = toks.next().unwrap_or("");
    let ops: String = toks.collect::<Vec<_>>().join(" ");
    let direct = ops
        .split_whitespace()
        .next()
        .is_some_and(|t| u64::from_str_radix(t, 16).is_ok());
    let jcc = [
        "jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja", "js", "jns", "jp", "jnp", "jl", "jge",
        "jle", "jg",
    ];
    Ok(match mnem {
        "int3" | "int" | "int1" | "icebp" | "into" => return Err(Refusal::Trap),
        "syscall" | "sysenter" => return Err(Refusal::SystemCall),
        "sysexit" | "sysret" | "sysretq" | "sysexitq" | "iret" | "iretd" | "iretq" => {
            return Err(Refusal::ExceptionReturn);
        }
        "ud2" | "ud1" | "ud0" => return Err(Refusal::Faulting),
        "xbegin" => return Err(Refusal::Transaction),
        "(bad)" => return Err(Refusal::Invalid),
        "ljmp" | "lcall" => return Err(Refusal::FarBranch),
        "jmp" | "call" if ops.contains("FWORD") => return Err(Refusal::FarBranch),
        // objdump names the 16-bit forms jmpw/callw, and j<cc> with a data16 prefix.
        "jmpw" | "callw" => return Err(Refusal::OperandSizeBranch),
        _ if direct && text.contains("data16") => return Err(Refusal::OperandSizeBranch),
        "jmp" if direct => "Jump",
        "call" if direct => "Call",
        m if jcc.contains(&m) && direct => "CondJump",
        "loop" | "loope" | "loopne" | "jrcxz" | "jecxz" => "CountJump",
        "call" if ops.contains("rsp") => return Err(Refusal::StackRelativeCall),
        "call" => "IndirectCall",
        _ if ops.contains("[rip+") => "RipRelative",
        _ => "AsIs",
    })
}

/// The target objdump printed: `# 1234 <label>` for memory operands, the first operand for
/// branches.
fn oracle_target(text: &str) -> Option<u64> {
    if let Some((_, c)) = text.rsplit_once('#') {
        let t = c.split_whitespace().next()?;
        return u64::from_str_radix(t.trim_start_matches("0x"), 16).ok();
    }
    text.split_whitespace().rev().find_map(|t| {
        u64::from_str_radix(t, 16)
            .ok()
            .filter(|_| !t.starts_with("0x"))
    })
}

fn our_class(k: Kind) -> (&'static str, Option<u64>) {
    match k {
        Kind::AsIs => ("AsIs", None),
        Kind::RipRelative { target, .. } => ("RipRelative", Some(target)),
        Kind::Jump { target } => ("Jump", Some(target)),
        Kind::CondJump { target, .. } => ("CondJump", Some(target)),
        Kind::CountJump { target, .. } => ("CountJump", Some(target)),
        Kind::Call { target } => ("Call", Some(target)),
        Kind::IndirectCall { rip_operand, .. } => ("IndirectCall", rip_operand.map(|(t, _)| t)),
    }
}

fn source(lines: &[String]) -> String {
    let mut src = String::from(".intel_syntax noprefix\n.text\n");
    for l in lines {
        writeln!(src, "{l}").unwrap();
    }
    src.push_str("tgt: nop\n.skip 300, 0x90\nfar_tgt: nop\ndata: .quad 0\n");
    src
}

#[test]
fn decoder_and_classifier_agree_with_binutils() {
    let Some(t) = tools("classes") else { return };
    let lines = corpus();
    let dis = assemble(&t, "corpus", &source(&lines));
    // One objdump instruction per corpus line (then tgt/skip/data).
    assert!(
        dis.len() > lines.len(),
        "objdump decoded {} of {} lines",
        dis.len(),
        lines.len()
    );
    let code: Vec<u8> = dis.iter().flat_map(|d| d.bytes.clone()).collect();
    let mut checked = 0;
    let mut rip_forms = 0;
    for (line, d) in lines.iter().zip(&dis) {
        let off = d.addr as usize;
        // Our decoder over the whole stream, as a function walker would see it.
        let ours = Insn::decode(&code[off..], d.addr);
        let want = oracle(&d.text);
        match (ours, want) {
            (Ok(i), Ok(class)) => {
                assert_eq!(i.len(), d.bytes.len(), "{line}: length ({})", d.text);
                assert_eq!(i.bytes(), &d.bytes[..], "{line}");
                let (k, target) = our_class(i.kind());
                assert_eq!(k, class, "{line}: class ({})", d.text);
                if let Some(target) = target {
                    assert_eq!(
                        Some(target),
                        oracle_target(&d.text),
                        "{line}: target ({})",
                        d.text
                    );
                }
                rip_forms += usize::from(d.text.contains("[rip+"));
            }
            (Err(e), Err(r)) => {
                assert_eq!(e, r, "{line}: refusal ({})", d.text);
                // `66 E9`: objdump decodes AMD's 16-bit form (4 bytes), iced Intel's (6): the
                // disagreement is why it is refused.
                if e == Refusal::OperandSizeBranch {
                    checked += 1;
                    continue;
                }
                assert_eq!(
                    probe_arch_x86_64::insn::length(&code[off..], d.addr).ok(),
                    Some(d.bytes.len()),
                    "{line}: length of a refused instruction"
                );
            }
            (ours, want) => panic!("{line} ({}): ours {ours:?}, objdump says {want:?}", d.text),
        }
        // is_trap agrees with objdump on every instruction.
        let trap = matches!(d.text.split_whitespace().next(), Some("int3"))
            || d.text.split_whitespace().collect::<Vec<_>>() == ["int", "0x3"];
        assert_eq!(X86_64::is_trap(&d.bytes), trap, "{line}: is_trap");
        checked += 1;
    }
    assert!(checked >= 300, "only {checked} instructions");
    println!("{checked} instructions ({rip_forms} RIP-relative) agree with objdump");
}

#[test]
fn relocated_rip_operands_address_the_same_memory() {
    let Some(t) = tools("reloc") else { return };
    let lines = corpus();
    let dis = assemble(&t, "corpus", &source(&lines));
    let code: Vec<u8> = dis.iter().flat_map(|d| d.bytes.clone()).collect();
    // Slots 1 GiB above the code (the original's data is within reach), 64 bytes each.
    let base = 0x4000_0000u64;
    let mut blob = Vec::new();
    let mut expect = Vec::new();
    for d in dis.iter().take(lines.len()) {
        let Ok(i) = Insn::decode(&code[d.addr as usize..], d.addr) else {
            continue;
        };
        let target = match i.kind() {
            Kind::RipRelative { target, .. } => target,
            _ => continue,
        };
        let slot = base + blob.len() as u64;
        let copy = xol::prepare(&i, slot).unwrap();
        let mut padded = copy.bytes().to_vec();
        padded.resize(64, 0xCC);
        blob.extend_from_slice(&padded);
        expect.push((slot, i.len(), target, copy.resume(), d.text.clone()));
    }
    let got = objdump_binary(&t, "copies", &blob, base);
    for (slot, len, target, resume, text) in &expect {
        let at = got
            .iter()
            .position(|g| g.addr == *slot)
            .expect("copy decoded");
        let first = &got[at];
        assert_eq!(
            first.bytes.len(),
            *len,
            "{text}: relocated length ({})",
            first.text
        );
        assert_eq!(
            oracle_target(&first.text),
            Some(*target),
            "{text} → {}",
            first.text
        );
        // The next instruction jumps back to the original's next instruction.
        let back = &got[at + 1];
        let to = back.text.strip_prefix("jmp").map(str::trim);
        let to = to.and_then(|t| u64::from_str_radix(t.trim_start_matches("0x"), 16).ok());
        assert_eq!(to, Some(*resume), "{text}: then {}", back.text);
    }
    assert!(
        expect.len() >= 150,
        "only {} RIP-relative forms",
        expect.len()
    );
    println!(
        "{} relocated RIP-relative copies address the same memory (objdump)",
        expect.len()
    );
}

#[test]
fn jmp_rel32_matches_the_assembler() {
    let Some(t) = tools("jmp") else { return };
    // `jmp` to labels at several distances, forced to rel32 with `jmp.d32`.
    let dists = [0i64, 1, 127, 128, 4096, -5, -200, 0x10000];
    let mut src = String::from(".intel_syntax noprefix\n.text\n.skip 0x1000, 0x90\n");
    for (k, d) in dists.iter().enumerate() {
        writeln!(src, "j{k}: jmp.d32 j{k} + 5 + ({d})").unwrap();
    }
    src.push_str(".skip 0x10010, 0x90\n");
    let dis = assemble(&t, "jmp", &src);
    let jumps: Vec<_> = dis
        .iter()
        .filter(|d| d.bytes.first() == Some(&0xE9))
        .collect();
    assert_eq!(jumps.len(), dists.len());
    for (d, dist) in jumps.into_iter().zip(dists) {
        let to = (d.addr as i64 + 5 + dist) as u64;
        assert_eq!(
            Some(d.bytes.as_slice()),
            jmp_rel32(d.addr, to).as_ref().map(|b| &b[..])
        );
    }
}

//! Cross-check against GNU binutils for aarch64 (`aarch64-linux-gnu-as`, `-ld`, `-objdump` from
//! Debian's `binutils-aarch64-linux-gnu`; CI installs it). A corpus of several hundred
//! instructions — every PC-relative form, every refused class, and ordinary ones — is assembled
//! and linked at a fixed address; for each instruction our classifier must agree with the class
//! read off objdump's disassembly, and for every PC-relative one our decoded target (ADR/ADRP
//! result, literal address, branch target) must equal the address objdump prints. Our encoders
//! (`B`, `BL`, `BRK`, `NOP`) must produce the assembler's words, and the cache-maintenance
//! assembly text used by the inline asm must assemble to the expected instructions.
//!
//! Skipped with a printed reason when the tools are missing.

use probe_arch_aarch64::cache::{CacheGeometry, Op, asm_text};
use probe_arch_aarch64::insn::{Class, PcRelative, Refusal, classify_word};
use probe_arch_aarch64::{BREAKPOINT, NOP, b, bl};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

const BASE: u64 = 0x40_0000;

struct Tools {
    dir: PathBuf,
}

fn tools(name: &str) -> Option<Tools> {
    for t in [
        "aarch64-linux-gnu-as",
        "aarch64-linux-gnu-ld",
        "aarch64-linux-gnu-objdump",
    ] {
        if Command::new(t).arg("--version").output().is_err() {
            println!("skipped: {t} not found (apt-get install binutils-aarch64-linux-gnu)");
            return None;
        }
    }
    let dir = std::env::temp_dir().join(format!("probe-a64-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Some(Tools { dir })
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// (address, word, mnemonic, operands) per instruction line of objdump.
fn assemble(t: &Tools, name: &str, src: &str) -> Vec<(u64, u32, String, String)> {
    let s = t.dir.join(format!("{name}.s"));
    let o = t.dir.join(format!("{name}.o"));
    let e = t.dir.join(format!("{name}.elf"));
    std::fs::write(&s, src).unwrap();
    run(Command::new("aarch64-linux-gnu-as")
        .args(["-march=armv8.5-a+memtag+crypto+crc"])
        .arg(&s)
        .arg("-o")
        .arg(&o));
    run(Command::new("aarch64-linux-gnu-ld")
        .arg(format!("-Ttext={BASE:#x}"))
        .args(["-e", "0", "-o"])
        .arg(&e)
        .arg(&o));
    run(Command::new("aarch64-linux-gnu-objdump")
        .args(["-d", "-w"])
        .arg(&e))
    .lines()
    .filter_map(|l| {
        let mut p = l.split('\t');
        let addr = u64::from_str_radix(p.next()?.trim().strip_suffix(':')?, 16).ok()?;
        let word = u32::from_str_radix(p.next()?.trim(), 16).ok()?;
        let mnem = p.next().unwrap_or("").trim().to_string();
        let ops = p.next().unwrap_or("").trim().to_string();
        Some((addr, word, mnem, ops))
    })
    .collect()
}

fn corpus() -> Vec<String> {
    let mut v = Vec::new();
    for r in 0..31 {
        v.push(format!("adr x{r}, lit"));
        v.push(format!("adrp x{r}, far"));
    }
    v.push("adr xzr, tgt".into());
    v.push("adrp x1, . - 0x100000000".into());
    for r in [0, 5, 17, 30] {
        v.push(format!("ldr x{r}, lit"));
        v.push(format!("ldr w{r}, lit"));
        v.push(format!("ldrsw x{r}, lit"));
        v.push(format!("ldr s{r}, lit"));
        v.push(format!("ldr d{r}, lit"));
        v.push(format!("ldr q{r}, lit"));
    }
    v.push("prfm pldl1keep, lit".into());
    v.push("prfm pstl2strm, lit".into());
    v.push("b tgt".into());
    v.push("bl tgt".into());
    v.push("b far".into());
    v.push("bl back".into());
    for c in [
        "eq", "ne", "cs", "cc", "mi", "pl", "vs", "vc", "hi", "ls", "ge", "lt", "gt", "le", "al",
        "nv",
    ] {
        v.push(format!("b.{c} tgt"));
        v.push(format!("b.{c} back"));
    }
    for r in [0, 9, 30] {
        v.push(format!("cbz x{r}, tgt"));
        v.push(format!("cbnz w{r}, back"));
        v.push(format!("tbz x{r}, #63, tgt"));
        v.push(format!("tbnz w{r}, #5, back"));
        v.push(format!("tbz x{r}, #32, tgt"));
    }
    for r in [0, 16, 30] {
        v.push(format!("br x{r}"));
        v.push(format!("blr x{r}"));
        v.push(format!("ret x{r}"));
    }
    v.push("ret".into());
    // Refused.
    for (sz, r) in [("", "x"), ("", "w"), ("b", "w"), ("h", "w")] {
        v.push(format!("ldxr{sz} {r}0, [x1]"));
        v.push(format!("ldaxr{sz} {r}2, [x3]"));
        v.push(format!("stxr{sz} w4, {r}5, [x6]"));
        v.push(format!("stlxr{sz} w7, {r}8, [x9]"));
    }
    for r in ["x", "w"] {
        v.push(format!("ldxp {r}0, {r}1, [x2]"));
        v.push(format!("ldaxp {r}0, {r}1, [x2]"));
        v.push(format!("stxp w3, {r}0, {r}1, [x2]"));
        v.push(format!("stlxp w3, {r}0, {r}1, [x2]"));
    }
    v.extend(
        [
            "svc #0",
            "svc #0xffff",
            "hvc #1",
            "smc #2",
            "brk #0",
            "brk #0x5052",
            "hlt #0",
            "dcps1",
            "dcps2",
            "dcps3",
            "eret",
            "eretaa",
            "eretab",
            "drps",
            "msr daif, x0",
            "msr nzcv, x1",
            "msr tpidr_el0, x2",
            "msr fpcr, x3",
            "msr sctlr_el1, x4",
            "msr daifset, #2",
            "msr daifclr, #15",
            "msr spsel, #1",
            "msr pan, #1",
            "msr ssbs, #1",
            "mrs x0, daif",
            "mrs x30, daif",
            "braa x0, x1",
            "brab x2, sp",
            "blraa x3, x4",
            "blrab x5, x6",
            "braaz x7",
            "blraaz x8",
            "retaa",
            "retab",
            "udf #0",
            "udf #0xffff",
        ]
        .map(String::from),
    );
    // Stepped.
    v.extend(
        [
            "nop",
            "yield",
            "wfe",
            "wfi",
            "sev",
            "sevl",
            "bti c",
            "bti j",
            "paciasp",
            "autiasp",
            "pacibsp",
            "xpaclri",
            "csdb",
            "dmb ish",
            "dmb ishld",
            "dsb sy",
            "dsb ish",
            "isb",
            "clrex",
            "mrs x0, tpidr_el0",
            "mrs x1, nzcv",
            "mrs x2, fpcr",
            "mrs x3, ctr_el0",
            "mrs x4, cntvct_el0",
            "mrs x5, midr_el1",
            "dc cvau, x0",
            "dc civac, x1",
            "dc zva, x2",
            "ic ivau, x3",
            "ic iallu",
            "tlbi vmalle1is",
            "at s1e1r, x0",
            "ldar x0, [x1]",
            "ldarb w0, [x1]",
            "stlr w2, [x3]",
            "stlrh w2, [x3]",
            "ldapr x4, [x5]",
            "ldlar x0, [x1]",
            "stllr x0, [x1]",
            "cas x0, x1, [x2]",
            "casal w3, w4, [x5]",
            "casb w0, w1, [x2]",
            "casp x0, x1, x2, x3, [x4]",
            "caspal w0, w1, w2, w3, [x4]",
            "ldadd x0, x1, [x2]",
            "ldaddal w0, w1, [x2]",
            "swp x0, x1, [x2]",
            "ldclr x0, x1, [x2]",
            "stadd w0, [x1]",
            "add x0, x1, x2",
            "sub w3, w4, #1",
            "adds x5, x6, x7, lsl #3",
            "and x0, x1, #0xff",
            "orr w2, w3, w4",
            "eor x5, x6, x7",
            "mul x0, x1, x2",
            "madd x3, x4, x5, x6",
            "udiv w0, w1, w2",
            "lsl x0, x1, #4",
            "asr w2, w3, #1",
            "ubfx x0, x1, #4, #8",
            "movz x0, #0x1234",
            "movk x0, #0x5678, lsl #16",
            "movn w1, #0",
            "mov x0, sp",
            "mov sp, x1",
            "csel x0, x1, x2, eq",
            "csinc w3, w4, w5, ne",
            "ccmp x0, #3, #4, lt",
            "cmp x0, x1",
            "tst w2, #1",
            "ldr x0, [x1]",
            "ldr w2, [x3, #4]",
            "ldr x4, [x5, x6, lsl #3]",
            "ldr x7, [x8], #16",
            "ldr x9, [x10, #-8]!",
            "ldur x0, [x1, #-1]",
            "ldrb w0, [x1]",
            "ldrsh x2, [x3]",
            "ldp x0, x1, [sp]",
            "ldp x29, x30, [sp], #16",
            "stp x29, x30, [sp, #-16]!",
            "str q0, [x1]",
            "ldr q1, [x2, #32]",
            "st1 {v0.16b}, [x0]",
            "ld1 {v1.4s, v2.4s}, [x1]",
            "add v0.4s, v1.4s, v2.4s",
            "fmla v3.2d, v4.2d, v5.2d",
            "fadd d0, d1, d2",
            "fcvtzs x0, d1",
            "scvtf s0, w1",
            "fmov x0, d1",
            "dup v0.8b, w1",
            "addv s0, v1.4s",
            "aese v0.16b, v1.16b",
            "crc32x w0, w1, x2",
            "rev x0, x1",
            "clz w2, w3",
            "rbit x4, x5",
            "extr x0, x1, x2, #7",
            "irg x0, x1",
            "stg x0, [x1]",
            "sys #0, c7, c5, #0, x0",
        ]
        .map(String::from),
    );
    v
}

fn source(lines: &[String]) -> String {
    let mut s = String::from(".text\n.globl _start\n_start:\nback: nop\n");
    for l in lines {
        writeln!(s, "{l}").unwrap();
    }
    s.push_str("tgt: nop\n.balign 16\nlit: .quad 0x1122334455667788, 0\n");
    s.push_str(".skip 0x3000\nfar: nop\n");
    s
}

/// The class objdump's text implies: Ok(Some(target)) for PC-relative ones with a printed
/// address, Ok(None) for register branches, Err for refusals; "Step" as Ok(None) with step=true.
fn oracle(mnem: &str, ops: &str) -> Result<(&'static str, Option<u64>), Refusal> {
    let target = || {
        ops.split([',', ' '])
            .filter(|t| !t.is_empty())
            .find_map(|t| u64::from_str_radix(t, 16).ok().filter(|&a| a >= BASE))
    };
    let first = ops.split(',').next().unwrap_or("").trim();
    Ok(match mnem {
        "adr" => ("Adr", target()),
        "adrp" => ("Adrp", target()),
        "ldr" | "ldrsw" if !ops.contains('[') => {
            if first.starts_with(['x', 'w']) {
                ("LdrLiteral", target())
            } else {
                ("LdrLiteralSimd", target())
            }
        }
        "prfm" if !ops.contains('[') => ("PrfmLiteral", None),
        "b" | "bl" => ("Branch", target()),
        m if m.starts_with("b.") => ("BranchCond", target()),
        "cbz" | "cbnz" => ("CompareBranch", target()),
        "tbz" | "tbnz" => ("TestBranch", target()),
        "br" | "blr" | "ret" => ("BranchRegister", None),
        m if [
            "ldxr", "ldaxr", "stxr", "stlxr", "ldxp", "ldaxp", "stxp", "stlxp",
        ]
        .iter()
        .any(|p| m.starts_with(p)) =>
        {
            return Err(Refusal::Exclusive);
        }
        "svc" | "hvc" | "smc" | "brk" | "hlt" | "dcps1" | "dcps2" | "dcps3" => {
            return Err(Refusal::Exception);
        }
        "eret" | "eretaa" | "eretab" | "drps" => return Err(Refusal::ExceptionReturn),
        "msr" => return Err(Refusal::SystemRegisterWrite),
        "mrs" if ops.ends_with("daif") => return Err(Refusal::ReadsDaif),
        m if m.starts_with("braa")
            || m.starts_with("brab")
            || m.starts_with("blraa")
            || m.starts_with("blrab")
            || m == "retaa"
            || m == "retab" =>
        {
            return Err(Refusal::PointerAuthBranch);
        }
        "udf" => return Err(Refusal::Undefined),
        _ => ("Step", None),
    })
}

/// Our class and target for the word at `pc`.
fn ours(word: u32, pc: u64) -> Result<(&'static str, Option<u64>), Refusal> {
    let at = |o: i64| Some(pc.wrapping_add(o as u64));
    Ok(match classify_word(word)? {
        Class::Step => ("Step", None),
        Class::Simulate(p) => match p {
            PcRelative::Adr { offset, .. } => ("Adr", at(offset)),
            PcRelative::Adrp { offset, .. } => {
                ("Adrp", Some((pc & !0xFFF).wrapping_add(offset as u64)))
            }
            PcRelative::LdrLiteral { offset, .. } => ("LdrLiteral", at(offset)),
            PcRelative::LdrLiteralSimd { offset, .. } => ("LdrLiteralSimd", at(offset)),
            PcRelative::PrfmLiteral => ("PrfmLiteral", None),
            PcRelative::Branch { offset, .. } => ("Branch", at(offset)),
            PcRelative::BranchCond { offset, .. } => ("BranchCond", at(offset)),
            PcRelative::CompareBranch { offset, .. } => ("CompareBranch", at(offset)),
            PcRelative::TestBranch { offset, .. } => ("TestBranch", at(offset)),
            PcRelative::BranchRegister { .. } => ("BranchRegister", None),
        },
    })
}

#[test]
fn classifier_agrees_with_binutils() {
    let Some(t) = tools("classes") else { return };
    let lines = corpus();
    let dis = assemble(&t, "corpus", &source(&lines));
    // The first instruction is `back: nop`; then one per corpus line.
    assert!(dis.len() > lines.len());
    let mut simulated = 0;
    for (line, (pc, word, mnem, ops)) in lines.iter().zip(&dis[1..]) {
        let want = oracle(mnem, ops);
        let got = ours(*word, *pc);
        assert_eq!(got, want, "{line}: {word:08x} {mnem} {ops}");
        simulated += usize::from(matches!(got, Ok((k, _)) if k != "Step"));
    }
    assert!(lines.len() >= 300, "corpus has {} lines", lines.len());
    println!(
        "{} instructions agree with objdump ({simulated} simulated, with targets)",
        lines.len()
    );
}

#[test]
fn encoders_match_the_assembler() {
    let Some(t) = tools("enc") else { return };
    let dis = assemble(
        &t,
        "enc",
        "_start: b 1f\nbl 2f\nb _start\nbl _start\nbrk #0x5052\nnop\n1: nop\n.skip 0x100000\n2: nop\n",
    );
    for (pc, word, mnem, ops) in &dis[..6] {
        let target = ops
            .split_whitespace()
            .next()
            .and_then(|t| u64::from_str_radix(t, 16).ok());
        let ours = match mnem.as_str() {
            "b" => b(*pc, target.unwrap()),
            "bl" => bl(*pc, target.unwrap()),
            "brk" => Some(BREAKPOINT),
            "nop" => Some(NOP),
            m => panic!("unexpected {m}"),
        };
        assert_eq!(ours, Some(*word), "{mnem} {ops}");
    }
}

#[test]
fn cache_maintenance_text_assembles() {
    let Some(t) = tools("cache") else { return };
    // Exactly the strings the inline asm uses, with x0 for the register operand.
    let mut src = String::from("_start:\n");
    for s in asm_text::ALL {
        writeln!(src, "{}", s.replace("{addr}", "x0")).unwrap();
    }
    // And a whole sequence as `ops` produces it, with the line address in x1.
    let geo = CacheGeometry::from_ctr(0x8444_C004);
    for op in geo.ops(0x1000, 200) {
        let s = match op {
            Op::DcCvau(_) => asm_text::ALL[0],
            Op::DsbIsh => asm_text::ALL[1],
            Op::IcIvau(_) => asm_text::ALL[2],
            Op::Isb => asm_text::ALL[3],
        };
        writeln!(src, "{}", s.replace("{addr}", "x1")).unwrap();
    }
    let dis = assemble(&t, "cache", &src);
    let words: Vec<u32> = dis.iter().map(|d| d.1).collect();
    assert_eq!(
        &words[..5],
        &[
            0xD50B_7B20,
            0xD503_3B9F,
            0xD50B_7520,
            0xD503_3FDF,
            0xD53B_0020
        ],
        "dc cvau, dsb ish, ic ivau, isb, mrs ctr_el0"
    );
    // 200 bytes from 0x1000 in 64-byte lines: 4 cleans, dsb, 4 invalidates, dsb, isb.
    assert_eq!(words.len() - 5, 11);
    for w in &words {
        assert_eq!(classify_word(*w), Ok(Class::Step), "{w:#010x}");
    }
    println!("cache-maintenance asm assembled: {:08x?}", &words[..5]);
}

/// The trampoline builder's words equal what the assembler makes of the same sequence, written
/// out in assembly (the literal values and the branch back included).
#[test]
fn trampoline_matches_the_assembler() {
    use probe_arch_aarch64::trampoline::{FPSR_OFFSET, FRAME, V_OFFSET, build};
    let Some(t) = tools("tramp") else { return };
    let (entry, ctx, probed) = (0x1122_3344_5566_7788u64, 0x0BAD_F00D_u64, BASE + 0x1000);
    let word = 0x8B02_0020; // add x0, x1, x2
    let ours = build(BASE, entry, ctx, probed, word).unwrap();
    let mut src = format!("_start:\nsub sp, sp, #{FRAME}\n");
    for r in (0..30).step_by(2) {
        writeln!(src, "stp x{r}, x{}, [sp, #{}]", r + 1, r * 8).unwrap();
    }
    writeln!(
        src,
        "str x30, [sp, #240]\nadd x0, sp, #{FRAME}\nstr x0, [sp, #248]"
    )
    .unwrap();
    writeln!(src, "mrs x0, nzcv\nstr x0, [sp, #264]").unwrap();
    writeln!(src, "mrs x0, fpsr\nstr x0, [sp, #{FPSR_OFFSET}]").unwrap();
    writeln!(src, "mrs x0, fpcr\nstr x0, [sp, #{}]", FPSR_OFFSET + 8).unwrap();
    for q in (0..32).step_by(2) {
        writeln!(src, "stp q{q}, q{}, [sp, #{}]", q + 1, V_OFFSET + q * 16).unwrap();
    }
    writeln!(
        src,
        "mov x0, sp\nldr x1, 9f\nldr x2, 9f + 8\nldr x16, 9f + 16\nblr x16"
    )
    .unwrap();
    for q in (0..32).step_by(2) {
        writeln!(src, "ldp q{q}, q{}, [sp, #{}]", q + 1, V_OFFSET + q * 16).unwrap();
    }
    writeln!(src, "ldr x0, [sp, #{}]\nmsr fpcr, x0", FPSR_OFFSET + 8).unwrap();
    writeln!(src, "ldr x0, [sp, #{FPSR_OFFSET}]\nmsr fpsr, x0").unwrap();
    writeln!(src, "ldr x0, [sp, #264]\nmsr nzcv, x0").unwrap();
    for r in (0..30).step_by(2) {
        writeln!(src, "ldp x{r}, x{}, [sp, #{}]", r + 1, r * 8).unwrap();
    }
    writeln!(src, "ldr x30, [sp, #240]\nadd sp, sp, #{FRAME}").unwrap();
    writeln!(
        src,
        "add x0, x1, x2\nb back\n.p2align 3\n9: .quad {ctx:#x}, {BASE:#x}, {entry:#x}"
    )
    .unwrap();
    // The probed instruction and the one after it, where the branch back goes.
    writeln!(src, ".org 0x1000\nadd x0, x1, x2\nback: nop").unwrap();
    let e = t.dir.join("tramp.elf");
    let _ = assemble(&t, "tramp", &src);
    // The words, literals included, straight from the linked file's .text.
    let bin = t.dir.join("tramp.bin");
    run(Command::new("aarch64-linux-gnu-objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&e)
        .arg(&bin));
    let bytes = std::fs::read(&bin).unwrap();
    let theirs: Vec<u32> = bytes
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        ours.words(),
        &theirs[..ours.words().len()],
        "trampoline words differ from the assembler's"
    );
    assert_eq!(ours.words()[(ours.displaced - BASE) as usize / 4], word);
    println!(
        "trampoline: {} words agree with the assembler",
        ours.words().len()
    );
}

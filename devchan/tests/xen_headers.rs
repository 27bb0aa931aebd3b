//! Compares every size, offset and constant devchan defines with Xen's public headers
//! (Debian `libxen-dev`, installed by `ci/setup.sh`). Fails if one differs, or if the headers
//! are missing: a layout we cannot check is a layout we do not claim.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

#[test]
fn layouts_and_constants_match_xen_headers() {
    assert!(
        Path::new("/usr/include/xen/io/ring.h").exists(),
        "Xen's public headers are missing: run `bash ci/setup.sh` (installs libxen-dev)"
    );
    let checks = devchan::abi::all();
    assert!(checks.len() >= 290, "suspiciously few ABI checks: {}", checks.len());

    let mut c = String::from("#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n");
    for h in devchan::abi::HEADERS {
        writeln!(c, "#include <{h}>").unwrap();
    }
    // Xen's ring macros declare the ring types on demand; the ones the checks name.
    c.push_str("DEFINE_RING_TYPES(devchan_check, uint64_t, uint32_t);\n");
    c.push_str("int main(void) {\n");
    for chk in &checks {
        writeln!(c, "  printf(\"%lld\\n\", (long long)({}));", chk.c_expr).unwrap();
    }
    c.push_str("  return 0;\n}\n");

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("abi.c");
    let bin = dir.path().join("abi");
    std::fs::write(&src, &c).unwrap();
    let out = Command::new("cc")
        .args(["-std=gnu11", "-D__XEN_INTERFACE_VERSION__=0x00040e00", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "C check program failed to compile:\n{}\n--- program ---\n{c}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&bin).output().expect("run check program");
    assert!(run.status.success());
    let values: Vec<i128> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(values.len(), checks.len());

    let mismatches: Vec<String> = checks
        .iter()
        .zip(&values)
        .filter(|(chk, theirs)| chk.ours != **theirs)
        .map(|(chk, theirs)| format!("{}: Xen says {theirs}, we say {}", chk.c_expr, chk.ours))
        .collect();
    assert!(mismatches.is_empty(), "ABI mismatches:\n{}", mismatches.join("\n"));
    eprintln!("{} ABI checks against Xen's headers passed", checks.len());
}

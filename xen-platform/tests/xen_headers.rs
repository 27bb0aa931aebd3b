//! Compares every ioctl struct size, field offset and request number `xen_platform::sys`
//! defines with Linux's Xen UAPI headers (`/usr/include/xen/sys/*.h`, Debian `libxen-dev`), by
//! compiling and running a C program. Fails if one differs or the headers are missing.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

#[test]
fn ioctl_layouts_match_the_linux_xen_headers() {
    assert!(
        Path::new("/usr/include/xen/sys/gntdev.h").exists(),
        "Xen's headers are missing: run `bash ci/setup.sh` (installs libxen-dev)"
    );
    let checks = xen_platform::sys::abi_checks();
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n#include <sys/ioctl.h>\n\
         #include <xen/xen.h>\n",
    );
    for h in xen_platform::sys::HEADERS {
        writeln!(c, "#include <{h}>").unwrap();
    }
    c.push_str("int main(void) {\n");
    for chk in &checks {
        writeln!(
            c,
            "  printf(\"%llu\\n\", (unsigned long long)({}));",
            chk.c_expr
        )
        .unwrap();
    }
    c.push_str("  return 0;\n}\n");
    let dir = tempfile::tempdir().unwrap();
    let (src, bin) = (dir.path().join("abi.c"), dir.path().join("abi"));
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
    let run = Command::new(&bin).output().expect("run the check program");
    assert!(run.status.success());
    let values: Vec<u64> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(values.len(), checks.len());
    let bad: Vec<String> = checks
        .iter()
        .zip(&values)
        .filter(|(chk, theirs)| chk.ours != **theirs)
        .map(|(chk, theirs)| {
            format!(
                "{}: the header says {theirs}, we say {}",
                chk.c_expr, chk.ours
            )
        })
        .collect();
    assert!(bad.is_empty(), "ABI mismatches:\n{}", bad.join("\n"));
    eprintln!(
        "{} ioctl ABI checks against the Linux Xen headers passed",
        checks.len()
    );
}

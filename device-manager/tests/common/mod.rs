//! What the manager's tests and bench share: where the IDD and guest programs are.
//!
//! The IDD programs (and the network guest program) are other crates' binaries, which Cargo does not build for another
//! package's tests (`CARGO_BIN_EXE_*` covers only this package's binaries). It is built here,
//! with the Cargo that runs the tests, into the same target directory and profile, so the
//! tests never run a stale copy; then the manager finds it next to the test executable.

use std::path::PathBuf;
use std::process::Command;

/// Build `idd-blk` (a no-op when it is up to date) and return its path.
#[allow(dead_code)] // not every test uses every program
pub fn idd_program() -> PathBuf {
    program("idd-blk", "idd-blk")
}

/// Build binary `bin` of package `package` (a no-op when it is up to date) and return its
/// path.
#[allow(dead_code)]
pub fn program(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("test executable in target/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target directory");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("running cargo build");
    assert!(
        status.success(),
        "cargo build -p {package} --bin {bin} failed: {status}"
    );
    let path = profile_dir.join(bin);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Serve `svc`'s management API (no tokens, the default body limit) on a free local port:
/// the runtime that runs it (two workers) and the server (its URL in [`Server::url`]).
///
/// [`Server::url`]: device_manager::api::Server::url
#[allow(dead_code)]
pub fn serve_api(
    svc: &device_manager::service::Service,
) -> (tokio::runtime::Runtime, device_manager::api::Server) {
    use device_manager::api::{self, auth::Tokens, AppState, Listener};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let state = AppState {
        svc: svc.clone(),
        sysfs: "/sys".into(),
    };
    let router = api::router(
        state,
        std::sync::Arc::new(Tokens::none()),
        api::DEFAULT_BODY_LIMIT,
    );
    let l = Listener {
        addr: "127.0.0.1:0".parse().expect("address"),
        tls: None,
    };
    let server = rt.block_on(api::spawn(router, &l)).expect("API server");
    (rt, server)
}

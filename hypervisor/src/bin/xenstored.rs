//! `xenstored [SOCKET]`: serves a XenStore over a Unix socket, compatible with Xen's client
//! library and tools (`XENSTORED_PATH=SOCKET xenstore-ls`). Every socket client is domain 0.
//! Without an argument it uses the path the tools use: `$XENSTORED_PATH`, else
//! `$XENSTORED_RUNDIR/socket`, else `/var/run/xenstored/socket`.

use std::process::ExitCode;

use hypervisor::xenstored::socket::{default_path, SocketServer};
use hypervisor::xenstored::Xenstored;

fn usage() -> ExitCode {
    eprintln!("usage: xenstored [SOCKET_PATH]\n\nServes XenStore on SOCKET_PATH until killed.");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = match args.as_slice() {
        [] => default_path().to_string_lossy().into_owned(),
        [p] if !p.starts_with('-') => p.clone(),
        _ => return usage(),
    };
    let server = match SocketServer::bind(&path, Xenstored::new()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("xenstored: cannot bind {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("xenstored: serving {path}");
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xenstored: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `cargo run -p policy --example check -- FILE...`: validates policy files like `iddctl check`,
//! printing every problem (exit status 1) or a one-line summary per file.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut ok = true;
    for path in std::env::args().skip(1) {
        match policy::Policy::load(&path) {
            Ok(p) => println!(
                "{path}: ok ({} devices, {} guests)",
                p.devices.len(),
                p.guests.len()
            ),
            Err(policy::LoadError::Invalid(e)) => {
                ok = false;
                eprint!("{}", e.render());
            }
            Err(e) => {
                ok = false;
                eprintln!("{e}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

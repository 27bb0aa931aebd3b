//! `iddctl xen serve`: from the policy to supervised backends, in a Xen backend domain.
//!
//! 1. Load and validate the policy; plan one backend per device of each `kind = "xen"` guest
//!    ([`super::plan`]); check that each backend's program is in the bin dir.
//! 2. Connect to XenStore (`/dev/xen/xenbus` or xenstored's socket), read our own domain id,
//!    and find each guest's domain id by its name, waiting for domains that do not exist yet
//!    (the toolstack may still be creating them: `xl create -p`).
//! 3. For each device: create a disk's image at its size if it is missing, write both
//!    XenStore directories ([`super::toolstack`]), and add the backend to the
//!    [`Supervisor`] with its memory file in the run dir (a tmpfs: the journal must not
//!    outlive the host, only the process) and its own event-channel file.
//!
//! The caller then runs the supervisor until SIGTERM.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devchan::grant::DomId;
use policy::{LoadError, Policy};
use xen_platform::xenstore::{XenStore, XenStoreError};

use super::plan::{plan, BackendKind, PlanError};
use super::supervisor::{BackendSpec, Budget, Supervisor, SupervisorError};
use super::toolstack::{self, ToolstackError};

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The policy does not load.
    #[error(transparent)]
    Policy(#[from] LoadError),
    /// The policy cannot be served on Xen.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// No Xen guest has a device.
    #[error("the policy has no kind = \"xen\" guest with a disk or NIC: nothing to serve")]
    Nothing,
    /// A backend program is missing.
    #[error("{program} not found in {dir} (pass --bin-dir)")]
    Program {
        /// The program.
        program: &'static str,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// XenStore could not be reached.
    #[error("XenStore at {path}")]
    XenStore {
        /// The socket or device.
        path: PathBuf,
        /// Why.
        #[source]
        source: XenStoreError,
    },
    /// The toolstack failed.
    #[error(transparent)]
    Toolstack(#[from] ToolstackError),
    /// A domain did not appear.
    #[error("no Xen domain named {name} within {secs} s (XenStore /local/domain/*/name)")]
    NoDomain {
        /// Its name.
        name: String,
        /// How long we waited.
        secs: u64,
    },
    /// A file could not be made.
    #[error("{what} {path}")]
    File {
        /// What it is.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A backend could not be added.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

/// Where everything is.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The policy file.
    pub policy: PathBuf,
    /// Where `xen-blkback` and `xen-netback` are.
    pub bin_dir: PathBuf,
    /// The tmpfs directory for the memory files and the backends' stderr logs.
    pub run_dir: PathBuf,
    /// XenStore: `/dev/xen/xenbus` or xenstored's socket (also passed to the backends).
    pub xenstore: PathBuf,
    /// The event-channel device (`/dev/xen/evtchn`).
    pub evtchn: PathBuf,
    /// How long to wait for a guest's domain to appear.
    pub wait_domain: Duration,
}

/// Poll XenStore every 100 ms until `name` has a domain id, or `wait` is over.
fn wait_for_domain(xs_path: &Path, name: &str, wait: Duration) -> Result<DomId, ServeError> {
    let mut c = toolstack::lookup_client(xs_path)?;
    // A wait too long for an Instant (`--wait-domain` is any u64) is no limit, not a panic.
    let end = Instant::now().checked_add(wait);
    loop {
        if let Some(id) = toolstack::find_domain(&mut c, name)? {
            return Ok(id);
        }
        if end.is_some_and(|end| Instant::now() >= end) {
            return Err(ServeError::NoDomain {
                name: name.to_owned(),
                secs: wait.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Create `image` at `size` bytes if it does not exist (sparse); an existing one is kept.
fn ensure_image(image: &Path, size: u64) -> Result<(), ServeError> {
    let err = |source| ServeError::File {
        what: "disk image",
        path: image.to_owned(),
        source,
    };
    match OpenOptions::new().write(true).create_new(true).open(image) {
        Ok(f) => f.set_len(size).map_err(err),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Steps 1–3; each step's outcome is passed to `say` as one line. Returns the supervisor,
/// ready to run.
pub fn prepare(o: &ServeOptions, say: &mut impl FnMut(String)) -> Result<Supervisor, ServeError> {
    let policy = Policy::load(&o.policy)?;
    let plans = plan(&policy)?;
    if plans.is_empty() {
        return Err(ServeError::Nothing);
    }
    for p in &plans {
        if !o.bin_dir.join(p.program()).is_file() {
            return Err(ServeError::Program {
                program: p.program(),
                dir: o.bin_dir.clone(),
            });
        }
    }
    std::fs::create_dir_all(&o.run_dir).map_err(|source| ServeError::File {
        what: "run dir",
        path: o.run_dir.clone(),
        source,
    })?;
    let mut xs = XenStore::open(&o.xenstore).map_err(|source| ServeError::XenStore {
        path: o.xenstore.clone(),
        source,
    })?;
    let back = toolstack::own_domid(&mut xs);
    let mut domids: HashMap<String, DomId> = HashMap::new();
    let mut sup = Supervisor::new(Some(o.run_dir.clone()));
    for p in &plans {
        let front = match domids.get(&p.domain) {
            Some(d) => *d,
            None => {
                let d = wait_for_domain(&o.xenstore, &p.domain, o.wait_domain)?;
                say(format!(
                    "domain {} is {d} (guest {}; we are domain {back})",
                    p.domain, p.guest
                ));
                domids.insert(p.domain.clone(), d);
                d
            }
        };
        let (dirs, written) = match &p.kind {
            BackendKind::Vbd {
                devid,
                image,
                size,
                read_only,
            } => {
                ensure_image(image, *size)?;
                let (v, w) = toolstack::write_vbd(&mut xs, back, front, *devid, *read_only)?;
                ((v.front, v.back), w)
            }
            BackendKind::Vif { handle, mac, .. } => {
                let (v, w) = toolstack::write_vif(&mut xs, back, front, *handle, *mac)?;
                ((v.front, v.back), w)
            }
        };
        say(format!(
            "nodes {} {} and {} ({})",
            p.name(),
            dirs.0,
            dirs.1,
            if written {
                "written"
            } else {
                "existing, left alone"
            }
        ));
        let memory = p.memory_file(&o.run_dir);
        sup.add(BackendSpec {
            name: p.name(),
            program: o.bin_dir.join(p.program()),
            args: p.args(front, &memory, &o.xenstore),
            evtchn: o.evtchn.clone(),
            memory: Some(memory),
            budget: Budget::from_policy(&p.restart),
        })?;
    }
    Ok(sup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_created_sparse_and_kept() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("d.img");
        ensure_image(&img, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
        std::fs::write(&img, b"data").unwrap();
        ensure_image(&img, 1 << 20).unwrap();
        assert_eq!(std::fs::read(&img).unwrap(), b"data");
        assert!(ensure_image(&t.path().join("no/such/dir.img"), 1).is_err());
    }
}

//! Event channels through `/dev/xen/evtchn`.
//!
//! Ports are bound per open file of the device: the bind ioctls return the new local port,
//! `IOCTL_EVTCHN_NOTIFY` signals the remote end, `read` returns delivered ports as native `u32`s
//! (each delivered port is masked by the kernel until its number is `write`n back, which is
//! the unmask), and closing the file unbinds every port it bound.
//!
//! That last point decides how a backend survives its own restart: a port bound on a file
//! that a *supervisor* keeps open (and passes to each backend process, [`Evtchn::from_fd`])
//! stays bound, with the same number, across backend processes; events raised meanwhile wait
//! in the file's queue. A backend that opened the device itself loses its ports when it dies
//! (the frontend's end goes back to unbound and can be bound again).

use devchan::grant::DomId;
use devchan::platform::Port;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use crate::sys::{
    EvtchnBindInterdomain, EvtchnBindUnboundPort, EvtchnPort, IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_BIND_UNBOUND_PORT, IOCTL_EVTCHN_NOTIFY, IOCTL_EVTCHN_UNBIND,
};

/// Why an event-channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvtchnError {
    /// The device could not be opened.
    #[error("Opening {path}")]
    Open {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An ioctl, read, write or poll failed.
    #[error("{0}")]
    Op(&'static str, #[source] io::Error),
}

/// An open `/dev/xen/evtchn`.
#[derive(Debug)]
pub struct Evtchn {
    file: File,
}

fn ioctl<T>(
    file: &File,
    req: libc::c_ulong,
    arg: &mut T,
    what: &'static str,
) -> Result<i32, EvtchnError> {
    // SAFETY: every caller passes the struct whose size the request number encodes (checked
    // against the header); it lives across the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, std::ptr::from_mut(arg)) };
    if r < 0 {
        Err(EvtchnError::Op(what, io::Error::last_os_error()))
    } else {
        Ok(r)
    }
}

fn port_of(r: i32) -> Port {
    // ioctl succeeded: r >= 0.
    Port::try_from(r).unwrap_or(0)
}

impl Evtchn {
    /// Open the device at `path` (normally `/dev/xen/evtchn`).
    pub fn open(path: &Path) -> Result<Self, EvtchnError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| EvtchnError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self { file })
    }

    /// Use an already open event-channel file inherited as descriptor `fd` (kept open by a
    /// supervisor so that ports outlive this process).
    ///
    /// # Safety
    ///
    /// `fd` must be an open descriptor of `/dev/xen/evtchn` that nothing else in this process
    /// owns; the returned value owns it.
    pub unsafe fn from_fd(fd: RawFd) -> Self {
        // SAFETY: the caller's contract.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Self {
            file: File::from(owned),
        }
    }

    /// Bind a local port to `remote`'s port `remote_port`.
    pub fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port, EvtchnError> {
        let mut a = EvtchnBindInterdomain {
            remote_domain: u32::from(remote),
            remote_port,
        };
        ioctl(
            &self.file,
            IOCTL_EVTCHN_BIND_INTERDOMAIN,
            &mut a,
            "IOCTL_EVTCHN_BIND_INTERDOMAIN",
        )
        .map(port_of)
    }

    /// Allocate a port `remote` may bind to.
    pub fn bind_unbound(&self, remote: DomId) -> Result<Port, EvtchnError> {
        let mut a = EvtchnBindUnboundPort {
            remote_domain: u32::from(remote),
        };
        ioctl(
            &self.file,
            IOCTL_EVTCHN_BIND_UNBOUND_PORT,
            &mut a,
            "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
        )
        .map(port_of)
    }

    /// Notify the remote end of `port`.
    pub fn notify(&self, port: Port) -> Result<(), EvtchnError> {
        ioctl(
            &self.file,
            IOCTL_EVTCHN_NOTIFY,
            &mut EvtchnPort { port },
            "IOCTL_EVTCHN_NOTIFY",
        )
        .map(|_| ())
    }

    /// Unbind `port`.
    pub fn unbind(&self, port: Port) -> Result<(), EvtchnError> {
        ioctl(
            &self.file,
            IOCTL_EVTCHN_UNBIND,
            &mut EvtchnPort { port },
            "IOCTL_EVTCHN_UNBIND",
        )
        .map(|_| ())
    }

    /// Unmask `port` (write its number back).
    pub fn unmask(&self, port: Port) -> Result<(), EvtchnError> {
        (&self.file)
            .write_all(&port.to_ne_bytes())
            .map_err(|e| EvtchnError::Op("unmask (write)", e))
    }

    /// Wait until a port is delivered (or `timeout`), then return the delivered ports.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Vec<Port>, EvtchnError> {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(Vec::new());
            }
            return Err(EvtchnError::Op("poll", e));
        }
        if n == 0 || pfd.revents & libc::POLLIN == 0 {
            return Ok(Vec::new());
        }
        let mut buf = [0u8; 4 * 64];
        let got = (&self.file)
            .read(&mut buf)
            .map_err(|e| EvtchnError::Op("read", e))?;
        Ok(parse_ports(&buf[..got]))
    }
}

/// The event-channel file's descriptor, to sleep on in `poll(2)` (readable: an event is
/// pending) without reading it.
impl AsRawFd for Evtchn {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The ports in a `read` result (native-endian `u32`s; a trailing partial one is dropped).
pub fn parse_ports(bytes: &[u8]) -> Vec<Port> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_ports_takes_whole_words(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let ports = parse_ports(&bytes);
            prop_assert_eq!(ports.len(), bytes.len() / 4);
            for (i, p) in ports.iter().enumerate() {
                prop_assert_eq!(p.to_ne_bytes().to_vec(), bytes[4 * i..4 * i + 4].to_vec());
            }
        }
    }

    #[test]
    fn on_xen_an_unbound_port_round_trips() {
        let Ok(e) = Evtchn::open(Path::new("/dev/xen/evtchn")) else {
            eprintln!("SKIP: no /dev/xen/evtchn (not a Xen domain)");
            return;
        };
        // A port for ourselves (domain 0 in dom0): bind both ends and signal one.
        let a = e.bind_unbound(0).unwrap();
        let b = e.bind_interdomain(0, a).unwrap();
        e.notify(b).unwrap();
        // Xen marks a freshly bound interdomain port pending (an event sent before the bind
        // is not lost), so `b` may be delivered too; `a` must be.
        let mut got = Vec::new();
        for _ in 0..5 {
            got.extend(e.wait(Some(Duration::from_secs(2))).unwrap());
            if got.contains(&a) {
                break;
            }
        }
        assert!(got.contains(&a), "{got:?}");
        assert!(got.iter().all(|p| *p == a || *p == b), "{got:?}");
        e.unmask(a).unwrap();
        e.unbind(b).unwrap();
        e.unbind(a).unwrap();
    }
}

//! A TAP interface in a network namespace: the guest's netfront seen by the Linux network
//! stack of that namespace, so `ping`, `iperf3` and plain sockets there run over our path.
//!
//! # Setting up (root, before the sandbox)
//!
//! [`Tap::open_in_netns`]:
//! 1. opens `/proc/thread-self/ns/net` (where we are) and `/var/run/netns/NS` (the namespace
//!    `ip netns add NS` made);
//! 2. `setns(NS)` for the calling thread, opens `/dev/net/tun` and `TUNSETIFF` with
//!    `IFF_TAP | IFF_NO_PI` (the interface is created in the thread's namespace, and stays
//!    there), then `setns` back: only the descriptor stays with us, and a TAP descriptor keeps
//!    working from any namespace;
//! 3. configures the interface from outside with `ip -n NS`: the MAC is netfront's (so the
//!    stack's frames carry the source address the backend's anti-spoofing allows), the
//!    optional IPv4 address, and up. IPv6 is switched off on it (`sysctl` in the namespace)
//!    so the stack does not send router solicitations and DAD probes the test did not ask for.
//!
//! The descriptor is non-blocking: [`Tap::recv`] returns `None` when no frame waits, so one
//! thread can alternate between the TAP and netfront's event channel (the sandbox allows
//! `read`, `write` and `ppoll` on descriptors it keeps, and no new threads).
//!
//! With `IFF_NO_PI` every `read` is one whole Ethernet frame (no FCS), every `write` sends one.
//! No crate wraps TUN/TAP setup in a maintained, small form, and the two ioctls are short
//! blocks here (as in `iospace`'s TAP wire).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

/// Setting up the TAP failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// An interface or namespace name that is not a plain short name.
    #[error("Bad name {0:?}: 1 to 15 characters of [A-Za-z0-9_.-]")]
    BadName(String),
    /// A namespace or device file could not be opened.
    #[error("Opening {path} failed")]
    Open {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Entering or leaving the namespace failed.
    #[error("setns failed")]
    Setns(#[source] io::Error),
    /// `TUNSETIFF` failed.
    #[error("TUNSETIFF on {0} failed")]
    Tunsetiff(String, #[source] io::Error),
    /// An `ip` or `sysctl` command failed.
    #[error("Command `{0}` failed: {1}")]
    Command(String, String),
}

/// A TAP interface's descriptor.
#[derive(Debug)]
pub struct Tap {
    file: File,
    ifname: String,
}

/// A name `ip` accepts for an interface or namespace, and that cannot escape a path.
fn check_name(name: &str) -> Result<(), TapError> {
    let ok = (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_owned()))
    }
}

fn open(path: &str) -> Result<File, TapError> {
    File::open(path).map_err(|source| TapError::Open {
        path: path.to_owned(),
        source,
    })
}

fn run(cmd: &str, args: &[&str]) -> Result<(), TapError> {
    let line = format!("{cmd} {}", args.join(" "));
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| TapError::Command(line.clone(), e.to_string()))?;
    if !out.status.success() {
        return Err(TapError::Command(
            line,
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// Create TAP `ifname` in the current namespace of this thread.
fn create(ifname: &str) -> Result<File, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|source| TapError::Open {
            path: "/dev/net/tun".into(),
            source,
        })?;
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers and
    // addresses), for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // check_name: at most 15 ASCII bytes, so the name and its NUL fit the 16-byte array.
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // IFF_TAP | IFF_NO_PI = 0x1002 fits a c_short.
    #[allow(clippy::cast_possible_truncation)]
    {
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    }
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is and which outlives the
    // call; the descriptor is the open tun device.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(TapError::Tunsetiff(
            ifname.to_owned(),
            io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

impl Tap {
    /// Create TAP `ifname` in namespace `netns` with `mac` and optionally `cidr`
    /// (`10.0.0.2/24`), up; see the module docs. Root only; call before the sandbox.
    pub fn open_in_netns(
        netns: &str,
        ifname: &str,
        mac: [u8; 6],
        cidr: Option<&str>,
    ) -> Result<Self, TapError> {
        check_name(netns)?;
        check_name(ifname)?;
        let home = open("/proc/thread-self/ns/net")?;
        let target = open(&format!("/var/run/netns/{netns}"))?;
        move_into_link_name_space(target.as_fd(), Some(LinkNameSpaceType::Network))
            .map_err(|e| TapError::Setns(e.into()))?;
        let created = create(ifname);
        // Back home whatever happened; failing that, this thread is in the wrong namespace
        // for good, so report it above anything else.
        move_into_link_name_space(home.as_fd(), Some(LinkNameSpaceType::Network))
            .map_err(|e| TapError::Setns(e.into()))?;
        let file = created?;
        let mac = crate::netfront::format_mac(&mac);
        // IPv6 off first, so no router solicitation goes out when the link comes up.
        let _ = run(
            "ip",
            &[
                "netns",
                "exec",
                netns,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{ifname}.disable_ipv6=1"),
            ],
        );
        run(
            "ip",
            &["-n", netns, "link", "set", "dev", ifname, "address", &mac],
        )?;
        if let Some(cidr) = cidr {
            run("ip", &["-n", netns, "addr", "replace", cidr, "dev", ifname])?;
        }
        run("ip", &["-n", netns, "link", "set", "dev", ifname, "up"])?;
        Ok(Self {
            file,
            ifname: ifname.to_owned(),
        })
    }

    /// The interface's name (in its namespace).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The next frame the namespace's stack sent, if one waits.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Hand `frame` to the namespace's stack.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write_all(frame)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["ns1", "guest-a", "tap_0.1", "abcdefghijklmno"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "abcdefghijklmnop", "a b", "x\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    /// Root only: a TAP in a fresh namespace carries a frame from the namespace's stack.
    #[test]
    fn tap_in_a_namespace_sees_the_stack_s_frames() {
        if !rustix::process::geteuid().is_root() || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("SKIP: needs root and /dev/net/tun");
            return;
        }
        let ns = format!("nftap{}", std::process::id() % 100_000);
        if run("ip", &["netns", "add", &ns]).is_err() {
            eprintln!("SKIP: ip netns add failed");
            return;
        }
        let mac = [2, 0, 0, 0, 0x42, 1];
        let r = (|| {
            let mut tap = Tap::open_in_netns(&ns, "nf0", mac, Some("10.9.0.2/24"))?;
            // The stack ARPs for a neighbour on the link: the request comes out of our fd,
            // from netfront's MAC.
            // (A UDP datagram from bash: no ping needed.)
            let _ = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "bash",
                    "-c",
                    "echo x > /dev/udp/10.9.0.9/9",
                ])
                .output();
            let mut buf = [0u8; 2048];
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let mut seen = false;
            while !seen && std::time::Instant::now() < deadline {
                match tap.recv(&mut buf) {
                    Ok(Some(n)) => seen = n >= 14 && buf[6..12] == mac && buf[12..14] == [8, 6],
                    Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
                    Err(e) => return Err(TapError::Command("read".into(), e.to_string())),
                }
            }
            Ok::<bool, TapError>(seen)
        })();
        let _ = run("ip", &["netns", "del", &ns]);
        assert!(
            r.unwrap(),
            "an ARP request from our MAC came out of the TAP"
        );
    }
}

//! The emulated NIC's wire: where the frames a virtio-net device sends go, and where the
//! frames it receives come from.
//!
//! # UDP (unprivileged, the default)
//!
//! One datagram carries exactly one Ethernet frame: destination MAC first, no preamble, no
//! FCS, no extra header. The socket is bound to `bind` (port 0 picks one; [`UdpWire::local_addr`]
//! tells which). Frames are sent to `peer`; without one, to the address the last frame came
//! from (so a far side that speaks first is answered, as a hub would), and dropped with
//! `NotConnected` until some frame arrived. Any sender may inject frames: the wire is as
//! untrusted as a real cable, which is why the device bounds every frame it receives.
//!
//! # TAP (root)
//!
//! `/dev/net/tun` with `IFF_TAP | IFF_NO_PI` and `TUNSETIFF`: every `read` is one Ethernet
//! frame the host stack sent out of the interface, every `write` one frame the host receives.
//! `TUNSETIFF` creates the interface when it does not exist (it needs `CAP_NET_ADMIN`); we
//! then set it `IFF_UP` with `SIOCSIFFLAGS` on a datagram socket so frames flow at once.
//!
//! The two ioctls are called through `libc` directly: no maintained crate in the workspace
//! wraps TUN/TAP, `rustix` has no `ifreq` ioctls, and the calls are two small blocks.
//!
//! # Blocking
//!
//! Both file descriptors are non-blocking; [`Wire::recv`] waits with `poll(2)` (via `rustix`)
//! up to its timeout, so the device's receive thread can notice a shutdown. A send that finds
//! the socket buffer full waits briefly for room, then drops the frame (a wire loses frames
//! under overload; it does not block the transmit queue forever). [`Wire::shut_down`] wakes a
//! waiting receive at once (an eventfd polled beside the wire), so a device being dropped
//! joins its receive thread without waiting out the timeout.

use super::EmuError;
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest frame a wire carries (a UDP datagram's payload limit; TAP frames are far smaller).
pub const MAX_WIRE_FRAME: usize = 65_507;
/// How long a send waits for socket-buffer room before dropping the frame.
const SEND_WAIT: Duration = Duration::from_millis(50);

/// Which wire to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireConfig {
    /// A UDP socket: one datagram per frame.
    Udp {
        /// Local address (port 0: any free port).
        bind: SocketAddr,
        /// Where frames go; `None`: to the last sender.
        peer: Option<SocketAddr>,
    },
    /// A TAP interface (created and brought up if missing; needs root).
    Tap {
        /// Interface name (at most 15 bytes).
        ifname: String,
    },
}

/// A full-duplex frame pipe.
pub trait Wire: Send + Sync {
    /// Put one frame on the wire.
    fn send(&self, frame: &[u8]) -> io::Result<()>;
    /// Take one frame into `buf` (truncated to its length): `Ok(None)` when none arrived
    /// within `timeout` (`None`: wait indefinitely).
    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>>;
    /// One line saying what the wire is (for logs and status).
    fn describe(&self) -> String;
    /// The local socket address frames are received on, for a UDP wire (so whoever opened
    /// it with port 0 can tell the far side where to send); `None` for other wires.
    fn bound_addr(&self) -> Option<SocketAddr> {
        None
    }
    /// Wake a [`Wire::recv`] in progress and make every later one return `Ok(None)` at once
    /// (the device calls it when it is dropped, so its receive thread ends promptly).
    fn shut_down(&self) {}
}

/// Open the wire `cfg` describes.
pub fn open(cfg: &WireConfig) -> Result<Arc<dyn Wire>, EmuError> {
    Ok(match cfg {
        WireConfig::Udp { bind, peer } => Arc::new(UdpWire::bind(*bind, *peer)?),
        WireConfig::Tap { ifname } => Arc::new(TapWire::open(ifname)?),
    })
}

/// Wait until `fd` is ready for `flags` or `timeout` passes; true when ready. When `stop`
/// is given and becomes readable first, false.
fn wait_ready(
    fd: impl AsFd,
    flags: PollFlags,
    timeout: Option<Duration>,
    stop: Option<&Stop>,
) -> io::Result<bool> {
    let ts = timeout.map(|t| Timespec {
        tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    let mut fds = vec![PollFd::new(&fd, flags)];
    if let Some(s) = stop {
        fds.push(PollFd::new(&s.0, PollFlags::IN));
    }
    loop {
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(_) if fds.get(1).is_some_and(|s| !s.revents().is_empty()) => return Ok(false),
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A sticky shutdown flag a `poll` can wait on (an eventfd that is written once and never
/// drained).
struct Stop(OwnedFd);

impl Stop {
    fn new() -> io::Result<Self> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self(fd))
    }

    fn trigger(&self) {
        // A full counter is still readable: nothing to handle on failure.
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }
}

/// Run a non-blocking send; on a full buffer wait a little for room and try once more.
fn send_with_room(fd: impl AsFd, mut send: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    match send() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if wait_ready(fd, PollFlags::OUT, Some(SEND_WAIT), None)? {
                send()
            } else {
                Err(e)
            }
        }
        r => r,
    }
}

/// A UDP socket as a wire.
pub struct UdpWire {
    sock: UdpSocket,
    stop: Stop,
    peer: Option<SocketAddr>,
    last_sender: Mutex<Option<SocketAddr>>,
}

impl UdpWire {
    /// Bind to `bind`; frames go to `peer`, or to the last sender when `None`.
    pub fn bind(bind: SocketAddr, peer: Option<SocketAddr>) -> Result<Self, EmuError> {
        let sock = UdpSocket::bind(bind).map_err(EmuError::Wire)?;
        sock.set_nonblocking(true).map_err(EmuError::Wire)?;
        Ok(Self {
            sock,
            peer,
            last_sender: Mutex::new(None),
            stop: Stop::new().map_err(EmuError::Wire)?,
        })
    }

    /// The bound address (with the port picked when `bind` said 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
}

impl Wire for UdpWire {
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        let to = match self.peer {
            Some(p) => p,
            None => (*super::lock(&self.last_sender))
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?,
        };
        send_with_room(&self.sock, || self.sock.send_to(frame, to).map(|_| ()))
    }

    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>> {
        if !wait_ready(&self.sock, PollFlags::IN, timeout, Some(&self.stop))? {
            return Ok(None);
        }
        match self.sock.recv_from(buf) {
            Ok((n, from)) => {
                *super::lock(&self.last_sender) = Some(from);
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn describe(&self) -> String {
        let local = self
            .local_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        match self.peer {
            Some(p) => format!("udp {local} -> {p}"),
            None => format!("udp {local} -> last sender"),
        }
    }

    fn bound_addr(&self) -> Option<SocketAddr> {
        self.local_addr().ok()
    }

    fn shut_down(&self) {
        self.stop.trigger();
    }
}

/// A TAP interface as a wire.
pub struct TapWire {
    file: File,
    stop: Stop,
    ifname: String,
}

/// An `ifreq` naming `ifname` (validated: 1..=15 bytes, no NUL or `/`).
fn ifreq(ifname: &str) -> Result<libc::ifreq, EmuError> {
    let b = ifname.as_bytes();
    if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.iter().any(|c| *c == 0 || *c == b'/') {
        return Err(EmuError::Config("interface name must be 1 to 15 bytes"));
    }
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers and
    // addresses) for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    Ok(req)
}

impl TapWire {
    /// Attach to (creating if needed) TAP interface `ifname` and set it up.
    pub fn open(ifname: &str) -> Result<Self, EmuError> {
        let mut req = ifreq(ifname)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(EmuError::Wire)?;
        // IFF_TAP | IFF_NO_PI = 0x1002 fits a c_short.
        #[allow(clippy::cast_possible_truncation)]
        {
            req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        }
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is and which outlives
        // the call; the descriptor is the open tun device.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(EmuError::Wire(io::Error::last_os_error()));
        }
        set_up(ifname)?;
        Ok(Self {
            file,
            ifname: ifname.to_string(),
            stop: Stop::new().map_err(EmuError::Wire)?,
        })
    }
}

/// Set `IFF_UP` on `ifname` (a no-op when already up).
fn set_up(ifname: &str) -> Result<(), EmuError> {
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(EmuError::Wire)?;
    let mut req = ifreq(ifname)?;
    // SAFETY: SIOCGIFFLAGS fills the flags of the `ifreq` `req` points to; the socket is
    // open for the call's duration.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(EmuError::Wire(io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFFLAGS just wrote the `ifru_flags` member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    // IFF_UP (1) fits a c_short.
    #[allow(clippy::cast_possible_truncation)]
    let up = libc::IFF_UP as libc::c_short;
    if flags & up != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: SIOCSIFFLAGS reads the name and flags of `req`, valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(EmuError::Wire(io::Error::last_os_error()));
    }
    Ok(())
}

impl Wire for TapWire {
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        send_with_room(&self.file, || (&self.file).write(frame).map(|_| ()))
    }

    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>> {
        if !wait_ready(&self.file, PollFlags::IN, timeout, Some(&self.stop))? {
            return Ok(None);
        }
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn describe(&self) -> String {
        format!("tap {}", self.ifname)
    }

    fn shut_down(&self) {
        self.stop.trigger();
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test patterns
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn udp_round_trip_with_and_without_a_peer() {
        let far = UdpSocket::bind(loopback()).unwrap();
        far.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // No peer: nothing to send to until someone speaks.
        let w = UdpWire::bind(loopback(), None).unwrap();
        assert_eq!(
            w.send(b"early").unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        let mut buf = [0u8; 2048];
        assert_eq!(w.recv(&mut buf, Some(Duration::ZERO)).unwrap(), None);
        let frame: Vec<u8> = (0..1514u32).map(|i| (i * 7) as u8).collect();
        far.send_to(&frame, w.local_addr().unwrap()).unwrap();
        let n = w.recv(&mut buf, None).unwrap().unwrap();
        assert_eq!(&buf[..n], &frame[..]);
        // The answer goes back to the last sender, byte for byte, one datagram per frame.
        w.send(&frame[..60]).unwrap();
        w.send(&frame[..1514]).unwrap();
        let mut got = [0u8; 2048];
        let (n, from) = far.recv_from(&mut got).unwrap();
        assert_eq!((&got[..n], from), (&frame[..60], w.local_addr().unwrap()));
        let n = far.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &frame[..]);
        // With a peer, frames go there regardless of who sent last.
        let w2 = open(&WireConfig::Udp {
            bind: loopback(),
            peer: Some(far.local_addr().unwrap()),
        })
        .unwrap();
        w2.send(b"to the peer").unwrap();
        assert_eq!(
            w2.bound_addr().unwrap().ip(),
            far.local_addr().unwrap().ip()
        );
        // After shut_down, even an unbounded receive returns at once, with nothing.
        w.shut_down();
        assert_eq!(w.recv(&mut buf, None).unwrap(), None);
        assert_ne!(w2.bound_addr().unwrap().port(), 0);
        let n = far.recv(&mut got).unwrap();
        assert_eq!(&got[..n], b"to the peer");
        assert!(w2.describe().starts_with("udp 127.0.0.1:"));
    }

    #[test]
    fn bad_interface_names_are_refused() {
        for name in ["", "a/b", "sixteen-bytes-xx", "nul\0"] {
            assert!(matches!(TapWire::open(name), Err(EmuError::Config(_))));
        }
    }

    /// An `AF_PACKET` socket on `ifname`: the host's side of the TAP.
    fn packet_socket(ifname: &str) -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        let proto = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `name` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0);
        // SAFETY: all-zero is a valid `sockaddr_ll`.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        sll.sll_protocol = proto;
        sll.sll_ifindex = i32::try_from(index).unwrap();
        // SAFETY: `sll` is a `sockaddr_ll` of the length passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(sll).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO takes a `timeval` of the length passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                u32::try_from(std::mem::size_of::<libc::timeval>()).unwrap(),
            )
        };
        assert_eq!(rc, 0);
        fd
    }

    #[test]
    fn tap_round_trip_when_root() {
        if !rustix::process::geteuid().is_root() || !std::path::Path::new("/dev/net/tun").exists() {
            println!("SKIP: TAP needs root and /dev/net/tun");
            return;
        }
        let ifname = format!("vnt{}", std::process::id() % 100_000);
        let w = open(&WireConfig::Tap {
            ifname: ifname.clone(),
        })
        .unwrap();
        assert_eq!(w.describe(), format!("tap {ifname}"));
        assert_eq!(w.bound_addr(), None);
        let pkt = packet_socket(&ifname);
        // A frame with a local experimental EtherType (0x88b5) so host chatter is told apart.
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x0b, 0x02, 0, 0, 0, 0, 0x0a, 0x88, 0xb5];
        frame.extend((0..100u8).map(|i| i ^ 0x5a));
        // Wire → host: the packet socket sees it arrive on the interface.
        w.send(&frame).unwrap();
        let mut buf = [0u8; 2048];
        let found = (0..100).any(|_| {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(pkt.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            n > 0 && buf[..usize::try_from(n).unwrap()] == frame[..]
        });
        assert!(found, "the frame did not reach the host side");
        // Host → wire: a frame sent on the interface is read from the TAP.
        frame[13] = 0xb6;
        // SAFETY: `frame` is readable for its length.
        let n = unsafe { libc::send(pkt.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(usize::try_from(n).unwrap(), frame.len());
        let found = (0..100).any(|_| {
            matches!(w.recv(&mut buf, Some(Duration::from_secs(5))),
                Ok(Some(n)) if buf[..n] == frame[..])
        });
        assert!(found, "the frame did not come out of the TAP");
    }
}

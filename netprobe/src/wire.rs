//! The wire's far side: where the tools send and receive Ethernet frames.
//!
//! An emulated NIC (`iospace::emu::wire`) has two kinds of wire, and the tools speak both:
//!
//! * **UDP** (unprivileged): one datagram is one Ethernet frame, no FCS, no extra header. The
//!   device's wire is a UDP socket; ours is another. `udp:BIND->PEER` binds `BIND` and sends
//!   every frame to `PEER` (the device's address); `udp:BIND` sends to the address the last
//!   frame came from (a receiver such as `count`, or a peer the device was told about). The
//!   separator `,` may stand for `->` where a shell would read `>` as a redirection.
//! * **TAP** (root): the device's wire is a TAP interface `IFNAME` (`IFF_TAP | IFF_NO_PI`);
//!   what the device transmits is what the host receives on `IFNAME`, and what is sent on
//!   `IFNAME` reaches the device. We open an `AF_PACKET`/`SOCK_RAW` socket bound to `IFNAME`
//!   for all EtherTypes, with `PACKET_IGNORE_OUTGOING` so we do not read back frames the host
//!   itself transmits on the interface (ours included). The same works on a veth end.
//!
//! Both are behind [`Transport`], the same shape as the device side's `Wire` trait, so a test
//! can put anything (a channel, a lossy shim) in their place.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};

/// Why a wire could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The wire specification does not parse.
    #[error("Bad wire {0:?}: expected udp:BIND[->PEER] or tap:IFNAME")]
    BadSpec(String),
    /// Binding the UDP socket failed.
    #[error("Cannot bind UDP socket {addr}")]
    UdpBind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening the packet socket failed (needs root / `CAP_NET_RAW`).
    #[error("Cannot open AF_PACKET socket on {ifname}")]
    Packet {
        /// The interface.
        ifname: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Where frames go: one Ethernet frame per call. Sends may come from any thread; receives
/// are meant for one reader at a time (a datagram another reader takes between the wait and
/// the read is simply not ours).
pub trait Transport: Send + Sync {
    /// Sends one frame.
    fn send(&self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf`, waiting at most `timeout` (`None`: forever). `Ok(None)`
    /// on timeout. A frame longer than `buf` is truncated to it.
    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>>;
    /// A short description for reports (`udp 127.0.0.1:4000->127.0.0.1:5000`).
    fn describe(&self) -> String;
}

/// A wire specification (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireSpec {
    /// `udp:BIND[->PEER]`.
    Udp {
        /// Local address to bind (port 0: any).
        bind: SocketAddr,
        /// Where frames go; `None`: to the last sender.
        peer: Option<SocketAddr>,
    },
    /// `tap:IFNAME`.
    Tap {
        /// The interface.
        ifname: String,
    },
}

impl std::str::FromStr for WireSpec {
    type Err = WireError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || WireError::BadSpec(s.to_owned());
        if let Some(rest) = s.strip_prefix("udp:") {
            let (bind, peer) = match rest.split_once("->").or_else(|| rest.split_once(',')) {
                Some((b, p)) => (b, Some(p.parse().map_err(|_| bad())?)),
                None => (rest, None),
            };
            Ok(WireSpec::Udp {
                bind: bind.parse().map_err(|_| bad())?,
                peer,
            })
        } else if let Some(ifname) = s.strip_prefix("tap:") {
            // IFNAMSIZ is 16 including the NUL.
            if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ', '\0']) {
                return Err(bad());
            }
            Ok(WireSpec::Tap {
                ifname: ifname.to_owned(),
            })
        } else {
            Err(bad())
        }
    }
}

/// Opens the wire `spec` names.
pub fn open(spec: &WireSpec) -> Result<Arc<dyn Transport>, WireError> {
    Ok(match spec {
        WireSpec::Udp { bind, peer } => Arc::new(UdpTransport::bind(*bind, *peer)?),
        WireSpec::Tap { ifname } => Arc::new(PacketTransport::open(ifname)?),
    })
}

/// Socket buffer size we ask for: room for bursts of full-size frames at benchmark rates.
const SOCKET_BUFFER: usize = 4 << 20;

/// Waits until `fd` is readable or `timeout` passes; false on timeout.
fn wait_readable(fd: impl AsFd, timeout: Option<Duration>) -> io::Result<bool> {
    let ts = timeout.map(|t| Timespec {
        tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    match poll(&mut fds, ts.as_ref()) {
        Ok(n) => Ok(n > 0),
        // A signal (the CLI's Ctrl-C) interrupts the wait; the caller checks its stop flag.
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The UDP wire: one datagram per frame.
pub struct UdpTransport {
    socket: UdpSocket,
    peer: Mutex<Option<SocketAddr>>,
    fixed_peer: bool,
}

impl UdpTransport {
    /// Binds `bind`; frames go to `peer`, or if `None` to the last sender.
    pub fn bind(bind: SocketAddr, peer: Option<SocketAddr>) -> Result<Self, WireError> {
        let socket =
            UdpSocket::bind(bind).map_err(|source| WireError::UdpBind { addr: bind, source })?;
        // Best effort: the kernel caps these at net.core.{r,w}mem_max.
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, SOCKET_BUFFER);
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&socket, SOCKET_BUFFER);
        Ok(UdpTransport {
            socket,
            peer: Mutex::new(peer),
            fixed_peer: peer.is_some(),
        })
    }

    /// The bound address (to tell a device where its peer is).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn peer(&self) -> Option<SocketAddr> {
        *self.peer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Transport for UdpTransport {
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        let peer = self.peer().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "no peer yet: no frame received",
            )
        })?;
        self.socket.send_to(frame, peer).map(|_| ())
    }

    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>> {
        if !wait_readable(&self.socket, timeout)? {
            return Ok(None);
        }
        let (n, from) = self.socket.recv_from(buf)?;
        if !self.fixed_peer {
            *self.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
        }
        Ok(Some(n))
    }

    fn describe(&self) -> String {
        let local = self
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        match self.peer() {
            Some(p) => format!("udp {local}->{p}"),
            None => format!("udp {local}"),
        }
    }
}

/// `AF_PACKET` on an interface (root).
pub struct PacketTransport {
    fd: OwnedFd,
    ifname: String,
}

impl PacketTransport {
    /// Opens a raw packet socket bound to `ifname` (all EtherTypes, outgoing frames ignored).
    pub fn open(ifname: &str) -> Result<Self, WireError> {
        let err = |source: io::Error| WireError::Packet {
            ifname: ifname.to_owned(),
            source,
        };
        // ETH_P_ALL in network byte order, as packet(7) wants it.
        let proto_be = ETH_P_ALL.to_be();
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto_be),
            )
        };
        if raw < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor we own and close only through this OwnedFd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ifindex =
            rustix::net::netdevice::name_to_index(&fd, ifname).map_err(|e| err(e.into()))?;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&one`, a live c_int.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                std::ptr::from_ref(&one).cast(),
                socklen::<libc::c_int>(),
            )
        };
        if rc < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = AF_PACKET;
        sll.sll_protocol = proto_be;
        sll.sll_ifindex =
            i32::try_from(ifindex).map_err(|_| err(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: bind reads `size_of::<sockaddr_ll>()` bytes from `&sll`, a live sockaddr_ll.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sll).cast(),
                socklen::<libc::sockaddr_ll>(),
            )
        };
        if rc < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, SOCKET_BUFFER);
        Ok(PacketTransport {
            fd,
            ifname: ifname.to_owned(),
        })
    }
}

/// `AF_PACKET` as `sockaddr_ll::sll_family` holds it (the constant is 17).
const AF_PACKET: u16 = 17;
/// `ETH_P_ALL` (every EtherType), host order.
const ETH_P_ALL: u16 = 0x0003;
const _: () = assert!(AF_PACKET as libc::c_int == libc::AF_PACKET);
const _: () = assert!(ETH_P_ALL as libc::c_int == libc::ETH_P_ALL);

/// `size_of::<T>()` as a `socklen_t` (our sockaddr and option types are a few bytes).
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

impl Transport for PacketTransport {
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // Bound to one interface: send(2) without an address goes out on it.
        rustix::net::send(&self.fd, frame, rustix::net::SendFlags::empty())?;
        Ok(())
    }

    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<usize>> {
        if !wait_readable(&self.fd, timeout)? {
            return Ok(None);
        }
        match rustix::net::recv(&self.fd, &mut *buf, rustix::net::RecvFlags::DONTWAIT) {
            Ok((_, n)) => Ok(Some(n.min(buf.len()))),
            // Readable but gone (another reader took it): nothing this time.
            Err(rustix::io::Errno::AGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn describe(&self) -> String {
        format!("tap {}", self.ifname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let s: WireSpec = "udp:127.0.0.1:0->127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            s,
            WireSpec::Udp {
                bind: "127.0.0.1:0".parse().unwrap(),
                peer: Some("127.0.0.1:5000".parse().unwrap())
            }
        );
        let s: WireSpec = "udp:127.0.0.1:0,127.0.0.1:5000".parse().unwrap();
        assert!(matches!(s, WireSpec::Udp { peer: Some(_), .. }));
        let s: WireSpec = "udp:[::1]:7000".parse().unwrap();
        assert!(matches!(s, WireSpec::Udp { peer: None, .. }));
        assert_eq!(
            "tap:np0".parse::<WireSpec>().unwrap(),
            WireSpec::Tap {
                ifname: "np0".into()
            }
        );
        for bad in [
            "",
            "udp:",
            "udp:x->y",
            "tap:",
            "tap:a/b",
            "tap:0123456789abcdef",
            "eth:x",
        ] {
            assert!(bad.parse::<WireSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn udp_pair_moves_frames_and_learns_the_peer() {
        let a = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let b = UdpTransport::bind(
            "127.0.0.1:0".parse().unwrap(),
            Some(a.local_addr().unwrap()),
        )
        .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            a.recv(&mut buf, Some(Duration::from_millis(1))).unwrap(),
            None
        );
        assert_eq!(
            a.send(b"x").unwrap_err().kind(),
            io::ErrorKind::NotConnected
        );
        b.send(b"hello").unwrap();
        assert_eq!(a.recv(&mut buf, None).unwrap(), Some(5));
        assert_eq!(&buf[..5], b"hello");
        a.send(b"back").unwrap();
        assert_eq!(b.recv(&mut buf, None).unwrap(), Some(4));
        assert!(a.describe().contains(&b.local_addr().unwrap().to_string()));
    }
}

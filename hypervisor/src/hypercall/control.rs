//! The control socket of a process domain: fixed-size request and reply messages, at most one
//! descriptor per message (`SCM_RIGHTS`), and the eventfd helpers both sides use. The layout
//! is in the parent module's docs.

use super::HypercallError;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Control-socket op codes.
pub mod ctl {
    /// Allocate a page that peers may map.
    pub const ALLOC_SHARED_PAGE: u32 = 1;
    /// Map a peer's grant.
    pub const MAP_GRANT: u32 = 2;
    /// Unmap a mapping.
    pub const UNMAP_GRANT: u32 = 3;
    /// Hand over one of the caller's own shareable pages again (after a restart or a swap).
    pub const SHARED_PAGE: u32 = 4;
}

/// Bytes of a control request.
pub const CTL_REQUEST_SIZE: usize = 32;
/// Bytes of a control reply.
pub const CTL_REPLY_SIZE: usize = 24;

/// A control request (see the module docs for the layout).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtlRequest {
    /// [`ctl`] op code.
    pub op: u32,
    /// Arguments.
    pub args: [u64; 3],
}

/// A control reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtlReply {
    /// 0 or a negative errno / `GNTST_*`.
    pub status: i32,
    /// Results.
    pub result: [u64; 2],
}

impl CtlRequest {
    /// Wire bytes.
    pub fn to_bytes(&self) -> [u8; CTL_REQUEST_SIZE] {
        let mut b = [0u8; CTL_REQUEST_SIZE];
        b[..4].copy_from_slice(&self.op.to_le_bytes());
        for (i, a) in self.args.iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        b
    }

    /// Parse wire bytes; the reserved word must be zero.
    pub fn from_bytes(b: &[u8]) -> Result<Self, HypercallError> {
        if b.len() != CTL_REQUEST_SIZE || b[4..8] != [0; 4] {
            return Err(HypercallError::BadMessage);
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(Self {
            op: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
            args: [word(8), word(16), word(24)],
        })
    }
}

impl CtlReply {
    /// Wire bytes.
    pub fn to_bytes(&self) -> [u8; CTL_REPLY_SIZE] {
        let mut b = [0u8; CTL_REPLY_SIZE];
        b[..4].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.result[0].to_le_bytes());
        b[16..24].copy_from_slice(&self.result[1].to_le_bytes());
        b
    }

    /// Parse wire bytes.
    pub fn from_bytes(b: &[u8]) -> Result<Self, HypercallError> {
        if b.len() != CTL_REPLY_SIZE || b[4..8] != [0; 4] {
            return Err(HypercallError::BadMessage);
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(Self {
            status: i32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
            result: [word(8), word(16)],
        })
    }
}

/// Send one message with at most one descriptor. Never blocks when `nonblocking`.
pub fn send_msg(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
    nonblocking: bool,
) -> Result<(), HypercallError> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        if !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(HypercallError::BadMessage);
        }
    }
    let mut flags = SendFlags::NOSIGNAL;
    if nonblocking {
        flags |= SendFlags::DONTWAIT;
    }
    let n = rustix::net::sendmsg(sock, &[IoSlice::new(bytes)], &mut cmsg, flags)
        .map_err(|e| HypercallError::Io(e.into()))?;
    if n == bytes.len() {
        Ok(())
    } else {
        Err(HypercallError::BadMessage)
    }
}

/// Receive one message into `buf`: its length and the first descriptor that came with it
/// (any others are closed). A truncated message is an error. `Closed` at end of stream.
pub fn recv_msg(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    nonblocking: bool,
) -> Result<(usize, Option<OwnedFd>), HypercallError> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut flags = RecvFlags::CMSG_CLOEXEC;
    if nonblocking {
        flags |= RecvFlags::DONTWAIT;
    }
    let msg = rustix::net::recvmsg(sock, &mut [IoSliceMut::new(buf)], &mut cmsg, flags)
        .map_err(|e| HypercallError::Io(e.into()))?;
    let mut first = None;
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for fd in fds {
                // Keep the first descriptor; dropping the rest closes them.
                if first.is_none() {
                    first = Some(fd);
                }
            }
        }
    }
    if msg
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
    {
        return Err(HypercallError::BadMessage);
    }
    if msg.bytes == 0 && first.is_none() {
        return Err(HypercallError::Closed);
    }
    Ok((msg.bytes, first))
}

/// A connected `SOCK_SEQPACKET` pair (close-on-exec): (hypervisor end, domain end).
pub fn control_pair() -> Result<(OwnedFd, OwnedFd), HypercallError> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| HypercallError::Io(e.into()))
}

/// Write 1 to an eventfd without blocking (a full counter means the reader is far behind and
/// already has a wakeup pending, so the error is ignored).
pub fn signal_eventfd(fd: impl AsFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Reset an eventfd's counter without blocking (the fd must be non-blocking).
pub fn drain_eventfd(fd: impl AsFd) {
    let mut b = [0u8; 8];
    let _ = rustix::io::read(fd, &mut b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ctl_messages_round_trip(op: u32, a: u64, b: u64, c: u64, status: i32) {
            let req = CtlRequest { op, args: [a, b, c] };
            prop_assert_eq!(CtlRequest::from_bytes(&req.to_bytes()).unwrap(), req);
            let rep = CtlReply { status, result: [a, b] };
            prop_assert_eq!(CtlReply::from_bytes(&rep.to_bytes()).unwrap(), rep);
        }

        #[test]
        fn ctl_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = CtlRequest::from_bytes(&bytes);
            let _ = CtlReply::from_bytes(&bytes);
        }
    }

    #[test]
    fn control_messages_carry_one_fd() {
        let (a, b) = control_pair().unwrap();
        let (p, _q) = rustix::pipe::pipe().unwrap();
        let req = CtlRequest {
            op: ctl::MAP_GRANT,
            args: [1, 2, 0],
        };
        send_msg(a.as_fd(), &req.to_bytes(), Some(p.as_fd()), true).unwrap();
        let mut buf = [0u8; 64];
        let (n, fd) = recv_msg(b.as_fd(), &mut buf, true).unwrap();
        assert_eq!(CtlRequest::from_bytes(&buf[..n]).unwrap(), req);
        assert!(fd.is_some());
        drop(a);
        assert!(matches!(
            recv_msg(b.as_fd(), &mut buf, false),
            Err(HypercallError::Closed)
        ));
    }
}

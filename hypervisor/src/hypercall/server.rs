//! The hypervisor's per-domain hypercall server: one thread per domain that executes the
//! batches published in the domain's hypercall page and answers its control socket, always
//! with the domain's own id as the caller. It never blocks on the domain: eventfd writes and
//! socket sends are non-blocking, and a domain that does not read its replies is cut off.

use super::*;
use crate::grant_table::{MapHandle, TransferMode};
use crate::system::{System, SystemError};
use rustix::event::EventfdFlags;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// The `GNTST_*` status for a failed grant operation.
pub fn grant_status(e: &SystemError) -> i32 {
    i32::from(match e {
        SystemError::Grant(s) => *s,
        SystemError::NoSuchDomain(_) | SystemError::Dying(_) => gntst::BAD_DOMAIN,
        SystemError::GrantInUse(_) => gntst::EAGAIN,
        SystemError::BadFrame(_) => gntst::BAD_PAGE,
        SystemError::Exhausted(_) => gntst::NO_SPACE,
        _ => gntst::GENERAL_ERROR,
    })
}

/// The negative errno for a failed event-channel or control operation.
pub fn errno_status(e: &SystemError) -> i32 {
    -match e {
        SystemError::NoSuchDomain(_) | SystemError::Dying(_) => libc::ESRCH,
        SystemError::BadPort(_) | SystemError::BadFrame(_) | SystemError::Grant(_) => libc::EINVAL,
        SystemError::GrantInUse(_) => libc::EBUSY,
        SystemError::Exhausted(_)
        | SystemError::Memory(crate::memory::MemoryError::TooManySharedPages) => libc::ENOSPC,
        SystemError::Memory(_) | SystemError::Io(_) => libc::EIO,
    }
}

/// Execute one decoded op for `caller`: (status, result).
fn execute(sys: &System, caller: DomId, op: Op) -> (i32, u64) {
    let errno = |r: Result<u64, SystemError>| match r {
        Ok(v) => (0, v),
        Err(e) => (errno_status(&e), 0),
    };
    let gnt = |r: Result<u64, SystemError>| match r {
        Ok(v) => (0, v),
        Err(e) => (grant_status(&e), 0),
    };
    match op {
        Op::GrantCopy(c) => (
            i32::from(
                sys.grant_copy(caller, &[c])
                    .first()
                    .copied()
                    .unwrap_or(gntst::GENERAL_ERROR),
            ),
            0,
        ),
        Op::Pin {
            granter,
            gref,
            writable,
        } => gnt(sys.pin_grant(caller, granter, gref, writable)),
        Op::Unpin { iova } => gnt(sys.unpin_grant(caller, iova).map(|()| 0)),
        Op::Transfer { frame, peer, gref } => gnt(sys
            .transfer(caller, frame, peer, gref)
            .map(|m| u64::from(m == TransferMode::Copied))),
        Op::EvtchnSend(p) => errno(sys.evtchn_send(caller, p).map(|()| 0)),
        Op::EvtchnUnmask(p) => errno(sys.evtchn_unmask(caller, p).map(|()| 0)),
        Op::EvtchnClose(p) => errno(sys.evtchn_close(caller, p).map(|()| 0)),
        Op::EvtchnAllocUnbound(remote) => {
            errno(sys.evtchn_alloc_unbound(caller, remote).map(u64::from))
        }
        Op::EvtchnBindInterdomain { remote, port } => errno(
            sys.evtchn_bind_interdomain(caller, remote, port)
                .map(u64::from),
        ),
    }
}

/// Execute a batch copied out of a domain's page; returns the records with statuses.
/// Runs of consecutive grant copies go to the core as one batch, in order.
pub fn execute_batch(sys: &System, caller: DomId, mut records: Vec<OpRecord>) -> Vec<OpRecord> {
    let decoded: Vec<Result<Op, HypercallError>> = records.iter().map(Op::decode).collect();
    let mut i = 0;
    while i < records.len() {
        match &decoded[i] {
            Ok(Op::GrantCopy(_)) => {
                let mut copies = Vec::new();
                let mut j = i;
                while let Some(Ok(Op::GrantCopy(c))) = decoded.get(j) {
                    copies.push(*c);
                    j += 1;
                }
                let st = sys.grant_copy(caller, &copies);
                for (k, r) in records[i..j].iter_mut().enumerate() {
                    r.status = i32::from(st.get(k).copied().unwrap_or(gntst::GENERAL_ERROR));
                    r.result = 0;
                }
                i = j;
            }
            Ok(op) => {
                (records[i].status, records[i].result) = execute(sys, caller, *op);
                i += 1;
            }
            Err(e) => {
                records[i].status = decode_error_status(records[i].op, e);
                records[i].result = 0;
                i += 1;
            }
        }
    }
    records
}

/// Execute one control request for `caller`: the reply and the descriptor to pass.
pub fn execute_ctl(sys: &System, caller: DomId, bytes: &[u8]) -> (CtlReply, Option<File>) {
    let fail = |status| {
        (
            CtlReply {
                status,
                result: [0; 2],
            },
            None,
        )
    };
    let Ok(req) = CtlRequest::from_bytes(bytes) else {
        return fail(-libc::EINVAL);
    };
    let a = req.args;
    match req.op {
        ctl::ALLOC_SHARED_PAGE if a == [0; 3] => match sys.alloc_shared_page(caller) {
            Ok((frame, file)) => (
                CtlReply {
                    status: 0,
                    result: [frame, 0],
                },
                Some(file),
            ),
            Err(e) => {
                // The domain hears only a status; say here what failed (a domain 0 out of
                // descriptors shows as a memfd that could not be created).
                tracing::warn!(dom = caller, error = %e, "alloc_shared_page failed");
                fail(errno_status(&e))
            }
        },
        ctl::MAP_GRANT if a[2] <= 1 => {
            let (Ok(granter), Ok(gref)) = (DomId::try_from(a[0]), GrantRef::try_from(a[1])) else {
                return fail(i32::from(gntst::GENERAL_ERROR));
            };
            match sys.map_grant(caller, granter, gref, a[2] == 1) {
                Ok((handle, file)) => {
                    let frame = sys.mapping_info(caller, handle).map_or(0, |(_, _, f)| f);
                    (
                        CtlReply {
                            status: 0,
                            result: [handle.0, frame],
                        },
                        Some(file),
                    )
                }
                Err(e) => fail(grant_status(&e)),
            }
        }
        ctl::UNMAP_GRANT if a[1] == 0 && a[2] == 0 => {
            match sys.unmap_grant(caller, MapHandle(a[0])) {
                Ok(()) => (CtlReply::default(), None),
                Err(e) => fail(grant_status(&e)),
            }
        }
        ctl::SHARED_PAGE if a[1] == 0 && a[2] == 0 => match sys.shared_page_file(caller, a[0]) {
            Ok(file) => (
                CtlReply {
                    status: 0,
                    result: [a[0], 0],
                },
                Some(file),
            ),
            Err(e) => fail(errno_status(&e)),
        },
        ctl::ALLOC_SHARED_PAGE | ctl::MAP_GRANT | ctl::UNMAP_GRANT | ctl::SHARED_PAGE => {
            fail(-libc::EINVAL)
        }
        _ => fail(-libc::ENOSYS),
    }
}

/// The hypervisor's ends of a domain's hypercall channels.
pub struct ServerFds {
    /// Doorbell eventfd (non-blocking): the domain signals a published batch.
    pub doorbell: OwnedFd,
    /// Completion eventfd: the server signals a completed batch.
    pub completion: OwnedFd,
    /// The hypervisor's end of the control socket.
    pub control: OwnedFd,
}

/// Why a domain's server stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerExit {
    /// Asked to stop.
    Stopped,
    /// The domain closed its control socket (it exited or crashed).
    DomainGone,
    /// The domain did not read its replies (its socket buffer is full) or sent junk that
    /// could not be received; the server dropped the connection.
    Misbehaved,
}

/// A running per-domain server thread.
pub struct Server {
    stop: OwnedFd,
    thread: Option<std::thread::JoinHandle<ServerExit>>,
}

impl Server {
    /// Serve domain `dom`'s hypercall page and control socket on a new thread.
    pub fn spawn(sys: Arc<System>, dom: DomId, fds: ServerFds) -> Result<Self, HypercallError> {
        let domain = sys
            .domain(dom)
            .map_err(|e| HypercallError::Io(std::io::Error::other(e)))?;
        let ptr = domain
            .memory()
            .ram_frame_ptr(HYPERCALL_FRAME)
            .map_err(|e| HypercallError::Io(std::io::Error::other(e)))?;
        // SAFETY: the pointer is frame 5 of the domain's RAM mapping, page-aligned; the thread
        // below keeps `domain` (and so its memory mapping) alive as long as it uses the page.
        let page = unsafe { HypercallPage::new(ptr) };
        // Read before the thread starts, so a batch published right after `spawn` returns is
        // new to the server (a batch left by an earlier process of the domain is not).
        let last_seq = page.current_req_seq();
        let stop = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| HypercallError::Io(e.into()))?;
        let stop2 = stop.try_clone().map_err(HypercallError::Io)?;
        let thread = std::thread::Builder::new()
            .name(format!("hypercall-d{dom}"))
            .spawn(move || {
                let _keep = domain;
                serve(last_seq, &sys, dom, &page, &fds, &stop2)
            })
            .map_err(HypercallError::Io)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Whether the server thread has ended on its own (the domain went away or misbehaved);
    /// [`Server::stop`] then says why without waiting.
    pub fn is_finished(&self) -> bool {
        self.thread
            .as_ref()
            .is_none_or(std::thread::JoinHandle::is_finished)
    }

    /// Stop the server and wait for it.
    pub fn stop(mut self) -> ServerExit {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> ServerExit {
        signal_eventfd(&self.stop);
        self.thread.take().map_or(ServerExit::Stopped, |t| {
            t.join().unwrap_or(ServerExit::Misbehaved)
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn serve(
    mut last_seq: u32,
    sys: &System,
    dom: DomId,
    page: &HypercallPage,
    fds: &ServerFds,
    stop: &OwnedFd,
) -> ServerExit {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut buf = [0u8; CTL_REQUEST_SIZE + 1];
    loop {
        let mut pfds = [
            PollFd::new(&fds.doorbell, PollFlags::IN),
            PollFd::new(&fds.control, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        if let Err(e) = poll(&mut pfds, None) {
            if e == rustix::io::Errno::INTR {
                continue;
            }
            return ServerExit::Misbehaved;
        }
        let (bell, ctl_ev, stopped) = (pfds[0].revents(), pfds[1].revents(), pfds[2].revents());
        if !stopped.is_empty() {
            return ServerExit::Stopped;
        }
        if !bell.is_empty() {
            drain_eventfd(&fds.doorbell);
            if let Some((seq, batch)) = page.take_batch(last_seq) {
                last_seq = seq;
                match batch {
                    Ok(records) => page.complete(seq, 0, &execute_batch(sys, dom, records)),
                    Err(()) => page.complete(seq, -libc::EINVAL, &[]),
                }
                signal_eventfd(&fds.completion);
            }
        }
        if ctl_ev.contains(PollFlags::IN) {
            match recv_msg(fds.control.as_fd(), &mut buf, true) {
                Ok((n, _junk_fd)) => {
                    let (reply, file) = execute_ctl(sys, dom, &buf[..n]);
                    let fd = file.as_ref().map(AsFd::as_fd);
                    if send_msg(fds.control.as_fd(), &reply.to_bytes(), fd, true).is_err() {
                        tracing::warn!(dom, "domain does not read its control replies");
                        return ServerExit::Misbehaved;
                    }
                }
                Err(HypercallError::Closed) => return ServerExit::DomainGone,
                Err(HypercallError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(HypercallError::BadMessage) => {
                    // Truncated or junk: answer with an error so the domain does not wait.
                    let reply = CtlReply {
                        status: -libc::EINVAL,
                        result: [0; 2],
                    };
                    if send_msg(fds.control.as_fd(), &reply.to_bytes(), None, true).is_err() {
                        return ServerExit::Misbehaved;
                    }
                }
                Err(_) => return ServerExit::Misbehaved,
            }
        } else if ctl_ev.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL) {
            return ServerExit::DomainGone;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryError;

    #[test]
    fn a_domain_out_of_shareable_pages_is_told_apart_from_a_failure_of_domain_0() {
        let quota = SystemError::Memory(MemoryError::TooManySharedPages);
        assert_eq!(errno_status(&quota), -libc::ENOSPC);
        let ours = SystemError::Memory(MemoryError::BadSize(0));
        assert_eq!(errno_status(&ours), -libc::EIO);
    }
}

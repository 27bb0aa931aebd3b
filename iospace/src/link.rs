//! The I/O Space handle the virtio driver programs its device through.
//!
//! [`IoAccess`] is what a driver may do to its device: read its parsed config, write config
//! registers through the virtualised view, read and write MMIO inside its BARs, and wait for
//! its MSI-X vectors. Every access is checked (and refusals counted) by the
//! `iospace::space::IoSpace` behind it:
//!
//! * [`LocalIo`]: the `IoSpace` in this process (the manager's own tests, in-process IDDs);
//! * [`RemoteIo`]: the `IoSpace` in domain 0, reached over a Unix stream socket that the
//!   manager hands the IDD before it enters its sandbox; [`serve`] is domain 0's end. MMIO and
//!   config accesses are synchronous calls, like trapped accesses; interrupts are collected
//!   by the server and returned by a wait call.
//!
//! # Wire format (little-endian)
//!
//! Request, 24 bytes: `op: u8`, `len: u8` (1..=8), `_pad: u16`, `arg: u32` (config offset,
//! or wait timeout in ms), `addr: u64` (MMIO address), `data: [u8; 8]` (write data).
//!
//! Response, 16 bytes: `status: i32` ([`ST_OK`], [`ST_REFUSED`], [`ST_MALFORMED`]),
//! `irqs: u32` (for a wait: bit `v` = MSI-X vector `v` fired), `data: [u8; 8]` (read data).
//!
//! # Probing under the I/O Space's policy
//!
//! Domain 0 owns the command register's decode bits and shadows the BARs, so
//! [`RemoteIo::new`] parses the config space without the usual "decode off, size, decode
//! on" dance: its command-register writes are not sent (the view would refuse them), and the
//! BARs are sized through the shadow, which answers the all-ones probe with the size mask and
//! never moves the BAR.
//!
//! # Vector ownership
//!
//! Each link ([`serve`], at its first request) and each [`LocalIo`] (when it is made) binds
//! eventfds to the device's MSI-X vectors, and unbinds them when it ends. Only the latest binding of a space owns its
//! vectors: a dead IDD process's link that ends after its successor's link started leaves the
//! successor's eventfds bound (a process-wide table records, per space, which binding is
//! current).

use crate::pci::{self, ConfigAccess, DeviceInfo, PciError};
use crate::space::{IoSpace, Irq};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Read MMIO.
pub const OP_MMIO_READ: u8 = 1;
/// Write MMIO.
pub const OP_MMIO_WRITE: u8 = 2;
/// Read config space.
pub const OP_CONFIG_READ: u8 = 3;
/// Write config space.
pub const OP_CONFIG_WRITE: u8 = 4;
/// Wait for interrupts.
pub const OP_WAIT_IRQ: u8 = 5;
/// Success.
pub const ST_OK: i32 = 0;
/// The I/O Space refused the access.
pub const ST_REFUSED: i32 = -1;
/// The request was malformed.
pub const ST_MALFORMED: i32 = -2;
/// Request size.
pub const REQUEST_LEN: usize = 24;
/// Response size.
pub const RESPONSE_LEN: usize = 16;
/// MSI-X vectors a wait reports (bits of `irqs`).
pub const MAX_VECTORS: u16 = 32;

/// Why an I/O Space access failed.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The I/O Space refused it.
    #[error("I/O Space refused the access")]
    Refused,
    /// The access was malformed (length).
    #[error("Malformed I/O Space access")]
    Malformed,
    /// The link to domain 0 failed.
    #[error("I/O Space link failed")]
    Link(#[source] std::io::Error),
    /// The device's config space could not be parsed.
    #[error("Parsing the device's config space failed: {0}")]
    Probe(#[source] PciError),
}

/// What a driver may do to its device.
pub trait IoAccess: Send {
    /// The device's parsed config space.
    fn info(&self) -> &DeviceInfo;
    /// Write 1, 2 or 4 bytes of config space (through the virtualised view).
    fn config_write(&self, offset: u16, data: &[u8]) -> Result<(), IoError>;
    /// MMIO read of 1..=8 bytes.
    fn mmio_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), IoError>;
    /// MMIO write of 1..=8 bytes.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> Result<(), IoError>;
    /// Wait up to `timeout` for interrupts; bit `v` of the result = MSI-X vector `v` fired
    /// (each firing is reported once).
    fn wait_irq(&self, timeout: Duration) -> Result<u32, IoError>;
}

/// The current binding of each space's vectors: the space's address → binding id.
static OWNERS: Mutex<BTreeMap<usize, u64>> = Mutex::new(BTreeMap::new());
/// Binding ids (never reused).
static NEXT_BINDING: AtomicU64 = AtomicU64::new(1);

fn space_key(space: &IoSpace) -> usize {
    std::ptr::from_ref(space) as usize
}

/// Eventfds bound to the first MSI-X vectors of a space, and which binding they are.
struct Vectors {
    fds: Vec<EventFd>,
    id: u64,
}

impl Vectors {
    fn bind(space: &IoSpace) -> Self {
        // Held across binding, so binding and unbinding of one space never interleave.
        let mut owners = OWNERS.lock().unwrap_or_else(PoisonError::into_inner);
        let id = NEXT_BINDING.fetch_add(1, Ordering::Relaxed);
        owners.insert(space_key(space), id);
        let n = space.irqs().msix_vectors.min(MAX_VECTORS);
        let mut v = Vec::new();
        for i in 0..n {
            let Ok(fd) = EventFd::new(EFD_NONBLOCK) else {
                break;
            };
            let bound = fd
                .try_clone()
                .is_ok_and(|c| space.bind_irq(Irq::MsiX(i), Some(c)).is_ok());
            if !bound {
                break;
            }
            v.push(fd);
        }
        Self { fds: v, id }
    }

    fn wait(&self, timeout: Duration) -> Result<u32, IoError> {
        let mut pfds: Vec<libc::pollfd> = self
            .fds
            .iter()
            .map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds for the call's duration.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(IoError::Link(e));
            }
        }
        let mut bits = 0u32;
        for (i, f) in self.fds.iter().enumerate() {
            if f.read().is_ok() {
                bits |= 1 << i;
            }
        }
        Ok(bits)
    }

    /// Unbind the vectors, unless a later binding took them over (see the module docs).
    fn unbind(&self, space: &IoSpace) {
        let mut owners = OWNERS.lock().unwrap_or_else(PoisonError::into_inner);
        let key = space_key(space);
        if owners.get(&key) != Some(&self.id) {
            return;
        }
        owners.remove(&key);
        for i in 0..self.fds.len() {
            let _ = space.bind_irq(Irq::MsiX(u16::try_from(i).unwrap_or(0)), None);
        }
    }
}

/// The I/O Space in this process.
pub struct LocalIo {
    space: Arc<IoSpace>,
    vectors: Vectors,
}

impl LocalIo {
    /// Drive the device behind `space`; its MSI-X vectors are bound to eventfds here.
    pub fn new(space: Arc<IoSpace>) -> Self {
        let vectors = Vectors::bind(&space);
        Self { space, vectors }
    }
}

impl Drop for LocalIo {
    fn drop(&mut self) {
        self.vectors.unbind(&self.space);
    }
}

impl IoAccess for LocalIo {
    fn info(&self) -> &DeviceInfo {
        self.space.info()
    }
    fn config_write(&self, offset: u16, data: &[u8]) -> Result<(), IoError> {
        self.space
            .config_write(self.space.bdf(), offset, data)
            .map_err(|_| IoError::Refused)
    }
    fn mmio_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.space
            .mmio_read(addr, buf)
            .map_err(|_| IoError::Refused)
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) -> Result<(), IoError> {
        self.space
            .mmio_write(addr, data)
            .map_err(|_| IoError::Refused)
    }
    fn wait_irq(&self, timeout: Duration) -> Result<u32, IoError> {
        self.vectors.wait(timeout)
    }
}

/// The IDD's end of a remote I/O Space.
pub struct RemoteIo {
    stream: File,
    info: DeviceInfo,
}

struct RemoteConfig<'a>(&'a File);

fn call(
    s: &File,
    op: u8,
    len: usize,
    arg: u32,
    addr: u64,
    data: &[u8],
) -> Result<(u32, [u8; 8]), IoError> {
    if len > 8 || data.len() > 8 {
        return Err(IoError::Malformed);
    }
    let mut req = [0u8; REQUEST_LEN];
    req[0] = op;
    req[1] = u8::try_from(len).map_err(|_| IoError::Malformed)?;
    req[4..8].copy_from_slice(&arg.to_le_bytes());
    req[8..16].copy_from_slice(&addr.to_le_bytes());
    req[16..16 + data.len()].copy_from_slice(data);
    let mut w = s;
    w.write_all(&req).map_err(IoError::Link)?;
    let mut rsp = [0u8; RESPONSE_LEN];
    let mut r = s;
    r.read_exact(&mut rsp).map_err(IoError::Link)?;
    match i32::from_le_bytes([rsp[0], rsp[1], rsp[2], rsp[3]]) {
        ST_OK => {}
        ST_REFUSED => return Err(IoError::Refused),
        _ => return Err(IoError::Malformed),
    }
    let irqs = u32::from_le_bytes([rsp[4], rsp[5], rsp[6], rsp[7]]);
    let mut out = [0u8; 8];
    out.copy_from_slice(&rsp[8..16]);
    Ok((irqs, out))
}

impl ConfigAccess for RemoteConfig<'_> {
    fn read_u32(&self, offset: u16) -> pci::Result<u32> {
        let (_, d) = call(self.0, OP_CONFIG_READ, 4, offset.into(), 0, &[]).map_err(|e| {
            tracing::warn!(error = ?e, "remote config read failed");
            PciError::BadOffset(offset)
        })?;
        Ok(u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
    }
    fn write_u32(&mut self, offset: u16, value: u32) -> pci::Result<()> {
        // BAR sizing turns decoding off around the probe; the view refuses that (the
        // manager owns the decode bits) and emulates sizing anyway, so the write is skipped.
        if offset == pci::COMMAND & !3 {
            return Ok(());
        }
        call(
            self.0,
            OP_CONFIG_WRITE,
            4,
            offset.into(),
            0,
            &value.to_le_bytes(),
        )
        .map(|_| ())
        .map_err(|_| PciError::ReadOnly)
    }
}

impl RemoteIo {
    /// Connect over `stream` (already connected to domain 0's [`serve`]) and parse the
    /// device's config space through it.
    ///
    /// The socket is used as a plain file (`read`/`write` system calls, which the sandbox
    /// allows; `recvfrom`/`sendto`, which `UnixStream` uses, it does not).
    pub fn new(stream: UnixStream) -> Result<Self, IoError> {
        let stream = File::from(OwnedFd::from(stream));
        let info = DeviceInfo::probe(&mut RemoteConfig(&stream)).map_err(IoError::Probe)?;
        Ok(Self { stream, info })
    }
}

impl IoAccess for RemoteIo {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn config_write(&self, offset: u16, data: &[u8]) -> Result<(), IoError> {
        call(
            &self.stream,
            OP_CONFIG_WRITE,
            data.len(),
            offset.into(),
            0,
            data,
        )
        .map(|_| ())
    }
    fn mmio_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let (_, d) = call(&self.stream, OP_MMIO_READ, buf.len(), 0, addr, &[])?;
        buf.copy_from_slice(&d[..buf.len()]);
        Ok(())
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) -> Result<(), IoError> {
        call(&self.stream, OP_MMIO_WRITE, data.len(), 0, addr, data).map(|_| ())
    }
    fn wait_irq(&self, timeout: Duration) -> Result<u32, IoError> {
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        call(&self.stream, OP_WAIT_IRQ, 0, ms, 0, &[]).map(|(irqs, _)| irqs)
    }
}

/// Domain 0's end: serve the IDD's accesses to `space` on `stream` until it closes (the IDD
/// process died or exited). Every access goes through the I/O Space's checks; a malformed
/// request is answered [`ST_MALFORMED`], never trusted.
pub fn serve(space: &IoSpace, mut stream: UnixStream) -> std::io::Result<()> {
    // Bound at the link's first request, not when it connects: a hot standby connects long
    // before it may touch the device and must not take the running driver's vectors.
    let mut bound: Option<Vectors> = None;
    let result = (|| loop {
        let mut req = [0u8; REQUEST_LEN];
        match stream.read_exact(&mut req) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let vectors = bound.get_or_insert_with(|| Vectors::bind(space));
        let (op, len) = (req[0], usize::from(req[1]));
        let arg = u32::from_le_bytes([req[4], req[5], req[6], req[7]]);
        let mut a = [0u8; 8];
        a.copy_from_slice(&req[8..16]);
        let addr = u64::from_le_bytes(a);
        let mut rsp = [0u8; RESPONSE_LEN];
        let status = if len > 8 {
            ST_MALFORMED
        } else {
            let data = &req[16..16 + len];
            let offset = u16::try_from(arg).unwrap_or(u16::MAX);
            let r = match op {
                OP_MMIO_READ if len > 0 => space
                    .mmio_read(addr, &mut rsp[8..8 + len])
                    .map_err(|_| ST_REFUSED),
                OP_MMIO_WRITE if len > 0 => space.mmio_write(addr, data).map_err(|_| ST_REFUSED),
                OP_CONFIG_READ => match space.config_read(space.bdf(), offset, len) {
                    Ok(v) => {
                        rsp[8..12].copy_from_slice(&v.to_le_bytes());
                        Ok(())
                    }
                    Err(_) => Err(ST_REFUSED),
                },
                OP_CONFIG_WRITE => space
                    .config_write(space.bdf(), offset, data)
                    .map_err(|_| ST_REFUSED),
                OP_WAIT_IRQ => {
                    let t = Duration::from_millis(u64::from(arg.min(1000)));
                    match vectors.wait(t) {
                        Ok(bits) => {
                            rsp[4..8].copy_from_slice(&bits.to_le_bytes());
                            Ok(())
                        }
                        Err(_) => Err(ST_REFUSED),
                    }
                }
                _ => Err(ST_MALFORMED),
            };
            r.err().unwrap_or(ST_OK)
        };
        rsp[..4].copy_from_slice(&status.to_le_bytes());
        stream.write_all(&rsp)?;
    })();
    if let Some(v) = bound {
        v.unbind(space);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::virtio_blk::{BlkConfig, VirtioBlk};
    use crate::emu::virtio_pci::VirtioPci;
    use crate::emu::PciBus;
    use crate::iommu::Iommu;

    fn space() -> (tempfile::TempDir, Arc<IoSpace>) {
        let dir = tempfile::tempdir().unwrap();
        let blk = VirtioBlk::new(&BlkConfig {
            path: dir.path().join("d.img"),
            size: 1 << 20,
            read_only: false,
            serial: "io-test".into(),
            workers: 1,
        })
        .unwrap();
        let dev = Arc::new(VirtioPci::new(Arc::new(blk), Iommu::new(8).device(), 11).unwrap());
        let bus = PciBus::new();
        let bdf = bus.plug(2, dev.clone()).unwrap();
        (dir, Arc::new(IoSpace::new(bdf, dev).unwrap()))
    }

    #[test]
    fn remote_io_sees_what_local_io_sees_and_is_checked_the_same() {
        let (_d, space) = space();
        let (a, b) = UnixStream::pair().unwrap();
        let srv = space.clone();
        let t = std::thread::spawn(move || serve(&srv, b));
        let remote = RemoteIo::new(a).unwrap();
        assert_eq!(remote.info().bars, space.info().bars);
        assert_eq!(remote.info().capabilities, space.info().capabilities);
        let bar4 = remote.info().bar(4).unwrap().address;
        let mut v = [0u8; 4];
        remote.mmio_read(bar4 + 0x04, &mut v).unwrap();
        assert_ne!(u32::from_le_bytes(v), 0, "device features");
        // Outside every BAR: refused by domain 0's I/O Space, and counted there.
        let before = space.violations();
        assert!(matches!(
            remote.mmio_write(0x10, &[1]),
            Err(IoError::Refused)
        ));
        assert_eq!(space.violations(), before + 1);
        // Moving a BAR is refused too.
        assert!(matches!(
            remote.config_write(0x20, &0x1000_0000u32.to_le_bytes()),
            Err(IoError::Refused)
        ));
        assert!(matches!(
            remote.mmio_read(bar4, &mut [0u8; 9]),
            Err(IoError::Malformed)
        ));
        assert_eq!(remote.wait_irq(Duration::from_millis(1)).unwrap(), 0);
        drop(remote);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn server_answers_garbage_without_trusting_it() {
        let (_d, space) = space();
        let (mut a, b) = UnixStream::pair().unwrap();
        let srv = space.clone();
        let t = std::thread::spawn(move || serve(&srv, b));
        for req in [[0xffu8; REQUEST_LEN], [0u8; REQUEST_LEN], {
            let mut r = [0u8; REQUEST_LEN];
            r[0] = OP_MMIO_READ;
            r[1] = 200;
            r
        }] {
            a.write_all(&req).unwrap();
            let mut rsp = [0u8; RESPONSE_LEN];
            a.read_exact(&mut rsp).unwrap();
            assert_eq!(
                i32::from_le_bytes(rsp[..4].try_into().unwrap()),
                ST_MALFORMED
            );
        }
        drop(a);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn local_io_binds_and_reports_vectors() {
        let (_d, space) = space();
        let io = LocalIo::new(space.clone());
        assert_eq!(io.vectors.fds.len(), 2);
        assert_eq!(io.wait_irq(Duration::ZERO).unwrap(), 0);
    }

    #[test]
    fn a_link_ending_after_its_successor_started_leaves_the_successors_vectors_bound() {
        use crate::emu::StubDevice;
        let stub = Arc::new(StubDevice::new(StubDevice::example_config()));
        let bus = PciBus::new();
        let bdf = bus.plug(3, stub.clone()).unwrap();
        let space = Arc::new(IoSpace::new(bdf, stub.clone()).unwrap());
        let link = || {
            let (a, b) = UnixStream::pair().unwrap();
            let srv = space.clone();
            let t = std::thread::spawn(move || serve(&srv, b));
            (RemoteIo::new(a).unwrap(), t)
        };
        // The dead process's link, then its successor's (both bound once probed).
        let (old, old_t) = link();
        let (new, new_t) = link();
        drop(old);
        old_t.join().unwrap().unwrap();
        assert!(
            stub.raise(Irq::MsiX(0)),
            "the successor's vector was unbound"
        );
        assert_eq!(new.wait_irq(Duration::from_millis(500)).unwrap() & 1, 1);
        drop(new);
        new_t.join().unwrap().unwrap();
        assert!(!stub.raise(Irq::MsiX(0)), "the last link unbinds");
    }
}

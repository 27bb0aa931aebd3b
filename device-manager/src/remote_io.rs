//! The IDD's end of its I/O Space link to domain 0 (`idd_blk::io`'s wire protocol), with a
//! probe that works under the I/O Space's command-register policy.
//!
//! `idd_blk::io::RemoteIo::new` sizes the BARs with decoding switched off (a dword write of
//! the command register), which the I/O Space refuses by design (the command register's
//! decode bits are fixed by domain 0). Here the probe's command-register writes are not sent
//! (decoding stays as domain 0 set it: sizing a BAR never moves it, the I/O Space shadows
//! the BARs); every other access is sent unchanged and checked by domain 0.
//!
//! Wire format (from `idd_blk::io`): request of [`REQUEST_LEN`] bytes `op`, `len`, 2 reserved,
//! `arg` (LE u32), `addr` (LE u64), up to 8 data bytes; response of [`RESPONSE_LEN`] bytes:
//! status (LE i32), pending vectors (LE u32), up to 8 data bytes. The response comes from
//! domain 0 and is checked: an unknown status is an error.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use idd_blk::io::{
    IoAccess, IoError, OP_CONFIG_READ, OP_CONFIG_WRITE, OP_MMIO_READ, OP_MMIO_WRITE, OP_WAIT_IRQ,
    REQUEST_LEN, RESPONSE_LEN, ST_OK, ST_REFUSED,
};
use iospace::pci::{ConfigAccess, DeviceInfo, PciError};

/// Offset of the command register's dword.
const COMMAND_DWORD: u16 = 4;

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
    (&mut &*s).write_all(&req).map_err(IoError::Link)?;
    let mut rsp = [0u8; RESPONSE_LEN];
    (&mut &*s).read_exact(&mut rsp).map_err(IoError::Link)?;
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

struct ProbeConfig<'a>(&'a File);

impl ConfigAccess for ProbeConfig<'_> {
    fn read_u32(&self, offset: u16) -> iospace::pci::Result<u32> {
        let (_, d) = call(self.0, OP_CONFIG_READ, 4, offset.into(), 0, &[])
            .map_err(|_| PciError::BadOffset(offset))?;
        Ok(u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
    }
    fn write_u32(&mut self, offset: u16, value: u32) -> iospace::pci::Result<()> {
        if offset == COMMAND_DWORD {
            // Decoding is fixed by domain 0 (see the module docs).
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

/// The I/O Space in domain 0, over a socket.
pub struct ManagedIo {
    stream: File,
    info: DeviceInfo,
}

impl ManagedIo {
    /// Probe the device over `stream` (connected to `idd_blk::io::serve`).
    pub fn new(stream: UnixStream) -> Result<Self, IoError> {
        // Plain read(2)/write(2) (the sandbox allows them; std's socket reads use recvfrom).
        let stream = File::from(OwnedFd::from(stream));
        let info = DeviceInfo::probe(&mut ProbeConfig(&stream)).map_err(IoError::Probe)?;
        Ok(Self { stream, info })
    }

    /// The link's descriptor (to keep open when entering the sandbox).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.stream)
    }
}

impl IoAccess for ManagedIo {
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
        if buf.len() > 8 {
            return Err(IoError::Malformed);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use iospace::emu::virtio_blk::{BlkConfig, VirtioBlk};
    use iospace::emu::virtio_pci::VirtioPci;
    use iospace::emu::PciBus;
    use iospace::iommu::Iommu;
    use iospace::space::IoSpace;
    use std::sync::Arc;

    #[test]
    fn probes_a_virtio_blk_pci_through_domain_0s_checks() {
        let dir = tempfile::tempdir().unwrap();
        let blk = VirtioBlk::new(&BlkConfig {
            path: dir.path().join("d.img"),
            size: 1 << 20,
            read_only: false,
            serial: "t".into(),
            workers: 1,
        })
        .unwrap();
        let iommu = Iommu::new(16);
        let pci = Arc::new(VirtioPci::new(Arc::new(blk), iommu.device(), 11).unwrap());
        let bus = PciBus::new();
        let bdf = bus.plug(4, pci.clone()).unwrap();
        let space = Arc::new(IoSpace::new(bdf, pci).unwrap());
        let (a, b) = UnixStream::pair().unwrap();
        let s2 = space.clone();
        let t = std::thread::spawn(move || idd_blk::io::serve(&s2, b));
        let io = ManagedIo::new(a).unwrap();
        assert_eq!(io.info().bars.len(), space.info().bars.len());
        assert!(io.info().msix().is_some());
        // Outside every BAR: refused by domain 0, not served.
        let mut buf = [0u8; 4];
        assert!(matches!(
            io.mmio_read(0x10, &mut buf),
            Err(IoError::Refused)
        ));
        drop(io);
        t.join().unwrap().unwrap();
    }
}

//! `blkfront-domain`: blkfront in a sandboxed process domain, running a verifying workload.
//!
//! ```text
//! blkfront-domain DEVID MILLIS
//! ```
//!
//! Started by the process-domain launcher (platform and `PDOM_STORE_PORT` from the launch
//! environment), it enters the sandbox, connects to disk `DEVID` through XenStore, and for
//! `MILLIS` milliseconds keeps 16 writes in flight (4 KiB..64 KiB at pseudo-random, overlapping
//! places), keeping a model of the disk that is updated only when a write is acknowledged.
//! Then it reads the whole disk back and compares. It prints one line,
//! `blkfront-domain: ok acked=N connects=C reissued=R hash=H` (`H`: FNV-1a 64 of the final
//! disk, which the manager compares with the image) and exits 0, or prints the failure and
//! exits 1. It survives its backend being replaced in the middle (the reconnect protocol).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devchan::platform::{Platform, PlatformError, Port};
use guest_frontends::blkfront::{BlkFront, BlkFrontConfig, EventWait};
use hypervisor::process::ProcessPlatform;
use hypervisor::sandbox::SandboxConfig;
use hypervisor::store_link::{process_client, EventMux};

/// blkfront's event waits, shared with the XenStore link through the domain's multiplexer.
struct MuxEvents(Arc<EventMux<ProcessPlatform>>);

impl EventWait for MuxEvents {
    fn wait(&self, port: Port, timeout: Duration) -> Result<bool, PlatformError> {
        match self.0.wait_any(&[port], Some(timeout)) {
            Ok(fired) => Ok(!fired.is_empty()),
            Err(PlatformError::TimedOut) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The workload's data for write number `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            u8::try_from((i.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)) % 251).unwrap_or(0)
        })
        .collect()
}

/// FNV-1a, 64 bits.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn run(devid: u16, millis: u64) -> Result<String, String> {
    let (platform, _report) =
        ProcessPlatform::enter(SandboxConfig::default()).map_err(|e| format!("enter: {e}"))?;
    let mux = EventMux::new(Arc::new(platform));
    let xs = process_client(&mux).map_err(|e| format!("XenStore: {e}"))?;
    let me = mux.platform().domid();
    let mut cfg = BlkFrontConfig::new(me, devid);
    cfg.max_pages = 192;
    cfg.stall_timeout = Duration::from_millis(500);
    cfg.io_timeout = Some(Duration::from_secs(30));
    let events = Box::new(MuxEvents(mux.clone()));
    let mut f = BlkFront::connect_with(mux.platform().clone(), xs, events, cfg)
        .map_err(|e| format!("connect: {e}"))?;
    let sectors = f.capacity() / 512;
    let size = usize::try_from(f.capacity()).map_err(|e| e.to_string())?;
    if sectors < 256 {
        return Err(format!("disk of {sectors} sectors is too small"));
    }
    let mut model = vec![0u8; size];
    let deadline = Instant::now() + Duration::from_millis(millis);
    let (mut acked, mut seed) = (0u64, 0u64);
    while Instant::now() < deadline {
        let mut batch = Vec::new();
        for _ in 0..16 {
            let sector = (seed.wrapping_mul(2_654_435_761) >> 7) % (sectors - 128);
            let data = pattern(seed, 4096 * (1 + usize::try_from(seed % 16).unwrap_or(0)));
            let t = f
                .submit_write(sector, data.clone())
                .map_err(|e| format!("submit: {e}"))?;
            batch.push((t, sector, data));
            seed += 1;
        }
        for (t, sector, data) in batch {
            f.wait(t).map_err(|e| format!("write at {sector}: {e}"))?;
            let off = usize::try_from(sector * 512).map_err(|e| e.to_string())?;
            model[off..off + data.len()].copy_from_slice(&data);
            acked += 1;
        }
    }
    f.flush().map_err(|e| format!("flush: {e}"))?;
    let mut disk = vec![0u8; size];
    f.read(0, &mut disk)
        .map_err(|e| format!("read back: {e}"))?;
    if disk != model {
        let at = disk
            .iter()
            .zip(&model)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(format!(
            "disk differs from the acknowledged writes at byte {at}"
        ));
    }
    let s = f.stats();
    Ok(format!(
        "ok acked={acked} connects={} reissued={} hash={:016x}",
        s.connects,
        s.reissued,
        fnv(&disk)
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(devid), Some(millis)) = (
        args.first().and_then(|a| a.parse().ok()),
        args.get(1).and_then(|a| a.parse().ok()),
    ) else {
        eprintln!("usage: blkfront-domain DEVID MILLIS");
        return ExitCode::from(2);
    };
    match run(devid, millis) {
        Ok(line) => {
            println!("blkfront-domain: {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("blkfront-domain: FAILED {e}");
            ExitCode::FAILURE
        }
    }
}

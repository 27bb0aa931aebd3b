//! `blk-guest`: the program of a process guest with one disk, driven through the Rust blkfront.
//!
//! ```text
//! blk-guest workload --secs S --blocks N [--seed X] [--depth D] [--probe-oob]
//! blk-guest nbd --socket PATH
//! ```
//!
//! Started by the manager in the guest's domain (it takes its platform and XenStore port from
//! the launch environment), it enters the sandbox first, then connects blkfront to device
//! `vbd/51712` as the toolstack described it.
//!
//! # workload
//!
//! Reads the first `N` 4 KiB blocks of its disk into a model, then for `S` seconds keeps `D`
//! operations in flight, a random mix of reads and writes (never two at once on one block).
//! A write's data is a pattern derived from (seed, block, version); once acknowledged the
//! model holds it. Every read is compared with the model. At the end every block is read back
//! and compared. With `--probe-oob` the guest's view of the disk size is inflated by one block
//! (a lying XenStore wrapper) so that a write just past its region really reaches the backend,
//! which must refuse it. The last stdout line is
//! `summary ops=.. writes=.. reads=.. mismatches=.. verified=.. digest=HEX oob=.. max_gap_us=..
//! reconnects=.. reissued=..`, where `digest` is [`device_manager::fnv64`] over the model (the
//! expected content of those blocks) for the caller to check against the image.
//!
//! # nbd
//!
//! Exports the disk on a Unix socket to one NBD client: the socket is bound and the client
//! accepted before the sandbox (which forbids `accept`); the session ends the program.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use devchan::platform::{Platform, PlatformError, Port};
use device_manager::{fnv64, pattern, BLOCK, VBD_DEVID};
use guest_frontends::blkfront::{
    BlkError, BlkFront, BlkFrontConfig, EventWait, FrontStore, StoreError,
};
use guest_frontends::nbd::{self, Export};
use hypervisor::process::ProcessPlatform;
use hypervisor::sandbox::SandboxConfig;
use hypervisor::store_link::{process_client, EventMux, StoreClient};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Mixed verified read/write workload.
    Workload {
        /// How long to run the mixed phase.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// 4 KiB blocks used (from the start of the disk).
        #[arg(long, default_value_t = 256)]
        blocks: u64,
        /// Seed of the data patterns and the op mix.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Operations in flight.
        #[arg(long, default_value_t = 8)]
        depth: usize,
        /// Also write one block past the disk's end and report what the backend said.
        #[arg(long)]
        probe_oob: bool,
    },
    /// Throughput: one access pattern for a while, as fast as the frontend goes.
    Bench {
        /// `randread`, `randwrite`, `seqread` or `seqwrite`.
        #[arg(long)]
        pattern: String,
        /// Bytes per operation (a multiple of 512).
        #[arg(long, default_value_t = 4096)]
        bs: usize,
        /// Operations in flight.
        #[arg(long, default_value_t = 16)]
        depth: usize,
        /// How long.
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// Bytes of the disk used (from its start).
        #[arg(long, default_value_t = 8 << 20)]
        span: u64,
    },
    /// Export the disk over NBD on a Unix socket.
    Nbd {
        /// Socket path.
        #[arg(long)]
        socket: std::path::PathBuf,
    },
}

/// Event waits through the domain's multiplexer (shared with the XenStore ring).
struct MuxEvents(Arc<EventMux<ProcessPlatform>>);

impl EventWait for MuxEvents {
    fn wait(&self, port: Port, timeout: Duration) -> std::result::Result<bool, PlatformError> {
        match self.0.wait_any(&[port], Some(timeout)) {
            Ok(p) => Ok(!p.is_empty()),
            Err(PlatformError::TimedOut) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The guest's store, optionally lying about the backend's `sectors` (a misbehaving guest).
struct Store {
    inner: StoreClient<ProcessPlatform>,
    extra_sectors: u64,
}

impl FrontStore for Store {
    fn read(&mut self, path: &str) -> std::result::Result<Option<Vec<u8>>, StoreError> {
        let v = FrontStore::read(&mut self.inner, path)?;
        if self.extra_sectors == 0 || !path.ends_with("/sectors") || path.contains("/device/") {
            return Ok(v);
        }
        Ok(v.map(|v| {
            let n: u64 = std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            (n + self.extra_sectors).to_string().into_bytes()
        }))
    }
    fn write(&mut self, path: &str, value: &[u8]) -> std::result::Result<(), StoreError> {
        FrontStore::write(&mut self.inner, path, value)
    }
    fn write_all(&mut self, kvs: &[(String, Vec<u8>)]) -> std::result::Result<(), StoreError> {
        self.inner.write_all(kvs)
    }
}

type Front = BlkFront<ProcessPlatform, Store>;

fn connect(extra_sectors: u64) -> Result<Front> {
    let (platform, _report) =
        ProcessPlatform::enter(SandboxConfig::default()).context("sandbox")?;
    connect_entered(platform, extra_sectors)
}

fn connect_entered(platform: ProcessPlatform, extra_sectors: u64) -> Result<Front> {
    let mux = EventMux::new(Arc::new(platform));
    let xs = process_client(&mux).context("XenStore")?;
    let me = mux.platform().domid();
    let mut cfg = BlkFrontConfig::new(me, VBD_DEVID);
    cfg.max_pages = 128;
    cfg.stall_timeout = Duration::from_secs(3);
    let store = Store {
        inner: xs,
        extra_sectors,
    };
    let plat = mux.platform().clone();
    BlkFront::connect_with(plat, store, Box::new(MuxEvents(mux)), cfg).context("blkfront connect")
}

#[derive(Clone, Copy)]
struct Op {
    token: u64,
    block: u64,
    write: Option<u64>,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

#[allow(clippy::too_many_lines)]
fn workload(secs: f64, blocks: u64, seed: u64, depth: usize, probe_oob: bool) -> Result<()> {
    let spb = BLOCK as u64 / 512;
    let mut f = connect(if probe_oob { spb } else { 0 })?;
    // capacity() is in bytes.
    let capacity = f.capacity() / 512 - if probe_oob { spb } else { 0 };
    if blocks == 0 || blocks * spb > capacity || depth == 0 {
        bail!("{blocks} blocks do not fit a disk of {capacity} sectors (or depth 0)");
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "connected sectors={capacity}")?;
    out.flush()?;
    // The model starts from what is on the disk.
    let mut model = Vec::with_capacity(usize::try_from(blocks)?);
    for b in 0..blocks {
        let mut buf = vec![0u8; BLOCK];
        f.read(b * spb, &mut buf).context("initial read")?;
        model.push(buf);
    }
    let mut version = vec![0u64; model.len()];
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let (mut ops, mut writes, mut reads, mut mismatches) = (0u64, 0u64, 0u64, 0u64);
    let mut inflight: VecDeque<Op> = VecDeque::new();
    let mut busy = HashSet::new();
    let mut max_gap = Duration::ZERO;
    let mut last_done = Instant::now();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut last_progress = start;
    while Instant::now() < end || !inflight.is_empty() {
        while Instant::now() < end && inflight.len() < depth {
            let block = xorshift(&mut rng) % blocks;
            if !busy.insert(block) {
                continue;
            }
            let i = usize::try_from(block)?;
            let op = if xorshift(&mut rng) % 2 == 0 {
                version[i] += 1;
                let data = pattern(seed, block, version[i]);
                let token = f.submit_write(block * spb, data).context("submit write")?;
                Op {
                    token,
                    block,
                    write: Some(version[i]),
                }
            } else {
                let token = f.submit_read(block * spb, BLOCK).context("submit read")?;
                Op {
                    token,
                    block,
                    write: None,
                }
            };
            inflight.push_back(op);
        }
        // Complete in submission order (the frontend keeps later results until asked).
        let Some(op) = inflight.pop_front() else {
            continue;
        };
        let data = f
            .wait(op.token)
            .with_context(|| format!("block {}", op.block))?;
        let gap = last_done.elapsed();
        max_gap = max_gap.max(gap);
        last_done = Instant::now();
        let i = usize::try_from(op.block)?;
        match op.write {
            Some(v) => {
                model[i] = pattern(seed, op.block, v);
                writes += 1;
            }
            None => {
                if data != model[i] {
                    mismatches += 1;
                }
                reads += 1;
            }
        }
        busy.remove(&op.block);
        ops += 1;
        if last_progress.elapsed() >= Duration::from_millis(500) {
            last_progress = Instant::now();
            writeln!(out, "progress ops={ops}")?;
            out.flush()?;
        }
    }
    // Every acknowledged write reads back.
    let mut verified = 0u64;
    for (b, want) in model.iter().enumerate() {
        let mut buf = vec![0u8; BLOCK];
        f.read(b as u64 * spb, &mut buf).context("verify read")?;
        if &buf == want {
            verified += 1;
        } else {
            mismatches += 1;
        }
    }
    let oob = if probe_oob {
        match f.write(capacity, &[0x5a; BLOCK]) {
            Ok(()) => "accepted",
            Err(BlkError::Io) => "error",
            Err(e) => {
                eprintln!("blk-guest: out-of-region write: {e:?}");
                "other"
            }
        }
    } else {
        "none"
    };
    let mut all = Vec::with_capacity(model.len() * BLOCK);
    model.iter().for_each(|b| all.extend_from_slice(b));
    let st = f.stats();
    writeln!(
        out,
        "summary ops={ops} writes={writes} reads={reads} mismatches={mismatches} verified={verified} digest={:016x} oob={oob} max_gap_us={} reconnects={} reissued={}",
        fnv64(&all),
        max_gap.as_micros(),
        st.connects.saturating_sub(1),
        st.reissued
    )?;
    out.flush()?;
    Ok(())
}

/// `blk-guest bench`: prints `result ops=N bytes=B secs=S`.
fn bench(pattern: &str, bs: usize, depth: usize, secs: f64, span: u64) -> Result<()> {
    let (random, write) = match pattern {
        "randread" => (true, false),
        "randwrite" => (true, true),
        "seqread" => (false, false),
        "seqwrite" => (false, true),
        _ => bail!("unknown pattern {pattern}"),
    };
    if bs == 0 || bs % 512 != 0 || depth == 0 {
        bail!("--bs must be a positive multiple of 512 and --depth positive");
    }
    let mut f = connect(0)?;
    let span = span.min(f.capacity());
    let slots = span / bs as u64;
    if slots == 0 {
        bail!("--span smaller than one operation");
    }
    let spo = bs as u64 / 512;
    let data = vec![0xa5u8; bs];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = 0u64;
    let mut inflight = VecDeque::new();
    let (mut ops, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end || !inflight.is_empty() {
        while Instant::now() < end && inflight.len() < depth {
            let slot = if random {
                xorshift(&mut rng) % slots
            } else {
                next = (next + 1) % slots;
                next
            };
            let t = if write {
                f.submit_write(slot * spo, data.clone())?
            } else {
                f.submit_read(slot * spo, bs)?
            };
            inflight.push_back(t);
        }
        if let Some(t) = inflight.pop_front() {
            f.wait(t)?;
            ops += 1;
            bytes += bs as u64;
        }
    }
    println!(
        "result ops={ops} bytes={bytes} secs={:.6}",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn nbd_export(socket: &std::path::Path) -> Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    println!("nbd listening {}", socket.display());
    std::io::stdout().flush()?;
    // The sandbox forbids accept: take the one client first, then confine.
    let (s, _) = listener.accept().context("accept")?;
    drop(listener);
    // Plain read(2)/write(2): the sandbox allows those, not recvfrom/sendto.
    let mut s = std::fs::File::from(std::os::fd::OwnedFd::from(s));
    let mut sandbox = SandboxConfig::default();
    sandbox.keep_fds.push(s.as_raw_fd());
    let (platform, _report) = ProcessPlatform::enter(sandbox).context("sandbox")?;
    let f = connect_entered(platform, 0)?;
    let export = Export {
        name: "disk".into(),
        device: Arc::new(Mutex::new(f)),
    };
    nbd::serve(&mut s, &export).context("NBD session")?;
    println!("nbd session ended");
    Ok(())
}

fn main() -> ExitCode {
    let r = match Args::parse().mode {
        Mode::Workload {
            secs,
            blocks,
            seed,
            depth,
            probe_oob,
        } => workload(secs, blocks, seed, depth, probe_oob),
        Mode::Bench {
            pattern,
            bs,
            depth,
            secs,
            span,
        } => bench(&pattern, bs, depth, secs, span),
        Mode::Nbd { socket } => nbd_export(&socket),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blk-guest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! A process domain for tests and benchmarks, started through `hypervisor::launch`.
//!
//! Every role except `probe*` takes its platform from the launch environment, then confines
//! itself with the sandbox before doing anything else. Roles (argument 1):
//!
//! * `front <back-domid> <n> <inflight> <max-len> [sync]`: allocates a ring page, grants it and
//!   `<inflight>` data frames to the back, allocates an unbound port, prints
//!   `READY <ring-gref> <port>`, then sends `<n>` requests (at most `<inflight>` outstanding),
//!   each naming a fresh payload of 1..=`<max-len>` bytes in a granted data frame, and checks
//!   every response's checksum. Prints `DONE <n> <elapsed-ns> <rtt-p50-ns> <rtt-p99-ns>`.
//! * `back <front-domid> <ring-gref> <port> <n> [sync]`: maps the ring, binds the port, answers `<n>`
//!   requests: grant-copies each payload out of the front's page into its own memory (one
//!   hypercall batch per run of requests) and responds with the checksum. Prints `DONE <n>`.
//!   Both notify with posted sends unless `sync` is given (then each send waits for its status).
//! * `grant <peer-domid>`: grants one data frame (filled with a pattern) read-only to the peer,
//!   prints `READY <gref>`, then waits until killed.
//! * `ring-grant <peer-domid>`: allocates a shareable page, writes `RING` at offset 0, grants
//!   it writable to the peer, prints `READY <gref> <frame>`, then waits until killed.
//! * `resume <peer-domid> <gref> <frame>`: a restarted process of the `ring-grant` domain:
//!   checks that grant `<gref>` of `<frame>` to the peer is still live and found, maps the page
//!   again and prints `RESUMED <new-gref> <bytes 4..8 of the page>` (the new grant must not
//!   reuse `<gref>`), then ends `<gref>` once the peer stopped using it and prints `ENDED`.
//! * `copybench <granter> <gref> <iterations>`: times grant copies of 64, 1500 and 4096 bytes
//!   out of the granted page, one per hypercall and 32 per hypercall; prints
//!   `COPY <bytes> <ns-per-copy-single> <ns-per-copy-batched>` lines.
//! * `thief <victim> <gref> <port>`: tries to map, copy and bind what the victim granted or
//!   allocated for someone else, and to send on a port it does not own; prints `REFUSED` if
//!   every attempt failed, `LEAK <what>` otherwise.
//! * `crash`: sandboxes itself and aborts (`SIGABRT`).
//! * `probe` / `probe-kill`: no platform; sandboxes itself (denied calls fail with `EPERM`, or
//!   kill with `SIGSYS`), then tries `openat`, `socket` and `execve` and reports each outcome,
//!   and shows that allowed work (memory, stdout, an eventfd made before the sandbox) goes on.
//! * `pipe-echo` / `shm-echo`: baselines for the benchmark, without our layers: echo 8-byte
//!   messages on stdin/stdout, or ping-pong a counter in a memfd (fd 3) with eventfds 4 and 5.

use devchan::grant::{status as gntst, DomId, GrantRef};
use devchan::platform::{CopyPtr, Frame, GrantCopyOp, Platform, Port, SharedPage};
use devchan::ring::{BackRing, FrontRing};
use hypervisor::process::ProcessPlatform;
use hypervisor::sandbox::{self, DenyAction, SandboxConfig};
use std::io::Write;
use std::time::{Duration, Instant};

/// A request: `[id | gref << 32, offset | len << 16, seq]`.
type Req = [u64; 3];
/// A response: `[id, checksum]` (`u64::MAX` if the copy failed).
type Rsp = [u64; 2];

const FIRST_DATA_FRAME: Frame = 7;
const WAIT: Duration = Duration::from_secs(20);
type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = args.first().map(String::as_str).unwrap_or("");
    let r = match role {
        "front" => front(&args[1..]),
        "back" => back(&args[1..]),
        "grant" => grant(&args[1..]),
        "ring-grant" => ring_grant(&args[1..]),
        "resume" => resume(&args[1..]),
        "copybench" => copybench(&args[1..]),
        "thief" => thief(&args[1..]),
        "crash" => crash(),
        "probe" => probe(DenyAction::Errno),
        "probe-kill" => probe(DenyAction::KillProcess),
        "pipe-echo" => pipe_echo(),
        "shm-echo" => shm_echo(),
        _ => Err(format!("unknown role {role:?}").into()),
    };
    if let Err(e) = r {
        eprintln!("domain-test {role}: {e}");
        std::process::exit(1);
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> Res<T> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("argument {i} missing or malformed").into())
}

fn say(line: &str) -> Res<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// The platform from the launch environment, then the sandbox.
fn start() -> Res<ProcessPlatform> {
    Ok(ProcessPlatform::enter(SandboxConfig::default())?.0)
}

/// The payload of request `seq`, and its checksum (FNV-1a over the bytes, xor `seq`).
fn payload(seq: u64, len: usize) -> (Vec<u8>, u64) {
    let bytes: Vec<u8> = (0..len)
        .map(|j| (seq.wrapping_mul(31).wrapping_add(j as u64 * 7) ^ (seq >> 8)).to_le_bytes()[0])
        .collect();
    let sum = checksum(&bytes) ^ seq;
    (bytes, sum)
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Notify `port`: posted (the default, exceptionless) or synchronous (`sync` given).
fn notify(p: &ProcessPlatform, port: Port, sync: bool) -> Res<()> {
    if sync {
        p.evtchn_notify(port)?;
    } else {
        p.evtchn_notify_posted(port)?;
    }
    Ok(())
}

fn sync_arg(args: &[String], i: usize) -> bool {
    args.get(i).is_some_and(|a| a == "sync")
}

/// Wait for an event and unmask what arrived.
fn wait_event(p: &ProcessPlatform) -> Res<()> {
    for port in p.evtchn_wait(Some(WAIT))? {
        p.evtchn_unmask(port)?;
    }
    Ok(())
}

fn front(args: &[String]) -> Res<()> {
    let back: DomId = arg(args, 0)?;
    let n: u64 = arg(args, 1)?;
    let inflight: usize = arg(args, 2)?;
    let max_len: u64 = arg::<u64>(args, 3)?.clamp(1, 4096);
    let sync = sync_arg(args, 4);
    let p = start()?;
    let ring_page = p.alloc_shared_page()?;
    let ring_ptr = std::ptr::NonNull::new(ring_page.as_ptr()).ok_or("null ring page")?;
    // SAFETY: the page is 4 KiB, page-aligned, owned by `ring_page` which outlives the ring,
    // and in this process accessed only through this ring.
    let mut ring = unsafe { FrontRing::<Req, Rsp>::init(ring_ptr, 4096)? };
    let inflight = inflight.clamp(1, ring.size() as usize);
    let ring_gref = p.grant_access(back, ring_page.frame(), false)?;
    let slots: Vec<(Frame, GrantRef)> = (0..inflight as u64)
        .map(|i| {
            Ok((
                FIRST_DATA_FRAME + i,
                p.grant_access(back, FIRST_DATA_FRAME + i, true)?,
            ))
        })
        .collect::<Res<_>>()?;
    let port = p.evtchn_alloc_unbound(back)?;
    say(&format!("READY {ring_gref} {port}"))?;

    let mut free: Vec<usize> = (0..inflight).rev().collect();
    let mut outstanding: Vec<Option<(u64, Instant)>> = vec![None; inflight];
    let mut rtts = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(1 << 20));
    let (mut sent, mut done) = (0u64, 0u64);
    let start = Instant::now();
    while done < n {
        while sent < n && !ring.is_full() {
            let Some(slot) = free.pop() else { break };
            let len = 1 + (sent * 131) % max_len;
            let offset = (sent * 64) % (4096 - len + 1);
            let (bytes, sum) = payload(sent, usize::try_from(len)?);
            p.write_local(slots[slot].0, usize::try_from(offset)?, &bytes)?;
            outstanding[slot] = Some((sum, Instant::now()));
            let w0 = slot as u64 | u64::from(slots[slot].1) << 32;
            ring.put_request(&[w0, offset | len << 16, sent])?;
            sent += 1;
        }
        if ring.push_requests() {
            // Before the back has bound, a send may fail: it will find the requests anyway
            // when it first checks the ring.
            let _ = notify(&p, port, sync);
        }
        let mut progressed = false;
        while let Some([id, sum]) = ring.get_response()? {
            let slot = usize::try_from(id)
                .ok()
                .filter(|&s| s < inflight)
                .ok_or("bad response id")?;
            let (want, t0) = outstanding[slot]
                .take()
                .ok_or("response for an idle slot")?;
            if sum != want {
                return Err(
                    format!("checksum mismatch on slot {slot}: {sum:#x} != {want:#x}").into(),
                );
            }
            rtts.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
            free.push(slot);
            done += 1;
            progressed = true;
        }
        if done == n || progressed || (sent < n && !free.is_empty() && !ring.is_full()) {
            continue;
        }
        if !ring.final_check_for_responses()? {
            wait_event(&p)?;
        }
    }
    let elapsed = start.elapsed().as_nanos();
    rtts.sort_unstable();
    let pct = |percent: usize| {
        rtts.get(rtts.len().saturating_sub(1) * percent / 100)
            .copied()
            .unwrap_or(0)
    };
    say(&format!("DONE {n} {elapsed} {} {}", pct(50), pct(99)))?;
    Ok(())
}

fn back(args: &[String]) -> Res<()> {
    let front: DomId = arg(args, 0)?;
    let ring_gref: GrantRef = arg(args, 1)?;
    let remote_port: Port = arg(args, 2)?;
    let n: u64 = arg(args, 3)?;
    let sync = sync_arg(args, 4);
    let p = start()?;
    let map = p.map_grant(front, ring_gref, false)?;
    let ring_ptr = std::ptr::NonNull::new(map.as_ptr()).ok_or("null mapping")?;
    // SAFETY: the mapping is one page, page-aligned, and outlives the ring; in this process it
    // is accessed only through this ring.
    let mut ring = unsafe { BackRing::<Req, Rsp>::attach(ring_ptr, 4096)? };
    let port = p.evtchn_bind_interdomain(front, remote_port)?;
    let mut done = 0u64;
    let mut batch: Vec<(u64, u64, usize)> = Vec::new();
    let mut ops: Vec<GrantCopyOp> = Vec::new();
    while done < n {
        batch.clear();
        ops.clear();
        while batch.len() < 64 {
            let Some([w0, w1, seq]) = ring.get_request()? else {
                break;
            };
            // Everything in the request is the front's word: bound it before use.
            let (id, gref) = (w0 & 0xFFFF_FFFF, (w0 >> 32) as u32);
            let (offset, len) = ((w1 & 0xFFFF) as u16, ((w1 >> 16) & 0xFFFF) as u16);
            let ok = w1 >> 32 == 0 && len > 0 && usize::from(offset) + usize::from(len) <= 4096;
            let dst = FIRST_DATA_FRAME + batch.len() as u64;
            if ok {
                ops.push(GrantCopyOp {
                    src: CopyPtr::Grant {
                        domid: front,
                        gref,
                        offset,
                    },
                    dst: CopyPtr::Local {
                        frame: dst,
                        offset: 0,
                    },
                    len,
                });
            }
            batch.push((id, seq, if ok { usize::from(len) } else { 0 }));
        }
        if batch.is_empty() {
            if !ring.final_check_for_requests()? {
                wait_event(&p)?;
            }
            continue;
        }
        let statuses = p.grant_copy(&ops)?;
        let mut st = statuses.iter();
        let mut buf = [0u8; 4096];
        for (i, &(id, seq, len)) in batch.iter().enumerate() {
            let copied = len > 0 && st.next() == Some(&gntst::OKAY);
            let sum = if copied {
                p.read_local(FIRST_DATA_FRAME + i as u64, 0, &mut buf[..len])?;
                checksum(&buf[..len]) ^ seq
            } else {
                u64::MAX
            };
            ring.put_response(&[id, sum])?;
        }
        done += batch.len() as u64;
        if ring.push_responses() {
            notify(&p, port, sync)?;
        }
    }
    if p.posted_failures()? != 0 {
        return Err("a posted notify failed".into());
    }
    say(&format!("DONE {done}"))?;
    drop(map);
    Ok(())
}

fn grant(args: &[String]) -> Res<()> {
    let peer: DomId = arg(args, 0)?;
    let p = start()?;
    let (bytes, _) = payload(7, 4096);
    p.write_local(FIRST_DATA_FRAME, 0, &bytes)?;
    let gref = p.grant_access(peer, FIRST_DATA_FRAME, true)?;
    say(&format!("READY {gref}"))?;
    loop {
        let _ = p.evtchn_wait(Some(WAIT));
    }
}

fn ring_grant(args: &[String]) -> Res<()> {
    let peer: DomId = arg(args, 0)?;
    let p = start()?;
    let page = p.alloc_shared_page()?;
    for (i, b) in b"RING".iter().enumerate() {
        // SAFETY: offsets 0..4 are inside the mapped page; volatile because it is shared.
        unsafe { page.as_ptr().add(i).write_volatile(*b) };
    }
    let gref = p.grant_access(peer, page.frame(), false)?;
    say(&format!("READY {gref} {}", page.frame()))?;
    loop {
        let _ = p.evtchn_wait(Some(WAIT));
    }
}

fn resume(args: &[String]) -> Res<()> {
    let peer: DomId = arg(args, 0)?;
    let gref: GrantRef = arg(args, 1)?;
    let frame: Frame = arg(args, 2)?;
    let p = start()?;
    let live = p.granted();
    let ok = live
        .iter()
        .any(|(g, e)| *g == gref && e.domid == peer && Frame::from(e.frame) == frame);
    if !ok || p.find_grant(peer, frame) != Some(gref) {
        return Err(format!("grant {gref} not found after restart: {live:?}").into());
    }
    let page = p.reattach_page(frame)?;
    // SAFETY: offsets 0..8 are inside the mapped page; volatile because it is shared.
    let bytes: Vec<u8> = (0..8)
        .map(|i| unsafe { page.as_ptr().add(i).read_volatile() })
        .collect();
    if &bytes[..4] != b"RING" {
        return Err("ring page lost its contents".into());
    }
    let fresh = p.grant_access(peer, page.frame(), true)?;
    if fresh == gref {
        return Err("live grant handed out again".into());
    }
    say(&format!(
        "RESUMED {fresh} {}",
        String::from_utf8_lossy(&bytes[4..])
    ))?;
    let deadline = Instant::now() + WAIT;
    loop {
        match p.end_access(gref) {
            Ok(()) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e.into()),
        }
    }
    p.end_access(fresh)?;
    say("ENDED")
}

fn copybench(args: &[String]) -> Res<()> {
    let granter: DomId = arg(args, 0)?;
    let gref: GrantRef = arg(args, 1)?;
    let iters: u32 = arg::<u32>(args, 2)?.max(32);
    let p = start()?;
    for len in [64u16, 1500, 4096] {
        let op = |i: u64| GrantCopyOp {
            src: CopyPtr::Grant {
                domid: granter,
                gref,
                offset: 0,
            },
            dst: CopyPtr::Local {
                frame: FIRST_DATA_FRAME + i,
                offset: 0,
            },
            len,
        };
        let t = Instant::now();
        for _ in 0..iters {
            if p.grant_copy(&[op(0)])? != [gntst::OKAY] {
                return Err("copy failed".into());
            }
        }
        let single = t.elapsed().as_nanos() / u128::from(iters);
        let batch: Vec<GrantCopyOp> = (0..32).map(op).collect();
        let t = Instant::now();
        for _ in 0..iters / 32 {
            if p.grant_copy(&batch)?.iter().any(|&s| s != gntst::OKAY) {
                return Err("copy failed".into());
            }
        }
        let batched = t.elapsed().as_nanos() / u128::from(iters / 32 * 32);
        say(&format!("COPY {len} {single} {batched}"))?;
    }
    Ok(())
}

fn thief(args: &[String]) -> Res<()> {
    let victim: DomId = arg(args, 0)?;
    let gref: GrantRef = arg(args, 1)?;
    let port: Port = arg(args, 2)?;
    let p = start()?;
    let mut leaks = Vec::new();
    if p.map_grant(victim, gref, true).is_ok() {
        leaks.push("map");
    }
    let op = GrantCopyOp {
        src: CopyPtr::Grant {
            domid: victim,
            gref,
            offset: 0,
        },
        dst: CopyPtr::Local {
            frame: FIRST_DATA_FRAME,
            offset: 0,
        },
        len: 64,
    };
    if p.grant_copy(&[op])? == [gntst::OKAY] {
        leaks.push("copy");
    }
    // Our own frame as a "grant" of the victim, and a frame past our memory as local.
    let far = GrantCopyOp {
        dst: CopyPtr::Local {
            frame: u64::from(u32::MAX),
            offset: 0,
        },
        ..op
    };
    if p.grant_copy(&[far])? == [gntst::OKAY] {
        leaks.push("copy-far");
    }
    if p.evtchn_bind_interdomain(victim, port).is_ok() {
        leaks.push("bind");
    }
    if p.evtchn_notify(port).is_ok() {
        leaks.push("send");
    }
    if p.pin_grant(victim, gref, false).is_ok() {
        leaks.push("pin");
    }
    if leaks.is_empty() {
        say("REFUSED")
    } else {
        say(&format!("LEAK {}", leaks.join(",")))
    }
}

fn crash() -> Res<()> {
    let _p = start()?;
    std::process::abort();
}

fn probe(deny: DenyAction) -> Res<()> {
    // An eventfd made before the sandbox: allowed work afterwards uses it.
    let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::empty())?;
    let mut keep = vec![0, 1, 2];
    keep.push(std::os::fd::AsRawFd::as_raw_fd(&efd));
    let report = sandbox::apply(&SandboxConfig {
        keep_fds: keep,
        deny,
        ..Default::default()
    })?;
    say(&format!(
        "SANDBOXED userns={} netns={}",
        report.user_namespace, report.net_ipc_namespaces
    ))?;
    let outcome = |r: std::io::Result<()>| match r {
        Ok(()) => "ALLOWED".to_owned(),
        Err(e) => format!("DENIED {}", e.raw_os_error().unwrap_or(0)),
    };
    say(&format!(
        "open {}",
        outcome(std::fs::File::open("/etc/hostname").map(|_| ()))
    ))?;
    say(&format!(
        "socket {}",
        outcome(std::net::UdpSocket::bind("127.0.0.1:0").map(|_| ()))
    ))?;
    let exec = std::process::Command::new("/bin/true").status().map(|_| ());
    say(&format!("exec {}", outcome(exec)))?;
    // Allowed work: heap, an eventfd round trip, stdout.
    let v: Vec<u64> = (0..100_000).collect();
    rustix::io::write(&efd, &5u64.to_ne_bytes())?;
    let mut b = [0u8; 8];
    rustix::io::read(&efd, &mut b)?;
    say(&format!(
        "WORK {} {}",
        v.iter().sum::<u64>(),
        u64::from_ne_bytes(b)
    ))?;
    Ok(())
}

fn pipe_echo() -> Res<()> {
    let mut b = [0u8; 8];
    loop {
        let n = rustix::io::read(rustix::stdio::stdin(), &mut b)?;
        if n == 0 {
            return Ok(());
        }
        rustix::io::write(rustix::stdio::stdout(), &b[..n])?;
    }
}

fn shm_echo() -> Res<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicU64, Ordering};
    // SAFETY: the benchmark passes a memfd at 3 and eventfds at 4 (ping) and 5 (pong), owned by
    // nothing else in this process.
    let (mem, ping, pong) = unsafe {
        (
            OwnedFd::from_raw_fd(3),
            OwnedFd::from_raw_fd(4),
            OwnedFd::from_raw_fd(5),
        )
    };
    // SAFETY: a fresh shared mapping of one page of the memfd.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            4096,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            &mem,
            0,
        )?
    };
    // SAFETY: the page is mapped for the rest of the process and 8-aligned; both processes use
    // the two words only atomically.
    let (req, rsp) = unsafe { (&*ptr.cast::<AtomicU64>(), &*ptr.cast::<AtomicU64>().add(1)) };
    let mut b = [0u8; 8];
    loop {
        rustix::io::read(&ping, &mut b)?;
        let v = req.load(Ordering::Acquire);
        if v == u64::MAX {
            return Ok(());
        }
        rsp.store(v, Ordering::Release);
        rustix::io::write(&pong, &1u64.to_ne_bytes())?;
    }
}

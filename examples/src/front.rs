//! The demo frontend (runs sandboxed in the frontend domain).
//!
//! Connects through XenStore as a Xen split-driver frontend does (allocate and grant the ring
//! page, allocate an unbound event channel, write `ring-ref`/`event-channel`, `Initialised`,
//! then `Connected` once the backend is), then keeps a window of requests in flight, each
//! with its own payload page granted to the backend. Every response is verified (status,
//! digest, and the output the backend grant-copied into the page).
//!
//! # Outage handling
//!
//! If no response arrives for `timeout` while requests are outstanding, the frontend counts an
//! outage and reissues every unanswered request under a new id (same page, same input). A
//! logical request completes with the first verified response for any of its ids; later ones
//! are counted as duplicates. A payload page is reused only once every id issued for it has
//! been answered, so a late duplicate can never write into the next request's page.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use devchan::grant::DomId;
use devchan::platform::{Platform, SharedPage};
use devchan::ring::FrontRing;
use devchan::xenbus::{Action, Handshake, Role, XenbusState};
use hypervisor::process::ProcessPlatform;
use hypervisor::store_link::{EventMux, StoreClient};

use crate::proto::{self, DemoReq, DemoRsp};
use crate::{read_state, say};

/// First RAM frame used for payload pages.
const FIRST_PAGE: u64 = 7;

/// What the frontend does.
#[derive(Clone, Copy, Debug)]
pub struct FrontConfig {
    /// Logical requests to complete.
    pub requests: u64,
    /// Requests in flight at most (payload pages).
    pub window: usize,
    /// Input bytes per request.
    pub size: u16,
    /// No response for this long while requests are outstanding is an outage.
    pub timeout: Duration,
}

impl FrontConfig {
    /// RAM the frontend domain needs.
    pub fn nr_frames(&self) -> u64 {
        FIRST_PAGE + self.window as u64 + 1
    }
}

struct Slot {
    gref: u32,
    /// The logical request it carries, if any.
    logical: Option<u64>,
    done: bool,
    /// Ids issued for it that have no response yet.
    outstanding: u32,
    first_issue: Instant,
}

struct Stats {
    verified: u64,
    failed: u64,
    duplicates: u64,
    reissued: u64,
    rtts_us: Vec<u64>,
    outages: Vec<Duration>,
    /// The longest time without any response while requests were outstanding: what the
    /// guest saw of a backend restart, whether or not it reached the reissue timeout.
    max_gap: Duration,
}

/// Connect to the backend of device 0 and run `cfg`; prints progress and a `summary` line.
pub fn run(
    mux: &Arc<EventMux<ProcessPlatform>>,
    xs: &mut StoreClient<ProcessPlatform>,
    cfg: FrontConfig,
) -> Result<()> {
    if cfg.window == 0 || cfg.size == 0 || cfg.size > proto::MAX_LEN {
        bail!("bad window or size");
    }
    let p = mux.platform();
    let dir = proto::front_dir(p.domid());
    let bdir = String::from_utf8(xs.read(0, &format!("{dir}/backend"))?)?;
    let back = proto::parse_u32(&xs.read(0, &format!("{dir}/backend-id"))?)
        .and_then(|b| DomId::try_from(b).ok())
        .context("backend-id is not a domain id")?;
    // Our private node (the backend must not be able to read it).
    xs.write(
        0,
        &format!("/local/domain/{}/data/secret", p.domid()),
        b"frontend only",
    )?;

    // The ring page and the payload pages, granted once (persistent grants).
    let ring_page = p.alloc_shared_page()?;
    let ptr = std::ptr::NonNull::new(ring_page.as_ptr()).context("null ring page")?;
    // SAFETY: a fresh, page-aligned page of ours that lives as long as `ring_page` (kept to
    // the end of this function, after the ring's last use); accessed only through the ring.
    let mut ring = unsafe { FrontRing::<DemoReq, DemoRsp>::init(ptr, devchan::grant::PAGE_SIZE) }?;
    let mut slots: Vec<Slot> = (0..cfg.window)
        .map(|i| {
            let gref = p.grant_access(back, FIRST_PAGE + i as u64, false)?;
            Ok(Slot {
                gref,
                logical: None,
                done: true,
                outstanding: 0,
                first_issue: Instant::now(),
            })
        })
        .collect::<Result<_>>()?;

    // The XenBus handshake.
    xs.watch(&format!("{bdir}/state"), "back")?;
    let mut hs = Handshake::new(Role::Frontend);
    let mut port = None;
    while hs.state() != XenbusState::Connected {
        let peer = read_state(xs, &format!("{bdir}/state"));
        let action = hs.on_peer(peer);
        match action {
            Action::PublishRing => {
                let ring_ref = p.grant_access(back, ring_page.frame(), false)?;
                let evtchn = p.evtchn_alloc_unbound(back)?;
                xs.write(
                    0,
                    &format!("{dir}/ring-ref"),
                    ring_ref.to_string().as_bytes(),
                )?;
                xs.write(
                    0,
                    &format!("{dir}/event-channel"),
                    evtchn.to_string().as_bytes(),
                )?;
                say(&format!(
                    "frontend: published ring-ref {ring_ref}, event channel {evtchn}"
                ));
                port = Some(evtchn);
            }
            Action::TearDown(_) => bail!("backend closed during the handshake"),
            Action::Wait | Action::Connect | Action::Advertise | Action::MapRing { .. } => {}
        }
        match hs.completed(action) {
            Some(s) => {
                xs.write(0, &format!("{dir}/state"), s.to_xenstore().as_bytes())?;
                say(&format!("frontend: state {s}"));
            }
            None => {
                xs.next_event()?;
            }
        }
    }
    let port = port.context("connected without a ring")?;

    let mut st = Stats {
        verified: 0,
        failed: 0,
        duplicates: 0,
        reissued: 0,
        rtts_us: Vec::with_capacity(usize::try_from(cfg.requests).unwrap_or(0)),
        outages: Vec::new(),
        max_gap: Duration::ZERO,
    };
    let mut ids: HashMap<u64, (usize, Instant)> = HashMap::new();
    let mut next_id = 1u64;
    let mut next_logical = 0u64;
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut outage_since: Option<Instant> = None;
    let progress_every = (cfg.requests / 10).max(1);

    while st.verified + st.failed < cfg.requests {
        // Issue new logical requests into free slots.
        let mut pushed = false;
        for (i, s) in slots.iter_mut().enumerate() {
            if next_logical >= cfg.requests || ring.free_requests() == 0 {
                break;
            }
            if !(s.done && s.outstanding == 0) {
                continue;
            }
            let n = next_logical;
            next_logical += 1;
            p.write_local(
                FIRST_PAGE + i as u64,
                0,
                &proto::payload(n, usize::from(cfg.size)),
            )?;
            s.logical = Some(n);
            s.done = false;
            s.first_issue = Instant::now();
            issue(&mut ring, &mut ids, &mut next_id, i, s, cfg.size)?;
            pushed = true;
        }
        if pushed && ring.push_requests() {
            p.evtchn_notify_posted(port)?;
        }

        // Collect responses.
        let mut got = 0u64;
        while let Some(r) = ring.get_response()? {
            got += 1;
            let Some((i, sent)) = ids.remove(&r.id) else {
                bail!("response for unknown id {}", r.id);
            };
            let s = &mut slots[i];
            s.outstanding -= 1;
            if s.done {
                st.duplicates += 1;
                continue;
            }
            s.done = true;
            if verify(p, i, s, &r, cfg.size)? {
                st.verified += 1;
                st.rtts_us
                    .push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
            } else {
                st.failed += 1;
            }
            let done = st.verified + st.failed;
            if done % progress_every == 0 {
                say(&format!("progress {done} verified {}", st.verified));
            }
        }
        if got > 0 {
            st.max_gap = st.max_gap.max(last_progress.elapsed());
            last_progress = Instant::now();
            if let Some(t0) = outage_since.take() {
                st.outages.push(t0.elapsed());
                say(&format!(
                    "frontend: backend is back: outage {} ms",
                    t0.elapsed().as_millis()
                ));
            }
            continue;
        }
        if ring.final_check_for_responses()? {
            continue;
        }

        // Nothing to do: wait for the backend (or XenStore), or notice an outage.
        let waiting = slots.iter().any(|s| !s.done);
        if waiting && outage_since.is_none() && last_progress.elapsed() >= cfg.timeout {
            outage_since = Some(last_progress);
            let mut n = 0;
            for (i, s) in slots.iter_mut().enumerate() {
                if !s.done && ring.free_requests() > 0 {
                    issue(&mut ring, &mut ids, &mut next_id, i, s, cfg.size)?;
                    n += 1;
                }
            }
            st.reissued += n;
            say(&format!(
                "frontend: no response for {} ms: backend outage, reissued {n} requests",
                cfg.timeout.as_millis()
            ));
            if ring.push_requests() {
                p.evtchn_notify_posted(port)?;
            }
        }
        let store_port = xs.get_ref().port();
        let _ = mux.wait_any(&[port, store_port], Some(cfg.timeout / 4));
        if !xs.take_events().is_empty() || xs.get_ref().readable() {
            drain_events(xs)?;
        }
    }
    let elapsed = start.elapsed();

    // Close: Closing, wait for the backend to follow, Closed.
    xs.write(
        0,
        &format!("{dir}/state"),
        XenbusState::Closing.to_xenstore().as_bytes(),
    )?;
    let t0 = Instant::now();
    let mut closed = false;
    while t0.elapsed() < Duration::from_secs(5) {
        let b = read_state(xs, &format!("{bdir}/state"));
        if matches!(b, XenbusState::Closing | XenbusState::Closed) {
            xs.write(
                0,
                &format!("{dir}/state"),
                XenbusState::Closed.to_xenstore().as_bytes(),
            )?;
            closed = true;
            break;
        }
        let _ = mux.wait_any(&[xs.get_ref().port()], Some(Duration::from_millis(50)));
        drain_events(xs)?;
    }
    if !closed {
        say("frontend: backend did not close");
    }
    print_summary(&cfg, &mut st, elapsed);
    // `ring` is dropped before `ring_page` (reverse declaration order).
    if st.failed > 0 {
        bail!("{} responses failed verification", st.failed);
    }
    Ok(())
}

fn drain_events(xs: &mut StoreClient<ProcessPlatform>) -> Result<()> {
    xs.take_events();
    while xs.get_ref().readable() {
        xs.next_event()?;
    }
    xs.take_events();
    Ok(())
}

/// Put slot `i`'s request on the ring under a fresh id.
fn issue(
    ring: &mut FrontRing<DemoReq, DemoRsp>,
    ids: &mut HashMap<u64, (usize, Instant)>,
    next_id: &mut u64,
    i: usize,
    s: &mut Slot,
    size: u16,
) -> Result<()> {
    let id = *next_id;
    *next_id += 1;
    ring.put_request(&DemoReq {
        id,
        gref: s.gref,
        len: size,
        pad: 0,
    })?;
    ids.insert(id, (i, Instant::now()));
    s.outstanding += 1;
    Ok(())
}

/// Check a response against what slot `i`'s request must produce.
fn verify(p: &ProcessPlatform, i: usize, s: &Slot, r: &DemoRsp, size: u16) -> Result<bool> {
    let Some(n) = s.logical else {
        return Ok(false);
    };
    let input = proto::payload(n, usize::from(size));
    let mut out = vec![0u8; usize::from(size)];
    p.read_local(
        FIRST_PAGE + i as u64,
        usize::from(proto::OUTPUT_OFFSET),
        &mut out,
    )?;
    Ok(r.status == proto::STATUS_OK
        && r.digest == proto::digest(&input)
        && out == proto::transform(&input))
}

fn print_summary(cfg: &FrontConfig, st: &mut Stats, elapsed: Duration) {
    st.rtts_us.sort_unstable();
    let pct = |permille| percentile(&st.rtts_us, permille);
    let outage_ms: Vec<String> = st
        .outages
        .iter()
        .map(|d| d.as_millis().to_string())
        .collect();
    let secs = elapsed.as_secs_f64().max(1e-9);
    say(&format!(
        "summary requests={} verified={} failed={} duplicates={} reissued={} outages={} \
         outage_ms={} max_gap_us={} elapsed_ms={} req_per_s={:.0} p50_us={} p99_us={} max_us={} size={} window={}",
        cfg.requests,
        st.verified,
        st.failed,
        st.duplicates,
        st.reissued,
        st.outages.len(),
        if outage_ms.is_empty() { "-".to_string() } else { outage_ms.join(",") },
        st.max_gap.as_micros(),
        elapsed.as_millis(),
        (st.verified + st.failed) as f64 / secs,
        pct(500),
        pct(990),
        st.rtts_us.last().copied().unwrap_or(0),
        cfg.size,
        cfg.window,
    ));
}

/// The `permille`-th per-mille of `sorted` (nearest rank below); 0 when empty.
pub fn percentile(sorted: &[u64], permille: usize) -> u64 {
    let n = sorted.len();
    if n == 0 {
        return 0;
    }
    sorted[((n - 1) * permille.min(1000) / 1000).min(n - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 500), 50);
        assert_eq!(percentile(&v, 990), 99);
        assert_eq!(percentile(&v, 1000), 100);
        assert_eq!(percentile(&v, 5000), 100);
        assert_eq!(percentile(&[], 500), 0);
        assert_eq!(percentile(&[7], 990), 7);
    }

    #[test]
    fn frames_cover_every_payload_page() {
        let cfg = FrontConfig {
            requests: 1,
            window: 8,
            size: 64,
            timeout: Duration::from_millis(1),
        };
        assert_eq!(cfg.nr_frames(), FIRST_PAGE + 8 + 1);
    }
}

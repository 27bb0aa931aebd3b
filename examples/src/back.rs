//! The demo backend (runs sandboxed in the backend domain).
//!
//! Connects through XenStore as a Xen split-driver backend does: advertises, waits for the
//! frontend's `Initialised`, reads `ring-ref`/`event-channel`, maps the ring, binds the event
//! channel, goes `Connected`. Then serves requests with grant copies until the frontend
//! closes. A restarted process of the same domain finds both ends `Connected` in XenStore and
//! re-attaches to the ring at its shared indexes without touching any state key
//! (transparent re-attach): requests the dead process consumed but never answered are still in
//! their slots and are served again.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use devchan::grant::DomId;
use devchan::platform::{CopyPtr, GrantCopyOp, Platform, SharedPage};
use devchan::ring::BackRing;
use devchan::xenbus::{Action, Handshake, Role, XenbusState};
use hypervisor::process::ProcessPlatform;
use hypervisor::store_link::{EventMux, StoreClient};

use crate::proto::{self, DemoReq, DemoRsp};
use crate::{read_state, say};

/// Frames of our RAM used as copy buffers: inputs from here, outputs after them.
const FIRST_BUF: u64 = 7;
/// Requests served per round (one copy-in batch, one copy-out batch).
pub const BATCH: usize = 32;
/// RAM the backend domain needs.
pub const NR_FRAMES: u64 = FIRST_BUF + 2 * BATCH as u64 + 1;

// The copy buffers clear the platform's own frames and fit in the domain.
const _: () = assert!(FIRST_BUF >= hypervisor::memory::layout::FIRST_FREE_FRAME);
const _: () = assert!(FIRST_BUF + 2 * BATCH as u64 <= NR_FRAMES);
// The ring holds the frontend's largest window (64) twice (every request reissued once).
const _: () =
    assert!(devchan::ring::ring_size::<DemoReq, DemoRsp>(devchan::grant::PAGE_SIZE) >= 128);

struct Conn {
    ring: BackRing<DemoReq, DemoRsp>,
    port: u32,
    _map: <ProcessPlatform as Platform>::Mapping,
}

/// Run the backend for frontend `front`; returns when the frontend has closed.
pub fn run(
    mux: &Arc<EventMux<ProcessPlatform>>,
    xs: &mut StoreClient<ProcessPlatform>,
    front: DomId,
) -> Result<()> {
    let p = mux.platform();
    let me = p.domid();
    let dir = proto::back_dir(me, front);
    let fdir = proto::front_dir(front);
    let ours = read_state(xs, &format!("{dir}/state"));
    let theirs = read_state(xs, &format!("{fdir}/state"));
    // Isolation check for the demo: the frontend's private node is not ours to read.
    match xs.read(0, &format!("/local/domain/{front}/data")) {
        Err(devchan::xenstore::ClientError::Xs(e)) => say(&format!(
            "backend: reading the frontend's private data: {e} (as it should be)"
        )),
        Err(e) => return Err(e.into()),

        Ok(_) => bail!("backend could read the frontend's private data"),
    }
    xs.watch(&format!("{fdir}/state"), "front")?;
    let mut hs;
    let mut conn = None;
    if ours == XenbusState::Connected && theirs == XenbusState::Connected {
        say("backend: restarted; XenStore says Connected: re-attaching to the ring");
        hs = Handshake::resume(Role::Backend, XenbusState::Connected);
        conn = Some(map_ring(mux, xs, front, true)?);
    } else {
        hs = Handshake::new(Role::Backend);
    }
    let mut served = 0u64;
    loop {
        // XenStore: every watch event means "look at the frontend's state again".
        let mut look = conn.is_none();
        look |= !xs.take_events().is_empty();
        if xs.get_ref().readable() {
            xs.next_event()?;
            look = true;
        }
        if look {
            let peer = read_state(xs, &format!("{fdir}/state"));
            let action = hs.on_peer(peer);
            match action {
                Action::Advertise => {
                    xs.write(0, &format!("{dir}/feature-grant-copy"), b"1")?;
                }
                Action::MapRing { resume } => conn = Some(map_ring(mux, xs, front, resume)?),
                Action::TearDown(_) => conn = None,
                Action::Wait | Action::PublishRing | Action::Connect => {}
            }
            if let Some(s) = hs.completed(action) {
                xs.write(0, &format!("{dir}/state"), s.to_xenstore().as_bytes())?;
                say(&format!("backend: state {s}"));
                if s == XenbusState::Closed {
                    say(&format!("backend: served {served} requests, exiting"));
                    return Ok(());
                }
            }
        }
        let store_port = xs.get_ref().port();
        match conn.as_mut() {
            Some(c) => {
                served += serve(p, c, front)?;
                // Sleep until the frontend or XenStore signals (a timeout just loops).
                let _ = mux.wait_any(&[c.port, store_port], Some(Duration::from_millis(100)));
            }
            None => {
                let _ = mux.wait_any(&[store_port], Some(Duration::from_millis(100)));
            }
        }
    }
}

/// Map the frontend's ring and bind (or, on resume, find) our end of its event channel.
fn map_ring(
    mux: &Arc<EventMux<ProcessPlatform>>,
    xs: &mut StoreClient<ProcessPlatform>,
    front: DomId,
    resume: bool,
) -> Result<Conn> {
    let p = mux.platform();
    let fdir = proto::front_dir(front);
    let num = |xs: &mut StoreClient<ProcessPlatform>, key: &str| -> Result<u32> {
        let v = xs.read(0, &format!("{fdir}/{key}"))?;
        proto::parse_u32(&v).with_context(|| format!("frontend's {key} is not a number"))
    };
    let gref = num(xs, "ring-ref")?;
    let remote_port = num(xs, "event-channel")?;
    let map = p
        .map_grant(front, gref, false)
        .context("mapping the frontend's ring")?;
    let page = std::ptr::NonNull::new(map.as_ptr()).context("null ring mapping")?;
    // SAFETY: the mapping is one page, page-aligned, owned by `Conn` next to the ring (dropped
    // after it: field order), and only accessed through the ring's atomics and volatile copies.
    let ring = unsafe { BackRing::attach(page, devchan::grant::PAGE_SIZE) }?;
    let key = proto::back_port_key(p.domid(), front);
    let port = match resume.then(|| xs.read(0, &key)).and_then(|r| r.ok()) {
        Some(v) => proto::parse_u32(&v).context("our saved port is not a number")?,
        None => {
            let port = p.evtchn_bind_interdomain(front, remote_port)?;
            xs.write(0, &key, port.to_string().as_bytes())?;
            port
        }
    };
    // A process that died between a wait and its unmask left the port masked.
    p.evtchn_unmask(port)?;
    say(&format!(
        "backend: mapped ring-ref {gref}, event channel {remote_port} -> our port {port}{}",
        if resume {
            " (resumed at the shared indexes)"
        } else {
            ""
        }
    ));
    Ok(Conn {
        ring,
        port,
        _map: map,
    })
}

/// Serve every request on the ring; returns how many.
fn serve(p: &ProcessPlatform, c: &mut Conn, front: DomId) -> Result<u64> {
    let mut n = 0u64;
    loop {
        let mut reqs = Vec::with_capacity(BATCH);
        while reqs.len() < BATCH {
            match c.ring.get_request()? {
                Some(r) => reqs.push(r),
                None => break,
            }
        }
        if reqs.is_empty() {
            if c.ring.final_check_for_requests()? {
                continue;
            }
            return Ok(n);
        }
        let statuses = handle_batch(p, &reqs, front)?;
        for (r, (status, digest)) in reqs.iter().zip(statuses) {
            c.ring.put_response(&DemoRsp {
                id: r.id,
                status,
                digest,
            })?;
        }
        if c.ring.push_responses() {
            p.evtchn_notify_posted(c.port)?;
        }
        n += reqs.len() as u64;
    }
}

/// Copy each request's input in (one batch), transform it, copy the outputs back (one batch).
fn handle_batch(p: &ProcessPlatform, reqs: &[DemoReq], front: DomId) -> Result<Vec<(i32, u32)>> {
    let mut out = vec![(proto::STATUS_OK, 0u32); reqs.len()];
    let valid = |r: &DemoReq| r.len > 0 && r.len <= proto::MAX_LEN;
    let mut copy_in = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        if !valid(r) {
            out[i].0 = proto::STATUS_BAD_LEN;
            continue;
        }
        copy_in.push(GrantCopyOp {
            src: CopyPtr::Grant {
                domid: front,
                gref: r.gref,
                offset: 0,
            },
            dst: CopyPtr::Local {
                frame: FIRST_BUF + i as u64,
                offset: 0,
            },
            len: r.len,
        });
    }
    let st = p.grant_copy(&copy_in)?;
    let mut st = st.into_iter();
    let mut copy_out = Vec::new();
    let mut out_idx = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        if !valid(r) {
            continue;
        }
        if st.next() != Some(0) {
            out[i].0 = proto::STATUS_BAD_GRANT;
            continue;
        }
        let mut input = vec![0u8; usize::from(r.len)];
        p.read_local(FIRST_BUF + i as u64, 0, &mut input)?;
        let frame = FIRST_BUF + (BATCH + i) as u64;
        p.write_local(frame, 0, &proto::transform(&input))?;
        out[i].1 = proto::digest(&input);
        copy_out.push(GrantCopyOp {
            src: CopyPtr::Local { frame, offset: 0 },
            dst: CopyPtr::Grant {
                domid: front,
                gref: r.gref,
                offset: proto::OUTPUT_OFFSET,
            },
            len: r.len,
        });
        out_idx.push(i);
    }
    for (i, s) in out_idx.into_iter().zip(p.grant_copy(&copy_out)?) {
        if s != 0 {
            out[i].0 = proto::STATUS_BAD_GRANT;
        }
    }
    Ok(out)
}

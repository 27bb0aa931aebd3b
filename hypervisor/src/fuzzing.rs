//! Bodies of the fuzz targets for what a domain sends the hypervisor: the records of its
//! hypercall page (decoded and executed in batches against a [`System`] with two domains) and
//! its control-socket messages. `hypervisor/fuzz/fuzz_targets/*.rs` call these under
//! libFuzzer; the unit tests below run them over random inputs, so `cargo test` exercises them.
//! Run a target from `hypervisor/` with `cargo +nightly fuzz run hypercall_batch` (or
//! `control_msg`), e.g. `-- -max_total_time=30`.
//!
//! Each body treats its input as a sequence of *operations* of hostile domains: records built
//! from values that reach deep paths (live grant references, bound ports, IOVAs returned by
//! earlier pins) or raw bytes, batches published in the real hypercall page with arbitrary
//! headers, rewrites of the domains' own grant tables, and control messages of any length.
//! A body panics only when an invariant breaks:
//!
//! * every record and reply gets a status that is 0 or negative, a grant op's status is a
//!   `GNTST_*` code, and a control reply carries a descriptor exactly when it succeeded with an
//!   op that hands one over;
//! * the control messages round-trip (what parses serialises back to the same bytes);
//! * no use leaks: once the domain holding pins and mappings is destroyed (or has unmapped
//!   everything), no grant entry the fuzzer did not scribble on still has `GTF_reading` or
//!   `GTF_writing` set, and the IOMMU is empty.

use crate::domain::DomainConfig;
use crate::grant_table::MapHandle;
use crate::hypercall::{
    control_pair, ctl, execute_batch, execute_ctl, opcode, recv_msg, send_msg, CtlReply,
    CtlRequest, HypercallError, HypercallPage, Op, OpRecord, CTL_REQUEST_SIZE, HYPERCALL_FRAME,
    INITIAL_SEQ, MAX_OPS, RECORD_SIZE,
};
use crate::memory::layout;
use crate::system::System;
use devchan::grant::{
    DomId, GrantRef, DOMID_SELF, GTF_ACCEPT_TRANSFER, GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY,
    GTF_TYPE_MASK, GTF_WRITING,
};
use devchan::platform::{CopyPtr, Frame, GrantCopyOp};
use devchan::fuzzing::Input;
use iospace::iommu::Iommu;
use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::Arc;

/// RAM frames of each fuzzed domain.
const FRAMES: u64 = layout::MIN_FRAMES + 4;
/// Grant references the set-up and the fuzzer's table writes use.
const FUZZ_REFS: GrantRef = 20;

/// Two domains that grant each other pages of every kind, with a bound event channel.
/// Domain 0 has an IOMMU (so its pins succeed); domain 1 has none.
struct World {
    sys: Arc<System>,
    iommu: Arc<Iommu>,
    /// Grant entries the fuzzer rewrote, per domain: exempt from the leak check.
    scribbled: [HashSet<GrantRef>; 2],
    /// Results of earlier ops (ports, IOVAs, frames, handles) to feed back as arguments.
    seen: Vec<u64>,
}

impl World {
    fn new() -> Self {
        let sys = System::new();
        let iommu = Iommu::new(8);
        for (name, io) in [("zero", Some(iommu.clone())), ("one", None)] {
            sys.create_domain(DomainConfig {
                name: name.into(),
                nr_frames: FRAMES,
                iommu: io,
            })
            .expect("fuzz domain");
        }
        let mut seen = Vec::new();
        for (me, peer) in [(0u16, 1u16), (1, 0)] {
            let d = sys.domain(me).expect("just created");
            let (s1, _) = sys.alloc_shared_page(me).expect("shared page");
            let (s2, _) = sys.alloc_shared_page(me).expect("shared page");
            let t = d.grant_entries();
            let f = |x: u64| u32::try_from(x).expect("small frame");
            // ref 8: RAM rw, 9: RAM ro, 10: shared rw, 11: shared ro, 12: a platform frame,
            // 13/14: accept transfers into RAM and into a shared page, 15: for ourselves.
            let offers = [
                (8, peer, f(layout::FIRST_FREE_FRAME), GTF_PERMIT_ACCESS),
                (
                    9,
                    peer,
                    f(layout::FIRST_FREE_FRAME + 1),
                    GTF_PERMIT_ACCESS | GTF_READONLY,
                ),
                (10, peer, f(s1), GTF_PERMIT_ACCESS),
                (11, peer, f(s1), GTF_PERMIT_ACCESS | GTF_READONLY),
                (12, peer, 1, GTF_PERMIT_ACCESS),
                (
                    13,
                    peer,
                    f(layout::FIRST_FREE_FRAME + 2),
                    GTF_ACCEPT_TRANSFER,
                ),
                (14, peer, f(s2), GTF_ACCEPT_TRANSFER),
                (15, me, f(layout::FIRST_FREE_FRAME + 3), GTF_PERMIT_ACCESS),
            ];
            for (gref, domid, frame, flags) in offers {
                t.publish(gref, domid, frame, flags).expect("in the table");
            }
            seen.extend([s1, s2]);
        }
        if let Ok(p) = sys.evtchn_alloc_unbound(0, 1) {
            seen.push(u64::from(p));
            if let Ok(q) = sys.evtchn_bind_interdomain(1, 0, p) {
                seen.push(u64::from(q));
            }
        }
        Self {
            sys,
            iommu,
            scribbled: [HashSet::new(), HashSet::new()],
            seen,
        }
    }

    fn domid(&self, i: &mut Input<'_>) -> DomId {
        match i.u8() % 8 {
            0..=2 => 0,
            3..=5 => 1,
            6 => DOMID_SELF,
            _ => i.u16(),
        }
    }

    fn gref(&self, i: &mut Input<'_>) -> GrantRef {
        match i.u8() {
            0..=239 => GrantRef::from(i.u8()) % FUZZ_REFS,
            240..=247 => layout::NR_GRANT_ENTRIES - 1 + u32::from(i.u8() % 3),
            _ => (u32::from(i.u16()) << 16) | u32::from(i.u16()),
        }
    }

    fn frame(&self, i: &mut Input<'_>) -> Frame {
        match i.u8() % 4 {
            0 | 1 => u64::from(i.u8()) % (FRAMES + 3),
            2 => self.pick(i),
            _ => i.u64(),
        }
    }

    /// An earlier result (a port, an IOVA) or a small number.
    fn pick(&self, i: &mut Input<'_>) -> u64 {
        let k = usize::from(i.u8());
        self.seen
            .get(k % self.seen.len().max(1))
            .copied()
            .unwrap_or(k as u64)
    }

    fn side(&self, i: &mut Input<'_>) -> CopyPtr {
        let offset = match i.u8() % 4 {
            0 => 0,
            1 => 4096 - u16::from(i.u8()),
            _ => i.u16() % 4200,
        };
        if i.u8() % 2 == 0 {
            CopyPtr::Grant {
                domid: self.domid(i),
                gref: self.gref(i),
                offset,
            }
        } else {
            CopyPtr::Local {
                frame: self.frame(i),
                offset,
            }
        }
    }

    /// A record: a well-formed op from interesting values, sometimes with one field mangled,
    /// or raw bytes.
    fn record(&self, i: &mut Input<'_>) -> OpRecord {
        let op = match i.u8() % 10 {
            0 => return raw_record(&i.bytes(RECORD_SIZE)),
            1 | 2 => Op::GrantCopy(GrantCopyOp {
                src: self.side(i),
                dst: self.side(i),
                len: match i.u8() % 3 {
                    0 => 4096,
                    1 => u16::from(i.u8()),
                    _ => i.u16(),
                },
            }),
            3 => Op::Pin {
                granter: self.domid(i),
                gref: self.gref(i),
                writable: i.u8() % 2 == 0,
            },
            4 => Op::Unpin { iova: self.pick(i) },
            5 => Op::EvtchnSend(u32::try_from(self.pick(i) % 16).unwrap_or(0)),
            6 => Op::EvtchnUnmask(u32::from(i.u8() % 16)),
            7 => match i.u8() % 3 {
                0 => Op::EvtchnAllocUnbound(self.domid(i)),
                1 => Op::EvtchnBindInterdomain {
                    remote: self.domid(i),
                    port: u32::try_from(self.pick(i) % 4100).unwrap_or(0),
                },
                _ => Op::EvtchnClose(u32::from(i.u8() % 16)),
            },
            _ => Op::Transfer {
                frame: self.frame(i),
                peer: self.domid(i),
                gref: self.gref(i),
            },
        };
        let mut r = op.encode();
        if i.u8() % 8 == 0 {
            let k = usize::from(i.u8()) % r.args.len();
            r.args[k] = i.u64();
        }
        r
    }

    /// A hostile granter rewrites one of its own entries.
    fn scribble(&mut self, i: &mut Input<'_>) {
        let dom = i.u8() % 2;
        let gref = GrantRef::from(i.u8()) % FUZZ_REFS;
        let (flags, domid, frame) = (i.u16(), self.domid(i), self.frame(i));
        let Ok(d) = self.sys.domain(DomId::from(dom)) else {
            return;
        };
        let frame = u32::try_from(frame).unwrap_or(u32::MAX);
        if d.grant_entries().publish(gref, domid, frame, flags).is_ok() {
            self.scribbled[usize::from(dom)].insert(gref);
        }
    }

    /// Publish `records` in `caller`'s hypercall page (with a hostile `nr_ops` if `bad_count`
    /// is given) and serve it as the server thread does; check every status.
    fn run_batch(&mut self, caller: DomId, seq: u32, records: &[OpRecord], bad_count: Option<u32>) {
        let Ok(d) = self.sys.domain(caller) else {
            return;
        };
        let Ok(ptr) = d.memory().ram_frame_ptr(HYPERCALL_FRAME) else {
            return;
        };
        // SAFETY: frame 5 of the domain's RAM mapping, page-aligned; `d` keeps the mapping
        // alive while `page` is used (it is dropped at the end of this function).
        let page = unsafe { HypercallPage::new(ptr) };
        let last = page.current_req_seq();
        page.publish(seq, records);
        if let Some(n) = bad_count {
            let _ = d.memory().write(HYPERCALL_FRAME, 4, &n.to_le_bytes());
        }
        let Some((got_seq, batch)) = page.take_batch(last) else {
            assert_eq!(seq, last, "a new sequence number is always a new batch");
            return;
        };
        assert_eq!(got_seq, seq);
        let Ok(taken) = batch else {
            let n = bad_count.expect("only a hostile count is refused");
            assert!(n == 0 || n as usize > MAX_OPS, "count {n} refused");
            return;
        };
        assert_eq!(taken.len(), bad_count.map_or(records.len(), |n| n as usize));
        let done = execute_batch(&self.sys, caller, taken.clone());
        assert_eq!(done.len(), taken.len());
        for (before, after) in taken.iter().zip(&done) {
            assert_eq!(before.op, after.op);
            assert!(
                after.status <= 0,
                "status {} for {:?}",
                after.status,
                before
            );
            if Op::is_grant_op(before.op) {
                assert!(after.status >= -13, "not a GNTST_* code: {}", after.status);
            }
            if after.status == 0 && before.op != opcode::GRANT_COPY {
                self.seen.push(after.result);
            }
        }
        page.complete(seq, 0, &done);
        assert!(page.is_complete(seq));
        self.seen.truncate(256);
    }

    /// Destroy both domains (the IOMMU holder first) and check nothing leaked.
    fn finish(self) {
        self.check_no_leaked_use(1, true);
        let _ = self.sys.destroy_domain(0);
        assert!(self.iommu.is_empty(), "pins outlived their holder");
        self.check_no_leaked_use(1, false);
        let _ = self.sys.destroy_domain(1);
        assert!(self.sys.domain_ids().is_empty());
    }

    /// In `dom`'s table, no entry the fuzzer left alone is marked in use, unless `held_ok`
    /// (uses may still be held then; only their bookkeeping is checked against the flags).
    fn check_no_leaked_use(&self, dom: DomId, held_ok: bool) {
        let Ok(d) = self.sys.domain(dom) else {
            return;
        };
        for gref in 0..FUZZ_REFS {
            if self.scribbled[usize::from(dom)].contains(&gref) {
                continue;
            }
            let Ok((flags, _)) = d.grant_entries().header(gref) else {
                continue;
            };
            if flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS {
                continue;
            }
            let busy = flags & (GTF_READING | GTF_WRITING) != 0;
            assert!(
                held_ok || !busy,
                "grant {gref} of {dom} still in use: {flags:#x}"
            );
            if flags & GTF_WRITING != 0 {
                assert!(flags & GTF_READING != 0, "writing without reading");
            }
        }
    }
}

fn raw_record(b: &[u8]) -> OpRecord {
    let word = |k: usize| u64::from_le_bytes(b[k..k + 8].try_into().unwrap_or_default());
    OpRecord {
        op: u32::from_le_bytes(b[..4].try_into().unwrap_or_default()),
        status: i32::from_le_bytes(b[4..8].try_into().unwrap_or_default()),
        result: word(8),
        args: [word(16), word(24), word(32), word(40), word(48), word(56)],
    }
}

/// Treat `data` as hypercall batches of two hostile domains, interleaved with rewrites of
/// their grant tables; every record is decoded and executed against a fresh [`System`].
pub fn hypercall_batches(data: &[u8]) {
    let mut i = Input(data);
    let mut w = World::new();
    let mut seq = [INITIAL_SEQ; 2];
    let mut batch = Vec::new();
    let mut steps = 0;
    while !i.is_empty() && steps < 512 {
        steps += 1;
        match i.u8() % 8 {
            0 => w.scribble(&mut i),
            1 | 2 if !batch.is_empty() => {
                let caller = usize::from(i.u8() % 2);
                let bad = (i.u8() % 16 == 0).then(|| u32::from(i.u16()));
                seq[caller] = seq[caller].wrapping_add(1);
                let records = std::mem::take(&mut batch);
                let caller_id = DomId::try_from(caller).unwrap_or(0);
                w.run_batch(caller_id, seq[caller], &records, bad);
            }
            _ if batch.len() < MAX_OPS => batch.push(w.record(&mut i)),
            _ => {}
        }
    }
    if !batch.is_empty() {
        seq[0] = seq[0].wrapping_add(1);
        w.run_batch(0, seq[0], &batch, None);
    }
    w.finish();
}

/// Treat `data` as control messages from two hostile domains: raw bytes of any length (also
/// pushed through a real `SOCK_SEQPACKET` pair) and well-formed requests with interesting
/// arguments, executed against a fresh [`System`].
pub fn control_messages(data: &[u8]) {
    let mut i = Input(data);
    let mut w = World::new();
    let mut handles: Vec<(DomId, u64)> = Vec::new();
    let mut steps = 0;
    while !i.is_empty() && steps < 256 {
        steps += 1;
        let caller = DomId::from(i.u8() % 2);
        let bytes = match i.u8() % 4 {
            0 => {
                let n = usize::from(i.u8() % 48);
                let b = i.bytes(n);
                socket_round_trip(&b);
                b
            }
            _ => {
                let op = u32::from(i.u8() % 6);
                let args = match op {
                    ctl::MAP_GRANT => [
                        u64::from(w.domid(&mut i)),
                        u64::from(w.gref(&mut i)),
                        u64::from(i.u8() % 3),
                    ],
                    ctl::UNMAP_GRANT => [w.pick(&mut i), 0, 0],
                    ctl::SHARED_PAGE => [w.frame(&mut i), 0, 0],
                    _ => [0; 3],
                };
                let mut args = args;
                if i.u8() % 8 == 0 {
                    args[usize::from(i.u8()) % 3] = i.u64();
                }
                CtlRequest { op, args }.to_bytes().to_vec()
            }
        };
        let parsed = CtlRequest::from_bytes(&bytes).ok();
        if let Some(req) = parsed {
            assert_eq!(
                req.to_bytes().as_slice(),
                bytes.as_slice(),
                "request round trip"
            );
        }
        if let Ok(rep) = CtlReply::from_bytes(&bytes) {
            assert_eq!(
                rep.to_bytes().as_slice(),
                bytes.as_slice(),
                "reply round trip"
            );
        }
        let (reply, file) = execute_ctl(&w.sys, caller, &bytes);
        assert!(reply.status <= 0);
        let hands_fd = parsed.is_some_and(|r| {
            matches!(
                r.op,
                ctl::ALLOC_SHARED_PAGE | ctl::MAP_GRANT | ctl::SHARED_PAGE
            )
        }) && reply.status == 0;
        assert_eq!(
            file.is_some(),
            hands_fd,
            "descriptor iff a success that hands one"
        );
        if let Some(f) = &file {
            assert_eq!(
                f.metadata().map(|m| m.len()).ok(),
                Some(layout::PAGE_SIZE as u64)
            );
        }
        if reply.status == 0 {
            match parsed.map(|r| r.op) {
                Some(ctl::MAP_GRANT) => {
                    handles.push((caller, reply.result[0]));
                    w.seen.push(reply.result[0]);
                }
                Some(ctl::UNMAP_GRANT) => {
                    let h = bytes_arg(&bytes);
                    handles.retain(|&(c, x)| !(c == caller && x == h));
                }
                _ => w.seen.push(reply.result[0]),
            }
        }
    }
    for (caller, h) in handles {
        w.sys
            .unmap_grant(caller, MapHandle(h))
            .expect("a live handle unmaps");
    }
    // Everything was unmapped: nothing may still be in use, in either domain.
    w.check_no_leaked_use(0, false);
    w.check_no_leaked_use(1, false);
    w.finish();
}

/// The first argument of a well-formed request.
fn bytes_arg(b: &[u8]) -> u64 {
    CtlRequest::from_bytes(b).map_or(0, |r| r.args[0])
}

/// Send `b` as one message over a fresh socket pair and receive it as the server does.
fn socket_round_trip(b: &[u8]) {
    let Ok((tx, rx)) = control_pair() else {
        return;
    };
    if send_msg(tx.as_fd(), b, None, true).is_err() {
        return;
    }
    let mut buf = [0u8; CTL_REQUEST_SIZE + 1];
    match recv_msg(rx.as_fd(), &mut buf, true) {
        Ok((n, fd)) => {
            assert!(fd.is_none());
            assert_eq!(&buf[..n], b);
        }
        Err(HypercallError::BadMessage) => assert!(b.len() > buf.len()),
        Err(HypercallError::Closed) => assert!(b.is_empty()),
        Err(e) => panic!("unexpected receive error {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn hypercall_batches_hold_their_invariants(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            hypercall_batches(&data);
        }

        #[test]
        fn control_messages_hold_their_invariants(data in proptest::collection::vec(any::<u8>(), 0..1500)) {
            control_messages(&data);
        }
    }

    #[test]
    fn set_up_grants_are_usable() {
        // The world's offers work, so the fuzzer starts from reachable states.
        let w = World::new();
        let copy = Op::GrantCopy(GrantCopyOp {
            src: CopyPtr::Grant {
                domid: 1,
                gref: 10,
                offset: 0,
            },
            dst: CopyPtr::Local {
                frame: layout::FIRST_FREE_FRAME,
                offset: 0,
            },
            len: 4096,
        });
        let pin = Op::Pin {
            granter: 1,
            gref: 8,
            writable: true,
        };
        let done = execute_batch(&w.sys, 0, vec![copy.encode(), pin.encode()]);
        assert_eq!((done[0].status, done[1].status), (0, 0));
        let (_, file) = execute_ctl(
            &w.sys,
            0,
            &CtlRequest {
                op: ctl::MAP_GRANT,
                args: [1, 10, 0],
            }
            .to_bytes(),
        );
        assert!(file.is_some());
        // The pin and the mapping are in use until the holder goes.
        w.check_no_leaked_use(1, true);
        w.finish();
    }

    #[test]
    fn a_leaked_use_is_caught() {
        let w = World::new();
        let d = w.sys.domain(1).unwrap();
        d.grant_entries().set_flags(8, GTF_READING).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            w.check_no_leaked_use(1, false)
        }));
        assert!(r.is_err());
    }

    #[test]
    fn hostile_counts_are_refused_and_empty_input_is_fine() {
        hypercall_batches(&[]);
        control_messages(&[]);
        // One record, then a batch with a hostile count of 0.
        let mut data = vec![3u8, 4, 1, 2, 0];
        data.extend([1u8, 0, 0, 0, 0]);
        hypercall_batches(&data);
    }
}

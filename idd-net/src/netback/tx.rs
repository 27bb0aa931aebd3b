//! The transmit path (see the parent module's docs): packets from the guests' rings to the
//! device, with the header copy, anti-spoofing, credit, pins and responses.

use super::{InFlight, Netback, NetbackError, Pending, HEADERS_PER_FRAME};
use crate::credit::Verdict;
use crate::device::{NetDevError, NetDevice, TxSeg};
use crate::filter::{destination, Destination, ETH_HLEN, HEADER_COPY};
use devchan::netif::{
    read_tx_packet, NetifError, NetifStatus, NetifTxResponse, TxFlags, TxPacket,
    XEN_NETBK_LEGACY_SLOTS_MAX,
};
use devchan::platform::{CopyPtr, GrantCopyOp, Platform};
use devchan::ring::RingIdx;

/// What happened to a channel's head packet this visit.
enum Step {
    /// It went to the device (or was answered); take the next.
    Next,
    /// It stays at the head (credit, no header buffer); stop this channel for this round.
    Hold,
    /// The device queue is full: stop the round.
    DeviceFull,
}

/// Why a blank checksum was not completed (logged; the packet is answered with an error).
#[derive(Debug, thiserror::Error)]
enum CsumFail {
    /// The frame could not be copied in.
    #[error("Copying the frame failed")]
    Copy,
    /// The checksum field is past netback's header copy.
    #[error("Checksum field outside the header copy")]
    OutsideHeader,
    /// Not a checksum we can complete.
    #[error("Checksum not completed")]
    Csum(#[from] crate::csum::CsumError),
}

/// What [`Netback::take`] found.
pub(super) enum Taken {
    /// A packet to send.
    Packet(Pending),
    /// A malformed chain, already answered.
    Answered,
    /// Nothing (or the channel failed).
    Empty,
}

/// Ring index of data fragment `i` of a packet whose slots are `idxs` (first fragment, the
/// extra-info slots, then the other fragments).
fn fragment_idx(packet: &TxPacket, idxs: &[RingIdx], i: usize) -> RingIdx {
    let k = if i == 0 { 0 } else { packet.extras.len() + i };
    idxs.get(k).copied().unwrap_or(0)
}

impl<P: Platform, D: NetDevice> Netback<P, D> {
    /// Visit the channels round robin, up to `batch` packets each. Returns packets handled.
    pub(super) fn transmit_round(&mut self) -> Result<usize, NetbackError> {
        let order: Vec<usize> = self.rr.round(self.channels.len()).collect();
        let mut done = 0;
        'round: for chan in order {
            for _ in 0..self.batch {
                if self.channels[chan].head.is_none() {
                    match self.take(chan)? {
                        Taken::Packet(p) => self.channels[chan].head = Some(p),
                        Taken::Answered => {
                            done += 1;
                            continue;
                        }
                        Taken::Empty => break,
                    }
                }
                match self.step(chan)? {
                    Step::Next => done += 1,
                    Step::Hold => break,
                    Step::DeviceFull => break 'round,
                }
            }
        }
        Ok(done)
    }

    /// Answer every slot of a packet with `status` (extra slots with `NETIF_RSP_NULL`).
    fn answer(&mut self, chan: usize, idxs: &[RingIdx], packet: &TxPacket, status: NetifStatus) {
        let c = &mut self.channels[chan];
        c.tx_rsps
            .extend(idxs.iter().copied().zip(packet.responses(status)));
        if status == NetifStatus::Error {
            c.stats.errors += 1;
        }
    }

    /// Read the channel's next packet (journal replay first, then the ring) and journal what
    /// was consumed. A malformed chain is answered at once (`NETIF_RSP_ERROR` for each slot
    /// read, the ring moved on past them); a broken ring marks
    /// the channel failed.
    pub(super) fn take(&mut self, chan: usize) -> Result<Taken, NetbackError> {
        let p = &*self.platform;
        let c = &mut self.channels[chan];
        if c.failed.is_some() {
            return Ok(Taken::Empty);
        }
        let from_journal = !c.replay.is_empty();
        let mut slots = Vec::new();
        let res = {
            let (ring, replay, slots) = (&mut c.tx, &mut c.replay, &mut slots);
            read_tx_packet(
                || {
                    let next = if from_journal {
                        replay.pop_front()
                    } else {
                        ring.get_request()?
                            .map(|raw| (ring.req_cons().wrapping_sub(1), raw))
                    };
                    Ok(next.map(|(idx, raw)| {
                        slots.push((idx, raw));
                        raw
                    }))
                },
                XEN_NETBK_LEGACY_SLOTS_MAX,
            )
        };
        if from_journal {
            c.stats.replayed += slots.len() as u64;
        } else if !slots.is_empty() {
            c.journal.tx_consumed(p, &slots, c.tx.req_cons())?;
        }
        let idxs: Vec<RingIdx> = slots.iter().map(|(i, _)| *i).collect();
        match res {
            Ok(Some(packet)) => Ok(Taken::Packet(Pending {
                idxs,
                packet,
                hdr: None,
                local: Vec::new(),
                wire: true,
                waited: false,
            })),
            Ok(None) => Ok(Taken::Empty),
            Err(NetifError::Ring(e)) => {
                tracing::warn!(guest = c.cfg.guest, error = %e, "netback channel failed");
                c.failed = Some(e);
                Ok(Taken::Empty)
            }
            Err(e) => {
                tracing::debug!(guest = c.cfg.guest, error = %e, "malformed transmit");
                c.stats.errors += 1;
                c.tx_rsps.extend(slots.iter().map(|(idx, raw)| {
                    (
                        *idx,
                        NetifTxResponse {
                            id: raw.id,
                            status: NetifStatus::Error.into(),
                        },
                    )
                }));
                Ok(Taken::Answered)
            }
        }
    }

    /// Advance the channel's head packet: check it, wait for credit, or send it.
    fn step(&mut self, chan: usize) -> Result<Step, NetbackError> {
        let Some(mut pend) = self.channels[chan].head.take() else {
            return Ok(Step::Next);
        };
        let size = usize::from(pend.packet.size);
        if pend.hdr.is_none() {
            let segs = 1 + pend.packet.fragments.len();
            if size < ETH_HLEN
                || size > self.device.max_frame()
                || segs > self.device.max_tx_segments()
            {
                self.answer(chan, &pend.idxs, &pend.packet, NetifStatus::Error);
                return Ok(Step::Next);
            }
            let blank = pend.packet.flags.contains(TxFlags::CSUM_BLANK);
            if self.free_headers.is_empty() || (blank && self.free_rx.is_empty()) {
                self.channels[chan].head = Some(pend);
                return Ok(Step::Hold);
            }
            let Some(h) = self.free_headers.pop() else {
                return Ok(Step::Next);
            };
            let checked = self.copy_header(chan, &pend.packet, h).and_then(|r| {
                if blank {
                    self.complete_csum(chan, &pend.packet, h, r.0)?;
                }
                Ok(r)
            });
            match checked {
                Ok((hlen, dest)) => {
                    pend.hdr = Some((h, hlen));
                    if let Some(dest) = dest {
                        pend.local = self.local_targets(dest, chan);
                        // A unicast frame for a guest of ours stays off the wire.
                        pend.wire = matches!(dest, Destination::Group) || pend.local.is_empty();
                    }
                }
                Err(status) => {
                    self.free_headers.push(h);
                    if status == NetifStatus::Dropped {
                        self.channels[chan].stats.spoof += 1;
                    }
                    self.answer(chan, &pend.idxs, &pend.packet, status);
                    return Ok(Step::Next);
                }
            }
        }
        let now = self.now_us();
        let c = &mut self.channels[chan];
        if let Verdict::WaitUntil(_) = c.bucket.check(size as u64, now) {
            if !pend.waited {
                pend.waited = true;
                c.stats.wait += 1;
            }
            c.head = Some(pend);
            return Ok(Step::Hold);
        }
        let Some((h, hlen)) = pend.hdr else {
            return Ok(Step::Next);
        };
        if !pend.local.is_empty() {
            let targets = std::mem::take(&mut pend.local);
            self.switch_local(chan, &pend.packet, h, hlen, targets)?;
        }
        if !pend.wire {
            self.free_headers.push(h);
            self.channels[chan].bucket.charge(size as u64);
            let s = &mut self.channels[chan].stats;
            s.tx += 1;
            s.txb += size as u64;
            self.answer(chan, &pend.idxs, &pend.packet, NetifStatus::Okay);
            return Ok(Step::Next);
        }
        match self.send(chan, &pend, h, hlen)? {
            Some(step) => {
                if matches!(step, Step::DeviceFull) {
                    self.channels[chan].head = Some(pend);
                }
                Ok(step)
            }
            None => {
                self.channels[chan].bucket.charge(size as u64);
                Ok(Step::Next)
            }
        }
    }

    /// Local switching: copy the packet (the checked header from our copy, the rest from the
    /// guest's grants) into a spare receive page and deliver it to the `targets` channels.
    /// No spare page or an uncopyable grant: dropped for the targets (counted there).
    fn switch_local(
        &mut self,
        chan: usize,
        packet: &TxPacket,
        h: usize,
        hlen: usize,
        targets: Vec<usize>,
    ) -> Result<(), NetbackError> {
        let drop = |nb: &mut Self, targets: &[usize]| {
            for &t in targets {
                nb.channels[t].stats.drop += 1;
            }
        };
        let Some(spare) = self.free_rx.pop() else {
            drop(self, &targets);
            return Ok(());
        };
        let p = &*self.platform;
        let dst = self.rx_pages[spare].frame;
        let page = self.headers[h / HEADERS_PER_FRAME];
        let mut hdr = vec![0u8; hlen];
        let mut ok = p
            .read_local(page.frame, (h % HEADERS_PER_FRAME) * HEADER_COPY, &mut hdr)
            .and_then(|()| p.write_local(dst, 0, &hdr))
            .is_ok();
        let mut ops = Vec::new();
        let (mut skip, mut at) = (hlen, hlen);
        for f in &packet.fragments {
            let size = usize::from(f.size);
            let n = skip.min(size);
            skip -= n;
            if n == size {
                continue;
            }
            // Within a page (validated) and within the frame (at most max_frame bytes).
            #[allow(clippy::cast_possible_truncation)]
            ops.push(GrantCopyOp {
                src: CopyPtr::Grant {
                    domid: self.channels[chan].cfg.guest,
                    gref: f.gref,
                    offset: f.offset + n as u16,
                },
                dst: CopyPtr::Local {
                    frame: dst,
                    offset: at as u16,
                },
                len: (size - n) as u16,
            });
            at += size - n;
        }
        if !ops.is_empty() {
            ok &= matches!(p.grant_copy(&ops), Ok(st) if st.iter().all(|s| *s == 0));
        }
        if !ok {
            self.free_rx.push(spare);
            drop(self, &targets);
            return Ok(());
        }
        self.deliver(spare, 0, packet.size, targets)
    }

    /// Complete the TCP/UDP checksum of a `csum_blank` packet ([`crate::csum`]): the whole
    /// frame is grant-copied into a spare receive page, summed there, and the checksum
    /// patched into our header copy `h` (of `hlen` bytes), which is what the device sends.
    fn complete_csum(
        &mut self,
        chan: usize,
        packet: &TxPacket,
        h: usize,
        hlen: usize,
    ) -> Result<(), NetifStatus> {
        let Some(spare) = self.free_rx.pop() else {
            return Err(NetifStatus::Error);
        };
        let res = self.csum_in(chan, packet, h, hlen, self.rx_pages[spare].frame);
        self.free_rx.push(spare);
        res.map_err(|e| {
            tracing::debug!(guest = self.channels[chan].cfg.guest, error = %e, "checksum not completed");
            NetifStatus::Error
        })
    }

    fn csum_in(
        &self,
        chan: usize,
        packet: &TxPacket,
        h: usize,
        hlen: usize,
        scratch: devchan::platform::Frame,
    ) -> Result<(), CsumFail> {
        let p = &*self.platform;
        let mut ops = Vec::with_capacity(packet.fragments.len());
        let mut at = 0usize;
        for f in &packet.fragments {
            // A frame is at most max_frame bytes: offsets fit u16.
            #[allow(clippy::cast_possible_truncation)]
            ops.push(GrantCopyOp {
                src: CopyPtr::Grant {
                    domid: self.channels[chan].cfg.guest,
                    gref: f.gref,
                    offset: f.offset,
                },
                dst: CopyPtr::Local {
                    frame: scratch,
                    offset: at as u16,
                },
                len: f.size,
            });
            at += usize::from(f.size);
        }
        match p.grant_copy(&ops) {
            Ok(st) if st.iter().all(|s| *s == 0) => {}
            _ => return Err(CsumFail::Copy),
        }
        let mut frame = vec![0u8; at];
        p.read_local(scratch, 0, &mut frame)
            .map_err(|_| CsumFail::Copy)?;
        // The checked header is ours: sum over it, not over the guest's (possibly changed)
        // first bytes.
        let page = self.headers[h / HEADERS_PER_FRAME];
        let base = (h % HEADERS_PER_FRAME) * HEADER_COPY;
        p.read_local(page.frame, base, &mut frame[..hlen])
            .map_err(|_| CsumFail::Copy)?;
        let field = crate::csum::complete(&mut frame)?;
        if field + 2 > hlen {
            return Err(CsumFail::OutsideHeader);
        }
        p.write_local(page.frame, base + field, &frame[field..field + 2])
            .map_err(|_| CsumFail::Copy)
    }

    /// Grant-copy the packet's first bytes into header buffer `h` and check them against the
    /// channel's policy. Returns the copied length and the frame's destination, or the
    /// status to answer with.
    fn copy_header(
        &self,
        chan: usize,
        packet: &TxPacket,
        h: usize,
    ) -> Result<(usize, Option<Destination>), NetifStatus> {
        let p = &*self.platform;
        let c = &self.channels[chan];
        let page = self.headers[h / HEADERS_PER_FRAME];
        let base = (h % HEADERS_PER_FRAME) * HEADER_COPY;
        let hlen = usize::from(packet.size).min(HEADER_COPY);
        let mut ops = Vec::new();
        let mut done = 0;
        for f in &packet.fragments {
            if done == hlen {
                break;
            }
            let n = usize::from(f.size).min(hlen - done);
            if n == 0 {
                continue;
            }
            // Bounded by HEADER_COPY and the page: all fit u16.
            #[allow(clippy::cast_possible_truncation)]
            ops.push(GrantCopyOp {
                src: CopyPtr::Grant {
                    domid: c.cfg.guest,
                    gref: f.gref,
                    offset: f.offset,
                },
                dst: CopyPtr::Local {
                    frame: page.frame,
                    offset: (base + done) as u16,
                },
                len: n as u16,
            });
            done += n;
        }
        match p.grant_copy(&ops) {
            Ok(st) if st.iter().all(|s| *s == 0) => {}
            _ => return Err(NetifStatus::Error),
        }
        let mut hdr = vec![0u8; hlen];
        p.read_local(page.frame, base, &mut hdr)
            .map_err(|_| NetifStatus::Error)?;
        match c.policy.check(&hdr) {
            Ok(()) => Ok((hlen, destination(&hdr))),
            Err(e) => {
                tracing::debug!(guest = c.cfg.guest, error = %e, "spoofed transmit dropped");
                Err(NetifStatus::Dropped)
            }
        }
    }

    /// Pin the rest of the packet and hand it to the device. `None`: at the device (or
    /// answered with an error); `Some(DeviceFull)`: not accepted, nothing kept pinned.
    fn send(
        &mut self,
        chan: usize,
        pend: &Pending,
        h: usize,
        hlen: usize,
    ) -> Result<Option<Step>, NetbackError> {
        let p = &*self.platform;
        let c = &self.channels[chan];
        let page = self.headers[h / HEADERS_PER_FRAME];
        let hdr_iova = page.iova + ((h % HEADERS_PER_FRAME) * HEADER_COPY) as u64;
        // hlen <= HEADER_COPY.
        #[allow(clippy::cast_possible_truncation)]
        let mut segs = vec![TxSeg {
            iova: hdr_iova,
            len: hlen as u32,
        }];
        let mut pins = Vec::new();
        let mut skip = hlen;
        let mut failed = false;
        for (i, f) in pend.packet.fragments.iter().enumerate() {
            let size = usize::from(f.size);
            let n = skip.min(size);
            skip -= n;
            if n == size {
                continue;
            }
            let idx = fragment_idx(&pend.packet, &pend.idxs, i);
            match p.pin_grant(c.cfg.guest, f.gref, false) {
                Ok(iova) => {
                    c.journal.tx_pin(p, idx, iova)?;
                    pins.push((idx, iova));
                    // Within the page: offset + size <= 4096 was validated.
                    #[allow(clippy::cast_possible_truncation)]
                    segs.push(TxSeg {
                        iova: iova + u64::from(f.offset) + n as u64,
                        len: (size - n) as u32,
                    });
                }
                Err(e) => {
                    tracing::debug!(guest = c.cfg.guest, gref = f.gref, error = %e, "pin failed");
                    failed = true;
                    break;
                }
            }
        }
        let token = self.next_token;
        let outcome = if failed {
            Err(NetDevError::Malformed("grant not pinnable"))
        } else {
            self.device.transmit(token, &segs)
        };
        match outcome {
            Ok(()) => {
                self.next_token += 1;
                self.in_flight.insert(
                    token,
                    InFlight {
                        chan,
                        idxs: pend.idxs.clone(),
                        packet: pend.packet.clone(),
                        hdr: h,
                        pins,
                    },
                );
                Ok(None)
            }
            Err(e) => {
                self.unpin(chan, &pins)?;
                if matches!(e, NetDevError::Full) {
                    return Ok(Some(Step::DeviceFull));
                }
                if let NetDevError::Failed(_) = e {
                    return Err(e.into());
                }
                self.free_headers.push(h);
                self.answer(chan, &pend.idxs, &pend.packet, NetifStatus::Error);
                Ok(None)
            }
        }
    }

    fn unpin(&self, chan: usize, pins: &[(RingIdx, u64)]) -> Result<(), NetbackError> {
        let p = &*self.platform;
        let c = &self.channels[chan];
        for &(idx, iova) in pins {
            if let Err(e) = p.unpin_grant(iova) {
                tracing::warn!(iova, error = %e, "unpin failed");
            }
            c.journal.tx_pin(p, idx, 0)?;
        }
        Ok(())
    }

    /// The device finished transmit `token`: drop its pins and answer it.
    pub(super) fn tx_done(&mut self, token: u64, ok: bool) -> Result<(), NetbackError> {
        let Some(t) = self.in_flight.remove(&token) else {
            return Ok(());
        };
        self.unpin(t.chan, &t.pins)?;
        self.free_headers.push(t.hdr);
        if ok {
            let s = &mut self.channels[t.chan].stats;
            s.tx += 1;
            s.txb += u64::from(t.packet.size);
            self.answer(t.chan, &t.idxs, &t.packet, NetifStatus::Okay);
        } else {
            self.answer(t.chan, &t.idxs, &t.packet, NetifStatus::Error);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devchan::netif::{ExtraInfo, GsoType, TxFlags, TxFragment};

    #[test]
    fn fragment_ring_indexes_skip_the_extra_slots() {
        let frag = |id| TxFragment {
            id,
            gref: 1,
            offset: 0,
            size: 10,
        };
        let p = TxPacket {
            flags: TxFlags::empty(),
            size: 30,
            fragments: vec![frag(1), frag(2), frag(3)],
            extras: vec![ExtraInfo::Gso {
                size: 1,
                gso_type: GsoType::TcpV4,
                features: 0,
            }],
        };
        let idxs = [10, 11, 12, 13];
        assert_eq!(
            (0..3)
                .map(|i| fragment_idx(&p, &idxs, i))
                .collect::<Vec<_>>(),
            [10, 12, 13]
        );
    }
}

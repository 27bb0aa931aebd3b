//! The receive path (see the parent module's docs): frames from the device's buffers to the
//! guests' posted buffers, by grant copy or page exchange.

use super::{Netback, NetbackError};
use crate::device::{NetDevice, RxBuffer};
use crate::filter::{destination, Destination, Mac, ETH_HLEN};
use devchan::grant::PAGE_SIZE;
use devchan::netif::{NetifRxRequest, NetifRxResponse, NetifStatus};
use devchan::platform::{CopyPtr, GrantCopyOp, Platform};

impl<P: Platform, D: NetDevice> Netback<P, D> {
    /// A frame arrived in `buf` at `offset`, `len` bytes: deliver it to its channels and give
    /// the page back to the pool.
    pub(super) fn received(
        &mut self,
        buf: RxBuffer,
        offset: u16,
        len: u16,
    ) -> Result<(), NetbackError> {
        let page = self.rx_by_frame.get(&buf.frame).copied();
        let Some(page) = page.filter(|&p| self.at_device[p]) else {
            // Not one of ours, or not at the device: a confused device. Nothing to give back.
            self.unclaimed += 1;
            return Ok(());
        };
        self.at_device[page] = false;
        let (off, n) = (usize::from(offset), usize::from(len));
        let mut hdr = [0u8; ETH_HLEN];
        let dest = if n >= ETH_HLEN && off + n <= PAGE_SIZE {
            self.platform
                .read_local(buf.frame, off, &mut hdr)
                .ok()
                .and_then(|()| destination(&hdr))
        } else {
            None
        };
        let targets = match dest {
            Some(Destination::Unicast(mac)) => self.channels_with(Some(mac)),
            Some(Destination::Group) => self.channels_with(None),
            None => Vec::new(),
        };
        if targets.is_empty() {
            self.unclaimed += 1;
            self.free_rx.push(page);
            return Ok(());
        }
        self.deliver(page, offset, len, targets)
    }

    /// Deliver the frame in pool page `page` to each of `targets`, then give the page back
    /// to the pool (unless an exchange gave it away; then the page received in return).
    pub(super) fn deliver(
        &mut self,
        page: usize,
        offset: u16,
        len: u16,
        targets: Vec<usize>,
    ) -> Result<(), NetbackError> {
        let frame = self.rx_pages[page].frame;
        // Copy-mode channels first: the last exchange-mode channel takes the page itself.
        let (copy, exchange): (Vec<usize>, Vec<usize>) = targets
            .into_iter()
            .partition(|&c| self.channels[c].cfg.rx_copy);
        for c in copy {
            self.deliver_copy(c, frame, offset, len)?;
        }
        let mut keep = Some(page);
        let last = exchange.len().saturating_sub(1);
        for (k, c) in exchange.into_iter().enumerate() {
            if k == last {
                keep = None;
                self.deliver_exchange(c, page, offset, len)?;
            } else {
                self.exchange_copy_of(c, page, offset, len)?;
            }
        }
        if let Some(pg) = keep {
            self.free_rx.push(pg);
        }
        Ok(())
    }

    /// Live channels other than `except` a frame to `dest` goes to.
    pub(super) fn local_targets(&self, dest: Destination, except: usize) -> Vec<usize> {
        let mac = match dest {
            Destination::Unicast(m) => Some(m),
            Destination::Group => None,
        };
        let mut t = self.channels_with(mac);
        t.retain(|&c| c != except);
        t
    }

    /// Live channels with `mac`, or all live channels for `None`.
    fn channels_with(&self, mac: Option<Mac>) -> Vec<usize> {
        self.channels
            .iter()
            .enumerate()
            .filter(|(_, c)| c.failed.is_none() && mac.is_none_or(|m| m == c.cfg.mac))
            .map(|(i, _)| i)
            .collect()
    }

    /// The channel's next posted receive buffer (held from a predecessor first), journaled.
    fn rx_request(&mut self, chan: usize) -> Result<Option<NetifRxRequest>, NetbackError> {
        let p = &*self.platform;
        let c = &mut self.channels[chan];
        if let Some((_, r)) = c.rx_held.pop_front() {
            return Ok(Some(r));
        }
        match c.rx.get_request() {
            Ok(Some(r)) => {
                let idx = c.rx.req_cons().wrapping_sub(1);
                c.journal.rx_consumed(p, idx, &r, c.rx.req_cons())?;
                Ok(Some(r))
            }
            Ok(None) => {
                c.stats.drop += 1;
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(guest = c.cfg.guest, error = %e, "netback receive ring failed");
                c.failed = Some(e);
                Ok(None)
            }
        }
    }

    fn respond(
        &mut self,
        chan: usize,
        req: &NetifRxRequest,
        offset: u16,
        result: Result<u16, NetifStatus>,
    ) {
        let c = &mut self.channels[chan];
        let status = match result {
            Ok(n) => {
                c.stats.rx += 1;
                c.stats.rxb += u64::from(n);
                // A frame is at most a page: fits i16.
                i16::try_from(n).unwrap_or(i16::MAX)
            }
            Err(s) => {
                c.stats.errors += 1;
                s.into()
            }
        };
        c.rx_rsps.push(NetifRxResponse {
            id: req.id,
            offset: if result.is_ok() { offset } else { 0 },
            flags: 0,
            status,
        });
    }

    /// Grant-copy the frame into the guest's next posted buffer (at offset 0).
    fn deliver_copy(
        &mut self,
        chan: usize,
        frame: u64,
        offset: u16,
        len: u16,
    ) -> Result<(), NetbackError> {
        let Some(req) = self.rx_request(chan)? else {
            return Ok(());
        };
        let op = GrantCopyOp {
            src: CopyPtr::Local { frame, offset },
            dst: CopyPtr::Grant {
                domid: self.channels[chan].cfg.guest,
                gref: req.gref,
                offset: 0,
            },
            len,
        };
        let ok = matches!(self.platform.grant_copy(&[op]).as_deref(), Ok([0]));
        self.respond(
            chan,
            &req,
            0,
            if ok { Ok(len) } else { Err(NetifStatus::Error) },
        );
        Ok(())
    }

    /// Give pool page `page` (holding the frame) to the guest through its accept-transfer
    /// grant, then pin the page we got back and return it to the pool.
    fn deliver_exchange(
        &mut self,
        chan: usize,
        page: usize,
        offset: u16,
        len: u16,
    ) -> Result<(), NetbackError> {
        let Some(req) = self.rx_request(chan)? else {
            self.free_rx.push(page);
            return Ok(());
        };
        let p = &*self.platform;
        let k = self.headers.len() + page;
        let mut pg = self.rx_pages[page];
        // A pinned page is "in use": the hypervisor refuses to give it away.
        self.record.unpin(p, k, &mut pg)?;
        let guest = self.channels[chan].cfg.guest;
        let res = p.transfer(pg.frame, guest, req.gref);
        if let Err(e) = &res {
            tracing::debug!(guest, gref = req.gref, error = %e, "page transfer failed");
        }
        // Our frame now holds the page we got in exchange (or still ours): pin it again.
        let repinned = self.record.repin(p, k, &mut pg);
        self.rx_pages[page] = pg;
        match repinned {
            Ok(()) => self.free_rx.push(page),
            Err(e) => {
                tracing::warn!(frame = pg.frame, error = %e, "receive page lost from the pool")
            }
        }
        let result = match res {
            Ok(_) => Ok(len),
            Err(_) => Err(NetifStatus::Error),
        };
        self.respond(chan, &req, offset, result);
        Ok(())
    }

    /// Exchange a copy of pool page `page` (a group frame that other channels need too):
    /// made in a spare pool page, which is the one given away.
    fn exchange_copy_of(
        &mut self,
        chan: usize,
        page: usize,
        offset: u16,
        len: u16,
    ) -> Result<(), NetbackError> {
        let Some(spare) = self.free_rx.pop() else {
            self.channels[chan].stats.drop += 1;
            return Ok(());
        };
        let p = &*self.platform;
        let (off, n) = (usize::from(offset), usize::from(len));
        let mut data = vec![0u8; n];
        let copied = p
            .read_local(self.rx_pages[page].frame, off, &mut data)
            .and_then(|()| p.write_local(self.rx_pages[spare].frame, off, &data));
        if copied.is_err() {
            self.free_rx.push(spare);
            self.channels[chan].stats.drop += 1;
            return Ok(());
        }
        self.deliver_exchange(chan, spare, offset, len)
    }
}

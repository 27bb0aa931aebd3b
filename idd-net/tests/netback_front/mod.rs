//! A minimal netfront written for the tests (devchan's rings over a `LocalPlatform` guest
//! domain): two rings, one port, data pages granted to the backend; and frame builders.
#![allow(dead_code, missing_docs)]

use devchan::grant::{DomId, GrantRef, PAGE_SIZE};
use devchan::netif::{
    NetifRxFrontRing, NetifRxRequest, NetifRxResponse, NetifTxFrontRing, NetifTxRequest,
    NetifTxResponse, TxFlags, TxFragment, TxPacket,
};
use devchan::platform::{Frame, Platform, Port, SharedPage};
use hypervisor::domain::DomainConfig;
use hypervisor::local::{LocalPage, LocalPlatform};
use hypervisor::system::System;
use idd_net::filter::Mac;
use idd_net::netback::ChannelConfig;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Arc;

/// First free frame of a domain's RAM.
pub const FREE: Frame = 7;
/// Data pages of a guest.
pub const PAGES: u64 = 48;

/// A minimal netfront: two rings, one port, data pages granted to the backend.
pub struct Front {
    pub plat: LocalPlatform,
    pub tx: NetifTxFrontRing,
    pub rx: NetifRxFrontRing,
    pub _tx_page: LocalPage,
    pub _rx_page: LocalPage,
    pub tx_ref: GrantRef,
    pub rx_ref: GrantRef,
    pub port: Port,
    pub backend: DomId,
    pub mac: Mac,
    /// Data pages and their grants.
    pub pages: Vec<(Frame, GrantRef)>,
    pub next_id: u16,
    /// Transmit responses seen per id.
    pub tx_seen: BTreeMap<u16, Vec<i16>>,
    /// Receive buffers posted: id → (frame, gref, exchange).
    pub rx_posted: BTreeMap<u16, (Frame, GrantRef, bool)>,
}

impl Front {
    pub fn new(sys: &Arc<System>, backend: DomId, name: &str, mac: u8) -> Self {
        let d = sys
            .create_domain(DomainConfig {
                name: name.into(),
                nr_frames: FREE + PAGES + 4,
                iommu: None,
            })
            .unwrap();
        let plat = LocalPlatform::new(sys.clone(), d).unwrap();
        let tx_page = plat.alloc_shared_page().unwrap();
        let rx_page = plat.alloc_shared_page().unwrap();
        let tx_ref = plat.grant_access(backend, tx_page.frame(), false).unwrap();
        let rx_ref = plat.grant_access(backend, rx_page.frame(), false).unwrap();
        // SAFETY: both pages are live 4 KiB pages owned by this struct, dropped after the
        // rings (field order), and accessed only through them.
        let (tx, rx) = unsafe {
            (
                NetifTxFrontRing::init(NonNull::new(tx_page.as_ptr()).unwrap(), PAGE_SIZE).unwrap(),
                NetifRxFrontRing::init(NonNull::new(rx_page.as_ptr()).unwrap(), PAGE_SIZE).unwrap(),
            )
        };
        let port = plat.evtchn_alloc_unbound(backend).unwrap();
        let pages = (0..PAGES)
            .map(|i| {
                (
                    FREE + i,
                    plat.grant_access(backend, FREE + i, false).unwrap(),
                )
            })
            .collect();
        Self {
            plat,
            tx,
            rx,
            _tx_page: tx_page,
            _rx_page: rx_page,
            tx_ref,
            rx_ref,
            port,
            backend,
            mac: Mac([2, 0, 0, 0, 0, mac]),
            pages,
            next_id: 0,
            tx_seen: BTreeMap::new(),
            rx_posted: BTreeMap::new(),
        }
    }

    pub fn channel(&self, journal_frame: Frame, rx_copy: bool) -> ChannelConfig {
        ChannelConfig {
            guest: self.plat.domid(),
            tx_ring_ref: self.tx_ref,
            rx_ring_ref: self.rx_ref,
            remote_port: self.port,
            mac: self.mac,
            rx_copy,
            credit: None,
            nets: Vec::new(),
            journal_frame,
        }
    }

    pub fn id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    /// Put `data` on the ring as fragments: `(page, offset, len)` each.
    pub fn send_frags(&mut self, data: &[u8], frags: &[(usize, u16, u16)]) -> Vec<u16> {
        self.send_with(data, frags, TxFlags::empty())
    }

    /// As `send_frags`, with the first request's flags.
    pub fn send_with(
        &mut self,
        data: &[u8],
        frags: &[(usize, u16, u16)],
        flags: TxFlags,
    ) -> Vec<u16> {
        let mut at = 0;
        let mut fragments = Vec::new();
        for &(page, offset, len) in frags {
            let (frame, gref) = self.pages[page];
            self.plat
                .write_local(frame, usize::from(offset), &data[at..at + usize::from(len)])
                .unwrap();
            at += usize::from(len);
            fragments.push(TxFragment {
                id: self.id(),
                gref,
                offset,
                size: len,
            });
        }
        assert_eq!(at, data.len());
        let p = TxPacket {
            flags,
            size: u16::try_from(data.len()).unwrap(),
            fragments,
            extras: Vec::new(),
        };
        for r in p.encode() {
            self.tx.put_request(&r).unwrap();
        }
        self.push();
        p.fragments.iter().map(|f| f.id).collect()
    }

    /// Send a frame from data page `page` (one slot).
    pub fn send(&mut self, data: &[u8], page: usize) -> u16 {
        self.send_frags(data, &[(page, 0, u16::try_from(data.len()).unwrap())])[0]
    }

    pub fn put_raw(&mut self, reqs: &[NetifTxRequest]) {
        for r in reqs {
            self.tx.put_request(r).unwrap();
        }
        self.push();
    }

    pub fn push(&mut self) {
        if self.tx.push_requests() {
            self.plat.evtchn_notify(self.port).unwrap();
        }
    }

    /// Post receive buffers on data pages `pages`: copy (granted pages) or exchange
    /// (accept-transfer grants).
    pub fn post_rx(&mut self, pages: std::ops::Range<usize>, exchange: bool) {
        for page in pages {
            let frame = self.pages[page].0;
            let gref = if exchange {
                self.plat.accept_transfer(self.backend, frame).unwrap()
            } else {
                self.pages[page].1
            };
            let id = self.id();
            self.rx
                .put_request(&NetifRxRequest { id, pad: 0, gref })
                .unwrap();
            self.rx_posted.insert(id, (frame, gref, exchange));
        }
        if self.rx.push_requests() {
            self.plat.evtchn_notify(self.port).unwrap();
        }
    }

    /// Transmit responses now available (recorded per id).
    pub fn tx_responses(&mut self) -> Vec<NetifTxResponse> {
        let mut out = Vec::new();
        while let Some(r) = self.tx.get_response().unwrap() {
            self.tx_seen.entry(r.id).or_default().push(r.status);
            out.push(r);
        }
        out
    }

    /// Received frames (or failure statuses) now available.
    pub fn received(&mut self) -> Vec<Result<Vec<u8>, i16>> {
        let mut out = Vec::new();
        while let Some(r) = self.rx.get_response().unwrap() {
            out.push(self.read_rx(&r));
        }
        out
    }

    pub fn read_rx(&mut self, r: &NetifRxResponse) -> Result<Vec<u8>, i16> {
        let (frame, gref, exchange) = self
            .rx_posted
            .remove(&r.id)
            .expect("response to a posted id");
        let frame = if exchange {
            self.plat.end_transfer(gref).unwrap().unwrap_or(frame)
        } else {
            frame
        };
        if r.status < 0 {
            return Err(r.status);
        }
        let mut b = vec![0u8; usize::try_from(r.status).unwrap()];
        self.plat
            .read_local(frame, usize::from(r.offset), &mut b)
            .unwrap();
        Ok(b)
    }
}

pub fn frame_from(dst: Mac, src: Mac, src_ip: [u8; 4], len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&src_ip);
    f.extend_from_slice(&[10, 0, 0, 99]);
    while f.len() < len {
        f.push(u8::try_from(f.len() * 7 % 251).unwrap() ^ seed);
    }
    f.truncate(len);
    f
}

pub const PEER: Mac = Mac([2, 0, 0, 0, 0, 0x99]);

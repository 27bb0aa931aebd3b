//! One connection to one backend: the transmit and receive ring pages, their grants, and the
//! event channel both rings share (no `feature-split-event-channels`).
//!
//! The ring pages are shareable pages the backend maps; everything read from them is copied
//! out first ([`devchan::ring::FrontRing::get_response`], which also refuses a response
//! producer index that runs ahead of our requests). The frontend asks for an event on the
//! next response of each ring before it sleeps (`RING_FINAL_CHECK_FOR_RESPONSES`), so no
//! wake-up is lost; with `feature-rx-notify` the backend in turn relies on our notification
//! when we post receive buffers, which [`Channel::push`] sends when the ring's `req_event`
//! asks for it.

use std::sync::Arc;

use devchan::grant::{DomId, GrantRef, PAGE_SIZE};
use devchan::netif::{
    NetifRxFrontRing, NetifRxRequest, NetifRxResponse, NetifTxFrontRing, NetifTxRequest,
    NetifTxResponse,
};
use devchan::platform::{Platform, PlatformError, Port, SharedPage};
use devchan::ring::{FrontRing, RingError};

use super::frames::{FramePool, GrantKind};

/// Errors of one connection.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A platform call failed.
    #[error("Platform operation {0} failed")]
    Platform(&'static str, #[source] PlatformError),
    /// A ring's indexes are broken (the backend is faulty or hostile), or it is full.
    #[error("Ring failed")]
    Ring(#[from] RingError),
    /// A ring page has no address.
    #[error("Ring page is not mapped")]
    Unmapped,
}

type Result<T> = std::result::Result<T, ChannelError>;

/// A connection to one backend.
pub struct Channel<P: Platform> {
    platform: Arc<P>,
    backend: DomId,
    // The rings are declared before the pages they point into, so they are dropped first.
    tx: NetifTxFrontRing,
    rx: NetifRxFrontRing,
    // Kept alive (mapped) for the rings above.
    _tx_page: P::Page,
    _rx_page: P::Page,
    tx_gref: GrantRef,
    rx_gref: GrantRef,
    port: Port,
}

impl<P: Platform> Channel<P> {
    /// Allocate and grant two fresh ring pages and an unbound port for `backend`.
    pub fn new(platform: Arc<P>, backend: DomId) -> Result<Self> {
        let page = || {
            platform
                .alloc_shared_page()
                .map_err(|e| ChannelError::Platform("alloc_shared_page", e))
        };
        let (tx_page, rx_page) = (page()?, page()?);
        let tx_base = core::ptr::NonNull::new(tx_page.as_ptr()).ok_or(ChannelError::Unmapped)?;
        let rx_base = core::ptr::NonNull::new(rx_page.as_ptr()).ok_or(ChannelError::Unmapped)?;
        // SAFETY: `tx_page` is a page-aligned 4 KiB shareable page that stays mapped while its
        // handle lives; the handle is stored in the same struct as the ring and dropped after
        // it (field order), and this process touches the page only through this ring.
        let tx = unsafe { FrontRing::init(tx_base, PAGE_SIZE) }?;
        // SAFETY: as above, for `rx_page` and the receive ring.
        let rx = unsafe { FrontRing::init(rx_base, PAGE_SIZE) }?;
        let grant = |p: &P::Page| {
            platform
                .grant_access(backend, p.frame(), false)
                .map_err(|e| ChannelError::Platform("grant_access", e))
        };
        let tx_gref = grant(&tx_page)?;
        let rx_gref = match grant(&rx_page) {
            Ok(g) => g,
            Err(e) => {
                let _ = platform.end_access(tx_gref);
                return Err(e);
            }
        };
        let port = match platform.evtchn_alloc_unbound(backend) {
            Ok(p) => p,
            Err(e) => {
                let _ = platform.end_access(tx_gref);
                let _ = platform.end_access(rx_gref);
                return Err(ChannelError::Platform("evtchn_alloc_unbound", e));
            }
        };
        Ok(Self {
            platform,
            backend,
            tx,
            rx,
            _tx_page: tx_page,
            _rx_page: rx_page,
            tx_gref,
            rx_gref,
            port,
        })
    }

    /// The backend domain.
    pub fn backend(&self) -> DomId {
        self.backend
    }

    /// `tx-ring-ref`.
    pub fn tx_ref(&self) -> GrantRef {
        self.tx_gref
    }

    /// `rx-ring-ref`.
    pub fn rx_ref(&self) -> GrantRef {
        self.rx_gref
    }

    /// `event-channel`.
    pub fn port(&self) -> Port {
        self.port
    }

    /// Free transmit slots.
    pub fn tx_free(&self) -> u32 {
        self.tx.free_requests()
    }

    /// Free receive slots.
    pub fn rx_free(&self) -> u32 {
        self.rx.free_requests()
    }

    /// The receive ring's next request index modulo its size: the id Linux would give the
    /// next buffer.
    pub fn rx_next_slot(&self) -> u32 {
        self.rx.req_prod_pvt() & (self.rx.size() - 1)
    }

    /// Queue transmit requests (all of one packet); the backend sees them after a push.
    pub fn put_tx(&mut self, reqs: &[NetifTxRequest]) -> Result<()> {
        if self.tx.free_requests() < u32::try_from(reqs.len()).unwrap_or(u32::MAX) {
            return Err(RingError::Full.into());
        }
        for r in reqs {
            self.tx.put_request(r)?;
        }
        Ok(())
    }

    /// Queue a receive buffer.
    pub fn put_rx(&mut self, req: &NetifRxRequest) -> Result<()> {
        self.rx.put_request(req)?;
        Ok(())
    }

    /// Publish queued requests on both rings and notify the backend if either asks for it.
    pub fn push(&mut self) -> Result<()> {
        let tx = self.tx.push_requests();
        let rx = self.rx.push_requests();
        if tx || rx {
            self.platform
                .evtchn_notify(self.port)
                .map_err(|e| ChannelError::Platform("evtchn_notify", e))?;
        }
        Ok(())
    }

    /// Notify the backend unconditionally (once it has connected: it looks at both rings).
    pub fn notify(&self) -> Result<()> {
        self.platform
            .evtchn_notify(self.port)
            .map_err(|e| ChannelError::Platform("evtchn_notify", e))
    }

    /// Copy every published response of both rings out; when none is left, ask for an event
    /// on the next one of each and check once more.
    pub fn take_responses(&mut self) -> Result<(Vec<NetifTxResponse>, Vec<NetifRxResponse>)> {
        let (mut txs, mut rxs) = (Vec::new(), Vec::new());
        loop {
            while let Some(r) = self.tx.get_response()? {
                txs.push(r);
            }
            while let Some(r) = self.rx.get_response()? {
                rxs.push(r);
            }
            let more_tx = self.tx.final_check_for_responses()?;
            let more_rx = self.rx.final_check_for_responses()?;
            if !more_tx && !more_rx {
                return Ok((txs, rxs));
            }
        }
    }

    /// Drop the connection without reading anything more: close the port and end the ring
    /// grants (quarantined in `pool` while the backend still maps them).
    pub fn teardown(self, pool: &mut FramePool) {
        let _ = self.platform.evtchn_close(self.port);
        for g in [self.tx_gref, self.rx_gref] {
            let _ = pool.release(&*self.platform, g, GrantKind::Access, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::domain::DomainConfig;
    use hypervisor::local::LocalPlatform;
    use hypervisor::system::System;

    #[test]
    fn rings_are_granted_and_released() {
        let sys = System::new();
        let cfg = |n: &str| DomainConfig {
            name: n.into(),
            nr_frames: 16,
            iommu: None,
        };
        let f = sys.create_domain(cfg("front")).unwrap();
        let b = sys.create_domain(cfg("back")).unwrap();
        let front = Arc::new(LocalPlatform::new(sys.clone(), f).unwrap());
        let back = LocalPlatform::new(sys, b).unwrap();
        let mut ch = Channel::new(front.clone(), b).unwrap();
        assert_eq!((ch.tx_free(), ch.rx_free()), (256, 256));
        assert_ne!(ch.tx_ref(), ch.rx_ref());
        let map = back.map_grant(f, ch.rx_ref(), false).unwrap();
        // SAFETY: a live 4 KiB mapping, kept until the end of the test, used only by the ring.
        let mut ring: devchan::netif::NetifRxBackRing = unsafe {
            devchan::ring::BackRing::attach(core::ptr::NonNull::new(map.as_ptr()).unwrap(), 4096)
                .unwrap()
        };
        back.evtchn_bind_interdomain(f, ch.port()).unwrap();
        assert_eq!(ch.rx_next_slot(), 0);
        ch.put_rx(&NetifRxRequest {
            id: 0,
            pad: 0,
            gref: 77,
        })
        .unwrap();
        ch.push().unwrap();
        assert_eq!(ch.rx_next_slot(), 1);
        let got = ring.get_request().unwrap().unwrap();
        assert_eq!(got.gref, 77);
        ring.put_response(&NetifRxResponse {
            id: 0,
            offset: 0,
            flags: 0,
            status: 60,
        })
        .unwrap();
        ring.push_responses();
        let (t, r) = ch.take_responses().unwrap();
        assert!(t.is_empty());
        assert_eq!(r[0].status, 60);
        let mut pool = FramePool::new([]);
        ch.teardown(&mut pool);
        assert_eq!(pool.quarantined(), 1, "the rx ring is still mapped");
        drop(map);
        pool.retry_quarantine(&*front);
        assert_eq!(pool.quarantined(), 0);
    }
}

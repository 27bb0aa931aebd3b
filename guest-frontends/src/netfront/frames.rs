//! The frontend's buffer frames: pages of the domain's own RAM (not shareable pages), handed
//! out for transmit data and posted receive buffers, each granted to the backend only while a
//! request names it.
//!
//! A frame goes back to the pool when its grant is ended. A grant the backend still uses
//! (`GrantInUse`: a mapping, pin or copy the backend has not released, or an exchange under
//! way) is *quarantined* with its frame: the frame is not reused until a later
//! [`FramePool::retry_quarantine`] ends the grant, so a late write by a dead or slow backend
//! can never land in a frame that already holds another packet. Ring grants that cannot be
//! ended at teardown are kept here too (without a frame) and retried the same way.

use devchan::grant::GrantRef;
use devchan::platform::{Frame, Platform, PlatformError};

/// What kind of grant a quarantined entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantKind {
    /// `grant_access` (transmit data, copy-mode receive buffer, ring page).
    Access,
    /// `accept_transfer` (exchange-mode receive buffer).
    Transfer,
}

/// RAM frames for buffers, with the quarantine of grants a backend still holds.
#[derive(Debug)]
pub struct FramePool {
    free: Vec<Frame>,
    total: usize,
    quarantine: Vec<(GrantRef, GrantKind, Option<Frame>)>,
}

impl FramePool {
    /// A pool of the given frames (the caller guarantees nothing else in the domain uses them).
    pub fn new(frames: impl IntoIterator<Item = Frame>) -> Self {
        let mut free: Vec<Frame> = frames.into_iter().collect();
        // Lowest frame handed out first (pop from the end).
        free.sort_unstable_by(|a, b| b.cmp(a));
        free.dedup();
        Self {
            total: free.len(),
            free,
            quarantine: Vec::new(),
        }
    }

    /// Frames the pool was given.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Frames free now.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Grants (with or without a frame) the backend has not released yet.
    pub fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    /// Take a free frame.
    pub fn alloc(&mut self) -> Option<Frame> {
        self.free.pop()
    }

    /// Give back a frame that was never granted.
    pub fn free(&mut self, frame: Frame) {
        self.free.push(frame);
    }

    /// End `gref` (of `kind`) and free `frame`, or quarantine both while the backend still
    /// holds the grant. For a transfer grant, returns where an arrived page is now (`Some`),
    /// `None` if nothing arrived or the grant is quarantined.
    pub fn release<P: Platform + ?Sized>(
        &mut self,
        platform: &P,
        gref: GrantRef,
        kind: GrantKind,
        frame: Option<Frame>,
    ) -> Result<Option<Frame>, PlatformError> {
        let ended = match kind {
            GrantKind::Access => platform.end_access(gref).map(|()| None),
            GrantKind::Transfer => platform.end_transfer(gref),
        };
        match ended {
            Ok(arrived) => {
                if let Some(f) = frame {
                    self.free.push(f);
                }
                Ok(arrived)
            }
            Err(e) => {
                tracing::debug!(gref, error = %e, "grant still held by the backend; quarantined");
                self.quarantine.push((gref, kind, frame));
                Err(e)
            }
        }
    }

    /// Try again to end quarantined grants.
    pub fn retry_quarantine<P: Platform + ?Sized>(&mut self, platform: &P) {
        for (gref, kind, frame) in std::mem::take(&mut self.quarantine) {
            let _ = self.release(platform, gref, kind, frame);
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
    fn quarantine_holds_frames_until_the_peer_lets_go() {
        let sys = System::new();
        let cfg = |n: &str| DomainConfig {
            name: n.into(),
            nr_frames: 16,
            iommu: None,
        };
        let f = sys.create_domain(cfg("front")).unwrap();
        let b = sys.create_domain(cfg("back")).unwrap();
        let front = LocalPlatform::new(sys.clone(), f).unwrap();
        let back = LocalPlatform::new(sys, b).unwrap();
        let mut pool = FramePool::new([9, 8, 8, 10]);
        assert_eq!((pool.total(), pool.available()), (3, 3));
        let frame = pool.alloc().unwrap();
        assert_eq!(frame, 8, "lowest first");
        let page = front.alloc_shared_page().unwrap();
        let gref = front.grant_access(b, page_frame(&page), false).unwrap();
        let map = back.map_grant(f, gref, false).unwrap();
        assert!(pool
            .release(&front, gref, GrantKind::Access, Some(frame))
            .is_err());
        assert_eq!((pool.available(), pool.quarantined()), (2, 1));
        pool.retry_quarantine(&front);
        assert_eq!(pool.quarantined(), 1, "still mapped");
        drop(map);
        pool.retry_quarantine(&front);
        assert_eq!((pool.available(), pool.quarantined()), (3, 0));
    }

    fn page_frame(p: &impl devchan::platform::SharedPage) -> Frame {
        p.frame()
    }
}

//! The manager's XenBus-level recoveries: a channel whose ring the IDD refused gets a new
//! ring (the frontend's reconnect protocol), and the IDD domain itself can be replaced.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use devchan::xenbus::XenbusState;
use hypervisor::domain::DomainConfig;

use super::Manager;
use crate::layout::IDD_FRAMES;
use crate::recovery::{Cause, Recovery};
use crate::toolstack::{self, RingView};
use crate::VBD_DEVID;

impl Manager {
    /// Wait until the frontend state of guest `gi` is one of `want`.
    fn wait_front(&mut self, gi: usize, want: &[XenbusState], deadline: Instant) -> Result<()> {
        let key = format!(
            "{}/state",
            toolstack::front_dir(self.guests[gi].domid, VBD_DEVID)
        );
        loop {
            let s = toolstack::read_state(&mut self.admin, &key);
            if want.contains(&s) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "guest {}: frontend state {s}, waiting for {want:?}",
                self.guests[gi].name
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The IDD refused channel `chan` (a corrupted ring): take the backend through
    /// `Closing` → `Closed` → `InitWait` so the frontend drops that ring and publishes a new
    /// one (blkfront's reconnect; it reissues what had no answer), then restart the IDD
    /// process with the new ring (the other guests see a process restart).
    pub fn reset_channel(&mut self, chan: usize, timeout: Duration) -> Result<Recovery> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        let gi = *self.chan_guest.get(chan).context("no such channel")?;
        let nodes = self.guests[gi].nodes.clone();
        toolstack::set_backend_state(&mut self.admin, &nodes, XenbusState::Closing)?;
        self.wait_front(gi, &[XenbusState::Closed, XenbusState::Closing], deadline)?;
        toolstack::set_backend_state(&mut self.admin, &nodes, XenbusState::Closed)?;
        self.wait_front(
            gi,
            &[XenbusState::Initialising, XenbusState::Closed],
            deadline,
        )?;
        toolstack::set_backend_state(&mut self.admin, &nodes, XenbusState::InitWait)?;
        self.wait_front(gi, &[XenbusState::Initialised], deadline)?;
        let (gref, port) = toolstack::frontend_ring(&mut self.admin, &nodes)?
            .context("frontend Initialised without a ring")?;
        self.guests[gi].ring = Some(RingView::new(self.sys.clone(), nodes.guest, gref));
        self.channels[chan].ring_ref = gref;
        self.channels[chan].port = port;
        // The new ring goes to a new process (the channel list is its command line). The
        // recovery's "detect" phase is the XenBus reconnect, from t0.
        if let Some(p) = self.idd_proc.as_mut() {
            p.run.kill()?;
        }
        self.fault_at = Some(t0);
        let r = self.recover(Cause::Exited(format!(
            "channel {chan} ring refused; frontend reconnected"
        )))?;
        toolstack::set_backend_state(&mut self.admin, &nodes, XenbusState::Connected)?;
        self.failed_channels.retain(|c| *c != chan);
        self.reset_done.retain(|c| *c != chan);
        Ok(r)
    }

    /// Replace the IDD *domain* (not just its process): a new domain gets the device, the
    /// backend nodes move to it, and every frontend is told (`backend`/`backend-id`
    /// rewritten: blkfront's reconnect signal). The old domain is destroyed.
    pub fn replace_idd_domain(&mut self, timeout: Duration) -> Result<()> {
        if let Some(mut p) = self.idd_proc.take() {
            let _ = p.run.kill();
        }
        let old = self.idd;
        let _ = self.sys.release_mappings(old);
        self.sys.set_holder_deadline(old, Instant::now())?;
        self.sys.revoke_overdue();
        let new = self.sys.create_domain(DomainConfig {
            name: format!("idd-{}", self.dev.name),
            nr_frames: IDD_FRAMES,
            iommu: Some(self.dev.iommu.clone()),
        })?;
        self.idd = new;
        for g in &mut self.guests {
            g.nodes.idd = new;
            g.ring = None;
            toolstack::write_vbd(&mut self.admin, &g.nodes)?;
            toolstack::point_frontend(&mut self.admin, &g.nodes)?;
        }
        self.connect(timeout)?;
        let _ = self.sys.destroy_domain(old);
        Ok(())
    }
}

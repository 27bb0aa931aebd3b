//! The manager's XenBus-level recoveries of the block slice: a channel whose ring the IDD
//! refused gets a new ring (the frontend's reconnect protocol), and the IDD domain itself
//! can be replaced.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use devchan::xenbus::XenbusState;
use hypervisor::domain::DomainConfig;

use super::blk::BlkSlice;
use super::Dom0;
use crate::layout::IDD_FRAMES;
use crate::recovery::{Cause, Recovery};
use crate::toolstack::{self, RingView};
use crate::VBD_DEVID;

impl BlkSlice {
    /// Wait until the frontend state of disk `di` is one of `want`.
    fn wait_front(
        &self,
        d0: &mut Dom0,
        di: usize,
        want: &[XenbusState],
        deadline: Instant,
    ) -> Result<()> {
        let key = format!(
            "{}/state",
            toolstack::front_dir(self.disks[di].domid, VBD_DEVID)
        );
        loop {
            let s = toolstack::read_state(&mut d0.admin, &key);
            if want.contains(&s) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "guest {}: frontend state {s}, waiting for {want:?}",
                self.disks[di].name
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The IDD refused channel `chan` (a corrupted ring): take the backend through
    /// `Closing` → `Closed` → `InitWait` so the frontend drops that ring and publishes a new
    /// one (blkfront's reconnect; it reissues what had no answer), then restart the IDD
    /// process with the new ring (the other guests see a process restart).
    pub fn reset_channel(
        &mut self,
        d0: &mut Dom0,
        chan: usize,
        timeout: Duration,
        seq: u32,
    ) -> Result<Recovery> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        let di = *self.chan_disk.get(chan).context("no such channel")?;
        let nodes = self.disks[di].nodes.clone();
        toolstack::set_backend_state(&mut d0.admin, &nodes, XenbusState::Closing)?;
        self.wait_front(
            d0,
            di,
            &[XenbusState::Closed, XenbusState::Closing],
            deadline,
        )?;
        toolstack::set_backend_state(&mut d0.admin, &nodes, XenbusState::Closed)?;
        self.wait_front(
            d0,
            di,
            &[XenbusState::Initialising, XenbusState::Closed],
            deadline,
        )?;
        toolstack::set_backend_state(&mut d0.admin, &nodes, XenbusState::InitWait)?;
        self.wait_front(d0, di, &[XenbusState::Initialised], deadline)?;
        let (gref, port) = toolstack::frontend_ring(&mut d0.admin, &nodes)?
            .context("frontend Initialised without a ring")?;
        self.disks[di].ring = Some(RingView::new(d0.sys.clone(), nodes.guest, gref));
        self.channels[chan].ring_ref = gref;
        self.channels[chan].port = port;
        // The new ring goes to a new process (the channel list is its command line). The
        // recovery's "detect" phase is the XenBus reconnect, from t0.
        self.idd.kill()?;
        self.idd.fault_at = Some(t0);
        let mut r = self.recover(
            d0,
            Cause::Exited(format!("channel {chan} ring refused; frontend reconnected")),
            seq,
        )?;
        r.channel = Some(chan);
        toolstack::set_backend_state(&mut d0.admin, &nodes, XenbusState::Connected)?;
        self.idd.failed_channels.retain(|c| *c != chan);
        self.reset_done.retain(|c| *c != chan);
        Ok(r)
    }

    /// Replace the IDD *domain* (not just its process): a new domain gets the device, the
    /// backend nodes move to it, and every frontend is told (`backend`/`backend-id`
    /// rewritten: blkfront's reconnect signal). The old domain is destroyed.
    pub fn replace_domain(
        &mut self,
        d0: &mut Dom0,
        started: &[u16],
        timeout: Duration,
    ) -> Result<()> {
        self.idd.kill()?;
        let old = self.idd.domid;
        let _ = d0.sys.release_mappings(old);
        d0.sys.set_holder_deadline(old, Instant::now())?;
        d0.sys.revoke_overdue();
        let new = d0.sys.create_domain(DomainConfig {
            name: format!("idd-{}", self.dev.name),
            nr_frames: IDD_FRAMES,
            iommu: Some(self.idd.iommu().clone()),
        })?;
        self.idd.set_domain(new);
        for g in &mut self.disks {
            g.nodes.idd = new;
            g.ring = None;
            toolstack::write_vbd(&mut d0.admin, &g.nodes)?;
            toolstack::point_frontend(&mut d0.admin, &g.nodes)?;
        }
        self.connect(d0, started, timeout)?;
        let _ = d0.sys.destroy_domain(old);
        Ok(())
    }
}

//! A [`BlockDevice`] adapter that holds requests back until the virtio queue has descriptors
//! for them.
//!
//! `idd_blk::virtio::VirtioBlkDriver` takes `queue_depth()` = a quarter of its queue's
//! descriptors, sized for small requests (header + one or two segments + status), but the
//! elevator merges up to `max_segments()` segments into one request, which then needs
//! `segments + 2` descriptors; when they run out the driver answers `DeviceError::Busy` and
//! blkback fails the guest's request. Here each request's descriptors are counted (`segs + 2`
//! against the queue's [`QUEUE_SIZE`]); one that does not fit waits, in order, in this adapter
//! and is submitted as completions free descriptors. Nothing is reordered and nothing is
//! refused for lack of room.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use idd_blk::device::{BlockDevice, Completion, DevRequest, DeviceError};
use idd_blk::virtio::QUEUE_SIZE;

/// Descriptors a request takes: header, one per segment, status.
fn descriptors(r: &DevRequest) -> usize {
    r.segs.len() + 2
}

/// See the module docs.
pub struct QueueFit<D: BlockDevice> {
    inner: D,
    used: usize,
    by_token: HashMap<u64, usize>,
    waiting: VecDeque<DevRequest>,
}

impl<D: BlockDevice> QueueFit<D> {
    /// Wrap `inner` (a device with a [`QUEUE_SIZE`]-descriptor queue).
    pub fn new(inner: D) -> Self {
        Self {
            inner,
            used: 0,
            by_token: HashMap::new(),
            waiting: VecDeque::new(),
        }
    }

    fn fits(&self, r: &DevRequest) -> bool {
        self.used + descriptors(r) <= usize::from(QUEUE_SIZE)
    }

    fn send(&mut self, r: DevRequest) -> Result<(), DeviceError> {
        let (token, need) = (r.token, descriptors(&r));
        self.inner.submit(r)?;
        self.used += need;
        self.by_token.insert(token, need);
        Ok(())
    }

    /// Submit waiting requests that fit now; a refused one completes as failed.
    fn flush(&mut self, out: &mut Vec<Completion>) {
        while self.waiting.front().is_some_and(|r| self.fits(r)) {
            let Some(r) = self.waiting.pop_front() else {
                break;
            };
            let token = r.token;
            if self.send(r).is_err() {
                out.push(Completion { token, ok: false });
            }
        }
    }
}

impl<D: BlockDevice> BlockDevice for QueueFit<D> {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn max_segments(&self) -> usize {
        // A request must fit an empty queue.
        self.inner.max_segments().min(usize::from(QUEUE_SIZE) - 2)
    }
    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.waiting.len()
    }
    fn submit(&mut self, req: DevRequest) -> Result<(), DeviceError> {
        if descriptors(&req) > usize::from(QUEUE_SIZE) {
            return Err(DeviceError::Malformed("more segments than the queue holds"));
        }
        if self.waiting.is_empty() && self.fits(&req) {
            self.send(req)
        } else {
            self.waiting.push_back(req);
            Ok(())
        }
    }
    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), DeviceError> {
        let start = out.len();
        self.inner.poll(out)?;
        for c in &out[start..] {
            if let Some(n) = self.by_token.remove(&c.token) {
                self.used -= n;
            }
        }
        self.flush(out);
        Ok(())
    }
    fn wait(&mut self, timeout: Duration) -> Result<(), DeviceError> {
        self.inner.wait(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idd_blk::device::{DevOp, IovaSeg};

    /// A device with the driver's rule: `Busy` when descriptors run out; completes on poll.
    struct Strict {
        free: usize,
        queued: Vec<(u64, usize)>,
        order: Vec<u64>,
    }

    impl BlockDevice for Strict {
        fn capacity(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn max_segments(&self) -> usize {
            32
        }
        fn queue_depth(&self) -> usize {
            16
        }
        fn in_flight(&self) -> usize {
            self.queued.len()
        }
        fn submit(&mut self, r: DevRequest) -> Result<(), DeviceError> {
            let need = r.segs.len() + 2;
            if need > self.free {
                return Err(DeviceError::Busy);
            }
            self.free -= need;
            self.queued.push((r.token, need));
            self.order.push(r.token);
            Ok(())
        }
        fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), DeviceError> {
            for (token, need) in self.queued.drain(..) {
                self.free += need;
                out.push(Completion { token, ok: true });
            }
            Ok(())
        }
        fn wait(&mut self, _: Duration) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    fn req(token: u64, segs: usize) -> DevRequest {
        DevRequest {
            token,
            op: DevOp::Read,
            sector: 0,
            nr_sectors: 8 * segs as u64,
            segs: vec![IovaSeg { iova: 0, len: 4096 }; segs],
        }
    }

    #[test]
    fn big_requests_wait_for_room_in_order_and_all_complete() {
        let mut d = QueueFit::new(Strict {
            free: usize::from(QUEUE_SIZE),
            queued: Vec::new(),
            order: Vec::new(),
        });
        for t in 0..6 {
            d.submit(req(t, 30)).unwrap(); // 32 descriptors each: two fit at a time
        }
        assert_eq!(d.in_flight(), 6);
        let mut done = Vec::new();
        while done.len() < 6 {
            d.poll(&mut done).unwrap();
        }
        assert!(done.iter().all(|c| c.ok));
        assert_eq!(d.inner.order, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(d.in_flight(), 0);
        assert!(d.submit(req(9, 63)).is_err(), "can never fit");
    }
}

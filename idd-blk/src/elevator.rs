//! The elevator between blkback's round-robin batches and the device queue.
//!
//! Requests arrive in *arrival order* (the order blkback consumed them, round-robin across
//! guests). [`Elevator::dispatch`] picks the ones that may start now, sorts them by sector
//! and merges neighbours of the same direction into one device request.
//!
//! # Ordering rule
//!
//! Two requests *conflict* when either is a flush, or their sector ranges overlap and at
//! least one of them modifies the media (write or discard). Reads never conflict with reads.
//! A request may start only when it conflicts with nothing still at the device and with no
//! request that arrived before it and has not started. Conflicting requests therefore reach
//! the media in arrival order, whatever order the device completes its queue in; everything
//! else is free to be reordered. A flush is a full barrier: it starts after everything before
//! it completed, and nothing after it starts before it completes.
//!
//! # Merging
//!
//! After sorting the startable requests by first sector (stable: equal sectors keep arrival
//! order), a request is merged into the previous one when both are reads or both are writes,
//! the previous one ends exactly where it starts, and the merged segment count stays within
//! the device's limit. A merged request completes all its parts with the same status.

use crate::device::{DevOp, DevRequest, IovaSeg};
use std::collections::VecDeque;

/// A request waiting in the elevator (one part of a future device request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// blkback's token for this part (unique while it is queued or in flight).
    pub token: u64,
    /// What it does.
    pub op: DevOp,
    /// First sector on the device.
    pub sector: u64,
    /// Sectors.
    pub nr_sectors: u64,
    /// Its memory.
    pub segs: Vec<IovaSeg>,
}

/// Where a request acts, for the ordering rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// What it does.
    pub op: DevOp,
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub nr_sectors: u64,
}

impl Extent {
    /// Whether `self` and `other` must reach the media in their arrival order.
    pub fn conflicts(&self, other: &Extent) -> bool {
        if self.op == DevOp::Flush || other.op == DevOp::Flush {
            return true;
        }
        if !self.op.modifies() && !other.op.modifies() {
            return false;
        }
        let (a0, b0) = (self.sector, other.sector);
        let a1 = a0.saturating_add(self.nr_sectors);
        let b1 = b0.saturating_add(other.nr_sectors);
        a0 < b1 && b0 < a1
    }
}

impl Part {
    /// Its extent.
    pub fn extent(&self) -> Extent {
        Extent {
            op: self.op,
            sector: self.sector,
            nr_sectors: self.nr_sectors,
        }
    }
}

/// A device request built from one or more parts; the device token is the first part's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merged {
    /// The request for the device.
    pub request: DevRequest,
    /// The tokens of its parts, in disk order.
    pub parts: Vec<u64>,
}

impl Merged {
    /// Its extent.
    pub fn extent(&self) -> Extent {
        Extent {
            op: self.request.op,
            sector: self.request.sector,
            nr_sectors: self.request.nr_sectors,
        }
    }
}

/// The queue of requests not yet at the device.
#[derive(Debug)]
pub struct Elevator {
    pending: VecDeque<Part>,
    max_segments: usize,
}

impl Elevator {
    /// An empty elevator merging up to `max_segments` segments per device request.
    pub fn new(max_segments: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            max_segments: max_segments.max(1),
        }
    }

    /// Queue a part (in arrival order).
    pub fn push(&mut self, part: Part) {
        self.pending.push_back(part);
    }

    /// Parts waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Take the parts that may start now given what is `in_flight` at the device, at most
    /// `budget` device requests, sorted by sector and merged.
    pub fn dispatch(&mut self, in_flight: &[Extent], budget: usize) -> Vec<Merged> {
        let mut ready: Vec<Part> = Vec::new();
        let mut blocked: Vec<Extent> = in_flight.to_vec();
        let mut keep = VecDeque::with_capacity(self.pending.len());
        for p in self.pending.drain(..) {
            let e = p.extent();
            // Budget counts parts here; merging can only reduce the number of requests.
            if ready.len() < budget && !blocked.iter().any(|b| b.conflicts(&e)) {
                blocked.push(e);
                ready.push(p);
            } else {
                blocked.push(e);
                keep.push_back(p);
            }
        }
        self.pending = keep;
        ready.sort_by_key(|p| p.sector);
        let mut out: Vec<Merged> = Vec::with_capacity(ready.len());
        for p in ready {
            if let Some(last) = out.last_mut() {
                let r = &mut last.request;
                let same_dir = r.op == p.op && matches!(p.op, DevOp::Read | DevOp::Write);
                if same_dir
                    && r.sector.checked_add(r.nr_sectors) == Some(p.sector)
                    && r.segs.len() + p.segs.len() <= self.max_segments
                {
                    r.nr_sectors += p.nr_sectors;
                    r.segs.extend_from_slice(&p.segs);
                    last.parts.push(p.token);
                    continue;
                }
            }
            out.push(Merged {
                request: DevRequest {
                    token: p.token,
                    op: p.op,
                    sector: p.sector,
                    nr_sectors: p.nr_sectors,
                    segs: p.segs,
                },
                parts: vec![p.token],
            });
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // sector numbers in tests are tiny
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn part(token: u64, op: DevOp, sector: u64, n: u64) -> Part {
        let segs = if matches!(op, DevOp::Read | DevOp::Write) {
            (0..n)
                .map(|i| IovaSeg {
                    iova: token << 20 | i << 9,
                    len: 512,
                })
                .collect()
        } else {
            Vec::new()
        };
        Part {
            token,
            op,
            sector,
            nr_sectors: if op == DevOp::Flush { 0 } else { n },
            segs,
        }
    }

    #[test]
    fn sorts_and_merges_adjacent_same_direction() {
        let mut e = Elevator::new(64);
        e.push(part(1, DevOp::Write, 16, 8));
        e.push(part(2, DevOp::Write, 0, 8));
        e.push(part(3, DevOp::Write, 8, 8));
        e.push(part(4, DevOp::Read, 100, 8));
        e.push(part(5, DevOp::Read, 108, 4));
        e.push(part(6, DevOp::Read, 24, 8)); // adjacent to the writes, other direction
        let out = e.dispatch(&[], 16);
        let shape: Vec<_> = out
            .iter()
            .map(|m| {
                (
                    m.request.op,
                    m.request.sector,
                    m.request.nr_sectors,
                    m.parts.clone(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (DevOp::Write, 0, 24, vec![2, 3, 1]),
                (DevOp::Read, 24, 8, vec![6]),
                (DevOp::Read, 100, 12, vec![4, 5]),
            ]
        );
        assert_eq!(out[0].request.segs.len(), 24);
        assert_eq!(out[0].request.token, 2);
        assert!(e.is_empty());
    }

    #[test]
    fn merge_respects_segment_limit() {
        let mut e = Elevator::new(10);
        e.push(part(1, DevOp::Read, 0, 8));
        e.push(part(2, DevOp::Read, 8, 8));
        assert_eq!(e.dispatch(&[], 8).len(), 2);
    }

    #[test]
    fn overlapping_writes_wait_for_each_other() {
        let mut e = Elevator::new(64);
        e.push(part(1, DevOp::Write, 8, 16));
        e.push(part(2, DevOp::Write, 4, 8)); // overlaps 1: must wait
        e.push(part(3, DevOp::Read, 10, 1)); // overlaps 1 and 2 (writes): must wait
        e.push(part(4, DevOp::Read, 100, 1));
        let first = e.dispatch(&[], 16);
        let toks: Vec<_> = first.iter().map(|m| m.parts.clone()).collect();
        assert_eq!(toks, vec![vec![1], vec![4]]);
        // While 1 is at the device, 2 and 3 stay queued.
        let inflight = [first[0].extent()];
        assert!(e.dispatch(&inflight, 16).is_empty());
        let second = e.dispatch(&[], 16);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].parts, vec![2]);
        let third = e.dispatch(&[second[0].extent()], 16);
        assert!(third.is_empty(), "read 3 overlaps write 2 in flight");
        assert_eq!(e.dispatch(&[], 16)[0].parts, vec![3]);
    }

    #[test]
    fn flush_is_a_barrier() {
        let mut e = Elevator::new(64);
        e.push(part(1, DevOp::Write, 0, 8));
        e.push(part(2, DevOp::Flush, 0, 0));
        e.push(part(3, DevOp::Read, 50, 8));
        let a = e.dispatch(&[], 16);
        assert_eq!(a.len(), 1);
        assert!(e.dispatch(&[a[0].extent()], 16).is_empty());
        let b = e.dispatch(&[], 16);
        assert_eq!(b[0].parts, vec![2]);
        assert!(e.dispatch(&[b[0].extent()], 16).is_empty());
        assert_eq!(e.dispatch(&[], 16)[0].parts, vec![3]);
    }

    #[test]
    fn budget_limits_dispatch() {
        let mut e = Elevator::new(64);
        for i in 0..5 {
            e.push(part(i, DevOp::Read, i * 100, 1));
        }
        assert_eq!(e.dispatch(&[], 2).len(), 2);
        assert_eq!(e.len(), 3);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Arrive(u8, u64, u64),
        Dispatch(usize),
        Complete(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0u8..4, 0u64..32, 1u64..6).prop_map(|(o, s, n)| Step::Arrive(o, s, n)),
            1 => (1usize..8).prop_map(Step::Dispatch),
            2 => (0usize..16).prop_map(Step::Complete),
        ]
    }

    proptest! {
        /// A device that completes in-flight requests in any order, applying each request's
        /// effect at completion: every part completes exactly once, and every sector ends
        /// with the value the arrival-order (sequential) execution gives; every read sees
        /// what the sequential execution shows it.
        #[test]
        fn never_reorders_conflicts_never_loses(steps in proptest::collection::vec(step(), 1..120)) {
            let mut e = Elevator::new(6);
            let mut disk = [0u64; 40];
            let mut model = [0u64; 40];
            let mut expect_reads: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            let mut parts: BTreeMap<u64, Part> = BTreeMap::new();
            let mut inflight: Vec<Merged> = Vec::new();
            let mut done: BTreeMap<u64, u32> = BTreeMap::new();
            let mut seen_reads: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            let mut next = 1u64;
            let run = |m: &Merged, parts: &BTreeMap<u64, Part>, disk: &mut [u64; 40], seen: &mut BTreeMap<u64, Vec<u64>>| {
                for t in &m.parts {
                    let p = &parts[t];
                    let r = p.sector as usize..(p.sector + p.nr_sectors) as usize;
                    match p.op {
                        DevOp::Write => disk[r].fill(*t),
                        DevOp::Discard => disk[r].fill(0),
                        DevOp::Read => { seen.insert(*t, disk[r].to_vec()); }
                        DevOp::Flush => {}
                    }
                }
            };
            let mut all = steps;
            all.push(Step::Dispatch(64));
            for s in all {
                match s {
                    Step::Arrive(o, sector, n) => {
                        let op = [DevOp::Read, DevOp::Write, DevOp::Discard, DevOp::Flush][usize::from(o)];
                        let p = part(next, op, sector, n);
                        // The sequential model runs it on arrival.
                        let r = p.sector as usize..(p.sector + p.nr_sectors) as usize;
                        match op {
                            DevOp::Write => model[r].fill(next),
                            DevOp::Discard => model[r].fill(0),
                            DevOp::Read => { expect_reads.insert(next, model[r].to_vec()); }
                            DevOp::Flush => {}
                        }
                        parts.insert(next, p.clone());
                        e.push(p);
                        next += 1;
                    }
                    Step::Dispatch(b) => {
                        let ext: Vec<_> = inflight.iter().map(Merged::extent).collect();
                        inflight.extend(e.dispatch(&ext, b));
                    }
                    Step::Complete(i) => {
                        if !inflight.is_empty() {
                            let m = inflight.remove(i % inflight.len());
                            run(&m, &parts, &mut disk, &mut seen_reads);
                            for t in m.parts { *done.entry(t).or_default() += 1; }
                        }
                    }
                }
            }
            // Drain: complete everything, dispatching until empty.
            while !inflight.is_empty() || !e.is_empty() {
                let ext: Vec<_> = inflight.iter().map(Merged::extent).collect();
                inflight.extend(e.dispatch(&ext, 64));
                let m = inflight.pop().expect("a dispatch with nothing in flight starts something");
                run(&m, &parts, &mut disk, &mut seen_reads);
                for t in m.parts { *done.entry(t).or_default() += 1; }
            }
            prop_assert_eq!(done.len(), parts.len());
            prop_assert!(done.values().all(|c| *c == 1));
            prop_assert_eq!(disk, model);
            prop_assert_eq!(seen_reads, expect_reads);
        }
    }
}

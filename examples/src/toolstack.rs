//! Domain 0's part of the demo: the device directories the toolstack writes (as Xen's `libxl`
//! does for a split device) and a watcher that records both ends' XenBus states.
//!
//! Both talk to xenstored over its Unix socket, as Xen's tools would.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::Result;
use devchan::grant::DomId;
use devchan::xenbus::XenbusState;
use devchan::xenstore::perms::{Perm, PERM_READ};
use devchan::xenstore::{Client, ClientError, XsError};

use crate::proto;

/// One entry of the timeline: when (since the demo started), who, what.
#[derive(Clone, Debug)]
pub struct Event {
    /// Milliseconds since the demo started.
    pub at_ms: f64,
    /// `frontend`, `backend`, or `manager`.
    pub who: String,
    /// A XenBus state name or what the manager did.
    pub what: String,
}

/// A shared, ordered list of [`Event`]s.
#[derive(Clone)]
pub struct Timeline {
    start: Instant,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Timeline {
    /// An empty timeline starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    /// Record `what` by `who` now.
    pub fn push(&self, who: &str, what: impl Into<String>) {
        let at_ms = self.start.elapsed().as_secs_f64() * 1e3;
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event {
                at_ms,
                who: who.into(),
                what: what.into(),
            });
    }

    /// The events so far, in time order.
    pub fn events(&self) -> Vec<Event> {
        let mut v = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        v.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
        v
    }

    /// Milliseconds since the start.
    pub fn now_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

/// Write the `vdemo` device 0 of `front` served by `back`: both directories with their
/// permissions (frontend's owned by `front` and readable by `back`, backend's the reverse),
/// `backend`/`backend-id`, `frontend`/`frontend-id`, and both `state`s `Initialising`, in one
/// transaction (retried on conflict).
pub fn write_device(xs: &mut Client<UnixStream>, front: DomId, back: DomId) -> Result<()> {
    let fdir = proto::front_dir(front);
    let bdir = proto::back_dir(back, front);
    let fperm = [Perm::new(front, 0), Perm::new(back, PERM_READ)];
    let bperm = [Perm::new(back, 0), Perm::new(front, PERM_READ)];
    let init = XenbusState::Initialising.to_xenstore();
    let nodes: Vec<(String, String, &[Perm])> = vec![
        (
            format!("/local/domain/{front}/device"),
            String::new(),
            &fperm,
        ),
        (
            format!("/local/domain/{front}/device/{}", proto::DEVICE),
            String::new(),
            &fperm,
        ),
        (fdir.clone(), String::new(), &fperm),
        (format!("{fdir}/backend"), bdir.clone(), &fperm),
        (format!("{fdir}/backend-id"), back.to_string(), &fperm),
        (format!("{fdir}/state"), init.clone(), &fperm),
        (
            format!("/local/domain/{back}/backend"),
            String::new(),
            &bperm,
        ),
        (
            format!("/local/domain/{back}/backend/{}", proto::DEVICE),
            String::new(),
            &bperm,
        ),
        (
            format!("/local/domain/{back}/backend/{}/{front}", proto::DEVICE),
            String::new(),
            &bperm,
        ),
        (bdir.clone(), String::new(), &bperm),
        (format!("{bdir}/frontend"), fdir.clone(), &bperm),
        (format!("{bdir}/frontend-id"), front.to_string(), &bperm),
        (format!("{bdir}/state"), init, &bperm),
    ];
    loop {
        let tx = xs.transaction_start()?;
        for (path, value, perms) in &nodes {
            xs.write(tx, path, value.as_bytes())?;
            xs.set_perms(tx, path, perms)?;
        }
        match xs.transaction_end(tx, true) {
            Ok(()) => return Ok(()),
            Err(ClientError::Xs(XsError::Eagain)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Watches both ends' `state` keys over the socket at `path` and records every change.
pub struct StateWatcher {
    stream: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl StateWatcher {
    /// Start watching device 0 of `front`/`back`.
    pub fn start(path: &Path, front: DomId, back: DomId, timeline: Timeline) -> Result<Self> {
        let stream = UnixStream::connect(path)?;
        let mut xs = Client::new(stream.try_clone()?);
        let keys = [
            ("frontend", format!("{}/state", proto::front_dir(front))),
            ("backend", format!("{}/state", proto::back_dir(back, front))),
        ];
        for (tok, k) in &keys {
            xs.watch(k, tok)?;
        }
        let thread = std::thread::spawn(move || {
            let mut last: [Option<XenbusState>; 2] = [None, None];
            while let Ok(ev) = xs.next_event() {
                let Some(i) = keys
                    .iter()
                    .position(|(t, _)| t.as_bytes() == ev.token.as_slice())
                else {
                    continue;
                };
                let s = crate::read_state(&mut xs, &keys[i].1);
                if s != XenbusState::Unknown && last[i] != Some(s) {
                    last[i] = Some(s);
                    timeline.push(keys[i].0, s.name());
                }
            }
        });
        Ok(Self {
            stream,
            thread: Some(thread),
        })
    }

    /// Stop watching.
    pub fn stop(mut self) {
        // Ends the watcher's blocking read.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_is_in_time_order() {
        let t = Timeline::new();
        t.push("frontend", "Initialising");
        t.push("backend", "InitWait");
        let e = t.events();
        assert_eq!(e.len(), 2);
        assert!(e[0].at_ms <= e[1].at_ms);
        assert_eq!(
            (e[1].who.as_str(), e[1].what.as_str()),
            ("backend", "InitWait")
        );
    }
}

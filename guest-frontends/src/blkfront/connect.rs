//! The XenBus side of [`BlkFront`]: running the handshake against whatever backend the
//! frontend directory names, dropping a connection, and what changes when a new backend is
//! connected (see the parent module's docs for the protocol and the keys).

use std::time::Instant;

use devchan::grant::DomId;
use devchan::platform::Platform;
use devchan::xenbus::{Action, Handshake, Role, XenbusState};

use super::channel::Channel;
use super::shadow::PieceOp;
use super::store::{self, BackendInfo, FrontStore, StoreError};
use super::{BlkError, BlkFront, Result, PROTOCOL};

impl<P: Platform, S: FrontStore> BlkFront<P, S> {
    /// Drop the connection (reading nothing more from its ring) and requeue what was on it.
    pub(super) fn drop_channel(&mut self) {
        if let Some(ch) = self.chan.take() {
            let ids = self.shadow.requeue_inflight();
            self.stats.reissued += ids.len() as u64;
            self.stats.disconnects += 1;
            self.spare_ring = ch.teardown(&mut self.pool);
        }
    }

    pub(super) fn force_reconnect(&mut self, why: &str) {
        tracing::info!(why, "dropping the backend connection");
        self.drop_channel();
        if !matches!(
            self.hs.state(),
            XenbusState::Closed | XenbusState::Initialising
        ) {
            self.hs = Handshake::resume(Role::Frontend, XenbusState::Closing);
        }
    }

    pub(super) fn write_state(&mut self) -> Result<()> {
        let key = format!("{}/state", self.cfg.front_dir);
        self.store
            .write(&key, self.hs.state().to_xenstore().as_bytes())?;
        Ok(())
    }

    /// Which backend the frontend directory names now.
    fn read_backend(&mut self) -> Result<Option<(String, DomId)>> {
        let dir = &self.cfg.front_dir;
        let Some(path) = self.store.read(&format!("{dir}/backend"))? else {
            return Ok(None);
        };
        let path = String::from_utf8(path).map_err(|e| StoreError::Malformed {
            key: format!("{dir}/backend"),
            value: String::from_utf8_lossy(e.as_bytes())
                .chars()
                .take(32)
                .collect(),
        })?;
        let key = format!("{dir}/backend-id");
        let id = store::read_u64(&mut self.store, &key)?;
        let id = DomId::try_from(id).map_err(|_| StoreError::Malformed {
            key,
            value: id.to_string(),
        })?;
        Ok(Some((path.trim_end_matches('\0').to_owned(), id)))
    }

    /// Run the XenBus handshake against the backend's current state until it waits.
    pub(super) fn drive_xenbus(&mut self) -> Result<()> {
        let named = self.read_backend()?;
        if named != self.backend {
            if self.backend.is_some() {
                tracing::info!(?named, "backend replaced");
                self.drop_channel();
                self.hs = Handshake::new(Role::Frontend);
                self.write_state()?;
            }
            self.backend = named;
        }
        let Some((dir, backend_id)) = self.backend.clone() else {
            return Ok(());
        };
        for _ in 0..8 {
            let peer = match self.store.read(&format!("{dir}/state"))? {
                None => XenbusState::Unknown,
                Some(v) => XenbusState::from_xenstore(&v).unwrap_or(XenbusState::Unknown),
            };
            let action = self.hs.on_peer(peer);
            tracing::debug!(ours = %self.hs.state(), %peer, ?action, "xenbus");
            match action {
                Action::Wait => {
                    let restart = self.hs.state() == XenbusState::Closed
                        && !matches!(peer, XenbusState::Closing | XenbusState::Connected);
                    if !restart {
                        return Ok(());
                    }
                    self.hs.restart();
                }
                Action::PublishRing => {
                    self.drop_channel();
                    let ch =
                        Channel::new(self.platform.clone(), backend_id, self.spare_ring.take())?;
                    let d = &self.cfg.front_dir;
                    self.store.write_all(&[
                        (
                            format!("{d}/ring-ref"),
                            ch.ring_ref().to_string().into_bytes(),
                        ),
                        (
                            format!("{d}/event-channel"),
                            ch.port().to_string().into_bytes(),
                        ),
                        (format!("{d}/protocol"), PROTOCOL.as_bytes().to_vec()),
                        (
                            format!("{d}/state"),
                            XenbusState::Initialised.to_xenstore().into_bytes(),
                        ),
                    ])?;
                    self.chan = Some(ch);
                    self.hs.completed(action);
                    continue;
                }
                Action::Connect => {
                    let info = BackendInfo::read(&mut self.store, &dir)?;
                    if let Some(ch) = self.chan.as_mut() {
                        let ind = info
                            .max_indirect_segments
                            .min(self.cfg.max_indirect_segments);
                        ch.set_features(self.cfg.handle, if ind > 11 { ind } else { 0 });
                    }
                    self.info = Some(info);
                    self.resplit();
                    self.stats.connects += 1;
                    self.last_progress = Instant::now();
                    tracing::info!(backend = backend_id, sectors = info.sectors, "connected");
                }
                Action::TearDown(_) => self.drop_channel(),
                Action::Advertise | Action::MapRing { .. } => return Ok(()),
            }
            self.hs.completed(action);
            self.write_state()?;
        }
        Ok(())
    }

    /// Pieces queued for a backend that allowed larger requests than the new one: split.
    /// Flushes queued for a backend without `feature-flush-cache` are done (it has no cache
    /// to flush, as for a flush submitted to it); discards for one without `feature-discard`
    /// fail with [`BlkError::NotSupported`].
    fn resplit(&mut self) {
        let info = self.info.unwrap_or(BackendInfo {
            sectors: 0,
            sector_size: 512,
            info: 0,
            flush: false,
            discard: false,
            max_indirect_segments: 0,
        });
        let dropped = self.shadow.take_waiting(|p| match p.op {
            PieceOp::Flush => !info.flush,
            PieceOp::Discard { .. } => !info.discard,
            _ => false,
        });
        for p in dropped {
            let err = matches!(p.op, PieceOp::Discard { .. }).then_some(BlkError::NotSupported);
            self.settle(p.token, err);
        }
        let max = self.piece_sectors();
        for (token, extra) in self.shadow.split_waiting(max) {
            if let Some(op) = self.ops.get_mut(&token) {
                op.remaining += extra;
            }
        }
    }
}

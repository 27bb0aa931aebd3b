//! The XenBus side of [`NetFront`]: the handshake against whatever backend the frontend
//! directory names, reading `mac` and the backend's features, publishing the rings, and
//! dropping a connection (see the parent module's docs for the keys and the protocol).

use devchan::grant::DomId;
use devchan::platform::Platform;
use devchan::xenbus::{Action, Handshake, Role, XenbusState};

use super::channel::Channel;
use super::frames::GrantKind;
use super::{FrontStore, NetError, NetFront, Result, RxMode, StoreError};
use crate::blkfront::store::{self, read_u64_or};

/// Parse a MAC address as XenStore holds it (`02:00:00:00:00:01`).
pub fn parse_mac(key: &str, value: &[u8]) -> std::result::Result<[u8; 6], StoreError> {
    let bad = || StoreError::Malformed {
        key: key.to_owned(),
        value: String::from_utf8_lossy(value).chars().take(32).collect(),
    };
    let s = core::str::from_utf8(value).map_err(|_| bad())?.trim();
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Format a MAC address as XenStore holds it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let h: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    h.join(":")
}

impl<P: Platform, S: FrontStore> NetFront<P, S> {
    /// Drop the connection (reading nothing more from its rings): unanswered transmits go
    /// back to the head of the queue, posted buffers are withdrawn.
    pub(super) fn drop_channel(&mut self) {
        let Some(ch) = self.chan.take() else {
            return;
        };
        let (slots, packets) = self.tx.drain();
        for s in slots {
            let _ = self
                .pool
                .release(&*self.platform, s.gref, GrantKind::Access, None);
            self.layout.put(s.frame);
        }
        for f in self.layout.take_freed() {
            self.pool.free(f);
        }
        self.stats.resent += packets.len() as u64;
        for p in packets.into_iter().rev() {
            self.backlog.push_front(p);
        }
        for b in self.rx.drain() {
            let _ = self
                .pool
                .release(&*self.platform, b.gref, b.kind, Some(b.frame));
        }
        ch.teardown(&mut self.pool);
        self.backend_connected = false;
        self.stats.disconnects += 1;
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

    /// The receive mode to use with the backend at `dir`.
    fn choose_mode(&mut self, dir: &str) -> Result<RxMode> {
        let copy = read_u64_or(&mut self.store, &format!("{dir}/feature-rx-copy"), 0)? != 0;
        let flip = read_u64_or(&mut self.store, &format!("{dir}/feature-rx-flip"), 0)? != 0;
        match self.cfg.rx_mode {
            RxMode::Exchange if flip => Ok(RxMode::Exchange),
            RxMode::Exchange if copy => {
                tracing::info!("backend has no feature-rx-flip; receiving by copy");
                Ok(RxMode::Copy)
            }
            RxMode::Exchange => Err(NetError::Unsupported("feature-rx-flip or feature-rx-copy")),
            RxMode::Copy if copy => Ok(RxMode::Copy),
            RxMode::Copy => Err(NetError::Unsupported("feature-rx-copy")),
        }
    }

    /// Fresh rings for the backend at `dir`: post receive buffers, write the keys, and go
    /// `Connected`.
    fn publish(&mut self, dir: &str, backend_id: DomId) -> Result<()> {
        self.drop_channel();
        let d = self.cfg.front_dir.clone();
        let key = format!("{d}/mac");
        let mac = self
            .store
            .read(&key)?
            .ok_or_else(|| StoreError::Missing(key.clone()))?;
        self.mac = parse_mac(&key, &mac)?;
        self.mode = self.choose_mode(dir)?;
        self.chan = Some(Channel::new(self.platform.clone(), backend_id)?);
        // Buffers are on the ring before the backend maps it.
        self.kick();
        let Some(ch) = self.chan.as_ref() else {
            return Err(NetError::Unsupported("a ring it accepts"));
        };
        let copy = u8::from(self.mode == RxMode::Copy);
        let kv = |k: &str, v: String| (format!("{d}/{k}"), v.into_bytes());
        self.store.write_all(&[
            kv("tx-ring-ref", ch.tx_ref().to_string()),
            kv("rx-ring-ref", ch.rx_ref().to_string()),
            kv("event-channel", ch.port().to_string()),
            kv("request-rx-copy", copy.to_string()),
            kv("feature-rx-notify", "1".into()),
            kv("feature-sg", "1".into()),
            kv("state", XenbusState::Connected.to_xenstore()),
        ])?;
        self.hs = Handshake::resume(Role::Frontend, XenbusState::Connected);
        tracing::info!(backend = backend_id, mode = %self.mode, "rings published");
        Ok(())
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
            if peer == XenbusState::Connected
                && self.hs.state() == XenbusState::Connected
                && self.chan.is_some()
                && !self.backend_connected
            {
                self.backend_connected = true;
                self.stats.connects += 1;
                tracing::info!(backend = backend_id, "backend connected");
                // It looks at both rings now; make sure it does.
                if let Some(ch) = self.chan.as_ref() {
                    let _ = ch.notify();
                }
            }
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
                    self.write_state()?;
                }
                Action::PublishRing => self.publish(&dir, backend_id)?,
                Action::TearDown(_) | Action::Connect => {
                    if matches!(action, Action::TearDown(_)) {
                        self.drop_channel();
                    }
                    self.hs.completed(action);
                    self.write_state()?;
                }
                Action::Advertise | Action::MapRing { .. } => return Ok(()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn macs_are_strict() {
        assert_eq!(
            parse_mac("k", b"02:00:0a:FF:00:01").unwrap(),
            [2, 0, 10, 255, 0, 1]
        );
        assert_eq!(format_mac(&[2, 0, 10, 255, 0, 1]), "02:00:0a:ff:00:01");
        for bad in [
            &b""[..],
            b"02:00:00:00:00",
            b"02:00:00:00:00:01:02",
            b"2:00:00:00:00:01",
            b"02-00-00-00-00-01",
            b"0x:00:00:00:00:01",
            b"\xff",
        ] {
            assert!(parse_mac("k", bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn mac_round_trip(mac in any::<[u8; 6]>()) {
            prop_assert_eq!(parse_mac("k", format_mac(&mac).as_bytes()).unwrap(), mac);
        }

        #[test]
        fn mac_parser_never_panics(v in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse_mac("k", &v);
        }
    }
}

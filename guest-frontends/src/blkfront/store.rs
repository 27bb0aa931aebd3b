//! The XenStore operations blkfront needs, and the keys it reads and writes.
//!
//! # XenStore keys (as Linux's xen-blkfront and `io/blkif.h` define them)
//!
//! Frontend directory `/local/domain/<front>/device/vbd/<devid>/`:
//!
//! | key | written by | value |
//! |---|---|---|
//! | `backend` | toolstack/manager | path of the backend directory; a new value means a new backend |
//! | `backend-id` | toolstack/manager | the backend's domain id (decimal) |
//! | `state` | frontend | XenBus state (decimal) |
//! | `ring-ref` | frontend | grant reference of the one-page ring |
//! | `event-channel` | frontend | unbound port the backend binds to |
//! | `protocol` | frontend | `x86_64-abi` (the ring's message layout) |
//!
//! Backend directory (the value of `backend`):
//!
//! | key | value | default if missing |
//! |---|---|---|
//! | `state` | XenBus state | Unknown |
//! | `sectors` | disk size in 512-byte sectors | required |
//! | `sector-size` | logical sector size in bytes | required |
//! | `info` | `VDISK_*` bits (`VDISK_READONLY`...) | 0 |
//! | `feature-flush-cache` | 1 if `BLKIF_OP_FLUSH_DISKCACHE` works | 0 |
//! | `feature-discard` | 1 if `BLKIF_OP_DISCARD` works | 0 |
//! | `feature-max-indirect-segments` | segments an indirect request may carry | 0 (no indirect) |
//!
//! `sectors` counts 512-byte units whatever `sector-size` says (as Linux's blkfront reads it).
//! Every value comes from another domain: numbers are parsed strictly (decimal digits only,
//! bounded), and a missing or malformed required key is an error, never a guess.

use devchan::xenstore::client::{ClientError, NO_TX};
use devchan::xenstore::{Client, XsError};
use std::io::{Read, Write};

/// XenStore failures as blkfront sees them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or answered with an error.
    #[error("XenStore {op} of {path} failed: {msg}")]
    Store {
        /// Operation.
        op: &'static str,
        /// Path.
        path: String,
        /// What the store said.
        msg: String,
    },
    /// A key the protocol requires is missing.
    #[error("XenStore key {0} is missing")]
    Missing(String),
    /// A key's value is not what the protocol allows.
    #[error("XenStore key {key} has a malformed value {value:?}")]
    Malformed {
        /// Path of the key.
        key: String,
        /// Its value (at most 32 characters kept).
        value: String,
    },
}

/// The XenStore operations blkfront uses; implemented for [`devchan::xenstore::Client`] over
/// any transport (the daemon's socket, a domain's ring).
pub trait FrontStore: Send {
    /// The value at `path`, or `None` if the node does not exist.
    fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Write `value` at `path`.
    fn write(&mut self, path: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Write several keys at once (atomically where the store supports transactions).
    fn write_all(&mut self, kvs: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        for (k, v) in kvs {
            self.write(k, v)?;
        }
        Ok(())
    }
}

fn store_err(op: &'static str, path: &str, e: &ClientError) -> StoreError {
    let msg = match e {
        ClientError::Xs(x) => x.name().to_owned(),
        other => other.to_string(),
    };
    StoreError::Store {
        op,
        path: path.to_owned(),
        msg,
    }
}

impl<T: Read + Write + Send> FrontStore for Client<T> {
    fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match Client::read(self, NO_TX, path) {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::Xs(XsError::Enoent)) => Ok(None),
            Err(e) => Err(store_err("read", path, &e)),
        }
    }

    fn write(&mut self, path: &str, value: &[u8]) -> Result<(), StoreError> {
        Client::write(self, NO_TX, path, value).map_err(|e| store_err("write", path, &e))
    }

    fn write_all(&mut self, kvs: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        // A transaction, retried on EAGAIN as libxenstore callers do; a few attempts suffice
        // (only our own keys change here).
        for _ in 0..16 {
            let tx = self
                .transaction_start()
                .map_err(|e| store_err("transaction_start", "", &e))?;
            for (k, v) in kvs {
                if let Err(e) = Client::write(self, tx, k, v) {
                    let _ = self.transaction_end(tx, false);
                    return Err(store_err("write", k, &e));
                }
            }
            match self.transaction_end(tx, true) {
                Ok(()) => return Ok(()),
                Err(ClientError::Xs(XsError::Eagain)) => continue,
                Err(e) => return Err(store_err("transaction_end", "", &e)),
            }
        }
        Err(StoreError::Store {
            op: "transaction_end",
            path: String::new(),
            msg: "EAGAIN".into(),
        })
    }
}

/// Parse a decimal number a peer wrote (digits only, surrounding whitespace allowed).
pub fn parse_u64(key: &str, value: &[u8]) -> Result<u64, StoreError> {
    let bad = || StoreError::Malformed {
        key: key.to_owned(),
        value: String::from_utf8_lossy(value).chars().take(32).collect(),
    };
    let s = core::str::from_utf8(value).map_err(|_| bad())?.trim();
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    s.parse().map_err(|_| bad())
}

/// Read a required number.
pub fn read_u64<S: FrontStore + ?Sized>(s: &mut S, key: &str) -> Result<u64, StoreError> {
    let v = s
        .read(key)?
        .ok_or_else(|| StoreError::Missing(key.to_owned()))?;
    parse_u64(key, &v)
}

/// Read an optional number (`default` if the key is missing).
pub fn read_u64_or<S: FrontStore + ?Sized>(
    s: &mut S,
    key: &str,
    default: u64,
) -> Result<u64, StoreError> {
    match s.read(key)? {
        None => Ok(default),
        Some(v) => parse_u64(key, &v),
    }
}

/// What the backend advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Disk size in 512-byte sectors.
    pub sectors: u64,
    /// Logical sector size in bytes.
    pub sector_size: u32,
    /// `VDISK_*` bits.
    pub info: u32,
    /// `BLKIF_OP_FLUSH_DISKCACHE` is supported.
    pub flush: bool,
    /// `BLKIF_OP_DISCARD` is supported.
    pub discard: bool,
    /// Segments an indirect request may carry (0: no indirect requests).
    pub max_indirect_segments: u32,
}

/// Largest sector size accepted (a page).
const MAX_SECTOR_SIZE: u64 = 4096;

impl BackendInfo {
    /// Read the backend's keys under `dir`.
    pub fn read<S: FrontStore + ?Sized>(s: &mut S, dir: &str) -> Result<Self, StoreError> {
        let sectors = read_u64(s, &format!("{dir}/sectors"))?;
        let key = format!("{dir}/sector-size");
        let sector_size = read_u64(s, &key)?;
        if !(512..=MAX_SECTOR_SIZE).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(StoreError::Malformed {
                key,
                value: sector_size.to_string(),
            });
        }
        let key = format!("{dir}/info");
        let info = u32::try_from(read_u64_or(s, &key, 0)?).map_err(|_| StoreError::Malformed {
            key,
            value: "out of range".into(),
        })?;
        let flag = |s: &mut S, k: &str| -> Result<bool, StoreError> {
            Ok(read_u64_or(s, &format!("{dir}/{k}"), 0)? != 0)
        };
        let flush = flag(s, "feature-flush-cache")?;
        let discard = flag(s, "feature-discard")?;
        let max_ind = read_u64_or(s, &format!("{dir}/feature-max-indirect-segments"), 0)?;
        Ok(Self {
            sectors,
            // Checked above: at most 4096.
            sector_size: u32::try_from(sector_size).unwrap_or(4096),
            info,
            flush,
            discard,
            max_indirect_segments: u32::try_from(max_ind).unwrap_or(u32::MAX),
        })
    }

    /// The disk is read-only.
    pub fn read_only(&self) -> bool {
        self.info & devchan::blkif::VDISK_READONLY != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Map(HashMap<String, Vec<u8>>);
    impl FrontStore for Map {
        fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.0.get(path).cloned())
        }
        fn write(&mut self, path: &str, value: &[u8]) -> Result<(), StoreError> {
            self.0.insert(path.into(), value.into());
            Ok(())
        }
    }

    #[test]
    fn numbers_are_strict() {
        assert_eq!(parse_u64("k", b"42").unwrap(), 42);
        assert_eq!(parse_u64("k", b" 42\n").unwrap(), 42);
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b"0x10",
            b"1 2",
            b"\xff",
            b"99999999999999999999999",
        ] {
            assert!(parse_u64("k", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn backend_info_defaults_and_checks() {
        let mut m = Map::default();
        m.write("/b/sectors", b"2048").unwrap();
        assert!(matches!(
            BackendInfo::read(&mut m, "/b"),
            Err(StoreError::Missing(_))
        ));
        m.write("/b/sector-size", b"512").unwrap();
        let i = BackendInfo::read(&mut m, "/b").unwrap();
        assert_eq!(
            i,
            BackendInfo {
                sectors: 2048,
                sector_size: 512,
                info: 0,
                flush: false,
                discard: false,
                max_indirect_segments: 0
            }
        );
        m.write("/b/feature-max-indirect-segments", b"256").unwrap();
        m.write("/b/feature-flush-cache", b"1").unwrap();
        m.write("/b/info", b"4").unwrap();
        let i = BackendInfo::read(&mut m, "/b").unwrap();
        assert!(i.flush && i.read_only() && i.max_indirect_segments == 256);
        m.write("/b/sector-size", b"513").unwrap();
        assert!(BackendInfo::read(&mut m, "/b").is_err());
        m.write("/b/sector-size", b"512").unwrap();
        m.write("/b/info", b"99999999999").unwrap();
        assert!(BackendInfo::read(&mut m, "/b").is_err());
    }
}

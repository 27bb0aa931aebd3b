//! The TOML policy: which devices exist and what each guest may do with them.
//!
//! A user writes one TOML file; [`Policy::load`] reads it, checks everything before anything
//! starts and returns either the typed [`Policy`] the device manager consumes or
//! [`PolicyErrors`] with **every** problem, each with file, line, column and a hint, rendered like
//! a compiler's ([`PolicyErrors::render`]).
//!
//! ```
//! let text = r#"
//! [[device]]
//! name = "disk0"
//! kind = "virtio-blk"
//! image = "disk0.img"
//! size = "64MiB"
//!
//! [[guest]]
//! name = "alice"
//! disk = [{ device = "disk0", length = "32MiB" }]
//!
//! [[guest]]
//! name = "bob"
//! disk = [{ device = "disk0", offset = "32MiB" }]
//! "#;
//! let p = policy::Policy::parse(text, "example.toml").unwrap();
//! assert_eq!(p.guest("bob").unwrap().disk[0].region.start_sector(), 65536);
//!
//! // Alice's region grows into Bob's: refused, pointing at Bob's offset (line 14).
//! let bad = text.replace("length = \"32MiB\"", "length = \"40MiB\"");
//! let err = policy::Policy::parse(&bad, "example.toml").unwrap_err();
//! assert!(err.render().contains("example.toml:14:"), "{}", err.render());
//! ```
//!
//! # The format
//!
//! * `[restart]` (optional): `max_restarts` (10), `window` ("60s"), `heartbeat` ("1s").
//! * `[[device]]`: `name`, `kind` = `"virtio-blk"` | `"virtio-net"`, then
//!   * virtio-blk: `image` (raw file, created at `size` if missing, relative to the policy file)
//!     and `size`;
//!   * virtio-net: `wire` = `"udp"` (default; `bind` = "127.0.0.1:0", optional `peer`) or
//!     `"tap"` (`ifname`), and `link` (default "1Gbit/s");
//!   * instead of `image`/`wire`: `pci = "0000:00:04.0"`, a host device to pass through (later);
//!   * `standby` (false), and a `[device.restart]` table overriding `[restart]`.
//! * `[[guest]]`: `name`, `kind` = `"process"` (default) | `"xen"` (a domain of a real Xen
//!   host, named by `domain`, default the guest's name; its NICs need TAP-wired devices;
//!   served by `iddctl xen serve`; `"xen-linux"` is read as `"xen"`), then its access:
//!   * `[[guest.net]]`: `device`, `mac` (generated if left out), `ips` (allowed source
//!     addresses or networks; absent = no IP filter), `share` ("100Mbit/s", "100Mbit/s@20ms",
//!     "64KiB every 1ms"; absent = unlimited);
//!   * `[[guest.disk]]`: `device`, `offset` (0), `length` (to the end of the disk), `read_only`
//!     (false).
//!
//! Units are described in [`units`], the validation rules in [`validate`], the reload rules in
//! [`reload`]. Fully commented examples live in `policy/examples/`, and
//! [`schema::json_schema`] generates a JSON Schema from the same types.

#![deny(missing_docs)]

pub mod diag;
pub mod fuzzing;
pub mod model;
pub mod raw;
pub mod reload;
pub mod schema;
pub mod units;
pub mod validate;

use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, ErrorKind, PolicyErrors};
pub use model::*;
pub use reload::{Change, Refusal, ReloadRefused};
pub use units::{Rate, Share};

/// Why a policy file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("Cannot read policy file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file has problems; render them with [`PolicyErrors::render`].
    #[error("{0}")]
    Invalid(#[from] PolicyErrors),
}

impl Policy {
    /// Parses and validates `text`; `name` is the file name shown in diagnostics. Image paths
    /// are kept as written.
    pub fn parse(text: &str, name: &str) -> Result<Policy, PolicyErrors> {
        let mut sink = diag::Sink::new(text);
        let policy = validate::parse(&mut sink, text);
        match policy {
            Some(p) if sink.diags.is_empty() => Ok(p),
            _ => {
                let mut diagnostics = sink.diags;
                diagnostics.sort_by_key(|d| (d.span.start, d.span.end));
                Err(PolicyErrors {
                    file: name.to_owned(),
                    source: text.to_owned(),
                    diagnostics,
                })
            }
        }
    }

    /// Reads, parses and validates a policy file; relative image paths are resolved against the
    /// file's directory.
    pub fn load(path: impl AsRef<Path>) -> Result<Policy, LoadError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut p = Policy::parse(&text, &path.display().to_string())?;
        let dir = path.parent().unwrap_or(Path::new(""));
        for d in &mut p.devices {
            if let DeviceSpec::Blk {
                media: BlkMedia::Image(img),
                ..
            } = &mut d.spec
            {
                if img.is_relative() {
                    *img = dir.join(&*img);
                }
            }
        }
        Ok(p)
    }

    /// What a live reload from `old` to `new` changes, treating every guest of `old` as
    /// connected; every unsafe change is refused with its reason (rules in [`reload`]).
    pub fn diff(old: &Policy, new: &Policy) -> Result<Vec<Change>, ReloadRefused> {
        reload::diff_with(old, new, |_| true)
    }

    /// Like [`Policy::diff`], with the set of connected guests given by `connected`.
    pub fn diff_with(
        old: &Policy,
        new: &Policy,
        connected: impl Fn(&str) -> bool,
    ) -> Result<Vec<Change>, ReloadRefused> {
        reload::diff_with(old, new, connected)
    }
}

//! Human names for PCI ids, from the system's PCI ID database (`pci.ids`, Debian package
//! `pci.ids`, installed by `ci/setup.sh`), parsed once by the `pciid-parser` crate.
//!
//! Why not a crate that embeds the database: the one that does (`pci-ids`) downloads a fresh
//! copy from the network in its build script, which a build here must never do. Names are
//! cosmetic: without the database every lookup is `None` and callers print hex ids.

use pciid_parser::Database;
use std::sync::OnceLock;

/// The parsed database, or `None` when the system has none (read once, then kept).
pub fn db() -> Option<&'static Database> {
    static DB: OnceLock<Option<Database>> = OnceLock::new();
    DB.get_or_init(|| Database::read().ok()).as_ref()
}

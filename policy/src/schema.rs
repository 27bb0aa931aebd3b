//! The JSON Schema of the policy format, generated from the same serde types the parser uses
//! ([`crate::raw`]), with each key's doc comment as its description.
//!
//! Editors that understand JSON Schema for TOML (for example through a `#:schema` comment or
//! the Taplo/Even Better TOML settings) use it for completion and checks.

use std::path::Path;

/// The schema as a JSON value.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(crate::raw::RawPolicy)).unwrap_or_default()
}

/// Writes the schema, pretty-printed, to `path`.
pub fn write_json_schema(path: impl AsRef<Path>) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(&json_schema()).map_err(std::io::Error::other)?;
    text.push('\n');
    std::fs::write(path, text)
}

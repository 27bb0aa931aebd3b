//! TLS for the remote listener: rustls with the `ring` provider, and self-signed certificates
//! (`rcgen`) for tests and first runs.
//!
//! Why `ring` and not rustls' default provider: `aws-lc-rs` needs CMake and a long C build;
//! `ring` is what the rest of the stack (`rcgen`, `ureq`) already uses.

use std::path::Path;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Generating a certificate failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Reading or writing PEM files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Install `ring` as rustls' process-wide provider (once; later calls are no-ops).
pub fn install_crypto() {
    // Err means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A self-signed certificate and its key, both PEM, for `names` (DNS names or IP addresses).
pub fn self_signed(names: &[&str]) -> Result<(String, String), TlsError> {
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let ck = rcgen::generate_simple_self_signed(names)?;
    Ok((ck.cert.pem(), ck.key_pair.serialize_pem()))
}

/// Write a self-signed certificate for `names` to `dir/cert.pem` and `dir/key.pem` (key mode
/// 0600); returns their paths.
pub fn write_self_signed(
    dir: &Path,
    names: &[&str],
) -> Result<(std::path::PathBuf, std::path::PathBuf), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (cert, key) = self_signed(names)?;
    let cp = dir.join("cert.pem");
    let kp = dir.join("key.pem");
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| TlsError::Io { path, source }
    };
    std::fs::write(&cp, cert).map_err(io(&cp))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&kp)
        .and_then(|mut f| f.write_all(key.as_bytes()))
        .map_err(io(&kp))?;
    Ok((cp, kp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_pem_pairs() {
        let t = tempfile::tempdir().unwrap();
        let (c, k) = write_self_signed(t.path(), &["localhost", "127.0.0.1"]).unwrap();
        let cert = std::fs::read_to_string(c).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(std::fs::read_to_string(k).unwrap().contains("PRIVATE KEY"));
    }
}

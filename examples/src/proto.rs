//! The demo device `vdemo`: its ring messages, payload check, and XenStore keys.
//!
//! # Ring (`io/ring.h` layout, one page granted by the frontend)
//!
//! ```text
//! request  (16 bytes): u64 id | u32 gref | u16 len | u16 pad (0)
//! response (16 bytes): u64 id | i32 status | u32 digest
//! ```
//!
//! The frontend writes `len` (1..=[`MAX_LEN`]) input bytes at offset 0 of the page it granted
//! (writable) as `gref`. The backend grant-copies them out, computes [`transform`] and
//! grant-copies the result to offset [`OUTPUT_OFFSET`] of the same page, then responds with
//! status [`STATUS_OK`] and the FNV-1a [`digest`] of the input. The output depends only on the
//! input, so processing a request twice (a re-attached backend replaying the ring while the
//! frontend reissued it) writes the same bytes again. The frontend checks the digest and the
//! output before it counts a response as verified.
//!
//! # XenStore keys (as Xen split drivers; `<F>` frontend, `<B>` backend domain)
//!
//! | path | written by | value |
//! |---|---|---|
//! | `/local/domain/<F>/device/vdemo/0/backend` | toolstack | backend directory |
//! | `/local/domain/<F>/device/vdemo/0/backend-id` | toolstack | `<B>` |
//! | `/local/domain/<F>/device/vdemo/0/state` | frontend | XenBus state (decimal) |
//! | `/local/domain/<F>/device/vdemo/0/ring-ref` | frontend | grant reference of the ring |
//! | `/local/domain/<F>/device/vdemo/0/event-channel` | frontend | its unbound port for `<B>` |
//! | `/local/domain/<B>/backend/vdemo/<F>/0/frontend` | toolstack | frontend directory |
//! | `/local/domain/<B>/backend/vdemo/<F>/0/frontend-id` | toolstack | `<F>` |
//! | `/local/domain/<B>/backend/vdemo/<F>/0/state` | backend | XenBus state |
//! | `/local/domain/<B>/backend/vdemo/<F>/0/feature-grant-copy` | backend | `1` |
//! | `/local/domain/<B>/data/vdemo/<F>/0/port` | backend | its bound port (private; a restarted backend process finds it here) |
//!
//! The frontend directory is owned by `<F>` and readable by `<B>`; the backend directory the
//! reverse; `/local/domain/<X>/data` is private to `<X>`.

use devchan::grant::DomId;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// A request on the demo ring.
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct DemoReq {
    /// Request id, echoed in the response.
    pub id: u64,
    /// Grant reference of the payload page (writable for the backend).
    pub gref: u32,
    /// Input length at offset 0.
    pub len: u16,
    /// Zero.
    pub pad: u16,
}

/// A response on the demo ring.
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub struct DemoRsp {
    /// The request's id.
    pub id: u64,
    /// [`STATUS_OK`] or a negative error.
    pub status: i32,
    /// FNV-1a of the input bytes.
    pub digest: u32,
}

const _: () = assert!(core::mem::size_of::<DemoReq>() == 16);
const _: () = assert!(core::mem::size_of::<DemoRsp>() == 16);

/// The request was served.
pub const STATUS_OK: i32 = 0;
/// `len` was 0 or above [`MAX_LEN`].
pub const STATUS_BAD_LEN: i32 = -1;
/// A grant copy failed (bad reference, wrong domain, …).
pub const STATUS_BAD_GRANT: i32 = -2;
/// Largest input.
pub const MAX_LEN: u16 = 2048;
/// Where the backend writes the output in the payload page.
pub const OUTPUT_OFFSET: u16 = 2048;
/// The device type in XenStore paths.
pub const DEVICE: &str = "vdemo";

/// FNV-1a (32 bit) of `data`.
pub fn digest(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// The backend's output for `input`: the bytes reversed, each xor 0xA5.
pub fn transform(input: &[u8]) -> Vec<u8> {
    input.iter().rev().map(|b| b ^ 0xA5).collect()
}

/// The input of logical request `n`, `len` bytes.
pub fn payload(n: u64, len: usize) -> Vec<u8> {
    let seed = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|i| {
            let x = seed.rotate_left(u32::try_from(i % 64).unwrap_or(0)) ^ (i as u64);
            x.to_le_bytes()[i % 8]
        })
        .collect()
}

/// The frontend's device directory.
pub fn front_dir(front: DomId) -> String {
    format!("/local/domain/{front}/device/{DEVICE}/0")
}

/// The backend's device directory.
pub fn back_dir(back: DomId, front: DomId) -> String {
    format!("/local/domain/{back}/backend/{DEVICE}/{front}/0")
}

/// The backend's private key with its bound port.
pub fn back_port_key(back: DomId, front: DomId) -> String {
    format!("/local/domain/{back}/data/{DEVICE}/{front}/0/port")
}

/// Parse a decimal number a peer wrote to XenStore (at most 10 digits, optional whitespace).
pub fn parse_u32(value: &[u8]) -> Option<u32> {
    let s = core::str::from_utf8(value).ok()?.trim();
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_digest() {
        // FNV-1a test vector.
        assert_eq!(digest(b"a"), 0xe40c_292c);
        assert_eq!(digest(b""), 0x811c_9dc5);
    }

    #[test]
    fn parse_rejects_junk() {
        assert_eq!(parse_u32(b"42"), Some(42));
        assert_eq!(parse_u32(b" 7\n"), Some(7));
        for bad in [
            &b""[..],
            b"-1",
            b"0x10",
            b"99999999999",
            b"4294967296",
            b"\xff",
        ] {
            assert_eq!(parse_u32(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn transform_is_an_involution_up_to_reversal(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let t = transform(&data);
            prop_assert_eq!(transform(&t), data);
        }

        #[test]
        fn payloads_differ(n in 0u64..1_000_000) {
            prop_assert_ne!(payload(n, 64), payload(n + 1, 64));
        }
    }
}

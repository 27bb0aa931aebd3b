//! The ioctl ABI of Linux's Xen userspace devices, as `#[repr(C)]` structs and request numbers.
//!
//! Mirrors `/usr/include/xen/sys/gntdev.h` and `/usr/include/xen/sys/evtchn.h` (the Linux
//! UAPI headers, shipped by Debian's `libxen-dev`); `tests/xen_headers.rs` compiles a C program
//! against those headers and compares every size, offset and request number listed in
//! [`abi_checks`], so a layout we use is a layout that was checked. Only what the platform
//! uses is defined.
//!
//! Request numbers are `_IOC(_IOC_NONE, type, nr, size)`: on x86 `size << 16 | type << 8 | nr`
//! (direction bits 0). `_IOC_NONE` although data moves both ways is what the headers say; the
//! kernel copies `size` bytes in and out itself.
//!
//! # gntdev
//!
//! `IOCTL_GNTDEV_MAP_GRANT_REF` registers `count` `(domid, ref)` pairs and returns an `index`,
//! an offset to `mmap` the device at; the grants are mapped by that `mmap` (read-only when the
//! mapping is not `PROT_WRITE`) and unmapped by `munmap`; `IOCTL_GNTDEV_UNMAP_GRANT_REF` then
//! releases the index. `IOCTL_GNTDEV_GRANT_COPY` runs `GNTTABOP_copy` on segments whose sides
//! are a foreign grant (flag `GNTCOPY_*_gref`) or a virtual address in the caller.
//!
//! # evtchn
//!
//! The bind ioctls return the new local port as the ioctl's result. `read` returns pending
//! ports (`u32` each); a delivered port stays masked until its number is `write`n back.

use std::mem::{offset_of, size_of};

/// `_IOC(_IOC_NONE, ty, nr, size)` on x86.
const fn ioc_none(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((size as libc::c_ulong) << 16) | ((ty as libc::c_ulong) << 8) | nr as libc::c_ulong
}

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevGrantRef {
    /// The granting domain.
    pub domid: u32,
    /// Its grant reference.
    pub r#ref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` with one reference (`count` = 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevMapGrantRef {
    /// Number of references (1).
    pub count: u32,
    /// Padding.
    pub pad: u32,
    /// Out: the offset to `mmap` at.
    pub index: u64,
    /// The reference.
    pub refs: [GntdevGrantRef; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntdevUnmapGrantRef {
    /// The offset the map ioctl returned.
    pub index: u64,
    /// Number of references.
    pub count: u32,
    /// Padding.
    pub pad: u32,
}

/// The `foreign` side of a grant-copy segment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GntCopyForeign {
    /// Grant reference.
    pub r#ref: u32,
    /// Byte offset in the page.
    pub offset: u16,
    /// Granting domain.
    pub domid: u16,
}

/// One side of a grant-copy segment: a local virtual address or a foreign grant.
#[repr(C)]
#[derive(Clone, Copy)]
pub union GntCopySide {
    /// Our memory.
    pub virt: *mut libc::c_void,
    /// A peer's grant.
    pub foreign: GntCopyForeign,
}

/// `struct ioctl_gntdev_grant_copy_segment`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GntdevGrantCopySegment {
    /// Where to read.
    pub source: GntCopySide,
    /// Where to write.
    pub dest: GntCopySide,
    /// Bytes.
    pub len: u16,
    /// `GNTCOPY_source_gref` / `GNTCOPY_dest_gref`.
    pub flags: u16,
    /// Out: the `GNTST_*` status.
    pub status: i16,
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GntdevGrantCopy {
    /// Number of segments.
    pub count: libc::c_uint,
    /// The segments.
    pub segments: *mut GntdevGrantCopySegment,
}

/// The source is a foreign grant (`GNTCOPY_source_gref`).
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// The destination is a foreign grant (`GNTCOPY_dest_gref`).
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

/// `IOCTL_GNTDEV_MAP_GRANT_REF` (for a one-reference struct, as the header's own size).
pub const IOCTL_GNTDEV_MAP_GRANT_REF: libc::c_ulong =
    ioc_none(b'G', 0, size_of::<GntdevMapGrantRef>());
/// `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: libc::c_ulong =
    ioc_none(b'G', 1, size_of::<GntdevUnmapGrantRef>());
/// `IOCTL_GNTDEV_GRANT_COPY`.
pub const IOCTL_GNTDEV_GRANT_COPY: libc::c_ulong = ioc_none(b'G', 8, size_of::<GntdevGrantCopy>());

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EvtchnBindInterdomain {
    /// The peer.
    pub remote_domain: libc::c_uint,
    /// The peer's unbound port.
    pub remote_port: libc::c_uint,
}

/// `struct ioctl_evtchn_bind_unbound_port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EvtchnBindUnboundPort {
    /// The domain allowed to bind.
    pub remote_domain: libc::c_uint,
}

/// `struct ioctl_evtchn_unbind` and `struct ioctl_evtchn_notify` (same shape).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EvtchnPort {
    /// The local port.
    pub port: libc::c_uint,
}

/// `IOCTL_EVTCHN_BIND_INTERDOMAIN`.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: libc::c_ulong =
    ioc_none(b'E', 1, size_of::<EvtchnBindInterdomain>());
/// `IOCTL_EVTCHN_BIND_UNBOUND_PORT`.
pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: libc::c_ulong =
    ioc_none(b'E', 2, size_of::<EvtchnBindUnboundPort>());
/// `IOCTL_EVTCHN_UNBIND`.
pub const IOCTL_EVTCHN_UNBIND: libc::c_ulong = ioc_none(b'E', 3, size_of::<EvtchnPort>());
/// `IOCTL_EVTCHN_NOTIFY`.
pub const IOCTL_EVTCHN_NOTIFY: libc::c_ulong = ioc_none(b'E', 4, size_of::<EvtchnPort>());

/// One value to compare with Xen's headers: a C expression and what we use.
#[derive(Clone, Debug)]
pub struct AbiCheck {
    /// C expression evaluated against the headers.
    pub c_expr: String,
    /// Our value.
    pub ours: u64,
}

/// The headers the checks include.
pub const HEADERS: &[&str] = &["xen/sys/gntdev.h", "xen/sys/evtchn.h", "xen/grant_table.h"];

macro_rules! size {
    ($v:ident, $c:literal, $t:ty) => {
        $v.push(AbiCheck {
            c_expr: format!("sizeof(struct {})", $c),
            ours: size_of::<$t>() as u64,
        })
    };
}
macro_rules! off {
    ($v:ident, $c:literal, $t:ty, $cf:literal, $($f:tt)+) => {
        $v.push(AbiCheck {
            c_expr: format!("offsetof(struct {}, {})", $c, $cf),
            ours: offset_of!($t, $($f)+) as u64,
        })
    };
}

/// Every layout and constant above, as checks against the C headers.
pub fn abi_checks() -> Vec<AbiCheck> {
    let mut v = Vec::new();
    size!(v, "ioctl_gntdev_grant_ref", GntdevGrantRef);
    off!(v, "ioctl_gntdev_grant_ref", GntdevGrantRef, "domid", domid);
    off!(v, "ioctl_gntdev_grant_ref", GntdevGrantRef, "ref", r#ref);
    size!(v, "ioctl_gntdev_map_grant_ref", GntdevMapGrantRef);
    off!(
        v,
        "ioctl_gntdev_map_grant_ref",
        GntdevMapGrantRef,
        "count",
        count
    );
    off!(
        v,
        "ioctl_gntdev_map_grant_ref",
        GntdevMapGrantRef,
        "index",
        index
    );
    off!(
        v,
        "ioctl_gntdev_map_grant_ref",
        GntdevMapGrantRef,
        "refs",
        refs
    );
    size!(v, "ioctl_gntdev_unmap_grant_ref", GntdevUnmapGrantRef);
    off!(
        v,
        "ioctl_gntdev_unmap_grant_ref",
        GntdevUnmapGrantRef,
        "index",
        index
    );
    off!(
        v,
        "ioctl_gntdev_unmap_grant_ref",
        GntdevUnmapGrantRef,
        "count",
        count
    );
    size!(v, "ioctl_gntdev_grant_copy_segment", GntdevGrantCopySegment);
    off!(
        v,
        "ioctl_gntdev_grant_copy_segment",
        GntdevGrantCopySegment,
        "source",
        source
    );
    off!(
        v,
        "ioctl_gntdev_grant_copy_segment",
        GntdevGrantCopySegment,
        "dest",
        dest
    );
    off!(
        v,
        "ioctl_gntdev_grant_copy_segment",
        GntdevGrantCopySegment,
        "len",
        len
    );
    off!(
        v,
        "ioctl_gntdev_grant_copy_segment",
        GntdevGrantCopySegment,
        "flags",
        flags
    );
    off!(
        v,
        "ioctl_gntdev_grant_copy_segment",
        GntdevGrantCopySegment,
        "status",
        status
    );
    off!(
        v,
        "ioctl_gntdev_grant_copy_segment",
        GntdevGrantCopySegment,
        "source.foreign.ref",
        source
    );
    v.push(AbiCheck {
        c_expr: "offsetof(struct ioctl_gntdev_grant_copy_segment, source.foreign.offset)".into(),
        ours: (offset_of!(GntdevGrantCopySegment, source) + offset_of!(GntCopyForeign, offset))
            as u64,
    });
    v.push(AbiCheck {
        c_expr: "offsetof(struct ioctl_gntdev_grant_copy_segment, source.foreign.domid)".into(),
        ours: (offset_of!(GntdevGrantCopySegment, source) + offset_of!(GntCopyForeign, domid))
            as u64,
    });
    size!(v, "ioctl_gntdev_grant_copy", GntdevGrantCopy);
    off!(
        v,
        "ioctl_gntdev_grant_copy",
        GntdevGrantCopy,
        "count",
        count
    );
    off!(
        v,
        "ioctl_gntdev_grant_copy",
        GntdevGrantCopy,
        "segments",
        segments
    );
    size!(v, "ioctl_evtchn_bind_interdomain", EvtchnBindInterdomain);
    off!(
        v,
        "ioctl_evtchn_bind_interdomain",
        EvtchnBindInterdomain,
        "remote_port",
        remote_port
    );
    size!(v, "ioctl_evtchn_bind_unbound_port", EvtchnBindUnboundPort);
    size!(v, "ioctl_evtchn_unbind", EvtchnPort);
    size!(v, "ioctl_evtchn_notify", EvtchnPort);
    for (c, ours) in [
        ("IOCTL_GNTDEV_MAP_GRANT_REF", IOCTL_GNTDEV_MAP_GRANT_REF),
        ("IOCTL_GNTDEV_UNMAP_GRANT_REF", IOCTL_GNTDEV_UNMAP_GRANT_REF),
        ("IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY),
        (
            "IOCTL_EVTCHN_BIND_INTERDOMAIN",
            IOCTL_EVTCHN_BIND_INTERDOMAIN,
        ),
        (
            "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
            IOCTL_EVTCHN_BIND_UNBOUND_PORT,
        ),
        ("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND),
        ("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY),
        (
            "GNTCOPY_source_gref",
            libc::c_ulong::from(GNTCOPY_SOURCE_GREF),
        ),
        ("GNTCOPY_dest_gref", libc::c_ulong::from(GNTCOPY_DEST_GREF)),
    ] {
        v.push(AbiCheck {
            c_expr: c.to_string(),
            ours,
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_follow_the_x86_encoding() {
        // 'G' = 0x47, nr 0, 24 bytes.
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
        assert!(abi_checks().len() >= 30);
    }
}

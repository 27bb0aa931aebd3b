//! Request payloads, per message type.
//!
//! | type | payload | reply payload |
//! |---|---|---|
//! | `READ` | `path\0` | value (no NUL) |
//! | `WRITE` | `path\0value` (value unterminated, may be empty) | `OK\0` |
//! | `MKDIR`, `RM` | `path\0` | `OK\0` |
//! | `DIRECTORY` | `path\0` | `child\0child\0...` |
//! | `DIRECTORY_PART` | `path\0offset\0` | `generation\0child\0...`, a final `\0` when done |
//! | `GET_PERMS` | `path\0` | `perm\0perm\0...` |
//! | `SET_PERMS` | `path\0perm\0perm\0...` | `OK\0` |
//! | `WATCH`, `UNWATCH` | `path\0token\0` | `OK\0` |
//! | `TRANSACTION_START` | ignored (usually `\0`) | `txid\0` |
//! | `TRANSACTION_END` | `T\0` (commit) or `F\0` (abort) | `OK\0` |
//! | `INTRODUCE` | `domid\0mfn\0port\0` | `OK\0` |
//! | `RELEASE`, `RESUME` | `domid\0` | `OK\0` |
//! | `GET_DOMAIN_PATH` | `domid\0` | `/local/domain/<domid>\0` |
//! | `IS_DOMAIN_INTRODUCED` | `domid\0` | `T\0` or `F\0` |
//! | `SET_TARGET` | `domid\0target\0` | `OK\0` |
//! | `RESET_WATCHES` | ignored | `OK\0` |
//! | `CONTROL` | `command\0args...` | command-specific |
//!
//! Numbers are decimal ASCII. Any payload that does not have exactly this shape is `EINVAL`.

use super::path::{resolve, ResolvedPath};
use super::perms::{parse_domid, Perm};
use super::wire::{Message, MsgType};
use super::XsError;
use crate::grant::DomId;

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `XS_CONTROL`: command and arguments.
    Control(Vec<Vec<u8>>),
    /// `XS_DIRECTORY`.
    Directory(ResolvedPath),
    /// `XS_DIRECTORY_PART` from a byte offset into the children list.
    DirectoryPart(ResolvedPath, usize),
    /// `XS_READ`.
    Read(ResolvedPath),
    /// `XS_GET_PERMS`.
    GetPerms(ResolvedPath),
    /// `XS_WATCH`.
    Watch(ResolvedPath, Vec<u8>),
    /// `XS_UNWATCH`.
    Unwatch(ResolvedPath, Vec<u8>),
    /// `XS_TRANSACTION_START`.
    TransactionStart,
    /// `XS_TRANSACTION_END`; `true` commits.
    TransactionEnd(bool),
    /// `XS_INTRODUCE`.
    Introduce {
        /// The domain.
        domid: DomId,
        /// Frame of its ring page.
        mfn: u64,
        /// Its event channel port.
        port: u32,
    },
    /// `XS_RELEASE`.
    Release(DomId),
    /// `XS_GET_DOMAIN_PATH`.
    GetDomainPath(DomId),
    /// `XS_WRITE`.
    Write(ResolvedPath, Vec<u8>),
    /// `XS_MKDIR`.
    Mkdir(ResolvedPath),
    /// `XS_RM`.
    Rm(ResolvedPath),
    /// `XS_SET_PERMS`.
    SetPerms(ResolvedPath, Vec<Perm>),
    /// `XS_IS_DOMAIN_INTRODUCED`.
    IsDomainIntroduced(DomId),
    /// `XS_RESUME`.
    Resume(DomId),
    /// `XS_SET_TARGET`: `domid` may act for `target`.
    SetTarget(DomId, DomId),
    /// `XS_RESET_WATCHES`.
    ResetWatches,
}

/// Splits a payload of NUL-terminated strings. The payload must end with NUL.
pub fn split_strings(payload: &[u8]) -> Result<Vec<&[u8]>, XsError> {
    let body = payload.strip_suffix(&[0]).ok_or(XsError::Einval)?;
    Ok(body.split(|b| *b == 0).collect())
}

fn exactly<const N: usize>(payload: &[u8]) -> Result<[&[u8]; N], XsError> {
    let parts = split_strings(payload)?;
    parts.try_into().map_err(|_| XsError::Einval)
}

fn number(s: &[u8]) -> Result<u64, XsError> {
    if s.is_empty() || s.len() > 20 || !s.iter().all(u8::is_ascii_digit) {
        return Err(XsError::Einval);
    }
    std::str::from_utf8(s)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(XsError::Einval)
}

impl Request {
    /// Parses `msg` from domain `domid` (relative paths resolve against its home).
    pub fn parse(msg: &Message, domid: DomId) -> Result<Self, XsError> {
        let p = &msg.payload;
        let path = |raw: &[u8]| resolve(raw, domid, false);
        Ok(match msg.ty {
            MsgType::Control => {
                Request::Control(split_strings(p)?.into_iter().map(<[u8]>::to_vec).collect())
            }
            MsgType::Directory => Request::Directory(path(exactly::<1>(p)?[0])?),
            MsgType::DirectoryPart => {
                let [raw, off] = exactly::<2>(p)?;
                let off = usize::try_from(number(off)?).map_err(|_| XsError::Einval)?;
                Request::DirectoryPart(path(raw)?, off)
            }
            MsgType::Read => Request::Read(path(exactly::<1>(p)?[0])?),
            MsgType::GetPerms => Request::GetPerms(resolve(exactly::<1>(p)?[0], domid, true)?),
            MsgType::Watch | MsgType::Unwatch => {
                let [raw, token] = exactly::<2>(p)?;
                let rp = resolve(raw, domid, true)?;
                if msg.ty == MsgType::Watch {
                    Request::Watch(rp, token.to_vec())
                } else {
                    Request::Unwatch(rp, token.to_vec())
                }
            }
            MsgType::TransactionStart => Request::TransactionStart,
            MsgType::TransactionEnd => match exactly::<1>(p)?[0] {
                b"T" => Request::TransactionEnd(true),
                b"F" => Request::TransactionEnd(false),
                _ => return Err(XsError::Einval),
            },
            MsgType::Introduce => {
                let [d, mfn, port] = exactly::<3>(p)?;
                let port = u32::try_from(number(port)?).map_err(|_| XsError::Einval)?;
                Request::Introduce {
                    domid: parse_domid(d)?,
                    mfn: number(mfn)?,
                    port,
                }
            }
            MsgType::Release => Request::Release(parse_domid(exactly::<1>(p)?[0])?),
            MsgType::GetDomainPath => Request::GetDomainPath(parse_domid(exactly::<1>(p)?[0])?),
            MsgType::IsDomainIntroduced => {
                Request::IsDomainIntroduced(parse_domid(exactly::<1>(p)?[0])?)
            }
            MsgType::Resume => Request::Resume(parse_domid(exactly::<1>(p)?[0])?),
            MsgType::SetTarget => {
                let [d, t] = exactly::<2>(p)?;
                Request::SetTarget(parse_domid(d)?, parse_domid(t)?)
            }
            MsgType::Write => {
                let nul = p.iter().position(|b| *b == 0).ok_or(XsError::Einval)?;
                Request::Write(path(&p[..nul])?, p[nul + 1..].to_vec())
            }
            MsgType::Mkdir => Request::Mkdir(path(exactly::<1>(p)?[0])?),
            MsgType::Rm => Request::Rm(path(exactly::<1>(p)?[0])?),
            MsgType::SetPerms => {
                let parts = split_strings(p)?;
                let (raw, perms) = parts.split_first().ok_or(XsError::Einval)?;
                if perms.is_empty() {
                    return Err(XsError::Einval);
                }
                let perms = perms
                    .iter()
                    .map(|s| Perm::parse(s))
                    .collect::<Result<_, _>>()?;
                Request::SetPerms(resolve(raw, domid, true)?, perms)
            }
            MsgType::ResetWatches => Request::ResetWatches,
            MsgType::WatchEvent | MsgType::Error => return Err(XsError::Einval),
        })
    }

    /// Whether this request works inside a transaction (`tx_id` is honoured).
    pub fn transactional(&self) -> bool {
        matches!(
            self,
            Request::Directory(_)
                | Request::DirectoryPart(..)
                | Request::Read(_)
                | Request::GetPerms(_)
                | Request::Write(..)
                | Request::Mkdir(_)
                | Request::Rm(_)
                | Request::SetPerms(..)
                | Request::TransactionEnd(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(ty: MsgType, p: &[u8]) -> Result<Request, XsError> {
        Request::parse(&Message::new(ty, 1, 0, p.to_vec()), 7)
    }

    #[test]
    fn parses_each_shape() {
        let r = parse(MsgType::Write, b"x/y\0va\0lue").unwrap();
        let Request::Write(p, v) = r else { panic!() };
        assert_eq!(
            (p.abs.as_str(), v.as_slice()),
            ("/local/domain/7/x/y", &b"va\0lue"[..])
        );
        assert!(
            matches!(parse(MsgType::Write, b"/x\0").unwrap(), Request::Write(_, v) if v.is_empty())
        );
        assert!(matches!(
            parse(MsgType::Watch, b"@releaseDomain\0tok\0").unwrap(),
            Request::Watch(p, t) if p.is_special() && t == b"tok"
        ));
        assert_eq!(
            parse(MsgType::TransactionEnd, b"T\0"),
            Ok(Request::TransactionEnd(true))
        );
        assert_eq!(
            parse(MsgType::Introduce, b"3\x00123456\x004\0"),
            Ok(Request::Introduce {
                domid: 3,
                mfn: 123_456,
                port: 4
            })
        );
        let Request::SetPerms(_, perms) = parse(MsgType::SetPerms, b"/a\0n3\0r0\0").unwrap() else {
            panic!()
        };
        assert_eq!(perms, [Perm::new(3, 0), Perm::new(0, 1)]);
        assert_eq!(
            parse(MsgType::DirectoryPart, b"/a\x0010\0").unwrap(),
            Request::DirectoryPart(resolve(b"/a", 7, false).unwrap(), 10)
        );
    }

    #[test]
    fn rejects_malformed() {
        for (ty, p) in [
            (MsgType::Read, &b"/a"[..]),
            (MsgType::Read, b"/a\0/b\0"),
            (MsgType::Read, b"@releaseDomain\0"),
            (MsgType::Write, b"/a"),
            (MsgType::Watch, b"/a\0"),
            (MsgType::TransactionEnd, b"X\0"),
            (MsgType::Introduce, b"3\0x\x004\0"),
            (MsgType::Introduce, b"3\x001\x0099999999999\0"),
            (MsgType::SetPerms, b"/a\0"),
            (MsgType::SetPerms, b"/a\0q1\0"),
            (MsgType::Release, b"70000\0"),
            (MsgType::WatchEvent, b"/a\0t\0"),
            (MsgType::Error, b"EINVAL\0"),
        ] {
            assert_eq!(parse(ty, p), Err(XsError::Einval), "{ty:?} {p:?}");
        }
    }
}

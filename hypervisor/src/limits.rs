//! Process limits of domain 0's process.
//!
//! Domain 0 holds descriptors for every domain it runs: the RAM memfd, one memfd per
//! shareable page (`memory`: each is its own file so that a mapper sees nothing else), the
//! process's pidfd, its control socket and event descriptors, its stdout and stderr pipes.
//! A guest with a disk and a NIC costs about 20 of them, so the soft `RLIMIT_NOFILE` most
//! systems start a shell with (1024) runs out near 50 guests, and the failure shows far from
//! its cause (a guest's `alloc_shared_page` is refused). The hard limit is the administrator's
//! real bound; [`raise_fd_limit`] moves the soft limit up to it, as servers that hold a
//! descriptor per client do.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Why a limit could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// `setrlimit` refused.
    #[error("Raising RLIMIT_NOFILE from {from} to {to} failed")]
    Set {
        /// The soft limit before.
        from: u64,
        /// The soft limit asked for.
        to: u64,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

/// The open-file limit before and after [`raise_fd_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdLimit {
    /// Soft limit before (`None`: unlimited).
    pub before: Option<u64>,
    /// Soft limit now (`None`: unlimited).
    pub now: Option<u64>,
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit (nothing to do if it is there already).
pub fn raise_fd_limit() -> Result<FdLimit, LimitError> {
    let cur = getrlimit(Resource::Nofile);
    let target = wanted(cur);
    if target == cur.current {
        return Ok(FdLimit {
            before: cur.current,
            now: cur.current,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: target,
            maximum: cur.maximum,
        },
    )
    .map_err(|e| LimitError::Set {
        from: cur.current.unwrap_or(u64::MAX),
        to: target.unwrap_or(u64::MAX),
        source: e.into(),
    })?;
    Ok(FdLimit {
        before: cur.current,
        now: target,
    })
}

/// The soft limit to ask for: the hard one (never lower than the soft one now).
fn wanted(cur: Rlimit) -> Option<u64> {
    match (cur.current, cur.maximum) {
        (None, _) => None,
        (Some(_), None) => None,
        (Some(s), Some(h)) => Some(s.max(h)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_goes_to_the_hard_one() {
        let lim = |current, maximum| Rlimit { current, maximum };
        assert_eq!(wanted(lim(Some(1024), Some(524_288))), Some(524_288));
        assert_eq!(wanted(lim(Some(1024), None)), None);
        assert_eq!(wanted(lim(None, None)), None);
        assert_eq!(wanted(lim(Some(4096), Some(4096))), Some(4096));
        // A soft limit above the hard one is not possible; never lower one anyway.
        assert_eq!(wanted(lim(Some(10), Some(5))), Some(10));
    }

    #[test]
    fn raising_is_idempotent() {
        let a = raise_fd_limit().unwrap();
        let b = raise_fd_limit().unwrap();
        assert_eq!(b.before, a.now);
        assert_eq!(b.now, a.now);
        assert_eq!(getrlimit(Resource::Nofile).current, a.now);
    }
}

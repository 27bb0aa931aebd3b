//! Fault injection against a running IDD (the `iddctl crash|hang|corrupt` subcommands, and
//! [`crate::manager::Manager::inject`]).
//!
//! * `crash`: `SIGABRT` to the IDD process (an abort, as a failed assertion or a SIGSEGV
//!   handler would end it): found through the pidfd.
//! * `hang`: `SIGSTOP`: the process stays, stops serving and stops its heartbeat; found when
//!   the heartbeat deadline passes, then killed.
//! * `corrupt GUEST`: domain 0 writes an impossible `req_prod` into GUEST's shared ring, as a
//!   hostile or broken frontend would; the IDD must refuse the ring (mark the channel failed,
//!   keep serving the other guests), not crash.

use std::fmt;
use std::str::FromStr;

/// A fault to inject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Abort the IDD process.
    Crash,
    /// Stop the IDD process (no more heartbeats).
    Hang,
    /// Corrupt the ring of the named guest.
    Corrupt {
        /// The guest's name in the policy.
        guest: String,
    },
}

/// A fault that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("unknown fault {0:?}: want crash, hang or corrupt:GUEST")]
pub struct BadFault(String);

impl FromStr for Fault {
    type Err = BadFault;

    fn from_str(s: &str) -> Result<Self, BadFault> {
        match s.split_once(':') {
            None if s == "crash" => Ok(Self::Crash),
            None if s == "hang" => Ok(Self::Hang),
            Some(("corrupt", g)) if !g.is_empty() => Ok(Self::Corrupt {
                guest: g.to_owned(),
            }),
            _ => Err(BadFault(s.chars().take(64).collect())),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Crash => f.write_str("crash"),
            Self::Hang => f.write_str("hang"),
            Self::Corrupt { guest } => write!(f, "corrupt:{guest}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for s in ["crash", "hang", "corrupt:alice"] {
            assert_eq!(s.parse::<Fault>().unwrap().to_string(), s);
        }
        for s in ["", "Crash", "corrupt", "corrupt:", "kill"] {
            assert!(s.parse::<Fault>().is_err(), "{s}");
        }
    }
}

//! Units in policy files: sizes, durations, link rates and bandwidth shares.
//!
//! Every quantity a user writes is a string with a unit (sizes may also be a bare integer, in
//! bytes). The grammar, with optional spaces between number and unit:
//!
//! | quantity | form | units |
//! |---|---|---|
//! | size | `64MiB`, `1G`, `512`, `4096 B` | `B` (or none); binary `KiB MiB GiB TiB`, also written `K M G T` (as `qemu-img` and `dd` read them); decimal `KB MB GB TB` (and `kB`) |
//! | duration | `500ms`, `100us`, `2s` | `us` (or `µs`), `ms`, `s`, `min` |
//! | rate | `100Mbit/s`, `2.5Gbit/s`, `10MB/s`, `1Gbps` | bits: `bit kbit Mbit Gbit Tbit` per `/s`, or `bps kbps Mbps Gbps Tbps`; bytes: `B kB KB MB GB TB KiB MiB GiB TiB` per `/s`. `b` is a bit and `B` a byte, so these are case sensitive |
//! | share | `100Mbit/s`, `100Mbit/s@20ms`, `64KiB every 1ms`, `1500 bytes every 100us` | a rate (converted to bytes per interval, interval 50 ms unless `@` gives one, as `xl`'s `rate=` does) or `SIZE every DURATION` |
//!
//! Sizes and durations are whole numbers; rates may have a decimal fraction when the result is a
//! whole number of bits per second. A share is stored the way Xen's netback credit scheduler
//! takes it: `bytes` of credit every `interval_us` microseconds.
//!
//! The `format_*` functions write the shortest exact form and parse back to the same value.

use std::fmt;

use serde::Serialize;

/// An error in a quantity; the message says what was wrong, [`UnitError::hint`] what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Nothing was written.
    #[error("Empty {0}")]
    Empty(&'static str),
    /// The number part is missing or malformed.
    #[error("`{0}` does not start with a number")]
    NoNumber(String),
    /// The unit is not one this quantity takes.
    #[error("Unknown unit `{unit}` for a {what}")]
    UnknownUnit {
        /// What was being parsed ("size", "duration", "rate").
        what: &'static str,
        /// The unit as written.
        unit: String,
    },
    /// A fraction where only whole numbers make sense.
    #[error("`{0}` is not a whole number")]
    Fraction(String),
    /// Does not fit in 64 bits.
    #[error("`{0}` is too large")]
    Overflow(String),
    /// A share with zero bytes or a zero interval.
    #[error("`{0}` is zero")]
    Zero(String),
    /// A rate whose interval leaves less than one byte per interval.
    #[error("`{0}` gives less than one byte per interval")]
    TooSmall(String),
}

const SIZE_UNITS: &str = "B, KiB, MiB, GiB, TiB (also K, M, G, T), or decimal KB, MB, GB, TB";
const DURATION_UNITS: &str = "us, ms, s, min";
const RATE_UNITS: &str =
    "bit/s, kbit/s, Mbit/s, Gbit/s, Tbit/s, bps, kbps, Mbps, Gbps, or B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s";

impl UnitError {
    /// What the user could write instead.
    pub fn hint(&self) -> String {
        match self {
            Self::UnknownUnit { what: "size", .. } | Self::Empty("size") => {
                format!("write a size such as \"64MiB\" or \"1G\"; units: {SIZE_UNITS}")
            }
            Self::UnknownUnit { what: "duration", .. } | Self::Empty("duration") => {
                format!("write a duration such as \"500ms\"; units: {DURATION_UNITS}")
            }
            Self::UnknownUnit { .. } | Self::Empty(_) => format!(
                "write a rate such as \"100Mbit/s\" or a share such as \"64KiB every 1ms\"; units: {RATE_UNITS}"
            ),
            Self::NoNumber(_) => "start with a whole number, for example \"64MiB\"".into(),
            Self::Fraction(_) => "use a smaller unit, for example \"1536MiB\" for 1.5GiB".into(),
            Self::Overflow(_) => "the largest value is 2^64 - 1 in the base unit".into(),
            Self::Zero(_) => "a share needs at least one byte and an interval of at least 1us".into(),
            Self::TooSmall(_) => "raise the rate or give a longer interval with \"@\", e.g. \"8kbit/s@10ms\"".into(),
        }
    }
}

/// Splits `"64 MiB"` into its number and unit (both trimmed).
fn split_number(s: &str) -> (&str, &str) {
    let s = s.trim();
    let end = s
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .map_or(s.len(), |(i, _)| i);
    (&s[..end], s[end..].trim())
}

/// Parses a whole number (underscores allowed as separators).
fn whole(num: &str, orig: &str) -> Result<u64, UnitError> {
    if num.contains('.') {
        return Err(UnitError::Fraction(orig.into()));
    }
    let digits: String = num.chars().filter(|&c| c != '_').collect();
    if digits.is_empty() {
        return Err(UnitError::NoNumber(orig.into()));
    }
    digits
        .parse::<u64>()
        .map_err(|_| UnitError::Overflow(orig.into()))
}

fn size_multiplier(unit: &str) -> Option<u64> {
    Some(match unit {
        "" | "B" | "b" | "byte" | "bytes" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    })
}

/// Parses a size in bytes: `"64MiB"`, `"1G"`, `"4096"`.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    if s.trim().is_empty() {
        return Err(UnitError::Empty("size"));
    }
    let (num, unit) = split_number(s);
    let mult = size_multiplier(unit).ok_or_else(|| UnitError::UnknownUnit {
        what: "size",
        unit: unit.into(),
    })?;
    let n = whole(num, s)?;
    n.checked_mul(mult)
        .ok_or_else(|| UnitError::Overflow(s.into()))
}

/// Writes a size with the largest binary unit that divides it exactly: `64MiB`, `1000`.
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}")
}

/// Parses a duration into microseconds: `"500ms"`, `"100us"`, `"2s"`.
pub fn parse_duration_us(s: &str) -> Result<u64, UnitError> {
    if s.trim().is_empty() {
        return Err(UnitError::Empty("duration"));
    }
    let (num, unit) = split_number(s);
    let mult = match unit {
        "us" | "µs" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "min" => 60_000_000,
        _ => {
            return Err(UnitError::UnknownUnit {
                what: "duration",
                unit: unit.into(),
            })
        }
    };
    whole(num, s)?
        .checked_mul(mult)
        .ok_or_else(|| UnitError::Overflow(s.into()))
}

/// Writes microseconds with the largest unit that divides them exactly: `50ms`, `7us`.
pub fn format_duration_us(us: u64) -> String {
    for (unit, mult) in [("min", 60_000_000), ("s", 1_000_000), ("ms", 1_000)] {
        if us != 0 && us % mult == 0 {
            return format!("{}{unit}", us / mult);
        }
    }
    format!("{us}us")
}

/// A link rate in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Rate {
    /// Bits per second.
    pub bits_per_sec: u64,
}

/// Multiplier to bits per second for a rate unit (without the `/s`).
fn rate_multiplier(unit: &str) -> Option<u64> {
    let (base, per_s) = match unit.strip_suffix("/s") {
        Some(b) => (b.trim(), true),
        None => (unit, false),
    };
    if !per_s {
        return Some(match base {
            "bps" => 1,
            "kbps" | "Kbps" => 1_000,
            "Mbps" => 1_000_000,
            "Gbps" => 1_000_000_000,
            "Tbps" => 1_000_000_000_000,
            _ => return None,
        });
    }
    Some(match base {
        "bit" | "b" => 1,
        "kbit" | "Kbit" | "kb" | "Kb" => 1_000,
        "Mbit" | "Mb" => 1_000_000,
        "Gbit" | "Gb" => 1_000_000_000,
        "Tbit" | "Tb" => 1_000_000_000_000,
        "B" => 8,
        "kB" | "KB" => 8_000,
        "MB" => 8_000_000,
        "GB" => 8_000_000_000,
        "TB" => 8_000_000_000_000,
        "KiB" => 8 << 10,
        "MiB" => 8 << 20,
        "GiB" => 8 << 30,
        "TiB" => 8 << 40,
        _ => return None,
    })
}

/// Parses a rate: `"100Mbit/s"`, `"2.5Gbit/s"`, `"10MB/s"`, `"1Gbps"`.
pub fn parse_rate(s: &str) -> Result<Rate, UnitError> {
    if s.trim().is_empty() {
        return Err(UnitError::Empty("rate"));
    }
    let (num, unit) = split_number(s);
    let mult = rate_multiplier(unit).ok_or_else(|| UnitError::UnknownUnit {
        what: "rate",
        unit: unit.into(),
    })?;
    let num: String = num.chars().filter(|&c| c != '_').collect();
    let (int, frac) = num.split_once('.').unwrap_or((&num, ""));
    if int.is_empty() || frac.contains('.') || frac.len() > 12 {
        return Err(UnitError::NoNumber(s.into()));
    }
    let overflow = || UnitError::Overflow(s.into());
    let scale = 10u128.pow(u32::try_from(frac.len()).map_err(|_| overflow())?);
    let int: u128 = int.parse().map_err(|_| overflow())?;
    let frac_v: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| overflow())?
    };
    let scaled = int
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac_v))
        .and_then(|v| v.checked_mul(u128::from(mult)))
        .ok_or_else(overflow)?;
    if scaled % scale != 0 {
        return Err(UnitError::Fraction(s.into()));
    }
    let bits = u64::try_from(scaled / scale).map_err(|_| overflow())?;
    Ok(Rate { bits_per_sec: bits })
}

/// Writes a rate with the largest decimal bit unit that divides it exactly: `100Mbit/s`.
pub fn format_rate(rate: Rate) -> String {
    let b = rate.bits_per_sec;
    for (unit, mult) in [
        ("Tbit/s", 1_000_000_000_000),
        ("Gbit/s", 1_000_000_000),
        ("Mbit/s", 1_000_000),
        ("kbit/s", 1_000),
    ] {
        if b != 0 && b % mult == 0 {
            return format!("{}{unit}", b / mult);
        }
    }
    format!("{b}bit/s")
}

/// Describes bits per second for people, truncated to three decimals: `1.009Gbit/s`.
pub fn describe_bits_per_sec(bits: u128) -> String {
    for (unit, mult) in [
        ("Tbit/s", 1_000_000_000_000u128),
        ("Gbit/s", 1_000_000_000),
        ("Mbit/s", 1_000_000),
        ("kbit/s", 1_000),
    ] {
        if bits >= mult {
            let milli = bits * 1000 / mult;
            let frac = format!("{:03}", milli % 1000);
            let frac = frac.trim_end_matches('0');
            return if frac.is_empty() {
                format!("{}{unit}", milli / 1000)
            } else {
                format!("{}.{frac}{unit}", milli / 1000)
            };
        }
    }
    format!("{bits}bit/s")
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_rate(*self))
    }
}

/// The default credit interval of a share given as a rate, as in `xl`'s `rate=` (50 ms).
pub const DEFAULT_SHARE_INTERVAL_US: u64 = 50_000;

/// A bandwidth share: `bytes` of credit every `interval_us` microseconds (netback's
/// `credit_bytes` / `credit_usec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Share {
    /// Bytes of credit per interval (at least 1).
    pub bytes: u64,
    /// Interval in microseconds (at least 1).
    pub interval_us: u64,
}

impl Share {
    /// The share as bits per second (for comparison against a link), never overflowing.
    pub fn bits_per_sec(&self) -> u128 {
        u128::from(self.bytes) * 8 * 1_000_000 / u128::from(self.interval_us.max(1))
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_share(*self))
    }
}

/// Parses a share: a rate (`"100Mbit/s"`, `"100Mbit/s@20ms"`) or `"SIZE every DURATION"`.
pub fn parse_share(s: &str) -> Result<Share, UnitError> {
    if s.trim().is_empty() {
        return Err(UnitError::Empty("share"));
    }
    let share = if let Some((size, dur)) = s.split_once(" every ") {
        Share {
            bytes: parse_size(size)?,
            interval_us: parse_duration_us(dur)?,
        }
    } else {
        let (rate, interval_us) = match s.split_once('@') {
            Some((r, d)) => (parse_rate(r)?, parse_duration_us(d)?),
            None => (parse_rate(s)?, DEFAULT_SHARE_INTERVAL_US),
        };
        let bytes = u128::from(rate.bits_per_sec) * u128::from(interval_us) / 8 / 1_000_000;
        let bytes = u64::try_from(bytes).map_err(|_| UnitError::Overflow(s.into()))?;
        if bytes == 0 && rate.bits_per_sec != 0 && interval_us != 0 {
            return Err(UnitError::TooSmall(s.into()));
        }
        Share { bytes, interval_us }
    };
    if share.bytes == 0 || share.interval_us == 0 {
        return Err(UnitError::Zero(s.into()));
    }
    Ok(share)
}

/// Writes a share in the exact `SIZE every DURATION` form: `64KiB every 1ms`.
pub fn format_share(share: Share) -> String {
    format!(
        "{} every {}",
        format_size(share.bytes),
        format_duration_us(share.interval_us)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 2 KiB "), Ok(2048));
        assert_eq!(parse_size("1_000"), Ok(1000));
        assert!(matches!(parse_size("1.5G"), Err(UnitError::Fraction(_))));
        assert!(matches!(
            parse_size("64 MiBs"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(parse_size("MiB"), Err(UnitError::NoNumber(_))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(UnitError::Overflow(_))
        ));
        assert!(matches!(parse_size(""), Err(UnitError::Empty("size"))));
    }

    #[test]
    fn rates_and_shares() {
        assert_eq!(parse_rate("100Mbit/s").unwrap().bits_per_sec, 100_000_000);
        assert_eq!(parse_rate("2.5Gbit/s").unwrap().bits_per_sec, 2_500_000_000);
        assert_eq!(parse_rate("10MB/s").unwrap().bits_per_sec, 80_000_000);
        assert_eq!(parse_rate("1Gbps").unwrap().bits_per_sec, 1_000_000_000);
        assert!(matches!(
            parse_rate("0.0001bit/s"),
            Err(UnitError::Fraction(_))
        ));
        assert!(matches!(
            parse_rate("100Mbit"),
            Err(UnitError::UnknownUnit { .. })
        ));
        // 100 Mbit/s for 50 ms is 625 000 bytes.
        assert_eq!(
            parse_share("100Mbit/s"),
            Ok(Share {
                bytes: 625_000,
                interval_us: 50_000
            })
        );
        assert_eq!(
            parse_share("100Mbit/s@20ms"),
            Ok(Share {
                bytes: 250_000,
                interval_us: 20_000
            })
        );
        assert_eq!(
            parse_share("1500 bytes every 100us"),
            Ok(Share {
                bytes: 1500,
                interval_us: 100
            })
        );
        assert_eq!(
            parse_share("100Mbit/s").unwrap().bits_per_sec(),
            100_000_000
        );
        assert!(matches!(
            parse_share("0 every 1ms"),
            Err(UnitError::Zero(_))
        ));
        assert!(matches!(parse_share("1bit/s"), Err(UnitError::TooSmall(_))));
        assert!(matches!(
            parse_share("10 every 5 fortnights"),
            Err(UnitError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn descriptions() {
        assert_eq!(describe_bits_per_sec(1_009_600_000), "1.009Gbit/s");
        assert_eq!(describe_bits_per_sec(10_000_000_000), "10Gbit/s");
        assert_eq!(describe_bits_per_sec(409_600_000), "409.6Mbit/s");
        assert_eq!(describe_bits_per_sec(999), "999bit/s");
    }

    #[test]
    fn hints_name_units() {
        let e = parse_size("5 parsecs").unwrap_err();
        assert!(e.hint().contains("MiB"), "{}", e.hint());
        let e = parse_rate("5 furlongs").unwrap_err();
        assert!(e.hint().contains("Mbit/s"), "{}", e.hint());
    }

    proptest! {
        #[test]
        fn size_round_trip(b in any::<u64>()) {
            prop_assert_eq!(parse_size(&format_size(b)), Ok(b));
        }

        #[test]
        fn size_shifted_round_trip(n in 0u64..1 << 20, shift in 0u32..40) {
            let b = n << shift;
            let s = format_size(b);
            prop_assert_eq!(parse_size(&s), Ok(b));
            prop_assert!(s.len() <= 20);
        }

        #[test]
        fn duration_round_trip(us in any::<u64>()) {
            prop_assert_eq!(parse_duration_us(&format_duration_us(us)), Ok(us));
        }

        #[test]
        fn rate_round_trip(bits in any::<u64>()) {
            let r = Rate { bits_per_sec: bits };
            prop_assert_eq!(parse_rate(&format_rate(r)), Ok(r));
        }

        #[test]
        fn share_round_trip(bytes in 1u64.., interval_us in 1u64..) {
            let s = Share { bytes, interval_us };
            prop_assert_eq!(parse_share(&format_share(s)), Ok(s));
        }

        #[test]
        fn parsers_never_panic(s in "\\PC{0,24}") {
            let _ = parse_size(&s);
            let _ = parse_duration_us(&s);
            let _ = parse_rate(&s);
            let _ = parse_share(&s);
        }
    }
}

//! Small value parsers: MAC addresses, PCI addresses, interface names.

use crate::model::{MacAddr, PciAddress};

/// Parses a MAC written as six hex pairs separated by `:` or `-`; says why not.
pub fn parse_mac(s: &str) -> Result<MacAddr, &'static str> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
        return Err("is not a MAC address (six hex pairs such as 02:00:00:00:00:01)");
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| "has a pair that is not hex")?;
    }
    if mac == [0; 6] {
        return Err("is the all-zero MAC");
    }
    if mac[0] & 1 != 0 {
        return Err("is a multicast MAC (bit 0 of the first octet is set)");
    }
    Ok(MacAddr(mac))
}

/// Parses `dddd:bb:dd.f` (hex; the domain may be left out).
pub fn parse_pci(s: &str) -> Option<PciAddress> {
    let (rest, function) = s.rsplit_once('.')?;
    let parts: Vec<&str> = rest.split(':').collect();
    let (domain, bus, device) = match parts.as_slice() {
        [d, b, v] => (*d, *b, *v),
        [b, v] => ("0", *b, *v),
        _ => return None,
    };
    let hex = |x: &str, max: usize| {
        (!x.is_empty() && x.len() <= max)
            .then(|| u32::from_str_radix(x, 16).ok())
            .flatten()
    };
    let device = u8::try_from(hex(device, 2)?).ok().filter(|&d| d < 32)?;
    let function = u8::try_from(hex(function, 1)?).ok().filter(|&f| f < 8)?;
    Some(PciAddress {
        domain: u16::try_from(hex(domain, 4)?).ok()?,
        bus: u8::try_from(hex(bus, 2)?).ok()?,
        device,
        function,
    })
}

pub(super) fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// A Xen domain name as the policy accepts it: 1 to 64 printable ASCII characters without
/// `/` (it is compared with XenStore values, and a `/` would read as a path) or spaces.
pub(super) fn valid_domain_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:00:00:00:00:01"),
            Ok(MacAddr([2, 0, 0, 0, 0, 1]))
        );
        assert_eq!(
            parse_mac("02-AB-00-00-00-01"),
            Ok(MacAddr([2, 0xab, 0, 0, 0, 1]))
        );
        assert!(parse_mac("01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_mac("ff:ff:ff:ff:ff:ff")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_mac("00:00:00:00:00:00")
            .unwrap_err()
            .contains("all-zero"));
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:zz").is_err());
    }

    #[test]
    fn pci_addresses() {
        assert_eq!(
            parse_pci("0000:00:04.0"),
            Some(PciAddress {
                domain: 0,
                bus: 0,
                device: 4,
                function: 0
            })
        );
        assert_eq!(
            parse_pci("01:1f.7"),
            Some(PciAddress {
                domain: 0,
                bus: 1,
                device: 0x1f,
                function: 7
            })
        );
        assert_eq!(parse_pci("0000:00:20.0"), None, "device 32");
        assert_eq!(parse_pci("0000:00:04.8"), None, "function 8");
        assert_eq!(parse_pci("00:04"), None);
    }

    #[test]
    fn ifnames() {
        assert!(valid_ifname("tap0"));
        assert!(!valid_ifname("a-very-long-interface"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname(""));
    }

    #[test]
    fn domain_names() {
        assert!(valid_domain_name("domu"));
        assert!(valid_domain_name("web-1.example"));
        assert!(!valid_domain_name(""));
        assert!(!valid_domain_name("a b"));
        assert!(!valid_domain_name("a/b"));
        assert!(!valid_domain_name(&"x".repeat(65)));
    }
}

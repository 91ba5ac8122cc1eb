//! [`Cidr`]: an IPv4 or IPv6 network, for trusted proxies.

use std::error::Error;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 or IPv6 network such as `10.0.0.0/8` or `2001:db8::/32`, parsed with [`str::parse`].
///
/// A bare address (`10.1.2.3`) is a single host (`/32`, `/128`). Host bits are cleared (`10.1.2.3/8` is
/// `10.0.0.0/8`). An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) is stored as its IPv4 network, and
/// [`contains`](Self::contains) treats IPv4-mapped IPv6 addresses as IPv4.
///
/// ```
/// use tower_redis_ratelimit::key::Cidr;
///
/// let private: Cidr = "10.0.0.0/8".parse()?;
/// assert!(private.contains("10.20.30.40".parse()?));
/// assert!(private.contains("::ffff:10.0.0.1".parse()?));
/// assert!(!private.contains("11.0.0.1".parse()?));
/// assert!("10.0.0.0/33".parse::<Cidr>().is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network of `addr` with a `prefix`-bit mask; errors if `prefix` exceeds 32 (IPv4) or 128 (IPv6).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrParseError> {
        let max = max_prefix(addr);
        if prefix > max {
            return Err(CidrParseError {
                input: format!("{addr}/{prefix}"),
                kind: ErrorKind::PrefixTooLong { max },
            });
        }
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (addr, prefix),
            },
            _ => (addr, prefix),
        };
        Ok(Self {
            network: mask(addr, prefix),
            prefix,
        })
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside this network (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(_), ip @ IpAddr::V4(_)) | (IpAddr::V6(_), ip @ IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.network
            }
            (IpAddr::V6(_), IpAddr::V4(v4)) => {
                mask(IpAddr::V6(v4.to_ipv6_mapped()), self.prefix) == self.network
            }
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }
}

impl From<IpAddr> for Cidr {
    /// The single-host network of `addr` (`/32` or `/128`).
    fn from(addr: IpAddr) -> Self {
        let addr = canonical(addr);
        Self {
            network: addr,
            prefix: max_prefix(addr),
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = |kind| CidrParseError {
            input: input.to_owned(),
            kind,
        };
        let trimmed = input.trim();
        let (addr, prefix) = match trimmed.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (trimmed, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| error(ErrorKind::Address))?;
        let prefix = match prefix {
            None => return Ok(Self::from(addr)),
            Some(prefix) if !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit()) => {
                prefix
            }
            Some(_) => return Err(error(ErrorKind::Prefix)),
        };
        let max = max_prefix(addr);
        match prefix.parse::<u8>() {
            Ok(prefix) if prefix <= max => Self::new(addr, prefix),
            _ => Err(error(ErrorKind::PrefixTooLong { max })),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Why a [`Cidr`] could not be parsed or built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CidrParseError {
    input: String,
    kind: ErrorKind,
}

/// What was wrong in a CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    /// The part before `/` is not an IP address.
    Address,
    /// The part after `/` is not a number.
    Prefix,
    /// The prefix is longer than the address.
    PrefixTooLong { max: u8 },
}

impl fmt::Display for CidrParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid CIDR `{}`: ", self.input)?;
        match self.kind {
            ErrorKind::Address => f.write_str("expected an IPv4 or IPv6 address before the `/`"),
            ErrorKind::Prefix => f.write_str("expected a prefix length (a number) after the `/`"),
            ErrorKind::PrefixTooLong { max } => {
                write!(f, "the prefix length must be at most {max}")
            }
        }
    }
}

impl Error for CidrParseError {}

/// The address itself, or its IPv4 address if it is IPv4-mapped IPv6.
pub(super) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The address length in bits: 32 or 128.
pub(super) fn max_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `ip` with all but its first `prefix` bits cleared (`prefix` past the address length keeps all bits).
pub(super) fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let keep = u32::MAX
                .checked_shl(32_u32.saturating_sub(prefix.into()))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & keep))
        }
        IpAddr::V6(v6) => {
            let keep = u128::MAX
                .checked_shl(128_u32.saturating_sub(prefix.into()))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & keep))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_ipv4_and_ipv6_networks() {
        let v4: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!((v4.network(), v4.prefix_len()), (ip("10.0.0.0"), 8));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert_eq!(v6.to_string(), "2001:db8::/32");
        assert_eq!(
            " 192.168.0.0/16 ".parse::<Cidr>().unwrap().to_string(),
            "192.168.0.0/16"
        );
    }

    #[test]
    fn bare_address_is_a_host_and_host_bits_are_cleared() {
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(
            "2001:db8::1".parse::<Cidr>().unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert_eq!(Cidr::from(ip("::ffff:10.0.0.1")).to_string(), "10.0.0.1/32");
    }

    #[test]
    fn contains_checks_the_prefix() {
        let net: Cidr = "192.168.4.0/22".parse().unwrap();
        assert!(net.contains(ip("192.168.4.0")));
        assert!(net.contains(ip("192.168.7.255")));
        assert!(!net.contains(ip("192.168.8.0")));
        assert!(!net.contains(ip("2001:db8::1")));
        let v6: Cidr = "2001:db8:abcd::/48".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:abcd:12::1")));
        assert!(!v6.contains(ip("2001:db8:abce::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains(ip("255.255.255.255"))
        );
        assert!("::/0".parse::<Cidr>().unwrap().contains(ip("10.0.0.1")));
    }

    #[test]
    fn ipv4_mapped_addresses_and_networks_count_as_ipv4() {
        let v4: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(v4.contains(ip("::ffff:10.9.9.9")));
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped, v4);
        let mapped_space: Cidr = "::ffff:0:0/96".parse().unwrap();
        assert_eq!(mapped_space.to_string(), "0.0.0.0/0");
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        let message = |text: &str| text.parse::<Cidr>().unwrap_err().to_string();
        assert_eq!(
            message("10.0.0/8"),
            "invalid CIDR `10.0.0/8`: expected an IPv4 or IPv6 address before the `/`"
        );
        assert_eq!(
            message("10.0.0.0/"),
            "invalid CIDR `10.0.0.0/`: expected a prefix length (a number) after the `/`"
        );
        assert_eq!(
            message("10.0.0.0/+8"),
            "invalid CIDR `10.0.0.0/+8`: expected a prefix length (a number) after the `/`"
        );
        assert_eq!(
            message("10.0.0.0/33"),
            "invalid CIDR `10.0.0.0/33`: the prefix length must be at most 32"
        );
        assert_eq!(
            message("::/129"),
            "invalid CIDR `::/129`: the prefix length must be at most 128"
        );
        assert_eq!(
            message("::/99999999999"),
            "invalid CIDR `::/99999999999`: the prefix length must be at most 128"
        );
        assert!(message("").contains("expected an IPv4 or IPv6 address"));
        let error: Box<dyn Error> = Box::new(Cidr::new(ip("10.0.0.0"), 40).unwrap_err());
        assert_eq!(
            error.to_string(),
            "invalid CIDR `10.0.0.0/40`: the prefix length must be at most 32"
        );
    }

    #[test]
    fn mask_clears_host_bits() {
        assert_eq!(mask(ip("203.0.113.77"), 24), ip("203.0.113.0"));
        assert_eq!(mask(ip("203.0.113.77"), 0), ip("0.0.0.0"));
        assert_eq!(mask(ip("203.0.113.77"), 32), ip("203.0.113.77"));
        assert_eq!(mask(ip("2001:db8:1:2:3:4:5:6"), 64), ip("2001:db8:1:2::"));
        assert_eq!(
            mask(ip("2001:db8:1:2:3:4:5:6"), 128),
            ip("2001:db8:1:2:3:4:5:6")
        );
        assert_eq!(mask(ip("2001:db8:1:2:3:4:5:6"), 0), ip("::"));
    }
}

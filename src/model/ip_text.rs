//! The text form of a client address, as `IpAddr`'s `Display` writes it, on the stack.
//!
//! Why: every proxied request writes its peer's address twice (`X-Forwarded-For`, and
//! the usage row's `ip_address`), and `core::fmt` spent about 1,000 instructions on each
//! IPv4 address (callgrind, docs/performance.md round 7). IPv4 is written by hand here;
//! IPv6, whose shortest form has rules of its own (RFC 5952), still goes through
//! `Display`. Owns no policy about which address is the client's.

use std::net::{IpAddr, Ipv4Addr};

/// The longest text of an address: eight full IPv6 groups are 39 bytes, and the
/// `api_key_usage.ip_address` column is `varchar(45)`.
pub const IP_TEXT_MAX: usize = 45;

#[derive(Clone, Copy)]
pub struct IpText {
    buf: [u8; IP_TEXT_MAX],
    len: u8,
}

impl IpText {
    pub fn new(ip: IpAddr) -> IpText {
        let mut t = IpText {
            buf: [0; IP_TEXT_MAX],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => t.v4(v4),
            IpAddr::V6(v6) => {
                use std::io::Write;
                let mut out = &mut t.buf[..];
                // Cannot fail: the longest form fits the buffer.
                let _ = write!(out, "{v6}");
                let left = out.len();
                t.len = (IP_TEXT_MAX - left) as u8;
            }
        }
        t
    }

    fn v4(&mut self, ip: Ipv4Addr) {
        let mut at = 0;
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                self.buf[at] = b'.';
                at += 1;
            }
            if octet >= 100 {
                self.buf[at] = b'0' + octet / 100;
                at += 1;
            }
            if octet >= 10 {
                self.buf[at] = b'0' + octet / 10 % 10;
                at += 1;
            }
            self.buf[at] = b'0' + octet % 10;
            at += 1;
        }
        self.len = at as u8;
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..usize::from(self.len)).unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits, dots, colons and hex letters are ever written.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_matches_display() {
        for ip in [
            "0.0.0.0",
            "192.0.2.7",
            "10.20.100.255",
            "255.255.255.255",
            "1.10.100.9",
            "::",
            "::1",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
            "::ffff:203.0.113.9",
            "fe80::1:2:3:4",
        ] {
            let parsed: IpAddr = ip.parse().expect("address");
            assert_eq!(IpText::new(parsed).as_str(), parsed.to_string(), "{ip}");
        }
        // Every octet value in every position.
        for n in 0..=255u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(n, 255 - n, n / 2, n.wrapping_mul(7)));
            assert_eq!(IpText::new(ip).as_str(), ip.to_string());
        }
        let longest: IpAddr = "1111:2222:3333:4444:5555:6666:7777:8888".parse().expect("v6");
        assert_eq!(IpText::new(longest).as_bytes().len(), 39);
    }
}

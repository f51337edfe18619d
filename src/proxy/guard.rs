//! Defences in front of authentication: a per-client limit on failed authentications
//! (so a random-key flood from one client cannot drive database lookups), the refusal
//! of keys sent in query strings (they end up in logs and browser history), and the
//! head and declared body sizes, answered in JSON before any other work.
//!
//! Counts per client address per UTC minute in memory; nothing here touches the
//! database. Behind a load balancer the address is the one `metering::client_ip`
//! derives from trusted proxies, not the balancer's.

use std::net::IpAddr;

use dashmap::DashMap;
use http::{header, HeaderMap, Request};

use super::error::Reject;

/// Above this many tracked clients, entries from past minutes are swept on insert.
const SWEEP_ABOVE: usize = 65_536;

pub struct FailedAuth {
    per_minute: u32,
    windows: DashMap<IpAddr, (i64, u32)>,
}

impl FailedAuth {
    /// `per_minute == 0` turns the limit off.
    pub fn new(per_minute: u32) -> Self {
        FailedAuth {
            per_minute,
            windows: DashMap::new(),
        }
    }

    /// Whether `ip` has used up its failures for minute `minute`.
    pub fn blocked(&self, ip: IpAddr, minute: i64) -> bool {
        self.per_minute > 0
            && self
                .windows
                .get(&ip)
                .is_some_and(|w| w.0 == minute && w.1 >= self.per_minute)
    }

    pub fn record(&self, ip: IpAddr, minute: i64) {
        if self.per_minute == 0 {
            return;
        }
        if self.windows.len() > SWEEP_ABOVE {
            self.windows.retain(|_, w| w.0 == minute);
        }
        let mut w = self.windows.entry(ip).or_insert((minute, 0));
        if w.0 != minute {
            *w = (minute, 0);
        }
        w.1 = w.1.saturating_add(1);
    }

    pub fn tracked(&self) -> usize {
        self.windows.len()
    }
}

/// Whether a query string carries something shaped like a keygate key.
pub fn key_in_query(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.contains("pk_live_") || q.contains("pk_test_") || q.contains("pk_live%5F") || q.contains("pk_test%5F")
    })
}

/// hyper's own limit is a backstop that answers without a body; this one answers JSON.
pub fn check_head_size<B>(req: &Request<B>, max: usize) -> Result<(), Reject> {
    let uri = req.uri();
    let mut size = uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + req.method().as_str().len()
        + 12;
    for (name, value) in req.headers() {
        size += name.as_str().len() + value.len() + 4;
        if size > max {
            return Err(Reject::HeadersTooLarge);
        }
    }
    Ok(())
}

pub fn check_content_length(h: &HeaderMap, max: u64) -> Result<(), Reject> {
    match h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(n) if n > max => Err(Reject::BodyTooLarge),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_budget_and_resets_each_minute() {
        let g = FailedAuth::new(3);
        let ip: IpAddr = "198.51.100.1".parse().expect("ip");
        for _ in 0..3 {
            assert!(!g.blocked(ip, 10));
            g.record(ip, 10);
        }
        assert!(g.blocked(ip, 10));
        assert!(!g.blocked(ip, 11));
        assert!(!g.blocked("198.51.100.2".parse().expect("ip"), 10));
        let off = FailedAuth::new(0);
        off.record(ip, 10);
        assert!(!off.blocked(ip, 10));
    }

    #[test]
    fn memory_stays_bounded_under_many_clients() {
        let g = FailedAuth::new(1);
        for i in 0..(SWEEP_ABOVE as u32 + 10) {
            g.record(IpAddr::from(i.to_be_bytes()), 1);
        }
        g.record("10.0.0.1".parse().expect("ip"), 2);
        assert!(g.tracked() < 10, "{}", g.tracked());
    }

    #[test]
    fn spots_keys_in_queries() {
        assert!(key_in_query(Some("api_key=pk_live_abc")));
        assert!(key_in_query(Some("a=1&k=pk_test%5Fabc")));
        assert!(!key_in_query(Some("q=hello")));
        assert!(!key_in_query(None));
    }
}

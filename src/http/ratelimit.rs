//! Per-client-address rate limits of the public port (API.md: `429 rate_limited` with
//! `Retry-After`): one token bucket per client for requests to `/r/*` (claim links are the
//! unauthenticated surface), and one for failed authentications (API keys and the admin token),
//! which once empty refuses every authenticated request from that client until it refills.
//!
//! Limits are per node: a client spread over N nodes by a load balancer gets up to N times the
//! rate. IPv6 clients are keyed by their /64, the smallest block one host usually holds. Behind
//! a reverse proxy listed in `--trusted-proxy`, the client is the right-most `X-Forwarded-For`
//! address that is not itself a trusted proxy.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A sustained rate with a burst allowance; a rate of 0 disables the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub const OFF: Self = Self {
        per_second: 0.0,
        burst: 0.0,
    };

    pub fn is_off(&self) -> bool {
        self.per_second <= 0.0
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate.per_second).min(rate.burst);
        self.at = now;
    }

    /// Takes (or, with `take` false, only looks for) one token after refilling.
    fn spend(&mut self, rate: Rate, now: Instant, take: bool) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            if take {
                self.tokens -= 1.0;
            }
            Ok(())
        } else {
            let missing = (1.0 - self.tokens).max(0.0);
            Err(Duration::from_secs_f64(missing / rate.per_second).max(Duration::from_secs(1)))
        }
    }
}

/// Token buckets keyed by API key, each spent at the rate its caller passes (a key's limit
/// can differ from key to key, and a cluster-wide limit is split over the active nodes).
#[derive(Default)]
pub struct KeyLimiter {
    buckets: Mutex<HashMap<crate::ids::ApiKeyId, Bucket>>,
}

impl KeyLimiter {
    /// Takes one token of `key` at `rate`, or says how long until one is available.
    pub fn take(
        &self,
        key: crate::ids::ApiKeyId,
        rate: Rate,
        now: Instant,
    ) -> Result<(), Duration> {
        if rate.is_off() {
            return Ok(());
        }
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key)
            .or_insert_with(|| Bucket::full(rate, now))
            .spend(rate, now, true)
    }
}

/// Token buckets keyed by client. Bounded: when the table is full, buckets that have refilled
/// (they carry no information) are dropped first, then the table is cleared.
pub struct Limiter {
    rate: Rate,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    max_clients: usize,
}

impl Limiter {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
            max_clients: 100_000,
        }
    }

    pub fn is_off(&self) -> bool {
        self.rate.is_off()
    }

    /// Takes one token for `client`, or says how long until one is available.
    pub fn take(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        self.spend(client, now, true)
    }

    /// Whether `client` has a token left, without taking it.
    pub fn check(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        self.spend(client, now, false)
    }

    fn spend(&self, client: IpAddr, now: Instant, take: bool) -> Result<(), Duration> {
        if self.is_off() {
            return Ok(());
        }
        let key = bucket_key(client);
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&key) && map.len() >= self.max_clients {
            let full = self.rate.burst;
            map.retain(|_, b| {
                let mut b2 = *b;
                let dt = now.saturating_duration_since(b2.at).as_secs_f64();
                b2.tokens = (b2.tokens + dt * self.rate.per_second).min(full);
                b2.tokens < full
            });
            if map.len() >= self.max_clients {
                map.clear();
            }
        }
        map.entry(key)
            .or_insert_with(|| Bucket::full(self.rate, now))
            .spend(self.rate, now, take)
    }
}

/// IPv4 addresses as they are; IPv6 by /64 (IPv4-mapped IPv6 as IPv4).
fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// An address block, `10.0.0.0/8` or `fd00::/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix must be 0..={max}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The client a request comes from: the peer, or behind trusted proxies the right-most
/// `X-Forwarded-For` entry that is not a trusted proxy.
pub fn client_addr(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(xff) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in xff.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// The limits of one node's public port.
pub struct IpLimits {
    pub links: Limiter,
    pub auth_failures: Limiter,
    pub trusted_proxies: Vec<Cidr>,
}

impl IpLimits {
    pub fn new(links: Rate, auth_failures: Rate, trusted_proxies: Vec<Cidr>) -> Self {
        Self {
            links: Limiter::new(links),
            auth_failures: Limiter::new(auth_failures),
            trusted_proxies,
        }
    }

    pub fn off() -> Self {
        Self::new(Rate::OFF, Rate::OFF, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn key_buckets_are_per_key_at_the_rate_given() {
        let l = KeyLimiter::default();
        let (a, b) = (crate::ids::ApiKeyId([1; 16]), crate::ids::ApiKeyId([2; 16]));
        let rate = Rate {
            per_second: 1.0,
            burst: 2.0,
        };
        let t0 = Instant::now();
        assert!(l.take(a, rate, t0).is_ok());
        assert!(l.take(a, rate, t0).is_ok());
        assert!(l.take(a, rate, t0).is_err());
        assert!(
            l.take(b, rate, t0).is_ok(),
            "another key has its own bucket"
        );
        assert!(l.take(a, Rate::OFF, t0).is_ok(), "no limit");
        assert!(l.take(a, rate, t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let l = Limiter::new(Rate {
            per_second: 2.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        for _ in 0..3 {
            assert!(l.take(a, t0).is_ok());
        }
        let wait = l.take(a, t0).expect_err("burst spent");
        assert!(wait >= Duration::from_secs(1));
        // Another client is unaffected.
        assert!(l.take(ip("10.0.0.2"), t0).is_ok());
        // Half a second later one token is back (2/s).
        assert!(l.take(a, t0 + Duration::from_millis(500)).is_ok());
        assert!(l.take(a, t0 + Duration::from_millis(500)).is_err());
        // `check` does not spend.
        let t1 = t0 + Duration::from_secs(10);
        for _ in 0..10 {
            assert!(l.check(a, t1).is_ok());
        }
    }

    #[test]
    fn off_never_limits() {
        let l = Limiter::new(Rate::OFF);
        let t = Instant::now();
        for _ in 0..10_000 {
            assert!(l.take(ip("10.0.0.1"), t).is_ok());
        }
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let l = Limiter::new(Rate {
            per_second: 1.0,
            burst: 1.0,
        });
        let t = Instant::now();
        assert!(l.take(ip("2001:db8:1:2::1"), t).is_ok());
        assert!(l.take(ip("2001:db8:1:2:ffff::9"), t).is_err());
        assert!(l.take(ip("2001:db8:1:3::1"), t).is_ok());
        assert!(l.take(ip("::ffff:10.0.0.7"), t).is_ok());
        assert!(
            l.take(ip("10.0.0.7"), t).is_err(),
            "mapped v4 is the same client"
        );
    }

    #[test]
    fn table_stays_bounded() {
        let mut l = Limiter::new(Rate {
            per_second: 1.0,
            burst: 5.0,
        });
        l.max_clients = 100;
        let t = Instant::now();
        for i in 0..1000u32 {
            let _ = l.take(IpAddr::V4(std::net::Ipv4Addr::from(i)), t);
        }
        assert!(l.buckets.lock().expect("lock").len() <= 100);
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().expect("cidr");
        assert!(c.contains(ip("10.1.255.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(!c.contains(ip("::1")));
        let one: Cidr = "192.168.0.5".parse().expect("addr");
        assert!(one.contains(ip("192.168.0.5")) && !one.contains(ip("192.168.0.6")));
        let all: Cidr = "0.0.0.0/0".parse().expect("all");
        assert!(all.contains(ip("8.8.8.8")));
        let v6: Cidr = "fd00::/8".parse().expect("v6");
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        for bad in ["10.0.0.0/33", "nope", "::/129", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().expect("cidr")];
        let xff = Some("203.0.113.9, 198.51.100.2, 10.0.0.3");
        // From a trusted proxy: the right-most untrusted hop.
        assert_eq!(
            client_addr(ip("10.0.0.1"), xff, &trusted),
            ip("198.51.100.2")
        );
        // From anyone else: the header is ignored.
        assert_eq!(
            client_addr(ip("198.51.100.7"), xff, &trusted),
            ip("198.51.100.7")
        );
        // No header, or garbage: the peer.
        assert_eq!(client_addr(ip("10.0.0.1"), None, &trusted), ip("10.0.0.1"));
        assert_eq!(
            client_addr(ip("10.0.0.1"), Some("garbage"), &trusted),
            ip("10.0.0.1")
        );
        // Nothing trusted: the peer, always.
        assert_eq!(client_addr(ip("10.0.0.1"), xff, &[]), ip("10.0.0.1"));
    }
}

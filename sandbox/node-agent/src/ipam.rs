//! Pod IPs: one allocator per node, handing out `.2`–`.254` of the node's /24 podCIDR, never an
//! IP that is still held, and not reusing a released one before the range wraps around (so a
//! stale client of a deleted pod does not reach its successor at once).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

#[derive(Debug)]
pub struct IpAllocator {
    first: u32,
    last: u32,
    held: BTreeSet<u32>,
    next: u32,
}

impl IpAllocator {
    /// An allocator for the /24 `cidr_base` (e.g. 10.244.1.0): `.2`–`.254` (`.1` is left out as
    /// the conventional gateway, `.255` as the broadcast address of the /24).
    pub fn for_pod_cidr(cidr_base: Ipv4Addr) -> Self {
        let base = u32::from(cidr_base) & 0xffff_ff00;
        Self::for_range(base + 2, base + 254)
    }

    fn for_range(first: u32, last: u32) -> Self {
        Self {
            first,
            last,
            held: BTreeSet::new(),
            next: first,
        }
    }

    /// Whether an address is one this allocator could hand out.
    pub fn in_range(&self, ip: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&u32::from(ip))
    }

    /// Takes `wanted` if it is in range and free (a pod keeps its IP across agent restarts),
    /// else the next free address. `None` only when every address is held.
    pub fn allocate(&mut self, wanted: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        if let Some(ip) = wanted.filter(|ip| self.in_range(*ip)) {
            if self.held.insert(u32::from(ip)) {
                return Some(ip);
            }
        }
        let size = self.last - self.first + 1;
        for _ in 0..size {
            let candidate = self.next;
            self.next = if self.next >= self.last {
                self.first
            } else {
                self.next + 1
            };
            if self.held.insert(candidate) {
                return Some(Ipv4Addr::from(candidate));
            }
        }
        None
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.held.remove(&u32::from(ip));
    }

    /// The range, for messages (`10.244.1.2-10.244.1.254`).
    pub fn range(&self) -> String {
        format!(
            "{}-{}",
            Ipv4Addr::from(self.first),
            Ipv4Addr::from(self.last)
        )
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn node_b() -> IpAllocator {
        IpAllocator::for_pod_cidr(ip("10.244.2.0"))
    }

    #[test]
    fn sequential_unique_and_no_reuse_while_held() {
        let mut a = node_b();
        assert_eq!(a.range(), "10.244.2.2-10.244.2.254");
        assert_eq!(a.allocate(None), Some(ip("10.244.2.2")));
        assert_eq!(a.allocate(None), Some(ip("10.244.2.3")));
        a.release(ip("10.244.2.2"));
        // released addresses are not reused before the range wraps
        assert_eq!(a.allocate(None), Some(ip("10.244.2.4")));
        assert_eq!(a.held(), 2);
    }

    #[test]
    fn wanted_ip_is_kept_when_free_and_in_this_nodes_range() {
        let mut a = node_b();
        assert_eq!(a.allocate(Some(ip("10.244.2.77"))), Some(ip("10.244.2.77")));
        assert_eq!(a.allocate(Some(ip("10.244.2.77"))), Some(ip("10.244.2.2")));
        // another node's range, the old loopback range, the gateway and broadcast: not taken
        for other in ["10.244.1.5", "127.1.0.3", "10.244.2.1", "10.244.2.255"] {
            assert!(!a.in_range(ip(other)), "{other}");
        }
        assert_eq!(a.allocate(Some(ip("10.244.1.5"))), Some(ip("10.244.2.3")));
    }

    #[test]
    fn wraps_and_skips_held() {
        let mut a = node_b();
        a.next = a.last;
        assert_eq!(a.allocate(None), Some(ip("10.244.2.254")));
        a.held.insert(a.first);
        assert_eq!(a.allocate(None), Some(ip("10.244.2.3")));
    }

    #[test]
    fn exhaustion_returns_none() {
        let mut a = node_b();
        for _ in 0..253 {
            assert!(a.allocate(None).is_some());
        }
        assert_eq!(a.allocate(None), None);
    }
}

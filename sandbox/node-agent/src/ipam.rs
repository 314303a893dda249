//! Pod IPs: one per pod from 127.1.0.0/16, starting at 127.1.0.2, never handing out an IP that
//! is still held, wrapping around at the end of the range.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

const FIRST: u32 = u32::from_be_bytes([127, 1, 0, 2]);
const LAST: u32 = u32::from_be_bytes([127, 1, 255, 254]);

#[derive(Debug)]
pub struct IpAllocator {
    held: BTreeSet<u32>,
    next: u32,
}

impl Default for IpAllocator {
    fn default() -> Self {
        Self {
            held: BTreeSet::new(),
            next: FIRST,
        }
    }
}

/// Whether an address is one the allocator could hand out.
pub fn in_range(ip: Ipv4Addr) -> bool {
    (FIRST..=LAST).contains(&u32::from(ip))
}

impl IpAllocator {
    /// Takes `wanted` if it is in range and free (a pod keeps its IP across agent restarts),
    /// else the next free address. `None` only when all 65,533 addresses are held.
    pub fn allocate(&mut self, wanted: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        if let Some(ip) = wanted.filter(|ip| in_range(*ip)) {
            if self.held.insert(u32::from(ip)) {
                return Some(ip);
            }
        }
        let size = LAST - FIRST + 1;
        for _ in 0..size {
            let candidate = self.next;
            self.next = if self.next >= LAST {
                FIRST
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

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_unique_and_no_reuse_while_held() {
        let mut a = IpAllocator::default();
        assert_eq!(a.allocate(None), Some(Ipv4Addr::new(127, 1, 0, 2)));
        assert_eq!(a.allocate(None), Some(Ipv4Addr::new(127, 1, 0, 3)));
        a.release(Ipv4Addr::new(127, 1, 0, 2));
        // released addresses are not reused before the range wraps
        assert_eq!(a.allocate(None), Some(Ipv4Addr::new(127, 1, 0, 4)));
        assert_eq!(a.held(), 2);
    }

    #[test]
    fn wanted_ip_is_kept_when_free() {
        let mut a = IpAllocator::default();
        assert_eq!(
            a.allocate(Some(Ipv4Addr::new(127, 1, 3, 7))),
            Some(Ipv4Addr::new(127, 1, 3, 7))
        );
        assert_eq!(
            a.allocate(Some(Ipv4Addr::new(127, 1, 3, 7))),
            Some(Ipv4Addr::new(127, 1, 0, 2))
        );
        assert_eq!(
            a.allocate(Some(Ipv4Addr::new(127, 0, 0, 1))),
            Some(Ipv4Addr::new(127, 1, 0, 3))
        );
    }

    #[test]
    fn wraps_and_skips_held() {
        let mut a = IpAllocator {
            held: BTreeSet::new(),
            next: LAST,
        };
        assert_eq!(a.allocate(None), Some(Ipv4Addr::new(127, 1, 255, 254)));
        a.held.insert(FIRST);
        assert_eq!(a.allocate(None), Some(Ipv4Addr::new(127, 1, 0, 3)));
    }

    #[test]
    fn exhaustion_returns_none() {
        let mut a = IpAllocator {
            held: (FIRST..=LAST).collect(),
            ..Default::default()
        };
        assert_eq!(a.allocate(None), None);
    }
}

//! The ketama ring exactly as ARCUS's Java client builds it (`ArcusKetamaNodeLocator`), so a key
//! lands on the same cache node whichever client wrote it.
//!
//! - 160 points per node: for `i` in 0..40, MD5 of `"<ip>:<port>-<i>"`; each 16-byte digest gives
//!   4 points, point `k` = little-endian u32 of digest bytes `[4k..4k+4]`.
//! - A key's hash: little-endian u32 of MD5(key as UTF-8) bytes `[0..4]`.
//! - Owner: the first point `>=` the hash, wrapping to the lowest point.
//! - Two nodes on the same point (a 32-bit collision): the Java client keeps every node of a
//!   point in a `TreeSet` ordered by the `"<ip>:<port>"` string and routes to `first()`, so the
//!   lexicographically smallest address wins. We keep only that one.
//!
//! This module is pure: no I/O, no ZooKeeper.

use md5::{Digest, Md5};

/// Points per node (`DefaultKetamaNodeLocatorConfiguration.NUM_REPS`).
pub const POINTS_PER_NODE: usize = 160;

/// A cache node address `<ip>:<port>` taken from a `cache_list` child name
/// `<ip>:<port>-<hostname>`: everything before the first `-` (Java: `child.split("-")[0]`).
///
/// Returns `None` for a name that does not look like `<host>:<port>` after the cut (for
/// example a replication-mode name `group^M^ip:port-host`), which we do not route to.
pub fn node_addr_from_znode(name: &str) -> Option<&str> {
    let addr = name.split('-').next().unwrap_or("").trim();
    let (host, port) = addr.rsplit_once(':')?;
    if host.is_empty() || host.contains('^') || port.parse::<u16>().is_err() {
        return None;
    }
    Some(addr)
}

/// Java's `HashAlgorithm.KETAMA_HASH` of `key`.
pub fn ketama_hash(key: &[u8]) -> u32 {
    let d = Md5::digest(key);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// The 160 points of the node at `addr` (`<ip>:<port>`), in generation order.
pub fn node_points(addr: &str) -> Vec<u32> {
    let mut points = Vec::with_capacity(POINTS_PER_NODE);
    for i in 0..POINTS_PER_NODE / 4 {
        let d = Md5::digest(format!("{addr}-{i}").as_bytes());
        for k in 0..4 {
            points.push(u32::from_le_bytes([
                d[4 * k],
                d[4 * k + 1],
                d[4 * k + 2],
                d[4 * k + 3],
            ]));
        }
    }
    points
}

/// The part of `key` that is hashed when ARCUS's shard-key option is on: the text between the
/// first `{` and the next `}` when that is non-empty, else the whole key
/// (`ArcusKetamaNodeLocator.getShardKey`). Off by default in the Java client and here.
pub fn shard_key(key: &str) -> &str {
    let Some(left) = key.find('{') else {
        return key;
    };
    let rest = &key[left + 1..];
    match rest.find('}') {
        Some(0) | None => key,
        Some(right) => &rest[..right],
    }
}

/// An immutable ketama continuum over a set of nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    /// Node addresses, sorted and unique.
    nodes: Vec<String>,
    /// `(point, index into nodes)`, sorted by point, one entry per distinct point.
    points: Vec<(u32, u32)>,
}

impl Ring {
    /// A ring over node addresses `<ip>:<port>`. Duplicates are ignored.
    pub fn new<I, S>(addrs: I) -> Ring
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut nodes: Vec<String> = addrs.into_iter().map(Into::into).collect();
        nodes.sort();
        nodes.dedup();
        let mut points: Vec<(u32, u32)> = Vec::with_capacity(nodes.len() * POINTS_PER_NODE);
        for (idx, addr) in nodes.iter().enumerate() {
            points.extend(node_points(addr).into_iter().map(|p| (p, idx as u32)));
        }
        // Node indices follow the sorted addresses, so sorting by (point, index) puts the
        // lexicographically smallest address first among equal points: the Java tie-break.
        points.sort_unstable();
        points.dedup_by_key(|(p, _)| *p);
        Ring { nodes, points }
    }

    /// A ring over `cache_list/<svc>` child names (`<ip>:<port>-<hostname>`); names that do not
    /// parse are skipped (see [`node_addr_from_znode`]).
    pub fn from_cache_list<I, S>(children: I) -> Ring
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let addrs: Vec<String> = children
            .into_iter()
            .filter_map(|c| node_addr_from_znode(c.as_ref()).map(str::to_string))
            .collect();
        Ring::new(addrs)
    }

    /// Node addresses on the ring, sorted.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn contains(&self, addr: &str) -> bool {
        self.nodes
            .binary_search_by(|n| n.as_str().cmp(addr))
            .is_ok()
    }

    /// The node owning `hash`: the first point `>= hash`, wrapping to the first point.
    pub fn node_for_hash(&self, hash: u32) -> Option<&str> {
        if self.points.is_empty() {
            return None;
        }
        let i = self.points.partition_point(|(p, _)| *p < hash);
        let (_, idx) = self.points[if i == self.points.len() { 0 } else { i }];
        Some(&self.nodes[idx as usize])
    }

    /// The node owning `key` (hashing the whole key, as the Java client does by default).
    pub fn node_for_key(&self, key: &str) -> Option<&str> {
        self.node_for_hash(ketama_hash(key.as_bytes()))
    }

    /// Distinct points on the continuum with their owner, ascending.
    pub fn points(&self) -> impl Iterator<Item = (u32, &str)> + '_ {
        self.points
            .iter()
            .map(|(p, i)| (*p, self.nodes[*i as usize].as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_cut_at_the_first_dash() {
        assert_eq!(
            node_addr_from_znode("10.0.0.1:11211-test-arcus-mc-0"),
            Some("10.0.0.1:11211")
        );
        assert_eq!(
            node_addr_from_znode("127.1.0.5:11211-host"),
            Some("127.1.0.5:11211")
        );
        assert_eq!(
            node_addr_from_znode("127.1.0.5:11211"),
            Some("127.1.0.5:11211")
        );
        assert_eq!(node_addr_from_znode("g0^M^127.1.0.5:11211-host"), None);
        assert_eq!(node_addr_from_znode("garbage"), None);
        assert_eq!(node_addr_from_znode("host:notaport-x"), None);
        assert_eq!(node_addr_from_znode(""), None);
    }

    #[test]
    fn ketama_hash_matches_md5_prefix() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e → bytes d4 1d 8c d9 → LE 0xd98c1dd4.
        assert_eq!(ketama_hash(b""), 0xd98c1dd4);
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661 → LE 0xb975c10c.
        assert_eq!(ketama_hash(b"a"), 0xb975c10c);
    }

    #[test]
    fn each_node_has_160_points() {
        let ring = Ring::new(["10.0.0.1:11211"]);
        assert_eq!(node_points("10.0.0.1:11211").len(), 160);
        assert_eq!(ring.points().count(), 160);
        assert!(ring.points().all(|(_, n)| n == "10.0.0.1:11211"));
    }

    #[test]
    fn lookup_takes_first_point_at_or_above_and_wraps() {
        let ring = Ring::new(["10.0.0.1:11211", "10.0.0.2:11211"]);
        let pts: Vec<(u32, String)> = ring.points().map(|(p, n)| (p, n.to_string())).collect();
        let (p0, n0) = &pts[0];
        assert_eq!(ring.node_for_hash(*p0), Some(n0.as_str()));
        assert_eq!(ring.node_for_hash(0), Some(n0.as_str()));
        let (p1, n1) = &pts[1];
        assert_eq!(ring.node_for_hash(p0 + 1), Some(n1.as_str()));
        assert_eq!(ring.node_for_hash(*p1), Some(n1.as_str()));
        // Past the last point the lookup wraps to the first.
        let (plast, nlast) = pts.last().unwrap();
        assert_eq!(ring.node_for_hash(*plast), Some(nlast.as_str()));
        assert!(
            *plast < u32::MAX,
            "these two nodes have no point at u32::MAX"
        );
        assert_eq!(ring.node_for_hash(plast + 1), Some(n0.as_str()));
        assert_eq!(ring.node_for_hash(u32::MAX), Some(n0.as_str()));
    }

    #[test]
    fn empty_ring_routes_nowhere() {
        let ring = Ring::new(Vec::<String>::new());
        assert!(ring.is_empty());
        assert_eq!(ring.node_for_key("k"), None);
    }

    #[test]
    fn duplicates_and_order_do_not_matter() {
        let a = Ring::new(["10.0.0.2:11211", "10.0.0.1:11211", "10.0.0.2:11211"]);
        let b = Ring::from_cache_list(["10.0.0.1:11211-a", "10.0.0.2:11211-b"]);
        assert_eq!(a, b);
        assert_eq!(a.nodes(), ["10.0.0.1:11211", "10.0.0.2:11211"]);
        assert!(a.contains("10.0.0.2:11211"));
        assert!(!a.contains("10.0.0.3:11211"));
    }

    #[test]
    fn shard_key_takes_the_braced_part() {
        assert_eq!(shard_key("user:{42}:profile"), "42");
        assert_eq!(shard_key("user:{}:x"), "user:{}:x");
        assert_eq!(shard_key("no-braces"), "no-braces");
        assert_eq!(shard_key("open{only"), "open{only");
    }
}

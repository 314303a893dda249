//! Which keys change owner between two rings. Pure: no I/O.
//!
//! A key found on node `S` moves when `S` owns it on the ring before and another node `T` owns
//! it on the ring after. A key found on `S` that `S` does not own on the ring before is a stale
//! leftover of an earlier topology (ARCUS scrubs those, stock memcached keeps them): it is never
//! copied, because it may be older than the owner's value (or deleted there).

use super::keys::KeyInfo;
use arcus_client::ring::{ketama_hash, shard_key, Ring};
use std::collections::{BTreeMap, BTreeSet};

/// How keys are hashed, as the clients do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hashing {
    /// Hash only the `{...}` part of a key (ARCUS shard keys); off in the Java client by default.
    pub shard_key: bool,
}

impl Hashing {
    pub fn hash(self, key: &str) -> u32 {
        let k = if self.shard_key { shard_key(key) } else { key };
        ketama_hash(k.as_bytes())
    }
}

/// Owner of `key` on `ring`.
pub fn owner<'r>(ring: &'r Ring, key: &str, hashing: Hashing) -> Option<&'r str> {
    ring.node_for_hash(hashing.hash(key))
}

/// Keys of one source node, split by what happens to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcePlan {
    /// Keys that move, by their owner on the ring after.
    pub moves: BTreeMap<String, Vec<KeyInfo>>,
    /// Keys the source keeps (it owns them before and after).
    pub staying: usize,
    /// Keys on the source that it does not own on the ring before (stale copies; not moved).
    pub not_owned: usize,
}

impl SourcePlan {
    pub fn move_count(&self) -> usize {
        self.moves.values().map(Vec::len).sum()
    }
}

/// Splits the keys listed on `source` (pure).
pub fn plan_source(
    before: &Ring,
    after: &Ring,
    source: &str,
    keys: Vec<KeyInfo>,
    hashing: Hashing,
) -> SourcePlan {
    let mut plan = SourcePlan::default();
    for k in keys {
        let h = hashing.hash(&k.key);
        if before.node_for_hash(h) != Some(source) {
            plan.not_owned += 1;
            continue;
        }
        match after.node_for_hash(h) {
            Some(t) if t != source => plan.moves.entry(t.to_string()).or_default().push(k),
            Some(_) => plan.staying += 1,
            // An empty ring after: nowhere to go.
            None => plan.not_owned += 1,
        }
    }
    plan
}

/// The moves of every source: `keys_per_source` maps a node to the keys listed on it.
pub fn plan(
    before: &Ring,
    after: &Ring,
    keys_per_source: BTreeMap<String, Vec<KeyInfo>>,
    hashing: Hashing,
) -> BTreeMap<String, SourcePlan> {
    keys_per_source
        .into_iter()
        .map(|(s, keys)| {
            let p = plan_source(before, after, &s, keys, hashing);
            (s, p)
        })
        .collect()
}

/// A part of the hash space that changes owner.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Handover {
    pub from: String,
    pub to: String,
}

/// Every (from, to) pair of nodes between which some hash range changes owner, with the share
/// of the whole 32-bit hash space it covers (0.0..=1.0). Sources to list are the `from` nodes;
/// targets the `to` nodes. Computed by sweeping the union of both rings' points: between two
/// consecutive points, both rings have one owner each.
pub fn handovers(before: &Ring, after: &Ring) -> BTreeMap<Handover, f64> {
    let mut bounds: Vec<u32> = before
        .points()
        .map(|(p, _)| p)
        .chain(after.points().map(|(p, _)| p))
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut out: BTreeMap<Handover, f64> = BTreeMap::new();
    if bounds.is_empty() || before.is_empty() || after.is_empty() {
        return out;
    }
    let total = (u32::MAX as f64) + 1.0;
    let mut add = |hash: u32, width: f64| {
        let (Some(f), Some(t)) = (before.node_for_hash(hash), after.node_for_hash(hash)) else {
            return;
        };
        if f != t {
            *out.entry(Handover {
                from: f.to_string(),
                to: t.to_string(),
            })
            .or_default() += width / total;
        }
    };
    // [0, first] and (last, MAX] both belong to the first point of each ring.
    let first = bounds[0];
    let last = *bounds.last().unwrap();
    add(first, first as f64 + 1.0);
    for w in bounds.windows(2) {
        add(w[1], (w[1] - w[0]) as f64);
    }
    if last < u32::MAX {
        add(last + 1, (u32::MAX - last) as f64);
    }
    out
}

/// Nodes that give away some keys (to list), and nodes that receive some.
pub fn sources_and_targets(before: &Ring, after: &Ring) -> (BTreeSet<String>, BTreeSet<String>) {
    let h = handovers(before, after);
    let sources = h.keys().map(|h| h.from.clone()).collect();
    let targets = h.keys().map(|h| h.to.clone()).collect();
    (sources, targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::keys::Expiry;
    use arcus_client::ItemType;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:11211", i + 1)).collect()
    }

    fn key(k: &str) -> KeyInfo {
        KeyInfo {
            key: k.to_string(),
            expiry: Expiry::Never,
            item_type: ItemType::KeyValue,
            cas: None,
        }
    }

    /// All keys "k0".."k<n>" put on their owner on `ring`.
    fn placed(ring: &Ring, n: usize) -> BTreeMap<String, Vec<KeyInfo>> {
        let mut m: BTreeMap<String, Vec<KeyInfo>> = BTreeMap::new();
        for i in 0..n {
            let k = format!("k{i}");
            m.entry(ring.node_for_key(&k).unwrap().to_string())
                .or_default()
                .push(key(&k));
        }
        m
    }

    /// Checks a plan against the definition, key by key, and returns the moved fraction.
    fn check(before: &Ring, after: &Ring, n: usize) -> f64 {
        let listed = placed(before, n);
        let plans = plan(before, after, listed.clone(), Hashing::default());
        let mut moved = 0;
        for (src, p) in &plans {
            assert_eq!(p.not_owned, 0);
            assert_eq!(p.move_count() + p.staying, listed[src].len());
            for (to, ks) in &p.moves {
                assert_ne!(to, src);
                for k in ks {
                    assert_eq!(before.node_for_key(&k.key), Some(src.as_str()));
                    assert_eq!(after.node_for_key(&k.key), Some(to.as_str()));
                }
                moved += ks.len();
            }
        }
        // Every key whose owner differs is in the plan exactly once.
        let expected = (0..n)
            .filter(|i| {
                let k = format!("k{i}");
                before.node_for_key(&k) != after.node_for_key(&k)
            })
            .count();
        assert_eq!(moved, expected);
        moved as f64 / n as f64
    }

    #[test]
    fn one_to_two_moves_about_half_to_the_new_node() {
        let all = nodes(2);
        let before = Ring::new(all[..1].to_vec());
        let after = Ring::new(all.clone());
        let f = check(&before, &after, 20_000);
        assert!((0.35..0.65).contains(&f), "moved fraction {f}");
        let plans = plan(&before, &after, placed(&before, 2000), Hashing::default());
        let p = &plans[&all[0]];
        assert_eq!(p.moves.keys().collect::<Vec<_>>(), vec![&all[1]]);
        let (s, t) = sources_and_targets(&before, &after);
        assert_eq!(s.into_iter().collect::<Vec<_>>(), vec![all[0].clone()]);
        assert_eq!(t.into_iter().collect::<Vec<_>>(), vec![all[1].clone()]);
    }

    #[test]
    fn three_to_five_moves_only_to_the_new_nodes() {
        let all = nodes(5);
        let before = Ring::new(all[..3].to_vec());
        let after = Ring::new(all.clone());
        let f = check(&before, &after, 20_000);
        assert!(
            (0.3..0.5).contains(&f),
            "moved fraction {f} (expect about 2/5)"
        );
        let plans = plan(&before, &after, placed(&before, 20_000), Hashing::default());
        for p in plans.values() {
            for to in p.moves.keys() {
                assert!(to == &all[3] || to == &all[4], "moved to an old node {to}");
            }
        }
        let (s, t) = sources_and_targets(&before, &after);
        assert_eq!(s.len(), 3);
        assert_eq!(t, all[3..].iter().cloned().collect());
    }

    #[test]
    fn five_to_three_moves_only_the_leaving_nodes_keys() {
        let all = nodes(5);
        let before = Ring::new(all.clone());
        let after = Ring::new(all[..3].to_vec());
        let f = check(&before, &after, 20_000);
        assert!(
            (0.3..0.5).contains(&f),
            "moved fraction {f} (expect about 2/5)"
        );
        let plans = plan(&before, &after, placed(&before, 20_000), Hashing::default());
        for (src, p) in &plans {
            if all[..3].contains(src) {
                assert_eq!(p.move_count(), 0, "a staying node gives keys away");
            } else {
                assert_eq!(p.staying, 0, "a leaving node keeps keys");
                assert!(p.moves.keys().all(|t| all[..3].contains(t)));
            }
        }
        let (s, t) = sources_and_targets(&before, &after);
        assert_eq!(s, all[3..].iter().cloned().collect());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn handover_shares_match_sampled_keys() {
        let all = nodes(5);
        let before = Ring::new(all.clone());
        let after = Ring::new(all[..3].to_vec());
        let share: f64 = handovers(&before, &after).values().sum();
        let sampled = check(&before, &after, 50_000);
        assert!(
            (share - sampled).abs() < 0.02,
            "swept share {share} vs sampled {sampled}"
        );
        assert!(handovers(&before, &before).is_empty());
    }

    #[test]
    fn stale_keys_are_not_moved() {
        let all = nodes(3);
        let before = Ring::new(all.clone());
        let after = Ring::new(all[..2].to_vec());
        // A key owned by node 0, found on node 2 (left over from an older ring).
        let k = (0..)
            .map(|i| format!("stale{i}"))
            .find(|k| before.node_for_key(k) == Some(all[0].as_str()))
            .unwrap();
        let p = plan_source(&before, &after, &all[2], vec![key(&k)], Hashing::default());
        assert_eq!(p.not_owned, 1);
        assert_eq!(p.move_count(), 0);
    }

    #[test]
    fn shard_keys_hash_their_braced_part() {
        let h = Hashing { shard_key: true };
        assert_eq!(h.hash("user:{42}:a"), h.hash("order:{42}:b"));
        assert_eq!(h.hash("x"), Hashing::default().hash("x"));
    }
}

//! Pass 1's memory of the keys it stored, in bounded memory: a Bloom filter of the copied keys
//! per source (about 1.2 bytes a key at 1% false positives, where a set of the keys took about
//! half a kilobyte), plus an exact, capped set of exceptions (copies found gone from their
//! target before the ring change). What a false positive costs is in the module docs of
//! [`crate::migration`] ("Guarantees and limits"). Not persisted: a restarted operator has no
//! memory and falls back to the source watermark (`Copied::Unknown`).

use super::rules::Copied;
use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};

/// False-positive rate each filter is sized for.
const FALSE_POSITIVES: f64 = 0.01;
/// The smallest filter (keys): small nodes cost nothing worth counting.
const MIN_KEYS: usize = 1024;
/// Exceptions kept exactly at most; past this the memory answers `Unknown` (the checkpoint's
/// inference) rather than grow with the key count.
pub const MAX_EXCEPTIONS: usize = 100_000;

/// One Bloom filter: `k` bit positions per key from two hashes (Kirsch–Mitzenmacher).
struct Bloom {
    bits: Vec<u64>,
    /// Number of bits (`bits.len() * 64`).
    m: u64,
    k: u32,
    /// Keys it was sized for, and keys inserted.
    capacity: usize,
    len: usize,
}

impl Bloom {
    fn with_capacity(keys: usize) -> Bloom {
        let n = keys.max(MIN_KEYS) as f64;
        let ln2 = std::f64::consts::LN_2;
        let m = (-(n * FALSE_POSITIVES.ln()) / (ln2 * ln2)).ceil() as u64;
        let words = m.div_ceil(64).max(1);
        let k = ((words * 64) as f64 / n * ln2).round().clamp(1.0, 16.0) as u32;
        Bloom {
            bits: vec![0; words as usize],
            m: words * 64,
            k,
            capacity: n as usize,
            len: 0,
        }
    }

    fn positions(&self, key: &str) -> impl Iterator<Item = u64> {
        let (h1, h2) = hashes(key);
        let m = self.m;
        (0..self.k as u64).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % m)
    }

    fn insert(&mut self, key: &str) {
        for p in self.positions(key) {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.len += 1;
    }

    fn contains(&self, key: &str) -> bool {
        self.positions(key)
            .all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }
}

/// Two independent 64-bit hashes of `key` (the second odd, so the probe steps cover `m`).
fn hashes(key: &str) -> (u64, u64) {
    let mut a = DefaultHasher::new();
    key.hash(&mut a);
    let mut b = DefaultHasher::new();
    0x9e37_79b9_7f4a_7c15u64.hash(&mut b);
    key.hash(&mut b);
    (a.finish(), b.finish() | 1)
}

/// The keys pass 1 stored from one source.
pub struct CopiedKeys {
    /// Filters, the last one filling; a new one (twice as large) is added when it is full, so
    /// the false-positive rate stays near its target whatever the first estimate was.
    filters: Vec<Bloom>,
    /// Copies known gone from their target although a filter holds them.
    gone: HashSet<String>,
    /// More exceptions than [`MAX_EXCEPTIONS`]: the memory no longer tells.
    lost: bool,
    /// Exactly the keys stored since the current round started (at most [`MAX_EXCEPTIONS`]):
    /// for an item written after the last round's source watermark a false positive would
    /// keep a new key uncopied, and the last round stores few keys.
    this_round: HashSet<String>,
    /// The current round stored more than [`MAX_EXCEPTIONS`]: only the filters tell.
    this_round_overflowed: bool,
}

impl CopiedKeys {
    /// A memory sized for about `expected` keys (the source's item count).
    pub fn with_capacity(expected: usize) -> CopiedKeys {
        CopiedKeys {
            filters: vec![Bloom::with_capacity(expected)],
            gone: HashSet::new(),
            lost: false,
            this_round: HashSet::new(),
            this_round_overflowed: false,
        }
    }

    /// A pass-1 round starts: from now on [`CopiedKeys::copied_given`] answers exactly for
    /// items changed since this round's source watermark.
    pub fn start_round(&mut self) {
        self.this_round = HashSet::new();
        self.this_round_overflowed = false;
    }

    pub fn insert(&mut self, key: &str) {
        self.gone.remove(key);
        let last = self.filters.last().expect("at least one filter");
        if last.len >= last.capacity {
            let grown = Bloom::with_capacity(last.capacity * 2);
            self.filters.push(grown);
        }
        self.filters.last_mut().expect("a filter").insert(key);
        if self.this_round.len() >= MAX_EXCEPTIONS {
            self.this_round_overflowed = true;
            self.this_round = HashSet::new();
        } else if !self.this_round_overflowed {
            self.this_round.insert(key.to_string());
        }
    }

    /// [`CopiedKeys::copied`] for an item the source changed (`true`) or not since the last
    /// round's watermark `C_S`: a changed item was stored, if at all, by the last round, which
    /// is known exactly (no false positive that would leave a new key uncopied).
    pub fn copied_given(&self, key: &str, changed_since_last_round: bool) -> Copied {
        if changed_since_last_round && !self.lost && !self.this_round_overflowed {
            if !self.gone.contains(key) && self.this_round.contains(key) {
                Copied::Yes
            } else {
                Copied::No
            }
        } else {
            self.copied(key)
        }
    }

    /// Whether pass 1 stored `key`: `Yes` may be a false positive (about 1%); `No` is exact.
    pub fn copied(&self, key: &str) -> Copied {
        if self.lost {
            Copied::Unknown
        } else if !self.gone.contains(key) && self.filters.iter().any(|f| f.contains(key)) {
            Copied::Yes
        } else {
            Copied::No
        }
    }

    /// `key`'s copy is gone from its target (or was never there): pass 2 treats it as not
    /// copied.
    pub fn forget(&mut self, key: String) {
        if self.gone.len() >= MAX_EXCEPTIONS {
            self.lost = true;
            self.gone = HashSet::new();
        } else if !self.lost {
            self.gone.insert(key);
        }
    }

    /// Bytes held (filters and exceptions), for the logs.
    pub fn bytes(&self) -> usize {
        let filters: usize = self.filters.iter().map(|f| f.bits.len() * 8).sum();
        filters + self.gone.iter().map(|k| k.len() + 48).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_about_one_percent_false_positives() {
        let mut m = CopiedKeys::with_capacity(50_000);
        for i in 0..50_000 {
            m.insert(&format!("in:{i}"));
        }
        assert!((0..50_000).all(|i| m.copied(&format!("in:{i}")) == Copied::Yes));
        let fp = (0..50_000)
            .filter(|i| m.copied(&format!("out:{i}")) == Copied::Yes)
            .count();
        assert!(fp < 50_000 * 2 / 100, "{fp} false positives in 50000");
        // About 9.6 bits a key.
        assert!(m.bytes() < 50_000 * 13 / 10, "{} bytes", m.bytes());
    }

    #[test]
    fn grows_past_its_estimate_without_losing_precision() {
        let mut m = CopiedKeys::with_capacity(1000);
        for i in 0..40_000 {
            m.insert(&format!("in:{i}"));
        }
        assert!((0..40_000).all(|i| m.copied(&format!("in:{i}")) == Copied::Yes));
        let fp = (0..40_000)
            .filter(|i| m.copied(&format!("out:{i}")) == Copied::Yes)
            .count();
        // Each filter stays near 1%; a lookup asks every filter (here 6).
        assert!(fp < 40_000 * 5 / 100, "{fp} false positives in 40000");
    }

    #[test]
    fn items_changed_since_the_last_round_are_answered_exactly() {
        let mut m = CopiedKeys::with_capacity(100);
        for i in 0..100 {
            m.insert(&format!("old:{i}"));
        }
        m.start_round();
        m.insert("recent");
        // The filter of 100 keys at 1% would answer Yes for about 1 in 100 absent keys; for a
        // changed item the answer comes from the last round's exact set.
        let wrong = (0..10_000)
            .filter(|i| m.copied_given(&format!("new:{i}"), true) == Copied::Yes)
            .count();
        assert_eq!(wrong, 0);
        assert_eq!(m.copied_given("recent", true), Copied::Yes);
        assert_eq!(m.copied_given("old:1", false), Copied::Yes);
        // Copied in an earlier round, changed since: the last round did not store it again.
        assert_eq!(m.copied_given("old:1", true), Copied::No);
        m.forget("recent".into());
        assert_eq!(m.copied_given("recent", true), Copied::No);
    }

    #[test]
    fn exceptions_are_exact_and_capped() {
        let mut m = CopiedKeys::with_capacity(10);
        m.insert("a");
        m.forget("a".into());
        assert_eq!(m.copied("a"), Copied::No);
        m.insert("a");
        assert_eq!(m.copied("a"), Copied::Yes);
        for i in 0..=MAX_EXCEPTIONS {
            m.forget(format!("g{i}"));
        }
        assert_eq!(m.copied("a"), Copied::Unknown);
    }
}

//! `ExtentSet`: a set of block numbers kept as sorted, coalesced, half-open ranges.
//!
//! Owns nothing but memory. It is the representation of "which blocks" everywhere in volume
//! mode: the present blocks of a partial file, the dirty blocks of an inode in an epoch, the
//! blocks a replica still lacks. Every operation costs O(log n + k) where n is the number of
//! extents and k the number of extents the operation touches, never O(blocks): a 1 GiB
//! sequential write is one extent whatever the block size.
//!
//! Invariant (checked by `check_invariants` in tests and by `try_from_ranges` on decode):
//! extents are non-empty, sorted, pairwise disjoint and never adjacent (`a.end < b.start`), so
//! two sets holding the same blocks are equal and iterate identically.
//!
//! This module never does I/O and never panics on any input: empty or reversed ranges are
//! no-ops.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Bound, Range};

/// A set of `u64` block numbers stored as disjoint, non-adjacent, sorted ranges.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ExtentSet {
    /// start -> end (exclusive).
    map: BTreeMap<u64, u64>,
    /// Number of blocks in the set, kept so that `count_blocks` is O(1).
    blocks: u64,
}

/// Why a list of ranges is not a canonical extent set (see `ExtentSet::try_from_ranges`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtentError {
    #[error("extent {index} ({start}..{end}) is empty or reversed")]
    Empty { index: usize, start: u64, end: u64 },
    #[error(
        "extent {index} (starting at {start}) overlaps, touches or precedes the previous one (ending at {prev_end})"
    )]
    NotCanonical {
        index: usize,
        start: u64,
        prev_end: u64,
    },
}

/// The blocks touched by the byte range `[offset, offset + len)`; empty for `len == 0`.
/// Saturates at `u64::MAX` instead of overflowing. `block_size` must be non-zero.
pub fn blocks_of_bytes(offset: u64, len: u64, block_size: u64) -> Range<u64> {
    if len == 0 || block_size == 0 {
        return 0..0;
    }
    let end = offset.saturating_add(len);
    (offset / block_size)..end.div_ceil(block_size)
}

impl ExtentSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// A set holding exactly the blocks of `r`.
    pub fn from_range(r: Range<u64>) -> Self {
        let mut s = Self::new();
        s.insert(r);
        s
    }

    /// Builds a set from ranges that must already be canonical (sorted, non-empty, disjoint,
    /// non-adjacent): the check a decoder needs, so that a damaged map is reported instead of
    /// silently repaired.
    pub fn try_from_ranges<I>(ranges: I) -> Result<Self, ExtentError>
    where
        I: IntoIterator<Item = Range<u64>>,
    {
        let mut s = Self::new();
        let mut prev_end: Option<u64> = None;
        for (index, r) in ranges.into_iter().enumerate() {
            if r.start >= r.end {
                return Err(ExtentError::Empty {
                    index,
                    start: r.start,
                    end: r.end,
                });
            }
            if let Some(pe) = prev_end
                && r.start <= pe
            {
                return Err(ExtentError::NotCanonical {
                    index,
                    start: r.start,
                    prev_end: pe,
                });
            }
            prev_end = Some(r.end);
            s.blocks += r.end - r.start;
            s.map.insert(r.start, r.end);
        }
        Ok(s)
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of blocks in the set. O(1).
    pub fn count_blocks(&self) -> u64 {
        self.blocks
    }

    /// Number of extents (maximal runs of consecutive blocks).
    pub fn extent_count(&self) -> usize {
        self.map.len()
    }

    /// Bytes covered by the set's blocks at `block_size` (saturating).
    pub fn len_bytes(&self, block_size: u64) -> u64 {
        self.blocks.saturating_mul(block_size)
    }

    /// One past the highest block in the set, or 0 for an empty set.
    pub fn end(&self) -> u64 {
        self.map.last_key_value().map_or(0, |(_, e)| *e)
    }

    /// The extents, in ascending order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(s, e)| *s..*e)
    }

    /// Every block, in ascending order. O(blocks): for tests, encoders and per-block work only.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter().flatten()
    }

    /// The extent holding `block`, if any.
    fn extent_of(&self, block: u64) -> Option<(u64, u64)> {
        self.map
            .range(..=block)
            .next_back()
            .filter(|(_, e)| **e > block)
            .map(|(s, e)| (*s, *e))
    }

    pub fn contains(&self, block: u64) -> bool {
        self.extent_of(block).is_some()
    }

    /// True if every block of `r` is in the set (true for an empty `r`).
    pub fn contains_range(&self, r: Range<u64>) -> bool {
        if r.start >= r.end {
            return true;
        }
        self.extent_of(r.start).is_some_and(|(_, e)| e >= r.end)
    }

    /// True if some block of `r` is in the set.
    pub fn overlaps(&self, r: Range<u64>) -> bool {
        self.intersection(r).next().is_some()
    }

    /// The parts of the set inside `r`, clipped to `r`, ascending.
    pub fn intersection(&self, r: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let (start, end) = (r.start, r.end);
        // The extent starting before `start` may reach into `r`; the rest start inside it.
        let first = if start < end {
            self.map
                .range(..start)
                .next_back()
                .filter(|(_, e)| **e > start)
                .map(|(_, e)| start..(*e).min(end))
        } else {
            None
        };
        let rest = self
            .map
            .range((Bound::Included(start), Bound::Excluded(end.max(start))))
            .map(move |(s, e)| *s..(*e).min(end));
        first.into_iter().chain(rest)
    }

    /// The parts of `r` not in the set, ascending.
    pub fn gaps(&self, r: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut pos = r.start;
        for ext in self.intersection(r.clone()) {
            if ext.start > pos {
                out.push(pos..ext.start);
            }
            pos = ext.end;
        }
        if pos < r.end {
            out.push(pos..r.end);
        }
        out
    }

    /// Adds the blocks of `r`, merging with overlapping and adjacent extents.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut s, mut e) = (r.start, r.end);
        // An extent starting before `s` that reaches `s` (or touches it) absorbs the range.
        if let Some((ps, pe)) = self
            .map
            .range(..s)
            .next_back()
            .map(|(a, b)| (*a, *b))
            .filter(|(_, pe)| *pe >= s)
        {
            self.map.remove(&ps);
            self.blocks -= pe - ps;
            s = ps;
            e = e.max(pe);
        }
        // Extents starting inside [s, e] (inclusive: adjacent ones merge too).
        while let Some((ns, ne)) = self.map.range(s..=e).next().map(|(a, b)| (*a, *b)) {
            self.map.remove(&ns);
            self.blocks -= ne - ns;
            e = e.max(ne);
        }
        self.map.insert(s, e);
        self.blocks += e - s;
    }

    pub fn insert_block(&mut self, block: u64) {
        self.insert(block..block.saturating_add(1));
    }

    /// Removes the blocks of `r`, splitting extents that straddle its ends.
    pub fn remove(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        // An extent starting before r.start and reaching into r: keep its head (and its tail
        // if it also reaches past r.end).
        if let Some((ps, pe)) = self
            .map
            .range(..r.start)
            .next_back()
            .map(|(a, b)| (*a, *b))
            .filter(|(_, pe)| *pe > r.start)
        {
            self.map.insert(ps, r.start);
            self.blocks -= pe - r.start;
            if pe > r.end {
                self.map.insert(r.end, pe);
                self.blocks += pe - r.end;
                return;
            }
        }
        while let Some((ns, ne)) = self.map.range(r.start..r.end).next().map(|(a, b)| (*a, *b)) {
            self.map.remove(&ns);
            self.blocks -= ne - ns;
            if ne > r.end {
                self.map.insert(r.end, ne);
                self.blocks += ne - r.end;
            }
        }
    }

    /// Removes every block `>= first_dropped` (a truncate).
    pub fn truncate(&mut self, first_dropped: u64) {
        self.remove(first_dropped..u64::MAX);
    }

    /// Adds every block of `other`. O(other's extents · log n).
    pub fn union_with(&mut self, other: &ExtentSet) {
        for r in other.iter() {
            self.insert(r);
        }
    }

    /// The union of two sets (for example the dirty blocks of two merged epochs).
    pub fn union(&self, other: &ExtentSet) -> ExtentSet {
        let (mut big, small) = if self.extent_count() >= other.extent_count() {
            (self.clone(), other)
        } else {
            (other.clone(), self)
        };
        big.union_with(small);
        big
    }

    /// Removes every block of `other`.
    pub fn subtract(&mut self, other: &ExtentSet) {
        for r in other.iter() {
            self.remove(r);
        }
    }

    /// Test helper and decoder check: the structural invariant.
    pub fn check_invariants(&self) -> Result<(), ExtentError> {
        let again = Self::try_from_ranges(self.iter())?;
        debug_assert_eq!(again.blocks, self.blocks);
        Ok(())
    }
}

impl fmt::Debug for ExtentSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromIterator<Range<u64>> for ExtentSet {
    fn from_iter<I: IntoIterator<Item = Range<u64>>>(iter: I) -> Self {
        let mut s = ExtentSet::new();
        for r in iter {
            s.insert(r);
        }
        s
    }
}

/// Serialized as a list of `[start, end]` pairs; deserialization rejects non-canonical input.
impl serde::Serialize for ExtentSet {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq(self.map.iter().map(|(s, e)| [*s, *e]))
    }
}

impl<'de> serde::Deserialize<'de> for ExtentSet {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let pairs = <Vec<[u64; 2]>>::deserialize(de)?;
        ExtentSet::try_from_ranges(pairs.into_iter().map(|[s, e]| s..e))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn ranges(s: &ExtentSet) -> Vec<(u64, u64)> {
        s.iter().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn insert_coalesces_overlapping_and_adjacent() {
        let mut s = ExtentSet::new();
        s.insert(10..20);
        s.insert(30..40);
        assert_eq!(ranges(&s), vec![(10, 20), (30, 40)]);
        s.insert(20..25); // adjacent to the first
        assert_eq!(ranges(&s), vec![(10, 25), (30, 40)]);
        s.insert(25..30); // bridges both
        assert_eq!(ranges(&s), vec![(10, 40)]);
        assert_eq!(s.count_blocks(), 30);
        s.insert(0..100); // swallows everything
        assert_eq!(ranges(&s), vec![(0, 100)]);
        assert_eq!(s.count_blocks(), 100);
        s.insert(5..5); // empty: no-op
        #[allow(clippy::reversed_empty_ranges)]
        s.insert(50..7); // reversed: no-op
        assert_eq!(ranges(&s), vec![(0, 100)]);
    }

    #[test]
    fn remove_splits_and_trims() {
        let mut s = ExtentSet::from_range(0..100);
        s.remove(10..20);
        assert_eq!(ranges(&s), vec![(0, 10), (20, 100)]);
        s.remove(5..25);
        assert_eq!(ranges(&s), vec![(0, 5), (25, 100)]);
        s.remove(0..1);
        assert_eq!(ranges(&s), vec![(1, 5), (25, 100)]);
        s.remove(99..1000);
        assert_eq!(ranges(&s), vec![(1, 5), (25, 99)]);
        assert_eq!(s.count_blocks(), 4 + 74);
        s.remove(3..30);
        assert_eq!(ranges(&s), vec![(1, 3), (30, 99)]);
        s.remove(0..u64::MAX);
        assert!(s.is_empty());
        assert_eq!(s.count_blocks(), 0);
    }

    #[test]
    fn truncate_drops_tail() {
        let mut s: ExtentSet = [0..4, 8..12, 20..30].into_iter().collect();
        s.truncate(10);
        assert_eq!(ranges(&s), vec![(0, 4), (8, 10)]);
        s.truncate(0);
        assert!(s.is_empty());
    }

    #[test]
    fn contains_and_ranges() {
        let s: ExtentSet = [2..5, 9..10].into_iter().collect();
        let members: Vec<u64> = (0..12).filter(|b| s.contains(*b)).collect();
        assert_eq!(members, vec![2, 3, 4, 9]);
        assert!(s.contains_range(2..5));
        assert!(!s.contains_range(2..6));
        assert!(s.contains_range(7..7));
        assert!(s.overlaps(4..9));
        assert!(!s.overlaps(5..9));
        assert_eq!(s.end(), 10);
        assert_eq!(s.intersection(3..20).collect::<Vec<_>>(), vec![3..5, 9..10]);
        assert_eq!(s.gaps(0..12), vec![0..2, 5..9, 10..12]);
        assert_eq!(s.gaps(3..4), Vec::<Range<u64>>::new());
    }

    #[test]
    fn huge_sequential_write_is_one_extent() {
        // 1 GiB of 4 KiB blocks written 128 KiB at a time: still one extent.
        let mut s = ExtentSet::new();
        let per_write = 32;
        for i in 0..(262_144 / per_write) {
            s.insert(i * per_write..(i + 1) * per_write);
        }
        assert_eq!(s.extent_count(), 1);
        assert_eq!(s.count_blocks(), 262_144);
        assert_eq!(s.len_bytes(4096), 1 << 30);
        // And a range near u64::MAX neither overflows nor misbehaves.
        s.insert(u64::MAX - 3..u64::MAX);
        assert_eq!(s.extent_count(), 2);
        assert!(s.contains(u64::MAX - 1));
        assert_eq!(s.len_bytes(u64::MAX), u64::MAX);
    }

    #[test]
    fn union_and_subtract() {
        let a: ExtentSet = [0..4, 10..12].into_iter().collect();
        let b: ExtentSet = [4..6, 11..20, 30..31].into_iter().collect();
        let u = a.union(&b);
        assert_eq!(ranges(&u), vec![(0, 6), (10, 20), (30, 31)]);
        assert_eq!(u, b.union(&a));
        let mut d = u.clone();
        d.subtract(&b);
        assert_eq!(ranges(&d), vec![(0, 4), (10, 11)]);
    }

    #[test]
    fn blocks_of_bytes_rounds_outward() {
        assert_eq!(blocks_of_bytes(0, 0, 4096), 0..0);
        assert_eq!(blocks_of_bytes(0, 1, 4096), 0..1);
        assert_eq!(blocks_of_bytes(4095, 2, 4096), 0..2);
        assert_eq!(blocks_of_bytes(4096, 4096, 4096), 1..2);
        assert_eq!(
            blocks_of_bytes(u64::MAX - 1, 10, 4096).end,
            u64::MAX.div_ceil(4096)
        );
    }

    #[test]
    fn try_from_ranges_rejects_non_canonical() {
        assert!(ExtentSet::try_from_ranges([0..2, 3..4]).is_ok());
        assert_eq!(
            ExtentSet::try_from_ranges([0..2, 2..4]),
            Err(ExtentError::NotCanonical {
                index: 1,
                start: 2,
                prev_end: 2
            })
        );
        assert!(matches!(
            ExtentSet::try_from_ranges([3..4, 0..1]),
            Err(ExtentError::NotCanonical { .. })
        ));
        assert!(matches!(
            ExtentSet::try_from_ranges(std::iter::once(3..3)),
            Err(ExtentError::Empty { .. })
        ));
    }

    #[test]
    fn serde_roundtrip_and_rejects_overlap() {
        let s: ExtentSet = [1..3, 7..9].into_iter().collect();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, "[[1,3],[7,9]]");
        assert_eq!(serde_json::from_str::<ExtentSet>(&j).unwrap(), s);
        assert!(serde_json::from_str::<ExtentSet>("[[1,3],[2,9]]").is_err());
        assert!(serde_json::from_str::<ExtentSet>("[[5,5]]").is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(u64, u64),
        Truncate(u64),
        Union(Vec<(u64, u64)>),
        Subtract(Vec<(u64, u64)>),
    }

    fn range_strategy() -> impl Strategy<Value = (u64, u64)> {
        (0u64..200, 0u64..40).prop_map(|(s, l)| (s, s + l))
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => range_strategy().prop_map(|(s, e)| Op::Insert(s, e)),
            3 => range_strategy().prop_map(|(s, e)| Op::Remove(s, e)),
            1 => (0u64..240).prop_map(Op::Truncate),
            1 => proptest::collection::vec(range_strategy(), 0..5).prop_map(Op::Union),
            1 => proptest::collection::vec(range_strategy(), 0..5).prop_map(Op::Subtract),
        ]
    }

    fn model_of(pairs: &[(u64, u64)]) -> BTreeSet<u64> {
        pairs.iter().flat_map(|(s, e)| *s..*e).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn matches_btreeset_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
            let mut set = ExtentSet::new();
            let mut model = BTreeSet::<u64>::new();
            for op in ops {
                match op {
                    Op::Insert(s, e) => { set.insert(s..e); model.extend(s..e); }
                    Op::Remove(s, e) => { set.remove(s..e); for b in s..e { model.remove(&b); } }
                    Op::Truncate(n) => { set.truncate(n); model.retain(|b| *b < n); }
                    Op::Union(v) => {
                        let other: ExtentSet = v.iter().map(|(s, e)| *s..*e).collect();
                        set = set.union(&other);
                        model.extend(model_of(&v));
                    }
                    Op::Subtract(v) => {
                        let other: ExtentSet = v.iter().map(|(s, e)| *s..*e).collect();
                        set.subtract(&other);
                        for b in model_of(&v) { model.remove(&b); }
                    }
                }
                prop_assert!(set.check_invariants().is_ok(), "{:?}", set);
                prop_assert_eq!(set.count_blocks(), model.len() as u64);
                let listed: Vec<u64> = set.blocks().collect();
                let expected: Vec<u64> = model.iter().copied().collect();
                prop_assert_eq!(listed, expected);
            }
            for b in 0..260 {
                prop_assert_eq!(set.contains(b), model.contains(&b), "block {}", b);
            }
            // Range queries against the model.
            for (s, e) in [(0u64, 10u64), (5, 120), (100, 260), (37, 38)] {
                let inter: Vec<u64> = set.intersection(s..e).flatten().collect();
                let want: Vec<u64> = model.range(s..e).copied().collect();
                prop_assert_eq!(&inter, &want);
                let gaps: Vec<u64> = set.gaps(s..e).into_iter().flatten().collect();
                let want_gaps: Vec<u64> = (s..e).filter(|b| !model.contains(b)).collect();
                prop_assert_eq!(gaps, want_gaps);
                prop_assert_eq!(set.contains_range(s..e), (s..e).all(|b| model.contains(&b)));
                prop_assert_eq!(set.overlaps(s..e), !want.is_empty());
            }
            prop_assert_eq!(set.end(), model.last().map_or(0, |b| b + 1));
        }
    }
}

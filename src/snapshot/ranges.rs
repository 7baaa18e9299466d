//! [`RangeSet`]: a set of `u64` (block numbers) kept as coalesced half-open
//! ranges.
//!
//! Invariant of the map `start -> end`: every range is non-empty
//! (`start < end`), and ranges are disjoint and non-adjacent (for consecutive
//! ranges `a`, `b`: `a.end < b.start`). Every operation keeps it, so two sets
//! holding the same elements have the same map and compare equal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A set of `u64` stored as disjoint, non-adjacent half-open ranges.
///
/// Serialized as a sorted `Vec<(u64, u64)>` of `[start, end)` pairs; when
/// deserializing, any list is accepted and normalized (empty ranges dropped,
/// overlapping or adjacent ones merged).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(u64, u64)>", into = "Vec<(u64, u64)>")]
pub struct RangeSet {
    /// `start -> end` (exclusive); see the module doc for the invariant.
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a set from any list of `[start, end)` ranges (unsorted,
    /// overlapping and empty ranges allowed).
    pub fn from_ranges(ranges: &[(u64, u64)]) -> Self {
        let mut sorted: Vec<(u64, u64)> = ranges.iter().copied().filter(|(s, e)| s < e).collect();
        if !sorted.is_sorted_by_key(|r| r.0) {
            sorted.sort_unstable_by_key(|r| r.0);
        }
        Self::from_sorted(sorted)
    }

    /// Builds the map from non-empty ranges sorted by start, merging
    /// overlapping and adjacent ones, in linear time (the map is built in
    /// bulk: a changed-block bitmap can give a million ranges, taken while
    /// writers are frozen).
    fn from_sorted(sorted: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in sorted {
            match merged.last_mut() {
                Some((_, last)) if s <= *last => *last = (*last).max(e),
                _ => merged.push((s, e)),
            }
        }
        RangeSet {
            map: merged.into_iter().collect(),
        }
    }

    /// The ranges in ascending order.
    pub fn to_vec(&self) -> Vec<(u64, u64)> {
        self.iter().collect()
    }

    /// The ranges `[start, end)` in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of elements (not of ranges).
    ///
    /// Cannot overflow: elements are below `u64::MAX` (ends are exclusive), so
    /// there are at most `u64::MAX` of them.
    pub fn len(&self) -> u64 {
        self.map.iter().map(|(&s, &e)| e - s).sum()
    }

    /// Number of ranges.
    pub fn range_count(&self) -> usize {
        self.map.len()
    }

    /// The lowest range.
    pub fn first(&self) -> Option<(u64, u64)> {
        self.map.first_key_value().map(|(&s, &e)| (s, e))
    }

    pub fn contains(&self, x: u64) -> bool {
        self.map
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &e)| x < e)
    }

    /// Adds `[start, end)`; nothing if `start >= end`.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut new_start, mut new_end) = (start, end);
        // A range starting at or before `start` that reaches it (overlap or
        // adjacency) is absorbed.
        if let Some((&s, &e)) = self.map.range(..=start).next_back()
            && e >= start
        {
            new_start = s;
            new_end = new_end.max(e);
            self.map.remove(&s);
        }
        // Then every range starting inside or right after the growing range.
        while let Some((&s, &e)) = self.map.range(new_start..).next() {
            if s > new_end {
                break;
            }
            new_end = new_end.max(e);
            self.map.remove(&s);
        }
        self.map.insert(new_start, new_end);
    }

    /// Removes `[start, end)`; nothing if `start >= end`.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // A range starting before `start` and reaching into it is cut, and
        // split if it also extends past `end`.
        if let Some((&s, &e)) = self.map.range(..start).next_back()
            && e > start
        {
            self.map.insert(s, start);
            if e > end {
                self.map.insert(end, e);
                return;
            }
        }
        // Ranges starting inside `[start, end)`: dropped, keeping any tail
        // past `end` (only the last one can have one).
        while let Some((&s, &e)) = self.map.range(start..end).next() {
            self.map.remove(&s);
            if e > end {
                self.map.insert(end, e);
                break;
            }
        }
    }

    /// The parts of the set inside `[start, end)`, in ascending order.
    pub fn intersect(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        if let Some((_, &e)) = self.map.range(..start).next_back()
            && e > start
        {
            out.push((start, e.min(end)));
        }
        for (&s, &e) in self.map.range(start..end) {
            out.push((s, e.min(end)));
        }
        out
    }

    /// Adds every element of `other`.
    pub fn union_with(&mut self, other: &RangeSet) {
        // A few ranges go in one by one; more, by one linear merge.
        if other.map.len() * 8 < self.map.len() {
            for (s, e) in other.iter() {
                self.insert(s, e);
            }
            return;
        }
        let mine = std::mem::take(&mut self.map);
        let mut a = mine.into_iter().peekable();
        let mut b = other.iter().peekable();
        let mut both = Vec::with_capacity(a.len() + other.map.len());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.0 <= y.0 => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, _) => b.next(),
            };
            match next {
                Some(r) => both.push(r),
                None => break,
            }
        }
        *self = Self::from_sorted(both);
    }

    /// Drops every element `>= end`.
    pub fn clip(&mut self, end: u64) {
        // The range containing `end`, if any, is cut at `end`.
        if let Some((&s, &e)) = self.map.range(..end).next_back()
            && e > end
        {
            self.map.insert(s, end);
        }
        // Then every range starting at or after `end` goes.
        drop(self.map.split_off(&end));
    }
}

impl From<Vec<(u64, u64)>> for RangeSet {
    fn from(ranges: Vec<(u64, u64)>) -> Self {
        Self::from_ranges(&ranges)
    }
}

impl From<RangeSet> for Vec<(u64, u64)> {
    fn from(set: RangeSet) -> Self {
        set.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// The invariant of the module doc.
    fn check_invariant(set: &RangeSet) {
        let v = set.to_vec();
        for &(s, e) in &v {
            assert!(s < e, "empty range in {v:?}");
        }
        for w in v.windows(2) {
            assert!(w[0].1 < w[1].0, "overlapping or adjacent ranges in {v:?}");
        }
    }

    #[test]
    fn insert_coalesces() {
        let mut s = RangeSet::new();
        assert!(s.is_empty());
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(s.to_vec(), vec![(10, 20), (30, 40)]);
        s.insert(20, 30); // adjacent on both sides
        assert_eq!(s.to_vec(), vec![(10, 40)]);
        s.insert(5, 5); // empty
        s.insert(7, 3); // reversed: empty
        assert_eq!(s.to_vec(), vec![(10, 40)]);
        s.insert(0, 100);
        assert_eq!(s.to_vec(), vec![(0, 100)]);
        assert_eq!(s.len(), 100);
        check_invariant(&s);
    }

    #[test]
    fn remove_splits() {
        let mut s = RangeSet::from_ranges(&[(0, 100)]);
        s.remove(10, 20);
        assert_eq!(s.to_vec(), vec![(0, 10), (20, 100)]);
        s.remove(5, 25);
        assert_eq!(s.to_vec(), vec![(0, 5), (25, 100)]);
        s.remove(90, 200);
        assert_eq!(s.to_vec(), vec![(0, 5), (25, 90)]);
        s.remove(0, 5);
        assert_eq!(s.to_vec(), vec![(25, 90)]);
        s.remove(0, u64::MAX);
        assert!(s.is_empty());
    }

    #[test]
    fn queries() {
        let s = RangeSet::from_ranges(&[(30, 40), (10, 20), (15, 25)]);
        assert_eq!(s.to_vec(), vec![(10, 25), (30, 40)]);
        assert!(!s.contains(9));
        assert!(s.contains(10));
        assert!(s.contains(24));
        assert!(!s.contains(25));
        assert!(s.contains(39));
        assert!(!s.contains(40));
        assert_eq!(s.first(), Some((10, 25)));
        assert_eq!(s.len(), 25);
        assert_eq!(s.range_count(), 2);
        assert_eq!(s.intersect(12, 35), vec![(12, 25), (30, 35)]);
        assert_eq!(s.intersect(25, 30), vec![]);
        assert_eq!(s.intersect(0, 100), vec![(10, 25), (30, 40)]);
        assert_eq!(s.intersect(35, 35), vec![]);
        assert_eq!(RangeSet::new().first(), None);
    }

    #[test]
    fn extremes() {
        let mut s = RangeSet::new();
        s.insert(0, u64::MAX);
        assert_eq!(s.len(), u64::MAX);
        assert!(s.contains(u64::MAX - 1));
        assert!(!s.contains(u64::MAX));
        s.remove(1, u64::MAX - 1);
        assert_eq!(s.to_vec(), vec![(0, 1), (u64::MAX - 1, u64::MAX)]);
        s.clip(u64::MAX - 1);
        assert_eq!(s.to_vec(), vec![(0, 1)]);
    }

    #[test]
    fn clip_and_union() {
        let mut s = RangeSet::from_ranges(&[(0, 10), (20, 30), (40, 50)]);
        s.clip(25);
        assert_eq!(s.to_vec(), vec![(0, 10), (20, 25)]);
        s.clip(20);
        assert_eq!(s.to_vec(), vec![(0, 10)]);
        s.clip(0);
        assert!(s.is_empty());

        let mut a = RangeSet::from_ranges(&[(0, 10), (20, 30)]);
        let b = RangeSet::from_ranges(&[(10, 20), (40, 50)]);
        a.union_with(&b);
        assert_eq!(a.to_vec(), vec![(0, 30), (40, 50)]);
    }

    #[test]
    fn serde_as_pairs() {
        let s = RangeSet::from_ranges(&[(1, 3), (5, 8)]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "[[1,3],[5,8]]");
        let back: RangeSet = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // Unnormalized input is normalized.
        let messy: RangeSet = serde_json::from_str("[[5,8],[2,2],[1,5],[9,9]]").unwrap();
        assert_eq!(messy.to_vec(), vec![(1, 8)]);
        check_invariant(&messy);
    }

    const UNIVERSE: u64 = 48;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        Remove(u64, u64),
        Clip(u64),
        Union(Vec<(u64, u64)>),
    }

    fn range() -> impl Strategy<Value = (u64, u64)> {
        (0..=UNIVERSE, 0..=UNIVERSE)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => range().prop_map(|(a, b)| Op::Insert(a, b)),
            3 => range().prop_map(|(a, b)| Op::Remove(a, b)),
            1 => (0..=UNIVERSE + 1).prop_map(Op::Clip),
            1 => prop::collection::vec(range(), 0..4).prop_map(Op::Union),
        ]
    }

    fn model_ranges(m: &BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &x in m {
            match out.last_mut() {
                Some(last) if last.1 == x => last.1 = x + 1,
                _ => out.push((x, x + 1)),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_btreeset_model(ops in prop::collection::vec(op(), 0..40),
                                  probe in range()) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(a, b) => {
                        set.insert(a, b);
                        model.extend(a..b);
                    }
                    Op::Remove(a, b) => {
                        set.remove(a, b);
                        for x in a..b {
                            model.remove(&x);
                        }
                    }
                    Op::Clip(end) => {
                        set.clip(end);
                        model.retain(|&x| x < end);
                    }
                    Op::Union(ranges) => {
                        let other = RangeSet::from_ranges(&ranges);
                        set.union_with(&other);
                        for (a, b) in ranges {
                            model.extend(a..b);
                        }
                    }
                }
                check_invariant(&set);
                prop_assert_eq!(set.to_vec(), model_ranges(&model));
            }
            prop_assert_eq!(set.len(), model.len() as u64);
            prop_assert_eq!(set.is_empty(), model.is_empty());
            prop_assert_eq!(set.first(), model_ranges(&model).first().copied());
            for x in 0..=UNIVERSE + 1 {
                prop_assert_eq!(set.contains(x), model.contains(&x));
            }
            let (a, b) = probe;
            let inside: BTreeSet<u64> = model.iter().copied().filter(|&x| a <= x && x < b).collect();
            prop_assert_eq!(set.intersect(a, b), model_ranges(&inside));
            let back: RangeSet = serde_json::from_str(&serde_json::to_string(&set).unwrap()).unwrap();
            prop_assert_eq!(back, set);
        }
    }
}

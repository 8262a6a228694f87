//! Broken object-level authorization and enumeration: per (verified caller, operation) — an
//! operation whose template has a parameter — the distinct object IDs asked for within a sliding
//! window, walks through consecutive integer IDs, and the share of 403/404 answers.
//!
//! A caller paging through its own few objects raises nothing; one asking for many distinct
//! objects, walking IDs one by one, or mostly hitting objects it may not see or that do not exist
//! raises one finding, then nothing for that (caller, operation) until a window has passed.
//!
//! Memory is bounded: at most [`Limits::max_keys`] (caller, operation) states; each keeps at most
//! `distinct_ids` ID hashes with their last time (room reserved up front, so a new ID allocates
//! nothing), three redacted examples and a few counters — 13.8 MiB measured for 10,000 states
//! with the defaults (`tests/bola_memory.rs`: 10,000 callers × 100 operations), whatever callers
//! send.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::time::Duration;

/// A multiply-rotate hasher (FxHash's scheme): every map here is bounded, so the cost of a
/// per-call SipHash buys nothing against flooding.
#[derive(Default, Clone, Copy)]
struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl Fx {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type FxBuild = BuildHasherDefault<Fx>;

use serde::Serialize;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub window: Duration,
    /// Distinct IDs within the window that make a finding.
    pub distinct_ids: usize,
    /// Consecutive integer IDs (each one more than the last) that make a finding.
    pub sequential: u32,
    /// Share of 403/404 answers, over at least `min_calls` calls in the window, that makes a
    /// finding.
    pub error_ratio: f64,
    pub min_calls: u32,
    /// (caller, operation) states kept; past it, new ones are not tracked (counted).
    pub max_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            distinct_ids: 50,
            sequential: 20,
            error_ratio: 0.5,
            min_calls: 20,
            max_keys: 10_000,
        }
    }
}

/// What kind of pattern was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Many distinct object IDs.
    Enumeration,
    /// Consecutive integer IDs.
    SequentialWalk,
    /// Mostly 403/404.
    DeniedOrMissing,
}

/// One finding; the caller and operation are the detector's key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub pattern: Pattern,
    pub distinct_ids: usize,
    pub sequential_run: u32,
    pub calls: u32,
    pub denied_or_missing: u32,
    /// A few IDs, redacted (`4…7 (5 chars)`): enough to recognise a pattern, not to reuse one.
    pub examples: Vec<String>,
}

#[derive(Debug, Default)]
struct State {
    /// ID hash → last second seen (within the window).
    ids: HashMap<u64, u64, FxBuild>,
    /// No ID leaves the window before this second (so most calls skip the sweep).
    next_expiry: u64,
    last_int: Option<i64>,
    run: u32,
    window_start: u64,
    calls: u32,
    errors: u32,
    examples: Vec<String>,
    /// No new finding before this second.
    quiet_until: u64,
}

/// `12345` → `1…5 (5 chars)`.
pub fn redact(id: &str) -> String {
    let mut chars = id.chars();
    let (first, last) = (chars.next(), id.chars().last());
    let n = id.chars().count();
    match (first, last) {
        (Some(f), Some(l)) if n > 2 => format!("{f}…{l} ({n} chars)"),
        _ => format!("… ({n} chars)"),
    }
}

/// The detector over keys of type `K` (the inventory uses its own interned, `Copy` ids).
#[derive(Debug)]
pub struct Detector<K> {
    limits: Limits,
    states: HashMap<K, State, FxBuild>,
    /// Seeded per detector, so IDs' hashes are not predictable from outside.
    seed: u64,
    last_sweep: u64,
    /// Observations not tracked because `max_keys` was reached.
    pub untracked: u64,
}

impl<K: Hash + Eq + Copy> Detector<K> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            states: HashMap::default(),
            seed: std::collections::hash_map::RandomState::new().hash_one(0u8),
            last_sweep: u64::MAX,
            untracked: 0,
        }
    }

    /// One call for `key` asking for object `id`, answered `status`, at `now` (seconds).
    pub fn observe(&mut self, key: K, id: &str, status: u16, now: u64) -> Option<Finding> {
        let l = self.limits;
        let window = l.window.as_secs().max(1);
        if self.states.len() >= l.max_keys && !self.states.contains_key(&key) {
            // Make room from states idle for a window (a sweep at most once a second);
            // otherwise leave this key untracked.
            if now != self.last_sweep {
                self.last_sweep = now;
                self.states.retain(|_, s| {
                    now.saturating_sub(s.window_start) < window
                        || s.ids.values().any(|t| now.saturating_sub(*t) < window)
                });
            }
            if self.states.len() >= l.max_keys {
                self.untracked += 1;
                return None;
            }
        }
        let hash = {
            let mut h = Fx(self.seed);
            h.write(id.as_bytes());
            h.finish()
        };
        // The ID set's room is reserved once, so a new ID on a known state allocates nothing.
        let s = self.states.entry(key).or_insert_with(|| State {
            ids: HashMap::with_capacity_and_hasher(l.distinct_ids, FxBuild::default()),
            examples: Vec::with_capacity(3),
            ..Default::default()
        });
        if now.saturating_sub(s.window_start) >= window {
            s.window_start = now;
            s.calls = 0;
            s.errors = 0;
        }
        s.calls += 1;
        if matches!(status, 403 | 404) {
            s.errors += 1;
        }
        if now >= s.next_expiry {
            s.ids.retain(|_, t| now.saturating_sub(*t) < window);
            s.next_expiry = s.ids.values().min().map_or(u64::MAX, |t| t + window);
        }
        let room = s.ids.len() < l.distinct_ids;
        let new_id = match s.ids.entry(hash) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                *o.get_mut() = now;
                false
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                if room {
                    v.insert(now);
                    s.next_expiry = s.next_expiry.min(now + window);
                }
                true
            }
        };
        match id.parse::<i64>() {
            Ok(n) => {
                s.run = match s.last_int {
                    Some(last) if n == last.wrapping_add(1) => s.run + 1,
                    Some(last) if n == last => s.run,
                    _ => 1,
                };
                s.last_int = Some(n);
            }
            Err(_) => {
                s.run = 0;
                s.last_int = None;
            }
        }
        // Only a new ID is redacted (a known one allocates nothing).
        if new_id && s.examples.len() < 3 {
            let r = redact(id);
            if !s.examples.contains(&r) {
                s.examples.push(r);
            }
        }
        let pattern = if s.ids.len() >= l.distinct_ids {
            Pattern::Enumeration
        } else if s.run >= l.sequential {
            Pattern::SequentialWalk
        } else if s.calls >= l.min_calls
            && f64::from(s.errors) >= l.error_ratio * f64::from(s.calls)
        {
            Pattern::DeniedOrMissing
        } else {
            return None;
        };
        if now < s.quiet_until {
            return None;
        }
        s.quiet_until = now + window;
        Some(Finding {
            pattern,
            distinct_ids: s.ids.len(),
            sequential_run: s.run,
            calls: s.calls,
            denied_or_missing: s.errors,
            examples: s.examples.clone(),
        })
    }

    pub fn tracked(&self) -> usize {
        self.states.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector() -> Detector<(u32, u32)> {
        Detector::new(Limits {
            distinct_ids: 10,
            sequential: 5,
            min_calls: 8,
            max_keys: 3,
            ..Default::default()
        })
    }

    #[test]
    fn a_client_paging_its_own_objects_raises_nothing() {
        let mut d = detector();
        for round in 0..20 {
            for id in ["17", "42", "4711"] {
                assert_eq!(d.observe((1, 1), id, 200, round), None);
            }
        }
    }

    #[test]
    fn a_sequential_walk_is_found_once_per_window() {
        let mut d = detector();
        let found: Vec<Finding> = (100..140)
            .filter_map(|i| d.observe((1, 1), &i.to_string(), 200, 5))
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pattern, Pattern::SequentialWalk);
        assert_eq!(found[0].sequential_run, 5);
        assert_eq!(
            found[0].examples,
            vec!["1…0 (3 chars)", "1…1 (3 chars)", "1…2 (3 chars)"]
        );
        // A window later it is found again.
        assert!(
            (140..146)
                .filter_map(|i| d.observe((1, 1), &i.to_string(), 200, 70))
                .count()
                == 1
        );
    }

    #[test]
    fn many_distinct_ids_and_mostly_missing_objects() {
        let mut d = detector();
        let ids = [
            "a9", "zz1", "q7", "k2", "m5", "x3", "p0", "r8", "t6", "w4", "y2",
        ];
        let f: Vec<Finding> = ids
            .iter()
            .filter_map(|id| d.observe((2, 1), id, 200, 1))
            .collect();
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].pattern, f[0].distinct_ids),
            (Pattern::Enumeration, 10)
        );
        // 403/404 for most of 8 calls on few objects.
        let f: Vec<Finding> = (0..8)
            .filter_map(|i| d.observe((3, 1), ["a", "b"][i % 2], if i < 5 { 404 } else { 200 }, 1))
            .collect();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].pattern, Pattern::DeniedOrMissing);
        assert_eq!((f[0].calls, f[0].denied_or_missing), (8, 5));
        // Old IDs leave the sliding window.
        let mut d = detector();
        for (t, id) in ids.iter().enumerate() {
            assert_eq!(
                d.observe((1, 1), id, 200, t as u64 * 10),
                None,
                "at most 6 in any 60 s"
            );
        }
    }

    #[test]
    fn states_are_bounded() {
        let mut d = detector();
        for k in 0..10 {
            d.observe((k, 0), "1", 200, 1);
        }
        assert_eq!(d.tracked(), 3);
        assert_eq!(d.untracked, 7);
        // Idle states make room a window later.
        d.observe((99, 0), "1", 200, 200);
        assert_eq!(d.tracked(), 1);
    }
}

//! The sharded digest → slot table under the auth cache: each shard a lock, an index of
//! 4-byte positions and a dense array of `(digest, slot)` entries.
//!
//! Owns the storage layout and its locking; what a slot means and when it may be
//! written is `cache`'s. Why not a `DashMap<KeyDigest, Slot>`: its buckets hold the
//! 32-byte digest and the slot in place, and hashbrown keeps between 44% and 87% of its
//! buckets full, so at an unlucky count (a million keys is one) every byte of a slot
//! costs more than two. Here the half-empty part is the index, at 4 bytes a bucket; the
//! entries are packed, and a freed entry is reused by the next insert. A lookup still
//! takes one shard lock and one hash; it reads the index, then the entry.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::HashTable;

use crate::keys::KeyDigest;

/// A power of two. Enough that writers (loads, invalidations) rarely meet readers on
/// the same lock; each shard costs a few hundred bytes when empty.
const SHARDS: usize = 64;
/// Where the shard number comes from in the hash: clear of the low bits hashbrown
/// indexes its buckets with and the top 7 it keeps as tags, so neither loses spread.
const SHARD_SHIFT: u32 = 40;

struct Shard<V> {
    /// Positions in `entries`, hashed by their digest.
    index: HashTable<u32>,
    entries: Vec<(KeyDigest, V)>,
    /// Positions of removed entries, reused before `entries` grows.
    free: Vec<u32>,
}

impl<V> Default for Shard<V> {
    fn default() -> Self {
        Shard {
            index: HashTable::new(),
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

pub(super) struct Table<V> {
    shards: Box<[RwLock<Shard<V>>]>,
    hasher: DigestHasher,
}

/// Hashes a digest with a keyed multiply-fold of its four words (foldhash's mixing).
/// Why not SipHash: the input is already a SHA-256 output, so there is nothing left to
/// scramble but the table position, and on a hit SipHash was the largest single cost
/// after the lock. Why keyed: requests choose digests (by grinding keys), so with a
/// fixed function a flood of unknown keys could be aimed at one probe sequence; with
/// per-process random keys nobody outside can tell which digests collide.
struct DigestHasher([u64; 6]);

impl DigestHasher {
    fn new() -> Self {
        let seed = RandomState::new();
        let mut k = [0u64; 6];
        for (i, k) in (0u64..).zip(k.iter_mut()) {
            *k = seed.hash_one(i);
        }
        DigestHasher(k)
    }

    fn hash_one(&self, digest: &KeyDigest) -> u64 {
        let mut w = [0u64; 4];
        for (w, c) in w.iter_mut().zip(digest.as_bytes().chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            *w = u64::from_le_bytes(b);
        }
        let k = &self.0;
        let a = fold(w[0] ^ k[0], w[1] ^ k[1]);
        let b = fold(w[2] ^ k[2], w[3] ^ k[3]);
        fold(a ^ k[4], b ^ k[5])
    }
}

/// The 128-bit product's halves XORed: every input bit reaches the middle and, through
/// the high half, the low bits.
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

impl<V> Table<V> {
    pub(super) fn new() -> Self {
        Table {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            hasher: DigestHasher::new(),
        }
    }

    fn hash(&self, digest: &KeyDigest) -> u64 {
        self.hasher.hash_one(digest)
    }

    fn shard(&self, hash: u64) -> &RwLock<Shard<V>> {
        let i = (hash >> SHARD_SHIFT) as usize & (SHARDS - 1);
        &self.shards[i]
    }

    // The critical sections below cannot leave a shard half-updated on a panic (the
    // only panics possible are allocation failures), so a poisoned lock is still sound.
    fn read(lock: &RwLock<Shard<V>>) -> RwLockReadGuard<'_, Shard<V>> {
        lock.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(lock: &RwLock<Shard<V>>) -> RwLockWriteGuard<'_, Shard<V>> {
        lock.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the digest's value under its shard's read lock.
    pub(super) fn read_with<R>(&self, digest: &KeyDigest, f: impl FnOnce(Option<&V>) -> R) -> R {
        let hash = self.hash(digest);
        let shard = Self::read(self.shard(hash));
        let found = shard
            .index
            .find(hash, |&i| {
                shard.entries.get(i as usize).is_some_and(|(d, _)| d == digest)
            })
            .and_then(|&i| shard.entries.get(i as usize))
            .map(|(_, v)| v);
        f(found)
    }

    /// Under the digest's shard write lock, `decide` sees the current value and returns
    /// the one to store, or `None` to leave the shard as it is.
    pub(super) fn upsert_with(&self, digest: KeyDigest, decide: impl FnOnce(Option<&V>) -> Option<V>) {
        let hash = self.hash(&digest);
        let mut guard = Self::write(self.shard(hash));
        let shard = &mut *guard;
        let at = shard
            .index
            .find(hash, |&i| {
                shard.entries.get(i as usize).is_some_and(|(d, _)| *d == digest)
            })
            .copied();
        let current = at.and_then(|i| shard.entries.get(i as usize)).map(|(_, v)| v);
        let Some(value) = decide(current) else {
            return;
        };
        if let Some(slot) = at.and_then(|i| shard.entries.get_mut(i as usize)) {
            slot.1 = value;
            return;
        }
        let pos = match shard.free.pop() {
            Some(pos) => match shard.entries.get_mut(pos as usize) {
                Some(slot) => {
                    *slot = (digest, value);
                    pos
                }
                None => return,
            },
            None => {
                // More than 4 billion entries in one shard cannot be reached (memory runs
                // out first); if it were, the value is not stored, as if a newer write won.
                let Ok(pos) = u32::try_from(shard.entries.len()) else {
                    return;
                };
                shard.entries.push((digest, value));
                pos
            }
        };
        let (hasher, entries) = (&self.hasher, &shard.entries);
        shard.index.insert_unique(hash, pos, |&i| {
            entries.get(i as usize).map_or(0, |(d, _)| hasher.hash_one(d))
        });
    }

    /// Keeps the values `keep` returns true for, shard by shard, each under its write
    /// lock; `keep` may change the values it keeps.
    pub(super) fn retain(&self, mut keep: impl FnMut(&mut V) -> bool) {
        for lock in self.shards.iter() {
            let mut guard = Self::write(lock);
            let shard = &mut *guard;
            let (entries, free) = (&mut shard.entries, &mut shard.free);
            shard.index.retain(|&mut i| {
                let kept = entries.get_mut(i as usize).is_some_and(|(_, v)| keep(v));
                if !kept {
                    free.push(i);
                }
                kept
            });
        }
    }

    /// Folds over every value, shard by shard under read locks. O(n).
    pub(super) fn fold<A>(&self, init: A, mut f: impl FnMut(A, &V) -> A) -> A {
        let mut acc = init;
        for lock in self.shards.iter() {
            let shard = Self::read(lock);
            for &i in shard.index.iter() {
                if let Some((_, v)) = shard.entries.get(i as usize) {
                    acc = f(acc, v);
                }
            }
        }
        acc
    }

    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|l| Self::read(l).index.len()).sum()
    }

    /// Makes room for `additional` more entries spread over the shards, so a preload of
    /// a known count does not grow (and rehash) each shard step by step.
    pub(super) fn reserve(&self, additional: usize) {
        // Hashing spreads digests unevenly across shards; a little headroom avoids one
        // last doubling in the fullest ones.
        let per_shard = additional / SHARDS + additional / SHARDS / 16 + 16;
        for lock in self.shards.iter() {
            let mut guard = Self::write(lock);
            let shard = &mut *guard;
            let (hasher, entries) = (&self.hasher, &shard.entries);
            shard.index.reserve(per_shard, |&i| {
                entries.get(i as usize).map_or(0, |(d, _)| hasher.hash_one(d))
            });
            shard.entries.reserve(per_shard.saturating_sub(shard.free.len()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u32) -> KeyDigest {
        KeyDigest::of(&format!("key-{i}"))
    }

    #[test]
    fn the_hash_spreads_shards_and_buckets() {
        let h = DigestHasher::new();
        let (mut shards, mut low, mut top) = ([0u32; SHARDS], [0u32; 64], [0u32; 128]);
        let n = 64_000;
        for i in 0..n {
            let x = h.hash_one(&digest(i));
            shards[(x >> SHARD_SHIFT) as usize & (SHARDS - 1)] += 1;
            low[(x & 63) as usize] += 1;
            top[(x >> 57) as usize] += 1;
        }
        // About 1,000 in each of 64 (500 in each of 128); far from what a skewed hash gives.
        for counts in [&shards[..], &low[..]] {
            assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
        }
        assert!(top.iter().all(|&c| (380..620).contains(&c)), "{top:?}");
    }

    #[test]
    fn insert_replace_remove_reuse() {
        let t: Table<u32> = Table::new();
        for i in 0..1000 {
            t.upsert_with(digest(i), |old| {
                assert!(old.is_none());
                Some(i)
            });
        }
        assert_eq!(t.len(), 1000);
        t.upsert_with(digest(7), |old| old.map(|v| v + 1000));
        t.upsert_with(digest(8), |_| None);
        assert_eq!(t.read_with(&digest(7), |v| v.copied()), Some(1007));
        assert_eq!(t.read_with(&digest(8), |v| v.copied()), Some(8));
        assert_eq!(t.read_with(&digest(5000), |v| v.copied()), None);
        t.retain(|v| *v % 2 == 1);
        assert_eq!(t.len(), 500);
        assert_eq!(t.read_with(&digest(2), |v| v.copied()), None);
        let entries_before: usize = t.shards.iter().map(|s| Table::read(s).entries.len()).sum();
        for i in 0..500 {
            t.upsert_with(digest(10_000 + i), |_| Some(i));
        }
        let entries_after: usize = t.shards.iter().map(|s| Table::read(s).entries.len()).sum();
        assert!(entries_after < entries_before + 500, "freed entries are reused");
        assert_eq!(t.len(), 1000);
        assert_eq!(t.fold(0u64, |n, v| n + u64::from(*v % 2)), 500 + 250);
        t.reserve(10_000);
        assert_eq!(t.read_with(&digest(9), |v| v.copied()), Some(9));
    }
}

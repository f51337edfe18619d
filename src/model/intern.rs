//! The process-wide interner for the parts of an [`AuthRecord`](super::AuthRecord) that
//! many keys share: the key prefix and the scope set (and, for the rare legacy row whose
//! hint does not fit inline, the hint).
//!
//! Owns [`KeyClass`] and its table. Why interning: a million keys usually have a handful
//! of distinct (prefix, scopes) pairs, so one shared copy replaces a million heap
//! strings and vectors (docs/performance.md, section 5). Why `&'static` rather than
//! `Arc`: every cache hit copies the record, and a shared refcount would be written by
//! every request on every core. The price is that a class is never freed; the table
//! grows only with combinations never seen before (operators create them, requests
//! cannot), and a reload that reads the same rows again adds nothing.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, OnceLock, PoisonError};

/// What keys share: the prefix they are shown with, their scopes, and a hint too long to
/// keep inline (`None` for every key keygate issued: their hints are 4 ASCII characters).
#[derive(Debug, PartialEq, Eq)]
pub struct KeyClass {
    pub(super) prefix: Box<str>,
    pub(super) scopes: Box<[Box<str>]>,
    /// The scopes joined with commas, as the identity header carries them: made once per
    /// class so forwarding a request does not join (and allocate) them again.
    pub(super) scopes_joined: Box<str>,
    pub(super) long_hint: Option<Box<str>>,
}

impl KeyClass {
    fn matches<S: AsRef<str>>(&self, prefix: &str, scopes: &[S], long_hint: Option<&str>) -> bool {
        *self.prefix == *prefix
            && self.scopes.len() == scopes.len()
            && self.scopes.iter().zip(scopes).all(|(a, b)| **a == *b.as_ref())
            && self.long_hint.as_deref() == long_hint
    }
}

/// Buckets by content hash; a bucket holds every class with that hash, so a collision
/// only costs a comparison.
type Table = HashMap<u64, Vec<&'static KeyClass>>;

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(Mutex::default)
}

/// The one shared class for these values. Takes a process-wide lock: called when a
/// record is built from a database row, never on the request path.
pub(super) fn intern<S: AsRef<str>>(prefix: &str, scopes: &[S], long_hint: Option<&str>) -> &'static KeyClass {
    // Fixed keys are fine: only operators choose these values, and a collision in a
    // bucket is resolved by comparing content.
    let mut h = DefaultHasher::new();
    prefix.hash(&mut h);
    scopes.len().hash(&mut h);
    for s in scopes {
        s.as_ref().hash(&mut h);
    }
    long_hint.hash(&mut h);
    // A panic while the lock was held cannot leave a bucket half-written: push is the
    // only mutation, so a poisoned table is still sound.
    let mut table = table().lock().unwrap_or_else(PoisonError::into_inner);
    let bucket = table.entry(h.finish()).or_default();
    if let Some(class) = bucket.iter().find(|c| c.matches(prefix, scopes, long_hint)) {
        return class;
    }
    let class: &'static KeyClass = Box::leak(Box::new(KeyClass {
        prefix: prefix.into(),
        scopes: scopes.iter().map(|s| Box::from(s.as_ref())).collect(),
        scopes_joined: scopes.iter().map(AsRef::as_ref).collect::<Vec<&str>>().join(",").into(),
        long_hint: long_hint.map(Box::from),
    }));
    bucket.push(class);
    class
}

/// Distinct classes interned so far, for tests and diagnostics.
pub fn classes() -> usize {
    table()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .map(Vec::len)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_content_shares_one_class() {
        let a = intern("pk_test_", &["chat", "embed"], None);
        let b = intern("pk_test_", &[String::from("chat"), String::from("embed")], None);
        assert!(std::ptr::eq(a, b));
        let c = intern("pk_test_", &["embed", "chat"], None);
        assert!(!std::ptr::eq(a, c), "scope order is kept as stored");
        let d = intern("pk_live_", &["chat", "embed"], None);
        assert!(!std::ptr::eq(a, d));
        let e = intern("pk_test_", &["chat", "embed"], Some("ünïcødé"));
        assert!(!std::ptr::eq(a, e));
        assert_eq!(e.long_hint.as_deref(), Some("ünïcødé"));
        assert_eq!(&*a.scopes_joined, "chat,embed");
        assert_eq!(&*c.scopes_joined, "embed,chat");
        assert!(classes() >= 4);
    }
}

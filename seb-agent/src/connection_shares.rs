//! Connections open at once per key (a caller, a source address): one key holding
//! connections open cannot take every place of a listener anyone may reach.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
};

/// Open connections by key; an entry goes with its key's last connection.
pub struct Shares<K: Eq + Hash + Clone> {
    open: Mutex<HashMap<K, usize>>,
}

/// One open connection of a key, counted until dropped.
pub struct Share<K: Eq + Hash + Clone> {
    shares: Arc<Shares<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Default for Shares<K> {
    fn default() -> Self {
        Self { open: Mutex::new(HashMap::new()) }
    }
}

impl<K: Eq + Hash + Clone> Shares<K> {
    /// A place for one more connection of `key`, unless it has `limit` open.
    pub fn take(self: &Arc<Self>, key: &K, limit: usize) -> Option<Share<K>> {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(key.clone()).or_default();
        if *count >= limit {
            if *count == 0 {
                open.remove(key);
            }
            return None;
        }
        *count += 1;
        Some(Share { shares: self.clone(), key: key.clone() })
    }

    /// Keys with a connection open.
    pub fn keys(&self) -> usize {
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }
}

impl<K: Eq + Hash + Clone> Drop for Share<K> {
    fn drop(&mut self) {
        let mut open = self.shares.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_share_and_entries_go_with_their_connections() {
        let shares = Arc::new(Shares::<&str>::default());
        let held: Vec<_> = (0..2).map(|_| shares.take(&"a", 2).unwrap()).collect();
        assert!(shares.take(&"a", 2).is_none(), "a third of a's");
        let b = shares.take(&"b", 2).expect("another key");
        drop(held);
        drop(b);
        assert_eq!(shares.keys(), 0);
        assert!(shares.take(&"c", 0).is_none());
        assert_eq!(shares.keys(), 0, "a refused key leaves no entry");
    }
}

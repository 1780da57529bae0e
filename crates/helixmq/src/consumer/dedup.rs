//! A bounded, expiring set of settled `(id, attempt)` keys.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub(crate) struct Dedup {
    capacity: usize,
    ttl: Duration,
    seen: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
}

impl Dedup {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        Dedup {
            capacity: capacity.max(1),
            ttl,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((k, at)) = self.order.front() {
            if now.duration_since(*at) > self.ttl || self.order.len() > self.capacity {
                if self.seen.get(k) == Some(at) {
                    self.seen.remove(k);
                }
                self.order.pop_front();
            } else {
                break;
            }
        }
    }

    pub(crate) fn contains(&mut self, key: &str) -> bool {
        self.expire(Instant::now());
        self.seen.contains_key(key)
    }

    pub(crate) fn insert(&mut self, key: String) {
        let now = Instant::now();
        self.seen.insert(key.clone(), now);
        self.order.push_back((key, now));
        self.expire(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_expiring() {
        let mut d = Dedup::new(2, Duration::from_secs(60));
        d.insert("a".into());
        d.insert("b".into());
        d.insert("c".into());
        assert!(!d.contains("a"));
        assert!(d.contains("b") && d.contains("c"));
        let mut d = Dedup::new(10, Duration::from_millis(0));
        d.insert("a".into());
        std::thread::sleep(Duration::from_millis(2));
        assert!(!d.contains("a"));
    }
}

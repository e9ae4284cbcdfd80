//! The read-through cache of code → URL, the hot path of a redirect.
//!
//! Bounded in entries and in age. The age bound (the TTL, 5 s by default) is
//! the staleness bound: a link deleted through *another* web server may
//! still redirect here for at most that long. A delete through *this* server
//! evicts at once. Misses are not cached, so a link created elsewhere is
//! found here as soon as the database has it.

use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct LinkCache {
    entries: moka::future::Cache<String, Arc<str>>,
}

impl LinkCache {
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        LinkCache {
            entries: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    pub async fn get(&self, code: &str) -> Option<Arc<str>> {
        self.entries.get(code).await
    }

    pub async fn put(&self, code: &str, url: &str) {
        self.entries.insert(code.to_string(), Arc::from(url)).await;
    }

    pub async fn evict(&self, code: &str) {
        self.entries.invalidate(code).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_evict_and_expire() {
        let cache = LinkCache::new(100, Duration::from_millis(200));
        cache.put("abc", "https://a/").await;
        assert_eq!(cache.get("abc").await.as_deref(), Some("https://a/"));
        cache.evict("abc").await;
        assert_eq!(cache.get("abc").await, None);
        cache.put("abc", "https://a/").await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(cache.get("abc").await, None, "entry outlived its TTL");
    }
}

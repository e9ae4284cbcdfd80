//! The read-through cache of code → URL, the hot path of a redirect.
//!
//! Bounded in entries and in age. Each entry remembers the database state
//! (log index) it was read at, and a browser whose `scaleout_seen` cookie is
//! newer than that is not served from it: its own delete, through any web
//! server, is never undone by a cache. Another browser may still be
//! redirected to a link deleted elsewhere for up to the TTL (5 s by
//! default) after the read that filled the entry — which, from a lagging
//! replica, may itself come after the delete. Misses are not cached, so a
//! link created elsewhere is found here as soon as the database has it.

use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct LinkCache {
    entries: moka::future::Cache<String, Entry>,
}

/// A cached URL and the log index of the state it was read at (`None`
/// for an unreplicated store, where every read sees every write).
#[derive(Clone)]
struct Entry {
    url: Arc<str>,
    index: Option<u64>,
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

    /// The URL, when the entry is at least as new as `seen` (the state the
    /// browser has already been shown or written).
    pub async fn get(&self, code: &str, seen: Option<u64>) -> Option<Arc<str>> {
        let entry = self.entries.get(code).await?;
        match (seen, entry.index) {
            (Some(seen), Some(index)) if index < seen => None,
            _ => Some(entry.url),
        }
    }

    /// `index`: the state the URL was read at.
    pub async fn put(&self, code: &str, url: &str, index: Option<u64>) {
        let entry = Entry {
            url: Arc::from(url),
            index,
        };
        self.entries.insert(code.to_string(), entry).await;
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
        cache.put("abc", "https://a/", None).await;
        assert_eq!(cache.get("abc", None).await.as_deref(), Some("https://a/"));
        cache.evict("abc").await;
        assert_eq!(cache.get("abc", None).await, None);
        cache.put("abc", "https://a/", None).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(cache.get("abc", None).await, None, "entry outlived its TTL");
    }

    #[tokio::test]
    async fn an_entry_older_than_what_the_browser_has_seen_is_not_served() {
        let cache = LinkCache::new(100, Duration::from_secs(60));
        cache.put("abc", "https://a/", Some(10)).await;
        assert_eq!(cache.get("abc", None).await.as_deref(), Some("https://a/"));
        assert_eq!(
            cache.get("abc", Some(10)).await.as_deref(),
            Some("https://a/")
        );
        assert_eq!(
            cache.get("abc", Some(11)).await,
            None,
            "a browser that deleted the link at index 11 must not be sent to it"
        );
    }
}

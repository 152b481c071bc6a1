//! Busyness counters under real traffic: in-flight requests and distinct recent users (sessions).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counts in-flight requests and recently seen sessions.
#[derive(Debug, Default)]
pub struct Traffic {
    in_flight: AtomicU64,
    sessions: Mutex<HashMap<String, Instant>>,
}

/// Held for the life of one request (including a streamed body); counts it as in flight.
#[derive(Debug)]
pub struct InFlight(Arc<Traffic>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Traffic {
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn saw_session(&self, id: &str) {
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(id.to_string(), Instant::now());
        }
    }

    /// Distinct sessions seen within `window`, forgetting older ones.
    pub fn active_users(&self, window: Duration) -> u64 {
        let Ok(mut s) = self.sessions.lock() else {
            return 0;
        };
        s.retain(|_, seen| seen.elapsed() <= window);
        s.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let t = Arc::new(Traffic::default());
        let a = t.begin();
        let b = t.begin();
        assert_eq!(t.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(t.in_flight(), 0);
        t.saw_session("x");
        t.saw_session("y");
        t.saw_session("x");
        assert_eq!(t.active_users(Duration::from_secs(60)), 2);
        assert_eq!(t.active_users(Duration::ZERO), 0);
    }
}

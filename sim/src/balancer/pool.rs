//! The balancer's servers as plain data (admin state, health, session counts) and the decisions
//! over them: which server takes a request, what a health-check result changes. Pure.

use std::net::SocketAddr;
use std::time::Instant;

/// srv_admin_state bit of HAProxy (SRV_ADMF_FMAINT): forced maintenance.
pub const ADMF_FMAINT: u32 = 0x01;
/// srv_admin_state bit of HAProxy (SRV_ADMF_FDRAIN): forced drain.
pub const ADMF_FDRAIN: u32 = 0x08;

/// What an administrator set through `set server B/S state ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admin {
    /// Takes new requests (when healthy).
    Ready,
    /// No new requests; in-flight ones finish; health checks go on.
    Drain,
    /// No requests and no health checks.
    Maint,
}

impl Admin {
    /// The word `set server ... state` takes.
    pub fn parse(word: &str) -> Option<Admin> {
        match word {
            "ready" => Some(Admin::Ready),
            "drain" => Some(Admin::Drain),
            "maint" => Some(Admin::Maint),
            _ => None,
        }
    }

    /// HAProxy's `srv_admin_state` bits.
    pub fn bits(self) -> u32 {
        match self {
            Admin::Ready => 0,
            Admin::Drain => ADMF_FDRAIN,
            Admin::Maint => ADMF_FMAINT,
        }
    }
}

/// Health as consecutive check results decide it (`check fall F rise R`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Up, after this many consecutive failed checks (fewer than `fall`).
    Up { failures: u32 },
    /// Down, after this many consecutive passed checks (fewer than `rise`).
    Down { successes: u32 },
}

/// `rise` and `fall` of a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
}

impl Health {
    /// At start a server is assumed up, but one failed check takes it down (as HAProxy does).
    pub fn initial(t: Thresholds) -> Health {
        Health::Up {
            failures: t.fall.saturating_sub(1),
        }
    }

    /// Leaving maintenance a server must pass `rise` checks before it gets traffic, so a node
    /// still starting never sees a request.
    pub fn after_maint() -> Health {
        Health::Down { successes: 0 }
    }

    pub fn observe(self, passed: bool, t: Thresholds) -> Health {
        match (self, passed) {
            (Health::Up { .. }, true) => Health::Up { failures: 0 },
            (Health::Up { failures }, false) if failures + 1 >= t.fall => {
                Health::Down { successes: 0 }
            }
            (Health::Up { failures }, false) => Health::Up {
                failures: failures + 1,
            },
            (Health::Down { successes }, true) if successes + 1 >= t.rise => {
                Health::Up { failures: 0 }
            }
            (Health::Down { successes }, true) => Health::Down {
                successes: successes + 1,
            },
            (Health::Down { .. }, false) => Health::Down { successes: 0 },
        }
    }

    pub fn is_up(self) -> bool {
        matches!(self, Health::Up { .. })
    }
}

/// The outcome of the last health check, for the stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastCheck {
    None,
    /// An HTTP answer: passed when 200.
    Status(u16),
    /// No HTTP answer (refused, timed out, cut).
    NoAnswer,
    /// A TCP connect that succeeded (`mode tcp`'s check): passed.
    Connected,
}

/// One server of the backend and its counters.
#[derive(Debug, Clone)]
pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    pub admin: Admin,
    pub health: Health,
    /// Requests assigned to it and not finished (HAProxy's `scur`).
    pub sessions: u64,
    pub max_sessions: u64,
    pub total_sessions: u64,
    pub connect_errors: u64,
    pub retries: u64,
    pub redispatches: u64,
    pub check_failures: u64,
    pub downs: u64,
    pub last_change: Instant,
    pub last_check: LastCheck,
    /// Bumped on every admin change, so a check begun before it does not count after it.
    pub epoch: u64,
}

impl Server {
    pub fn new(name: String, addr: SocketAddr, t: Thresholds, now: Instant) -> Server {
        Server {
            name,
            addr,
            admin: Admin::Ready,
            health: Health::initial(t),
            sessions: 0,
            max_sessions: 0,
            total_sessions: 0,
            connect_errors: 0,
            retries: 0,
            redispatches: 0,
            check_failures: 0,
            downs: 0,
            last_change: now,
            last_check: LastCheck::None,
            epoch: 0,
        }
    }

    /// May take a new request.
    pub fn eligible(&self) -> bool {
        self.admin == Admin::Ready && self.health.is_up()
    }

    /// Up as HAProxy's `srv_op_state` says it: a server in maintenance is stopped.
    pub fn running(&self) -> bool {
        self.admin != Admin::Maint && self.health.is_up()
    }

    /// Applies `set server ... state`; returns whether anything changed.
    pub fn set_admin(&mut self, admin: Admin, now: Instant) -> bool {
        if self.admin == admin {
            return false;
        }
        if self.admin == Admin::Maint {
            self.health = Health::after_maint();
        }
        self.admin = admin;
        self.epoch += 1;
        self.last_change = now;
        true
    }

    /// Applies a health-check result begun at `epoch`; true when the server went up or down.
    pub fn check_result(
        &mut self,
        epoch: u64,
        result: LastCheck,
        t: Thresholds,
        now: Instant,
    ) -> bool {
        if epoch != self.epoch || self.admin == Admin::Maint {
            return false;
        }
        let passed = matches!(result, LastCheck::Status(200) | LastCheck::Connected);
        if !passed {
            self.check_failures += 1;
        }
        self.last_check = result;
        let before = self.health.is_up();
        self.health = self.health.observe(passed, t);
        let changed = before != self.health.is_up();
        if changed {
            self.last_change = now;
            if before {
                self.downs += 1;
            }
        }
        changed
    }
}

/// Round robin: the first eligible server from `cursor` on, preferring one this request has not
/// tried yet (redispatch); None when no server may take it.
pub fn pick(servers: &[Server], cursor: usize, tried: &[usize]) -> Option<usize> {
    let n = servers.len();
    if n == 0 {
        return None;
    }
    let order = || {
        (0..n)
            .map(|k| (cursor + k) % n)
            .filter(|&i| servers[i].eligible())
    };
    order()
        .find(|i| !tried.contains(i))
        .or_else(|| order().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { rise: 2, fall: 2 };

    fn servers(n: usize) -> Vec<Server> {
        let now = Instant::now();
        (0..n)
            .map(|i| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 7991 + i as u16));
                Server::new(format!("node{}", i + 1), addr, T, now)
            })
            .collect()
    }

    #[test]
    fn health_rises_and_falls_on_consecutive_results() {
        let h = Health::initial(T);
        assert!(h.is_up());
        assert!(
            !h.observe(false, T).is_up(),
            "a fresh server falls on one failure"
        );
        let up = Health::Up { failures: 0 };
        assert!(up.observe(false, T).is_up());
        assert!(!up.observe(false, T).observe(false, T).is_up());
        assert!(
            up.observe(false, T)
                .observe(true, T)
                .observe(false, T)
                .is_up()
        );
        let down = Health::after_maint();
        assert!(!down.observe(true, T).is_up());
        assert!(down.observe(true, T).observe(true, T).is_up());
        assert!(
            !down
                .observe(true, T)
                .observe(false, T)
                .observe(true, T)
                .is_up()
        );
        let one = Thresholds { rise: 1, fall: 1 };
        assert!(down.observe(true, one).is_up());
        assert!(!up.observe(false, one).is_up());
    }

    #[test]
    fn pick_round_robins_over_eligible_servers() {
        let mut s = servers(3);
        assert_eq!(pick(&s, 0, &[]), Some(0));
        assert_eq!(pick(&s, 1, &[]), Some(1));
        assert_eq!(pick(&s, 5, &[]), Some(2));
        let now = Instant::now();
        s[1].set_admin(Admin::Drain, now);
        assert_eq!(pick(&s, 1, &[]), Some(2));
        s[2].set_admin(Admin::Maint, now);
        assert_eq!(pick(&s, 1, &[]), Some(0));
        // Redispatch: another server if there is one, else the same again.
        assert_eq!(pick(&s, 0, &[0]), Some(0));
        s[2].set_admin(Admin::Ready, now);
        assert_eq!(pick(&s, 2, &[0]), Some(0), "out of maint needs rise checks");
        s[1].set_admin(Admin::Ready, now);
        assert_eq!(
            pick(&s, 0, &[0]),
            Some(1),
            "out of drain it is healthy at once"
        );
        for server in &mut s {
            server.health = Health::Down { successes: 0 };
        }
        assert_eq!(pick(&s, 0, &[]), None);
        assert_eq!(pick(&[], 0, &[]), None);
    }

    #[test]
    fn admin_changes_and_stale_checks() {
        let mut s = servers(1).remove(0);
        let now = Instant::now();
        assert!(s.set_admin(Admin::Maint, now));
        assert!(!s.set_admin(Admin::Maint, now));
        assert!(!s.running());
        assert_eq!(s.admin.bits(), ADMF_FMAINT);
        let before = s.epoch;
        assert!(
            !s.check_result(before, LastCheck::Status(200), T, now),
            "no checks in maint"
        );
        s.set_admin(Admin::Ready, now);
        assert!(!s.eligible());
        assert!(
            !s.check_result(before, LastCheck::Status(200), T, now),
            "stale check"
        );
        let e = s.epoch;
        assert!(!s.check_result(e, LastCheck::Status(200), T, now));
        assert!(s.check_result(e, LastCheck::Status(200), T, now));
        assert!(s.eligible());
        s.check_result(e, LastCheck::Status(503), T, now);
        assert!(s.check_result(e, LastCheck::NoAnswer, T, now));
        assert_eq!((s.downs, s.check_failures), (1, 2));
        assert_eq!(Admin::parse("drain").map(Admin::bits), Some(ADMF_FDRAIN));
        assert_eq!(Admin::parse("up"), None);
    }
}

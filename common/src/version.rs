//! Bitbucket version numbers and the rule for a rolling upgrade: a bug-fix release of the same
//! major.minor, never a feature release and never down.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("'{0}' is not a Bitbucket version: expected MAJOR.MINOR.PATCH such as 8.19.6")]
    Malformed(String),
    #[error("{to} is the version the cluster already runs; nothing to upgrade")]
    Same { to: Version },
    #[error(
        "{to} is older than {from}; a rolling upgrade never goes down (use `bbupgrade rollback` to undo an upgrade)"
    )]
    Downgrade { from: Version, to: Version },
    #[error(
        "{from} -> {to} changes the major or minor version; Bitbucket allows rolling upgrades only between bug-fix releases of one feature release ({}.{}.x); upgrade with downtime instead",
        from.major, from.minor
    )]
    NotBugFix { from: Version, to: Version },
}

impl Version {
    pub fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }
}

impl FromStr for Version {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || VersionError::Malformed(s.to_string());
        let mut parts = s.trim().split('.');
        let mut next = || -> Result<u32, VersionError> {
            let p = parts.next().ok_or_else(malformed)?;
            if p.is_empty() || p.len() > 6 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(malformed());
            }
            p.parse().map_err(|_| malformed())
        };
        let v = Version::new(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(malformed());
        }
        Ok(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Whether `from -> to` is a rolling (zero-downtime) upgrade Bitbucket allows.
pub fn check_rolling_upgrade(from: Version, to: Version) -> Result<(), VersionError> {
    if to == from {
        Err(VersionError::Same { to })
    } else if to < from {
        Err(VersionError::Downgrade { from, to })
    } else if (to.major, to.minor) != (from.major, from.minor) {
        Err(VersionError::NotBugFix { from, to })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!(v("8.19.3"), Version::new(8, 19, 3));
        assert_eq!(v("8.19.3").to_string(), "8.19.3");
        for bad in [
            "",
            "8",
            "8.19",
            "8.19.x",
            "8.19.3.1",
            "-1.2.3",
            "8..3",
            "1234567.1.1",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_bug_fix_upgrades_are_rolling() {
        assert!(check_rolling_upgrade(v("8.19.3"), v("8.19.6")).is_ok());
        assert!(matches!(
            check_rolling_upgrade(v("8.19.3"), v("8.20.0")),
            Err(VersionError::NotBugFix { .. })
        ));
        assert!(matches!(
            check_rolling_upgrade(v("8.19.3"), v("9.19.4")),
            Err(VersionError::NotBugFix { .. })
        ));
        assert!(matches!(
            check_rolling_upgrade(v("8.19.3"), v("8.19.1")),
            Err(VersionError::Downgrade { .. })
        ));
        assert!(matches!(
            check_rolling_upgrade(v("8.19.3"), v("8.18.9")),
            Err(VersionError::Downgrade { .. })
        ));
        assert!(matches!(
            check_rolling_upgrade(v("8.19.3"), v("8.19.3")),
            Err(VersionError::Same { .. })
        ));
    }

    #[test]
    fn rule_is_total_over_small_versions() {
        // Exhaustive over a small grid: allowed exactly when major.minor match and patch grows.
        for a in 0..3 {
            for b in 0..3 {
                for c in 0..3 {
                    for d in 0..3 {
                        for e in 0..3 {
                            for f in 0..3 {
                                let from = Version::new(a, b, c);
                                let to = Version::new(d, e, f);
                                let ok = a == d && b == e && f > c;
                                assert_eq!(
                                    check_rolling_upgrade(from, to).is_ok(),
                                    ok,
                                    "{from}->{to}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

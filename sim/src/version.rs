//! Bitbucket release versions (`X.Y.Z`) and the product's rule for which version may join a cluster.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A release version such as `8.19.3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a Bitbucket version: expected MAJOR.MINOR.PATCH, e.g. 8.19.3")]
pub struct VersionError(pub String);

impl Version {
    /// True when `self` is a bug-fix release after `from`: same major.minor, higher patch.
    pub fn is_bugfix_upgrade_of(&self, from: &Version) -> bool {
        self.major == from.major && self.minor == from.minor && self.patch > from.patch
    }

    /// The build number Bitbucket reports for this version (e.g. 8.19.3 -> 8019003).
    pub fn build_number(&self) -> u64 {
        u64::from(self.major) * 1_000_000 + u64::from(self.minor) * 1_000 + u64::from(self.patch)
    }
}

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || VersionError(s.to_string());
        let mut parts = s.trim().split('.');
        let mut next = || -> Result<u32, VersionError> {
            let part = parts.next().ok_or_else(err)?;
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            part.parse().map_err(|_| err())
        };
        let version = Version {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(version)
    }
}

impl TryFrom<String> for Version {
    type Error = VersionError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Version> for String {
    fn from(v: Version) -> String {
        v.to_string()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().expect("valid version")
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!(
            v("8.19.3"),
            Version {
                major: 8,
                minor: 19,
                patch: 3
            }
        );
        assert_eq!(v("8.19.3").to_string(), "8.19.3");
        for bad in [
            "",
            "8",
            "8.19",
            "8.19.x",
            "8.19.3.1",
            "8..3",
            "-1.2.3",
            "8.19.3-rc1",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn bugfix_rule() {
        assert!(v("8.19.6").is_bugfix_upgrade_of(&v("8.19.3")));
        assert!(!v("8.19.3").is_bugfix_upgrade_of(&v("8.19.3")));
        assert!(!v("8.19.2").is_bugfix_upgrade_of(&v("8.19.3")));
        assert!(!v("8.20.0").is_bugfix_upgrade_of(&v("8.19.3")));
        assert!(!v("9.19.4").is_bugfix_upgrade_of(&v("8.19.3")));
        assert_eq!(v("8.19.3").build_number(), 8_019_003);
    }
}

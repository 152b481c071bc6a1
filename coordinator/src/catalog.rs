//! The release catalog (`--catalog releases.toml` or an `https://` URL): which Bitbucket releases
//! exist, where each one's archive is and its SHA-256, so `--to 8.19.6` (or `--to latest` on a
//! fleet) needs no `--archive*`. Parsing and the rules on targets are pure; `load` reads the file or
//! fetches the URL.
//!
//! ```toml
//! [[release]]
//! version = "8.19.6"
//! archive_url = "https://www.atlassian.com/software/stash/downloads/binary/atlassian-bitbucket-8.19.6.tar.gz"
//! sha256 = "64 hex digits"
//! archive = "/srv/releases/atlassian-bitbucket-8.19.6.tar.gz"   # optional, air-gapped: streamed
//! ```

use bbupgrade_common::version::Version;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// How long fetching a catalog by URL may take.
pub const CATALOG_FETCH_TIMEOUT_SECS: u64 = 30;
/// The largest catalog read (file or URL).
pub const CATALOG_MAX_BYTES: usize = 1 << 20;

/// A feature release line, `major.minor`: rolling upgrades stay on one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Line {
    pub major: u32,
    pub minor: u32,
}

impl Line {
    pub fn of(v: Version) -> Self {
        Self {
            major: v.major,
            minor: v.minor,
        }
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One release of the catalog, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub version: Version,
    pub archive_url: String,
    /// Lower-case hex.
    pub sha256: String,
    /// A local copy, streamed to the agents instead of them downloading `archive_url`.
    pub archive: Option<PathBuf>,
}

/// Every release of a catalog, highest version first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    releases: Vec<Release>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {origin}: not a catalog: {reason}")]
    Syntax { origin: String, reason: String },
    #[error("catalog {origin}: {entry}: {reason}")]
    Entry {
        origin: String,
        entry: String,
        reason: String,
    },
    #[error("catalog {origin} lists no release: add [[release]] entries")]
    Empty { origin: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    release: Vec<RawRelease>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelease {
    version: String,
    archive_url: String,
    sha256: String,
    archive: Option<PathBuf>,
}

/// Whether `s` is a SHA-256 written as 64 hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Catalog {
    /// Parses and checks a catalog; `origin` names it in errors, `base` is where relative
    /// `archive` paths start (the catalog file's folder).
    pub fn parse(text: &str, origin: &str, base: Option<&Path>) -> Result<Self, CatalogError> {
        let raw: RawCatalog = toml::from_str(text).map_err(|e| CatalogError::Syntax {
            origin: origin.into(),
            reason: e.to_string(),
        })?;
        let mut seen: BTreeMap<Version, usize> = BTreeMap::new();
        let mut releases = Vec::new();
        for (i, r) in raw.release.into_iter().enumerate() {
            let entry = format!("release #{} (version \"{}\")", i + 1, r.version);
            let bad = |reason: String| CatalogError::Entry {
                origin: origin.into(),
                entry: entry.clone(),
                reason,
            };
            let version: Version = r.version.parse().map_err(|e| bad(format!("{e}")))?;
            if let Some(first) = seen.insert(version, i + 1) {
                return Err(bad(format!(
                    "{version} is listed twice (also release #{first}); keep one entry per version"
                )));
            }
            if !is_sha256_hex(&r.sha256) {
                return Err(bad(format!(
                    "sha256 \"{}\" is not 64 hex digits; copy the checksum Atlassian publishes beside the download",
                    r.sha256
                )));
            }
            if r.archive_url.trim().is_empty() {
                return Err(bad("archive_url is empty".into()));
            }
            let archive = r.archive.map(|p| match base {
                Some(b) if p.is_relative() => b.join(p),
                _ => p,
            });
            releases.push(Release {
                version,
                archive_url: r.archive_url,
                sha256: r.sha256.to_lowercase(),
                archive,
            });
        }
        if releases.is_empty() {
            return Err(CatalogError::Empty {
                origin: origin.into(),
            });
        }
        releases.sort_by_key(|r| std::cmp::Reverse(r.version));
        Ok(Self { releases })
    }

    pub fn releases(&self) -> &[Release] {
        &self.releases
    }

    pub fn get(&self, v: Version) -> Option<&Release> {
        self.releases.iter().find(|r| r.version == v)
    }

    /// The highest release on `line`.
    pub fn latest_on(&self, line: Line) -> Option<&Release> {
        self.releases.iter().find(|r| Line::of(r.version) == line)
    }

    /// Every line the catalog has a release on, each with its highest release.
    pub fn tops(&self) -> Vec<&Release> {
        let mut lines = std::collections::BTreeSet::new();
        self.releases
            .iter()
            .filter(|r| lines.insert(Line::of(r.version)))
            .collect()
    }

    /// The release `to` names, or why it is not there (naming what is).
    pub fn require(&self, to: Version) -> Result<&Release, String> {
        self.get(to).ok_or_else(|| {
            let same: Vec<String> = self
                .releases
                .iter()
                .filter(|r| Line::of(r.version) == Line::of(to))
                .map(|r| r.version.to_string())
                .collect();
            format!(
                "--to {to} is not in the catalog ({} on {}: {}); add it to the catalog or pick one it lists",
                if same.is_empty() { "nothing" } else { "releases" },
                Line::of(to),
                if same.is_empty() {
                    "none".into()
                } else {
                    same.join(", ")
                }
            )
        })
    }
}

/// What the `--to` options of a fleet ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// The highest catalog release on each cluster's own line.
    Latest,
    /// At most one version per line.
    Versions(Vec<Version>),
}

/// Reads the `--to` options: `latest` alone, or versions with at most one per major.minor line.
pub fn parse_targets(to: &[String]) -> Result<Targets, String> {
    if to.iter().any(|t| t == "latest") {
        if to.len() > 1 {
            return Err(
                "--to latest picks the top of every line; give it alone, not with other --to"
                    .into(),
            );
        }
        return Ok(Targets::Latest);
    }
    if to.is_empty() {
        return Err(
            "give the target with --to, e.g. --to 8.19.6 (one per line: --to 8.19.6 --to 9.4.7) or --to latest with --catalog"
                .into(),
        );
    }
    let mut by_line: BTreeMap<Line, Version> = BTreeMap::new();
    let mut versions = Vec::new();
    for t in to {
        let v: Version = t.parse().map_err(|e| format!("--to {t}: {e}"))?;
        if let Some(other) = by_line.insert(Line::of(v), v) {
            return Err(format!(
                "--to {other} and --to {v} are both on the {} line; give one target per line",
                Line::of(v)
            ));
        }
        versions.push(v);
    }
    Ok(Targets::Versions(versions))
}

/// Loads a catalog from a file path or an `http(s)://` URL.
pub async fn load(source: &str) -> anyhow::Result<Catalog> {
    use anyhow::Context;
    if source.starts_with("https://") || source.starts_with("http://") {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(CATALOG_FETCH_TIMEOUT_SECS))
            .build()?;
        let body = client
            .get(source)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("fetching the catalog {source}"))?
            .bytes()
            .await
            .with_context(|| format!("reading the catalog {source}"))?;
        return parse_bytes(&body, source, None);
    }
    let path = PathBuf::from(source);
    let body = tokio::fs::read(&path)
        .await
        .with_context(|| format!("reading the catalog {}", path.display()))?;
    parse_bytes(&body, source, path.parent())
}

fn parse_bytes(body: &[u8], origin: &str, base: Option<&Path>) -> anyhow::Result<Catalog> {
    if body.len() > CATALOG_MAX_BYTES {
        anyhow::bail!("catalog {origin} is larger than {CATALOG_MAX_BYTES} bytes");
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| anyhow::anyhow!("catalog {origin} is not UTF-8 text"))?;
    Ok(Catalog::parse(text, origin, base)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA_B: &str = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";

    fn entry(version: &str, sha: &str) -> String {
        format!(
            "[[release]]\nversion = \"{version}\"\narchive_url = \"https://example.test/{version}.tar.gz\"\nsha256 = \"{sha}\"\n"
        )
    }

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn two_lines() -> Catalog {
        let text = [
            entry("8.19.3", SHA_A),
            entry("8.19.6", SHA_A),
            entry("9.4.7", SHA_B),
            entry("9.4.2", SHA_B),
            format!(
                "{}archive = \"rel/8.19.5.tar.gz\"\n",
                entry("8.19.5", SHA_A)
            ),
        ]
        .concat();
        Catalog::parse(&text, "c.toml", Some(Path::new("/srv"))).unwrap()
    }

    #[test]
    fn releases_are_checked_sorted_and_found_by_line() {
        let c = two_lines();
        assert_eq!(c.releases()[0].version, v("9.4.7"));
        assert_eq!(
            c.latest_on(Line::of(v("8.19.3"))).unwrap().version,
            v("8.19.6")
        );
        assert_eq!(
            c.latest_on(Line::of(v("9.4.0"))).unwrap().version,
            v("9.4.7")
        );
        assert_eq!(c.latest_on(Line::of(v("9.2.1"))), None);
        let tops: Vec<String> = c.tops().iter().map(|r| r.version.to_string()).collect();
        assert_eq!(tops, ["9.4.7", "8.19.6"]);
        let r = c.get(v("9.4.2")).unwrap();
        assert_eq!(r.sha256, SHA_B.to_lowercase());
        assert_eq!(
            c.get(v("8.19.5")).unwrap().archive.as_deref(),
            Some(Path::new("/srv/rel/8.19.5.tar.gz"))
        );
        assert!(c.require(v("8.19.6")).is_ok());
        let why = c.require(v("8.19.4")).unwrap_err();
        assert!(
            why.contains("8.19.4") && why.contains("8.19.6, 8.19.5, 8.19.3"),
            "{why}"
        );
        let why = c.require(v("9.2.1")).unwrap_err();
        assert!(why.contains("nothing on 9.2"), "{why}");
    }

    #[test]
    fn bad_entries_are_refused_naming_the_entry() {
        let short = [entry("8.19.6", SHA_A), entry("9.4.7", "abc123")].concat();
        let e = Catalog::parse(&short, "c.toml", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("release #2 (version \"9.4.7\")") && e.contains("not 64 hex"),
            "{e}"
        );
        let nonhex = entry("8.19.6", &"g".repeat(64));
        assert!(Catalog::parse(&nonhex, "c.toml", None).is_err());
        let dup = [entry("8.19.6", SHA_A), entry("8.19.6", SHA_B)].concat();
        let e = Catalog::parse(&dup, "c.toml", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("release #2") && e.contains("listed twice (also release #1)"),
            "{e}"
        );
        let e = Catalog::parse(&entry("8.19", SHA_A), "c.toml", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("release #1") && e.contains("MAJOR.MINOR.PATCH"),
            "{e}"
        );
        let e = Catalog::parse("", "c.toml", None).unwrap_err();
        assert!(matches!(e, CatalogError::Empty { .. }));
        let e = Catalog::parse("[[release]]\nversion = 1\n", "c.toml", None).unwrap_err();
        assert!(matches!(e, CatalogError::Syntax { .. }), "{e}");
        let typo = entry("8.19.6", SHA_A).replace("sha256", "sha265");
        assert!(Catalog::parse(&typo, "c.toml", None).is_err());
    }

    #[test]
    fn targets_are_one_per_line_or_latest_alone() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_targets(&s(&["latest"])), Ok(Targets::Latest));
        assert_eq!(
            parse_targets(&s(&["8.19.6", "9.4.7"])),
            Ok(Targets::Versions(vec![v("8.19.6"), v("9.4.7")]))
        );
        let e = parse_targets(&s(&["8.19.6", "8.19.5"])).unwrap_err();
        assert!(e.contains("both on the 8.19 line"), "{e}");
        assert!(parse_targets(&s(&["latest", "8.19.6"])).is_err());
        assert!(parse_targets(&s(&[])).is_err());
        assert!(
            parse_targets(&s(&["8.19"]))
                .unwrap_err()
                .contains("--to 8.19")
        );
    }
}

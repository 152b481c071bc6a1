//! Per-line targets of a fleet run: one release per major.minor line (`--to 8.19.6 --to 9.4.7`, or
//! `--to latest` = the top of every line the catalog lists), and the pure rule that gives each
//! cluster its target from the version it runs: a bug-fix upgrade never crosses lines.

use crate::catalog::{Catalog, Line, Targets};
use crate::procedure::ArchiveSource;
use bbupgrade_common::version::Version;
use serde::{Deserialize, Serialize};

/// The release one line goes to, with its archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LineTarget {
    pub version: String,
    pub archive: ArchiveSource,
}

impl LineTarget {
    fn version(&self) -> Option<Version> {
        self.version.parse().ok()
    }
}

/// What a cluster running a given version does in this fleet run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Upgrade to the line's target (index into the targets).
    Upgrade(usize),
    /// Already on its line's target or above it.
    UpToDate(String),
    /// The run has no target on the cluster's line.
    NoTarget(String),
}

impl Resolution {
    /// The words the fleet reports for a cluster that is not upgraded.
    pub fn reason(&self, current: &str) -> Option<String> {
        match self {
            Resolution::Upgrade(_) => None,
            Resolution::UpToDate(top) if top == current => Some(format!(
                "up to date: already on {current}, the target of its line"
            )),
            Resolution::UpToDate(top) => Some(format!(
                "up to date: already on {current}, above the target {top} of its line"
            )),
            Resolution::NoTarget(line) => Some(format!("no target for {line}")),
        }
    }
}

/// The target of a cluster running `current`.
pub fn resolve(targets: &[LineTarget], current: Version) -> Resolution {
    let line = Line::of(current);
    let found = targets
        .iter()
        .enumerate()
        .find_map(|(i, t)| t.version().filter(|v| Line::of(*v) == line).map(|v| (i, v)));
    match found {
        None => Resolution::NoTarget(line.to_string()),
        Some((_, v)) if v <= current => Resolution::UpToDate(v.to_string()),
        Some((i, _)) => Resolution::Upgrade(i),
    }
}

/// The releases `targets` asks for: with `--to latest`, the top of every line of the catalog;
/// otherwise each version given, which must be in the catalog when one is given. `archive` (from
/// `--archive*`) serves a single target only.
pub fn releases(
    targets: &Targets,
    catalog: Option<&Catalog>,
    explicit_archive: bool,
) -> Result<Vec<Planned>, String> {
    match targets {
        Targets::Latest => {
            let c = catalog.ok_or(
                "--to latest takes the top of each line from a catalog: give --catalog releases.toml",
            )?;
            if explicit_archive {
                return Err(
                    "--to latest takes every archive from the catalog; drop --archive*".into(),
                );
            }
            Ok(c.tops()
                .into_iter()
                .map(|r| Planned::Catalog(r.clone()))
                .collect())
        }
        Targets::Versions(vs) => {
            if vs.len() > 1 && explicit_archive {
                return Err("--archive* gives one release; with a --to per line take the archives from --catalog".into());
            }
            vs.iter()
                .map(|v| match catalog {
                    Some(c) => c.require(*v).map(|r| Planned::Catalog(r.clone())),
                    None if explicit_archive => Ok(Planned::Given(*v)),
                    None => Err(format!(
                        "give the release of {v} with --archive-url URL --sha256 HEX, --archive FILE, or a --catalog listing it"
                    )),
                })
                .collect()
        }
    }
}

/// A release chosen before its archive is hashed or checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    Catalog(crate::catalog::Release),
    /// The version whose archive `--archive*` gives.
    Given(Version),
}

/// Each planned release with its archive: a catalog entry's (its local copy hashed against the
/// catalog, or its URL), or the one `--archive*` gives.
pub async fn with_archives(
    planned: Vec<Planned>,
    archive: Option<&std::path::Path>,
    archive_url: Option<&str>,
    sha256: Option<&str>,
) -> anyhow::Result<Vec<LineTarget>> {
    let mut out = Vec::new();
    for p in planned {
        let (version, archive) = match p {
            Planned::Catalog(r) => (r.version, crate::archive::release_archive(&r).await?),
            Planned::Given(v) => {
                let a = crate::archive::archive_from(archive, archive_url, sha256).await?;
                (
                    v,
                    a.ok_or_else(|| anyhow::anyhow!("no archive given for {v}"))?,
                )
            }
        };
        out.push(LineTarget {
            version: version.to_string(),
            archive,
        });
    }
    Ok(out)
}

/// How the targets read in a line of output: `8.19.6, 9.4.7`, or `latest (8.19.6, 9.4.7)`.
pub fn describe(targets: &[LineTarget], latest: bool) -> String {
    let list = targets
        .iter()
        .map(|t| t.version.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if latest {
        format!("latest ({list})")
    } else {
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(v: &str) -> LineTarget {
        LineTarget {
            version: v.into(),
            archive: ArchiveSource::Url {
                url: format!("https://example.test/{v}"),
                sha256: "a".repeat(64),
            },
        }
    }

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn each_cluster_gets_the_target_of_its_own_line() {
        let t = [target("8.19.6"), target("9.4.7")];
        assert_eq!(resolve(&t, v("8.19.3")), Resolution::Upgrade(0));
        assert_eq!(resolve(&t, v("9.4.0")), Resolution::Upgrade(1));
        assert_eq!(
            resolve(&t, v("8.19.6")),
            Resolution::UpToDate("8.19.6".into())
        );
        let above = resolve(&t, v("9.4.9"));
        assert_eq!(above, Resolution::UpToDate("9.4.7".into()));
        assert!(
            above
                .reason("9.4.9")
                .unwrap()
                .contains("above the target 9.4.7")
        );
        let none = resolve(&t, v("9.2.3"));
        assert_eq!(none.reason("9.2.3").as_deref(), Some("no target for 9.2"));
        assert_eq!(resolve(&t, v("8.1.19")), Resolution::NoTarget("8.1".into()));
        assert_eq!(describe(&t, true), "latest (8.19.6, 9.4.7)");
    }

    #[test]
    fn releases_come_from_the_catalog_or_one_given_archive() {
        let sha = "c".repeat(64);
        let text: String = ["8.19.5", "8.19.6", "9.4.7"]
            .iter()
            .map(|v| {
                format!("[[release]]\nversion = \"{v}\"\narchive_url = \"https://x/{v}\"\nsha256 = \"{sha}\"\n")
            })
            .collect();
        let c = Catalog::parse(&text, "c.toml", None).unwrap();
        let names = |p: Vec<Planned>| {
            p.into_iter()
                .map(|p| match p {
                    Planned::Catalog(r) => r.version.to_string(),
                    Planned::Given(v) => format!("given {v}"),
                })
                .collect::<Vec<_>>()
        };
        let latest = releases(&Targets::Latest, Some(&c), false).unwrap();
        assert_eq!(names(latest), ["9.4.7", "8.19.6"]);
        assert!(
            releases(&Targets::Latest, None, false)
                .unwrap_err()
                .contains("--catalog")
        );
        let two = Targets::Versions(vec![v("8.19.5"), v("9.4.7")]);
        assert_eq!(
            names(releases(&two, Some(&c), false).unwrap()),
            ["8.19.5", "9.4.7"]
        );
        assert!(releases(&two, None, true).is_err());
        let one = Targets::Versions(vec![v("8.19.4")]);
        assert_eq!(names(releases(&one, None, true).unwrap()), ["given 8.19.4"]);
        assert!(
            releases(&one, Some(&c), false)
                .unwrap_err()
                .contains("not in the catalog")
        );
        assert!(releases(&one, None, false).is_err());
    }
}

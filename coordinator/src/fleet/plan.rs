//! Deciding a fleet run without I/O: which clusters (names, labels), in which order (canaries
//! first), in which waves (a number or a percentage), and whether the failure budget still allows
//! the next wave.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How many clusters are upgraded at once: a number, or a percentage of the selected clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Concurrency {
    Count(u32),
    Percent(u32),
}

impl FromStr for Concurrency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("concurrency {s:?} must be a number of clusters (10) or a percentage (25%)");
        let s = s.trim();
        let c = match s.strip_suffix('%') {
            Some(p) => Concurrency::Percent(p.trim().parse().map_err(|_| bad())?),
            None => Concurrency::Count(s.parse().map_err(|_| bad())?),
        };
        match c {
            Concurrency::Count(0) | Concurrency::Percent(0) => Err(bad()),
            Concurrency::Percent(p) if p > 100 => Err(bad()),
            c => Ok(c),
        }
    }
}

impl TryFrom<String> for Concurrency {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Concurrency> for String {
    fn from(c: Concurrency) -> Self {
        c.to_string()
    }
}

impl fmt::Display for Concurrency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Concurrency::Count(n) => write!(f, "{n}"),
            Concurrency::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Concurrency {
    /// Clusters at once for a fleet of `total`: a percentage rounds up; never below one.
    pub fn limit(self, total: usize) -> usize {
        match self {
            Concurrency::Count(n) => n as usize,
            Concurrency::Percent(p) => (total * p as usize).div_ceil(100),
        }
        .max(1)
    }
}

/// What selection needs to know of an inventory cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub labels: &'a [String],
}

/// The clusters a fleet run covers, in inventory order: those named (if any) that carry every
/// label asked for (if any). Unknown names, and canaries outside the selection, are refused.
pub fn select(
    clusters: &[Candidate<'_>],
    names: &[String],
    labels: &[String],
    canary: &[String],
) -> Result<Vec<String>, String> {
    for n in names.iter().chain(canary) {
        if !clusters.iter().any(|c| c.name == n) {
            return Err(format!("no cluster named '{n}' in the inventory"));
        }
    }
    let chosen: Vec<String> = clusters
        .iter()
        .filter(|c| names.is_empty() || names.iter().any(|n| n == c.name))
        .filter(|c| labels.iter().all(|l| c.labels.contains(l)))
        .map(|c| c.name.to_string())
        .collect();
    if chosen.is_empty() {
        return Err("no cluster matches the selection (--clusters, --label)".into());
    }
    if let Some(c) = canary.iter().find(|c| !chosen.contains(c)) {
        return Err(format!(
            "canary cluster '{c}' is not among the selected clusters"
        ));
    }
    Ok(chosen)
}

/// Canaries first (in the order given), then the others in their order.
pub fn order(selected: &[String], canary: &[String]) -> Vec<String> {
    let mut out: Vec<String> = canary.to_vec();
    out.dedup();
    out.extend(selected.iter().filter(|c| !canary.contains(c)).cloned());
    out
}

/// A batch of clusters upgraded together; the next waits until all of it has finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wave {
    /// 1-based.
    pub number: usize,
    pub canary: bool,
    pub clusters: Vec<String>,
}

/// Cuts the ordered clusters into waves of at most `limit`; canaries never share a wave with
/// other clusters.
pub fn waves(ordered: &[String], canary: &[String], limit: usize) -> Vec<Wave> {
    let limit = limit.max(1);
    let (canaries, rest): (Vec<_>, Vec<_>) =
        ordered.iter().cloned().partition(|c| canary.contains(c));
    let mut out = Vec::new();
    for (is_canary, group) in [(true, canaries), (false, rest)] {
        for chunk in group.chunks(limit) {
            out.push(Wave {
                number: out.len() + 1,
                canary: is_canary,
                clusters: chunk.to_vec(),
            });
        }
    }
    out
}

/// Whether the fleet goes on after a wave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Halt(String),
}

/// A failed canary halts the fleet; otherwise more failed clusters than the budget allows does.
pub fn budget(failed: &[String], canary_failed: &[String], max_failed: u32) -> Verdict {
    if !canary_failed.is_empty() {
        return Verdict::Halt(format!(
            "canary cluster(s) {} failed; no further cluster is started",
            canary_failed.join(", ")
        ));
    }
    if failed.len() > max_failed as usize {
        return Verdict::Halt(format!(
            "{} cluster(s) failed ({}), more than the budget of {max_failed} (--max-failed-clusters); no further cluster is started",
            failed.len(),
            failed.join(", ")
        ));
    }
    Verdict::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn concurrency_parses_counts_and_percentages() {
        assert_eq!("10".parse(), Ok(Concurrency::Count(10)));
        assert_eq!(" 25% ".parse(), Ok(Concurrency::Percent(25)));
        for bad in ["0", "0%", "101%", "-1", "ten", "", "%"] {
            assert!(bad.parse::<Concurrency>().is_err(), "{bad}");
        }
        assert_eq!(Concurrency::Count(3).limit(10), 3);
        assert_eq!(Concurrency::Count(30).limit(10), 30);
        assert_eq!(Concurrency::Percent(25).limit(10), 3, "rounds up");
        assert_eq!(Concurrency::Percent(10).limit(1000), 100);
        assert_eq!(Concurrency::Percent(1).limit(5), 1, "never zero");
        assert_eq!(Concurrency::Percent(100).limit(7), 7);
        let json = serde_json::to_string(&Concurrency::Percent(5)).unwrap();
        assert_eq!(json, "\"5%\"");
        assert_eq!(
            serde_json::from_str::<Concurrency>(&json).unwrap(),
            Concurrency::Percent(5)
        );
    }

    #[test]
    fn selection_by_name_and_label() {
        let prod = names(&["env=prod"]);
        let prod_eu = names(&["env=prod", "eu"]);
        let test = names(&["env=test"]);
        let all = [
            Candidate {
                name: "a",
                labels: &prod,
            },
            Candidate {
                name: "b",
                labels: &prod_eu,
            },
            Candidate {
                name: "c",
                labels: &test,
            },
        ];
        assert_eq!(
            select(&all, &[], &[], &[]).unwrap(),
            names(&["a", "b", "c"])
        );
        assert_eq!(
            select(&all, &names(&["c", "a"]), &[], &[]).unwrap(),
            names(&["a", "c"])
        );
        assert_eq!(select(&all, &[], &prod, &[]).unwrap(), names(&["a", "b"]));
        assert_eq!(
            select(&all, &[], &prod_eu, &[]).unwrap(),
            names(&["b"]),
            "every label"
        );
        assert_eq!(
            select(&all, &names(&["a", "c"]), &prod, &[]).unwrap(),
            names(&["a"]),
            "names and labels both filter"
        );
        assert!(
            select(&all, &names(&["x"]), &[], &[])
                .unwrap_err()
                .contains("'x'")
        );
        assert!(
            select(&all, &[], &names(&["nope"]), &[])
                .unwrap_err()
                .contains("no cluster matches")
        );
        assert!(
            select(&all, &[], &prod, &names(&["c"]))
                .unwrap_err()
                .contains("canary cluster 'c' is not among")
        );
        assert!(
            select(&all, &[], &[], &names(&["zz"]))
                .unwrap_err()
                .contains("'zz'")
        );
    }

    #[test]
    fn canaries_come_first_in_their_own_waves() {
        let sel = names(&["a", "b", "c", "d", "e", "f", "g"]);
        let canary = names(&["e", "b"]);
        let ordered = order(&sel, &canary);
        assert_eq!(ordered, names(&["e", "b", "a", "c", "d", "f", "g"]));
        let w = waves(&ordered, &canary, 2);
        assert_eq!(
            w.iter()
                .map(|w| (w.number, w.canary, w.clusters.clone()))
                .collect::<Vec<_>>(),
            vec![
                (1, true, names(&["e", "b"])),
                (2, false, names(&["a", "c"])),
                (3, false, names(&["d", "f"])),
                (4, false, names(&["g"])),
            ]
        );
        // A limit of 1 splits the canaries too; no canary: plain batches.
        assert_eq!(waves(&ordered, &canary, 1).len(), 7);
        assert!(waves(&ordered, &canary, 1)[..2].iter().all(|w| w.canary));
        let plain = waves(&sel, &[], 3);
        assert_eq!(plain.len(), 3);
        assert!(plain.iter().all(|w| !w.canary && w.clusters.len() <= 3));
        assert_eq!(
            waves(&sel, &[], 0).len(),
            7,
            "a zero limit is one at a time"
        );
        assert!(waves(&[], &[], 5).is_empty());
    }

    #[test]
    fn every_cluster_is_in_exactly_one_wave_within_the_limit() {
        let sel: Vec<String> = (0..23).map(|i| format!("c{i}")).collect();
        for limit in 1..=25 {
            for canary in [vec![], names(&["c5"]), names(&["c22", "c0", "c9"])] {
                let w = waves(&order(&sel, &canary), &canary, limit);
                let mut seen: Vec<String> = w.iter().flat_map(|w| w.clusters.clone()).collect();
                assert!(
                    w.iter()
                        .all(|w| !w.clusters.is_empty() && w.clusters.len() <= limit)
                );
                assert_eq!(&seen[..canary.len()], &canary[..]);
                seen.sort();
                let mut want = sel.clone();
                want.sort();
                assert_eq!(seen, want, "limit {limit}");
            }
        }
    }

    #[test]
    fn failure_budget() {
        assert_eq!(budget(&[], &[], 0), Verdict::Continue);
        assert!(
            matches!(budget(&names(&["a"]), &[], 0), Verdict::Halt(r) if r.contains("budget of 0"))
        );
        assert_eq!(budget(&names(&["a"]), &[], 1), Verdict::Continue);
        assert_eq!(budget(&names(&["a", "b"]), &[], 2), Verdict::Continue);
        assert!(
            matches!(budget(&names(&["a", "b", "c"]), &[], 2), Verdict::Halt(r) if r.contains("a, b, c"))
        );
        assert!(
            matches!(budget(&names(&["k"]), &names(&["k"]), 5), Verdict::Halt(r) if r.contains("canary"))
        );
    }
}

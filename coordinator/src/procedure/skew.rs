//! Traffic skew after a node rejoins (DESIGN.md, cluster step 7): when the load balancer keeps
//! sending the rejoined node far more users than the other nodes have, it is taken out briefly
//! (drain, then enable) so users spread over the others, and the run's report says so.
//!
//! The check is cheap when there is nothing to see: one look at `GET /rest/zdu/cluster`; only a
//! skewed first look is watched for [`SKEW_HOLD_SECS`] before acting. Deciding is pure
//! ([`judge`], [`decide`]); [`after_rejoin`] carries it out.

use std::time::{Duration, Instant};

use super::{Ctx, RunOptions, Step};
use crate::inventory::Node;
use crate::journal::RunId;
use crate::loadbalancer::LbConfig;
use crate::zdu::{ClusterView, NodeState, ZduNode};

/// The rejoined node is skewed when it has more than this many times the others' mean users.
pub const SKEW_FACTOR: f64 = 3.0;
/// Below this many active users on the node there is nothing worth moving.
pub const SKEW_MIN_USERS: u64 = 5;
/// How long the skew must last before the node is taken out.
pub const SKEW_HOLD_SECS: u64 = 3;
/// How often the cluster view is read while watching.
pub const SKEW_SAMPLE_MS: u64 = 500;
/// How long the node stays out of the load balancer so users move elsewhere.
pub const SKEW_OUT_SECS: u64 = 5;
/// Bound on the drain of a redistribution (never more than the run's drain timeout).
pub const SKEW_DRAIN_SECS: u64 = 60;

/// When a rejoined node counts as skewed, and what is done about it.
#[derive(Debug, Clone, PartialEq)]
pub struct SkewSettings {
    pub factor: f64,
    pub min_users: u64,
    pub hold: Duration,
    pub sample: Duration,
    pub out: Duration,
    pub drain: Duration,
}

impl Default for SkewSettings {
    fn default() -> Self {
        Self {
            factor: SKEW_FACTOR,
            min_users: SKEW_MIN_USERS,
            hold: Duration::from_secs(SKEW_HOLD_SECS),
            sample: Duration::from_millis(SKEW_SAMPLE_MS),
            out: Duration::from_secs(SKEW_OUT_SECS),
            drain: Duration::from_secs(SKEW_DRAIN_SECS),
        }
    }
}

/// One look at the users of the rejoined node against the other serving nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// No other ACTIVE node: there is nowhere for users to go.
    NoPeers,
    /// The node is not in the view, or not ACTIVE.
    NotServing,
    /// Too few users on the node to be worth moving.
    TooFewUsers {
        users: u64,
    },
    Balanced {
        users: u64,
        others_mean: f64,
    },
    Skewed {
        users: u64,
        others_mean: f64,
    },
}

/// Compares the node's active users with the mean of the others'.
pub fn judge(users: u64, others: &[u64], s: &SkewSettings) -> Verdict {
    if others.is_empty() {
        return Verdict::NoPeers;
    }
    let others_mean = others.iter().sum::<u64>() as f64 / others.len() as f64;
    if users < s.min_users {
        Verdict::TooFewUsers { users }
    } else if users as f64 > s.factor * others_mean {
        Verdict::Skewed { users, others_mean }
    } else {
        Verdict::Balanced { users, others_mean }
    }
}

/// [`judge`] on a cluster view: the node's row (as `node_match` found it) against the other ACTIVE rows.
pub fn judge_view(view: &ClusterView, me: Option<&ZduNode>, s: &SkewSettings) -> Verdict {
    let Some(me) = me else {
        return Verdict::NotServing;
    };
    if me.state != NodeState::Active {
        return Verdict::NotServing;
    }
    let others: Vec<u64> = view
        .nodes
        .iter()
        .filter(|n| n.id != me.id && n.state == NodeState::Active)
        .map(ZduNode::users)
        .collect();
    judge(me.users(), &others, s)
}

/// What to do after a series of looks.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Not skewed (any more): leave the node alone.
    Leave(Verdict),
    /// Skewed, not yet for long enough: look again.
    Watch,
    /// Skewed for the whole hold time: take the node out briefly.
    Redistribute(Verdict),
}

/// Decides from the looks so far, each with the time since watching began.
pub fn decide(looks: &[(Duration, Verdict)], s: &SkewSettings) -> Decision {
    let Some((last_at, last)) = looks.last() else {
        return Decision::Watch;
    };
    if !matches!(last, Verdict::Skewed { .. }) {
        return Decision::Leave(last.clone());
    }
    // Every look so far was skewed, or we would have left already.
    if *last_at >= looks[0].0 + s.hold {
        Decision::Redistribute(last.clone())
    } else {
        Decision::Watch
    }
}

fn describe(v: &Verdict) -> String {
    match v {
        Verdict::Skewed { users, others_mean } | Verdict::Balanced { users, others_mean } => {
            format!("{users} active users against {others_mean:.1} on average on the other nodes")
        }
        Verdict::TooFewUsers { users } => format!("{users} active users"),
        Verdict::NoPeers => "no other node serving".into(),
        Verdict::NotServing => "not ACTIVE".into(),
    }
}

/// After `node` rejoined and soaked: watches for skew, and if it lasts, takes the node out of the
/// load balancer for a moment and puts it back (journal step `skew`). Returns a note for the
/// run's summary when something was seen or done; never fails the run.
pub async fn after_rejoin(ctx: &Ctx, run: RunId, node: &Node, opts: &RunOptions) -> Option<String> {
    if matches!(ctx.cluster.load_balancer, LbConfig::None {})
        || ctx
            .step_done(run, &node.id, Step::Skew)
            .await
            .unwrap_or(false)
    {
        return None;
    }
    let s = SkewSettings {
        drain: Duration::from_secs(SKEW_DRAIN_SECS.min(opts.timeouts.drain_secs)),
        ..SkewSettings::default()
    };
    let started = Instant::now();
    let mut looks = Vec::new();
    let verdict = loop {
        let view = match ctx.zdu.cluster().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(node = %node.id, error = %e, "skew check skipped: cannot read the cluster view");
                return None;
            }
        };
        looks.push((
            started.elapsed(),
            judge_view(&view, ctx.row(&view, node).row(), &s),
        ));
        match decide(&looks, &s) {
            Decision::Leave(_) if looks.len() == 1 => return None,
            Decision::Leave(v) => {
                return Some(format!(
                    "node '{}': traffic skew after rejoining cleared by itself within {:.1}s (now {})",
                    node.id,
                    started.elapsed().as_secs_f64(),
                    describe(&v)
                ));
            }
            Decision::Watch => tokio::time::sleep(s.sample).await,
            Decision::Redistribute(v) => break v,
        }
    };
    let seen = describe(&verdict);
    let r = ctx
        .step(run, Some(&node.id), Step::Skew, async {
            let drained = ctx.lb.drain(&node.lb_server, s.drain).await;
            if drained.is_ok() {
                tokio::time::sleep(s.out).await;
            }
            let enabled = ctx.lb.enable(&node.lb_server).await;
            match (drained, enabled) {
                (Ok(_), Ok(())) => Ok((
                    (),
                    format!(
                        "{seen} for {:.0}s: taken out of the load balancer for {}s so users redistribute, then put back",
                        s.hold.as_secs_f64(),
                        s.out.as_secs()
                    ),
                )),
                (Err(e), Ok(())) => Err(anyhow::anyhow!(
                    "{seen}; taking it out failed ({e}); it is back in the load balancer"
                )),
                (_, Err(e)) => Err(anyhow::anyhow!(
                    "{seen}; putting it back in the load balancer FAILED ({e}): put it back by hand"
                )),
            }
        })
        .await;
    Some(match r {
        Ok(()) => format!(
            "node '{}': traffic skew after rejoining ({seen}); it was taken out of the load balancer for {}s to redistribute users, then put back",
            node.id,
            s.out.as_secs()
        ),
        Err(e) => format!("node '{}': traffic skew redistribution: {e:#}", node.id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zdu::ClusterState;

    fn s() -> SkewSettings {
        SkewSettings::default()
    }

    #[test]
    fn judge_covers_every_case() {
        assert_eq!(judge(100, &[], &s()), Verdict::NoPeers);
        assert_eq!(judge(4, &[0, 0], &s()), Verdict::TooFewUsers { users: 4 });
        assert_eq!(
            judge(5, &[0, 0], &s()),
            Verdict::Skewed {
                users: 5,
                others_mean: 0.0
            }
        );
        // Exactly factor times the mean is not skewed; just above is.
        assert_eq!(
            judge(30, &[10, 10], &s()),
            Verdict::Balanced {
                users: 30,
                others_mean: 10.0
            }
        );
        assert!(matches!(judge(31, &[10, 10], &s()), Verdict::Skewed { .. }));
        assert!(matches!(judge(31, &[5, 15], &s()), Verdict::Skewed { .. }));
        assert!(matches!(judge(8, &[8, 8], &s()), Verdict::Balanced { .. }));
        // Exhaustively over small counts: skewed iff enough users and above factor * mean.
        for users in 0..12u64 {
            for a in 0..6u64 {
                for b in 0..6u64 {
                    let v = judge(users, &[a, b], &s());
                    let mean = (a + b) as f64 / 2.0;
                    let want_skewed = users >= SKEW_MIN_USERS && users as f64 > SKEW_FACTOR * mean;
                    assert_eq!(
                        matches!(v, Verdict::Skewed { .. }),
                        want_skewed,
                        "{users} vs {a},{b}: {v:?}"
                    );
                    if users < SKEW_MIN_USERS {
                        assert_eq!(v, Verdict::TooFewUsers { users });
                    }
                }
            }
        }
    }

    fn node(id: &str, state: NodeState, users: u64) -> ZduNode {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": id, "state": state.to_string(), "activeUserCount": users, "version": "8.19.6"
        }))
        .unwrap()
    }

    fn row<'a>(v: &'a ClusterView, id: &str) -> Option<&'a ZduNode> {
        v.nodes.iter().find(|n| n.id == id)
    }

    #[test]
    fn judge_view_counts_only_active_peers() {
        let view = |nodes| ClusterView {
            upgrade_mode_enabled: true,
            state: ClusterState::Mixed,
            original_version: None,
            nodes,
        };
        let v = view(vec![
            node("n1", NodeState::Active, 9),
            node("n2", NodeState::Active, 1),
            node("n3", NodeState::Offline, 50),
        ]);
        assert!(matches!(
            judge_view(&v, row(&v, "n1"), &s()),
            Verdict::Skewed { users: 9, .. }
        ));
        assert!(matches!(
            judge_view(&v, row(&v, "n2"), &s()),
            Verdict::TooFewUsers { .. }
        ));
        assert_eq!(judge_view(&v, row(&v, "n3"), &s()), Verdict::NotServing);
        assert_eq!(judge_view(&v, row(&v, "n9"), &s()), Verdict::NotServing);
        let alone = view(vec![
            node("n1", NodeState::Active, 9),
            node("n2", NodeState::Starting, 0),
        ]);
        assert_eq!(
            judge_view(&alone, row(&alone, "n1"), &s()),
            Verdict::NoPeers
        );
    }

    #[test]
    fn decide_waits_for_the_hold_time() {
        let skewed = Verdict::Skewed {
            users: 8,
            others_mean: 0.0,
        };
        let balanced = Verdict::Balanced {
            users: 8,
            others_mean: 8.0,
        };
        let at = Duration::from_millis;
        assert_eq!(decide(&[], &s()), Decision::Watch);
        assert_eq!(
            decide(&[(at(0), balanced.clone())], &s()),
            Decision::Leave(balanced.clone())
        );
        assert_eq!(decide(&[(at(0), skewed.clone())], &s()), Decision::Watch);
        assert_eq!(
            decide(&[(at(0), skewed.clone()), (at(2999), skewed.clone())], &s()),
            Decision::Watch
        );
        assert_eq!(
            decide(&[(at(0), skewed.clone()), (at(3000), skewed.clone())], &s()),
            Decision::Redistribute(skewed.clone())
        );
        // Clearing up part-way means nothing is done.
        assert_eq!(
            decide(
                &[(at(0), skewed.clone()), (at(500), Verdict::NotServing)],
                &s()
            ),
            Decision::Leave(Verdict::NotServing)
        );
        // The hold counts from the first look, wherever it started.
        assert_eq!(
            decide(
                &[(at(700), skewed.clone()), (at(3600), skewed.clone())],
                &s()
            ),
            Decision::Watch
        );
    }
}

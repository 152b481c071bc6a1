//! One journal test suite, run on both backends: an SQLite file and a fresh PostgreSQL database
//! (the private test instance, see `pg_common`).

mod pg_common;

use bbupgrade::fleet::journal as fleet_journal;
use bbupgrade::fleet::journal::{ClusterState, FleetResult};
use bbupgrade::journal::{
    Journal, JournalError, NewRun, RunId, RunKind, RunResult, StepOutcome, this_process_holder,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

/// Where a test's journal lives; `open` may be called again for a second handle on the same one.
struct Store {
    open: Box<dyn Fn() -> Journal + Send + Sync>,
    _dir: Option<tempfile::TempDir>,
}

impl Store {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        Self {
            open: Box::new(move || Journal::open(&path).unwrap()),
            _dir: Some(dir),
        }
    }

    fn postgres() -> Option<Self> {
        let url = pg_common::fresh_database()?;
        Some(Self {
            open: Box::new(move || Journal::open_postgres(&url).unwrap()),
            _dir: None,
        })
    }

    fn open(&self) -> Journal {
        (self.open)()
    }
}

fn new_run(cluster: &str) -> NewRun {
    NewRun {
        cluster: cluster.into(),
        kind: RunKind::Upgrade,
        from_version: "8.19.3".into(),
        to_version: "8.19.6".into(),
        plan_json: r#"{"order":["n1","n2"]}"#.into(),
        actor: "alice@admin-host:7".into(),
        options_json: "{}".into(),
    }
}

fn run_and_steps_round_trip(s: &Store) {
    let j = s.open();
    let run = j.create_run(&new_run("prod")).unwrap();
    let rec = j.run(run).unwrap();
    assert_eq!(rec.cluster, "prod");
    assert_eq!(rec.kind, RunKind::Upgrade);
    assert_eq!(rec.plan_json, r#"{"order":["n1","n2"]}"#);
    assert_eq!(rec.result, None);
    assert!(rec.started_ms > 0);

    let s1 = j
        .begin_step(run, None, "upgrade_mode", "POST /start")
        .unwrap();
    j.end_step(s1, StepOutcome::Ok, "READY_TO_UPGRADE").unwrap();
    let s2 = j.begin_step(run, Some("n1"), "drain", "haproxy").unwrap();
    j.end_step(s2, StepOutcome::Failed("timeout".into()), "3 sessions left")
        .unwrap();
    let s3 = j.begin_step(run, Some("n1"), "stop", "").unwrap();

    let steps = j.steps(run).unwrap();
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[0].id, s1);
    assert_eq!(steps[0].node, None);
    assert_eq!(steps[0].outcome, Some(StepOutcome::Ok));
    assert_eq!(steps[0].detail, "POST /start");
    assert_eq!(steps[0].end_detail.as_deref(), Some("READY_TO_UPGRADE"));
    assert_eq!(steps[0].actor, "alice@admin-host:7");
    assert!(steps[0].ended_ms.is_some());
    assert_eq!(steps[1].node.as_deref(), Some("n1"));
    assert_eq!(
        steps[1].outcome,
        Some(StepOutcome::Failed("timeout".into()))
    );
    assert_eq!(steps[2].id, s3);
    assert_eq!(steps[2].outcome, None);
    assert_eq!(steps[2].ended_ms, None);

    assert_eq!(j.open_run("prod").unwrap().unwrap().id, run);
    assert!(j.open_run("other").unwrap().is_none());
    j.finish_run(run, RunResult::Halted, Some("drain timed out"))
        .unwrap();
    assert!(j.open_run("prod").unwrap().is_none());
    let latest = j.latest_run("prod").unwrap().unwrap();
    assert_eq!(latest.result, Some(RunResult::Halted));
    assert_eq!(latest.error.as_deref(), Some("drain timed out"));
    assert!(latest.ended_ms.is_some());

    let run2 = j.create_run(&new_run("prod")).unwrap();
    assert_eq!(j.latest_run("prod").unwrap().unwrap().id, run2);
    assert!(j.steps(run2).unwrap().is_empty());
}

fn missing_runs_are_reported(s: &Store) {
    let j = s.open();
    assert!(matches!(
        j.run(RunId(42)),
        Err(JournalError::NoSuchRun { .. })
    ));
    assert!(matches!(
        j.begin_step(RunId(42), None, "stage", ""),
        Err(JournalError::NoSuchRun { .. })
    ));
    assert!(matches!(
        j.finish_run(RunId(42), RunResult::Refused, None),
        Err(JournalError::NoSuchRun { .. })
    ));
}

fn run_state_is_per_run_and_overwritable(s: &Store) {
    let j = s.open();
    let a = j.create_run(&new_run("c")).unwrap();
    let b = j.create_run(&new_run("c")).unwrap();
    let key = "upgrade_mode_enabled_by_us";
    assert_eq!(j.get_run_state(a, key).unwrap(), None);
    j.set_run_state(a, key, "true").unwrap();
    j.set_run_state(a, key, "false").unwrap();
    assert_eq!(j.get_run_state(a, key).unwrap().as_deref(), Some("false"));
    assert_eq!(j.get_run_state(b, key).unwrap(), None);
}

fn journal_survives_reopen(s: &Store) {
    let (run, step) = {
        let j = s.open();
        let run = j.create_run(&new_run("prod")).unwrap();
        let step = j.begin_step(run, Some("n1"), "stop", "").unwrap();
        (run, step)
    };
    let j = s.open();
    assert_eq!(j.open_run("prod").unwrap().unwrap().id, run);
    j.end_step(step, StepOutcome::Ok, "stopped").unwrap();
    j.begin_step(run, Some("n1"), "activate", "").unwrap();
    let steps = j.steps(run).unwrap();
    assert_eq!(
        steps.iter().map(|s| s.step.as_str()).collect::<Vec<_>>(),
        ["stop", "activate"]
    );
}

fn second_acquire_fails_naming_the_holder_and_drop_releases(s: &Store) {
    let j = s.open();
    let me = this_process_holder();
    let lock = j.acquire_lock("prod", &me).unwrap();
    lock.heartbeat().unwrap();
    let err = j.acquire_lock("prod", "bob@elsewhere:1").unwrap_err();
    match &err {
        JournalError::Locked {
            cluster, holder, ..
        } => {
            assert_eq!(cluster, "prod");
            assert_eq!(holder, &me);
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    let other = j.acquire_lock("staging", &me).unwrap();
    drop(lock);
    let again = j.acquire_lock("prod", "bob@elsewhere:1").unwrap();
    again.release().unwrap();
    drop(other);
    j.acquire_lock("prod", &me).unwrap();
}

fn two_journals_never_both_hold_the_lock(s: &Store) {
    let s = Arc::new(s);
    s.open();
    let held = AtomicBool::new(false);
    let wins = AtomicU32::new(0);
    std::thread::scope(|scope| {
        for i in 0..2 {
            let (s, held, wins) = (&s, &held, &wins);
            scope.spawn(move || {
                let j = s.open();
                let holder = format!("{}-{i}", this_process_holder());
                for _ in 0..30 {
                    match j.acquire_lock("prod", &holder) {
                        Ok(lock) => {
                            assert!(!held.swap(true, Ordering::SeqCst), "both hold the lock");
                            wins.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(2));
                            held.store(false, Ordering::SeqCst);
                            lock.release().unwrap();
                        }
                        Err(JournalError::Locked { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
    });
    assert!(wins.load(Ordering::SeqCst) > 0);
}

fn fleet_run_round_trip(s: &Store) {
    let j = s.open();
    let names: Vec<String> = ["b", "a", "c"].iter().map(|s| s.to_string()).collect();
    let id = fleet_journal::create(&j, "8.19.6", "{}", "me@h:1", &names).unwrap();
    let rec = fleet_journal::run(&j, id).unwrap().unwrap();
    assert_eq!(rec.to_version, "8.19.6");
    assert_eq!(rec.result, None);
    assert_eq!(fleet_journal::latest(&j, true).unwrap().unwrap().id, id);
    let cs = fleet_journal::clusters(&j, id).unwrap();
    assert_eq!(
        cs.iter().map(|c| c.cluster.as_str()).collect::<Vec<_>>(),
        ["b", "a", "c"]
    );
    assert!(cs.iter().all(|c| c.state == ClusterState::Pending));

    fleet_journal::set_state(&j, id, "a", ClusterState::Running, None).unwrap();
    fleet_journal::set_state(
        &j,
        id,
        "b",
        ClusterState::Skipped,
        Some("outside its window"),
    )
    .unwrap();
    let run = j.create_run(&new_run("a")).unwrap();
    fleet_journal::set_cluster_run(&j, id, "a", run).unwrap();
    let cs = fleet_journal::clusters(&j, id).unwrap();
    assert_eq!(cs[1].state, ClusterState::Running);
    assert_eq!(cs[1].cluster_run_id, Some(run.0));
    assert!(cs[1].started_ms.is_some() && cs[1].ended_ms.is_none());
    assert_eq!(cs[0].reason.as_deref(), Some("outside its window"));

    fleet_journal::finish(&j, id, FleetResult::Incomplete, None).unwrap();
    assert_eq!(
        fleet_journal::latest(&j, true).unwrap().unwrap().result,
        Some(FleetResult::Incomplete)
    );
    fleet_journal::reopen(&j, id, "you@h:2").unwrap();
    let rec = fleet_journal::run(&j, id).unwrap().unwrap();
    assert_eq!((rec.result, rec.actor.as_str()), (None, "you@h:2"));
    fleet_journal::finish(&j, id, FleetResult::Upgraded, None).unwrap();
    assert!(fleet_journal::latest(&j, true).unwrap().is_none());
    assert_eq!(fleet_journal::latest(&j, false).unwrap().unwrap().id, id);
    assert!(
        fleet_journal::run(&j, bbupgrade::fleet::journal::FleetRunId(99))
            .unwrap()
            .is_none()
    );
}

fn commit_without_fsync_keeps_working(s: &Store) {
    let j = s.open();
    j.commit_without_fsync().unwrap();
    let run = j.create_run(&new_run("x")).unwrap();
    j.finish_run(run, RunResult::Upgraded, None).unwrap();
    let other = s.open();
    assert_eq!(
        other.latest_run("x").unwrap().unwrap().result,
        Some(RunResult::Upgraded)
    );
}

/// Each case once per backend: `sqlite::<case>` and `postgres::<case>`.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $case() {
                    super::$case(&super::Store::sqlite());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $case() {
                    if let Some(store) = super::Store::postgres() {
                        super::$case(&store);
                    }
                }
            )*
        }
    };
}

suite!(
    run_and_steps_round_trip,
    missing_runs_are_reported,
    run_state_is_per_run_and_overwritable,
    journal_survives_reopen,
    second_acquire_fails_naming_the_holder_and_drop_releases,
    two_journals_never_both_hold_the_lock,
    fleet_run_round_trip,
    commit_without_fsync_keeps_working,
);

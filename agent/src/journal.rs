//! The agent's local journal: one JSON record per operation id, so a repeated request returns the
//! recorded result and an operation cut short by a crash is known as interrupted, never half-done.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use tonic::Status;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    Running,
    Succeeded,
    Failed,
    Interrupted,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpRecord {
    pub operation_id: String,
    pub kind: String,
    pub state: OpState,
    pub error: Option<String>,
    pub started_unix_ms: u64,
    pub finished_unix_ms: Option<u64>,
    pub result: Option<serde_json::Value>,
}

/// What to do with a request, given the journal.
#[derive(Debug, PartialEq)]
pub enum Admission {
    /// First time, or an earlier attempt failed or was interrupted: run it.
    Run,
    /// It completed: answer with the recorded result.
    Replay(serde_json::Value),
}

pub struct OpJournal {
    dir: PathBuf,
    running: Mutex<HashSet<String>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn valid_op_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        && !id.starts_with('.')
}

/// Decides admission from the record, pure.
#[allow(clippy::result_large_err)]
pub fn admit(
    record: Option<&OpRecord>,
    kind: &str,
    running_now: bool,
) -> Result<Admission, Status> {
    if running_now {
        return Err(Status::aborted(
            "this operation id is still running; poll OperationStatus",
        ));
    }
    match record {
        None => Ok(Admission::Run),
        Some(r) if r.kind != kind => Err(Status::invalid_argument(format!(
            "operation id '{}' was already used for '{}', not '{kind}'; use a new id",
            r.operation_id, r.kind
        ))),
        Some(r) if r.state == OpState::Succeeded => Ok(Admission::Replay(
            r.result.clone().unwrap_or(serde_json::Value::Null),
        )),
        Some(_) => Ok(Admission::Run),
    }
}

impl OpJournal {
    /// Opens the journal; records left `running` by a crash become `interrupted`.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("operations");
        std::fs::create_dir_all(&dir)?;
        let journal = Self {
            dir,
            running: Mutex::new(HashSet::new()),
        };
        for entry in std::fs::read_dir(&journal.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Some(mut rec) = read_record(&path)
                && rec.state == OpState::Running
            {
                rec.state = OpState::Interrupted;
                rec.error = Some("the agent stopped while this operation ran".into());
                journal.write(&rec)?;
            }
        }
        Ok(journal)
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn get(&self, id: &str) -> Option<OpRecord> {
        if !valid_op_id(id) {
            return None;
        }
        read_record(&self.path(id))
    }

    fn write(&self, rec: &OpRecord) -> std::io::Result<()> {
        let path = self.path(&rec.operation_id);
        crate::rootfs::write_config_file(&path, &serde_json::to_vec_pretty(rec)?, 0o644)
    }

    /// Starts an operation, or says it completed before (with its result).
    #[allow(clippy::result_large_err)]
    pub fn begin(&self, id: &str, kind: &str) -> Result<Admission, Status> {
        if !valid_op_id(id) {
            return Err(Status::invalid_argument(format!(
                "operation id '{}' is empty, longer than 128 bytes, or has characters other than letters, digits, '-', '_', '.', ':'",
                bbupgrade_common::echo::quote(id)
            )));
        }
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let admission = admit(self.get(id).as_ref(), kind, running.contains(id))?;
        if admission == Admission::Run {
            running.insert(id.to_string());
            let rec = OpRecord {
                operation_id: id.to_string(),
                kind: kind.to_string(),
                state: OpState::Running,
                error: None,
                started_unix_ms: now_ms(),
                finished_unix_ms: None,
                result: None,
            };
            self.write(&rec)
                .map_err(|e| Status::internal(format!("writing the agent journal: {e}")))?;
        }
        Ok(admission)
    }

    /// Records how an operation begun with [`begin`](Self::begin) ended.
    pub fn finish(&self, id: &str, outcome: Result<serde_json::Value, String>) {
        let mut rec = self.get(id).unwrap_or_else(|| OpRecord {
            operation_id: id.to_string(),
            kind: String::new(),
            state: OpState::Running,
            error: None,
            started_unix_ms: now_ms(),
            finished_unix_ms: None,
            result: None,
        });
        rec.finished_unix_ms = Some(now_ms());
        match outcome {
            Ok(v) => {
                rec.state = OpState::Succeeded;
                rec.result = Some(v);
            }
            Err(e) => {
                rec.state = OpState::Failed;
                // Errors quote inputs; a record stays small whatever was sent.
                rec.error = Some(
                    bbupgrade_common::echo::truncate(&e, bbupgrade_common::echo::MAX_ERROR_CHARS)
                        .into_owned(),
                );
            }
        }
        log_end(&rec);
        if let Err(e) = self.write(&rec) {
            tracing::error!(operation = id, error = %e, "could not record an operation's end");
        }
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Runs `work` once per operation id: replays a completed result, records the outcome.
    pub async fn run<T, F>(&self, id: &str, kind: &str, work: F) -> Result<T, Status>
    where
        T: Serialize + DeserializeOwned,
        F: std::future::Future<Output = Result<T, Status>>,
    {
        match self.begin(id, kind)? {
            Admission::Replay(v) => serde_json::from_value(v).map_err(|e| {
                Status::internal(format!("the recorded result of '{id}' is unreadable: {e}"))
            }),
            Admission::Run => {
                let out = work.await;
                let recorded = match &out {
                    Ok(v) => serde_json::to_value(v).map_err(|e| e.to_string()),
                    Err(s) => Err(s.message().to_string()),
                };
                self.finish(id, recorded);
                out
            }
        }
    }
}

fn read_record(path: &Path) -> Option<OpRecord> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The one log line of a finished operation (journald shows it with the agent's unit).
fn log_end(rec: &OpRecord) {
    let ms = rec
        .finished_unix_ms
        .unwrap_or(rec.started_unix_ms)
        .saturating_sub(rec.started_unix_ms);
    match &rec.error {
        None => tracing::info!(
            "operation {} ({}) succeeded in {ms} ms",
            rec.operation_id,
            rec.kind
        ),
        Some(e) => tracing::warn!(
            "operation {} ({}) failed after {ms} ms: {e}",
            rec.operation_id,
            rec.kind
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replays_completed_operations_and_marks_interrupted_ones() {
        let dir = tempfile::tempdir().unwrap();
        let j = OpJournal::open(dir.path()).unwrap();
        let calls = std::sync::atomic::AtomicU32::new(0);
        for _ in 0..2 {
            let v: u32 = j
                .run("op-1", "stop", async {
                    calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok(7)
                })
                .await
                .unwrap();
            assert_eq!(v, 7);
        }
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "work must run once"
        );
        let err = j
            .run("op-1", "start", async { Ok(1u32) })
            .await
            .unwrap_err();
        assert!(err.message().contains("already used for 'stop'"), "{err}");
        assert!(j.begin("../x", "stop").is_err());

        // A failed operation may be retried with the same id.
        let _ = j
            .run::<u32, _>("op-2", "stop", async { Err(Status::internal("boom")) })
            .await;
        assert_eq!(j.get("op-2").unwrap().state, OpState::Failed);
        assert_eq!(j.run("op-2", "stop", async { Ok(3u32) }).await.unwrap(), 3);

        // Running when the agent died: interrupted after reopening, and runnable again.
        assert_eq!(j.begin("op-3", "stage").unwrap(), Admission::Run);
        assert!(
            j.begin("op-3", "stage").is_err(),
            "concurrent repeat is refused"
        );
        drop(j);
        let j = OpJournal::open(dir.path()).unwrap();
        assert_eq!(j.get("op-3").unwrap().state, OpState::Interrupted);
        assert_eq!(j.begin("op-3", "stage").unwrap(), Admission::Run);
    }

    #[test]
    fn a_huge_error_is_recorded_cut() {
        let dir = tempfile::tempdir().unwrap();
        let j = OpJournal::open(dir.path()).unwrap();
        assert_eq!(j.begin("big", "stage").unwrap(), Admission::Run);
        j.finish("big", Err("x".repeat(10 << 20)));
        let rec = j.get("big").unwrap();
        assert_eq!(rec.state, OpState::Failed);
        let err = rec.error.unwrap();
        assert!(
            err.len() < 5000 && err.contains("more bytes"),
            "{}",
            err.len()
        );
        let e = j.begin(&"y".repeat(10 << 20), "stage").unwrap_err();
        assert!(e.message().len() < 1000, "{}", e.message().len());
    }
}

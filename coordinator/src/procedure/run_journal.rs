//! The run's journal behind the driver's `RunJournal` trait, each call on a blocking thread
//! (SQLite's disk, PostgreSQL's round trip), never on the async executor.

use super::Step;
use super::drive::RunJournal;
use crate::journal::{Journal, JournalError, RunId, RunResult, StepId, StepOutcome, StepRecord};
use anyhow::{Context, Result};
use async_trait::async_trait;
use std::sync::Arc;

/// The run's journal, each call on a blocking thread (SQLite's disk, PostgreSQL's round trip).
pub struct JournalOnThread {
    journal: Arc<Journal>,
    run: RunId,
}

impl JournalOnThread {
    pub fn new(journal: Arc<Journal>, run: RunId) -> Self {
        Self { journal, run }
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Journal, RunId) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T> {
        let (j, run) = (self.journal.clone(), self.run);
        Ok(tokio::task::spawn_blocking(move || f(&j, run))
            .await
            .context("the journal's thread failed")??)
    }
}

#[async_trait]
impl RunJournal for JournalOnThread {
    async fn begin_step(&self, node: Option<&str>, step: Step, detail: &str) -> Result<StepId> {
        let (node, detail) = (node.map(str::to_string), detail.to_string());
        self.call(move |j, run| j.begin_step(run, node.as_deref(), step.as_str(), &detail))
            .await
    }

    async fn end_step(&self, id: StepId, outcome: StepOutcome, detail: &str) -> Result<()> {
        let detail = detail.to_string();
        self.call(move |j, _| j.end_step(id, outcome, &detail))
            .await
    }

    async fn steps(&self) -> Result<Vec<StepRecord>> {
        self.call(|j, run| j.steps(run)).await
    }

    async fn finish_run(&self, result: RunResult, error: Option<&str>) -> Result<()> {
        let error = error.map(str::to_string);
        self.call(move |j, run| j.finish_run(run, result, error.as_deref()))
            .await
    }
}

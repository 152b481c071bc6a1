//! A load generator for rolling-upgrade tests and the demo: many virtual users, each with its own
//! session (cookie jar), send a steady stream of short page/REST requests and long Git-over-HTTP
//! clones through the load balancer, and Git-over-SSH clones through its SSH front door when given
//! one, for a set time or until stopped, and the run is reported.
//!
//! Counting rules: every HTTP request counts once in `total` (a clone is two, `info/refs` then
//! `git-upload-pack`, like a real `git clone`). A request fails on a connection error or timeout, a
//! status >= 500, or a body that ends before its announced end (`Content-Length`, or the chunked
//! terminator, as hyper checks; the byte count is also checked here). Nothing is retried: a failed
//! request is a failed request. An SSH clone counts apart (`ssh_total`, `ssh_failed`): it fails when
//! refused (connection refused or closed, `ERR` answer), cut (the pack ends short) or timed out.
//! Decisions and tallies are in `report` (pure); this file is the driver.

mod report;
mod ssh;

use std::error::Error as StdError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use report::{Exchange, Kind, Outcome, Served, SshSession, Stats};
pub use report::{LoadReport, Percentiles, SshOutcome};

/// Idle connections a user keeps per host: one user is one browser-like client, sequential.
const POOL_MAX_IDLE_PER_HOST: usize = 2;
/// How long `stop` waits past `request_timeout` before abandoning requests still in flight.
const STOP_MARGIN_MS: u64 = 1_000;
/// The short requests a user alternates between.
const PAGES: &[&str] = &["/", "/rest/api/1.0/projects"];
/// Repositories the users clone (spread so a cache-keyed proxy would still see several).
const REPOS: u64 = 4;
/// A minimal upload-pack request body (a want line and flush), enough for a stand-in server.
const UPLOAD_PACK_BODY: &[u8] =
    b"0032want 0000000000000000000000000000000000000000\n00000009done\n";

/// What load to generate.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where to send it (the load balancer), e.g. `http://127.0.0.1:7990`.
    pub base_url: String,
    /// Concurrent virtual users, each with its own cookie jar (session).
    pub users: usize,
    /// Every Nth request of a user is a clone; 0 = none.
    pub clone_every: u32,
    /// The load balancer's SSH front door, `HOST:PORT`; `None` sends no SSH clones.
    pub ssh_addr: Option<String>,
    /// With `ssh_addr`, every Nth request of a user is a Git-over-SSH clone (half a period apart
    /// from the HTTP clones); 0 = none.
    pub ssh_clone_every: u32,
    /// Pause between a user's requests.
    pub think_ms: u64,
    /// How long to run; `None` runs until `LoadHandle::stop`.
    pub duration: Option<Duration>,
    /// Longest one request (or one whole clone) may take, body included.
    pub request_timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            base_url: "http://127.0.0.1:7990".into(),
            users: 10,
            clone_every: 10,
            ssh_addr: None,
            ssh_clone_every: 10,
            think_ms: 200,
            duration: None,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// What one request of a user is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A short request to `PAGES[i]`.
    Page(usize),
    Clone,
    SshClone,
}

/// The `n`th request (from 1) of a user when SSH clones are sent every `ssh_every`th (offset by half
/// a period, so they do not replace the HTTP clones of the same period), else as [`plan`] says.
fn plan_with_ssh(n: u64, clone_every: u32, ssh_every: u32) -> Step {
    let every = u64::from(ssh_every);
    if every > 0 && n % every == every / 2 {
        return Step::SshClone;
    }
    plan(n, clone_every)
}

/// The `n`th request (from 1) of a user: every `clone_every`th a clone, the others alternating pages.
fn plan(n: u64, clone_every: u32) -> Step {
    let every = u64::from(clone_every);
    if every > 0 && n.is_multiple_of(every) {
        return Step::Clone;
    }
    let clones_before = n.checked_div(every).unwrap_or(0);
    let page = (n - clones_before - 1) % PAGES.len() as u64;
    Step::Page(usize::try_from(page).unwrap_or(0))
}

/// What the users share.
struct Run {
    opts: LoadOptions,
    base_url: String,
    started: Instant,
    deadline: Option<Instant>,
    stats: Mutex<Stats>,
}

impl Run {
    fn record(&self, ex: &Exchange) {
        if let Ok(mut s) = self.stats.lock() {
            s.record(ex);
        }
    }

    fn record_clone(&self, ok: bool, elapsed: Duration) {
        if let Ok(mut s) = self.stats.lock() {
            s.record_clone(ok, elapsed);
        }
    }

    fn record_run_error(&self, description: String) {
        if let Ok(mut s) = self.stats.lock() {
            s.record_run_error(description);
        }
    }

    fn report(&self) -> LoadReport {
        let elapsed = self.started.elapsed();
        match self.stats.lock() {
            Ok(s) => s.report(elapsed),
            Err(poisoned) => poisoned.into_inner().report(elapsed),
        }
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// A running load; `stop` it to get the final report.
pub struct LoadHandle {
    run: Arc<Run>,
    stop_tx: watch::Sender<bool>,
    users: Vec<JoinHandle<()>>,
}

/// Starts the load on the current tokio runtime (panics outside one, as `tokio::spawn` does).
pub fn start(opts: LoadOptions) -> LoadHandle {
    let started = Instant::now();
    let run = Arc::new(Run {
        base_url: opts.base_url.trim_end_matches('/').to_string(),
        deadline: opts.duration.map(|d| started + d),
        started,
        stats: Mutex::new(Stats::default()),
        opts,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let users = (0..run.opts.users)
        .map(|i| tokio::spawn(user(i, Arc::clone(&run), stop_rx.clone())))
        .collect();
    LoadHandle {
        run,
        stop_tx,
        users,
    }
}

impl LoadHandle {
    /// The tallies so far (the run goes on).
    pub fn snapshot(&self) -> LoadReport {
        self.run.report()
    }

    /// Stops new requests, waits for those in flight (at most `request_timeout` and a margin), and
    /// reports. Requests abandoned past that are not counted.
    pub async fn stop(mut self) -> LoadReport {
        self.stop_tx.send_replace(true);
        let grace = self.run.opts.request_timeout + Duration::from_millis(STOP_MARGIN_MS);
        let all = futures::future::join_all(self.users.iter_mut());
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("load users still busy {grace:?} after stop; abandoning them");
        }
        for user in &self.users {
            user.abort();
        }
        self.run.report()
    }
}

/// Runs the load for `opts.duration` and reports. Without a duration nothing is sent and the
/// report carries that as its one failure.
pub async fn run_for(opts: LoadOptions) -> LoadReport {
    let Some(duration) = opts.duration else {
        let handle = start(LoadOptions { users: 0, ..opts });
        handle
            .run
            .record_run_error("run_for needs LoadOptions::duration; nothing was sent".into());
        return handle.stop().await;
    };
    let handle = start(opts);
    tokio::time::sleep(duration).await;
    handle.stop().await
}

/// True once a stop was asked for (or the handle is gone).
fn stopped(rx: &watch::Receiver<bool>) -> bool {
    rx.has_changed().map_or(true, |_| *rx.borrow())
}

/// One virtual user: its own client and cookie jar, requests one after another until stopped.
async fn user(index: usize, run: Arc<Run>, mut stop: watch::Receiver<bool>) {
    let client = match reqwest::Client::builder()
        .cookie_store(true)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .timeout(run.opts.request_timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            run.record_run_error(format!(
                "user {index}: building its HTTP client failed: {}",
                chain(e)
            ));
            return;
        }
    };
    // Spread the users' first requests over one think time so they do not arrive in lockstep.
    let users = u64::try_from(run.opts.users.max(1)).unwrap_or(1);
    let offset = run.opts.think_ms * u64::try_from(index).unwrap_or(0) / users;
    if !pause(&run, &mut stop, offset).await {
        return;
    }
    let ssh_every = if run.opts.ssh_addr.is_some() {
        run.opts.ssh_clone_every
    } else {
        0
    };
    let mut n = 0u64;
    while !stopped(&stop) && !run.past_deadline() {
        n += 1;
        match plan_with_ssh(n, run.opts.clone_every, ssh_every) {
            Step::Page(i) => {
                let url = format!("{}{}", run.base_url, PAGES[i]);
                let deadline = Instant::now() + run.opts.request_timeout;
                let ex = exchange(&run, &client, "GET", url, Kind::Page, deadline).await;
                run.record(&ex);
            }
            Step::Clone => clone(&run, &client, index as u64 + n).await,
            Step::SshClone => ssh_clone(&run, index as u64 + n).await,
        }
        if !pause(&run, &mut stop, run.opts.think_ms).await {
            return;
        }
    }
}

/// Sleeps `ms` (or until the run's end); false when the user should stop.
async fn pause(run: &Run, stop: &mut watch::Receiver<bool>, ms: u64) -> bool {
    if ms == 0 {
        return true;
    }
    let mut until = Instant::now() + Duration::from_millis(ms);
    if let Some(d) = run.deadline {
        until = until.min(d);
    }
    tokio::select! {
        _ = stop.changed() => false,
        _ = tokio::time::sleep_until(until) => !run.past_deadline(),
    }
}

/// A Git-over-HTTP clone: ref advertisement, then the pack; both bodies read to their end.
async fn clone(run: &Run, client: &reqwest::Client, seed: u64) {
    let started = Instant::now();
    let deadline = started + run.opts.request_timeout;
    let repo = format!("{}/scm/prj/repo{}.git", run.base_url, seed % REPOS);
    let refs = format!("{repo}/info/refs?service=git-upload-pack");
    let ex = exchange(run, client, "GET", refs, Kind::Clone, deadline).await;
    run.record(&ex);
    let mut ok = ex.outcome.is_success();
    if ok {
        let pack = format!("{repo}/git-upload-pack");
        let ex = exchange(run, client, "POST", pack, Kind::Clone, deadline).await;
        run.record(&ex);
        ok = ex.outcome.is_success();
    }
    run.record_clone(ok, started.elapsed());
}

/// One Git-over-SSH clone of `repo` through `addr` (`HOST:PORT`), outside a load run.
pub async fn clone_over_ssh(addr: &str, repo: &str, timeout: Duration) -> SshOutcome {
    ssh::clone(addr, repo, timeout).await
}

/// A Git-over-SSH clone through the SSH front door.
async fn ssh_clone(run: &Run, seed: u64) {
    let Some(addr) = run.opts.ssh_addr.as_deref() else {
        return;
    };
    let started = Instant::now();
    let repo = format!("/prj/repo{}.git", seed % REPOS);
    let outcome = ssh::clone(addr, &repo, run.opts.request_timeout).await;
    let session = SshSession {
        at: started.duration_since(run.started),
        addr: addr.to_string(),
        repo,
        elapsed: started.elapsed(),
        outcome,
    };
    if let Ok(mut s) = run.stats.lock() {
        s.record_ssh(&session);
    }
}

/// Sends one request and reads its body to the end (counting bytes, not keeping them).
async fn exchange(
    run: &Run,
    client: &reqwest::Client,
    method: &'static str,
    url: String,
    kind: Kind,
    deadline: Instant,
) -> Exchange {
    let started = Instant::now();
    let at = started.duration_since(run.started);
    let request = if method == "POST" {
        client
            .post(&url)
            .header("Content-Type", "application/x-git-upload-pack-request")
            .body(UPLOAD_PACK_BODY)
    } else {
        client.get(&url)
    };
    let timeout = deadline
        .saturating_duration_since(started)
        .max(Duration::from_millis(1));
    let outcome = match request.timeout(timeout).send().await {
        Err(e) => Outcome::NoResponse(chain(e)),
        Ok(mut response) => {
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let served = Served {
                status: response.status().as_u16(),
                node: header("x-sim-node"),
                version: header("x-sim-version"),
            };
            let expected = response.content_length();
            let mut received = 0u64;
            loop {
                match response.chunk().await {
                    Ok(Some(piece)) => received += piece.len() as u64,
                    Ok(None) => match expected {
                        Some(len) if received != len => {
                            break Outcome::Interrupted(
                                served,
                                format!("body ended after {received} of {len} bytes"),
                            );
                        }
                        _ => break Outcome::Complete(served),
                    },
                    Err(e) => {
                        let of = expected.map(|l| format!(" of {l}")).unwrap_or_default();
                        break Outcome::Interrupted(
                            served,
                            format!("after {received}{of} bytes: {}", chain(e)),
                        );
                    }
                }
            }
        }
    };
    Exchange {
        at,
        method,
        url,
        kind,
        elapsed: started.elapsed(),
        outcome,
    }
}

/// An error and its causes on one line (reqwest's own message omits the cause, e.g. "refused");
/// without the URL, which the failure description already names.
fn chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = if e.is_timeout() {
        format!("timed out ({e})")
    } else {
        e.to_string()
    };
    let mut source = e.source();
    while let Some(cause) = source {
        let msg = cause.to_string();
        if !text.contains(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_mixes_pages_and_clones() {
        let steps: Vec<Step> = (1..=6).map(|n| plan(n, 3)).collect();
        assert_eq!(
            steps,
            [
                Step::Page(0),
                Step::Page(1),
                Step::Clone,
                Step::Page(0),
                Step::Page(1),
                Step::Clone
            ]
        );
        assert!((1..100).all(|n| plan(n, 0) != Step::Clone));
        assert_eq!(plan(1, 0), Step::Page(0));
        assert_eq!(plan(2, 0), Step::Page(1));
        assert!((1..10).all(|n| plan(n, 1) == Step::Clone));
        // With every other request a clone, the pages still alternate.
        assert_eq!(plan(1, 2), Step::Page(0));
        assert_eq!(plan(3, 2), Step::Page(1));
    }

    #[test]
    fn ssh_clones_sit_between_http_clones() {
        let steps: Vec<Step> = (1..=8).map(|n| plan_with_ssh(n, 4, 4)).collect();
        assert_eq!(steps[1], Step::SshClone);
        assert_eq!(steps[3], Step::Clone);
        assert_eq!(steps[5], Step::SshClone);
        assert_eq!(steps[7], Step::Clone);
        assert!((1..50).all(|n| plan_with_ssh(n, 3, 0) == plan(n, 3)));
        assert!((1..10).all(|n| plan_with_ssh(n, 0, 1) == Step::SshClone));
    }
}

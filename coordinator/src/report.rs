//! What a person or a pipeline sees of a run: step events as lines (human) or JSON lines, progress
//! bars for staging, and the final summary document.

use crate::journal::RunResult;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a command prints: for people, or one JSON document / JSON lines for programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    #[default]
    Human,
    Json,
}

/// The final document of `upgrade`, `resume`, `rollback` and `demo` (stable field names).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    pub cluster: String,
    pub from: String,
    pub to: String,
    /// "upgraded" | "rolled_back" | "halted" | "refused"
    pub result: RunResult,
    pub order: Vec<String>,
    pub nodes: Vec<NodeSummary>,
    pub duration_ms: u64,
    pub error: Option<String>,
    pub run_id: Option<i64>,
    /// Why each node was picked when it was (least-busy ranking at that moment).
    pub order_reasons: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct NodeSummary {
    pub id: String,
    pub version_before: String,
    pub version_after: String,
    pub out_of_service_ms: u64,
}

/// One step event as a JSON line.
#[derive(Serialize)]
struct Event<'a> {
    event: &'a str,
    /// Wall-clock time, RFC 3339 in UTC.
    time: String,
    t_ms: u64,
    node: Option<&'a str>,
    step: &'a str,
    status: &'a str,
    detail: &'a str,
    /// How long the step took (ok / failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<u64>,
}

/// A long wait's sign of life as a JSON line.
#[derive(Serialize)]
struct Heartbeat<'a> {
    event: &'a str,
    time: String,
    t_ms: u64,
    node: &'a str,
    step: &'a str,
    elapsed_ms: u64,
    /// What the node's status said last (through its agent), e.g. STOPPING.
    state: &'a str,
    deadline_ms: u64,
}

/// A step begun and not yet ended: when, and its in-place line on a terminal.
struct OpenStep {
    began: Instant,
    line: Option<ProgressBar>,
}

/// How often a terminal's in-place step line redraws its elapsed time.
const TICK_MS: u64 = 500;

pub struct Reporter {
    pub output: Output,
    started: Instant,
    bars: Option<MultiProgress>,
    quiet: bool,
    colour: bool,
    open: Mutex<HashMap<(String, String), OpenStep>>,
    /// Per node, (absolute prefix, short form): its install root and home, shown shortened.
    paths: Mutex<Vec<(String, String)>>,
}

fn wall_clock() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Millisecond)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string())
}

impl Reporter {
    pub fn new(output: Output) -> Self {
        let bars = (output == Output::Human && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self {
            output,
            started: Instant::now(),
            bars,
            quiet: false,
            colour: bbupgrade_common::logging::stderr_colour(),
            open: Mutex::new(HashMap::new()),
            paths: Mutex::new(Vec::new()),
        }
    }

    /// A reporter that prints nothing (the demo's inner runs in JSON mode).
    pub fn silent() -> Self {
        Self {
            quiet: true,
            bars: None,
            ..Self::new(Output::Json)
        }
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Remembers a node's install root and home, so human output names paths under them
    /// relative to them (`<install root>/8.19.6`) instead of repeating them whole.
    pub fn learn_paths(&self, install_root: &str, home: &str) {
        let mut paths = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        for (prefix, short) in [(install_root, "<install root>"), (home, "<home>")] {
            let prefix = prefix.trim_end_matches('/');
            if prefix.len() > 1 && !paths.iter().any(|(p, _)| p == prefix) {
                paths.push((prefix.to_string(), short.to_string()));
            }
        }
        // Longest first, so a home inside the install root is shortened by its own name.
        paths.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    }

    /// `detail` with the learnt roots shortened (human output only; JSON keeps whole paths).
    fn shorten(&self, detail: &str) -> String {
        let paths = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        shorten_paths(detail, &paths)
    }

    /// One step event: `status` is begin | ok | failed | skipped | info.
    pub fn step(&self, node: Option<&str>, step: &str, status: &str, detail: &str) {
        if self.quiet {
            return;
        }
        let key = (node.unwrap_or("").to_string(), step.to_string());
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let ended = match status {
            "begin" => None,
            "ok" | "failed" => open.remove(&key),
            _ => None,
        };
        let duration_ms = ended.as_ref().map(|o| o.began.elapsed().as_millis() as u64);
        match self.output {
            Output::Json => {
                let e = Event {
                    event: "step",
                    time: wall_clock(),
                    t_ms: self.elapsed_ms(),
                    node,
                    step,
                    status,
                    detail,
                    duration_ms,
                };
                if let Ok(line) = serde_json::to_string(&e) {
                    println!("{line}");
                }
            }
            Output::Human => {
                let line = self.human_line(node, step, status, duration_ms, detail);
                match (&self.bars, status, ended.and_then(|o| o.line)) {
                    (Some(bars), "begin", _) => {
                        let bar = bars.add(ProgressBar::new_spinner());
                        bar.set_style(
                            ProgressStyle::with_template("{msg} {elapsed}")
                                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                        );
                        bar.set_message(line);
                        bar.enable_steady_tick(std::time::Duration::from_millis(TICK_MS));
                        let old = open.insert(
                            key,
                            OpenStep {
                                began: Instant::now(),
                                line: Some(bar),
                            },
                        );
                        // A step begun again (a retry) replaces its unfinished line.
                        if let Some(line) = old.and_then(|o| o.line) {
                            line.finish_and_clear();
                        }
                        return;
                    }
                    (_, _, Some(bar)) => {
                        // The step's line becomes its result, in place.
                        bar.set_style(
                            ProgressStyle::with_template("{msg}")
                                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                        );
                        bar.finish_with_message(line);
                    }
                    (Some(bars), _, None) => {
                        let _ = bars.println(line);
                    }
                    (None, _, _) => eprintln!("{line}"),
                }
            }
        }
        if status == "begin" {
            open.insert(
                key,
                OpenStep {
                    began: Instant::now(),
                    line: None,
                },
            );
        }
    }

    /// A sign of life during a long wait (a node stopping or starting): the time so far, the
    /// state last seen and the deadline. On a terminal it updates the step's line in place.
    pub fn heartbeat(
        &self,
        node: &str,
        step: &str,
        elapsed: Duration,
        state: &str,
        deadline: Duration,
    ) {
        if self.quiet {
            return;
        }
        match self.output {
            Output::Json => {
                let h = Heartbeat {
                    event: "heartbeat",
                    time: wall_clock(),
                    t_ms: self.elapsed_ms(),
                    node,
                    step,
                    elapsed_ms: elapsed.as_millis() as u64,
                    state,
                    deadline_ms: deadline.as_millis() as u64,
                };
                if let Ok(line) = serde_json::to_string(&h) {
                    println!("{line}");
                }
            }
            Output::Human => {
                let wait = format!(
                    "waiting {:.0}s of {:.0}s; Bitbucket says {state}",
                    elapsed.as_secs_f64(),
                    deadline.as_secs_f64()
                );
                let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
                let key = (node.to_string(), step.to_string());
                match open.get(&key).and_then(|o| o.line.as_ref()) {
                    Some(bar) => {
                        bar.set_message(self.human_line(Some(node), step, "begin", None, &wait))
                    }
                    None => eprintln!(
                        "{}",
                        self.human_line(Some(node), step, "waiting", None, &wait)
                    ),
                }
            }
        }
    }

    /// `[   12.3s] node1        stop           ok   2.1s  detail` (status coloured on a terminal).
    fn human_line(
        &self,
        node: Option<&str>,
        step: &str,
        status: &str,
        duration_ms: Option<u64>,
        detail: &str,
    ) -> String {
        let took = duration_ms.map_or_else(String::new, |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let status_text = format!("{status:<8}");
        let status_text = match (self.colour, status) {
            (true, "ok") => format!("\x1b[32m{status_text}\x1b[0m"),
            (true, "failed") => format!("\x1b[1;31m{status_text}\x1b[0m"),
            (true, "begin" | "waiting") => format!("\x1b[36m{status_text}\x1b[0m"),
            _ => status_text,
        };
        format!(
            "[{:>7.1}s] {:<12} {:<14} {status_text} {took:>6} {}",
            self.started.elapsed().as_secs_f64(),
            node.unwrap_or("cluster"),
            step,
            self.shorten(detail)
        )
        .trim_end()
        .to_string()
    }

    /// A progress bar for a node's staging (only on a terminal in human mode).
    pub fn stage_bar(&self, node: &str, total: u64) -> Option<ProgressBar> {
        let bars = self.bars.as_ref()?;
        let bar = bars.add(ProgressBar::new(total.max(1)));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:<12} staging [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(node.to_string());
        Some(bar)
    }

    pub fn summary(&self, s: &Summary) {
        if self.quiet {
            return;
        }
        match self.output {
            Output::Json => {
                if let Ok(text) =
                    serde_json::to_string(&serde_json::json!({ "event": "summary", "summary": s }))
                {
                    println!("{text}");
                }
            }
            Output::Human => print!("{}", render_summary(s)),
        }
    }
}

pub fn render_summary(s: &Summary) -> String {
    let mut out = format!(
        "\ncluster {}: {} -> {}: {} in {:.1}s\n",
        s.cluster,
        s.from,
        s.to,
        s.result.as_str().to_uppercase(),
        s.duration_ms as f64 / 1000.0
    );
    if !s.nodes.is_empty() {
        out.push_str(&format!(
            "{:<14} {:<10} {:<10} {:>16}\n",
            "NODE", "BEFORE", "AFTER", "OUT OF SERVICE"
        ));
        for n in &s.nodes {
            out.push_str(&format!(
                "{:<14} {:<10} {:<10} {:>15.1}s\n",
                n.id,
                n.version_before,
                n.version_after,
                n.out_of_service_ms as f64 / 1000.0
            ));
        }
    }
    if !s.order.is_empty() {
        out.push_str(&format!("order: {}\n", s.order.join(" -> ")));
    }
    for r in &s.order_reasons {
        out.push_str(&format!("  {r}\n"));
    }
    for n in &s.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    if let Some(e) = &s.error {
        out.push_str(&format!("error: {e}\n"));
    }
    out
}

/// Replaces each `prefix` (a whole path component sequence) in `text` by its short form.
fn shorten_paths(text: &str, paths: &[(String, String)]) -> String {
    let mut out = text.to_string();
    for (prefix, short) in paths {
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(prefix.as_str()) {
            let after = &rest[i + prefix.len()..];
            let whole = after.is_empty() || after.starts_with(['/', ' ', ')', ',', ';', '\'', '"']);
            result.push_str(&rest[..i]);
            result.push_str(if whole { short } else { prefix });
            rest = after;
        }
        result.push_str(rest);
        out = result;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_roots_and_homes_are_shortened_in_human_details() {
        let paths = vec![
            ("/tmp/s/node1/home".to_string(), "<home>".to_string()),
            (
                "/tmp/s/node1/install".to_string(),
                "<install root>".to_string(),
            ),
        ];
        assert_eq!(
            shorten_paths(
                "/tmp/s/node1/install/8.19.6 (was /tmp/s/node1/install/8.19.3); /tmp/s/node1/home/log",
                &paths
            ),
            "<install root>/8.19.6 (was <install root>/8.19.3); <home>/log"
        );
        // A longer name that merely starts with a root is left alone.
        assert_eq!(
            shorten_paths("/tmp/s/node1/installer/x", &paths),
            "/tmp/s/node1/installer/x"
        );
    }

    #[test]
    fn step_durations_and_wall_clock_times_are_in_json_events() {
        let r = Reporter::new(Output::Json);
        r.step(Some("n1"), "stop", "begin", "");
        let ended = r
            .open
            .lock()
            .unwrap()
            .contains_key(&("n1".to_string(), "stop".to_string()));
        assert!(ended, "a begun step is open");
        r.step(Some("n1"), "stop", "ok", "done");
        assert!(r.open.lock().unwrap().is_empty());
        let t = wall_clock();
        assert!(
            t.ends_with('Z') && t.parse::<jiff::Timestamp>().is_ok(),
            "{t}"
        );
    }
}

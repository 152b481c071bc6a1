//! What a person or a pipeline sees of a run: step events as lines (human) or JSON lines, progress
//! bars for staging, and the final summary document.

use crate::journal::RunResult;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::time::Instant;

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

#[derive(Serialize)]
struct Event<'a> {
    event: &'a str,
    t_ms: u64,
    node: Option<&'a str>,
    step: &'a str,
    status: &'a str,
    detail: &'a str,
}

pub struct Reporter {
    pub output: Output,
    started: Instant,
    bars: Option<MultiProgress>,
    quiet: bool,
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
        }
    }

    /// A reporter that prints nothing (the demo's inner runs in JSON mode).
    pub fn silent() -> Self {
        Self {
            output: Output::Json,
            started: Instant::now(),
            bars: None,
            quiet: true,
        }
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// One step event: `status` is begin | ok | failed | skipped | info.
    pub fn step(&self, node: Option<&str>, step: &str, status: &str, detail: &str) {
        if self.quiet {
            return;
        }
        match self.output {
            Output::Json => {
                let e = Event {
                    event: "step",
                    t_ms: self.elapsed_ms(),
                    node,
                    step,
                    status,
                    detail,
                };
                if let Ok(line) = serde_json::to_string(&e) {
                    println!("{line}");
                }
            }
            Output::Human => {
                let line = format!(
                    "[{:>7.1}s] {:<12} {:<14} {:<8} {}",
                    self.started.elapsed().as_secs_f64(),
                    node.unwrap_or("cluster"),
                    step,
                    status,
                    detail
                );
                match &self.bars {
                    Some(b) => {
                        let _ = b.println(line);
                    }
                    None => eprintln!("{line}"),
                }
            }
        }
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

//! The run report as one self-contained HTML page: inline CSS and SVG, no script, nothing fetched
//! from anywhere. The timeline scrolls sideways on a phone rather than shrinking its text; printed,
//! it fits a landscape page and keeps its colours.

use super::model::{Bar, FleetPage, RunPage};
use std::fmt::Write;

/// The drawing's width in SVG units; the page scales it to the screen.
const CHART_W: f64 = 1000.0;
/// Room on the left of the chart for lane labels.
const LABEL_W: f64 = 150.0;
const LANE_H: f64 = 30.0;
const BAR_H: f64 = 18.0;
const AXIS_H: f64 = 26.0;
/// The narrowest a bar is drawn, so an instant step still shows.
const MIN_BAR_W: f64 = 2.0;
/// Tick spacings tried for the time axis, in milliseconds; the first giving at most 10 ticks wins.
const TICK_STEPS_MS: [i64; 14] = [
    1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000, 600_000, 900_000,
    1_800_000, 3_600_000, 7_200_000,
];

const STYLE: &str = r#"
:root{--fg:#1d2430;--muted:#5b6472;--bg:#f5f6f8;--card:#fff;--line:#d9dde3}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1100px;margin:0 auto;padding:16px}
h1{font-size:1.4rem;margin:0 0 4px}h2{font-size:1.1rem;margin:0 0 8px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;margin:0 0 14px}
.meta{display:flex;flex-wrap:wrap;gap:6px 18px;color:var(--muted)}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;color:#fff;background:#6b7280}
.r-upgraded,.r-rolled_back,.s-upgraded,.s-up_to_date{background:#1f8a4c}.r-halted,.r-refused,.s-failed{background:#c0392b}.r-running,.s-running{background:#2c6fbb}.s-skipped,.s-pending{background:#8a6d1f}
.chart{overflow-x:auto}.chart svg{width:100%;min-width:640px;height:auto;display:block}
svg text{font:12px system-ui,sans-serif;fill:var(--fg)}svg .tick{stroke:var(--line)}svg .oos{fill:#f3d9d6}
rect.bar{stroke:#0003;stroke-width:.5}rect.failed{stroke:#c0392b;stroke-width:2.5}rect.open{stroke-dasharray:4 2;stroke:#333;stroke-width:1.5}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:.85rem;color:var(--muted);margin-top:8px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:4px;vertical-align:-1px}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}td.num{text-align:right;white-space:nowrap}
.detail{color:var(--muted);word-break:break-word}ol,ul{margin:0;padding-left:22px}.fail{color:#a8281b}
@media (max-width:600px){main{padding:8px}.card{padding:10px}h1{font-size:1.2rem}th,td{padding:3px 4px}
.steps thead{display:none}.steps tr{display:flex;flex-wrap:wrap;gap:0 10px;border-bottom:1px solid var(--line)}
.steps td,.steps th{border:0}.steps td:first-child{display:none}.steps td.detail{flex-basis:100%;padding-top:0}}
@media print{@page{size:A4 landscape;margin:12mm}body{background:#fff;font-size:11pt}main{max-width:none;padding:0}
.card{border:1px solid #999;break-inside:avoid}.chart{overflow:visible}.chart svg{min-width:0}
*{-webkit-print-color-adjust:exact;print-color-adjust:exact}}
"#;

/// Bar colours by step; anything else is grey.
const STEP_COLOURS: [(&str, &str); 12] = [
    ("stage", "#7a93b8"),
    ("prepare", "#9aa9c4"),
    ("upgrade_mode", "#5d6d7e"),
    ("drain", "#e3a33b"),
    ("stop", "#d0643e"),
    ("wait_offline", "#b77a5a"),
    ("activate", "#8a63b8"),
    ("start", "#3f9e62"),
    ("wait_active", "#6cbf8a"),
    ("enable", "#2f7fd0"),
    ("soak", "#9cc8ea"),
    ("approve", "#34495e"),
];

fn colour(step: &str) -> &'static str {
    STEP_COLOURS
        .iter()
        .find(|(s, _)| *s == step)
        .map_or("#a0a4ab", |(_, c)| c)
}

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration for people: `350 ms`, `2.8 s`, `1 min 02 s`, `1 h 05 min`.
pub fn dur(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {:02} s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{} h {:02} min", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// Maps milliseconds from the run's start to x in the chart.
struct Scale {
    span_ms: i64,
}

impl Scale {
    fn new(span_ms: i64) -> Self {
        Self {
            span_ms: span_ms.max(1),
        }
    }
    fn x(&self, ms: i64) -> f64 {
        LABEL_W
            + (CHART_W - LABEL_W - 10.0) * (ms.clamp(0, self.span_ms) as f64 / self.span_ms as f64)
    }
    fn tick_ms(&self) -> i64 {
        TICK_STEPS_MS
            .iter()
            .copied()
            .find(|t| self.span_ms / t <= 10)
            .unwrap_or(TICK_STEPS_MS[TICK_STEPS_MS.len() - 1])
    }
}

/// The time axis with its grid lines over `height`.
fn axis(out: &mut String, scale: &Scale, height: f64) {
    let step = scale.tick_ms();
    let mut t = 0;
    while t <= scale.span_ms {
        let x = scale.x(t);
        let _ = write!(
            out,
            r#"<line class="tick" x1="{x:.1}" y1="{AXIS_H}" x2="{x:.1}" y2="{height:.1}"/><text x="{x:.1}" y="16" text-anchor="middle">{}</text>"#,
            esc(&dur(t))
        );
        t += step;
    }
}

/// One step's bar in lane `row`; `key` is the node (or cluster) it belongs to.
fn bar_svg(
    out: &mut String,
    scale: &Scale,
    row: usize,
    key: &str,
    b: &Bar,
    end_ms: i64,
    fill: &str,
) {
    let x = scale.x(b.start_ms);
    let w = (scale.x(b.end_ms.unwrap_or(end_ms)) - x).max(MIN_BAR_W);
    let y = AXIS_H + row as f64 * LANE_H + (LANE_H - BAR_H) / 2.0;
    let took = b
        .end_ms
        .map_or("still open".into(), |e| dur(e - b.start_ms));
    let _ = write!(
        out,
        r#"<rect class="bar step-{s} {o}" data-node="{k}" x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{BAR_H}" fill="{c}"><title>{k} {s} at {at}, {took} ({o}){d}</title></rect>"#,
        s = esc(&b.step),
        o = b.outcome,
        k = esc(key),
        c = fill,
        at = dur(b.start_ms),
        d = if b.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", esc(&b.detail))
        },
    );
}

fn lane_label(out: &mut String, row: usize, label: &str, sub: &str) {
    let y = AXIS_H + row as f64 * LANE_H + LANE_H / 2.0;
    let _ = write!(
        out,
        r##"<text x="4" y="{:.1}"><tspan font-weight="600">{}</tspan><tspan x="4" dy="12" font-size="10" fill="#5b6472">{}</tspan></text>"##,
        y - 2.0,
        esc(label),
        esc(sub)
    );
}

fn svg_open(out: &mut String, rows: usize, title: &str) -> f64 {
    let height = AXIS_H + rows as f64 * LANE_H + 6.0;
    let _ = write!(
        out,
        r#"<div class="chart"><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {CHART_W} {height:.0}" role="img" aria-label="{}">"#,
        esc(title)
    );
    height
}

/// The node timeline: the cluster's own steps, then a lane per node with its out-of-service span.
fn run_timeline(out: &mut String, p: &RunPage) {
    let scale = Scale::new(p.duration_ms);
    let rows = p.nodes.len() + 1;
    let height = svg_open(out, rows, &format!("timeline of run {}", p.run));
    axis(out, &scale, height);
    lane_label(out, 0, "cluster", "upgrade mode, approve");
    for b in &p.cluster_bars {
        bar_svg(
            out,
            &scale,
            0,
            &p.cluster,
            b,
            p.duration_ms,
            colour(&b.step),
        );
    }
    for (i, lane) in p.nodes.iter().enumerate() {
        let row = i + 1;
        if let (Some(oos), Some(drain)) = (
            lane.out_of_service_ms,
            lane.bars.iter().find(|b| b.step == "drain"),
        ) {
            let x = scale.x(drain.start_ms);
            let w = (scale.x(drain.start_ms + oos) - x).max(MIN_BAR_W);
            let y = AXIS_H + row as f64 * LANE_H + 2.0;
            let _ = write!(
                out,
                r#"<rect class="oos" x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}"><title>{} out of service {}</title></rect>"#,
                LANE_H - 4.0,
                esc(&lane.node),
                dur(oos)
            );
        }
        let sub = lane
            .out_of_service_ms
            .map_or("never taken out".into(), |o| format!("out {}", dur(o)));
        lane_label(out, row, &lane.node, &sub);
        for b in &lane.bars {
            bar_svg(
                out,
                &scale,
                row,
                &lane.node,
                b,
                p.duration_ms,
                colour(&b.step),
            );
        }
    }
    out.push_str("</svg></div>");
    out.push_str(r#"<div class="legend">"#);
    for (s, c) in STEP_COLOURS {
        let _ = write!(out, r#"<span><i style="background:{c}"></i>{s}</span>"#);
    }
    out.push_str(r#"<span><i style="background:#f3d9d6"></i>out of service</span><span><i style="border:2px solid #c0392b"></i>failed</span><span><i style="border:1.5px dashed #333"></i>open</span></div>"#);
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>{STYLE}</style></head><body><main>{body}<p class=\"meta\">Generated by bbupgrade {} from its journal.</p></main></body></html>\n",
        esc(title),
        env!("CARGO_PKG_VERSION")
    )
}

fn header(out: &mut String, title: &str, result: &str, meta: &[String]) {
    let _ = write!(
        out,
        r#"<section class="card"><h1>{} <span class="badge r-{r}">{r}</span></h1><div class="meta">"#,
        esc(title),
        r = esc(result)
    );
    for m in meta {
        let _ = write!(out, "<span>{}</span>", esc(m));
    }
    out.push_str("</div></section>");
}

fn list_section(out: &mut String, title: &str, items: &[String], class: &str, ordered: bool) {
    if items.is_empty() {
        return;
    }
    let tag = if ordered { "ol" } else { "ul" };
    let _ = write!(
        out,
        r#"<section class="card"><h2>{}</h2><{tag} class="{class}">"#,
        esc(title)
    );
    for i in items {
        let _ = write!(out, "<li>{}</li>", esc(i));
    }
    let _ = write!(out, "</{tag}></section>");
}

/// The per-node table: out-of-service time and every step with its time and outcome.
fn node_table(out: &mut String, p: &RunPage) {
    out.push_str(r#"<section class="card"><h2>Steps by node</h2><div class="scroll"><table class="steps"><thead><tr><th>node</th><th>step</th><th>at</th><th>took</th><th>outcome</th><th>detail</th></tr></thead><tbody>"#);
    for lane in &p.nodes {
        let oos = lane.out_of_service_ms.map_or("—".into(), |o| {
            format!(
                "out of service {}{}",
                dur(o),
                if lane.returned { "" } else { " (not returned)" }
            )
        });
        let _ = write!(
            out,
            r#"<tr><th colspan="6">{} <span class="detail">{}</span></th></tr>"#,
            esc(&lane.node),
            esc(&oos)
        );
        for b in &lane.bars {
            let _ = write!(
                out,
                r#"<tr><td></td><td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="{}">{}</td><td class="detail">{}</td></tr>"#,
                esc(&b.step),
                dur(b.start_ms),
                b.end_ms.map_or("open".into(), |e| dur(e - b.start_ms)),
                if b.outcome == "failed" { "fail" } else { "" },
                b.outcome,
                esc(&b.detail)
            );
        }
    }
    out.push_str("</tbody></table></div></section>");
}

/// The page of one cluster run.
pub fn run_page(p: &RunPage) -> String {
    let mut body = String::new();
    let title = format!(
        "{} run #{} of {}: {} → {}",
        p.kind, p.run, p.cluster, p.from, p.to
    );
    let mut meta = vec![
        format!("started {}", p.started),
        format!("took {}", dur(p.duration_ms)),
        format!("by {}", p.actor),
        format!("{} node(s)", p.nodes.len()),
    ];
    if let Some(e) = &p.error {
        meta.push(format!("error: {e}"));
    }
    header(&mut body, &title, p.result, &meta);
    body.push_str(r#"<section class="card"><h2>Timeline</h2>"#);
    run_timeline(&mut body, p);
    body.push_str("</section>");
    let order: Vec<String> = p.order.iter().map(|o| o.why.clone()).collect();
    list_section(&mut body, "Order and why", &order, "", true);
    let failures: Vec<String> = p
        .failures
        .iter()
        .map(|f| {
            format!(
                "{} {} at {}: {}",
                f.node.as_deref().unwrap_or("cluster"),
                f.step,
                dur(f.at_ms),
                f.error
            )
        })
        .collect();
    list_section(&mut body, "Failures", &failures, "fail", false);
    list_section(&mut body, "Notes", &p.notes, "", false);
    node_table(&mut body, p);
    page(&title, &body)
}

/// The fleet timeline: a lane per cluster, grouped by wave, coloured by how it ended.
fn fleet_timeline(out: &mut String, p: &FleetPage) {
    let scale = Scale::new(p.duration_ms);
    let height = svg_open(
        out,
        p.clusters.len(),
        &format!("timeline of fleet run {}", p.fleet_run),
    );
    axis(out, &scale, height);
    for (row, c) in p.clusters.iter().enumerate() {
        let wave = format!("wave {}{}", c.wave, if c.canary { " (canary)" } else { "" });
        lane_label(out, row, &c.cluster, &wave);
        let Some(start) = c.start_ms else { continue };
        let b = Bar {
            step: c.state.clone(),
            start_ms: start,
            end_ms: c.end_ms,
            outcome: if c.state == "failed" {
                "failed"
            } else if c.end_ms.is_none() {
                "open"
            } else {
                "ok"
            },
            detail: c.reason.clone().unwrap_or_default(),
        };
        // Clusters are coloured by how they ended, not by step.
        let fill = match c.state.as_str() {
            "upgraded" | "up_to_date" => "#1f8a4c",
            "failed" => "#c0392b",
            "running" => "#2c6fbb",
            _ => "#b8962e",
        };
        bar_svg(out, &scale, row, &c.cluster, &b, p.duration_ms, fill);
    }
    out.push_str("</svg></div>");
}

/// The page of a fleet run.
pub fn fleet_page(p: &FleetPage) -> String {
    let mut body = String::new();
    let title = format!("fleet run #{} to {}", p.fleet_run, p.to);
    let mut meta = vec![
        format!("started {}", p.started),
        format!("took {}", dur(p.duration_ms)),
        format!("by {}", p.actor),
        format!("{} cluster(s)", p.clusters.len()),
    ];
    if let Some(e) = &p.error {
        meta.push(format!("halted: {e}"));
    }
    header(&mut body, &title, p.result, &meta);
    body.push_str(r#"<section class="card"><h2>Waves and clusters</h2>"#);
    fleet_timeline(&mut body, p);
    body.push_str(r#"</section><section class="card"><h2>Clusters</h2><div class="scroll"><table><thead><tr><th>wave</th><th>cluster</th><th>result</th><th>took</th><th>run</th><th>why</th></tr></thead><tbody>"#);
    for c in &p.clusters {
        let took = match (c.start_ms, c.end_ms) {
            (Some(s), Some(e)) => dur(e - s),
            _ => "—".into(),
        };
        let _ = write!(
            body,
            r#"<tr><td>{}{}</td><td>{}</td><td><span class="badge s-{s}">{s}</span></td><td class="num">{took}</td><td>{}</td><td class="detail">{}</td></tr>"#,
            c.wave,
            if c.canary { " canary" } else { "" },
            esc(&c.cluster),
            c.cluster_run_id.map_or("—".into(), |r| format!("#{r}")),
            esc(c.reason.as_deref().unwrap_or("")),
            s = esc(&c.state),
        );
    }
    body.push_str("</tbody></table></div></section>");
    page(&title, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_durations_read_well() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(dur(350), "350 ms");
        assert_eq!(dur(2_800), "2.8 s");
        assert_eq!(dur(62_000), "1 min 02 s");
        assert_eq!(dur(3_900_000), "1 h 05 min");
        let s = Scale::new(45_000);
        assert_eq!(s.tick_ms(), 5_000);
        assert!((s.x(0) - LABEL_W).abs() < 1e-9 && s.x(90_000) <= CHART_W);
    }
}

//! The forms the real Bitbucket answers in (BITBUCKET-FACTS.md), served by the simulator, met by the
//! coordinator end to end: node ids that change on every restart with the old row left OFFLINE and
//! without a version, names configured or not, blank fields absent or `null`, Basic or Bearer; and
//! the views and refusals `plan` must stop on before anything changes.

use bbupgrade_demo::sandbox::{BitbucketForm, Sandbox, SandboxLb};
use bbupgrade_tests::cli_process::{Finished, args, run_cli};
use bbupgrade_tests::{bins, sandbox_options, start_sandbox, temp_dir, zdu_row};
use serde_json::Value;
use std::collections::BTreeMap;

const TO: &str = "8.19.6";

async fn sandbox(dir: &std::path::Path, nodes: usize, form: BitbucketForm) -> Sandbox {
    let bins = bins!();
    let mut opts = sandbox_options(&bins, nodes, SandboxLb::Haproxy);
    opts.bitbucket = form;
    start_sandbox(dir, opts)
        .await
        .expect("starting the sandbox")
}

/// `GET /rest/zdu/cluster` the way the sandbox's inventory authenticates (raw JSON, nulls kept).
async fn view(s: &Sandbox) -> Value {
    let url = format!("{}/rest/zdu/cluster", s.sim.nodes()[0].base_url);
    let auth = s.sim.admin_basic_auth().expect("a Basic login");
    reqwest::Client::new()
        .get(&url)
        .header("authorization", auth)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .expect("cluster JSON")
}

/// Each sandbox node's current row id.
fn ids(s: &Sandbox, v: &Value) -> BTreeMap<String, String> {
    s.sim
        .nodes()
        .iter()
        .map(|n| {
            let row = zdu_row(v, n).unwrap_or_else(|| panic!("no row for {} in {v:#}", n.name));
            (n.name.clone(), row["id"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

/// Waits until the cluster view answers `code` to the admin (knobs take effect on a heartbeat).
async fn wait_status(s: &Sandbox, code: u16) {
    let url = format!("{}/rest/zdu/cluster", s.sim.nodes()[0].base_url);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let got = reqwest::Client::new()
            .get(&url)
            .bearer_auth(bbupgrade_demo::sandbox::ADMIN_TOKEN)
            .send()
            .await
            .map(|r| r.status().as_u16());
        if got.as_ref().ok() == Some(&code) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url} answers {got:?}, not {code}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn upgrade(s: &Sandbox) -> Finished {
    let archive = s.to_archive.path.display().to_string();
    run_cli(
        &bins!(),
        &args(s, "upgrade", &["--to", TO, "--archive", &archive]),
    )
    .await
}

/// After the upgrade: every node came back under a new id, ACTIVE on the target; its old row is
/// still there, OFFLINE, with its version blank in the form the sandbox serves.
fn assert_restarted_under_new_ids(
    s: &Sandbox,
    before: &BTreeMap<String, String>,
    v: &Value,
    nulls: bool,
) {
    let after = ids(s, v);
    let rows = v["nodes"].as_array().expect("rows");
    for (node, old) in before {
        let new = &after[node];
        assert_ne!(new, old, "{node} kept its id across a restart: {v:#}");
        let live = rows
            .iter()
            .find(|r| r["id"] == new.as_str())
            .expect("live row");
        assert_eq!(
            (&live["state"], &live["version"]),
            (&"ACTIVE".into(), &TO.into()),
            "{v:#}"
        );
        let gone = rows
            .iter()
            .find(|r| r["id"] == old.as_str())
            .unwrap_or_else(|| panic!("{node}'s old row {old} should stay OFFLINE: {v:#}"));
        assert_eq!(gone["state"], "OFFLINE", "{v:#}");
        assert_eq!(
            gone.get("version").is_some(),
            nulls,
            "version present only as null: {gone}"
        );
        assert!(gone["version"].is_null(), "{gone}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_node_names_configured_through_basic_auth() {
    if !bbupgrade_tests::require_program("haproxy") {
        return;
    }
    let tmp = temp_dir();
    let form = BitbucketForm {
        node_names: true,
        basic_auth: true,
        ..Default::default()
    };
    let s = sandbox(tmp.path(), 2, form).await;
    let inventory = bbupgrade_tests::read(&s.inventory);
    assert!(
        inventory.contains("auth = \"basic\"") && inventory.contains("bitbucket_name = \"node1\""),
        "{inventory}"
    );
    let before_view = view(&s).await;
    let names: Vec<_> = before_view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].clone())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(
        names.contains(&"node1".into()) && names.contains(&"node2".into()),
        "{before_view:#}"
    );
    let before = ids(&s, &before_view);

    let run = upgrade(&s).await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.summary()["result"], "upgraded", "{}", run.describe());
    assert_restarted_under_new_ids(&s, &before, &view(&s).await, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_null_fields_and_no_names_follows_nodes_by_address() {
    if !bbupgrade_tests::require_program("haproxy") {
        return;
    }
    let tmp = temp_dir();
    let form = BitbucketForm {
        null_fields: true,
        ..Default::default()
    };
    let s = sandbox(tmp.path(), 2, form).await;
    let before_view = view(&s).await;
    assert!(
        before_view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["name"] == "Not configured"),
        "{before_view:#}"
    );
    let before = ids(&s, &before_view);

    let run = upgrade(&s).await;
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.summary()["result"], "upgraded", "{}", run.describe());
    assert_restarted_under_new_ids(&s, &before, &view(&s).await, true);

    // status maps each node to its live row and says why the old rows are nobody's.
    let out = run_cli(&bins!(), &args(&s, "status", &[])).await;
    let doc: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
    let rows = doc["bitbucket"]["nodes"].as_array().expect("rows");
    assert_eq!(
        rows.iter().filter(|r| r["node"].is_string()).count(),
        2,
        "{doc:#}"
    );
    let old: Vec<_> = rows.iter().filter(|r| r["state"] == "OFFLINE").collect();
    assert_eq!(old.len(), 2, "{doc:#}");
    assert!(
        old.iter().all(|r| r["node"].is_null()
            && r["version"].is_null()
            && r["why"].as_str().is_some_and(|w| w.contains("old row"))),
        "{doc:#}"
    );
}

/// `plan` against views and answers it must refuse, each with its own message, exit 2, nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_refuses_unmappable_views_and_unusable_apis_with_exit_2() {
    if !bbupgrade_tests::require_program("haproxy") {
        return;
    }
    let tmp = temp_dir();
    let s = sandbox(tmp.path(), 2, BitbucketForm::default()).await;
    let bins = bins!();
    let archive = s.to_archive.path.display().to_string();
    let plan = |s: &Sandbox| args(s, "plan", &["--to", TO, "--archive", &archive]);
    let ok = run_cli(&bins, &plan(&s)).await;
    assert_eq!(ok.code, Some(0), "{}", ok.describe());

    let original = bbupgrade_tests::read(&s.inventory);
    let edit = |text: String| std::fs::write(&s.inventory, text).expect("inventory");

    // Both nodes default to the agents' IP, 127.0.0.1, where two live rows sit.
    edit(
        original
            .lines()
            .filter(|l| !l.starts_with("bitbucket_address"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let out = run_cli(&bins, &plan(&s)).await;
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("fits 2 live rows")
            && out.stderr.contains("127.0.0.1:5701")
            && out.stderr.contains("bitbucket_address"),
        "{}",
        out.describe()
    );

    // No row at the address a node is given.
    edit(original.replace(
        "bitbucket_address = \"127.0.0.1:5701\"",
        "bitbucket_name = \"Not configured\"\nbitbucket_address = \"127.0.0.9\"",
    ));
    let out = run_cli(&bins, &plan(&s)).await;
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("no row at address 127.0.0.9"),
        "{}",
        out.describe()
    );
    edit(original.clone());

    // A token without system-admin rights, a non-clustered instance, an unreachable API.
    s.sim
        .set_shared_property("sim.user.token", "plain-user-token")
        .expect("knob");
    std::fs::write(s.dir.join("admin.token"), "plain-user-token\n").expect("token");
    let out = run_cli(&bins, &plan(&s)).await;
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("system administrator") && !out.stderr.contains("plain-user-token"),
        "{}",
        out.describe()
    );
    std::fs::write(
        s.dir.join("admin.token"),
        format!("{}\n", bbupgrade_demo::sandbox::ADMIN_TOKEN),
    )
    .expect("token");

    s.sim
        .set_shared_property("sim.fault.not.clustered", "true")
        .expect("knob");
    wait_status(&s, 401).await;
    let out = run_cli(&bins, &plan(&s)).await;
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("clustered installation"),
        "{}",
        out.describe()
    );
    s.sim
        .set_shared_property("sim.fault.not.clustered", "false")
        .expect("knob");
    wait_status(&s, 200).await;

    edit(
        original
            .lines()
            .map(|l| {
                if l.starts_with("bitbucket_url") || l.starts_with("bitbucket_node_urls") {
                    l.split('=').next().unwrap().to_string()
                        + if l.starts_with("bitbucket_url") {
                            "= \"http://127.0.0.1:1\""
                        } else {
                            "= []"
                        }
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let out = run_cli(&bins, &plan(&s)).await;
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("cannot connect") && out.stderr.contains("127.0.0.1:1"),
        "{}",
        out.describe()
    );
}

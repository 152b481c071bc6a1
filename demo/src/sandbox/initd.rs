//! The sandbox's nodes under init.d, as Bitbucket's installer sets a node up: one
//! `atlbitbucket` script per node that the agent runs (`service.kind = "initd"`) and edits on
//! activation, so a run changes a real service definition that can be looked at afterwards.

use anyhow::{Context, Result};
use bbupgrade_sim::cluster::SimNode;
use serde::Serialize;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// How the agents run their node's Bitbucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxService {
    /// The agent runs the install's `bin/start-bitbucket.sh` itself (`service.kind = "scripts"`).
    Scripts,
    /// An init.d script per node (`service.kind = "initd"`), which activation edits.
    Initd,
}

/// The script's name, as the installer names it in `/etc/init.d`.
pub const INITD_NAME: &str = "atlbitbucket";

/// A node's init.d script and the text the sandbox wrote into it.
#[derive(Clone, Debug)]
pub struct ServiceDefinition {
    pub node: String,
    pub path: PathBuf,
    pub original: String,
}

/// What changed in a service definition since the sandbox wrote it: the lines that went and the
/// lines that came (in file order).
#[derive(Clone, Debug, Serialize)]
pub struct ServiceChange {
    pub node: String,
    pub path: String,
    pub removed: Vec<String>,
    pub added: Vec<String>,
}

impl ServiceDefinition {
    /// Compares the script now with what the sandbox wrote.
    pub fn change(&self) -> Result<ServiceChange> {
        let now = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let before: Vec<&str> = self.original.lines().collect();
        let after: Vec<&str> = now.lines().collect();
        let only_in = |these: &[&str], those: &[&str]| -> Vec<String> {
            these
                .iter()
                .filter(|l| !those.contains(l))
                .map(|l| l.to_string())
                .collect()
        };
        Ok(ServiceChange {
            node: self.node.clone(),
            path: self.path.display().to_string(),
            removed: only_in(&before, &after),
            added: only_in(&after, &before),
        })
    }
}

/// The installer's init.d form: `cd` into the install's `bin`, then `./start-bitbucket.sh` and
/// `./stop-bitbucket.sh`, and a `status` from the PID file in the home. The installer's scripts
/// switch to the Bitbucket user with the start script's `su -l`, which needs a login shell; the
/// sandbox's user (`nobody`) has none, so as root this script switches with `runuser -u` itself.
pub fn initd_script(node: &SimNode, run_as: Option<&str>) -> String {
    let switch = run_as
        .map(|u| format!("runuser -u {u} -- "))
        .unwrap_or_default();
    let pid_file = node.home.join("log/bitbucket.pid");
    format!(
        r#"#!/usr/bin/env bash
### BEGIN INIT INFO
# Provides:          {INITD_NAME}
# Required-Start:    $remote_fs $network
# Required-Stop:     $remote_fs $network
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: Atlassian Bitbucket ({node})
### END INIT INFO
# Written by the bbupgrade sandbox in the form of the Bitbucket installer's init.d script.

PIDFILE={pid_file}

start() {{
    {switch}./start-bitbucket.sh
}}

stop() {{
    {switch}./stop-bitbucket.sh
}}

status() {{
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "Bitbucket is running"
        exit 0
    fi
    echo "Bitbucket is not running"
    exit 3
}}

cd {install}/bin || exit 1

case "$1" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart)
        stop
        start
        ;;
    *)
        echo "Usage: $0 {{start|stop|status|restart}}"
        exit 1
        ;;
esac
"#,
        node = node.name,
        pid_file = pid_file.display(),
        install = node.install_dir.display(),
    )
}

/// Writes each node's script to `dir/etc/<node>/init.d/atlbitbucket` (mode 0755; root's when
/// the sandbox runs as root, as the agent refuses a script the Bitbucket user could edit).
pub fn write_initd_scripts(
    dir: &Path,
    nodes: &[SimNode],
    run_as: Option<&str>,
) -> Result<Vec<ServiceDefinition>> {
    let mut definitions = Vec::new();
    for node in nodes {
        let folder = dir.join("etc").join(&node.name).join("init.d");
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("creating {}", folder.display()))?;
        let path = folder.join(INITD_NAME);
        let text = initd_script(node, run_as);
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        definitions.push(ServiceDefinition {
            node: node.name.clone(),
            path,
            original: text,
        });
    }
    Ok(definitions)
}

/// The changes as the demo prints them: the node, the script, `-` old and `+` new lines.
pub fn render_changes(changes: &[ServiceChange]) -> String {
    let mut out = String::new();
    for c in changes {
        out.push_str(&format!("  {} {}\n", c.node, c.path));
        if c.removed.is_empty() && c.added.is_empty() {
            out.push_str("    (unchanged)\n");
        }
        for l in &c.removed {
            out.push_str(&format!("    - {l}\n"));
        }
        for l in &c.added {
            out.push_str(&format!("    + {l}\n"));
        }
    }
    out
}

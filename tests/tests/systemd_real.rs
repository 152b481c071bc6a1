//! The agent under a real systemd: the shipped `bbupgrade-agent.service` (Type=notify, hardening
//! as shipped) in a booted machine (see `systemd_harness`), driving a Bitbucket install from a
//! simulator archive through stage, prepare, stop, activate, start and rollback over mutual TLS,
//! with each step checked in `systemctl show` and on disk. One machine per test, torn down and
//! checked for leftovers at the end.
//!
//! Needs root, debootstrap (the root file system is built once, about a minute, then cached as
//! `target/systemd-rootfs.tar`), iproute2 and util-linux (`unshare`, `nsenter`).

use anyhow::{Context, Result, ensure};
use bbupgrade_common::identity::Role;
use bbupgrade_common::pki::{Ca, IssueRequest};
use bbupgrade_common::proto::agent_client::AgentClient;
use bbupgrade_common::proto::{
    ActivateRequest, NodeInfoRequest, PrepareRequest, RollbackRequest, StageHeader, StageResult,
    StageUploadMessage, StartRequest, StopRequest, stage_event, stage_upload_message,
};
use bbupgrade_common::tls::TlsFiles;
use bbupgrade_sim::archive::{ArchiveInfo, write_archive_with_program};
use bbupgrade_tests::systemd_harness::Machine;
use bbupgrade_tests::{Bins, bins, node_version};
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const FROM: &str = "8.19.3";
/// The version of an old-style backup left beside the init.d script.
const LEGACY: &str = "8.19.1";
const STATE_DIR: &str = "/var/lib/bbupgrade";
const TO: &str = "8.19.6";
const INSTALL_ROOT: &str = "/opt/atlassian/bitbucket";
const HOME: &str = "/var/atlassian/application-data/bitbucket";
const USER: &str = "atlbitbucket";
const NODE: &str = "node1";
const UNIT: &str = "atlbitbucket.service";
const UNIT_PATH: &str = "/etc/systemd/system/atlbitbucket.service";
const INITD_PATH: &str = "/etc/init.d/atlbitbucket";
const AGENT_PORT: u16 = 7443;
const NODE_PORT: u16 = 7990;
const STEP_SECS: u32 = 60;
const CHUNK_BYTES: usize = 1 << 20;
const ADMIN_TOKEN: &str = "systemd-test-token";

/// How the node's Bitbucket is run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    /// The unit Atlassian documents: no `Type=`, `start-bitbucket.sh -fg`.
    SystemdForeground,
    /// `Type=forking` with `PIDFile=`.
    SystemdForking,
    /// The installer's `/etc/init.d/atlbitbucket`.
    Initd,
    /// An init.d script of an admin's own: the install and the start script in variables.
    InitdVariables,
}

impl Variant {
    fn initd(self) -> bool {
        matches!(self, Variant::Initd | Variant::InitdVariables)
    }

    /// The init.d script of this variant, pointing at `version`.
    fn script(self, version: &str) -> String {
        match self {
            Variant::InitdVariables => initd_variables_text(version),
            _ => initd_text(version),
        }
    }
}

fn install(version: &str) -> String {
    format!("{INSTALL_ROOT}/{version}")
}

fn unit_text(variant: Variant, version: &str) -> String {
    let bin = format!("{}/bin", install(version));
    let service = match variant {
        Variant::SystemdForeground => format!(
            "User={USER}\nExecStart={bin}/start-bitbucket.sh -fg\nExecStop={bin}/stop-bitbucket.sh\n"
        ),
        Variant::SystemdForking => format!(
            "Type=forking\nUser={USER}\nPIDFile={HOME}/log/bitbucket.pid\nExecStart={bin}/start-bitbucket.sh\nExecStop={bin}/stop-bitbucket.sh\n"
        ),
        Variant::Initd | Variant::InitdVariables => {
            unreachable!("no unit for the init.d variants")
        }
    };
    format!(
        "[Unit]\nDescription=Atlassian Bitbucket Server Service\nAfter=syslog.target network.target\n\n[Service]\n{service}\n[Install]\nWantedBy=multi-user.target\n"
    )
}

/// The installer's script (as `install_linux_service.sh` writes it), for 5.x and later scripts.
fn initd_text(version: &str) -> String {
    format!(
        r#"#!/usr/bin/env bash
### BEGIN INIT INFO
# Provides:          atlbitbucket
# Required-Start:
# Required-Stop:
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: Start Bitbucket daemon at boot time
# Description:       Start Bitbucket daemon at boot time
### END INIT INFO

start() {{
    ./start-bitbucket.sh
}}

stop() {{
    ./stop-bitbucket.sh
}}

# Bitbucket Linux service controller script
cd {}/bin

case "$1" in
    start)
        start
        ;;
    stop)
        stop
        ;;
    restart)
        stop
        start
        ;;
    *)
        echo "Usage: $0 {{start|stop|restart}}"
        exit 1
        ;;
esac
"#,
        install(version)
    )
}

/// An admin's own script: the install in a variable of its own name, the start script in another.
fn initd_variables_text(version: &str) -> String {
    format!(
        r#"#!/bin/sh
### BEGIN INIT INFO
# Provides:          atlbitbucket
# Required-Start:    $remote_fs
# Required-Stop:     $remote_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: Bitbucket
### END INIT INFO
BB_INSTALL={}
START_SCRIPT="$BB_INSTALL/bin/start-bitbucket.sh"

case "$1" in
    start)
        cd "$BB_INSTALL/bin" || exit 1
        "$START_SCRIPT"
        ;;
    stop)
        "${{BB_INSTALL}}/bin/stop-bitbucket.sh"
        ;;
    *)
        echo "Usage: $0 {{start|stop}}"
        exit 1
        ;;
esac
"#,
        install(version)
    )
}

/// Edits a file of the install as its administrator did.
fn edit(path: &Path, f: impl Fn(&str) -> Option<String>) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let edited =
        f(&text).with_context(|| format!("{} is not in the shipped form", path.display()))?;
    std::fs::write(path, edited)?;
    Ok(())
}

/// One machine with Bitbucket on `FROM`, and outside it the agent's configuration and the
/// TLS files of agent and coordinator (the agent is installed by hand or from its package).
struct Node {
    machine: Machine,
    to_archive: ArchiveInfo,
    coordinator_tls: TlsFiles,
    agent_tls: TlsFiles,
    agent_config: String,
}

fn prepare_machine(bins: &Bins, name: &str, variant: Variant) -> Result<Node> {
    let machine = Machine::create(name)?;
    machine.chroot(&["useradd", "--create-home", "--shell", "/bin/bash", USER])?;

    // Releases, and the running one installed as the installer lays it out.
    let archives = machine.dir.join("archives");
    std::fs::create_dir(&archives)?;
    let from = write_archive_with_program(FROM, &archives, 1, &bins.sim)?;
    let to_archive = write_archive_with_program(TO, &archives, 1, &bins.sim)?;
    let root = machine.path(INSTALL_ROOT);
    std::fs::create_dir_all(&root)?;
    bbupgrade_sim::archive::extract(&from.path, &root)?;
    std::fs::rename(
        root.join(format!("atlassian-bitbucket-{FROM}")),
        machine.path(&install(FROM)),
    )?;
    let bin = machine.path(&install(FROM)).join("bin");
    edit(&bin.join("set-bitbucket-home.sh"), |t| {
        bbupgrade_sim::scripts::with_bitbucket_home(t, HOME)
    })?;
    edit(&bin.join("set-bitbucket-user.sh"), |t| {
        bbupgrade_sim::scripts::with_bitbucket_user(t, USER)
    })?;
    let jvm_args = format!(
        "-Dserver.port={NODE_PORT} -Dserver.address=0.0.0.0 -Dcluster.node.name={NODE} -Dsim.startup.ms=300"
    );
    edit(&bin.join("_start-webapp.sh"), |t| {
        bbupgrade_sim::scripts::with_jvm_args(t, &jvm_args)
    })?;
    // A node of a cluster: its shared home holds the cluster's settings.
    let shared = machine.path(HOME).join("shared");
    std::fs::create_dir_all(&shared)?;
    std::fs::write(
        shared.join("bitbucket.properties"),
        format!(
            "{}={ADMIN_TOKEN}\n",
            bbupgrade_sim::node::settings::ADMIN_TOKEN
        ),
    )?;
    // An init script runs the install's scripts as root, so the agent refuses an install the
    // Bitbucket user can write (issue 14): there the install stays root's, as it must. Under
    // systemd the user's own install (as an installer of old left it) is fine: `User=` runs it.
    let owned = if variant.initd() {
        vec![HOME]
    } else {
        vec![INSTALL_ROOT, HOME]
    };
    let owner = format!("{USER}:{USER}");
    let mut chown = vec!["chown", "-R", owner.as_str()];
    chown.extend(owned);
    machine.chroot(&chown)?;

    // The service definition.
    match variant {
        Variant::Initd | Variant::InitdVariables => {
            let p = machine.path(INITD_PATH);
            std::fs::write(&p, variant.script(FROM))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
            // What an agent of before left beside it: moved to the state dir when the agent starts.
            let legacy = machine.path(&format!("{INITD_PATH}.bbupgrade-backup-{LEGACY}"));
            std::fs::write(&legacy, initd_text(LEGACY))?;
            std::fs::set_permissions(&legacy, std::fs::Permissions::from_mode(0o755))?;
        }
        _ => std::fs::write(machine.path(UNIT_PATH), unit_text(variant, FROM))?,
    }

    // PKI: the agent's certificate names the machine's address.
    let pki = machine.dir.join("pki");
    let ca = Ca::generate()?;
    ca.save(&pki)?;
    ca.issue(&IssueRequest::new(Role::Coordinator, "systemd-test"))?
        .save(&pki)?;
    ca.issue(
        &IssueRequest::new(Role::Agent, NODE)
            .with_sans([machine.link.guest_addr.to_string(), "localhost".into()]),
    )?
    .save(&pki)?;
    let inside = TlsFiles::in_pki_dir(Path::new("/etc/bbupgrade/pki"), Role::Agent, NODE);
    let service = match variant {
        Variant::Initd | Variant::InitdVariables => {
            format!("kind = \"initd\"\npath = {INITD_PATH:?}\n")
        }
        _ => format!("kind = \"systemd\"\nunit = {UNIT:?}\npath = {UNIT_PATH:?}\n"),
    };
    let config = format!(
        "node_id = {NODE:?}\nlisten = \"0.0.0.0:{AGENT_PORT}\"\nstate_dir = {STATE_DIR:?}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n[bitbucket]\ninstall_root = {INSTALL_ROOT:?}\ncurrent_install = {:?}\nhome = {HOME:?}\nuser = {USER:?}\nstatus_url = \"http://127.0.0.1:{NODE_PORT}/status\"\n\n[service]\n{service}\n[limits]\nstop_timeout_secs = 60\nstart_timeout_secs = 60\n",
        inside.ca,
        inside.cert,
        inside.key,
        install(FROM),
    );
    Ok(Node {
        coordinator_tls: TlsFiles::in_pki_dir(&pki, Role::Coordinator, "systemd-test"),
        agent_tls: TlsFiles::in_pki_dir(&pki, Role::Agent, NODE),
        agent_config: config,
        machine,
        to_archive,
    })
}

/// The agent's configuration and certificates in /etc/bbupgrade, as the admin writes them.
fn configure_agent(node: &Node) -> Result<()> {
    let etc = node.machine.path("/etc/bbupgrade/pki");
    std::fs::create_dir_all(&etc)?;
    let tls = &node.agent_tls;
    for f in [&tls.ca, &tls.cert, &tls.key] {
        std::fs::copy(f, etc.join(f.file_name().context("file name")?))?;
    }
    std::fs::write(
        node.machine.path("/etc/bbupgrade/agent.toml"),
        &node.agent_config,
    )?;
    Ok(())
}

/// The agent and its unit installed by hand, as shipped in systemd/.
fn install_agent_by_hand(bins: &Bins, node: &Node) -> Result<()> {
    let machine = &node.machine;
    std::fs::copy(&bins.agent, machine.path("/usr/bin/bbupgrade-agent"))?;
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/bbupgrade-agent.service");
    std::fs::copy(
        &shipped,
        machine.path("/etc/systemd/system/bbupgrade-agent.service"),
    )
    .with_context(|| format!("copying {}", shipped.display()))?;
    configure_agent(node)
}

async fn connect(node: &Node) -> Result<AgentClient<Channel>> {
    let tls = node.coordinator_tls.load()?;
    let addr = format!("{}:{AGENT_PORT}", node.machine.link.guest_addr);
    let channel =
        bbupgrade_common::tls::connect_agent(&addr, &tls, NODE, Duration::from_secs(5)).await?;
    Ok(AgentClient::new(channel)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20))
}

fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(u64::from(STEP_SECS) * 3));
    r
}

/// Streams the archive to the agent, as the coordinator does.
async fn stage(client: &mut AgentClient<Channel>, archive: &ArchiveInfo) -> Result<StageResult> {
    let bytes = std::fs::read(&archive.path)?;
    let mut msgs = vec![StageUploadMessage {
        msg: Some(stage_upload_message::Msg::Header(StageHeader {
            operation_id: "systemd-stage".into(),
            version: TO.into(),
            sha256: archive.sha256.clone(),
            size_bytes: archive.size_bytes,
        })),
    }];
    msgs.extend(bytes.chunks(CHUNK_BYTES).map(|c| StageUploadMessage {
        msg: Some(stage_upload_message::Msg::Chunk(c.to_vec())),
    }));
    let mut events = client
        .stage_upload(req(futures::stream::iter(msgs)))
        .await?
        .into_inner();
    let mut result = None;
    while let Some(ev) = events.message().await? {
        if let Some(stage_event::Event::Result(r)) = ev.event {
            result = Some(r);
        }
    }
    result.context("the stage stream ended without a result")
}

/// What systemd says about Bitbucket's unit.
struct UnitState {
    active: String,
    main_pid: u32,
    exec_start: String,
}

fn unit_state(m: &Machine) -> Result<UnitState> {
    Ok(UnitState {
        active: m.show(UNIT, "ActiveState")?,
        main_pid: m.show(UNIT, "MainPID")?.parse()?,
        exec_start: m.show(UNIT, "ExecStart")?,
    })
}

/// The pid Bitbucket's scripts recorded, read inside the machine (PID numbers are its own).
fn bitbucket_pid(m: &Machine) -> Option<u32> {
    std::fs::read_to_string(m.path(HOME).join("log/bitbucket.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Checks the service definition names `version`'s install, as a file and (systemd) as loaded.
fn check_definition(m: &Machine, variant: Variant, version: &str) -> Result<()> {
    let start = format!("{}/bin/start-bitbucket.sh", install(version));
    match variant {
        Variant::Initd | Variant::InitdVariables => {
            let text = std::fs::read_to_string(m.path(INITD_PATH))?;
            let names = if variant == Variant::Initd {
                format!("cd {}/bin", install(version))
            } else {
                format!("BB_INSTALL={}\n", install(version))
            };
            ensure!(
                text.contains(&names),
                "{INITD_PATH} does not point at {version} (`{names}`):\n{text}"
            );
            ensure!(
                text.contains("### BEGIN INIT INFO"),
                "LSB header lost:\n{text}"
            );
        }
        _ => {
            let text = std::fs::read_to_string(m.path(UNIT_PATH))?;
            ensure!(
                text.lines()
                    .any(|l| l.starts_with("ExecStart=") && l.contains(&start)),
                "{UNIT_PATH} does not start {version}:\n{text}"
            );
            let s = unit_state(m)?;
            ensure!(
                s.exec_start.contains(&start),
                "systemd still runs ExecStart {} (no daemon-reload?)",
                s.exec_start
            );
            ensure!(
                m.show(UNIT, "NeedDaemonReload")? == "no",
                "systemd was not reloaded after {UNIT_PATH} changed"
            );
        }
    }
    Ok(())
}

/// Checks the previous definition was kept in the agent's state dir, and nothing beside the
/// definition (init.d: an old-style backup moved there when the agent started).
fn check_backups(m: &Machine, variant: Variant, backup: &str) -> Result<()> {
    let (dir, name) = match variant {
        Variant::Initd | Variant::InitdVariables => ("/etc/init.d", "atlbitbucket"),
        _ => ("/etc/systemd/system", UNIT),
    };
    let want = format!("{STATE_DIR}/service-backups/{FROM}/{name}");
    ensure!(backup == want, "the backup is {backup}, not {want}");
    let text = std::fs::read_to_string(m.path(backup))?;
    let same = if variant.initd() {
        text == variant.script(FROM)
    } else {
        text.contains(&format!("{}/bin", install(FROM)))
    };
    ensure!(
        same,
        "the backup {backup} is not the definition of {FROM}:\n{text}"
    );
    let beside: Vec<String> = std::fs::read_dir(m.path(dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(name) && n != name)
        .collect();
    ensure!(
        beside.is_empty(),
        "backups beside the definition in {dir}: {beside:?}"
    );
    if variant.initd() {
        let moved = format!("{STATE_DIR}/service-backups/{LEGACY}/atlbitbucket");
        ensure!(
            std::fs::read_to_string(m.path(&moved))? == initd_text(LEGACY),
            "the old-style backup was not moved to {moved}"
        );
    }
    Ok(())
}

/// Checks Bitbucket runs `version`: `/status` through the agent, the node's own info page from the
/// host, and (systemd) the unit active with the node as its main process or its descendant.
async fn check_running(node: &Node, variant: Variant, version: &str) -> Result<()> {
    let m = &node.machine;
    let url = format!("http://{}:{NODE_PORT}", m.link.guest_addr);
    let seen = node_version(&url).await?;
    ensure!(
        seen == version,
        "the node at {url} runs {seen}, not {version}"
    );
    if !variant.initd() {
        let s = unit_state(m)?;
        ensure!(
            s.active == "active" && s.main_pid != 0,
            "{UNIT} is {} with MainPID {}:\n{}",
            s.active,
            s.main_pid,
            m.journal(UNIT)
        );
        if variant == Variant::SystemdForking {
            ensure!(
                Some(s.main_pid) == bitbucket_pid(m),
                "MainPID {} is not the pid in {HOME}/log/bitbucket.pid ({:?})",
                s.main_pid,
                bitbucket_pid(m)
            );
        }
        let cgroup = m.show(UNIT, "ControlGroup")?;
        let pid = bbupgrade_tests::node_pid(&url).await?;
        let procs = m.run(&["cat", &format!("/sys/fs/cgroup{cgroup}/cgroup.procs")])?;
        ensure!(
            procs.split_whitespace().any(|p| p == pid.to_string()),
            "Bitbucket (pid {pid}) is not in {UNIT}'s cgroup {cgroup}: {procs}"
        );
    }
    Ok(())
}

async fn upgrade_and_roll_back(variant: Variant, name: &str) -> Result<()> {
    let started = Instant::now();
    let bins = bins!();
    let mut node = prepare_machine(&bins, name, variant)?;
    install_agent_by_hand(&bins, &node)?;
    let prepared = started.elapsed();
    node.machine.boot()?;
    let booted = started.elapsed();
    let result = drive(&node, variant).await;
    let m = &node.machine;
    let result = result.with_context(|| {
        format!(
            "agent journal:\n{}\nBitbucket unit journal:\n{}",
            m.journal("bbupgrade-agent.service"),
            m.journal(UNIT)
        )
    });
    let finished = started.elapsed();
    let teardown = node.machine.shutdown();
    eprintln!(
        "{name}: machine prepared in {} ms, booted at {} ms, steps done at {} ms, torn down at {} ms",
        prepared.as_millis(),
        booted.as_millis(),
        finished.as_millis(),
        started.elapsed().as_millis()
    );
    match (result, teardown) {
        (Err(e), Err(t)) => Err(e.context(format!("and the teardown failed: {t:#}"))),
        (r, t) => r.and(t),
    }
}

async fn drive(node: &Node, variant: Variant) -> Result<()> {
    let m = &node.machine;
    let original = match variant {
        Variant::Initd | Variant::InitdVariables => std::fs::read_to_string(m.path(INITD_PATH))?,
        _ => std::fs::read_to_string(m.path(UNIT_PATH))?,
    };
    // The agent as the admin runs it: Type=notify, so `start` returns once it serves.
    m.systemctl(&["start", "bbupgrade-agent.service"])?;
    ensure!(
        m.show("bbupgrade-agent.service", "ActiveState")? == "active",
        "the agent is not active"
    );
    let mut client = connect(node).await?;
    let d = Duration::from_secs(u64::from(STEP_SECS));

    // Bitbucket runs on the old version, started by its service manager.
    match variant {
        Variant::Initd | Variant::InitdVariables => {
            client
                .start(req(StartRequest {
                    operation_id: "initial-start".into(),
                    timeout_secs: STEP_SECS,
                }))
                .await?;
        }
        _ => {
            m.systemctl(&["start", UNIT])?;
            let status = format!("http://{}:{NODE_PORT}/status", m.link.guest_addr);
            wait_for(d, || async {
                match reqwest::get(&status).await {
                    Ok(r) => r.text().await.is_ok_and(|b| b.contains("RUNNING")),
                    Err(_) => false,
                }
            })
            .await
            .context("waiting for Bitbucket to say RUNNING")?;
        }
    }
    check_running(node, variant, FROM).await?;
    let info = client
        .node_info(req(NodeInfoRequest {}))
        .await?
        .into_inner();
    ensure!(
        info.active_version == FROM && info.status == "RUNNING",
        "node info: active {} status {}",
        info.active_version,
        info.status
    );

    // Stage and prepare while it serves.
    let staged = stage(&mut client, &node.to_archive).await?;
    ensure!(
        staged.install_path == install(TO),
        "staged at {}",
        staged.install_path
    );
    // Installs are root's and not writable by the Bitbucket user (issue 14).
    let meta = std::fs::metadata(m.path(&install(TO)).join("bin/start-bitbucket.sh"))?;
    use std::os::unix::fs::MetadataExt;
    ensure!(
        meta.uid() == 0 && meta.mode() & 0o022 == 0,
        "staged files are owned by uid {} with mode {:o}, not root's and read-only to {USER}",
        meta.uid(),
        meta.mode()
    );
    let prepared = client
        .prepare(req(PrepareRequest {
            operation_id: "systemd-prepare".into(),
            version: TO.into(),
        }))
        .await?
        .into_inner();
    ensure!(
        prepared.bitbucket_home == HOME,
        "prepared home {}",
        prepared.bitbucket_home
    );

    // Upgrade mode, as the coordinator enables it: else the new version may not join.
    let zdu = reqwest::Client::new()
        .post(format!(
            "http://{}:{NODE_PORT}/rest/zdu/start",
            m.link.guest_addr
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    ensure!(
        zdu.status().is_success(),
        "enabling upgrade mode: {}",
        zdu.status()
    );

    // Stop through the service manager.
    let stopped = client
        .stop(req(StopRequest {
            operation_id: "systemd-stop".into(),
            timeout_secs: STEP_SECS,
            kill_after_timeout: false,
        }))
        .await?
        .into_inner();
    ensure!(stopped.was_running && !stopped.killed, "stop: {stopped:?}");
    if !variant.initd() {
        let s = unit_state(m)?;
        ensure!(
            s.active == "inactive" && s.main_pid == 0,
            "after stop {UNIT} is {} with MainPID {}:\n{}",
            s.active,
            s.main_pid,
            m.journal(UNIT)
        );
    }

    // Activate: the definition edited, systemd reloaded.
    let activated = client
        .activate(req(ActivateRequest {
            operation_id: "systemd-activate".into(),
            version: TO.into(),
        }))
        .await?
        .into_inner();
    check_definition(m, variant, TO).context(format!("after activate: {activated:?}"))?;
    check_backups(m, variant, &activated.backup_path)?;
    let info = client
        .node_info(req(NodeInfoRequest {}))
        .await?
        .into_inner();
    ensure!(
        info.backups
            .iter()
            .any(|b| b.version == FROM && b.path == activated.backup_path),
        "node info does not list the backup {}: {:?}",
        activated.backup_path,
        info.backups
    );
    let path = if variant.initd() {
        INITD_PATH
    } else {
        UNIT_PATH
    };
    let text = std::fs::read_to_string(m.path(path))?;
    let start = if variant == Variant::InitdVariables {
        "\"$START_SCRIPT\""
    } else {
        "start-bitbucket.sh"
    };
    ensure!(
        text.lines()
            .any(|l| l.contains(start) && l.contains("--no-search")),
        "{path} does not start with --no-search:\n{text}"
    );

    // Start on the new version.
    let start = client
        .start(req(StartRequest {
            operation_id: "systemd-start".into(),
            timeout_secs: STEP_SECS,
        }))
        .await?
        .into_inner();
    ensure!(
        start.state == "RUNNING" && start.version == TO,
        "start: {start:?}"
    );
    check_running(node, variant, TO).await?;
    let sim: serde_json::Value =
        reqwest::get(format!("http://{}:{NODE_PORT}/sim/info", m.link.guest_addr))
            .await?
            .json()
            .await?;
    ensure!(
        sim["bundledSearchStarted"] == false,
        "{TO} started the bundled search: --no-search did not reach the start script: {sim}"
    );

    // Roll back: the old definition and version again.
    let rolled = client
        .rollback(req(RollbackRequest {
            operation_id: "systemd-rollback".into(),
            stop_timeout_secs: STEP_SECS,
            start_timeout_secs: STEP_SECS,
            no_start: false,
            target_version: String::new(),
        }))
        .await?
        .into_inner();
    ensure!(
        rolled.state == "RUNNING" && rolled.version == FROM,
        "rollback: {rolled:?}"
    );
    check_definition(m, variant, FROM)?;
    ensure!(
        std::fs::read_to_string(m.path(path))? == original,
        "{path} is not back to its original text"
    );
    check_running(node, variant, FROM).await?;

    if variant.initd() {
        // Bitbucket was started from the agent's unit; restarting the agent must not stop it.
        let pid = bitbucket_pid(m).context("no bitbucket.pid")?;
        m.systemctl(&["restart", "bbupgrade-agent.service"])?;
        ensure!(
            m.run(&["test", "-d", &format!("/proc/{pid}")]).is_ok(),
            "restarting bbupgrade-agent.service killed Bitbucket (pid {pid})"
        );
        check_running(node, variant, FROM).await?;
    }
    Ok(())
}

async fn wait_for<F, Fut>(timeout: Duration, mut ok: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !ok().await {
        ensure!(Instant::now() < deadline, "timed out after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_foreground_unit_upgrades_and_rolls_back() -> Result<()> {
    upgrade_and_roll_back(Variant::SystemdForeground, "sd-fg").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_forking_unit_upgrades_and_rolls_back() -> Result<()> {
    upgrade_and_roll_back(Variant::SystemdForking, "sd-fork").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initd_script_upgrades_and_rolls_back() -> Result<()> {
    upgrade_and_roll_back(Variant::Initd, "sd-initd").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initd_script_with_its_own_variables_upgrades_and_rolls_back() -> Result<()> {
    upgrade_and_roll_back(Variant::InitdVariables, "sd-initd-vars").await
}

/// `systemd-analyze verify` accepts the shipped unit (the agent binary it names must exist, so a
/// stand-in is put where it would be installed when the machine lacks it).
#[test]
fn shipped_unit_verifies() -> Result<()> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/bbupgrade-agent.service");
    let m = Machine::create("sd-verify")?;
    std::fs::copy(&bins!().agent, m.path("/usr/bin/bbupgrade-agent"))?;
    std::fs::copy(&unit, m.path("/etc/systemd/system/bbupgrade-agent.service"))?;
    let out = m.chroot(&[
        "systemd-analyze",
        "verify",
        "--man=no",
        "/etc/systemd/system/bbupgrade-agent.service",
    ]);
    m.shutdown()?;
    out.map(drop)
}

/// The newest `target/debian/bbupgrade-agent_*.deb`; `None` (skipped) outside CI when there is none.
fn agent_package() -> Result<Option<std::path::PathBuf>> {
    let dir = bbupgrade_tests::systemd_harness::target_dir().join("debian");
    let newest = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("bbupgrade-agent_") && n.ends_with(".deb"))
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    let how = "build it with `cargo install cargo-deb --locked && cargo build -p bbupgrade-agent && cargo deb -p bbupgrade-agent --profile dev --no-build` (.ci/run does)";
    match newest {
        Some(p) => Ok(Some(p)),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            anyhow::bail!("no bbupgrade-agent .deb in {}: {how}", dir.display())
        }
        None => {
            eprintln!(
                "SKIPPED: no bbupgrade-agent .deb in {}: {how}",
                dir.display()
            );
            Ok(None)
        }
    }
}

/// The agent's .deb installs into a fresh node (binary, unit, /etc/bbupgrade 0750, the state
/// dir), leaves the agent stopped and disabled while there is no configuration, and starts under
/// `systemctl` once agent.toml and the certificates are in place, serving over mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_package_installs_and_starts() -> Result<()> {
    let Some(deb) = agent_package()? else {
        return Ok(());
    };
    let bins = bins!();
    let mut node = prepare_machine(&bins, "sd-deb", Variant::SystemdForeground)?;
    std::fs::copy(&deb, node.machine.path("/root/bbupgrade-agent.deb"))
        .with_context(|| format!("copying {}", deb.display()))?;
    node.machine.boot()?;
    let result = install_and_start(&node).await;
    let result = result.with_context(|| {
        format!(
            "agent journal:\n{}",
            node.machine.journal("bbupgrade-agent.service")
        )
    });
    let teardown = node.machine.shutdown();
    match (result, teardown) {
        (Err(e), Err(t)) => Err(e.context(format!("and the teardown failed: {t:#}"))),
        (r, t) => r.and(t),
    }
}

async fn install_and_start(node: &Node) -> Result<()> {
    let m = &node.machine;
    let said = m.run(&["dpkg", "-i", "/root/bbupgrade-agent.deb"])?;
    ensure!(
        said.contains("write /etc/bbupgrade/agent.toml"),
        "dpkg -i did not say what to do next: {said}"
    );
    let listed = m.run(&["dpkg", "-L", "bbupgrade-agent"])?;
    for f in [
        "/usr/bin/bbupgrade-agent",
        "/lib/systemd/system/bbupgrade-agent.service",
        "/usr/share/doc/bbupgrade-agent/examples/agent.toml.example",
    ] {
        ensure!(
            listed.lines().any(|l| l == f),
            "{f} not in the package: {listed}"
        );
    }
    let modes = m.run(&["stat", "-c", "%a %U %n", "/etc/bbupgrade", STATE_DIR])?;
    ensure!(
        modes.contains("750 root /etc/bbupgrade")
            && modes.contains(&format!("700 root {STATE_DIR}")),
        "directory modes: {modes}"
    );
    // No configuration yet: systemd knows the unit (daemon-reload) but nothing started it.
    ensure!(
        m.show("bbupgrade-agent.service", "LoadState")? == "loaded"
            && m.show("bbupgrade-agent.service", "ActiveState")? == "inactive"
            && m.show("bbupgrade-agent.service", "UnitFileState")? == "disabled",
        "the agent unit after install: {}",
        m.exec_text(&["systemctl", "status", "bbupgrade-agent.service"])
    );
    configure_agent(node)?;
    m.systemctl(&["enable", "--now", "bbupgrade-agent.service"])?;
    ensure!(
        m.show("bbupgrade-agent.service", "ActiveState")? == "active",
        "the packaged agent is not active"
    );
    let mut client = connect(node).await?;
    let info = client
        .node_info(req(NodeInfoRequest {}))
        .await?
        .into_inner();
    ensure!(
        info.node_id == NODE,
        "the agent says it is {}",
        info.node_id
    );
    Ok(())
}

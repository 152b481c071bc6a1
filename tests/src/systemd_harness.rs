//! A real systemd, booted as PID 1 of its own namespaces over a throwaway Debian root, for tests
//! that need the service manager itself (units, `daemon-reload`, the agent's sandbox).
//!
//! Why by hand: `systemd-nspawn` needs a system bus these machines lack, and systemd must never be
//! booted against the machine's own `/` (its tmpfiles service would empty the host's `/tmp`). So:
//! a `debootstrap --variant=minbase` root cached as `target/systemd-rootfs.tar` (built once, under a
//! lock, by `tests/scripts/make-rootfs.sh`), extracted per test into a temporary directory, and
//! booted with `unshare` (PID, mount, UTS, IPC, network and cgroup namespaces) + `chroot`. The
//! cgroup namespace is rooted in a cgroup of our own on the host's cgroup2 hierarchy, because
//! systemd will not boot without a writable cgroup tree, and it gives teardown `cgroup.kill`.
//! A veth pair with a /30 connects the host to the machine, so the agent inside is reached over
//! mutual TLS like a real node. Commands go in with `nsenter`.
//!
//! Every mount is made inside the machine's private mount namespace, so it vanishes with it;
//! [`Machine::shutdown`] (and `Drop`, pass or fail) kills PID 1 and the cgroup, unmounts anything
//! left, deletes the veth and the cgroups, and `shutdown` reports whatever survived.

use anyhow::{Context, Result, bail, ensure};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The cached root file system, under the workspace's target directory.
pub const ROOTFS_TARBALL: &str = "systemd-rootfs.tar";
pub const BOOT_TIMEOUT_SECS: u64 = 60;
const TEARDOWN_TIMEOUT_SECS: u64 = 10;
const POLL_MS: u64 = 50;
/// A machine cgroup empty for this long belongs to a test run that was killed.
const STALE_SECS: u64 = 300;
/// Machines get 10.239.x.y/30 subnets; 16384 of them.
const SUBNETS: u32 = 16384;
const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Mounts the machine needs, made inside its mount namespace, then systemd in its place.
const BOOT_SCRIPT: &str = r#"set -eu
R=$1
mount --bind "$R" "$R"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid,size=4m tmpfs "$R/dev"
for d in null zero full random urandom tty; do
    touch "$R/dev/$d"
    mount --bind "/dev/$d" "$R/dev/$d"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
ln -s /proc/self/fd "$R/dev/fd"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
exec chroot "$R" /lib/systemd/systemd
"#;

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// The cached root file system, built first if missing (about a minute; parallel callers wait
/// on the script's lock).
pub fn rootfs_tarball() -> Result<PathBuf> {
    let tarball = target_dir().join(ROOTFS_TARBALL);
    if tarball.is_file() {
        return Ok(tarball);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/make-rootfs.sh");
    let started = Instant::now();
    let out = Command::new("sh")
        .arg(&script)
        .arg(&tarball)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        out.status.success() && tarball.is_file(),
        "building the test root file system with {} failed (needs root, debootstrap and a Debian mirror):\n{}",
        script.display(),
        crate::describe(&out)
    );
    eprintln!(
        "{} ready after {} ms (built, or waited for another test building it)",
        tarball.display(),
        started.elapsed().as_millis()
    );
    Ok(tarball)
}

/// The host's cgroup2 hierarchy: `/sys/fs/cgroup` (unified) or `/sys/fs/cgroup/unified` (hybrid).
fn cgroup2_root() -> Result<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").is_file())
        .context("no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: systemd cannot boot in a container here")
}

/// The host end of a machine's network link.
#[derive(Debug, Clone)]
pub struct Link {
    pub host_if: String,
    pub guest_if: String,
    pub host_addr: Ipv4Addr,
    pub guest_addr: Ipv4Addr,
}

fn create_link() -> Result<Link> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(97);
    let mut last_err = String::new();
    for _ in 0..32 {
        let idx = base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % SUBNETS;
        let (third, fourth) = ((idx / 64) as u8, ((idx % 64) * 4) as u8);
        let link = Link {
            host_if: format!("bbuh{idx}"),
            guest_if: format!("bbuc{idx}"),
            host_addr: Ipv4Addr::new(10, 239, third, fourth + 1),
            guest_addr: Ipv4Addr::new(10, 239, third, fourth + 2),
        };
        let out = ip(&[
            "link",
            "add",
            &link.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &link.guest_if,
        ])?;
        if out.status.success() {
            return Ok(link);
        }
        last_err = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    bail!("could not create a veth pair (iproute2 installed? running as root?): {last_err}")
}

fn ip(args: &[&str]) -> Result<Output> {
    Command::new("ip")
        .args(args)
        .env("PATH", HOST_PATH)
        .output()
        .context("running `ip` (apt-get install -y iproute2)")
}

fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        crate::describe(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Debian root with (after [`Machine::boot`]) systemd running as its PID 1.
pub struct Machine {
    pub name: String,
    /// Files of the test that live outside the machine (its log, archives, PKI).
    pub dir: PathBuf,
    /// The machine's `/`, as the host sees it.
    pub root: PathBuf,
    pub link: Link,
    /// systemd's stdout and stderr.
    pub boot_log: PathBuf,
    cgroup: PathBuf,
    unshare: Option<Child>,
    /// PID 1 of the machine, as the host numbers it.
    pid: Option<i32>,
    torn_down: bool,
    _tmp: tempfile::TempDir,
}

impl Machine {
    /// Extracts the cached root file system into a fresh directory and creates the network link;
    /// nothing runs yet, so the caller can install files with plain writes.
    pub fn create(name: &str) -> Result<Machine> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "booting systemd in namespaces needs root"
        );
        sweep_stale();
        let tarball = rootfs_tarball()?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("bbupgrade-{name}-"))
            .tempdir()
            .context("creating the machine's directory")?;
        let dir = tmp.path().to_path_buf();
        let root = dir.join("root");
        std::fs::create_dir(&root)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        run_checked(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("--numeric-owner")
                .arg("-xpf")
                .arg(&tarball),
        )
        .with_context(|| format!("extracting {}", tarball.display()))?;
        // No console in the machine: a getty on it would only restart forever.
        std::os::unix::fs::symlink(
            "/dev/null",
            root.join("etc/systemd/system/console-getty.service"),
        )?;
        std::fs::write(root.join("etc/hostname"), format!("{name}\n"))?;
        // Named as the directory (`bbupgrade-<name>-<random>`), so either tells of the other.
        let cgroup = cgroup2_root()?.join(dir.file_name().context("the machine's directory")?);
        let link = create_link()?;
        Ok(Machine {
            name: name.to_string(),
            boot_log: dir.join("boot.log"),
            dir,
            root,
            link,
            cgroup,
            unshare: None,
            pid: None,
            torn_down: false,
            _tmp: tmp,
        })
    }

    /// The host path of a path inside the machine.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// Runs a command chrooted into the machine before it boots (e.g. `useradd`).
    pub fn chroot(&self, args: &[&str]) -> Result<String> {
        run_checked(
            Command::new("chroot")
                .arg(&self.root)
                .args(args)
                .env_clear()
                .env("PATH", HOST_PATH),
        )
    }

    /// Boots systemd and waits until it reports `running` (or `degraded`, with the failed units
    /// in the error), then gives the machine its network address.
    pub fn boot(&mut self) -> Result<()> {
        std::fs::create_dir(&self.cgroup)
            .with_context(|| format!("creating the cgroup {}", self.cgroup.display()))?;
        let log = std::fs::File::create(&self.boot_log)?;
        // The shell joins our cgroup first, so `--cgroup` roots the machine's namespace there.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec unshare --kill-child=SIGKILL --pid --fork --mount --uts --ipc --net --cgroup --propagation private sh -c "$2" boot "$3""#)
            .arg("sh")
            .arg(&self.cgroup)
            .arg(BOOT_SCRIPT)
            .arg(&self.root)
            .env_clear()
            .env("PATH", HOST_PATH)
            .env("container", &self.name)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Should this test process die without tearing down, `unshare` dies with it, and its
        // `--kill-child` takes the machine along.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = cmd.spawn().context("starting unshare")?;
        let unshare_pid = child.id();
        self.unshare = Some(child);
        let deadline = Instant::now() + Duration::from_secs(BOOT_TIMEOUT_SECS);
        let pid = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
                    .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok())
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            {
                break pid;
            }
            if let Some(status) = self
                .unshare
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "the machine exited during boot ({status}); its log:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("systemd did not start; boot log:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(POLL_MS));
        };
        self.pid = Some(pid);
        let state = loop {
            let out = self.exec(&["systemctl", "is-system-running"])?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                break state;
            }
            if Instant::now() > deadline {
                bail!(
                    "systemd did not finish booting within {BOOT_TIMEOUT_SECS} s (state '{state}'); jobs:\n{}\nboot log:\n{}",
                    self.exec_text(&["systemctl", "list-jobs", "--no-pager"]),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(POLL_MS));
        };
        ensure!(
            state == "running",
            "systemd booted degraded; failed units:\n{}",
            self.exec_text(&["systemctl", "--failed", "--no-pager"])
        );
        self.configure_link(pid)
    }

    fn configure_link(&self, pid: i32) -> Result<()> {
        let l = &self.link;
        let pid_s = pid.to_string();
        let out = ip(&["link", "set", &l.guest_if, "netns", &pid_s])?;
        ensure!(
            out.status.success(),
            "moving {} into the machine: {}",
            l.guest_if,
            crate::describe(&out)
        );
        for args in [
            vec![
                "addr".to_string(),
                "add".into(),
                format!("{}/30", l.host_addr),
                "dev".into(),
                l.host_if.clone(),
            ],
            vec!["link".into(), "set".into(), l.host_if.clone(), "up".into()],
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = ip(&args)?;
            ensure!(
                out.status.success(),
                "ip {args:?}: {}",
                crate::describe(&out)
            );
        }
        // The host's `ip`, inside the machine's network namespace only.
        for args in [
            format!("addr add {}/30 dev {}", l.guest_addr, l.guest_if),
            format!("link set {} up", l.guest_if),
        ] {
            run_checked(
                Command::new("nsenter")
                    .args(["-t", &pid_s, "-n", "ip"])
                    .args(args.split(' '))
                    .env("PATH", HOST_PATH),
            )?;
        }
        Ok(())
    }

    /// PID 1 of the machine as the host numbers it (after boot).
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// Runs a command inside the booted machine (all its namespaces, its root and working
    /// directory) and returns its output whatever the exit code.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let pid = self.pid.context("the machine is not booted")?;
        Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-m",
                "-p",
                "-u",
                "-i",
                "-n",
                "-r",
                "-w",
            ])
            .args(args)
            .env_clear()
            .env("PATH", HOST_PATH)
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null())
            .output()
            .context("running nsenter")
    }

    /// stdout and stderr of a command inside, for messages.
    pub fn exec_text(&self, args: &[&str]) -> String {
        match self.exec(args) {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("({e:#})"),
        }
    }

    /// Runs a command inside; fails on a non-zero exit.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.exec(args)?;
        ensure!(
            out.status.success(),
            "`{}` in machine {} failed: {}",
            args.join(" "),
            self.name,
            crate::describe(&out)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `systemctl <args>` inside; fails on a non-zero exit, with the unit's journal.
    pub fn systemctl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["systemctl", "--no-pager"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// One property of a unit, as `systemctl show -p <prop> --value` prints it.
    pub fn show(&self, unit: &str, prop: &str) -> Result<String> {
        Ok(self
            .systemctl(&["show", "-p", prop, "--value", unit])?
            .trim_end()
            .to_string())
    }

    /// The last lines of a unit's journal, for assertion messages.
    pub fn journal(&self, unit: &str) -> String {
        self.exec_text(&["journalctl", "--no-pager", "-n", "60", "-u", unit])
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.boot_log)
            .map(|t| bbupgrade_agent::service::tail(&t, 40))
            .unwrap_or_default()
    }

    /// Tears the machine down and fails if anything of it is left: a process, a mount under its
    /// root, its PID namespace, its cgroup or its network link.
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown();
        let left = self.leftovers();
        ensure!(
            left.is_empty(),
            "machine {} left behind: {}",
            self.name,
            left.join("; ")
        );
        Ok(())
    }

    /// What is still there of the machine (empty after a clean teardown).
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        if let Some(pid) = self.pid
            && Path::new(&format!("/proc/{pid}")).exists()
        {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let brief: Vec<&str> = status
                .lines()
                .filter(|l| {
                    ["Name:", "State:", "PPid:"]
                        .iter()
                        .any(|k| l.starts_with(k))
                })
                .collect();
            left.push(format!(
                "its PID 1 ({pid}: {}) and PID namespace",
                brief.join(", ")
            ));
        }
        let root = self.dir.to_string_lossy().into_owned();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&root)))
            .map(str::to_string)
            .collect();
        if !mounts.is_empty() {
            left.push(format!("mounts: {}", mounts.join(" | ")));
        }
        if self.cgroup.exists() {
            left.push(format!(
                "cgroup {} (processes: {})",
                self.cgroup.display(),
                cgroup_procs(&self.cgroup).join(" ")
            ));
        }
        if ip(&["link", "show", &self.link.host_if]).is_ok_and(|o| o.status.success()) {
            left.push(format!("network link {}", self.link.host_if));
        }
        left
    }

    /// Kill everything, pass or fail: PID 1 (the PID namespace goes with it), then whatever the
    /// cgroup still holds; unmount what is left; delete the link and the cgroups.
    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        if let Some(pid) = self.pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // `unshare` (in the cgroup too) must live to reap PID 1, or PID 1 stays a zombie.
        if let Some(mut child) = self.unshare.take() {
            let deadline = Instant::now() + Duration::from_secs(TEARDOWN_TIMEOUT_SECS);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(POLL_MS));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.cgroup.exists() {
            let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
        }
        // The mounts were made in the machine's own namespace; this only matters if one leaked.
        let root = self.dir.to_string_lossy().into_owned();
        if std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|m| m.lines().any(|l| l.contains(root.as_str())))
        {
            let _ = Command::new("umount")
                .args(["-R", "-l"])
                .arg(&self.root)
                .env("PATH", HOST_PATH)
                .output();
        }
        let _ = ip(&["link", "del", &self.link.host_if]);
        remove_cgroup_tree(&self.cgroup);
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Removes what machines of killed test runs left: a cgroup of ours that has held no process for
/// a while (a live machine's always holds its PID 1), and the directory named as it.
fn sweep_stale() {
    let Ok(root) = cgroup2_root() else { return };
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(STALE_SECS));
        let empty = std::fs::read_to_string(path.join("cgroup.events"))
            .is_ok_and(|e| e.lines().any(|l| l == "populated 0"));
        if name.starts_with("bbupgrade-") && old && empty {
            remove_cgroup_tree(&path);
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&name));
        }
    }
}

fn cgroup_procs(cgroup: &Path) -> Vec<String> {
    let mut procs = Vec::new();
    let mut stack = vec![cgroup.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            procs.extend(text.split_whitespace().map(str::to_string));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    procs
}

/// Removes a cgroup and its children, deepest first; the kernel frees a cgroup a moment after
/// its last process, so this retries for a while.
fn remove_cgroup_tree(cgroup: &Path) {
    let deadline = Instant::now() + Duration::from_secs(TEARDOWN_TIMEOUT_SECS);
    while cgroup.exists() && Instant::now() < deadline {
        let mut dirs = Vec::new();
        let mut stack = vec![cgroup.to_path_buf()];
        while let Some(dir) = stack.pop() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            dirs.push(dir);
        }
        for dir in dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        if cgroup.exists() {
            std::thread::sleep(Duration::from_millis(POLL_MS));
        }
    }
}

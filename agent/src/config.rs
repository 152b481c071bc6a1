//! The agent's configuration: raw TOML as written by the admin, validated into [`Settings`] so the
//! rest of the agent never sees an unchecked value.

use crate::url_policy::HostRule;
use anyhow::{Context, Result, bail, ensure};
use bbupgrade_common::accept::{
    AcceptLimits, DEFAULT_HANDSHAKE_TIMEOUT_SECS, DEFAULT_MAX_CONNECTIONS,
};
use bbupgrade_common::identity::{Role, validate_name};
use bbupgrade_common::nginx::{NginxHost, NginxMode, NginxSettings};
use bbupgrade_common::tls::{TlsFiles, TlsMaterial};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/bbupgrade";
pub const DEFAULT_STOP_TIMEOUT_SECS: u32 = 300;
pub const DEFAULT_START_TIMEOUT_SECS: u32 = 900;
pub const DEFAULT_MAX_ARCHIVE_BYTES: u64 = 8 << 30;
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 4 << 30;
pub const DEFAULT_KEEP_INSTALLS: u32 = 3;
/// An upload that delivers nothing for this long is given up (staging dir removed, op failed).
pub const DEFAULT_UPLOAD_IDLE_TIMEOUT_SECS: u64 = 120;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub node_id: String,
    pub listen: String,
    pub state_dir: Option<PathBuf>,
    pub tls: RawTls,
    pub bitbucket: RawBitbucket,
    pub service: RawService,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub stage: RawStage,
    /// The load-balancer role: this agent runs on the NGINX host and edits its upstream.
    pub lb: Option<RawLb>,
}

/// `[tls]`: the agent's certificate, the CA it trusts, and who of the CA may drive it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    /// Must be readable by its owner only (0600).
    pub key: PathBuf,
    /// The CA's revocation list (`crl.pem` of `bbupgrade pki`).
    pub crl: Option<PathBuf>,
    /// The coordinator names served; absent: any coordinator of the CA (warned at start).
    pub allowed_coordinators: Option<Vec<String>>,
}

impl From<TlsFiles> for RawTls {
    fn from(f: TlsFiles) -> Self {
        Self {
            ca: f.ca,
            cert: f.cert,
            key: f.key,
            crl: f.crl,
            allowed_coordinators: None,
        }
    }
}

/// `[stage]`: where `StageFromUrl` may download from.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    /// `host` or `host:port` entries; absent: archive URLs are refused.
    pub url_hosts: Option<Vec<String>>,
}

/// `[lb]`: the same keys as the coordinator's `kind = "nginx"` load balancer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLb {
    /// Only `nginx` for now.
    pub kind: String,
    /// The file holding the `upstream` block (the main file or one it includes).
    pub config: PathBuf,
    /// One upstream (the older form; the same as `upstreams = ["..."]`).
    #[serde(default)]
    pub upstream: String,
    /// Every upstream a node is in, e.g. the `http` one and the `stream` one of Git over SSH.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Upstreams held in another file than `config`: upstream -> file.
    #[serde(default)]
    pub configs: std::collections::BTreeMap<String, PathBuf>,
    /// Where a node's server has another address in some upstream: upstream -> (the server the
    /// coordinator names -> its address there).
    #[serde(default)]
    pub server_names:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    /// `down` (default) marks the server down; `remove` comments its line out.
    #[serde(default)]
    pub mode: NginxMode,
    /// What `nginx -t -c` checks (default `/etc/nginx/nginx.conf`).
    pub main_config: Option<PathBuf>,
    /// NGINX's `-p` prefix, when it runs with one.
    pub prefix: Option<PathBuf>,
    /// The program (default `/usr/sbin/nginx`).
    pub nginx: Option<PathBuf>,
    /// The master's pid file (default `/run/nginx.pid`).
    pub pid_file: Option<PathBuf>,
    /// Reload with this command instead of SIGHUP, e.g. `["systemctl", "reload", "nginx"]`.
    pub reload_command: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBitbucket {
    pub install_root: PathBuf,
    pub current_install: PathBuf,
    pub home: PathBuf,
    /// The unprivileged user Bitbucket runs as. Omitted: the agent's own user (only when not root).
    pub user: Option<String>,
    pub status_url: String,
    /// A `current` symlink the service starts through, switched on activation.
    pub current_link: Option<PathBuf>,
    /// Files (relative to the install) to carry over besides the default list.
    #[serde(default)]
    pub carry_files: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub kind: String,
    /// systemd unit name, e.g. `atlbitbucket.service`.
    pub unit: Option<String>,
    /// The unit file or init.d script the agent edits on activation.
    pub path: Option<PathBuf>,
    /// `systemctl` to run (tests point it elsewhere).
    pub systemctl: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub stop_timeout_secs: Option<u32>,
    pub start_timeout_secs: Option<u32>,
    pub max_archive_bytes: Option<u64>,
    pub cache_max_bytes: Option<u64>,
    pub keep_installs: Option<u32>,
    /// Open connections at most (default 256); at the cap the oldest one without an allowed
    /// coordinator certificate is closed.
    pub max_connections: Option<usize>,
    /// A TLS handshake not done in this time is dropped (default 10).
    pub handshake_timeout_secs: Option<u64>,
    /// An upload that sends nothing for this long fails (default 120).
    pub upload_idle_timeout_secs: Option<u64>,
}

/// How the node's Bitbucket is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceSettings {
    Systemd {
        unit: String,
        unit_path: PathBuf,
        systemctl: PathBuf,
    },
    Initd {
        script: PathBuf,
    },
    Scripts,
}

impl ServiceSettings {
    pub fn kind_name(&self) -> &'static str {
        match self {
            ServiceSettings::Systemd { .. } => "systemd",
            ServiceSettings::Initd { .. } => "initd",
            ServiceSettings::Scripts => "scripts",
        }
    }
}

/// The user Bitbucket runs as, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Validated settings.
#[derive(Clone)]
pub struct Settings {
    pub node_id: String,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub tls: TlsMaterial,
    pub install_root: PathBuf,
    pub initial_install: PathBuf,
    pub home: PathBuf,
    pub user: RunUser,
    pub status_url: String,
    pub current_link: Option<PathBuf>,
    pub carry_files: Vec<String>,
    pub service: ServiceSettings,
    pub stop_timeout_secs: u32,
    pub start_timeout_secs: u32,
    pub max_archive_bytes: u64,
    pub cache_max_bytes: u64,
    pub keep_installs: u32,
    /// The load-balancer role, when `[lb]` is configured.
    pub lb: Option<NginxHost>,
    /// `[tls] crl`, re-read when it changes.
    pub crl_file: Option<PathBuf>,
    /// `[tls] allowed_coordinators`; `None`: any coordinator of the CA.
    pub allowed_coordinators: Option<Vec<String>>,
    pub accept: AcceptLimits,
    pub upload_idle_timeout: Duration,
    /// `[stage] url_hosts`; `None`: no URL is fetched.
    pub url_hosts: Option<Vec<HostRule>>,
}

impl Settings {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the agent config {}", path.display()))?;
        let raw: RawConfig = toml::from_str(&text)
            .with_context(|| format!("parsing the agent config {}", path.display()))?;
        Self::validate(raw).with_context(|| format!("in the agent config {}", path.display()))
    }

    pub fn validate(raw: RawConfig) -> Result<Self> {
        validate_name(&raw.node_id).context("node_id")?;
        let listen: SocketAddr = raw.listen.parse().with_context(|| {
            format!(
                "listen = '{}' must be an address:port such as 0.0.0.0:7443",
                raw.listen
            )
        })?;
        let allowed_coordinators = raw
            .tls
            .allowed_coordinators
            .map(|names| {
                ensure!(
                    !names.is_empty(),
                    "tls.allowed_coordinators is empty, which would refuse every coordinator; list the coordinator names (as in `pki issue --role coordinator --name NAME`) or remove the key"
                );
                for n in &names {
                    validate_name(n).context("tls.allowed_coordinators")?;
                }
                Ok(names)
            })
            .transpose()?;
        let crl_file = raw.tls.crl.clone();
        let tls = TlsFiles {
            ca: raw.tls.ca,
            cert: raw.tls.cert,
            key: raw.tls.key,
            crl: raw.tls.crl,
        }
        .load()
        .context("[tls]")?;
        let own = tls.own_identity().context("[tls] cert")?;
        ensure!(
            own.role == Role::Agent && own.name == raw.node_id,
            "[tls] cert names {own}, but this agent is node '{}': issue one with `bbupgrade pki issue --role agent --name {}`",
            raw.node_id,
            raw.node_id
        );
        let b = raw.bitbucket;
        for (key, p) in [
            ("bitbucket.install_root", &b.install_root),
            ("bitbucket.current_install", &b.current_install),
            ("bitbucket.home", &b.home),
        ] {
            ensure!(
                p.is_absolute(),
                "{key} = '{}' must be an absolute path",
                p.display()
            );
            ensure!(p.is_dir(), "{key} = '{}' is not a directory", p.display());
        }
        ensure!(
            b.current_install.join("bin/start-bitbucket.sh").is_file(),
            "bitbucket.current_install = '{}' holds no bin/start-bitbucket.sh; name the directory of the running Bitbucket install",
            b.current_install.display()
        );
        ensure!(
            b.status_url.starts_with("http://") || b.status_url.starts_with("https://"),
            "bitbucket.status_url = '{}' must be an http(s) URL such as http://localhost:7990/status",
            b.status_url
        );
        let user = resolve_user(b.user.as_deref())?;
        for f in &b.carry_files {
            ensure!(
                !f.starts_with('/') && !f.split('/').any(|c| c == ".."),
                "bitbucket.carry_files entry '{f}' must be a path relative to the install"
            );
        }
        let s = raw.service;
        let service = match s.kind.as_str() {
            "systemd" => {
                let unit = s.unit.unwrap_or_else(|| "atlbitbucket.service".to_string());
                let unit_path = s
                    .path
                    .unwrap_or_else(|| PathBuf::from("/etc/systemd/system").join(&unit));
                ServiceSettings::Systemd {
                    unit,
                    unit_path,
                    systemctl: s.systemctl.unwrap_or_else(|| PathBuf::from("systemctl")),
                }
            }
            "initd" => ServiceSettings::Initd {
                script: s
                    .path
                    .unwrap_or_else(|| PathBuf::from("/etc/init.d/atlbitbucket")),
            },
            "scripts" => ServiceSettings::Scripts,
            other => bail!("service.kind = '{other}': expected systemd, initd or scripts"),
        };
        if let ServiceSettings::Systemd { unit_path: p, .. }
        | ServiceSettings::Initd { script: p } = &service
        {
            ensure!(
                p.is_file(),
                "service.path = '{}' does not exist",
                p.display()
            );
        }
        let lb = raw.lb.map(validate_lb).transpose().context("[lb]")?;
        let url_hosts = raw
            .stage
            .url_hosts
            .map(|hosts| {
                hosts
                    .iter()
                    .map(|h| HostRule::parse(h).map_err(anyhow::Error::msg))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()
            .context("stage.url_hosts")?;
        let l = raw.limits;
        let positive = |key: &str, v: Option<u64>, default: u64| -> Result<u64> {
            let v = v.unwrap_or(default);
            ensure!(v > 0, "limits.{key} must be at least 1");
            Ok(v)
        };
        let accept = AcceptLimits {
            max_connections: positive(
                "max_connections",
                l.max_connections.map(|n| n as u64),
                DEFAULT_MAX_CONNECTIONS as u64,
            )? as usize,
            handshake_timeout: Duration::from_secs(positive(
                "handshake_timeout_secs",
                l.handshake_timeout_secs,
                DEFAULT_HANDSHAKE_TIMEOUT_SECS,
            )?),
        };
        let upload_idle_timeout = Duration::from_secs(positive(
            "upload_idle_timeout_secs",
            l.upload_idle_timeout_secs,
            DEFAULT_UPLOAD_IDLE_TIMEOUT_SECS,
        )?);
        Ok(Settings {
            node_id: raw.node_id,
            listen,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            tls,
            install_root: b.install_root,
            initial_install: b.current_install,
            home: b.home,
            user,
            status_url: b.status_url,
            current_link: b.current_link,
            carry_files: b.carry_files,
            service,
            stop_timeout_secs: l.stop_timeout_secs.unwrap_or(DEFAULT_STOP_TIMEOUT_SECS),
            start_timeout_secs: l.start_timeout_secs.unwrap_or(DEFAULT_START_TIMEOUT_SECS),
            max_archive_bytes: l.max_archive_bytes.unwrap_or(DEFAULT_MAX_ARCHIVE_BYTES),
            cache_max_bytes: l.cache_max_bytes.unwrap_or(DEFAULT_CACHE_MAX_BYTES),
            keep_installs: l.keep_installs.unwrap_or(DEFAULT_KEEP_INSTALLS).max(2),
            lb,
            crl_file,
            allowed_coordinators,
            accept,
            upload_idle_timeout,
            url_hosts,
        })
    }

    pub fn pid_file(&self) -> PathBuf {
        self.home.join("log/bitbucket.pid")
    }

    pub fn log_file(&self) -> PathBuf {
        self.home.join("log/atlassian-bitbucket.log")
    }
}

/// Checks the `[lb]` table: a kind this agent knows, settings NGINX accepts, and an upstream file
/// that exists here (the role only makes sense on the NGINX host).
pub fn validate_lb(raw: RawLb) -> Result<NginxHost> {
    ensure!(
        raw.kind == "nginx",
        "lb.kind = '{}': only \"nginx\" is supported (HAProxy, Apache and Azure are driven by the coordinator directly)",
        raw.kind
    );
    let host = NginxHost::new(&NginxSettings {
        config: raw.config,
        upstream: raw.upstream,
        upstreams: raw.upstreams,
        configs: raw.configs,
        server_names: raw.server_names,
        mode: raw.mode,
        main_config: raw.main_config,
        prefix: raw.prefix,
        nginx: raw.nginx,
        pid_file: raw.pid_file,
        reload_command: raw.reload_command,
    })?;
    for file in host.config_files() {
        ensure!(
            file.is_file(),
            "lb: '{}' does not exist; lb.config (and lb.configs) must be the files on this host that hold the upstream blocks",
            file.display()
        );
    }
    Ok(host)
}

fn resolve_user(name: Option<&str>) -> Result<RunUser> {
    let root = nix::unistd::geteuid().is_root();
    let user = match name {
        Some(n) => nix::unistd::User::from_name(n)
            .with_context(|| format!("looking up bitbucket.user '{n}'"))?
            .with_context(|| format!("bitbucket.user '{n}' does not exist on this machine"))?,
        None => {
            ensure!(
                !root,
                "bitbucket.user is not set and the agent runs as root; set it to the user Bitbucket runs as (never root)"
            );
            nix::unistd::User::from_uid(nix::unistd::geteuid())?
                .context("the agent's own user has no passwd entry")?
        }
    };
    ensure!(
        !user.uid.is_root(),
        "bitbucket.user is root; Bitbucket must run as an unprivileged user such as atlbitbucket"
    );
    if !root {
        ensure!(
            user.uid == nix::unistd::geteuid(),
            "the agent runs as an unprivileged user, so bitbucket.user must be that same user, not '{}'",
            user.name
        );
    }
    Ok(RunUser {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_lb(extra: &str, config: &Path) -> RawLb {
        toml::from_str(&format!(
            "kind = \"nginx\"\nconfig = {:?}\nupstream = \"bitbucket\"\n{extra}",
            config.display().to_string()
        ))
        .unwrap()
    }

    #[test]
    fn lb_table_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("upstream.conf");
        std::fs::write(&conf, "upstream bitbucket { server 127.0.0.1:1; }\n").unwrap();
        let host = validate_lb(raw_lb(
            "mode = \"remove\"\npid_file = \"/run/n.pid\"\n",
            &conf,
        ))
        .unwrap();
        assert!(
            host.describe().contains("upstream bitbucket"),
            "{}",
            host.describe()
        );

        let e = validate_lb(raw_lb("", &dir.path().join("missing.conf"))).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e:#}");
        let e = validate_lb(raw_lb("reload_command = []\n", &conf)).unwrap_err();
        assert!(e.to_string().contains("reload_command"), "{e:#}");
        let e = validate_lb(raw_lb("", Path::new("relative.conf"))).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e:#}");
        let mut other = raw_lb("", &conf);
        other.kind = "haproxy".into();
        assert!(validate_lb(other).unwrap_err().to_string().contains("only"));
        // Unknown keys and modes are refused when the file is parsed.
        assert!(
            toml::from_str::<RawLb>(
                "kind = \"nginx\"\nconfig = \"/x\"\nupstream = \"b\"\nmode = \"drain\"\n"
            )
            .is_err()
        );
        assert!(
            toml::from_str::<RawLb>(
                "kind = \"nginx\"\nconfig = \"/x\"\nupstream = \"b\"\nsocket = \"/s\"\n"
            )
            .is_err()
        );
    }

    /// A config text for a node whose files exist in `dir`, with `extra` appended to `[tls]`
    /// and `tail` at the end.
    fn node_config(dir: &Path, tls_extra: &str, tail: &str) -> String {
        use bbupgrade_common::pki::{Ca, IssueRequest};
        let pki = dir.join("pki");
        if !pki.exists() {
            let ca = Ca::generate().unwrap();
            ca.save(&pki).unwrap();
            ca.issue(&IssueRequest::new(Role::Agent, "n1"))
                .unwrap()
                .save(&pki)
                .unwrap();
            std::fs::create_dir_all(dir.join("install/8.19.3/bin")).unwrap();
            std::fs::write(dir.join("install/8.19.3/bin/start-bitbucket.sh"), "").unwrap();
            std::fs::create_dir_all(dir.join("home")).unwrap();
        }
        let user = if nix::unistd::geteuid().is_root() {
            "user = \"nobody\"\n"
        } else {
            ""
        };
        format!(
            "node_id = \"n1\"\nlisten = \"127.0.0.1:0\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{tls_extra}\n[bitbucket]\ninstall_root = {:?}\ncurrent_install = {:?}\nhome = {:?}\n{user}status_url = \"http://127.0.0.1:1/status\"\n[service]\nkind = \"scripts\"\n{tail}\n",
            pki.join("ca.pem"),
            pki.join("agent-n1.pem"),
            pki.join("agent-n1.key"),
            dir.join("install"),
            dir.join("install/8.19.3"),
            dir.join("home"),
        )
    }

    fn load(text: &str) -> Result<Settings> {
        Settings::validate(toml::from_str(text)?)
    }

    #[test]
    fn trust_and_bounds_keys_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let s = load(&node_config(d, "", "")).unwrap();
        assert!(s.allowed_coordinators.is_none() && s.url_hosts.is_none());
        assert_eq!(s.accept.max_connections, DEFAULT_MAX_CONNECTIONS);

        let crl = format!("crl = {:?}", d.join("pki/crl.pem"));
        let s = load(&node_config(
            d,
            &format!("{crl}\nallowed_coordinators = [\"alice\", \"ci\"]"),
            "[stage]\nurl_hosts = [\"artifacts.example.com\"]\n[limits]\nmax_connections = 10\nhandshake_timeout_secs = 2\nupload_idle_timeout_secs = 3\n",
        ))
        .unwrap();
        assert_eq!(s.allowed_coordinators.unwrap(), ["alice", "ci"]);
        assert!(s.tls.crl_pem.is_some() && s.crl_file.is_some());
        assert_eq!(s.url_hosts.unwrap().len(), 1);
        assert_eq!(s.accept.max_connections, 10);
        assert_eq!(s.upload_idle_timeout, Duration::from_secs(3));

        for (tls_extra, tail, expect) in [
            ("allowed_coordinators = []", "", "empty"),
            (
                "allowed_coordinators = [\"a b\"]",
                "",
                "allowed_coordinators",
            ),
            // A typo must not silently leave the agent open to every coordinator.
            (
                "alowed_coordinators = [\"alice\"]",
                "",
                "alowed_coordinators",
            ),
            ("crl = \"/nonexistent/crl.pem\"", "", "revocation list"),
            ("", "[stage]\nurl_hosts = [\"http://x/\"]\n", "url_hosts"),
            ("", "[limits]\nmax_connections = 0\n", "max_connections"),
            (
                "",
                "[limits]\nhandshake_timeout_secs = 0\n",
                "handshake_timeout_secs",
            ),
        ] {
            let Err(e) = load(&node_config(d, tls_extra, tail)) else {
                panic!("{tls_extra} {tail}: accepted");
            };
            assert!(
                format!("{e:#}").contains(expect),
                "{tls_extra} {tail}: {e:#}"
            );
        }
        // Another CA's list is refused at start, not discovered as refusals later.
        let other = d.join("other");
        bbupgrade_common::pki::Ca::generate()
            .unwrap()
            .save(&other)
            .unwrap();
        let Err(e) = load(&node_config(
            d,
            &format!("crl = {:?}", other.join("crl.pem")),
            "",
        )) else {
            panic!("another CA's CRL accepted");
        };
        assert!(format!("{e:#}").contains("not one of the CA"), "{e:#}");
    }
}

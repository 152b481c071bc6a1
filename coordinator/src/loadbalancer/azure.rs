//! Azure Application Gateway through the `az` CLI: a node leaves the backend pool (the others are
//! written back with `address-pool update --servers`), the gateway's connection draining is waited
//! out, and it rejoins the same way.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{AdminState, DrainReport, LbError, LoadBalancer, OperState, ServerState};

/// The gateway's default connection-draining timeout we wait after a removal.
pub const DEFAULT_DRAIN_SECS: u64 = 60;
/// Bound on one `az` call (they commonly take tens of seconds: the gateway is updated in place).
pub const AZ_TIMEOUT_SECS: u64 = 600;

/// The settings of an Application Gateway backend pool, as the inventory gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureSettings {
    pub resource_group: String,
    pub gateway: String,
    pub pool: String,
    pub az: Option<PathBuf>,
    pub drain_secs: u64,
}

/// The pool's addresses from `address-pool show --query backendAddresses -o json`
/// (`[{"ipAddress": "10.0.0.4"}, {"fqdn": "node2.example.com"}]`).
pub fn parse_addresses(json: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let list = match &v {
        serde_json::Value::Null => return Ok(Vec::new()),
        serde_json::Value::Array(a) => a,
        _ => return Err(format!("expected a list of addresses, got {v}")),
    };
    list.iter()
        .map(|a| {
            ["ipAddress", "fqdn"]
                .iter()
                .find_map(|k| a.get(*k).and_then(|x| x.as_str()).filter(|s| !s.is_empty()))
                .map(str::to_string)
                .ok_or_else(|| format!("an address without ipAddress or fqdn: {a}"))
        })
        .collect()
}

/// The pool without `server` (`out`) or with it added at the end; `None` when nothing changes.
pub fn next_pool(current: &[String], server: &str, out: bool) -> Option<Vec<String>> {
    let has = current.iter().any(|a| a.eq_ignore_ascii_case(server));
    match (out, has) {
        (true, true) => Some(
            current
                .iter()
                .filter(|a| !a.eq_ignore_ascii_case(server))
                .cloned()
                .collect(),
        ),
        (false, false) => {
            let mut v = current.to_vec();
            v.push(server.to_string());
            Some(v)
        }
        _ => None,
    }
}

/// One backend pool of one Application Gateway.
#[derive(Debug, Clone)]
pub struct Azure {
    s: AzureSettings,
    az: PathBuf,
    timeout: Duration,
}

impl Azure {
    pub fn new(s: &AzureSettings) -> Result<Self, LbError> {
        for (what, v) in [
            ("resource_group", &s.resource_group),
            ("gateway", &s.gateway),
            ("pool", &s.pool),
        ] {
            if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(LbError::Config(format!(
                    "Azure {what} {v:?} must be non-empty, without spaces"
                )));
            }
        }
        Ok(Self {
            s: s.clone(),
            az: s.az.clone().unwrap_or_else(|| PathBuf::from("az")),
            timeout: Duration::from_secs(AZ_TIMEOUT_SECS),
        })
    }

    fn pool_args(&self, verb: &str) -> Vec<String> {
        [
            "network",
            "application-gateway",
            "address-pool",
            verb,
            "--gateway-name",
            &self.s.gateway,
            "-g",
            &self.s.resource_group,
            "-n",
            &self.s.pool,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    async fn az(&self, args: Vec<String>) -> Result<String, LbError> {
        let shown = format!("az {}", args.join(" "));
        let mut cmd = tokio::process::Command::new(&self.az);
        cmd.args(&args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = match tokio::time::timeout(self.timeout, cmd.output()).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                return Err(LbError::Unreachable {
                    lb: self.describe(),
                    target: self.az.display().to_string(),
                    reason: format!("cannot run it: {e} (install the Azure CLI or set az = PATH)"),
                });
            }
            Err(_) => {
                return Err(LbError::Unreachable {
                    lb: self.describe(),
                    target: shown,
                    reason: format!("no answer within {:?}", self.timeout),
                });
            }
        };
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(
                if err.contains("ResourceNotFound") || err.contains("NotFound") {
                    LbError::UnknownBackend {
                        lb: self.describe(),
                    }
                } else {
                    LbError::Refused {
                        lb: self.describe(),
                        command: shown,
                        answer: format!("{err} (is `az login` done, with rights on the gateway?)"),
                    }
                },
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn addresses(&self) -> Result<Vec<String>, LbError> {
        let mut args = self.pool_args("show");
        args.extend(["--query", "backendAddresses", "-o", "json"].map(String::from));
        let out = self.az(args).await?;
        parse_addresses(&out).map_err(|reason| LbError::Parse {
            lb: self.describe(),
            command: "az network application-gateway address-pool show".into(),
            reason,
        })
    }

    async fn update(&self, servers: &[String]) -> Result<(), LbError> {
        let mut args = self.pool_args("update");
        args.push("--servers".into());
        args.extend(servers.iter().cloned());
        self.az(args).await.map(|_| ())
    }

    async fn confirm(&self, server: &str, wanted: AdminState) -> Result<(), LbError> {
        let found = self.server_state(server).await?.admin;
        if found != wanted {
            return Err(LbError::NotConfirmed {
                lb: self.describe(),
                server: server.to_string(),
                wanted: wanted.to_string(),
                found: found.to_string(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl LoadBalancer for Azure {
    fn describe(&self) -> String {
        format!(
            "azure application gateway {} (resource group {}) pool {}",
            self.s.gateway, self.s.resource_group, self.s.pool
        )
    }

    /// In the pool is in rotation; out of it is out (Azure keeps no "disabled" member).
    async fn server_state(&self, server: &str) -> Result<ServerState, LbError> {
        let in_pool = self
            .addresses()
            .await?
            .iter()
            .any(|a| a.eq_ignore_ascii_case(server));
        Ok(ServerState {
            admin: if in_pool {
                AdminState::Ready
            } else {
                AdminState::Maint
            },
            operational: OperState::Unknown,
            current_sessions: 0,
        })
    }

    async fn drain(&self, server: &str, timeout: Duration) -> Result<DrainReport, LbError> {
        let start = Instant::now();
        let current = self.addresses().await?;
        if let Some(rest) = next_pool(&current, server, true) {
            if rest.is_empty() {
                return Err(LbError::Refused {
                    lb: self.describe(),
                    command: format!("remove {server} from the pool"),
                    answer: "it is the pool's only address; refusing to empty the pool".into(),
                });
            }
            self.update(&rest).await?;
            // The gateway keeps existing connections for its draining timeout; wait it out.
            let drain = Duration::from_secs(self.s.drain_secs);
            if drain > timeout {
                tokio::time::sleep(timeout).await;
                return Err(LbError::DrainTimeout {
                    lb: self.describe(),
                    server: server.to_string(),
                    sessions: 0,
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(drain).await;
        }
        self.confirm(server, AdminState::Maint).await?;
        Ok(DrainReport {
            waited: start.elapsed(),
            sessions_at_start: 0,
        })
    }

    async fn enable(&self, server: &str) -> Result<(), LbError> {
        let current = self.addresses().await?;
        if let Some(all) = next_pool(&current, server, false) {
            self.update(&all).await?;
        }
        self.confirm(server, AdminState::Ready).await
    }

    async fn check_server(&self, server: &str) -> Result<(), LbError> {
        if self
            .addresses()
            .await?
            .iter()
            .any(|a| a.eq_ignore_ascii_case(server))
        {
            Ok(())
        } else {
            Err(LbError::UnknownServer {
                lb: self.describe(),
                server: server.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_addresses() {
        let json = r#"[{"fqdn": null, "ipAddress": "10.0.0.4"}, {"fqdn": "node2.example.com", "ipAddress": null}]"#;
        assert_eq!(
            parse_addresses(json).unwrap(),
            ["10.0.0.4", "node2.example.com"]
        );
        assert_eq!(parse_addresses("null").unwrap(), Vec::<String>::new());
        assert_eq!(parse_addresses("[]").unwrap(), Vec::<String>::new());
        assert!(parse_addresses("{}").is_err());
        assert!(parse_addresses("[{}]").is_err());
        assert!(parse_addresses("ERROR").is_err());
    }

    #[test]
    fn pool_changes() {
        let pool = vec!["10.0.0.4".to_string(), "10.0.0.5".to_string()];
        assert_eq!(next_pool(&pool, "10.0.0.4", true).unwrap(), ["10.0.0.5"]);
        assert_eq!(next_pool(&pool, "10.0.0.6", true), None);
        assert_eq!(next_pool(&pool, "10.0.0.4", false), None);
        assert_eq!(
            next_pool(&pool, "10.0.0.6", false).unwrap(),
            ["10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
    }

    /// A stand-in `az`: records each call's arguments (one per line, calls separated by `--`),
    /// answers `show` from a pool file and rewrites it on `update`, and refuses anything else.
    fn fake_az(dir: &std::path::Path) -> PathBuf {
        let script = format!(
            r#"#!/bin/sh
log={dir}/calls.log
pool={dir}/pool.json
for a in "$@"; do printf '%s\n' "$a" >> "$log"; done
echo -- >> "$log"
[ "$1 $2 $3" = "network application-gateway address-pool" ] || {{ echo "unexpected: $*" >&2; exit 2; }}
[ "$5 $6 $7 $8 $9 ${{10}}" = "--gateway-name agw -g rg -n bitbucket" ] || {{ echo "ERROR: (ResourceNotFound) $*" >&2; exit 3; }}
case "$4" in
  show) [ "${{11}} ${{12}} ${{13}} ${{14}}" = "--query backendAddresses -o json" ] || exit 4; cat "$pool" ;;
  update)
    shift 10
    [ "$1" = "--servers" ] || exit 5
    shift
    out="["; sep=""
    for s in "$@"; do out="$out$sep{{\"ipAddress\": \"$s\"}}"; sep=", "; done
    echo "$out]" > "$pool"
    echo '{{"provisioningState": "Succeeded"}}' ;;
  *) exit 6 ;;
esac
"#,
            dir = dir.display()
        );
        let path = dir.join("az");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            dir.join("pool.json"),
            r#"[{"fqdn": null, "ipAddress": "10.0.0.4"}, {"fqdn": null, "ipAddress": "10.0.0.5"}]"#,
        )
        .unwrap();
        path
    }

    fn calls(dir: &std::path::Path) -> Vec<Vec<String>> {
        std::fs::read_to_string(dir.join("calls.log"))
            .unwrap_or_default()
            .split("--\n")
            .filter(|c| !c.is_empty())
            .map(|c| c.lines().map(str::to_string).collect())
            .collect()
    }

    fn lb(dir: &std::path::Path, gateway: &str) -> Azure {
        Azure::new(&AzureSettings {
            resource_group: "rg".into(),
            gateway: gateway.into(),
            pool: "bitbucket".into(),
            az: Some(fake_az(dir)),
            drain_secs: 1,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn drives_the_az_cli_with_exact_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let lb = lb(dir.path(), "agw");
        lb.check_server("10.0.0.4").await.unwrap();
        assert!(matches!(
            lb.check_server("10.0.0.9").await,
            Err(LbError::UnknownServer { .. })
        ));
        let report = lb.drain("10.0.0.4", Duration::from_secs(5)).await.unwrap();
        assert!(report.waited >= Duration::from_secs(1), "{report:?}");
        assert_eq!(
            lb.server_state("10.0.0.4").await.unwrap().admin,
            AdminState::Maint
        );
        let show: Vec<String> = "network application-gateway address-pool show --gateway-name agw -g rg -n bitbucket --query backendAddresses -o json"
            .split(' ')
            .map(String::from)
            .collect();
        let c = calls(dir.path());
        assert_eq!(c[2], show);
        assert_eq!(
            c[3].join(" "),
            "network application-gateway address-pool update --gateway-name agw -g rg -n bitbucket --servers 10.0.0.5"
        );
        // Draining again changes nothing; the last address is never removed.
        let n = calls(dir.path()).len();
        lb.drain("10.0.0.4", Duration::from_secs(5)).await.unwrap();
        assert!(calls(dir.path())[n..].iter().all(|c| c[3] == "show"));
        assert!(matches!(
            lb.drain("10.0.0.5", Duration::from_secs(5)).await,
            Err(LbError::Refused { .. })
        ));
        lb.enable("10.0.0.4").await.unwrap();
        let c = calls(dir.path());
        let update = c.iter().rev().find(|c| c[3] == "update").unwrap();
        assert_eq!(update[10..].join(" "), "--servers 10.0.0.5 10.0.0.4");
        assert_eq!(
            lb.server_state("10.0.0.4").await.unwrap().admin,
            AdminState::Ready
        );
    }

    #[tokio::test]
    async fn errors_say_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let wrong = lb(dir.path(), "nosuch");
        assert!(matches!(
            wrong.check_server("10.0.0.4").await,
            Err(LbError::UnknownBackend { .. })
        ));
        let missing = Azure::new(&AzureSettings {
            resource_group: "rg".into(),
            gateway: "agw".into(),
            pool: "bitbucket".into(),
            az: Some(dir.path().join("no-az")),
            drain_secs: 1,
        })
        .unwrap();
        let e = missing.check_server("10.0.0.4").await.unwrap_err();
        assert!(matches!(e, LbError::Unreachable { .. }), "{e:?}");
        assert!(e.to_string().contains("no-az"), "{e}");
        assert!(
            Azure::new(&AzureSettings {
                resource_group: "r g".into(),
                gateway: "agw".into(),
                pool: "p".into(),
                az: None,
                drain_secs: 1,
            })
            .is_err()
        );
    }
}

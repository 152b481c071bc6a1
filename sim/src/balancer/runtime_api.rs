//! The subset of HAProxy's runtime API the stand-in serves, as pure text in and text out:
//! `show servers state [B]`, `show stat [iid type sid]`, `set server B/S state ready|drain|maint`.
//! Formats follow HAProxy 2.6 (header lines, column order, error texts), so a client written for
//! HAProxy reads them unchanged.

use std::time::Instant;

use super::pool::{Admin, Health, LastCheck, Server, Thresholds};

/// `show stat` columns, in HAProxy's order (its first 39; clients find columns by name).
pub const STAT_COLUMNS: &[&str] = &[
    "pxname",
    "svname",
    "qcur",
    "qmax",
    "scur",
    "smax",
    "slim",
    "stot",
    "bin",
    "bout",
    "dreq",
    "dresp",
    "ereq",
    "econ",
    "eresp",
    "wretr",
    "wredis",
    "status",
    "weight",
    "act",
    "bck",
    "chkfail",
    "chkdown",
    "lastchg",
    "downtime",
    "qlimit",
    "pid",
    "iid",
    "sid",
    "throttle",
    "lbtot",
    "tracked",
    "type",
    "rate",
    "rate_lim",
    "rate_max",
    "check_status",
    "check_code",
    "check_duration",
];

/// `show servers state` columns (format version 1), in HAProxy 2.6's order.
pub const SERVERS_STATE_HEADER: &str = "# be_id be_name srv_id srv_name srv_addr srv_op_state \
srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status \
srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id \
srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port";

/// Proxy ids: the frontend is 1, the backend 2 (HAProxy numbers proxies in config order).
const FRONTEND_ID: u32 = 1;
const BACKEND_ID: u32 = 2;
/// `show stat` type bits.
const TYPE_FRONTEND: u32 = 1;
const TYPE_BACKEND: u32 = 2;
const TYPE_SERVER: u32 = 4;
/// srv_check_state bits: CHK_ST_CONFIGURED | CHK_ST_ENABLED, and CHK_ST_PAUSED in maintenance.
const CHECK_STATE_ENABLED: u32 = 0x02 | 0x04;
const CHECK_STATE_PAUSED: u32 = 0x08;

/// One parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ShowServersState {
        backend: Option<String>,
    },
    ShowStat {
        proxy: Option<String>,
        types: u32,
    },
    SetState {
        backend: String,
        server: String,
        admin: Admin,
    },
    /// Anything else: the answer to give.
    Invalid(String),
}

/// What the balancer knows, for rendering.
pub struct View<'a> {
    pub frontend: &'a str,
    pub backend: &'a str,
    pub servers: &'a [Server],
    pub thresholds: Thresholds,
    pub now: Instant,
}

pub fn parse_command(line: &str) -> Command {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["show", "servers", "state"] => Command::ShowServersState { backend: None },
        ["show", "servers", "state", b] => Command::ShowServersState {
            backend: Some((*b).to_string()),
        },
        ["show", "stat"] => Command::ShowStat {
            proxy: None,
            types: u32::MAX,
        },
        ["show", "stat", proxy, types, _sid] => {
            let Ok(types) = types.parse::<i64>() else {
                return Command::Invalid("Invalid type.\n".into());
            };
            Command::ShowStat {
                proxy: (*proxy != "-1").then(|| (*proxy).to_string()),
                types: u32::try_from(types).unwrap_or(u32::MAX),
            }
        }
        ["set", "server", target, "state", word] => {
            let Some((backend, server)) = target.split_once('/') else {
                return Command::Invalid("Require 'backend/server'.\n".into());
            };
            match Admin::parse(word) {
                Some(admin) => Command::SetState {
                    backend: backend.into(),
                    server: server.into(),
                    admin,
                },
                None => Command::Invalid(
                    "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n".into(),
                ),
            }
        }
        _ => Command::Invalid(format!(
            "Unknown command: '{}'\nThis stand-in for HAProxy (bitbucket-sim balancer) knows only:\n  \
             show servers state [<backend>]\n  show stat [-1 <type> -1]\n  \
             set server <backend>/<server> state ready|drain|maint\n",
            line.trim()
        )),
    }
}

/// Answer to `set server`: empty on success, HAProxy's error text otherwise.
pub fn set_state(
    view_backend: &str,
    servers: &mut [Server],
    backend: &str,
    server: &str,
    admin: Admin,
    now: Instant,
) -> String {
    if backend != view_backend {
        return "No such backend.\n".into();
    }
    match servers.iter_mut().find(|s| s.name == server) {
        Some(s) => {
            s.set_admin(admin, now);
            "\n".into()
        }
        None => "No such server.\n".into(),
    }
}

pub fn show_servers_state(view: &View, backend: Option<&str>) -> String {
    if backend.is_some_and(|b| b != view.backend) {
        return "Can't find backend.\n".into();
    }
    let mut out = format!("1\n{SERVERS_STATE_HEADER}\n");
    for (i, s) in view.servers.iter().enumerate() {
        let op_state = if s.running() { 2 } else { 0 };
        let check_state = if s.admin == Admin::Maint {
            CHECK_STATE_ENABLED | CHECK_STATE_PAUSED
        } else {
            CHECK_STATE_ENABLED
        };
        // srv_check_result: CHK_RES_FAILED 2, CHK_RES_PASSED 3, unknown 0.
        let check_result = match s.last_check {
            LastCheck::None => 0,
            LastCheck::Status(200) | LastCheck::Connected => 3,
            _ => 2,
        };
        let health = health_counter(s.health, view.thresholds);
        out.push_str(&format!(
            "{BACKEND_ID} {backend} {id} {name} {ip} {op_state} {admin} 1 1 {since} 0 {check_result} \
             {health} {check_state} 0 0 0 - {port} - 0 0 - - 0\n",
            backend = view.backend,
            id = i + 1,
            name = s.name,
            ip = s.addr.ip(),
            admin = s.admin.bits(),
            since = view.now.duration_since(s.last_change).as_secs(),
            port = s.addr.port(),
        ));
    }
    out.push('\n');
    out
}

/// HAProxy's check health counter: 0..rise-1 while down, rise..rise+fall-1 while up.
fn health_counter(h: Health, t: Thresholds) -> u32 {
    match h {
        Health::Down { successes } => successes,
        Health::Up { failures } => (t.rise + t.fall - 1).saturating_sub(failures),
    }
}

fn server_status(s: &Server, t: Thresholds) -> String {
    match (s.admin, s.health) {
        (Admin::Maint, _) => "MAINT".into(),
        (Admin::Drain, h) if h.is_up() => "DRAIN".into(),
        (_, Health::Up { failures: 0 }) => "UP".into(),
        (_, Health::Up { failures }) => format!("UP {}/{}", t.fall - failures, t.fall),
        (_, Health::Down { successes: 0 }) => "DOWN".into(),
        (_, Health::Down { successes }) => format!("DOWN {successes}/{}", t.rise),
    }
}

fn csv_row(cells: &[(&str, String)]) -> String {
    let mut row = vec![String::new(); STAT_COLUMNS.len()];
    for (name, value) in cells {
        if let Some(i) = STAT_COLUMNS.iter().position(|c| c == name) {
            row[i] = value.clone();
        }
    }
    row.join(",") + ",\n"
}

pub fn show_stat(view: &View, proxy: Option<&str>, types: u32) -> String {
    if proxy.is_some_and(|p| p != view.backend && p != view.frontend) {
        return "No such proxy.\n".into();
    }
    let wants = |name: &str| proxy.is_none_or(|p| p == name);
    let mut out = format!("# {},\n", STAT_COLUMNS.join(","));
    let scur: u64 = view.servers.iter().map(|s| s.sessions).sum();
    let stot: u64 = view.servers.iter().map(|s| s.total_sessions).sum();
    if types & TYPE_FRONTEND != 0 && wants(view.frontend) {
        out.push_str(&csv_row(&[
            ("pxname", view.frontend.into()),
            ("svname", "FRONTEND".into()),
            ("scur", scur.to_string()),
            ("stot", stot.to_string()),
            ("status", "OPEN".into()),
            ("pid", "1".into()),
            ("iid", FRONTEND_ID.to_string()),
            ("sid", "0".into()),
            ("type", "0".into()),
        ]));
    }
    if types & TYPE_SERVER != 0 && wants(view.backend) {
        for (i, s) in view.servers.iter().enumerate() {
            let (check_status, check_code) = match s.last_check {
                LastCheck::None => ("", String::new()),
                LastCheck::Status(200) => ("L7OK", "200".into()),
                LastCheck::Status(code) => ("L7STS", code.to_string()),
                LastCheck::NoAnswer => ("L4CON", String::new()),
                LastCheck::Connected => ("L4OK", String::new()),
            };
            out.push_str(&csv_row(&[
                ("pxname", view.backend.into()),
                ("svname", s.name.clone()),
                ("qcur", "0".into()),
                ("qmax", "0".into()),
                ("scur", s.sessions.to_string()),
                ("smax", s.max_sessions.to_string()),
                ("stot", s.total_sessions.to_string()),
                ("econ", s.connect_errors.to_string()),
                ("wretr", s.retries.to_string()),
                ("wredis", s.redispatches.to_string()),
                ("status", server_status(s, view.thresholds)),
                ("weight", "1".into()),
                ("act", "1".into()),
                ("bck", "0".into()),
                ("chkfail", s.check_failures.to_string()),
                ("chkdown", s.downs.to_string()),
                (
                    "lastchg",
                    view.now.duration_since(s.last_change).as_secs().to_string(),
                ),
                ("pid", "1".into()),
                ("iid", BACKEND_ID.to_string()),
                ("sid", (i + 1).to_string()),
                ("lbtot", s.total_sessions.to_string()),
                ("type", "2".into()),
                ("check_status", check_status.into()),
                ("check_code", check_code),
            ]));
        }
    }
    if types & TYPE_BACKEND != 0 && wants(view.backend) {
        let up = view.servers.iter().any(Server::eligible);
        out.push_str(&csv_row(&[
            ("pxname", view.backend.into()),
            ("svname", "BACKEND".into()),
            ("qcur", "0".into()),
            ("qmax", "0".into()),
            ("scur", scur.to_string()),
            ("stot", stot.to_string()),
            ("status", if up { "UP" } else { "DOWN" }.into()),
            (
                "act",
                view.servers
                    .iter()
                    .filter(|s| s.eligible())
                    .count()
                    .to_string(),
            ),
            ("pid", "1".into()),
            ("iid", BACKEND_ID.to_string()),
            ("sid", "0".into()),
            ("type", "1".into()),
        ]));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const T: Thresholds = Thresholds { rise: 2, fall: 2 };

    fn servers() -> Vec<Server> {
        let now = Instant::now();
        (1..=2u16)
            .map(|i| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 7990 + i));
                Server::new(format!("node{i}"), addr, T, now)
            })
            .collect()
    }

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse_command("show servers state bitbucket\n"),
            Command::ShowServersState {
                backend: Some("bitbucket".into())
            }
        );
        assert_eq!(
            parse_command("show stat -1 4 -1"),
            Command::ShowStat {
                proxy: None,
                types: 4
            }
        );
        assert_eq!(
            parse_command("show stat -1 -1 -1"),
            Command::ShowStat {
                proxy: None,
                types: u32::MAX
            }
        );
        assert_eq!(
            parse_command("set server bitbucket/node1 state drain"),
            Command::SetState {
                backend: "bitbucket".into(),
                server: "node1".into(),
                admin: Admin::Drain
            }
        );
        let Command::Invalid(a) = parse_command("set server bitbucket/node1 state up") else {
            panic!()
        };
        assert!(a.starts_with("'set server"), "{a}");
        let Command::Invalid(a) = parse_command("disable server bitbucket/node1") else {
            panic!()
        };
        assert!(a.starts_with("Unknown command"), "{a}");
    }

    #[test]
    fn set_state_answers_like_haproxy() {
        let mut s = servers();
        let now = Instant::now();
        assert_eq!(
            set_state("bitbucket", &mut s, "bitbucket", "node1", Admin::Drain, now).trim(),
            ""
        );
        assert_eq!(s[0].admin, Admin::Drain);
        assert_eq!(
            set_state("bitbucket", &mut s, "bitbucket", "node9", Admin::Maint, now),
            "No such server.\n"
        );
        assert_eq!(
            set_state("bitbucket", &mut s, "other", "node1", Admin::Maint, now),
            "No such backend.\n"
        );
    }

    #[test]
    fn renders_in_haproxy_layout() {
        let mut s = servers();
        let now = Instant::now();
        s[0].set_admin(Admin::Drain, now);
        s[0].sessions = 3;
        s[1].set_admin(Admin::Maint, now);
        let view = View {
            frontend: "bitbucket",
            backend: "bitbucket",
            servers: &s,
            thresholds: T,
            now,
        };
        let state = show_servers_state(&view, Some("bitbucket"));
        let lines: Vec<&str> = state.lines().collect();
        assert_eq!(lines[0], "1");
        let header: Vec<&str> = lines[1].trim_start_matches("# ").split(' ').collect();
        assert_eq!(header.len(), 25);
        let row1: Vec<&str> = lines[2].split(' ').collect();
        let row2: Vec<&str> = lines[3].split(' ').collect();
        assert_eq!(row1.len(), 25);
        assert_eq!(
            &row1[..7],
            ["2", "bitbucket", "1", "node1", "127.0.0.1", "2", "8"]
        );
        assert_eq!(&row2[3..7], ["node2", "127.0.0.1", "0", "1"]);
        assert_eq!(
            show_servers_state(&view, Some("x")),
            "Can't find backend.\n"
        );

        let stat = show_stat(&view, None, 4);
        let rows: Vec<Vec<&str>> = stat
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split(',').collect())
            .collect();
        assert_eq!(rows.len(), 3, "{stat}");
        assert_eq!(
            &rows[0][..5],
            ["# pxname", "svname", "qcur", "qmax", "scur"]
        );
        assert_eq!(rows[0][17], "status");
        assert_eq!(
            (rows[1][1], rows[1][4], rows[1][17]),
            ("node1", "3", "DRAIN")
        );
        assert_eq!(
            (rows[2][1], rows[2][4], rows[2][17]),
            ("node2", "0", "MAINT")
        );
        let all = show_stat(&view, None, u32::MAX);
        assert!(all.contains("bitbucket,FRONTEND,") && all.contains("bitbucket,BACKEND,"));
        assert_eq!(show_stat(&view, Some("nope"), 4), "No such proxy.\n");
    }
}

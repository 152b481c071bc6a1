//! The load-balancer role: an agent on the NGINX host (with an `[lb]` table) takes a server out of
//! its upstream and puts it back when the coordinator asks (`LbServer`). The work is
//! [`bbupgrade_common::nginx::NginxHost`]'s; this maps requests and errors onto the protocol.

use std::sync::Mutex;
use std::time::Duration;

use bbupgrade_common::nginx::{NginxError, NginxHost, ServerAdmin};
use bbupgrade_common::proto::{LbAction, LbAdminState, LbServerRequest, LbServerResponse};
use tonic::Status;

/// One edit of the upstream file at a time: two at once could each keep the other's change out.
static EDITS: Mutex<()> = Mutex::new(());

/// Carries out one `LbServer` request; blocking (file edits, `nginx -t`, waiting for old workers).
pub fn lb_server(
    host: Option<&NginxHost>,
    r: &LbServerRequest,
) -> Result<LbServerResponse, Status> {
    let host = host.ok_or_else(|| {
        Status::failed_precondition(
            "this agent has no [lb] role; add an [lb] table to the config of the agent on the NGINX host, or name that agent in the inventory's load_balancer",
        )
    })?;
    if r.server.trim().is_empty() || r.server.chars().any(|c| c.is_whitespace() || c == ';') {
        return Err(Status::invalid_argument(format!(
            "server {:?} must be the address of an upstream `server` line, e.g. 10.0.0.1:7990",
            r.server
        )));
    }
    let action = LbAction::try_from(r.action).unwrap_or(LbAction::Unspecified);
    let failed = |e: NginxError| status_of(host, e);
    let _edit = EDITS.lock().unwrap_or_else(|p| p.into_inner());
    let mut resp = LbServerResponse {
        detail: host.describe(),
        ..Default::default()
    };
    let admin = match action {
        LbAction::State if r.check => host.check(&r.server).map_err(failed)?,
        LbAction::State => host.state(&r.server).map_err(failed)?,
        LbAction::Drain => {
            let timeout = Duration::from_secs(r.drain_timeout_secs.into());
            let d = host.drain(&r.server, timeout).map_err(failed)?;
            resp.old_workers = d.old_workers;
            resp.waited_ms = d.waited.as_millis().try_into().unwrap_or(u64::MAX);
            resp.changed = d.changed;
            ServerAdmin::Out
        }
        LbAction::Enable => {
            resp.changed = host.enable(&r.server).map_err(failed)?;
            ServerAdmin::In
        }
        LbAction::Unspecified => {
            return Err(Status::invalid_argument(
                "action must be STATE, DRAIN or ENABLE",
            ));
        }
    };
    tracing::info!(
        operation_id = %r.operation_id,
        action = action.as_str_name(),
        server = %r.server,
        changed = resp.changed,
        "load-balancer request done"
    );
    resp.admin = match admin {
        ServerAdmin::In => LbAdminState::In,
        ServerAdmin::Out => LbAdminState::Out,
    } as i32;
    Ok(resp)
}

/// An NGINX error as a status the coordinator can tell apart, naming the NGINX.
fn status_of(host: &NginxHost, e: NginxError) -> Status {
    let msg = format!("{}: {e}", host.describe());
    match e {
        NginxError::UnknownServer(_) | NginxError::UnknownUpstream(..) => Status::not_found(msg),
        NginxError::Unreachable { .. } => Status::unavailable(msg),
        NginxError::DrainTimeout { .. } => Status::deadline_exceeded(msg),
        NginxError::Config(_) => Status::internal(msg),
        NginxError::Refused { .. } | NginxError::NotConfirmed { .. } => Status::aborted(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bbupgrade_common::nginx::{NginxMode, NginxSettings};

    fn request(action: LbAction, server: &str) -> LbServerRequest {
        LbServerRequest {
            operation_id: "op".into(),
            action: action as i32,
            server: server.into(),
            drain_timeout_secs: 1,
            check: false,
        }
    }

    #[test]
    fn refused_without_an_lb_role() {
        let e = lb_server(None, &request(LbAction::Drain, "10.0.0.1:7990")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("this agent has no [lb] role"), "{e}");
    }

    #[test]
    fn reads_the_state_and_refuses_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("upstream.conf");
        std::fs::write(
            &conf,
            "upstream bitbucket {\n    server 127.0.0.1:1;\n    server 127.0.0.1:2 down;\n}\n",
        )
        .unwrap();
        let host = NginxHost::new(&NginxSettings {
            config: conf,
            upstream: "bitbucket".into(),
            mode: NginxMode::Down,
            main_config: None,
            prefix: None,
            nginx: None,
            pid_file: Some(dir.path().join("nginx.pid")),
            ..Default::default()
        })
        .unwrap();
        let r = lb_server(Some(&host), &request(LbAction::State, "127.0.0.1:2")).unwrap();
        assert_eq!(r.admin(), LbAdminState::Out);
        assert!(r.detail.contains("upstream bitbucket"));
        let r = lb_server(Some(&host), &request(LbAction::State, "127.0.0.1:1")).unwrap();
        assert_eq!(r.admin(), LbAdminState::In);
        let e = lb_server(Some(&host), &request(LbAction::State, "127.0.0.1:9")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        // No NGINX runs: a drain changes nothing and says so.
        let e = lb_server(Some(&host), &request(LbAction::Drain, "127.0.0.1:1")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        let e = lb_server(Some(&host), &request(LbAction::Unspecified, "127.0.0.1:1")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = lb_server(Some(&host), &request(LbAction::State, "a b")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}

//! Apache httpd `mod_proxy_balancer` through its `balancer-manager` page: the page's nonce, a POST
//! of the worker's status flags (`w_status_N` drain, `w_status_D` disable) with the Referer the
//! module's XSRF check wants, and the state read back from its XML view.

use std::time::{Duration, Instant};

use super::{AdminState, DrainReport, LbError, LoadBalancer, OperState, ServerState};

/// Bound on one request to the balancer manager.
pub const REQUEST_TIMEOUT_SECS: u64 = 10;
/// How often a drain re-reads the worker's busy count.
pub const DRAIN_POLL_MS: u64 = 250;

/// A balancer member as the XML view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    /// The member's URL, e.g. `http://127.0.0.1:7990`.
    pub name: String,
    /// Status words, e.g. `["Init", "Drn", "Dis"]`.
    pub flags: Vec<String>,
    /// Requests in flight.
    pub busy: u64,
}

impl Worker {
    /// Disabled or stopped wins over draining.
    pub fn admin(&self) -> AdminState {
        let has = |f: &str| self.flags.iter().any(|x| x == f);
        if has("Dis") || has("Stop") {
            AdminState::Maint
        } else if has("Drn") {
            AdminState::Drain
        } else {
            AdminState::Ready
        }
    }

    pub fn operational(&self) -> OperState {
        let has = |f: &str| self.flags.iter().any(|x| x == f);
        if has("Err") || has("HcFl") || has("Hcfl") {
            OperState::Down
        } else if has("Ok") {
            OperState::Up
        } else {
            OperState::Unknown
        }
    }
}

/// Members match as written, ignoring case and a trailing `/`.
pub fn same_member(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

/// The nonce of `balancer` from the manager's HTML page (its links carry `b=NAME&nonce=...`).
pub fn parse_nonce(html: &str, balancer: &str) -> Option<String> {
    html.split("href=")
        .skip(1)
        .filter_map(|rest| {
            let quote = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
            let value = &rest[1..];
            Some(value[..value.find(quote)?].replace("&amp;", "&"))
        })
        .find_map(|href| {
            let query = href.split_once('?')?.1;
            let mut b = None;
            let mut nonce = None;
            for pair in query.split('&') {
                match pair.split_once('=') {
                    Some(("b", v)) => b = Some(v),
                    Some(("nonce", v)) => nonce = Some(v),
                    _ => {}
                }
            }
            (b? == balancer).then(|| nonce.map(str::to_string))?
        })
}

fn inner<'a>(block: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = block.find(&open)? + open.len();
    let end = start + block[start..].find(&close)?;
    Some(&block[start..end])
}

fn blocks<'a>(text: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(s) = rest.find(&open) {
        let after = &rest[s + open.len()..];
        let Some(e) = after.find(&close) else {
            break;
        };
        out.push(&after[..e]);
        rest = &after[e + close.len()..];
    }
    out
}

/// The members of `balancer` from the manager's XML view (`?b=..&nonce=..&xml=1`).
pub fn parse_workers(xml: &str, balancer: &str) -> Result<Vec<Worker>, String> {
    if !xml.contains("<httpd:manager") {
        return Err(
            "not the balancer manager's XML view (did the request lack the nonce or Referer?)"
                .into(),
        );
    }
    let wanted = format!("balancer://{balancer}");
    let block = blocks(xml, "httpd:balancer")
        .into_iter()
        .find(|b| {
            b.split("<httpd:workers>")
                .next()
                .and_then(|head| inner(head, "httpd:name"))
                .is_some_and(|n| n.trim() == wanted)
        })
        .ok_or_else(|| format!("no {wanted} in the XML view"))?;
    blocks(block, "httpd:worker")
        .into_iter()
        .map(|w| {
            let name = inner(w, "httpd:name").ok_or("a worker without <httpd:name>")?;
            let status = inner(w, "httpd:status").ok_or("a worker without <httpd:status>")?;
            let busy = match inner(w, "httpd:busy") {
                Some(b) => b
                    .trim()
                    .parse()
                    .map_err(|_| format!("busy {b:?} is not a number"))?,
                None => 0,
            };
            Ok(Worker {
                name: name.trim().to_string(),
                flags: status.split_whitespace().map(str::to_string).collect(),
                busy,
            })
        })
        .collect()
}

/// One balancer of an Apache httpd.
#[derive(Debug, Clone)]
pub struct Apache {
    manager_url: String,
    balancer: String,
    http: reqwest::Client,
    poll: Duration,
}

impl Apache {
    pub fn new(manager_url: &str, balancer: &str) -> Result<Self, LbError> {
        if !(manager_url.starts_with("http://") || manager_url.starts_with("https://"))
            || manager_url.contains('?')
        {
            return Err(LbError::Config(format!(
                "Apache manager_url {manager_url:?} must be the balancer-manager's http(s) URL without a query, e.g. http://127.0.0.1:8080/balancer-manager"
            )));
        }
        if balancer.is_empty()
            || balancer.starts_with("balancer://")
            || balancer
                .chars()
                .any(|c| c.is_whitespace() || c == '&' || c == '/')
        {
            return Err(LbError::Config(format!(
                "Apache balancer {balancer:?} must be the name after balancer:// (no spaces, '&' or '/')"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(REQUEST_TIMEOUT_SECS))
            .build()
            .map_err(|e| LbError::Config(e.to_string()))?;
        Ok(Self {
            manager_url: manager_url.to_string(),
            balancer: balancer.to_string(),
            http,
            poll: Duration::from_millis(DRAIN_POLL_MS),
        })
    }

    fn unreachable(&self, reason: String) -> LbError {
        LbError::Unreachable {
            lb: self.describe(),
            target: self.manager_url.clone(),
            reason,
        }
    }

    async fn text(&self, req: reqwest::RequestBuilder, what: &str) -> Result<String, LbError> {
        let resp = req
            .header(reqwest::header::REFERER, &self.manager_url)
            .send()
            .await
            .map_err(|e| self.unreachable(format!("{what}: {e}")))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| self.unreachable(format!("{what}: {e}")))?;
        if !status.is_success() {
            return Err(LbError::Refused {
                lb: self.describe(),
                command: what.to_string(),
                answer: format!(
                    "HTTP {status} (is the balancer-manager handler allowed for this host?)"
                ),
            });
        }
        Ok(body)
    }

    async fn nonce(&self) -> Result<String, LbError> {
        let html = self
            .text(self.http.get(&self.manager_url), "GET balancer-manager")
            .await?;
        parse_nonce(&html, &self.balancer).ok_or_else(|| LbError::UnknownBackend {
            lb: self.describe(),
        })
    }

    async fn workers(&self) -> Result<Vec<Worker>, LbError> {
        let nonce = self.nonce().await?;
        let req = self.http.get(&self.manager_url).query(&[
            ("b", self.balancer.as_str()),
            ("nonce", nonce.as_str()),
            ("xml", "1"),
        ]);
        let xml = self.text(req, "GET balancer-manager?xml").await?;
        parse_workers(&xml, &self.balancer).map_err(|reason| LbError::Parse {
            lb: self.describe(),
            command: "GET balancer-manager?xml".into(),
            reason,
        })
    }

    async fn worker(&self, server: &str) -> Result<Worker, LbError> {
        self.workers()
            .await?
            .into_iter()
            .find(|w| same_member(&w.name, server))
            .ok_or_else(|| LbError::UnknownServer {
                lb: self.describe(),
                server: server.to_string(),
            })
    }

    /// Sets status flags of the member, e.g. `[("w_status_N", "1")]`.
    async fn set(&self, server: &str, flags: &[(&str, &str)]) -> Result<(), LbError> {
        let w = self.worker(server).await?;
        let nonce = self.nonce().await?;
        let mut form = vec![
            ("b", self.balancer.as_str()),
            ("w", w.name.as_str()),
            ("nonce", nonce.as_str()),
        ];
        form.extend_from_slice(flags);
        let what = format!(
            "POST balancer-manager {}",
            flags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        );
        self.text(self.http.post(&self.manager_url).form(&form), &what)
            .await
            .map(|_| ())
    }

    async fn confirm(&self, server: &str, wanted: AdminState) -> Result<(), LbError> {
        let found = self.worker(server).await?.admin();
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
impl LoadBalancer for Apache {
    fn describe(&self) -> String {
        format!(
            "apache balancer://{} at {}",
            self.balancer, self.manager_url
        )
    }

    async fn server_state(&self, server: &str) -> Result<ServerState, LbError> {
        let w = self.worker(server).await?;
        Ok(ServerState {
            admin: w.admin(),
            operational: w.operational(),
            current_sessions: w.busy,
        })
    }

    async fn drain(&self, server: &str, timeout: Duration) -> Result<DrainReport, LbError> {
        let start = Instant::now();
        let before = self.worker(server).await?;
        if before.admin() != AdminState::Maint {
            self.set(server, &[("w_status_N", "1")]).await?;
        }
        let mut busy = self.worker(server).await?.busy;
        while busy > 0 {
            if start.elapsed() >= timeout {
                return Err(LbError::DrainTimeout {
                    lb: self.describe(),
                    server: server.to_string(),
                    sessions: busy,
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(self.poll).await;
            busy = self.worker(server).await?.busy;
        }
        self.set(server, &[("w_status_D", "1")]).await?;
        self.confirm(server, AdminState::Maint).await?;
        Ok(DrainReport {
            waited: start.elapsed(),
            sessions_at_start: before.busy,
        })
    }

    async fn enable(&self, server: &str) -> Result<(), LbError> {
        self.set(server, &[("w_status_D", "0"), ("w_status_N", "0")])
            .await?;
        self.confirm(server, AdminState::Ready).await
    }

    async fn check_server(&self, server: &str) -> Result<(), LbError> {
        self.worker(server).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from Apache/2.4.67 (Debian): the worker table of `GET /balancer-manager`.
    const HTML: &str = "<h3>LoadBalancer Status for <a href=\"/balancer-manager?b=bitbucket&amp;nonce=3c6283ad-2ef6-7064-cd44-1eb89848b930\">balancer://bitbucket</a> [pc09dfdc3_bitbucket]</h3>\n\n\n<table><tr><th>MaxMembers</th><th>StickySession</th><th>DisableFailover</th><th>Timeout</th><th>FailoverAttempts</th><th>Method</th><th>Path</th><th>Active</th></tr>\n<tr><td>2 [2 Used]</td>\n<td> (None) </td><td>Off</td>\n<td>0</td><td>1</td>\n<td>byrequests</td>\n<td>/</td>\n<td>Yes</td>\n</tr>\n</table>\n<br />\n\n<table><tr><th>Worker URL</th><th>Route</th><th>RouteRedir</th><th>Factor</th><th>Set</th><th>Status</th><th>Elected</th><th>Busy</th><th>Load</th><th>To</th><th>From</th></tr>\n<tr>\n<td><a href=\"/balancer-manager?b=bitbucket&amp;w=http://127.0.0.1:18781&amp;nonce=3c6283ad-2ef6-7064-cd44-1eb89848b930\">http://127.0.0.1:18781</a></td><td></td><td></td><td>1.00</td><td>0</td><td>Init Ok </td><td>0</td><td>0</td><td>0</td><td>  0 </td><td>  0 </td></tr>\n</table>\n<hr />\n</body></html>\n";

    // Captured from Apache/2.4.67 (Debian): `GET /balancer-manager?b=bitbucket&nonce=..&xml=1`
    // (with a Referer) after `w_status_N=1` then `w_status_D=1` on the first member.
    const XML: &str = "<?xml version='1.0' encoding='UTF-8' ?>\n<httpd:manager xmlns:httpd='http://httpd.apache.org'>\n  <httpd:balancers>\n    <httpd:balancer>\n      <httpd:name>balancer://bitbucket</httpd:name>\n      <httpd:timeout>0</httpd:timeout>      <httpd:maxattempts>1</httpd:maxattempts>\n      <httpd:lbmethod>byrequests</httpd:lbmethod>\n      <httpd:workers>\n        <httpd:worker>\n          <httpd:name>http://127.0.0.1:18781</httpd:name>\n          <httpd:scheme>http</httpd:scheme>\n          <httpd:hostname>127.0.0.1</httpd:hostname>\n          <httpd:loadfactor>1.00</httpd:loadfactor>\n          <httpd:port>18781</httpd:port>\n          <httpd:min>0</httpd:min>\n          <httpd:smax>25</httpd:smax>\n          <httpd:max>25</httpd:max>\n          <httpd:ttl>0</httpd:ttl>\n          <httpd:status>Init Drn Dis </httpd:status>\n          <httpd:retries>0</httpd:retries>\n          <httpd:lbstatus>0</httpd:lbstatus>\n          <httpd:loadfactor>1.00</httpd:loadfactor>\n          <httpd:transferred>0</httpd:transferred>\n          <httpd:read>0</httpd:read>\n          <httpd:elected>0</httpd:elected>\n          <httpd:route></httpd:route>\n          <httpd:redirect></httpd:redirect>\n          <httpd:busy>0</httpd:busy>\n          <httpd:lbset>0</httpd:lbset>\n          <httpd:retry>1</httpd:retry>\n        </httpd:worker>\n        <httpd:worker>\n          <httpd:name>http://127.0.0.1:18782</httpd:name>\n          <httpd:scheme>http</httpd:scheme>\n          <httpd:hostname>127.0.0.1</httpd:hostname>\n          <httpd:loadfactor>1.00</httpd:loadfactor>\n          <httpd:port>18782</httpd:port>\n          <httpd:min>0</httpd:min>\n          <httpd:smax>25</httpd:smax>\n          <httpd:max>25</httpd:max>\n          <httpd:ttl>0</httpd:ttl>\n          <httpd:status>Init Ok </httpd:status>\n          <httpd:retries>0</httpd:retries>\n          <httpd:lbstatus>0</httpd:lbstatus>\n          <httpd:loadfactor>1.00</httpd:loadfactor>\n          <httpd:transferred>0</httpd:transferred>\n          <httpd:read>0</httpd:read>\n          <httpd:elected>0</httpd:elected>\n          <httpd:route></httpd:route>\n          <httpd:redirect></httpd:redirect>\n          <httpd:busy>3</httpd:busy>\n          <httpd:lbset>0</httpd:lbset>\n          <httpd:retry>1</httpd:retry>\n        </httpd:worker>\n      </httpd:workers>\n    </httpd:balancer>\n  </httpd:balancers>\n</httpd:manager>\n";

    #[test]
    fn reads_the_nonce() {
        assert_eq!(
            parse_nonce(HTML, "bitbucket").as_deref(),
            Some("3c6283ad-2ef6-7064-cd44-1eb89848b930")
        );
        assert_eq!(parse_nonce(HTML, "bit"), None);
        assert_eq!(parse_nonce("<html></html>", "bitbucket"), None);
        assert_eq!(
            parse_nonce("<a href='/bm?b=x&amp;nonce=abc'>", "x").as_deref(),
            Some("abc")
        );
    }

    #[test]
    fn reads_workers_and_their_flags() {
        let ws = parse_workers(XML, "bitbucket").unwrap();
        assert_eq!(ws.len(), 2);
        assert_eq!(ws[0].name, "http://127.0.0.1:18781");
        assert_eq!(ws[0].flags, ["Init", "Drn", "Dis"]);
        assert_eq!(ws[0].admin(), AdminState::Maint);
        assert_eq!(ws[1].admin(), AdminState::Ready);
        assert_eq!(ws[1].operational(), OperState::Up);
        assert_eq!(ws[1].busy, 3);
        let drn = Worker {
            flags: vec!["Init".into(), "Drn".into(), "Ok".into()],
            ..ws[1].clone()
        };
        assert_eq!(drn.admin(), AdminState::Drain);
        let err = Worker {
            flags: vec!["Init".into(), "Err".into()],
            ..ws[1].clone()
        };
        assert_eq!(err.operational(), OperState::Down);
        assert!(
            parse_workers(XML, "other")
                .unwrap_err()
                .contains("balancer://other")
        );
        assert!(
            parse_workers(HTML, "bitbucket")
                .unwrap_err()
                .contains("Referer")
        );
        assert!(same_member(
            "http://127.0.0.1:18781/",
            "HTTP://127.0.0.1:18781"
        ));
    }

    #[test]
    fn settings_are_checked() {
        assert!(Apache::new("http://127.0.0.1:8080/balancer-manager", "bitbucket").is_ok());
        for (url, b) in [
            ("127.0.0.1:8080/balancer-manager", "bitbucket"),
            ("http://h/balancer-manager?b=x", "bitbucket"),
            ("http://h/balancer-manager", "balancer://bitbucket"),
            ("http://h/balancer-manager", ""),
            ("http://h/balancer-manager", "a&b"),
        ] {
            assert!(
                matches!(Apache::new(url, b), Err(LbError::Config(_))),
                "{url} {b}"
            );
        }
    }
}

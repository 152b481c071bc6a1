//! Which archive URLs the agent fetches (`StageFromUrl`), and how a URL is quoted back.
//!
//! A coordinator certificate must not turn the agent into a client of any host it can reach (an
//! internal port scanner, a way to loopback services): only the hosts in `[stage] url_hosts` are
//! fetched, a redirect may not leave the URL's host, and URLs are quoted without their userinfo and
//! query, where credentials and tokens live.

use reqwest::Url;
use std::fmt;

/// Longest URL accepted.
pub const MAX_URL_BYTES: usize = 4096;

/// One `[stage] url_hosts` entry: a host, any port; or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    host: String,
    port: Option<u16>,
}

impl HostRule {
    /// Parses `artifacts.example.com`, `artifacts.example.com:8443`, `10.0.0.5`, `[::1]:8080`.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "'{entry}' is not a host or host:port such as artifacts.example.com or 10.0.0.5:8080"
            )
        };
        if entry.is_empty() || entry.contains(['/', '@', '?', '#', ' ']) {
            return Err(bad());
        }
        // Let the URL parser normalise the host (case, IPv6 brackets, IDNA) as it will for requests.
        let url = Url::parse(&format!("http://{entry}/")).map_err(|_| bad())?;
        let host = url.host_str().ok_or_else(bad)?.to_ascii_lowercase();
        let port = url.port().or_else(|| {
            // `http://h:80/` parses with the port dropped; keep an explicit :80.
            entry.ends_with(":80").then_some(80)
        });
        Ok(Self { host, port })
    }

    fn allows(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        host.eq_ignore_ascii_case(&self.host)
            && self
                .port
                .is_none_or(|p| url.port_or_known_default() == Some(p))
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) if self.host.contains(':') => write!(f, "[{}]:{p}", self.host),
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// Why a URL is not fetched. Its text never carries the URL's credentials or query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    #[error("the archive URL is {0} bytes long; at most {MAX_URL_BYTES} are accepted")]
    TooLong(usize),
    #[error("'{0}' is not an http(s) URL")]
    NotHttp(String),
    #[error(
        "this agent fetches no archive URLs: its config has no [stage] url_hosts; list the download host there (url_hosts = [\"artifacts.example.com\"]) or stream the archive with --archive"
    )]
    NoHostsAllowed,
    #[error(
        "host '{host}' of {url} is not in this agent's [stage] url_hosts ({allowed}); add it there or stream the archive with --archive"
    )]
    HostNotAllowed {
        host: String,
        url: String,
        allowed: String,
    },
}

/// Decides whether the agent may fetch `url`: pure, before any connection is made.
pub fn check_url(url: &str, allowed: Option<&[HostRule]>) -> Result<Url, UrlRefused> {
    if url.len() > MAX_URL_BYTES {
        return Err(UrlRefused::TooLong(url.len()));
    }
    let parsed = Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .ok_or_else(|| UrlRefused::NotHttp(redact_url(url)))?;
    let Some(rules) = allowed else {
        return Err(UrlRefused::NoHostsAllowed);
    };
    if rules.iter().any(|r| r.allows(&parsed)) {
        Ok(parsed)
    } else {
        Err(UrlRefused::HostNotAllowed {
            host: parsed.host_str().unwrap_or_default().to_string(),
            url: redact_url(url),
            allowed: rules
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// Whether a redirect from `from` to `to` stays on the same host and port (an upgrade from http to
/// https on the same host is fine; a downgrade is not).
pub fn redirect_allowed(from: &Url, to: &Url) -> bool {
    let same_host = match (from.host_str(), to.host_str()) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        _ => false,
    };
    let scheme_ok = match (from.scheme(), to.scheme()) {
        (a, b) if a == b => from.port_or_known_default() == to.port_or_known_default(),
        ("http", "https") => true,
        _ => false,
    };
    same_host && scheme_ok
}

/// `url` as it may be shown: without user, password, query and fragment; something unparseable is
/// not shown at all (it could be anything).
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = Url::parse(url) else {
        return format!("<an unparseable URL of {} bytes>", url.len());
    };
    let had_userinfo = !u.username().is_empty() || u.password().is_some();
    let had_query = u.query().is_some();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    let mut text = u.to_string();
    if had_userinfo {
        text = text.replacen("://", "://***@", 1);
    }
    if had_query {
        text.push_str("?***");
    }
    bbupgrade_common::echo::quote(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(entries: &[&str]) -> Vec<HostRule> {
        entries
            .iter()
            .map(|e| HostRule::parse(e).unwrap())
            .collect()
    }

    #[test]
    fn only_listed_hosts_are_fetched() {
        let r = rules(&["Artifacts.Example.com", "10.0.0.5:8080", "[::1]:9000"]);
        assert!(check_url("https://artifacts.example.com/a.tar.gz", Some(&r)).is_ok());
        assert!(check_url("http://ARTIFACTS.example.com:81/a", Some(&r)).is_ok());
        assert!(check_url("http://10.0.0.5:8080/a", Some(&r)).is_ok());
        assert!(check_url("http://[::1]:9000/a", Some(&r)).is_ok());
        for refused in [
            "http://10.0.0.5/a",
            "http://10.0.0.5:8081/a",
            "http://127.0.0.1:8080/a",
            "http://artifacts.example.com.evil.net/a",
            "http://[::1]:9001/a",
        ] {
            assert!(
                matches!(
                    check_url(refused, Some(&r)),
                    Err(UrlRefused::HostNotAllowed { .. })
                ),
                "{refused}"
            );
        }
        assert_eq!(
            check_url("http://artifacts.example.com/a", None),
            Err(UrlRefused::NoHostsAllowed)
        );
        assert!(matches!(
            check_url("file:///etc/shadow", Some(&r)),
            Err(UrlRefused::NotHttp(_))
        ));
        assert!(matches!(
            check_url(&"h".repeat(MAX_URL_BYTES + 1), Some(&r)),
            Err(UrlRefused::TooLong(_))
        ));
        for bad in ["", "a/b", "user@host", "host:notaport"] {
            assert!(HostRule::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(HostRule::parse("h:80").unwrap().to_string(), "h:80");
    }

    #[test]
    fn credentials_and_queries_are_never_quoted() {
        let url = "https://alice:s3cret@artifacts.example.com/x.tar.gz?token=T0KEN#frag";
        let shown = redact_url(url);
        assert_eq!(shown, "https://***@artifacts.example.com/x.tar.gz?***");
        let r = rules(&["other.example.com"]);
        let e = check_url(url, Some(&r)).unwrap_err().to_string();
        assert!(!e.contains("s3cret") && !e.contains("T0KEN"), "{e}");
        assert!(e.contains("artifacts.example.com"), "{e}");
        assert!(!redact_url("not a url s3cret").contains("s3cret"));
    }

    #[test]
    fn redirects_stay_on_the_host() {
        let u = |s: &str| Url::parse(s).unwrap();
        let from = u("http://a.example/x");
        assert!(redirect_allowed(&from, &u("http://a.example/y")));
        assert!(redirect_allowed(&from, &u("https://a.example/y")));
        assert!(!redirect_allowed(&from, &u("http://b.example/y")));
        assert!(!redirect_allowed(&from, &u("http://a.example:22/y")));
        assert!(!redirect_allowed(
            &u("https://a.example/x"),
            &u("http://a.example/y")
        ));
    }
}

//! The private PostgreSQL instance the shared-journal tests use: `BBUPGRADE_TEST_PG_URL` if set
//! (`.ci/run` starts one), otherwise started here by `tests/scripts/pg-test-instance.sh`; a fresh
//! database per test. Missing PostgreSQL fails the test with an install hint, unless
//! `BBUPGRADE_SKIP_PG_TESTS=1`.

#![allow(dead_code)]

use std::process::Command;
use std::sync::OnceLock;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-test-instance.sh");
/// The instance's socket while it runs (the script's defaults: target/pg-test, port 54329).
const SOCKET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/pg-test/sock/.s.PGSQL.54329"
);

extern "C" fn stop_instance() {
    let _ = Command::new(SCRIPT).arg("stop").output();
}

/// The instance's URL (a database to connect to for admin work), or `None` when told to skip.
pub fn base_url() -> Option<String> {
    if std::env::var("BBUPGRADE_SKIP_PG_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("BBUPGRADE_SKIP_PG_TESTS=1: skipping a PostgreSQL test");
        return None;
    }
    static URL: OnceLock<String> = OnceLock::new();
    Some(
        URL.get_or_init(|| {
            if let Ok(url) = std::env::var("BBUPGRADE_TEST_PG_URL")
                && !url.is_empty()
            {
                return url;
            }
            let was_running = std::path::Path::new(SOCKET).exists();
            let out = Command::new(SCRIPT)
                .arg("start")
                .output()
                .expect("running tests/scripts/pg-test-instance.sh");
            if out.status.success() && !was_running {
                // Started here: stopped when this test program exits, so no server outlives it.
                // SAFETY: registers a plain `extern "C" fn` with no captured state.
                unsafe { libc::atexit(stop_instance) };
            }
            assert!(
                out.status.success(),
                "could not start the test PostgreSQL instance ({}): {}\n\
                 install PostgreSQL (`apt-get install -y postgresql`, or run .ci/run), \
                 or set BBUPGRADE_SKIP_PG_TESTS=1 to skip these tests",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout)
                .expect("URL")
                .trim()
                .to_string()
        })
        .clone(),
    )
}

/// `url` pointing at database `db` instead.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (scheme, rest) = base.split_once("://").expect("a URL");
    let authority = rest.split('/').next().unwrap_or("");
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{scheme}://{authority}/{db}{q}")
}

/// A fresh, empty database on the instance; its URL.
pub fn fresh_database() -> Option<String> {
    let base = base_url()?;
    let name = format!("bbj_{}", uuid::Uuid::new_v4().simple());
    // A plain thread: the sync client must not run inside a tokio runtime.
    let admin = base.clone();
    let db = name.clone();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&admin, postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to the test instance {admin}: {e}"));
        c.batch_execute(&format!("CREATE DATABASE {db}"))
            .expect("creating a test database");
    })
    .join()
    .expect("creating a test database");
    Some(with_database(&base, &name))
}

/// Runs admin SQL on `url` (from a plain thread); the rows' first column as text.
pub fn admin_query(url: &str, sql: &str) -> Vec<String> {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("admin connection");
        c.simple_query(&sql)
            .expect("admin query")
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
                _ => None,
            })
            .collect()
    })
    .join()
    .expect("admin query")
}

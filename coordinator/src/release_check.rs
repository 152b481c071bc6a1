//! `plan`'s look at the release archive before it says ready: a file must be a readable gzip'd tar
//! of the target release (every entry under `atlassian-bitbucket-<version>/`, the start script
//! present; its SHA-256 was compared with `--sha256` when hashed); a URL must answer HEAD with a
//! size. The agents verify the archive again, fully, as they stage it.

use crate::procedure::ArchiveSource;
use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The check's name in the plan (a failure is bad input: exit 2 from `plan` and `upgrade`).
pub const CHECK_ARCHIVE: &str = "archive";
/// Bound on the HEAD request for `--archive-url`.
pub const HEAD_TIMEOUT_SECS: u64 = 20;

/// The archive check for the plan.
pub async fn check(archive: &ArchiveSource, version: &str) -> crate::plan::Check {
    let result = match archive {
        ArchiveSource::File { path, .. } => {
            let (path, v) = (path.clone(), version.to_string());
            tokio::task::spawn_blocking(move || check_file(&path, &v))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("the archive check's task failed: {e}")))
        }
        ArchiveSource::Url { url, .. } => check_url(url).await,
    };
    match result {
        Ok(detail) => crate::plan::Check::new(CHECK_ARCHIVE, true, detail),
        Err(e) => crate::plan::Check::new(CHECK_ARCHIVE, false, format!("{e:#}")),
    }
}

/// Reads the whole archive: gzip and tar intact, every entry under the release's top folder, the
/// start script there.
pub fn check_file(path: &Path, version: &str) -> Result<String> {
    let top = PathBuf::from(format!("atlassian-bitbucket-{version}"));
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read the archive {}", path.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let (mut entries, mut start_script) = (0u64, false);
    let not_release = |what: String| {
        anyhow::anyhow!(
            "{} is not the Bitbucket {version} release: {what}; give the atlassian-bitbucket-{version}.tar.gz from Atlassian",
            path.display()
        )
    };
    let list = tar
        .entries()
        .map_err(|e| not_release(format!("not a tar.gz ({e})")))?;
    for entry in list {
        let entry =
            entry.map_err(|e| not_release(format!("unreadable after {entries} entries ({e})")))?;
        let name = entry
            .path()
            .map_err(|e| not_release(format!("an entry has a bad name ({e})")))?
            .into_owned();
        if !name.starts_with(&top) {
            return Err(not_release(format!(
                "entry '{}' is outside the folder {}/ (another release, or not a Bitbucket archive)",
                name.display(),
                top.display()
            )));
        }
        start_script |= name == top.join("bin/start-bitbucket.sh");
        entries += 1;
    }
    ensure!(entries > 0, "{} is empty", path.display());
    if !start_script {
        return Err(not_release(format!(
            "it has no {}/bin/start-bitbucket.sh",
            top.display()
        )));
    }
    Ok(format!(
        "{} holds Bitbucket {version} ({entries} entries)",
        path.display()
    ))
}

/// HEAD on the URL the agents will download from: it must answer 2xx with the archive's size.
pub async fn check_url(url: &str) -> Result<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(HEAD_TIMEOUT_SECS))
        .build()
        .context("building the HTTP client")?;
    let r = http.head(url).send().await.with_context(|| {
        format!("HEAD {url} failed (the agents download from it: is it reachable?)")
    })?;
    if !r.status().is_success() {
        bail!(
            "HEAD {url} answered {}: the agents could not download the archive",
            r.status()
        );
    }
    // From the header: reqwest's content_length() reads the (empty) body of a HEAD answer.
    let size = r
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match size {
        Some(n) if n > 0 => Ok(format!("{url} answers with {n} bytes")),
        _ => bail!("HEAD {url} gives no size (Content-Length): is it the archive?"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar.gz of `entries` (path, content).
    fn archive(dir: &Path, entries: &[(&str, &str)]) -> PathBuf {
        let path = dir.join("a.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        for (name, text) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(text.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(&mut h, name, text.as_bytes()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        path
    }

    #[test]
    fn a_release_of_the_target_version_passes_and_others_say_why_not() {
        let d = tempfile::tempdir().unwrap();
        let start = "atlassian-bitbucket-8.19.6/bin/start-bitbucket.sh";
        let good = archive(d.path(), &[(start, "#!/bin/sh\n")]);
        assert!(
            check_file(&good, "8.19.6")
                .unwrap()
                .contains("Bitbucket 8.19.6")
        );

        let e = format!("{:#}", check_file(&good, "8.19.7").unwrap_err());
        assert!(
            e.contains("outside the folder atlassian-bitbucket-8.19.7/"),
            "{e}"
        );

        let no_start = archive(d.path(), &[("atlassian-bitbucket-8.19.6/README", "x")]);
        let e = format!("{:#}", check_file(&no_start, "8.19.6").unwrap_err());
        assert!(
            e.contains("no atlassian-bitbucket-8.19.6/bin/start-bitbucket.sh"),
            "{e}"
        );

        let junk = d.path().join("junk.tar.gz");
        std::fs::write(&junk, b"not an archive").unwrap();
        let e = format!("{:#}", check_file(&junk, "8.19.6").unwrap_err());
        assert!(e.contains("is not the Bitbucket 8.19.6 release"), "{e}");

        let e = format!(
            "{:#}",
            check_file(&d.path().join("missing"), "8.19.6").unwrap_err()
        );
        assert!(e.contains("cannot read the archive"), "{e}");
    }

    #[tokio::test]
    async fn a_url_must_answer_head_with_a_size() {
        use axum::routing::get;
        let app = axum::Router::new()
            .route("/ok.tar.gz", get(|| async { vec![7u8; 1234] }))
            .route(
                "/gone.tar.gz",
                get(|| async { (axum::http::StatusCode::NOT_FOUND, "no") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let ok = check_url(&format!("http://{addr}/ok.tar.gz"))
            .await
            .unwrap();
        assert!(ok.contains("1234 bytes"), "{ok}");
        let e = format!(
            "{:#}",
            check_url(&format!("http://{addr}/gone.tar.gz"))
                .await
                .unwrap_err()
        );
        assert!(e.contains("404"), "{e}");
        server.abort();
    }
}

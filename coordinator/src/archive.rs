//! The release to upgrade to, as the admin names it (a file streamed to the agents or a URL they
//! download) and as the run records it, hashed once before anything changes.

use crate::error::BadInput;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the release comes from; recorded with the run so `resume` uses the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ArchiveSource {
    File {
        path: PathBuf,
        sha256: String,
        size_bytes: u64,
    },
    Url {
        url: String,
        sha256: String,
    },
}

impl ArchiveSource {
    pub fn sha256(&self) -> &str {
        match self {
            ArchiveSource::File { sha256, .. } | ArchiveSource::Url { sha256, .. } => sha256,
        }
    }

    pub fn size_bytes(&self) -> u64 {
        match self {
            ArchiveSource::File { size_bytes, .. } => *size_bytes,
            ArchiveSource::Url { .. } => 0,
        }
    }
}

/// The release as given on the command line (unchecked).
#[derive(Debug, Clone, Default)]
pub struct ReleaseSpec {
    pub archive: Option<PathBuf>,
    pub archive_url: Option<String>,
    pub sha256: Option<String>,
    /// A release catalog (file or URL): the archive of `--to` when no archive is given.
    pub catalog: Option<String>,
}

impl ReleaseSpec {
    pub fn is_given(&self) -> bool {
        self.archive.is_some() || self.archive_url.is_some()
    }
}

/// Checks the release given: a file is hashed (the agents verify it again as they extract) and
/// compared with `sha256` when given; a URL needs a well-formed `sha256`. `None` when none given.
pub async fn resolve(spec: &ReleaseSpec) -> Result<Option<ArchiveSource>> {
    if let Some(path) = &spec.archive {
        let path = path.clone();
        let (sha, size, abs) = tokio::task::spawn_blocking(move || hash_file(&path)).await??;
        if let Some(expected) = &spec.sha256
            && !expected.eq_ignore_ascii_case(&sha)
        {
            return Err(BadInput(format!(
                "the archive's SHA-256 is {sha}, not the one expected ({expected}, from --sha256 or the catalog); it may be corrupt or the wrong file"
            ))
            .into());
        }
        return Ok(Some(ArchiveSource::File {
            path: abs,
            sha256: sha,
            size_bytes: size,
        }));
    }
    if let Some(url) = &spec.archive_url {
        let sha = spec.sha256.clone().unwrap_or_default();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadInput(format!("--sha256 '{sha}' must be 64 hex digits")).into());
        }
        return Ok(Some(ArchiveSource::Url {
            url: url.clone(),
            sha256: sha.to_lowercase(),
        }));
    }
    Ok(None)
}

/// The release archive of a command: `--archive*` when given, else the catalog's entry for `to`.
/// With a catalog, `to` must be in it either way.
pub async fn resolve_for(spec: &ReleaseSpec, to: Option<&str>) -> Result<Option<ArchiveSource>> {
    let release = match (&spec.catalog, to) {
        (Some(source), Some(to)) => Some(catalog_release(source, to).await?),
        _ => None,
    };
    if spec.is_given() {
        return resolve(spec).await;
    }
    match release {
        Some(r) => release_archive(&r).await.map(Some),
        None => Ok(None),
    }
}

/// Loads the catalog at `source` (bad input when it is wrong) and finds `to` in it.
pub async fn catalog_release(source: &str, to: &str) -> Result<crate::catalog::Release> {
    let catalog = load_catalog(source).await?;
    let v = to
        .parse::<bbupgrade_common::version::Version>()
        .map_err(|e| BadInput(e.to_string()))?;
    Ok(catalog.require(v).map_err(BadInput)?.clone())
}

/// Loads a catalog; anything wrong with it is bad input.
pub async fn load_catalog(source: &str) -> Result<crate::catalog::Catalog> {
    crate::catalog::load(source)
        .await
        .map_err(|e| BadInput(format!("{e:#}")).into())
}

/// A catalog release's archive: its local copy (hashed against the catalog's sha256) when it has
/// one, else its URL for the agents.
pub async fn release_archive(r: &crate::catalog::Release) -> Result<ArchiveSource> {
    use anyhow::Context;
    let archive = archive_from(
        r.archive.as_deref(),
        Some(r.archive_url.as_str()),
        Some(r.sha256.as_str()),
    )
    .await
    .with_context(|| format!("the catalog's release {}", r.version))?;
    archive.ok_or_else(|| anyhow::anyhow!("the catalog's release {} has no archive", r.version))
}

/// [`resolve`] for parts given separately.
pub async fn archive_from(
    archive: Option<&Path>,
    archive_url: Option<&str>,
    sha256: Option<&str>,
) -> Result<Option<ArchiveSource>> {
    resolve(&ReleaseSpec {
        archive: archive.map(Path::to_path_buf),
        archive_url: archive_url.map(str::to_string),
        sha256: sha256.map(str::to_string),
        catalog: None,
    })
    .await
}

/// The file's SHA-256 (hex), size and absolute path.
fn hash_file(path: &Path) -> Result<(String, u64, PathBuf)> {
    use sha2::Digest;
    use std::io::Read;
    let cannot =
        |e: std::io::Error| BadInput(format!("cannot read the archive {}: {e}", path.display()));
    let mut f = std::fs::File::open(path).map_err(cannot)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(cannot)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    let abs = std::fs::canonicalize(path).map_err(cannot)?;
    Ok((hex::encode(h.finalize()), size, abs))
}

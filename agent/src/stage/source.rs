//! Where archive bytes come from besides a file: chunks pushed by async code (the gRPC upload), and
//! an HTTP(S) download, both bridged to the blocking one-pass stage. Which URLs may be fetched is
//! decided before this (`crate::url_policy`); here a redirect may not leave the URL's host, and
//! errors quote the URL redacted.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

use super::{
    ArchiveCache, StageError, StageOutcome, StageProgress, StageRequest, find_existing,
    stage_from_file, stage_stream, validate_request,
};

/// Chunks of a download buffered between the network and the extractor.
const DOWNLOAD_CHANNEL_CHUNKS: usize = 64;
const CONNECT_TIMEOUT_SECS: u64 = 30;
/// A download that delivers nothing for this long is given up.
const READ_TIMEOUT_SECS: u64 = 120;
/// Redirects followed at most (each on the URL's own host).
const MAX_REDIRECTS: usize = 5;

/// The error a [`ChunkReader`] returns once the sending side reported a failure; the stage turns it
/// into [`StageError::Corrupt`] (the archive is truncated).
#[derive(Debug)]
pub struct StreamBroken(pub String);

impl std::fmt::Display for StreamBroken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the archive stream broke off: {}", self.0)
    }
}

impl std::error::Error for StreamBroken {}

/// A blocking `Read` over chunks sent from async code. Dropping the sender is end of input; an
/// `Err` chunk is a read error. Call `read` only outside the async runtime (e.g. in `spawn_blocking`).
#[derive(Debug)]
pub struct ChunkReader {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
    broken: Option<String>,
}

/// A bounded channel of archive chunks and the blocking reader over it.
pub fn chunk_channel(capacity: usize) -> (mpsc::Sender<Result<Bytes, String>>, ChunkReader) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        tx,
        ChunkReader {
            rx,
            cur: Bytes::new(),
            broken: None,
        },
    )
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.cur.is_empty() {
            if let Some(msg) = &self.broken {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    StreamBroken(msg.clone()),
                ));
            }
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.cur = chunk,
                Some(Err(msg)) => self.broken = Some(msg),
                None => return Ok(0),
            }
        }
        let n = self.cur.len().min(buf.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

/// See [`super::stage_from_url`]. The caller has checked `url` against `[stage] url_hosts`.
pub async fn stage_from_url(
    url: &str,
    req: StageRequest,
    cache: Option<Arc<ArchiveCache>>,
    progress: impl FnMut(StageProgress) + Send + 'static,
) -> Result<StageOutcome, StageError> {
    let sha = validate_request(&req)?;
    let mut progress: Box<dyn FnMut(StageProgress) + Send> = Box::new(progress);
    let mut req = req;
    let (existing, back) = blocking(move || (find_existing(&req, &sha), req)).await?;
    req = back;
    if let Some(done) = existing? {
        return Ok(done);
    }
    let sha = validate_request(&req)?;
    if let Some(cache) = &cache
        && let Some(path) = cache.get(&sha)
    {
        let (result, r, p) = blocking(move || {
            let result = stage_from_file(&path, &req, None, &mut *progress);
            (result, req, progress)
        })
        .await?;
        (req, progress) = (r, p);
        match result {
            Ok(mut done) => {
                done.from_cache = !done.already_staged;
                return Ok(done);
            }
            // A bad cached copy is dropped and the release downloaded again.
            Err(e) if e.is_bad_input() => {
                tracing::warn!(sha256 = %sha, error = %e, "dropping a bad cached archive");
                cache.remove(&sha);
            }
            Err(e) => return Err(e),
        }
    }

    let shown = crate::url_policy::redact_url(url);
    let origin = reqwest::Url::parse(url)
        .map_err(|_| StageError::Download(format!("{shown} is not a valid URL")))?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(CONNECT_TIMEOUT_SECS))
        .read_timeout(Duration::from_secs(READ_TIMEOUT_SECS))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if crate::url_policy::redirect_allowed(&origin, attempt.url()) {
                attempt.follow()
            } else {
                let to = crate::url_policy::redact_url(attempt.url().as_str());
                attempt.error(format!(
                    "refused a redirect to {to}: a download may not leave the URL's host"
                ))
            }
        }))
        .build()
        .map_err(|e| StageError::Download(format!("setting up the HTTP client: {}", chain(&e))))?;
    let mut resp =
        client.get(url).send().await.map_err(|e| {
            StageError::Download(format!("GET {shown}: {}", chain(&e.without_url())))
        })?;
    if !resp.status().is_success() {
        return Err(StageError::Download(format!(
            "GET {shown}: HTTP {}",
            resp.status()
        )));
    }
    let total = resp.content_length();
    let (tx, reader) = chunk_channel(DOWNLOAD_CHANNEL_CHUNKS);
    let stage = tokio::task::spawn_blocking(move || {
        stage_stream(reader, total, &req, cache.as_deref(), &mut *progress)
    });
    let download_error = loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                // A closed channel means the stage stopped (refused the archive): stop downloading.
                if tx.send(Ok(chunk)).await.is_err() {
                    break None;
                }
            }
            Ok(None) => break None,
            Err(e) => {
                let msg = format!("GET {shown}: {}", chain(&e.without_url()));
                let _ = tx.send(Err(msg.clone())).await;
                break Some(msg);
            }
        }
    };
    drop(tx);
    let result = stage.await.map_err(join_error)?;
    match (result, download_error) {
        (Err(_), Some(msg)) => Err(StageError::Download(msg)),
        (result, _) => result,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StageError> {
    tokio::task::spawn_blocking(f).await.map_err(join_error)
}

fn join_error(e: tokio::task::JoinError) -> StageError {
    super::io_err("running the stage", io::Error::other(e.to_string()))
}

/// An error with its causes, which reqwest keeps out of its `Display`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

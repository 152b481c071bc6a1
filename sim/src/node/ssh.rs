//! The node's second front door: a Git-over-SSH stand-in on `-Dplugin.ssh.port`. It does not speak
//! the SSH protocol (a layer-4 load balancer forwards bytes either way); it keeps what matters to a
//! rolling upgrade: a session is a long transfer, counted in flight, that a graceful stop lets finish
//! while refusing new ones, and that a kill cuts.
//!
//! Wire form, one session per connection: the client sends one line, `git-upload-pack '<repo>'`;
//! the node answers `PACK <node> <version> <bytes>\n`, streams `<bytes>` bytes over
//! `sim.ssh.clone.ms`, and closes. A node that cannot serve answers `ERR <reason>\n` and closes. So a
//! client knows a complete pack from a cut one by its length and the clean end after it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::settings;
use super::{Health, Node};

/// Bytes in one piece of a streamed pack.
pub const PACK_CHUNK_BYTES: usize = 16 * 1024;
/// Longest a client may take to send its request line.
const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 4096;
/// How often the door checks whether the node is running yet.
const OPEN_POLL_MS: u64 = 50;

/// What a request line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    UploadPack { repo: String },
}

/// Parses `git-upload-pack '<repo>'` (quotes optional, as OpenSSH passes the command through).
pub fn parse_request(line: &str) -> Result<Request, String> {
    let line = line.trim_end_matches(['\r', '\n']).trim();
    let Some((command, arg)) = line.split_once(' ') else {
        return Err(format!("no repository in {line:?}"));
    };
    let repo = arg.trim().trim_matches('\'').trim();
    if repo.is_empty() {
        return Err(format!("no repository in {line:?}"));
    }
    match command {
        "git-upload-pack" => Ok(Request::UploadPack {
            repo: repo.to_string(),
        }),
        other => Err(format!("{other} is not supported by this node")),
    }
}

/// Serves the SSH door: binds `port` once the node is RUNNING (the product opens its SSH server
/// late in startup), accepts sessions until `stop` turns true, then closes the listener (new
/// sessions are refused) and returns; sessions already open go on, counted in flight.
pub async fn serve(node: Arc<Node>, port: u16, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        if node.health() == Health::Running {
            break;
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(OPEN_POLL_MS)) => {}
        }
    }
    let listener = match TcpListener::bind((node.cfg.address, port)).await {
        Ok(l) => l,
        Err(e) => {
            // As the product: the SSH server fails to start, HTTP goes on.
            tracing::error!(
                port,
                "could not open the SSH port {}:{port} ({e}); Git over SSH is unavailable on this node",
                node.cfg.address
            );
            return;
        }
    };
    tracing::info!(port, "SSH (simulated) listening");
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(session(Arc::clone(&node), stream));
                }
                Err(e) => tracing::warn!("SSH accept failed: {e}"),
            },
        }
    }
    drop(listener);
    tracing::info!(port, "SSH port closed: new sessions are refused");
}

/// One session: the request line, then the pack (or an `ERR` line).
async fn session(node: Arc<Node>, stream: TcpStream) {
    let in_flight = node.traffic.begin();
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES));
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_millis(REQUEST_TIMEOUT_MS),
        reader.read_line(&mut line),
    )
    .await;
    let request = match read {
        Ok(Ok(n)) if n > 0 => parse_request(&line),
        Ok(Ok(_)) => Err("no request".into()),
        Ok(Err(e)) => Err(format!("reading the request: {e}")),
        Err(_) => Err("no request in time".into()),
    };
    let refusal = match (&request, node.health()) {
        (Err(e), _) => Some(e.clone()),
        (Ok(_), Health::Running) if node.knobs().flag(settings::MAINTENANCE) => {
            Some("the node is in maintenance".into())
        }
        (Ok(_), Health::Running) => None,
        (Ok(_), health) => Some(format!("the node is {}", health.name())),
    };
    if let Some(reason) = refusal {
        tracing::info!("SSH session refused: {reason}");
        write
            .write_all(format!("ERR {reason}\n").as_bytes())
            .await
            .ok();
        write.shutdown().await.ok();
        return;
    }
    let knobs = node.knobs();
    let chunks = knobs.u64_or(settings::SSH_CLONE_CHUNKS, 10).max(1);
    let pause = Duration::from_millis(knobs.u64_or(settings::SSH_CLONE_MS, 3_000) / chunks);
    let head = format!(
        "PACK {} {} {}\n",
        node.cfg.handle(),
        node.cfg.version,
        chunks * PACK_CHUNK_BYTES as u64
    );
    let sent = async {
        write.write_all(head.as_bytes()).await?;
        for i in 0..chunks {
            tokio::time::sleep(pause).await;
            write
                .write_all(&vec![b'a' + (i % 26) as u8; PACK_CHUNK_BYTES])
                .await?;
        }
        write.shutdown().await
    }
    .await;
    if let Err(e) = sent {
        tracing::info!("SSH session ended early: {e}");
    }
    drop(in_flight);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request("git-upload-pack '/prj/repo1.git'\n"),
            Ok(Request::UploadPack {
                repo: "/prj/repo1.git".into()
            })
        );
        assert_eq!(
            parse_request("git-upload-pack prj/r.git\r\n"),
            Ok(Request::UploadPack {
                repo: "prj/r.git".into()
            })
        );
        assert!(parse_request("git-upload-pack ''").is_err());
        assert!(parse_request("git-upload-pack").is_err());
        assert!(
            parse_request("git-receive-pack 'x.git'")
                .unwrap_err()
                .contains("not supported")
        );
    }
}

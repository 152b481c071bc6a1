//! One Git-over-SSH clone against the SSH stand-in's wire form (see `node::ssh`): the request line,
//! the `PACK` head, the announced bytes, then a clean end. Anything else is a failed session.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::report::SshOutcome;

/// Longest `PACK`/`ERR` head line read.
const MAX_HEAD_BYTES: u64 = 1024;

/// Clones `repo` through `addr` (`HOST:PORT`), within `timeout` for the whole session.
pub async fn clone(addr: &str, repo: &str, timeout: Duration) -> SshOutcome {
    match tokio::time::timeout(timeout, session(addr, repo)).await {
        Ok(outcome) => outcome,
        Err(_) => SshOutcome::Refused(format!("timed out after {} ms", timeout.as_millis())),
    }
}

async fn session(addr: &str, repo: &str) -> SshOutcome {
    let mut stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return SshOutcome::Refused(format!("connecting: {e}")),
    };
    let request = format!("git-upload-pack '{repo}'\n");
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return SshOutcome::Refused(format!("sending the request: {e}"));
    }
    let (read, _write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut head = String::new();
    match (&mut reader)
        .take(MAX_HEAD_BYTES)
        .read_line(&mut head)
        .await
    {
        Ok(0) => return SshOutcome::Refused("closed before any answer".into()),
        Ok(_) => {}
        Err(e) => return SshOutcome::Refused(format!("reading the answer: {e}")),
    }
    let (node, version, expected) = match parse_head(&head) {
        Ok(parts) => parts,
        Err(e) => return SshOutcome::Refused(e),
    };
    let mut received = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => received += n as u64,
            Err(e) => {
                return SshOutcome::Cut {
                    node,
                    reason: format!("after {received} of {expected} bytes: {e}"),
                };
            }
        }
    }
    if received != expected {
        return SshOutcome::Cut {
            node,
            reason: format!("pack ended after {received} of {expected} bytes"),
        };
    }
    SshOutcome::Complete { node, version }
}

/// `PACK <node> <version> <bytes>` -> its parts; `ERR <reason>` or anything else -> the refusal.
pub fn parse_head(line: &str) -> Result<(String, String, u64), String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if let Some(reason) = line.strip_prefix("ERR ") {
        return Err(format!("refused: {reason}"));
    }
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["PACK", node, version, bytes] => bytes
            .parse()
            .map(|b| (node.to_string(), version.to_string(), b))
            .map_err(|_| format!("bad pack length in {line:?}")),
        _ => Err(format!("unexpected answer {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        assert_eq!(
            parse_head("PACK node1 8.19.3 163840\n"),
            Ok(("node1".into(), "8.19.3".into(), 163_840))
        );
        assert_eq!(
            parse_head("ERR the node is STOPPING\n"),
            Err("refused: the node is STOPPING".into())
        );
        assert!(parse_head("PACK node1 8.19.3 x").is_err());
        assert!(parse_head("SSH-2.0-OpenSSH").is_err());
    }
}

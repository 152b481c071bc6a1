//! A fault-injecting TCP proxy the tests put between the coordinator and an agent or Bitbucket:
//! it forwards bytes until told to cut every connection, swallow them (a hang), or answer HTTP
//! errors, and can be restored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forward everything.
    Pass = 0,
    /// Close every connection, existing and new.
    Cut = 1,
    /// Accept and read, never answer (a hung peer or a black-holed route).
    Hang = 2,
    /// Answer every HTTP request with 500 and close.
    Http500 = 3,
    /// Answer every HTTP request with 409 and close.
    Http409 = 4,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    changed: watch::Sender<u8>,
    pub connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let (changed, _) = watch::channel(Mode::Pass as u8);
        let connections = Arc::new(AtomicU64::new(0));
        let (m, tx, count) = (mode.clone(), changed.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let mode = m.load(Ordering::SeqCst);
                let rx = tx.subscribe();
                tokio::spawn(handle(client, target, mode, rx));
            }
        });
        Ok(Self {
            addr,
            mode,
            changed,
            connections,
            task,
        })
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
        let _ = self.changed.send(mode as u8);
    }

    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::SeqCst) {
            1 => Mode::Cut,
            2 => Mode::Hang,
            3 => Mode::Http500,
            4 => Mode::Http409,
            _ => Mode::Pass,
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    mut client: TcpStream,
    target: SocketAddr,
    mode: u8,
    mut changed: watch::Receiver<u8>,
) {
    match mode {
        m if m == Mode::Cut as u8 => {}
        m if m == Mode::Hang as u8 => {
            let mut buf = [0u8; 4096];
            while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
        }
        m if m == Mode::Http500 as u8 || m == Mode::Http409 as u8 => {
            let mut buf = [0u8; 4096];
            let _ = client.read(&mut buf).await;
            let (code, text) = if m == Mode::Http500 as u8 {
                (500, "Internal Server Error")
            } else {
                (409, "Conflict")
            };
            let body = format!("{{\"errors\":[{{\"message\":\"injected {code}\"}}]}}");
            let resp = format!(
                "HTTP/1.1 {code} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(resp.as_bytes()).await;
        }
        _ => {
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            let (mut cr, mut cw) = client.split();
            let (mut sr, mut sw) = server.split();
            let forward = async {
                tokio::select! {
                    _ = tokio::io::copy(&mut cr, &mut sw) => {}
                    _ = tokio::io::copy(&mut sr, &mut cw) => {}
                }
            };
            // A mode change away from Pass cuts live connections too (a network partition).
            let cut = async {
                loop {
                    if changed.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    if *changed.borrow() != Mode::Pass as u8 {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = forward => {}
                _ = cut => {}
            }
        }
    }
}

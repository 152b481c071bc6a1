//! The agent's front door: accepts TCP connections, gives each TLS handshake a deadline, and keeps
//! the number of open connections under a cap. At the cap, the oldest connection that has not shown
//! an allowed coordinator certificate is closed to make room, so idle or half-open connections of
//! anyone who can reach the port cannot lock the coordinator out.

use crate::tls::{AgentServerConfig, CoordinatorGate};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// How often, at most, the agent logs that it is at its connection cap.
const CAP_WARNING_INTERVAL_SECS: u64 = 60;
/// A pause after a failed accept (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE_MS: u64 = 100;

/// The bounds of [`incoming`].
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: Duration::from_secs(DEFAULT_HANDSHAKE_TIMEOUT_SECS),
        }
    }
}

/// The open connections, oldest first (ids grow).
#[derive(Default)]
struct Registry {
    next_id: u64,
    open: BTreeMap<u64, Slot>,
    last_cap_warning: Option<Instant>,
}

struct Slot {
    /// Showed an allowed coordinator certificate: never closed to make room.
    trusted: bool,
    /// Dropping it tells the connection to close.
    _close: oneshot::Sender<()>,
}

/// Which connection, if any, must close to admit one more: pure, over the open ones' trust flags
/// in age order. `None` with a full registry means: refuse the newcomer.
fn evict_for_room(open: impl IntoIterator<Item = (u64, bool)>, max: usize) -> Eviction {
    let mut count = 0;
    let mut oldest_untrusted = None;
    for (id, trusted) in open {
        count += 1;
        if !trusted && oldest_untrusted.is_none() {
            oldest_untrusted = Some(id);
        }
    }
    if count < max {
        Eviction::NotNeeded
    } else {
        match oldest_untrusted {
            Some(id) => Eviction::Close(id),
            None => Eviction::RefuseNew,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Eviction {
    NotNeeded,
    Close(u64),
    RefuseNew,
}

type Shared = Arc<Mutex<Registry>>;

fn lock(r: &Shared) -> std::sync::MutexGuard<'_, Registry> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes its connection from the registry when the connection ends.
struct Registered {
    id: u64,
    registry: Shared,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.registry).open.remove(&self.id);
    }
}

/// A TLS connection the server may use; reads and writes fail once it was closed to make room.
pub struct Conn {
    inner: TlsStream<TcpStream>,
    close: oneshot::Receiver<()>,
    closed: bool,
    _registered: Registered,
}

impl Conn {
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.closed && Pin::new(&mut self.close).poll(cx).is_ready() {
            self.closed = true;
        }
        self.closed
    }
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed to make room under the agent's connection cap",
    )
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.poll_closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.poll_closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Serves `listener`: the stream of connections whose TLS handshake completed within the limits,
/// for `tonic::transport::Server::serve_with_incoming_shutdown`. Accepting stops when the stream
/// is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<AgentServerConfig>,
    gate: CoordinatorGate,
    limits: AcceptLimits,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(16);
    let registry: Shared = Arc::default();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => break,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await;
                    continue;
                }
            };
            let Some((registered, close)) = admit(&registry, limits.max_connections) else {
                tracing::debug!(%remote, "refused a connection: the cap is full of coordinators");
                continue;
            };
            let (config, gate, tx) = (config.clone(), gate.clone(), tx.clone());
            tokio::spawn(handshake(
                tcp, remote, config, gate, limits, registered, close, tx,
            ));
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Registers a new connection, closing the oldest untrusted one if the cap is reached.
fn admit(registry: &Shared, max: usize) -> Option<(Registered, oneshot::Receiver<()>)> {
    let mut r = lock(registry);
    match evict_for_room(r.open.iter().map(|(id, s)| (*id, s.trusted)), max) {
        Eviction::NotNeeded => {}
        Eviction::Close(id) => {
            r.open.remove(&id);
            let now = Instant::now();
            if r.last_cap_warning.is_none_or(|t| {
                now.duration_since(t) >= Duration::from_secs(CAP_WARNING_INTERVAL_SECS)
            }) {
                r.last_cap_warning = Some(now);
                tracing::warn!(
                    max,
                    "at the connection cap: closing the oldest connections without an allowed coordinator certificate"
                );
            }
        }
        Eviction::RefuseNew => return None,
    }
    let id = r.next_id;
    r.next_id += 1;
    let (tx, rx) = oneshot::channel();
    r.open.insert(
        id,
        Slot {
            trusted: false,
            _close: tx,
        },
    );
    Some((
        Registered {
            id,
            registry: registry.clone(),
        },
        rx,
    ))
}

#[allow(clippy::too_many_arguments)]
async fn handshake(
    tcp: TcpStream,
    remote: std::net::SocketAddr,
    config: Arc<AgentServerConfig>,
    gate: CoordinatorGate,
    limits: AcceptLimits,
    registered: Registered,
    mut close: oneshot::Receiver<()>,
    tx: mpsc::Sender<io::Result<Conn>>,
) {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
    let tls = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)) => match r {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::warn!(%remote, error = %e, "refused a TLS peer: handshake failed");
                return;
            }
            Err(_) => {
                tracing::warn!(%remote, timeout = ?limits.handshake_timeout, "refused a TLS peer: handshake not completed in time");
                return;
            }
        },
        _ = &mut close => {
            tracing::debug!(%remote, "closed a connection still in its handshake to make room");
            return;
        }
    };
    let trusted = gate.admit(tls.get_ref().1.peer_certificates()).is_ok();
    if trusted {
        match lock(&registered.registry).open.get_mut(&registered.id) {
            Some(slot) => slot.trusted = true,
            None => return,
        }
    }
    let conn = Conn {
        inner: tls,
        close,
        closed: false,
        _registered: registered,
    };
    let _ = tx.send(Ok(conn)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_untrusted_connection_makes_room() {
        assert_eq!(evict_for_room([(1, false)], 2), Eviction::NotNeeded);
        assert_eq!(
            evict_for_room([(1, true), (2, false), (3, false)], 3),
            Eviction::Close(2)
        );
        assert_eq!(
            evict_for_room([(1, true), (2, true)], 2),
            Eviction::RefuseNew
        );
        assert_eq!(evict_for_room([], 0), Eviction::RefuseNew);
    }

    #[test]
    fn a_full_registry_closes_its_oldest_untrusted_entry() {
        let registry: Shared = Arc::default();
        let (first, mut first_close) = admit(&registry, 2).unwrap();
        let (second, _c2) = admit(&registry, 2).unwrap();
        lock(&registry).open.get_mut(&second.id).unwrap().trusted = true;
        let (_third, _c3) = admit(&registry, 2).unwrap();
        assert_eq!(
            first_close.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "the oldest untrusted one was told to close"
        );
        assert!(!lock(&registry).open.contains_key(&first.id));
        // Two open: one trusted, the newest untrusted; a fourth evicts the third.
        let (_fourth, _c4) = admit(&registry, 2).unwrap();
        assert_eq!(lock(&registry).open.len(), 2);
        drop(first);
        assert_eq!(lock(&registry).open.len(), 2);
    }
}

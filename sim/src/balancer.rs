//! A small stand-in for HAProxy, for the demo on a machine where HAProxy is not installed (tests
//! always use the real one): in `mode tcp` a TCP forwarder (Git over SSH; checked by a connect),
//! otherwise an HTTP/1.1 reverse proxy, round robin over the servers that are
//! `ready` and pass their health check (`GET /status` every 500 ms, `rise 2 fall 2`), with retries
//! on another server when a connection fails, and the subset of HAProxy's runtime API on a unix
//! socket that bbupgrade's HAProxy driver uses (`show servers state`, `show stat`, `set server ...
//! state ready|drain|maint`). Drain means no new requests at all (there is no cookie persistence).
//!
//! Layout: `pool` (servers, health and the round-robin choice, pure), `runtime_api` (the admin
//! commands, text in and out, pure), `proxy` (forwarding, streaming, session counting); this file
//! starts the listeners and the health checks.

mod pool;
mod proxy;
mod runtime_api;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};

pub use pool::{ADMF_FDRAIN, ADMF_FMAINT};
use pool::{Admin, Server, Thresholds};
use runtime_api::{Command, View};

/// Interval between health checks of a server (`check inter 500ms`).
pub const CHECK_INTERVAL_MS: u64 = 500;
/// Longest a connection to a server may take to open (`timeout connect 2s`).
pub const CONNECT_TIMEOUT_SECS: u64 = 2;
/// Longest a runtime-API client may take to send its command line.
const COMMAND_READ_TIMEOUT_SECS: u64 = 5;
/// Longest command line accepted on the runtime API.
const MAX_COMMAND_BYTES: u64 = 4096;

/// A server of the backend: `node1=127.0.0.1:7991`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    pub name: String,
    pub addr: SocketAddr,
}

impl ServerSpec {
    /// Parses `NAME=IP:PORT` (an IP address, not a host name: the stand-in resolves nothing).
    pub fn parse(spec: &str) -> Result<ServerSpec, BalancerError> {
        let (name, addr) = spec.split_once('=').ok_or_else(|| {
            BalancerError::Config(format!(
                "server {spec:?}: write it as NAME=IP:PORT, e.g. node1=127.0.0.1:7991"
            ))
        })?;
        check_name("server", name)?;
        let addr = addr.parse().map_err(|_| {
            BalancerError::Config(format!(
                "server {spec:?}: {addr:?} is not IP:PORT (host names are not resolved)"
            ))
        })?;
        Ok(ServerSpec {
            name: name.to_string(),
            addr,
        })
    }
}

/// What the balancer forwards (HAProxy's `mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// HTTP/1.1 requests, checked with `GET /status`.
    #[default]
    Http,
    /// TCP connections (Git over SSH), bytes both ways, checked with a connect.
    Tcp,
}

/// What balancer to run.
#[derive(Debug, Clone)]
pub struct BalancerOptions {
    pub mode: Mode,
    /// Where clients connect; port 0 picks a free one (see `BalancerHandle::addr`).
    pub listen: SocketAddr,
    /// The runtime-API unix socket; a stale socket file there is replaced.
    pub socket: PathBuf,
    /// The backend's name in runtime-API commands (the frontend carries the same name, as in the
    /// sandbox's haproxy.cfg).
    pub backend: String,
    pub servers: Vec<ServerSpec>,
    pub check_interval: Duration,
    pub rise: u32,
    pub fall: u32,
    pub connect_timeout: Duration,
    /// Further servers tried when a connection fails (`retries`).
    pub retries: u32,
}

impl BalancerOptions {
    /// The sandbox's HAProxy settings: `check inter 500ms fall 2 rise 2`, `retries 3`.
    pub fn new(
        listen: SocketAddr,
        socket: PathBuf,
        backend: &str,
        servers: Vec<ServerSpec>,
    ) -> Self {
        BalancerOptions {
            mode: Mode::Http,
            listen,
            socket,
            backend: backend.to_string(),
            servers,
            check_interval: Duration::from_millis(CHECK_INTERVAL_MS),
            rise: 2,
            fall: 2,
            connect_timeout: Duration::from_secs(CONNECT_TIMEOUT_SECS),
            retries: 3,
        }
    }

    fn validate(&self) -> Result<(), BalancerError> {
        check_name("backend", &self.backend)?;
        if self.servers.is_empty() {
            return Err(BalancerError::Config(
                "no servers: give at least one --server NAME=IP:PORT".into(),
            ));
        }
        for (i, s) in self.servers.iter().enumerate() {
            check_name("server", &s.name)?;
            if self.servers[..i].iter().any(|o| o.name == s.name) {
                return Err(BalancerError::Config(format!(
                    "server name {:?} is given twice; each server needs its own name",
                    s.name
                )));
            }
        }
        if self.rise == 0 || self.fall == 0 {
            return Err(BalancerError::Config(
                "rise and fall must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Why the balancer did not start.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("balancer configuration: {0}")]
    Config(String),
    #[error("balancer: cannot listen on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Names go into runtime-API commands: no spaces, '/' or control characters.
fn check_name(kind: &str, name: &str) -> Result<(), BalancerError> {
    if name.is_empty()
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == ';' || c == ',')
    {
        return Err(BalancerError::Config(format!(
            "{kind} name {name:?} must be non-empty, without spaces, '/', ';' or ','"
        )));
    }
    Ok(())
}

/// What the listeners and health checks share.
struct Shared {
    opts: BalancerOptions,
    servers: Mutex<Vec<Server>>,
    /// Round-robin position.
    cursor: AtomicUsize,
    /// Per server: wakes its health check at once (leaving maintenance).
    wake: Vec<Notify>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<Server>> {
        // The data stays consistent between statements, so a panic elsewhere does not spoil it.
        self.servers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn thresholds(&self) -> Thresholds {
        Thresholds {
            rise: self.opts.rise,
            fall: self.opts.fall,
        }
    }

    /// Answers one runtime-API command line.
    fn command(&self, line: &str) -> String {
        let now = Instant::now();
        let backend = self.opts.backend.as_str();
        match runtime_api::parse_command(line) {
            Command::SetState {
                backend: b,
                server,
                admin,
            } => {
                let mut servers = self.lock();
                let answer = runtime_api::set_state(backend, &mut servers, &b, &server, admin, now);
                let changed = answer.trim().is_empty();
                if let Some(i) = servers.iter().position(|s| changed && s.name == server) {
                    tracing::info!("balancer: {backend}/{server} is now {admin:?}");
                    if admin != Admin::Maint {
                        self.wake[i].notify_one();
                    }
                }
                answer
            }
            Command::ShowServersState { backend: b } => {
                let servers = self.lock();
                runtime_api::show_servers_state(&self.view(&servers, now), b.as_deref())
            }
            Command::ShowStat { proxy, types } => {
                let servers = self.lock();
                runtime_api::show_stat(&self.view(&servers, now), proxy.as_deref(), types)
            }
            Command::Invalid(answer) => answer,
        }
    }

    fn view<'a>(&'a self, servers: &'a [Server], now: Instant) -> View<'a> {
        View {
            frontend: &self.opts.backend,
            backend: &self.opts.backend,
            servers,
            thresholds: self.thresholds(),
            now,
        }
    }
}

/// A running balancer; `shutdown` (or drop) stops it and removes its socket file.
pub struct BalancerHandle {
    addr: SocketAddr,
    socket: PathBuf,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl BalancerHandle {
    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The runtime-API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops listening, cuts open connections, stops the health checks.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for BalancerHandle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if !self.tasks.is_empty() {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// Starts the balancer on the current tokio runtime.
pub async fn start(opts: BalancerOptions) -> Result<BalancerHandle, BalancerError> {
    opts.validate()?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| BalancerError::Listen {
            what: opts.listen.to_string(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| BalancerError::Listen {
            what: opts.listen.to_string(),
            source,
        })?;
    let admin = bind_socket(&opts.socket)?;
    let now = Instant::now();
    let thresholds = Thresholds {
        rise: opts.rise,
        fall: opts.fall,
    };
    let servers = opts
        .servers
        .iter()
        .map(|s| Server::new(s.name.clone(), s.addr, thresholds, now))
        .collect();
    let shared = Arc::new(Shared {
        wake: opts.servers.iter().map(|_| Notify::new()).collect(),
        servers: Mutex::new(servers),
        cursor: AtomicUsize::new(0),
        opts,
    });
    let (stop, stop_rx) = watch::channel(false);
    let serve = match shared.opts.mode {
        Mode::Http => tokio::spawn(serve_http(listener, Arc::clone(&shared), stop_rx.clone())),
        Mode::Tcp => tokio::spawn(serve_tcp(listener, Arc::clone(&shared), stop_rx.clone())),
    };
    let mut tasks = vec![
        serve,
        tokio::spawn(serve_admin(admin, Arc::clone(&shared), stop_rx.clone())),
    ];
    for index in 0..shared.opts.servers.len() {
        tasks.push(tokio::spawn(health_checks(
            Arc::clone(&shared),
            index,
            stop_rx.clone(),
        )));
    }
    Ok(BalancerHandle {
        addr,
        socket: shared.opts.socket.clone(),
        stop,
        tasks,
    })
}

/// Binds the runtime-API socket, replacing a stale socket file (never any other kind of file).
fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, BalancerError> {
    use std::os::unix::fs::FileTypeExt;
    let listen_error = |source| BalancerError::Listen {
        what: format!("the runtime-API socket {}", path.display()),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BalancerError::Config(format!(
                "{} exists and is not a socket; give --socket a free path",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(listen_error)?;
    }
    tokio::net::UnixListener::bind(path).map_err(listen_error)
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    // Dropping the set at the end cuts every open connection.
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut stop) => return,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("balancer: accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let service = service_fn(move |req| proxy::serve(Arc::clone(&shared), req));
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("balancer: connection from {peer}: {e}");
            }
        });
    }
}

async fn serve_tcp(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    // Dropping the set at the end cuts every open session.
    let mut sessions = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = stopped(&mut stop) => return,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("balancer: accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        sessions.spawn(proxy::serve_tcp(Arc::clone(&shared), stream));
    }
}

/// The runtime API: one command line per connection, answered, then closed.
async fn serve_admin(
    listener: tokio::net::UnixListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("balancer: accepting on the runtime-API socket failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read.take(MAX_COMMAND_BYTES));
            let read = tokio::time::timeout(
                Duration::from_secs(COMMAND_READ_TIMEOUT_SECS),
                reader.read_line(&mut line),
            )
            .await;
            if !matches!(read, Ok(Ok(_))) {
                return;
            }
            let answer = shared.command(&line);
            let _ = write.write_all(answer.as_bytes()).await;
            let _ = write.shutdown().await;
        });
    }
}

/// Checks one server every interval, except in maintenance.
async fn health_checks(shared: Arc<Shared>, index: usize, mut stop: watch::Receiver<bool>) {
    loop {
        let (addr, epoch, admin) = {
            let servers = shared.lock();
            let s = &servers[index];
            (s.addr, s.epoch, s.admin)
        };
        if admin != Admin::Maint {
            let timeout = shared.opts.check_interval.max(Duration::from_millis(200)) * 2;
            let result = match shared.opts.mode {
                Mode::Http => proxy::check(addr, timeout).await,
                Mode::Tcp => proxy::check_tcp(addr, timeout).await,
            };
            let mut servers = shared.lock();
            let s = &mut servers[index];
            if s.check_result(epoch, result.clone(), shared.thresholds(), Instant::now()) {
                let state = if s.health.is_up() { "UP" } else { "DOWN" };
                tracing::info!(
                    "balancer: {}/{} is {state} (check: {result:?})",
                    shared.opts.backend,
                    s.name
                );
            }
        }
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = shared.wake[index].notified() => {}
            _ = tokio::time::sleep(shared.opts.check_interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_specs() {
        let s = ServerSpec::parse("node1=127.0.0.1:7991").unwrap();
        assert_eq!(s.name, "node1");
        assert_eq!(s.addr.port(), 7991);
        assert!(ServerSpec::parse("node1").is_err());
        assert!(ServerSpec::parse("node1=localhost:7991").is_err());
        assert!(ServerSpec::parse("no de=127.0.0.1:1").is_err());
        assert!(ServerSpec::parse("a/b=127.0.0.1:1").is_err());
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let twice = vec![s.clone(), s];
        let opts = BalancerOptions::new(addr, "/tmp/x.sock".into(), "bitbucket", twice);
        assert!(opts.validate().unwrap_err().to_string().contains("twice"));
        let none = BalancerOptions::new(addr, "/tmp/x.sock".into(), "bitbucket", vec![]);
        assert!(none.validate().is_err());
    }

    /// `mode tcp`: bytes go through to a server that passes its connect check; a server in
    /// maintenance gets no new session.
    #[tokio::test]
    async fn tcp_mode_forwards_sessions_and_honours_maint() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut line = [0u8; 5];
                    if s.read_exact(&mut line).await.is_ok() {
                        let _ = s.write_all(b"pack done").await;
                    }
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("ssh.sock");
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let spec = ServerSpec::parse(&format!("node1={server_addr}")).unwrap();
        let mut opts = BalancerOptions::new(listen, socket, "bitbucket_ssh", vec![spec]);
        opts.mode = Mode::Tcp;
        opts.check_interval = Duration::from_millis(50);
        let lb = start(opts).await.unwrap();
        let clone = async || {
            let mut c = tokio::net::TcpStream::connect(lb.addr()).await.unwrap();
            c.write_all(b"clone").await.unwrap();
            let mut answer = String::new();
            let _ = c.read_to_string(&mut answer).await;
            answer
        };
        let started = Instant::now();
        while clone().await != "pack done" {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "node1 never came up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut admin = tokio::net::UnixStream::connect(lb.socket()).await.unwrap();
        admin
            .write_all(b"set server bitbucket_ssh/node1 state maint\n")
            .await
            .unwrap();
        let mut answer = String::new();
        admin.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer.trim(), "", "{answer}");
        assert_eq!(clone().await, "", "a server in maint got a session");
        lb.shutdown().await;
    }
}

//! The HTTP side: forwards each request to a server picked round robin, streams both bodies,
//! retries another server when a connection fails (`retries 3` + `option redispatch`), and counts
//! the request as a session of its server until the response body is done.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::Shared;
use super::pool;

/// Request bodies up to this size are read before forwarding, so the request can be sent again
/// to another server when the first one fails or answers 503 (HAProxy's L7 retries buffer too).
const MAX_BUFFERED_BODY_BYTES: u64 = 64 * 1024;
/// Longest wait for a server's response headers (HAProxy's `timeout server` of the sandbox).
const SERVER_TIMEOUT_SECS: u64 = 120;
/// Headers of one hop, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A body going through the balancer: a small buffered one, or a stream from the other side.
/// While a response body lives, its server's session count includes it.
pub struct ProxyBody {
    kind: Kind,
    session: Option<Session>,
}

enum Kind {
    Full(Option<Bytes>),
    Stream(Incoming),
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody {
            kind: Kind::Full(Some(bytes).filter(|b| !b.is_empty())),
            session: None,
        }
    }

    fn stream(body: Incoming, session: Option<Session>) -> ProxyBody {
        ProxyBody {
            kind: Kind::Stream(body),
            session,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(body) => Pin::new(body).poll_frame(cx),
        };
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // The exchange is over for the server as soon as its body is, whatever the client does.
            this.session = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(body) => body.size_hint(),
        }
    }
}

/// A request assigned to a server: counted in its `scur` until dropped.
struct Session {
    shared: Arc<Shared>,
    index: usize,
    /// Keeps the one-request connection open until the response is read.
    _sender: Option<SendRequest<ProxyBody>>,
}

impl Session {
    /// Picks a server for a request and counts it there, in one step so a drain cannot miss it.
    fn assign(shared: &Arc<Shared>, tried: &[usize]) -> Option<(Session, SocketAddr)> {
        let cursor = shared.cursor.fetch_add(1, Ordering::Relaxed);
        let mut servers = shared.lock();
        let index = pool::pick(&servers, cursor, tried)?;
        let s = &mut servers[index];
        s.sessions += 1;
        s.max_sessions = s.max_sessions.max(s.sessions);
        s.total_sessions += 1;
        if !tried.is_empty() {
            s.retries += 1;
            if !tried.contains(&index) {
                s.redispatches += 1;
            }
        }
        let addr = s.addr;
        Some((
            Session {
                shared: Arc::clone(shared),
                index,
                _sender: None,
            },
            addr,
        ))
    }

    fn connect_failed(&self) {
        self.shared.lock()[self.index].connect_errors += 1;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut servers = self.shared.lock();
        let s = &mut servers[self.index];
        s.sessions = s.sessions.saturating_sub(1);
    }
}

/// Opens a one-request HTTP/1.1 connection to `addr`.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<SendRequest<ProxyBody>> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("connection to {addr}: {e}");
        }
    });
    Ok(sender)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
}

fn error_response(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from(format!(
        "<html><body><h1>{} {}</h1>\n{text}\n</body></html>\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    ))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Reads a whole (small) body.
async fn collect(mut body: Incoming) -> Result<Bytes, hyper::Error> {
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(data) = frame?.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(out))
}

/// The request body: read (resendable) or still to stream (sent once).
enum Outgoing {
    Buffered(Bytes),
    Stream(Option<Incoming>),
}

/// Serves one client request.
pub async fn serve(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let small = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len <= MAX_BUFFERED_BODY_BYTES);
    let mut outgoing = if small || body.is_end_stream() {
        match collect(body).await {
            Ok(bytes) => Outgoing::Buffered(bytes),
            Err(e) => {
                return Ok(error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("Reading the request body failed: {e}"),
                ));
            }
        }
    } else {
        Outgoing::Stream(Some(body))
    };
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());

    let attempts = shared.opts.retries + 1;
    let mut tried: Vec<usize> = Vec::new();
    let mut last_failure = "No server is available to handle this request.".to_string();
    for attempt in 1..=attempts {
        let Some((mut session, addr)) = Session::assign(&shared, &tried) else {
            break;
        };
        tried.push(session.index);
        let mut sender = match connect(addr, shared.opts.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                session.connect_failed();
                last_failure = format!("Connecting to a server failed: {e}");
                continue;
            }
        };
        let body = match &mut outgoing {
            Outgoing::Buffered(bytes) => ProxyBody::full(bytes.clone()),
            Outgoing::Stream(body) => match body.take() {
                Some(b) => ProxyBody::stream(b, None),
                None => break,
            },
        };
        let resendable = matches!(outgoing, Outgoing::Buffered(_)) && attempt < attempts;
        let mut upstream = Request::new(body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.headers_mut() = headers.clone();
        match target.parse() {
            Ok(uri) => *upstream.uri_mut() = uri,
            Err(_) => {
                return Ok(error_response(
                    StatusCode::BAD_REQUEST,
                    "Bad request target.",
                ));
            }
        }
        let sent = tokio::time::timeout(
            Duration::from_secs(SERVER_TIMEOUT_SECS),
            sender.send_request(upstream),
        )
        .await;
        match sent {
            Ok(Ok(response))
                if response.status() == StatusCode::SERVICE_UNAVAILABLE && resendable =>
            {
                // `retry-on 503`: a node that began stopping refuses new requests; try another.
                last_failure = "A server answered 503.".into();
            }
            Ok(Ok(response)) => {
                let (mut head, body) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                session._sender = Some(sender);
                return Ok(Response::from_parts(
                    head,
                    ProxyBody::stream(body, Some(session)),
                ));
            }
            Ok(Err(e)) if resendable => last_failure = format!("The server closed: {e}"),
            Ok(Err(e)) => {
                return Ok(error_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("The server's response failed: {e}"),
                ));
            }
            Err(_) => {
                return Ok(error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "The server did not answer in time.",
                ));
            }
        }
    }
    tracing::debug!("no server for {} {target}: {last_failure}", parts.method);
    Ok(error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &last_failure,
    ))
}

/// `mode tcp`: forwards one client connection's bytes both ways to a server picked round robin
/// (another one when a connect fails), counted as a session of its server until either side
/// closes. A connection no server takes is closed at once.
pub async fn serve_tcp(shared: Arc<Shared>, mut client: tokio::net::TcpStream) {
    let mut tried = Vec::new();
    let (session, mut server) = loop {
        let Some((session, addr)) = Session::assign(&shared, &tried) else {
            return;
        };
        let timeout = shared.opts.connect_timeout;
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(server)) => break (session, server),
            _ => {
                session.connect_failed();
                tried.push(session.index);
                if tried.len() > shared.opts.retries as usize {
                    return;
                }
            }
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        tracing::debug!(
            "balancer: a TCP session through server {}: {e}",
            session.index
        );
    }
    drop(session);
}

/// `mode tcp`'s health check: a TCP connect.
pub async fn check_tcp(addr: SocketAddr, timeout: Duration) -> pool::LastCheck {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => pool::LastCheck::Connected,
        _ => pool::LastCheck::NoAnswer,
    }
}

/// One health check: `GET /status`, passed on 200 (`option httpchk` + `http-check expect status 200`).
pub async fn check(addr: SocketAddr, timeout: Duration) -> pool::LastCheck {
    let probe = async {
        let mut sender = connect(addr, timeout).await.ok()?;
        let mut request = Request::new(ProxyBody::full(Bytes::new()));
        *request.uri_mut() = hyper::Uri::from_static("/status");
        let host = HeaderValue::from_str(&addr.to_string()).ok()?;
        request.headers_mut().insert(header::HOST, host);
        let response = sender.send_request(request).await.ok()?;
        Some(response.status().as_u16())
    };
    let started = Instant::now();
    let answer = tokio::time::timeout(timeout, probe).await.ok().flatten();
    tracing::trace!("check of {addr}: {answer:?} in {:?}", started.elapsed());
    answer.map_or(pool::LastCheck::NoAnswer, pool::LastCheck::Status)
}

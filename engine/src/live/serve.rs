//! The two HTTP listeners' connection handling: TLS (rustls, certificates reloaded when
//! their files change), a cap on open connections, and the timeouts that drop slow and
//! half-open clients. Routing and credentials are `http`'s; this module only decides which
//! connections get to talk to the router and for how long.
//!
//! Why our own accept loop instead of `axum::serve`: it has no TLS, no connection cap and
//! no idle timeout. The loop is hyper's connection builder (http1 with
//! `header_read_timeout`, which also bounds a keep-alive connection's wait for its next
//! request's headers), tokio-rustls for TLS, and hyper-util's graceful shutdown, the same
//! parts `axum::serve` is made of.
//!
//! - **Connections**: at most `http.max_connections` per listener. The accept loop waits
//!   for a free slot before accepting, so excess clients wait in the kernel's backlog
//!   instead of being accepted and starved. One client address may hold at most
//!   `http.max_connections_per_ip` of them; past that its new connections are closed at
//!   once, so one client cannot take every slot.
//! - **Handshake and headers**: a TLS handshake must finish, and each request's headers
//!   arrive, within `http.header_timeout`. hyper's header timer also runs while a
//!   keep-alive connection waits for its next request, so an idle keep-alive connection
//!   is closed after `header_timeout` too (counted as `keepalive_timeout`).
//! - **Idle**: a connection with no bytes read or written for `http.idle_timeout`, and
//!   no request being answered, is closed: a half-open TCP connection never sends a FIN,
//!   and one stalled in the middle of a body or a response is not under the header
//!   timer.
//! - **Shutdown**: the listener stops accepting, open requests are answered and
//!   keep-alive connections closed (hyper-util's graceful shutdown); after `drain`, what
//!   is still open is aborted.
//! - The body's own deadline (`http.body_timeout`) is applied where the body is read
//!   (`http::read_body`), after the credential is checked.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::config::Timeouts;
use crate::EngineError;

/// One listener: its socket, its TLS (if any), its limits.
pub(super) struct Listener {
    /// The bound socket.
    pub socket: TcpListener,
    /// `Some` for HTTPS.
    pub tls: Option<Arc<Reloading>>,
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one client address at most.
    pub max_per_ip: usize,
    /// Handshake, headers and idle deadlines.
    pub timeouts: Timeouts,
    /// Counts connections closed for idling or slowness (the metric).
    pub on_dropped: Arc<dyn Fn(&'static str) + Send + Sync>,
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open requests finish
/// (at most `drain`).
pub(super) async fn serve(
    listener: Listener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(listener.max_connections));
    let per_ip: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let (abort_tx, abort_rx) = tokio::sync::watch::channel(false);
    let acceptor = listener
        .tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(Arc::clone(&t.config)));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            s = Arc::clone(&slots).acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.socket.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!("HTTP accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(held) = PerIp::take(&per_ip, peer.ip(), listener.max_per_ip) else {
            (listener.on_dropped)("too_many_from_client");
            drop(tcp);
            continue;
        };
        let mut abort = abort_rx.clone();
        let _ = tcp.set_nodelay(true);
        let timeouts = listener.timeouts;
        let router = router.clone();
        let acceptor = acceptor.clone();
        let dropped = Arc::clone(&listener.on_dropped);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _held = (slot, held);
            let activity = Arc::new(Activity::new());
            let io = Watched {
                inner: tcp,
                activity: Arc::clone(&activity),
            };
            let work = async move {
                match acceptor {
                    None => connection(io, router, timeouts, activity, dropped, watcher).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(timeouts.header, acceptor.accept(io)).await {
                            Ok(Ok(tls)) => {
                                connection(tls, router, timeouts, activity, dropped, watcher).await
                            }
                            Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                            Err(_) => dropped("handshake_timeout"),
                        }
                    }
                }
            };
            // After the drain at shutdown, whatever is still open is dropped.
            tokio::select! {
                _ = work => {}
                _ = abort.wait_for(|a| *a) => {}
            }
        });
    }
    drop(listener.socket);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP: requests still open after {drain:?} at shutdown; closing them");
        let _ = abort_tx.send(true);
    }
}

/// One connection: HTTP/1.1 with keep-alive, closed when idle.
async fn connection<I>(
    io: I,
    router: Router,
    timeouts: Timeouts,
    activity: Arc<Activity>,
    dropped: Arc<dyn Fn(&'static str) + Send + Sync>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let busy = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let router = router.clone();
        let busy = Arc::clone(&busy);
        async move {
            let _answering = busy.answering();
            router.oneshot(req.map(axum::body::Body::new)).await
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header)
        .keep_alive(true);
    let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), service));
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                if e.is_timeout() {
                    // Waiting for a next request that never began, or a slow one.
                    dropped(if activity.between_requests() {
                        "keepalive_timeout"
                    } else {
                        "header_timeout"
                    });
                } else {
                    tracing::debug!("HTTP connection: {e}");
                }
            }
        }
        _ = activity.idle(timeouts.idle) => dropped("idle_timeout"),
    }
}

/// When a connection last moved bytes, and how many of its requests are being answered.
struct Activity {
    started: Instant,
    last_ms: AtomicU64,
    /// When bytes last arrived (ms since `started`, +1; 0: never).
    last_read_ms: AtomicU64,
    /// When the last answer was done (ms since `started`, +1; 0: none yet).
    answered_ms: AtomicU64,
    answering: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            last_read_ms: AtomicU64::new(0),
            answered_ms: AtomicU64::new(0),
            answering: AtomicUsize::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn read(&self) {
        let ms = self.now_ms();
        self.last_ms.store(ms, Ordering::Relaxed);
        self.last_read_ms.store(ms + 1, Ordering::Relaxed);
    }

    /// A request was answered and nothing of another has arrived since.
    fn between_requests(&self) -> bool {
        let answered = self.answered_ms.load(Ordering::Relaxed);
        answered > 0 && self.last_read_ms.load(Ordering::Relaxed) <= answered
    }

    fn answering(self: &Arc<Self>) -> Answering {
        self.answering.fetch_add(1, Ordering::AcqRel);
        Answering(Arc::clone(self))
    }

    /// Resolves once the connection has been idle for `limit`: no bytes moved and no
    /// request being answered.
    async fn idle(&self, limit: Duration) {
        let limit_ms = limit.as_millis() as u64;
        loop {
            let since = (self.started.elapsed().as_millis() as u64)
                .saturating_sub(self.last_ms.load(Ordering::Relaxed));
            if self.answering.load(Ordering::Acquire) > 0 {
                // Handlers wait on fsyncs and broker acks, not on the client.
                self.touch();
                tokio::time::sleep(limit.min(Duration::from_secs(1))).await;
            } else if since >= limit_ms {
                return;
            } else {
                tokio::time::sleep(Duration::from_millis(limit_ms - since)).await;
            }
        }
    }
}

/// A request being answered (while alive).
struct Answering(Arc<Activity>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.touch();
        let ms = self.0.now_ms() + 1;
        self.0.answered_ms.store(ms, Ordering::Relaxed);
        self.0.answering.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket that notes when bytes move.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A certificate and key read from PEM files, read again when either file changes.
#[derive(Debug)]
pub(super) struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<Current>,
    config: Arc<rustls::ServerConfig>,
}

/// The pair being served, and the files' modification time it was read at.
#[derive(Debug)]
struct Current(RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>);

impl Reloading {
    /// Reads the pair now; a bad pair is a configuration error (`table.tls_cert`).
    pub fn load(table: &str, cert: &str, key: &str) -> Result<Arc<Reloading>, EngineError> {
        let (cert, key) = (PathBuf::from(cert), PathBuf::from(key));
        let certified = read_pair(&cert, &key)
            .map_err(|e| EngineError::Usage(format!("config: `{table}.tls_cert`: {e}")))?;
        let stamp = modified(&cert, &key);
        let current = Arc::new(Current(RwLock::new((Arc::new(certified), stamp))));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| EngineError::Dataflow(format!("TLS setup: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Reloading {
            cert,
            key,
            current,
            config: Arc::new(config),
        }))
    }

    /// Reads the files again if either changed since the last read; keeps the old pair
    /// (and says why) when the new one does not load, e.g. half-written.
    pub fn refresh(&self) -> bool {
        let stamp = modified(&self.cert, &self.key);
        let known = self.current.0.read().map(|c| c.1).unwrap_or(None);
        if stamp == known {
            return false;
        }
        match read_pair(&self.cert, &self.key) {
            Ok(certified) => {
                if let Ok(mut c) = self.current.0.write() {
                    *c = (Arc::new(certified), stamp);
                }
                tracing::info!("TLS: loaded the new certificate {}", self.cert.display());
                true
            }
            Err(e) => {
                tracing::warn!("TLS: keeping the current certificate: {e}");
                false
            }
        }
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|c| Arc::clone(&c.0))
    }
}

/// The later of the two files' modification times.
fn modified(cert: &PathBuf, key: &PathBuf) -> Option<SystemTime> {
    let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    m(cert).max(m(key))
}

fn read_pair(cert: &PathBuf, key: &PathBuf) -> Result<CertifiedKey, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("{}: unusable private key: {e}", key.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified
        .keys_match()
        .map_err(|e| format!("{} does not match {}: {e}", key.display(), cert.display()))?;
    Ok(certified)
}

/// One client address's share of a listener's connections (released when dropped).
struct PerIp {
    map: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PerIp {
    fn take(
        map: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
        ip: IpAddr,
        limit: usize,
    ) -> Option<PerIp> {
        let mut m = map.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(PerIp {
            map: Arc::clone(map),
            ip,
        })
    }
}

impl Drop for PerIp {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

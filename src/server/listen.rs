//! Accepting connections: TCP (optionally TLS), HTTP/1.1 and HTTP/2 with
//! upgrades, a deadline for request headers, and graceful shutdown.
//!
//! `axum::serve` runs hyper without a timer, so hyper's header deadline never
//! fires there and a client dribbling its headers holds a connection forever.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

mod sendfile_conn;

use super::direct_read::DirectReads;

/// Bytes of response body hyper may queue per HTTP/1 connection before it
/// waits for the socket (its default is about 400 KiB). A file body arrives
/// in 192 KiB reads that are usually ready at once, so the default let every
/// slow download hold two or three of them: 200 concurrent streams peaked
/// near 125 MiB, against about 60 MiB with this bound. Also the largest
/// request head accepted (431 beyond it).
const HTTP1_MAX_BUF: usize = 64 * 1024;

/// How connections are accepted.
#[derive(Clone)]
pub struct Listening {
    /// Time a client has to send a request's headers (from the connection
    /// start, or from the end of the previous request on a kept-alive one).
    pub header_timeout: Duration,
    pub tls: Option<TlsAcceptor>,
    /// How long a shutdown waits for the requests in flight before it cuts
    /// them.
    pub shutdown_grace: Duration,
}

impl std::fmt::Debug for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listening")
            .field("header_timeout", &self.header_timeout)
            .field("tls", &self.tls.is_some())
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

impl Default for Listening {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(30),
            tls: None,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for the
/// requests in flight, up to `listening.shutdown_grace`. Plain HTTP/1.1 file reads skip `app` for `direct`
/// when there is one.
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    direct: Option<DirectReads>,
    listening: Listening,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(listening.header_timeout)
        .max_buf_size(HTTP1_MAX_BUF);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    let builder = Arc::new(builder);
    let (stopping_tx, stopping) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small control messages (WebSocket acks, progress) must not wait for
        // Nagle's algorithm.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY failed");
        }
        let plain = sendfile_conn::Connection {
            app: app.clone(),
            direct: direct.clone(),
            peer,
            header_timeout: listening.header_timeout,
            stopping: stopping.clone(),
        };
        let app = app.clone();
        let service = TowerToHyperService::new(app.map_request(move |req: Request<Incoming>| {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            req
        }));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = listening.tls.clone();
        let handshake_deadline = listening.header_timeout;
        tokio::spawn(async move {
            match tls {
                // The watcher is held meanwhile: shutdown waits for this
                // connection either way.
                None => match plain.drive(tcp).await {
                    sendfile_conn::Outcome::HandOver(rest) => {
                        serve_connection(&builder, watcher, rest, service).await
                    }
                    sendfile_conn::Outcome::Closed => {}
                },
                Some(acceptor) => {
                    let accepted =
                        tokio::time::timeout(handshake_deadline, acceptor.accept(tcp)).await;
                    match accepted {
                        Ok(Ok(stream)) => {
                            serve_connection(&builder, watcher, stream, service).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    // Requests in flight get a while to finish; a long download or upload
    // is then cut (its client resumes it from where it stopped, and a
    // commit already started is recognised by the next server).
    let grace = listening.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!(
            ?grace,
            "stopping with requests still in flight: their clients resume them"
        );
    }
    Ok(())
}

async fn serve_connection<I, S>(
    builder: &Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: I,
    service: S,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = axum::response::Response>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

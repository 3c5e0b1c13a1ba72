//! Accepting connections with the limits a public server needs: at most `max_connections`
//! open at once (one more is answered 503 and closed at once, not left waiting in the
//! kernel's queue), and a client must send a request's headers within `header_timeout`
//! (a connection that stalls half-way through is closed, so stalled clients cannot hold
//! every slot). In-flight requests finish on shutdown.

use super::ApiError;
use anyhow::{bail, Result};
use axum::http::StatusCode;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connections open at once when `--max-connections` is not given (fewer when the
/// open-file limit does not allow so many).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Time a client has to send a request's headers (hyper's default).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections over the limit answered with a 503 at once; more are closed unanswered.
const MAX_REFUSALS: usize = 32;

/// Files kept for everything but connections: model files, logs, the runtime's own.
const FILES_BESIDES_CONNECTIONS: u64 = 64;

/// The connection limit: `asked` (`--max-connections`), or the default, checked against
/// the open-file limit, which is first raised as far as the system allows (as SGLang does).
pub fn connection_limit(asked: Option<usize>) -> Result<usize> {
    let files = raise_open_file_limit();
    let room = files.saturating_sub(FILES_BESIDES_CONNECTIONS) as usize;
    match asked {
        Some(0) => bail!("--max-connections must be at least 1"),
        Some(n) if n > room => bail!(
            "--max-connections {n} needs more open files than this process may have ({files}, \
             {FILES_BESIDES_CONNECTIONS} kept for the server itself); raise `ulimit -n` or ask \
             for at most {room}"
        ),
        Some(n) => Ok(n),
        None if room == 0 => {
            bail!("the open-file limit ({files}) leaves no room for connections; raise `ulimit -n`")
        }
        None => Ok(DEFAULT_MAX_CONNECTIONS.min(room)),
    }
}

/// Raises the soft open-file limit to the hard one; returns the soft limit after.
fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return u64::MAX;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; failure leaves the limit as it was.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    limit.rlim_cur
}

/// What a client may hold of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for the open
/// connections' requests to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let Limits {
        max_connections,
        header_timeout,
    } = limits;
    let slots = Arc::new(Semaphore::new(max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: wait a little rather than spin.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // A flood past the limit is not answered one by one: beyond a few refusals
            // at a time, the connection is simply closed.
            if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, max_connections).await;
                    drop(refusing);
                });
            }
            continue;
        };
        // Streamed tokens go out as soon as they are written.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Answers a connection over the limit with a 503 that says so, and closes it (after
/// reading what the client sent, so that closing does not reset the connection before
/// the client reads the answer).
async fn refuse(mut stream: TcpStream, max_connections: usize) {
    let body = ApiError::with_status(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the server has its maximum of {max_connections} connections open \
             (--max-connections); retry later"
        ),
    )
    .body()
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sent = [0u8; 4096];
        while stream.read(&mut sent).await? > 0 {}
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), answer).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::AsyncReadExt;

    async fn answer(stream: &mut TcpStream) -> String {
        let mut all = Vec::new();
        let read = stream.read_to_end(&mut all);
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the server answers and closes within 5 s")
            .unwrap();
        String::from_utf8_lossy(&all).into_owned()
    }

    async fn get_health(address: std::net::SocketAddr) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let request = b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
        stream.write_all(request).await.unwrap();
        answer(&mut stream).await
    }

    /// With one connection allowed: a second is answered 503 naming the flag; a client
    /// that stalls half-way through its headers, or sends nothing, is closed after the
    /// header timeout, and its slot serves the next client.
    #[tokio::test]
    async fn the_connection_limit_and_the_header_timeout_hold() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = Router::new().route("/health", get(|| async { "ok" }));
        let limits = Limits {
            max_connections: 1,
            header_timeout: Duration::from_millis(300),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, limits, async {
            let _ = stopped.await;
        }));

        let mut stalled = TcpStream::connect(address).await.unwrap();
        stalled.write_all(b"GET /health HT").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = get_health(address).await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.contains("--max-connections"), "{refused}");

        let started = std::time::Instant::now();
        let closed = answer(&mut stalled).await;
        assert!(!closed.contains("200 OK"), "{closed}");
        assert!(started.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let served = get_health(address).await;
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
        assert!(served.ends_with("ok"), "{served}");
        // A client that connects and sends nothing is closed too.
        let mut idle = TcpStream::connect(address).await.unwrap();
        assert_eq!(answer(&mut idle).await, "");

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops")
            .unwrap();
    }
}

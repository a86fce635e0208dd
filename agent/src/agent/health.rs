//! The agent's HTTP endpoint for probes and scrapers (`healthAddress`):
//!
//! * `/healthz`: 200 while the process serves requests (liveness);
//! * `/readyz`: 200 once start-up finished (mesh device up, strict mode
//!   installed, control socket open) and the datastore has synced at least
//!   once, else 503 saying which of the two is missing (readiness);
//! * `/metrics`: Prometheus metrics (OpenMetrics text, `metrics.rs`):
//!   readiness, and once start-up is done the mesh, DNS proxy, policy and
//!   flow-event counters.
//!
//! It listens from the very start of `meshward agent`, so a liveness probe
//! passes while start-up waits (e.g. for the own Node's pod CIDR) and
//! readiness tells the two apart. What to answer is decided by [`respond`],
//! a pure function; the server around it is a thin hyper shell.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::metrics::{self, Sources};
use crate::datastore::Cluster;

/// Connections served at once; more are closed right away (probes and a
/// scraper need a handful).
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection (keep-alive included) stays open.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Where start-up stands, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `meshward agent` has not finished starting.
    Starting,
    /// Started, but the datastore has not completed a first sync.
    DatastoreNotSynced,
    Ready,
}

/// The answer to one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

const TEXT: &str = "text/plain; charset=utf-8";

/// What to answer for `method` and `path` (query strings ignored).
pub fn respond(
    method: &Method,
    path: &str,
    readiness: Readiness,
    sources: Option<&Sources>,
) -> Reply {
    let reply = |status, content_type, body: &str| Reply {
        status,
        content_type,
        body: body.to_string(),
    };
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "method not allowed: use GET or HEAD\n",
        );
    }
    match path {
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => match readiness {
            Readiness::Ready => reply(StatusCode::OK, TEXT, "ready\n"),
            Readiness::Starting => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "not ready: the agent is starting\n",
            ),
            Readiness::DatastoreNotSynced => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "not ready: the datastore has not synced yet\n",
            ),
        },
        "/metrics" => Reply {
            status: StatusCode::OK,
            content_type: metrics::CONTENT_TYPE,
            body: metrics::render(readiness == Readiness::Ready, sources),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /healthz, /readyz or /metrics\n",
        ),
    }
}

/// Set once start-up completes: the datastore whose sync readiness waits for.
#[derive(Default)]
struct State {
    datastore: OnceLock<watch::Receiver<Arc<Cluster>>>,
    sources: OnceLock<Sources>,
}

impl State {
    fn readiness(&self) -> Readiness {
        match self.datastore.get() {
            None => Readiness::Starting,
            Some(rx) if rx.borrow().synced() => Readiness::Ready,
            Some(_) => Readiness::DatastoreNotSynced,
        }
    }
}

/// The running endpoint; dropping it stops it.
pub struct Server {
    state: Arc<State>,
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds `addr` and serves on the current tokio runtime.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        info!(address = %local_addr, "health endpoint listening (/healthz, /readyz, /metrics)");
        Ok(Server {
            state,
            local_addr,
            task,
        })
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Start-up is complete: ready as soon as `datastore` has synced.
    pub fn started(&self, datastore: watch::Receiver<Arc<Cluster>>) {
        let _ = self.state.datastore.set(datastore);
    }

    /// What `/metrics` reads from now on.
    pub fn observe(&self, sources: Sources) {
        let _ = self.state.sources.set(sources);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning
                warn!("health endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "health endpoint: too many connections; closing one");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                let method = request.method().clone();
                let path = request.uri().path().to_string();
                async move {
                    let head_only = method == Method::HEAD;
                    // metrics read the kernel (drop counters): off the loop
                    let reply = tokio::task::spawn_blocking(move || {
                        respond(&method, &path, state.readiness(), state.sources.get())
                    })
                    .await
                    .unwrap_or_else(|e| Reply {
                        status: StatusCode::INTERNAL_SERVER_ERROR,
                        content_type: TEXT,
                        body: format!("internal error: {e}\n"),
                    });
                    Ok::<_, Infallible>(to_response(reply, head_only))
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, "health endpoint: {e}"),
                Err(_) => debug!(%peer, "health endpoint: connection open too long; closed"),
            }
            drop(slot);
        });
    }
}

fn to_response(reply: Reply, head_only: bool) -> Response<Full<Bytes>> {
    let allowed = reply.status == StatusCode::METHOD_NOT_ALLOWED;
    let body = if head_only {
        Bytes::new()
    } else {
        Bytes::from(reply.body)
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = reply.status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if allowed {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_does_not_depend_on_readiness() {
        for r in [
            Readiness::Starting,
            Readiness::DatastoreNotSynced,
            Readiness::Ready,
        ] {
            assert_eq!(
                respond(&Method::GET, "/healthz", r, None).status,
                StatusCode::OK
            );
        }
    }

    #[test]
    fn readiness_says_what_is_missing() {
        let starting = respond(&Method::GET, "/readyz", Readiness::Starting, None);
        assert_eq!(starting.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(starting.body.contains("starting"), "{starting:?}");
        let unsynced = respond(&Method::GET, "/readyz", Readiness::DatastoreNotSynced, None);
        assert_eq!(unsynced.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(unsynced.body.contains("datastore"), "{unsynced:?}");
        let ready = respond(&Method::HEAD, "/readyz", Readiness::Ready, None);
        assert_eq!(ready.status, StatusCode::OK);
    }

    #[test]
    fn metrics_carry_the_readiness_gauge() {
        let m = respond(&Method::GET, "/metrics", Readiness::Starting, None);
        assert_eq!(m.content_type, metrics::CONTENT_TYPE);
        assert!(m.body.contains("\nmeshward_agent_ready 0\n"), "{}", m.body);
        let m = respond(&Method::GET, "/metrics", Readiness::Ready, None);
        assert!(m.body.contains("\nmeshward_agent_ready 1\n"), "{}", m.body);
        // every sample line is `name{labels} value`, every name announced
        for line in m.body.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                m.body.contains(&format!("# TYPE {family} ")),
                "{name} has no TYPE line"
            );
        }
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        let r = respond(&Method::GET, "/", Readiness::Ready, None);
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = respond(&Method::POST, "/readyz", Readiness::Ready, None);
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        let response = to_response(r, false);
        assert_eq!(response.headers()[ALLOW], "GET, HEAD");
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text
    }

    #[tokio::test]
    async fn serves_over_http_and_turns_ready() {
        let server = Server::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = server.local_addr();
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200 "));
        let text = get(addr, "/readyz").await;
        assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
        assert!(text.contains("starting"), "{text}");

        // started, but the datastore has not synced (a default snapshot)
        let (_tx, rx) = watch::channel(Arc::new(Cluster::default()));
        server.started(rx);
        let text = get(addr, "/readyz").await;
        assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
        assert!(text.contains("datastore"), "{text}");

        // a real (directory) datastore publishes a synced snapshot at start
        let dir = tempfile::tempdir().unwrap();
        let datastore = crate::datastore::Datastore::start(&crate::datastore::DatastoreSpec::Dir(
            dir.path().to_path_buf(),
        ))
        .await
        .unwrap();
        let server = Server::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        server.started(datastore.subscribe());
        let text = get(server.local_addr(), "/readyz?verbose").await;
        assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
        assert!(text.ends_with("ready\n"), "{text}");
    }
}

//! Prometheus metrics: the histogram buckets Strata shares with vLLM, and the `/metrics`
//! endpoint (Prometheus' text format over HTTP/1.1) that the gateway and every worker serve on
//! `--metrics-listen`.
//!
//! The `prometheus` crate (the Prometheus project's Rust client, maintained by TiKV) keeps the
//! series and writes the text format that `promtool check metrics` reads; hyper, already under
//! tonic, serves it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::TelemetryError;

pub use prometheus;

/// vLLM's time-to-first-token buckets, in seconds.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets, in seconds.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets (end to end, queue, prefill), in seconds.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Buckets for a worker's per-step times (forward passes, frame sends), in seconds.
pub const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// Renders the current metrics in Prometheus' text format.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Encodes every family of `registry` in Prometheus' text format.
pub fn encode(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder as _;
    let mut out = Vec::new();
    // Encoding to memory fails only on a malformed family, which registration rules out.
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Listens on `addr` and serves `GET /metrics` with `render`'s output until the runtime stops.
/// Returns the address it listens on (port 0 picks a free one).
pub async fn serve(addr: &str, render: Render) -> Result<SocketAddr, TelemetryError> {
    let listen_err = |source| TelemetryError::MetricsListen {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(listen_err)?;
    let local = listener.local_addr().map_err(listen_err)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let render = Arc::clone(&render);
            tokio::spawn(async move {
                let service = service_fn(move |req| respond(req, Arc::clone(&render)));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

/// Serves `/metrics` on `addr` when one is given (`--metrics-listen`) and logs where; the
/// address it listens on, for the process's ready line.
pub async fn serve_if(
    addr: Option<&str>,
    render: Render,
) -> Result<Option<String>, TelemetryError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let local = serve(addr, render).await?;
    tracing::info!(metrics = %local, "serving Prometheus metrics at /metrics");
    Ok(Some(local.to_string()))
}

async fn respond<B>(req: Request<B>, render: Render) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        (&Method::GET, _) => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET is served\n".into(),
        ),
    })
}

//! The operations endpoints: `/metrics` (Prometheus text format), `/healthz` (the process
//! runs) and `/readyz` (the route and policy watches have listed once, so the control API
//! serves every route; the webhook has its serving certificate; the operator is not shutting
//! down).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::serving::ClusterBackend;
use crate::webhook::certs::CertResolver;

/// Readiness of a replica, as `/readyz` reports it. A Service sends requests only to ready
/// replicas, so a replica is ready when its control API and webhook can serve them.
pub struct Readiness {
    backend: Arc<ClusterBackend>,
    /// The webhook's certificate, when this replica serves the webhook.
    certificate: Option<Arc<CertResolver>>,
    draining: AtomicBool,
}

impl Readiness {
    pub fn new(backend: Arc<ClusterBackend>, certificate: Option<Arc<CertResolver>>) -> Self {
        Self {
            backend,
            certificate,
            draining: AtomicBool::new(false),
        }
    }

    /// Reports the replica not ready from now on, so that Services stop sending it requests
    /// before its servers close.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Returns why the replica is not ready, or `None` when it is.
    fn not_ready(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::Acquire) {
            Some("the operator is shutting down\n")
        } else if self.certificate.as_ref().is_some_and(|c| !c.is_loaded()) {
            Some("the webhook has no serving certificate yet\n")
        } else if !self.backend.is_synced() {
            Some("the route and policy watches have not listed yet\n")
        } else {
            None
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn handle(
    request: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match readiness.not_ready() {
            None => text(StatusCode::OK, "text/plain", "ok\n".into()),
            Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", reason.into()),
        },
        path => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no endpoint {path}; this server has /metrics, /healthz and /readyz\n"),
        ),
    }
}

/// Serves the operations endpoints until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    tracing::info!(address = %address, "operations endpoints listening (/metrics, /healthz, /readyz)");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "failed to accept a connection; retrying in 50 ms");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let metrics = metrics.clone();
                let readiness = readiness.clone();
                let service = service_fn(move |request| {
                    let response = handle(&request, &metrics, &readiness);
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(async move {
                    let connection = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = connection.await {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!(address = %address, "operations endpoints stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmroute_control::Store;

    #[test]
    fn readiness_names_what_it_waits_for() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(ClusterBackend::new(
            Store::open(dir.path()).unwrap(),
            Arc::new(Metrics::default()),
        ));
        let without_webhook = Readiness::new(backend.clone(), None);
        assert_eq!(
            without_webhook.not_ready(),
            Some("the route and policy watches have not listed yet\n")
        );
        let with_webhook = Readiness::new(backend, Some(Arc::new(CertResolver::default())));
        assert_eq!(
            with_webhook.not_ready(),
            Some("the webhook has no serving certificate yet\n")
        );
        with_webhook.start_draining();
        assert_eq!(
            with_webhook.not_ready(),
            Some("the operator is shutting down\n")
        );
    }
}

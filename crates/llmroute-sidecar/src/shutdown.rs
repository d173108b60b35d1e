//! `POST /shutdown` on the proxy's port, off unless the sidecar starts with a
//! [`ShutdownSwitch`]. A sidecar that runs as a regular container keeps running after the app
//! of a Job's pod exits, and the pod never completes. The app's last step stops it:
//! `curl -X POST http://127.0.0.1:8099/shutdown`. Linkerd's proxy has the same endpoint on its
//! admin port, also off by default, because an app open to request forgery could be made to
//! call it. Only processes of the pod reach it, since the proxy listens on the pod's loopback.

use std::sync::Arc;

use http::{Method, Response, StatusCode};
use llmroute_api::ErrorBody;
use tokio::sync::watch;

use crate::body::{ResponseBody, error_response, text_response};

/// Path of the endpoint.
pub const SHUTDOWN_PATH: &str = "/shutdown";

/// A switch that `POST /shutdown` turns on. The sidecar's command waits for it as for SIGTERM.
#[derive(Debug, Clone)]
pub struct ShutdownSwitch {
    sender: Arc<watch::Sender<bool>>,
}

impl Default for ShutdownSwitch {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownSwitch {
    pub fn new() -> Self {
        Self {
            sender: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Turns the switch on. Returns `false` when it already was on.
    pub fn request(&self) -> bool {
        self.sender
            .send_if_modified(|on| !std::mem::replace(on, true))
    }

    pub fn is_requested(&self) -> bool {
        *self.sender.borrow()
    }

    /// Completes once the switch is on.
    pub async fn requested(&self) {
        let mut receiver = self.sender.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = receiver.wait_for(|on| *on).await;
    }
}

/// Builds the response to a request for [`SHUTDOWN_PATH`] with `method`, and turns `switch` on
/// for a `POST`. Without a switch the endpoint is off, and the error names the flag to set.
pub(crate) fn respond(
    method: &Method,
    route: &str,
    switch: Option<&ShutdownSwitch>,
) -> Response<ResponseBody> {
    let Some(switch) = switch else {
        return error_response(
            StatusCode::NOT_FOUND,
            ErrorBody::new(
                "invalid_request_error",
                "POST /shutdown is off in this sidecar; start it with --shutdown-endpoint, or in a pod set the annotation llmroute.dev/sidecar-shutdown-endpoint: \"true\"",
            )
            .with_code("shutdown_endpoint_off"),
        );
    };
    if method != Method::POST {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorBody::new(
                "invalid_request_error",
                format!("method {method} is not allowed on {SHUTDOWN_PATH}; use POST"),
            ),
        );
    }
    if switch.request() {
        tracing::info!(route = %route, "shutdown requested with POST /shutdown");
    } else {
        tracing::debug!(route = %route, "POST /shutdown again while shutting down");
    }
    text_response(StatusCode::OK, "shutting down\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn switch_turns_on_once() {
        let switch = ShutdownSwitch::new();
        let waiter = {
            let switch = switch.clone();
            tokio::spawn(async move { switch.requested().await })
        };
        assert!(!switch.is_requested());
        assert!(switch.request());
        assert!(!switch.request(), "a second request changes nothing");
        assert!(switch.is_requested());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes")
            .unwrap();
        // A waiter that starts after the request completes at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), switch.requested())
            .await
            .expect("a late waiter completes");
    }

    #[test]
    fn endpoint_accepts_post_only() {
        let off = respond(&Method::POST, "chat", None);
        assert_eq!(off.status(), StatusCode::NOT_FOUND);
        let switch = ShutdownSwitch::new();
        let get = respond(&Method::GET, "chat", Some(&switch));
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(!switch.is_requested(), "GET leaves the switch off");
        let post = respond(&Method::POST, "chat", Some(&switch));
        assert_eq!(post.status(), StatusCode::OK);
        assert!(switch.is_requested());
    }
}

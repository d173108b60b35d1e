//! Response bodies of the sidecar: whole buffers, and channels fed by a streaming task.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use llmroute_api::ErrorBody;
use tokio::sync::mpsc;

/// The body type of every sidecar response.
pub type ResponseBody = BoxBody<Bytes, std::io::Error>;

/// A body fed from a channel; an `Err` message aborts the response, so that the client sees
/// an incomplete stream instead of a clean end.
pub struct ChannelBody {
    pub receiver: mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.receiver
            .poll_recv(context)
            .map(|message| message.map(|chunk| chunk.map(Frame::data)))
    }
}

/// Wraps bytes as a response body.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Builds a JSON response.
pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Builds an OpenAI-style error response.
pub fn error_response(status: StatusCode, error: ErrorBody) -> Response<ResponseBody> {
    json_response(status, error.to_json())
}

/// Builds a plain-text response.
pub fn text_response(status: StatusCode, text: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

//! gRPC without `protoc` (feature `grpc`): a UTF-8 string [`Codec`], a
//! unary service and a unary call written by hand over `tonic::server::Grpc` /
//! `tonic::client::Grpc`, the way tonic's generated code does it. The messages are plain strings
//! (the gRPC frame's payload is the string's UTF-8 bytes), so no `.proto` file and no build
//! script are needed.
//!
//! Used by `examples/two_services.rs` and by the gRPC end-to-end test of `localsession-tests`
//! (`tests/tests/interop/grpc_e2e.rs`).
//!
//! # Examples
//! ```
//! use localsession_examples::grpc::{UnaryService, call_unary};
//! use tonic::{Request, Response};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = UnaryService::new("/demo.Echo/Say", |req: Request<String>| async move {
//!     Ok(Response::new(format!("echo: {}", req.into_inner())))
//! });
//! // Called in process here (a `tonic::transport::Channel` in real use).
//! let reply = call_unary(svc, "/demo.Echo/Say", Request::new("hi".to_owned())).await.unwrap();
//! assert_eq!(reply.into_inner(), "echo: hi");
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use tonic::body::Body;
use tonic::client::GrpcService;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status};

/// A boxed error, as tonic's.
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A [`Codec`] whose messages are UTF-8 strings: the payload of a gRPC frame is the string's
/// bytes. Decoding text that is not UTF-8 is an `INVALID_ARGUMENT` status.
///
/// # Examples
/// ```
/// use localsession_examples::grpc::Utf8Codec;
/// let mut client = tonic::client::Grpc::new(tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
///     Ok::<_, std::convert::Infallible>(tonic::Status::unimplemented("nothing here").into_http::<tonic::body::Body>())
/// }));
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let path = http::uri::PathAndQuery::from_static("/demo.Echo/Say");
/// let err = client.unary(tonic::Request::new("hi".to_owned()), path, Utf8Codec).await.unwrap_err();
/// assert_eq!(err.code(), tonic::Code::Unimplemented);
/// # });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8Codec;

impl Codec for Utf8Codec {
    type Encode = String;
    type Decode = String;
    type Encoder = Utf8Encoder;
    type Decoder = Utf8Decoder;

    fn encoder(&mut self) -> Utf8Encoder {
        Utf8Encoder
    }

    fn decoder(&mut self) -> Utf8Decoder {
        Utf8Decoder
    }
}

/// The encoder of [`Utf8Codec`]: writes the string's bytes.
///
/// # Examples
/// ```
/// use localsession_examples::grpc::{Utf8Codec, Utf8Encoder};
/// use tonic::codec::Codec;
/// let _encoder: Utf8Encoder = Utf8Codec.encoder();
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8Encoder;

impl Encoder for Utf8Encoder {
    type Item = String;
    type Error = Status;

    fn encode(&mut self, item: String, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.as_bytes());
        Ok(())
    }
}

/// The decoder of [`Utf8Codec`]: reads the whole frame as UTF-8 text.
///
/// # Examples
/// ```
/// use localsession_examples::grpc::{Utf8Codec, Utf8Decoder};
/// use tonic::codec::Codec;
/// let _decoder: Utf8Decoder = Utf8Codec.decoder();
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8Decoder;

impl Decoder for Utf8Decoder {
    type Item = String;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<String>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| Status::invalid_argument("the message is not UTF-8 text"))
    }
}

/// A gRPC server with one unary method at `path` (`/package.Service/Method`), served by an
/// async `handler` — what tonic generates for a service, minus the protobuf. Other paths are
/// answered `UNIMPLEMENTED`. A tower [`Service`](tower::Service) over `http::Request`, so it
/// runs under `tonic::transport::Server` (with its layers) like a generated server.
///
/// # Examples
/// ```
/// use localsession_examples::grpc::{UnaryService, call_unary};
/// use tonic::{Code, Request, Response};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let svc = UnaryService::new("/demo.Echo/Say", |req: Request<String>| async move { Ok(Response::new(req.into_inner())) });
/// let err = call_unary(svc, "/demo.Echo/Other", Request::new(String::new())).await.unwrap_err();
/// assert_eq!(err.code(), Code::Unimplemented);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct UnaryService<F> {
    path: &'static str,
    handler: F,
}

impl<F> UnaryService<F> {
    /// The service of `handler` at `path`.
    ///
    /// # Examples
    /// ```
    /// use localsession_examples::grpc::UnaryService;
    /// use tonic::{Request, Response};
    /// let _svc = UnaryService::new("/demo.Echo/Say", |req: Request<String>| async move { Ok(Response::new(req.into_inner())) });
    /// ```
    pub fn new<Fut>(path: &'static str, handler: F) -> Self
    where
        F: Fn(Request<String>) -> Fut,
        Fut: Future<Output = Result<Response<String>, Status>>,
    {
        UnaryService { path, handler }
    }
}

/// The unary method: adapts the handler to tonic's `UnaryService`.
struct Method<F>(F);

impl<F, Fut> tower::Service<Request<String>> for Method<F>
where
    F: Fn(Request<String>) -> Fut,
    Fut: Future<Output = Result<Response<String>, Status>>,
{
    type Response = Response<String>;
    type Error = Status;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<String>) -> Fut {
        (self.0)(req)
    }
}

impl<F, Fut, B> tower::Service<http::Request<B>> for UnaryService<F>
where
    F: Fn(Request<String>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<String>, Status>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != self.path {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let method = Method(self.handler.clone());
        Box::pin(async move { Ok(tonic::server::Grpc::new(Utf8Codec).unary(method, req).await) })
    }
}

/// Calls the unary method at `path` of a gRPC service — a `tonic::transport::Channel`, or any
/// tower service over `http::Request<tonic::body::Body>` (such as a channel wrapped in
/// `localsession_tokio::tower::ClientBackupLayer`) — as a generated client does.
///
/// # Errors
/// The server's [`Status`]; a failure of `service` itself becomes a status as in tonic (its
/// message is the error's).
///
/// # Examples
/// ```
/// use localsession_examples::grpc::{UnaryService, call_unary};
/// use tonic::{Code, Request, Status};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let svc = UnaryService::new("/demo.Echo/Say", |_req: Request<String>| async { Err(Status::not_found("no")) });
/// let err = call_unary(svc, "/demo.Echo/Say", Request::new(String::new())).await.unwrap_err();
/// assert_eq!((err.code(), err.message()), (Code::NotFound, "no"));
/// # }
/// ```
pub async fn call_unary<T>(service: T, path: &'static str, request: Request<String>) -> Result<Response<String>, Status>
where
    T: GrpcService<Body>,
    T::Error: Into<BoxError>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<BoxError>,
{
    let mut grpc = tonic::client::Grpc::new(service);
    grpc.ready().await.map_err(|e| Status::unavailable(format!("service not ready: {}", e.into())))?;
    grpc.unary(request, PathAndQuery::from_static(path), Utf8Codec).await
}

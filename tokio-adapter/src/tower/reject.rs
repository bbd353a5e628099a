//! How [`ServerBackupLayer`](super::ServerBackupLayer) answers a request whose headers cannot be
//! read: [`Rejection`], with [`BadRequest`] (HTTP, the default) and [`GrpcInvalidArgument`]
//! (gRPC, feature `grpc`).
//!
//! The answer is made before the handler runs, from the [`HeaderError`] alone, and its size is
//! bounded: a gRPC message is cut at [`GrpcInvalidArgument::MAX_MESSAGE_BYTES`] (the header
//! name in it comes from the request, which may be large).

use std::fmt;

use http::{Response, StatusCode};

use super::HeaderError;

/// The answer to a request whose headers cannot be read (malformed, oversize): the server
/// layer returns `reject(&error)` as the response and does not call the handler.
///
/// Implementations: [`BadRequest`] (the default), [`GrpcInvalidArgument`] (feature `grpc`).
/// Implement it for an answer of your own; it must not panic (the error comes from the
/// request: treat its text as untrusted).
///
// `GrpcInvalidArgument` exists only with the `grpc` feature (linked to the module's gRPC
// section without it).
#[cfg_attr(feature = "grpc", doc = "[`GrpcInvalidArgument`]: GrpcInvalidArgument")]
#[cfg_attr(not(feature = "grpc"), doc = "[`GrpcInvalidArgument`]: super#grpc-tonic")]
///
/// # Examples
/// ```
/// use http::{Response, StatusCode};
/// use localsession_tokio::tower::{HeaderError, Rejection};
///
/// /// A `431` with an empty body.
/// #[derive(Debug, Clone)]
/// struct TooLarge;
/// impl Rejection<()> for TooLarge {
///     fn reject(&self, _error: &HeaderError) -> Response<()> {
///         let mut resp = Response::new(());
///         *resp.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
///         resp
///     }
/// }
/// let resp = TooLarge.reject(&HeaderError::new("baggage", "longer than 8192 bytes"));
/// assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
/// ```
pub trait Rejection<B>: fmt::Debug + Clone {
    /// The response for `error`.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::{BadRequest, HeaderError, Rejection};
    /// let resp: http::Response<String> = BadRequest.reject(&HeaderError::new("baggage", "too long"));
    /// assert_eq!(resp.status(), 400);
    /// ```
    fn reject(&self, error: &HeaderError) -> http::Response<B>;
}

/// HTTP: `400 Bad Request`, the error's message as the body (`invalid header "baggage": ...`).
/// The default of [`ServerBackupLayer`](super::ServerBackupLayer); the body type must be
/// `From<String>`.
///
/// # Examples
/// ```
/// use localsession_tokio::tower::{BadRequest, HeaderError, Rejection};
/// let resp: http::Response<String> = BadRequest.reject(&HeaderError::new("traceparent", "shorter than 55 characters"));
/// assert_eq!(resp.status(), http::StatusCode::BAD_REQUEST);
/// assert_eq!(resp.body(), "invalid header \"traceparent\": shorter than 55 characters");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BadRequest;

impl<B: From<String>> Rejection<B> for BadRequest {
    fn reject(&self, error: &HeaderError) -> Response<B> {
        let mut resp = Response::new(B::from(error.to_string()));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp
    }
}

/// gRPC (feature `grpc`): the status `INVALID_ARGUMENT` (code 3) with the error's message,
/// as a *trailers-only* gRPC response — HTTP `200`, `content-type: application/grpc`,
/// `grpc-status: 3`, `grpc-message` (percent-encoded as the gRPC spec asks: bytes outside
/// `0x20..=0x7E`, and `%`) and an empty body, which is what tonic's own server sends for a
/// `Status` returned before any message. A tonic client sees
/// `Status { code: InvalidArgument, message: "invalid header \"baggage\": ..." }`. The body
/// type must be `Default` (tonic's `tonic::body::Body` is).
///
/// # Examples
/// ```
/// use localsession_tokio::tower::{GrpcInvalidArgument, HeaderError, Rejection};
/// let resp: http::Response<()> = GrpcInvalidArgument.reject(&HeaderError::new("baggage", "longer than 8192 bytes"));
/// assert_eq!(resp.status(), http::StatusCode::OK);
/// assert_eq!(resp.headers()["content-type"], "application/grpc");
/// assert_eq!(resp.headers()["grpc-status"], "3");
/// assert_eq!(resp.headers()["grpc-message"], "invalid header \"baggage\": longer than 8192 bytes");
/// ```
#[cfg(feature = "grpc")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrpcInvalidArgument;

#[cfg(feature = "grpc")]
impl GrpcInvalidArgument {
    /// Most bytes of the message put in `grpc-message` (before percent-encoding); a longer
    /// message is cut at a character boundary and ends with `...`.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::{GrpcInvalidArgument, HeaderError, Rejection};
    /// let long = format!("rpc-persist-{}", "k".repeat(10_000));
    /// let resp: http::Response<()> = GrpcInvalidArgument.reject(&HeaderError::new(long, "too long"));
    /// let message = resp.headers()["grpc-message"].to_str().unwrap();
    /// assert!(message.len() <= GrpcInvalidArgument::MAX_MESSAGE_BYTES + 3);
    /// assert!(message.starts_with("invalid header \"rpc-persist-kkk") && message.ends_with("..."));
    /// ```
    pub const MAX_MESSAGE_BYTES: usize = 1024;

    /// The gRPC status code it answers with: `INVALID_ARGUMENT`.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(localsession_tokio::tower::GrpcInvalidArgument::CODE, 3);
    /// ```
    pub const CODE: u8 = 3;
}

/// `message` percent-encoded for `grpc-message` (gRPC over HTTP/2: bytes outside `0x20..=0x7E`,
/// and `%`), cut at `max` bytes of input on a character boundary.
#[cfg(feature = "grpc")]
fn grpc_message(message: &str, max: usize) -> String {
    let (cut, truncated) = if message.len() > max {
        let mut end = max;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        (&message[..end], true)
    } else {
        (message, false)
    };
    let mut out = String::with_capacity(cut.len() + 3);
    for b in cut.bytes() {
        if (0x20..=0x7E).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        }
    }
    if truncated {
        out.push_str("...");
    }
    out
}

#[cfg(feature = "grpc")]
impl<B: Default> Rejection<B> for GrpcInvalidArgument {
    fn reject(&self, error: &HeaderError) -> Response<B> {
        use http::header::{CONTENT_TYPE, HeaderValue};

        let mut resp = Response::new(B::default());
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("3")); // `Self::CODE`
        let message = grpc_message(&error.to_string(), Self::MAX_MESSAGE_BYTES);
        // Visible ASCII and spaces only (everything else is percent-encoded): always a valid
        // header value; should it ever not be, the status alone is still sent.
        if let Ok(value) = HeaderValue::try_from(message) {
            headers.insert("grpc-message", value);
        }
        resp
    }
}

#[cfg(all(test, feature = "grpc"))]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_is_percent_encoded_and_bounded() {
        assert_eq!(grpc_message("a b%c\u{e9}\n", 100), "a b%25c%C3%A9%0A");
        // Cut on a character boundary: 'é' is two bytes and does not fit in 2.
        assert_eq!(grpc_message("aé", 2), "a...");
        assert_eq!(grpc_message("abc", 3), "abc");
        let long = "x".repeat(1 << 20);
        assert_eq!(grpc_message(&long, 1024).len(), 1027);
    }

    #[test]
    fn a_message_with_any_bytes_is_a_valid_header() {
        let all: String = (0..=0x7Fu8).map(char::from).chain(['\u{fffd}', '\u{4e2d}']).collect();
        let resp: Response<()> = GrpcInvalidArgument.reject(&HeaderError::new(all, "reason\r\n"));
        let message = resp.headers()["grpc-message"].to_str().unwrap();
        assert!(message.contains("%0D%0A") && message.contains("%EF%BF%BD"), "{message}");
    }
}

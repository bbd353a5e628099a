//! W3C propagation: `baggage` (W3C Baggage) and `traceparent`/`tracestate` (W3C Trace Context).

use std::fmt;

use http::header::{HeaderMap, HeaderValue};
use localsession_core::{Context, Key, MetaInfo};

use super::HeaderError;
use super::propagate::Propagator;

/// The `baggage` header name.
const BAGGAGE: &str = "baggage";
/// The `traceparent` header name.
const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header name.
const TRACESTATE: &str = "tracestate";

/// Whether `b` is an HTTP token character (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `b` may appear unencoded in a baggage value (`baggage-octet`).
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    &s[start..end]
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The combined size of the fields of `name` (as one comma-joined list), or an error naming it
/// when larger than `max` — checked before anything is copied.
fn combined_len(headers: &HeaderMap, name: &'static str, max: usize) -> Result<usize, HeaderError> {
    let mut total = 0usize;
    for (i, v) in headers.get_all(name).iter().enumerate() {
        total = total.saturating_add(v.len()).saturating_add(usize::from(i > 0));
        if total > max {
            return Err(HeaderError::new(name, format!("longer than {max} bytes")));
        }
    }
    Ok(total)
}

/// W3C Baggage: the persistent metainfo values <-> the `baggage` header
/// (`key1=value1,key2=value2`). Values are percent-encoded on send and decoded on receive;
/// list-member properties (`;prop`, `;k=v`) are tolerated on receive and dropped; whitespace
/// around keys, values, `=`, `,` and `;` is ignored; empty list members are skipped. Baggage
/// keys are metainfo keys as they are (case-sensitive).
///
/// Limits, both ways (the spec's): at most [`MAX_ENTRIES`](W3cBaggage::MAX_ENTRIES)
/// list-members and [`MAX_BYTES`](W3cBaggage::MAX_BYTES) bytes (all `baggage` fields together).
/// More is an error (on receive: `400`), checked before anything is copied.
///
/// # Examples
/// The Baggage spec's own example:
/// ```
/// use http::HeaderMap;
/// use localsession_core::{Context, MetaInfo};
/// use localsession_tokio::tower::{Propagator, W3cBaggage};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("baggage", "key1=value1;property1;property2, key2 = value2, key3=value3; propertyKey=propertyValue".parse().unwrap());
/// let ctx = W3cBaggage.extract(&headers, &Context::background()).unwrap();
/// let meta = MetaInfo::of(&ctx);
/// assert_eq!(meta.persistent_values().collect::<Vec<_>>(), [("key1", "value1"), ("key2", "value2"), ("key3", "value3")]);
///
/// let mut out = HeaderMap::new();
/// W3cBaggage.inject(&ctx, &mut out).unwrap();
/// assert_eq!(out["baggage"], "key1=value1,key2=value2,key3=value3");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct W3cBaggage;

impl W3cBaggage {
    /// Most list-members in a baggage.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(localsession_tokio::tower::W3cBaggage::MAX_ENTRIES, 180);
    /// ```
    pub const MAX_ENTRIES: usize = 180;
    /// Most bytes in a baggage (all `baggage` header fields together).
    ///
    /// # Examples
    /// ```
    /// assert_eq!(localsession_tokio::tower::W3cBaggage::MAX_BYTES, 8192);
    /// ```
    pub const MAX_BYTES: usize = 8192;

    /// Parses one baggage string into its `(key, decoded value)` list-members, in order.
    /// Invalid UTF-8 after percent-decoding becomes U+FFFD, as the spec says.
    ///
    /// # Errors
    /// [`HeaderError`] naming `baggage`: more than the limits (also once re-encoded: a
    /// baggage that [`format`](W3cBaggage::format) would write longer than
    /// [`MAX_BYTES`](W3cBaggage::MAX_BYTES) is refused, so that what is accepted can be sent on),
    /// a character that is not allowed (control characters, non-ASCII, `"`, `\`...), a
    /// list-member without `=` or with an empty or invalid key, or a `%` not followed by two hex
    /// digits.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::W3cBaggage;
    /// let members = W3cBaggage::parse(b"user=J%C3%BCrgen, a = 1 ;p").unwrap();
    /// assert_eq!(members, [("user".to_owned(), "Jürgen".to_owned()), ("a".to_owned(), "1".to_owned())]);
    /// assert!(W3cBaggage::parse(b"k=%zz").unwrap_err().to_string().contains("percent"));
    /// ```
    pub fn parse(value: &[u8]) -> Result<Vec<(String, String)>, HeaderError> {
        let mut out = Vec::new();
        parse_baggage_into(value, &mut out)?;
        check_reencoded_len(&out)?;
        Ok(out)
    }

    /// Makes a baggage string from `(key, value)` pairs, percent-encoding the values: every
    /// byte that is not a `baggage-octet`, and `%` and `=` (upper-case hex, as OpenTelemetry's
    /// SDK writes them, so both produce the same bytes for the same value).
    ///
    /// # Errors
    /// [`HeaderError`] naming `baggage`: an empty key or one that is not an HTTP token, or
    /// more than the limits.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::W3cBaggage;
    /// assert_eq!(W3cBaggage::format([("user", "Jürgen"), ("q", "a,b; c=d")]).unwrap(), "user=J%C3%BCrgen,q=a%2Cb%3B%20c%3Dd");
    /// assert!(W3cBaggage::format([("bad key", "v")]).is_err());
    /// ```
    pub fn format<'a>(members: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<String, HeaderError> {
        let mut out = String::new();
        for (n, (key, value)) in members.into_iter().enumerate() {
            if n >= Self::MAX_ENTRIES {
                return Err(HeaderError::new(BAGGAGE, format!("more than {} list-members", Self::MAX_ENTRIES)));
            }
            if key.is_empty() || !key.bytes().all(is_tchar) {
                return Err(HeaderError::new(BAGGAGE, format!("the key {key:?} is not an HTTP token")));
            }
            if n > 0 {
                out.push(',');
            }
            out.push_str(key);
            out.push('=');
            for b in value.bytes() {
                if is_sent_raw(b) {
                    out.push(char::from(b));
                } else {
                    out.push('%');
                    out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
                    out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
                }
            }
            if out.len() > Self::MAX_BYTES {
                return Err(HeaderError::new(BAGGAGE, format!("longer than {} bytes", Self::MAX_BYTES)));
            }
        }
        Ok(out)
    }
}

/// Whether [`W3cBaggage::format`] writes the value byte `b` as it is (otherwise as `%XX`).
/// `=` is a baggage-octet, but readers that split a list-member at every `=` (OpenTelemetry's
/// SDK does) would cut the value there: it is encoded too.
fn is_sent_raw(b: u8) -> bool {
    is_baggage_octet(b) && b != b'%' && b != b'='
}

/// Refuses a received baggage that [`W3cBaggage::format`] could not send on: re-encoding can
/// make it longer than it arrived (a raw `=` becomes `%3D`; an invalid UTF-8 sequence, decoded
/// as U+FFFD, becomes `%EF%BF%BD`). What this crate accepts, it can forward.
fn check_reencoded_len(members: &[(String, String)]) -> Result<(), HeaderError> {
    let mut len = members.len().saturating_sub(1); // the commas
    for (key, value) in members {
        len += key.len() + 1;
        len += value.bytes().map(|b| if is_sent_raw(b) { 1 } else { 3 }).sum::<usize>();
    }
    if len > W3cBaggage::MAX_BYTES {
        return Err(HeaderError::new(
            BAGGAGE,
            format!(
                "{len} bytes once re-encoded for sending (a raw '=' or an invalid UTF-8 sequence grows when \
                 percent-encoded), longer than {}",
                W3cBaggage::MAX_BYTES
            ),
        ));
    }
    Ok(())
}

/// Parses one baggage field into `out`, keeping the total count within the limit.
fn parse_baggage_into(value: &[u8], out: &mut Vec<(String, String)>) -> Result<(), HeaderError> {
    let err = |reason: String| HeaderError::new(BAGGAGE, reason);
    if value.len() > W3cBaggage::MAX_BYTES {
        return Err(err(format!("longer than {} bytes", W3cBaggage::MAX_BYTES)));
    }
    if let Some(&b) = value.iter().find(|&&b| !(b == b'\t' || (0x20..0x7F).contains(&b))) {
        return Err(err(format!("contains the byte 0x{b:02x} (control characters and non-ASCII are not allowed)")));
    }
    for member in value.split(|&b| b == b',') {
        let member = trim_ows(member);
        if member.is_empty() {
            continue;
        }
        if out.len() >= W3cBaggage::MAX_ENTRIES {
            return Err(err(format!("more than {} list-members", W3cBaggage::MAX_ENTRIES)));
        }
        // Properties (after the first `;`) are tolerated and dropped.
        let kv = member.split(|&b| b == b';').next().unwrap_or_default();
        let Some(eq) = kv.iter().position(|&b| b == b'=') else {
            return Err(err("a list-member has no '='".to_owned()));
        };
        let key = trim_ows(&kv[..eq]);
        if key.is_empty() || !key.iter().all(|&b| is_tchar(b)) {
            return Err(err(format!("the key {:?} is not an HTTP token", String::from_utf8_lossy(key))));
        }
        let raw = trim_ows(&kv[eq + 1..]);
        let mut decoded = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            let b = raw[i];
            if b == b'%' {
                let hi = raw.get(i + 1).copied().and_then(hex_value);
                let lo = raw.get(i + 2).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(err("invalid percent-encoding (a '%' not followed by two hex digits)".to_owned()));
                };
                decoded.push(hi << 4 | lo);
                i += 3;
            } else if is_baggage_octet(b) {
                decoded.push(b);
                i += 1;
            } else {
                return Err(err(format!("a value contains {:?}, which must be percent-encoded", char::from(b))));
            }
        }
        // Keys are tokens: ASCII, so valid UTF-8.
        let key = String::from_utf8_lossy(key).into_owned();
        out.push((key, String::from_utf8_lossy(&decoded).into_owned()));
    }
    Ok(())
}

impl Propagator for W3cBaggage {
    fn inject(&self, ctx: &Context, headers: &mut HeaderMap) -> Result<(), HeaderError> {
        let meta = MetaInfo::of(ctx);
        if meta.count_persistent() == 0 {
            // Nothing to send: not a `baggage` the message had already either (a request
            // forwarded as it was received, whose values were removed since).
            headers.remove(BAGGAGE);
            return Ok(());
        }
        let value = W3cBaggage::format(meta.persistent_values())?;
        let value = HeaderValue::try_from(value)
            .map_err(|_| HeaderError::new(BAGGAGE, "not header text (a bug: the value is percent-encoded)"))?;
        headers.insert(BAGGAGE, value);
        Ok(())
    }

    fn extract(&self, headers: &HeaderMap, ctx: &Context) -> Result<Context, HeaderError> {
        if combined_len(headers, BAGGAGE, W3cBaggage::MAX_BYTES)? == 0 {
            return Ok(ctx.clone());
        }
        let mut members = Vec::new();
        for field in headers.get_all(BAGGAGE) {
            parse_baggage_into(field.as_bytes(), &mut members)?;
        }
        check_reencoded_len(&members)?;
        if members.is_empty() {
            return Ok(ctx.clone());
        }
        let mut meta = MetaInfo::of(ctx).clone();
        for (k, v) in &members {
            meta.set_persistent(k, v);
        }
        Ok(MetaInfo::attach(ctx, meta))
    }
}

/// A parsed W3C `traceparent`: `version-trace_id-parent_id-flags`.
///
/// Version `00` is parsed exactly (55 characters, lowercase hex); a higher version leniently,
/// as the spec asks: its first four fields as version `00`'s, anything after a further `-`
/// ignored. Version `ff`, uppercase hex, and all-zero ids are invalid.
///
/// # Examples
/// The Trace Context spec's example:
/// ```
/// use localsession_tokio::tower::TraceParent;
/// let tp = TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// assert_eq!(tp.version, 0);
/// assert_eq!(tp.trace_id[0], 0x4b);
/// assert_eq!(tp.parent_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
/// assert!(tp.sampled());
/// assert_eq!(tp.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The format version (`00` is the one this crate writes).
    pub version: u8,
    /// The trace id (never all zero).
    pub trace_id: [u8; 16],
    /// The caller's span id (never all zero).
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Length of a version `00` traceparent.
const TRACEPARENT_LEN: usize = 55;

fn parse_hex<const N: usize>(s: &[u8], what: &str) -> Result<[u8; N], HeaderError> {
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        let digit = |b: u8| match b {
            b'0'..=b'9' | b'a'..=b'f' => hex_value(b),
            _ => None,
        };
        match (digit(s[2 * i]), digit(s[2 * i + 1])) {
            (Some(hi), Some(lo)) => *byte = hi << 4 | lo,
            _ => return Err(HeaderError::new(TRACEPARENT, format!("the {what} is not lowercase hex"))),
        }
    }
    Ok(out)
}

impl TraceParent {
    /// Parses a `traceparent` value.
    ///
    /// # Errors
    /// [`HeaderError`] naming `traceparent` and what is wrong: the length, the version (`ff`,
    /// not two lowercase hex digits), a separator, a field that is not lowercase hex, an
    /// all-zero id.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::TraceParent;
    /// let err = TraceParent::parse(b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap_err();
    /// assert_eq!(err.header(), "traceparent");
    /// assert!(err.to_string().contains("version ff"));
    /// // A future version, with a field this crate does not know: parsed leniently.
    /// let tp = TraceParent::parse(b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be").unwrap();
    /// assert_eq!(tp.version, 0xcc);
    /// ```
    pub fn parse(value: &[u8]) -> Result<TraceParent, HeaderError> {
        let err = |reason: &str| HeaderError::new(TRACEPARENT, reason.to_owned());
        if value.len() < TRACEPARENT_LEN {
            return Err(err("shorter than 55 characters"));
        }
        let [version] = parse_hex::<1>(&value[..2], "version")?;
        if version == 0xff {
            return Err(err("version ff is invalid"));
        }
        if version == 0 && value.len() != TRACEPARENT_LEN {
            return Err(err("version 00 must be exactly 55 characters"));
        }
        if version != 0 && value.len() > TRACEPARENT_LEN && value[TRACEPARENT_LEN] != b'-' {
            return Err(err("a field after the flags must start with '-'"));
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return Err(err("the fields must be separated by '-'"));
        }
        let trace_id = parse_hex::<16>(&value[3..35], "trace-id")?;
        let parent_id = parse_hex::<8>(&value[36..52], "parent-id")?;
        let [flags] = parse_hex::<1>(&value[53..55], "trace-flags")?;
        if trace_id == [0; 16] {
            return Err(err("the trace-id is all zeros"));
        }
        if parent_id == [0; 8] {
            return Err(err("the parent-id is all zeros"));
        }
        Ok(TraceParent { version, trace_id, parent_id, flags })
    }

    /// Whether the caller sampled the trace (flag bit 0).
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::TraceParent;
    /// let tp = TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
    /// assert!(!tp.sampled());
    /// ```
    #[must_use]
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for TraceParent {
    /// The version `00` form, whatever [`version`](TraceParent::version) says (only the four
    /// version `00` fields are kept).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        self.trace_id.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        f.write_str("-")?;
        self.parent_id.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "-{:02x}", self.flags)
    }
}

static TRACE: Key<TraceContext> = Key::new("localsession.w3c.trace_context");

/// A context's W3C trace context: the parsed `traceparent` and the raw `tracestate` (all
/// `tracestate` fields joined with `,`; not interpreted).
///
/// # Examples
/// ```
/// use localsession_core::Context;
/// use localsession_tokio::tower::{TraceContext, TraceParent};
/// let parent = TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// let ctx = TraceContext { parent, state: Some("congo=t61rcWkgMzE".to_owned()) }.attach(&Context::background());
/// assert_eq!(TraceContext::of(&ctx).unwrap().state.as_deref(), Some("congo=t61rcWkgMzE"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The `traceparent`.
    pub parent: TraceParent,
    /// The raw `tracestate`, if any.
    pub state: Option<String>,
}

impl TraceContext {
    /// Most bytes of `tracestate` accepted (all fields together).
    ///
    /// # Examples
    /// ```
    /// assert_eq!(localsession_tokio::tower::TraceContext::MAX_STATE_BYTES, 8192);
    /// ```
    pub const MAX_STATE_BYTES: usize = 8192;

    /// The trace context of `ctx`, if any.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// use localsession_tokio::tower::TraceContext;
    /// assert!(TraceContext::of(&Context::background()).is_none());
    /// ```
    #[must_use]
    pub fn of(ctx: &Context) -> Option<&TraceContext> {
        ctx.get(&TRACE)
    }

    /// `ctx` carrying this trace context.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// use localsession_tokio::tower::{TraceContext, TraceParent};
    /// let parent = TraceParent { version: 0, trace_id: [1; 16], parent_id: [2; 8], flags: 1 };
    /// let ctx = TraceContext { parent, state: None }.attach(&Context::background());
    /// assert_eq!(TraceContext::of(&ctx).unwrap().parent, parent);
    /// ```
    #[must_use]
    pub fn attach(self, ctx: &Context) -> Context {
        ctx.with(&TRACE, self)
    }
}

/// W3C Trace Context: `traceparent` / `tracestate` <-> the context's [`TraceContext`].
///
/// On receive, an invalid `traceparent` (or more than one), or a `tracestate` that is too large
/// or not visible ASCII, is an error (`400`) by default; with
/// [`ignore_invalid`](W3cTraceContext::ignore_invalid) it is ignored instead, as the spec's
/// "restart the trace". A `tracestate` without a `traceparent` is ignored. On send, the
/// `traceparent` is written in the version `00` form. Behind
/// [`ClientBackupLayer`](super::ClientBackupLayer), a call whose context has no trace context
/// carries the backed-up request's ([`Propagator::recover`]).
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_core::Context;
/// use localsession_tokio::tower::{Propagator, TraceContext, W3cTraceContext};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
/// headers.insert("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".parse().unwrap());
/// let ctx = W3cTraceContext::new().extract(&headers, &Context::background()).unwrap();
/// let trace = TraceContext::of(&ctx).unwrap();
/// assert!(trace.parent.sampled());
///
/// let mut out = HeaderMap::new();
/// W3cTraceContext::new().inject(&ctx, &mut out).unwrap();
/// assert_eq!(out, headers);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct W3cTraceContext {
    ignore_invalid: bool,
}

impl W3cTraceContext {
    /// Invalid headers are a `400`.
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_core::Context;
    /// use localsession_tokio::tower::{Propagator, W3cTraceContext};
    /// let mut headers = HeaderMap::new();
    /// headers.insert("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01".parse().unwrap());
    /// let err = W3cTraceContext::new().extract(&headers, &Context::background()).unwrap_err();
    /// assert!(err.to_string().contains("all zeros"));
    /// ```
    #[must_use]
    pub const fn new() -> Self {
        W3cTraceContext { ignore_invalid: false }
    }

    /// Invalid headers are ignored (the request gets no trace context), as the spec's "restart
    /// the trace".
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_core::Context;
    /// use localsession_tokio::tower::{Propagator, TraceContext, W3cTraceContext};
    /// let mut headers = HeaderMap::new();
    /// headers.insert("traceparent", "garbage".parse().unwrap());
    /// let ctx = W3cTraceContext::new().ignore_invalid().extract(&headers, &Context::background()).unwrap();
    /// assert!(TraceContext::of(&ctx).is_none());
    /// ```
    #[must_use]
    pub const fn ignore_invalid(self) -> Self {
        W3cTraceContext { ignore_invalid: true }
    }

    /// Parses the trace context of `headers` (`None` without a `traceparent`).
    ///
    /// # Errors
    /// [`HeaderError`] naming `traceparent` or `tracestate` (see the type's docs).
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_tokio::tower::W3cTraceContext;
    /// let mut headers = HeaderMap::new();
    /// assert_eq!(W3cTraceContext::read(&headers).unwrap(), None);
    /// headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
    /// assert!(W3cTraceContext::read(&headers).unwrap().is_some());
    /// ```
    pub fn read(headers: &HeaderMap) -> Result<Option<TraceContext>, HeaderError> {
        let mut fields = headers.get_all(TRACEPARENT).iter();
        let Some(first) = fields.next() else { return Ok(None) };
        if fields.next().is_some() {
            return Err(HeaderError::new(TRACEPARENT, "sent more than once"));
        }
        let parent = TraceParent::parse(first.as_bytes())?;
        let len = combined_len(headers, TRACESTATE, TraceContext::MAX_STATE_BYTES)?;
        let state = if len == 0 {
            None
        } else {
            let mut state = String::with_capacity(len);
            for (i, field) in headers.get_all(TRACESTATE).iter().enumerate() {
                let text = field.to_str().map_err(|_| HeaderError::new(TRACESTATE, "not visible ASCII"))?;
                if i > 0 {
                    state.push(',');
                }
                state.push_str(text);
            }
            Some(state)
        };
        Ok(Some(TraceContext { parent, state }))
    }
}

impl Propagator for W3cTraceContext {
    fn inject(&self, ctx: &Context, headers: &mut HeaderMap) -> Result<(), HeaderError> {
        let Some(trace) = TraceContext::of(ctx) else { return Ok(()) };
        let parent = HeaderValue::try_from(trace.parent.to_string())
            .map_err(|_| HeaderError::new(TRACEPARENT, "not header text (a bug: it is hex)"))?;
        headers.insert(TRACEPARENT, parent);
        match trace.state.as_deref().filter(|s| !s.is_empty()) {
            Some(state) => {
                let state =
                    HeaderValue::from_str(state).map_err(|_| HeaderError::new(TRACESTATE, "not visible ASCII"))?;
                headers.insert(TRACESTATE, state);
            }
            None => {
                headers.remove(TRACESTATE);
            }
        }
        Ok(())
    }

    fn extract(&self, headers: &HeaderMap, ctx: &Context) -> Result<Context, HeaderError> {
        match W3cTraceContext::read(headers) {
            Ok(Some(trace)) => Ok(trace.attach(ctx)),
            Ok(None) => Ok(ctx.clone()),
            Err(_) if self.ignore_invalid => Ok(ctx.clone()),
            Err(e) => Err(e),
        }
    }

    /// The request's trace context, for a call whose context has none (a call's own trace
    /// context wins). Forwarded as received: this crate makes no spans; a tracer that does
    /// puts its own [`TraceContext`] on the call's context.
    fn recover(&self, prev: &Context, ctx: &Context) -> Context {
        match TraceContext::of(prev) {
            Some(trace) if TraceContext::of(ctx).is_none() => trace.clone().attach(ctx),
            _ => ctx.clone(),
        }
    }
}

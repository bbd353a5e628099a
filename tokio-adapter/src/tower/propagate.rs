//! The [`Propagator`] abstraction and the Kitex/Hertz metainfo headers ([`KitexMetainfo`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use localsession_core::{Context, MetaInfo};

use super::HeaderError;

/// Header prefix of persistent metainfo (travels across every hop).
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_core::{Context, MetaInfo};
/// use localsession_tokio::tower::{write_metainfo_headers, PERSISTENT_PREFIX};
///
/// let ctx = MetaInfo::with_persistent(&Context::background(), "TENANT", "acme");
/// let mut headers = HeaderMap::new();
/// write_metainfo_headers(MetaInfo::of(&ctx), &mut headers).unwrap();
/// assert_eq!(headers[format!("{PERSISTENT_PREFIX}tenant")], "acme");
/// ```
pub const PERSISTENT_PREFIX: &str = "rpc-persist-";
/// Header prefix of transient metainfo (travels one hop).
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_core::{Context, MetaInfo};
/// use localsession_tokio::tower::{write_metainfo_headers, TRANSIENT_PREFIX};
///
/// let ctx = MetaInfo::with_transient(&Context::background(), "HOP", "1");
/// let mut headers = HeaderMap::new();
/// write_metainfo_headers(MetaInfo::of(&ctx), &mut headers).unwrap();
/// assert_eq!(headers[format!("{TRANSIENT_PREFIX}hop")], "1");
/// ```
pub const TRANSIENT_PREFIX: &str = "rpc-transit-";
/// Header prefix of backward metainfo (sent by a server in its response).
///
/// # Examples
/// ```
/// use localsession_tokio::tower::BACKWARD_PREFIX;
/// assert_eq!(format!("{BACKWARD_PREFIX}cache-hit"), "rpc-backward-cache-hit");
/// ```
pub const BACKWARD_PREFIX: &str = "rpc-backward-";

/// How a context travels in HTTP headers, both ways: [`inject`](Propagator::inject) writes an
/// outgoing request's headers from its context, [`extract`](Propagator::extract) builds an
/// incoming request's context from its headers. Optionally the response direction too
/// (backward values). [`ServerBackupLayer`](super::ServerBackupLayer) and
/// [`ClientBackupLayer`](super::ClientBackupLayer) run a list of them, in order.
///
/// Implementations: [`KitexMetainfo`], [`W3cBaggage`](super::W3cBaggage),
/// [`W3cTraceContext`](super::W3cTraceContext).
///
/// # Examples
/// A propagator of one header of your own:
/// ```
/// use http::HeaderMap;
/// use localsession_core::{Context, Key};
/// use localsession_tokio::tower::{HeaderError, Propagator};
///
/// static REQUEST_ID: Key<String> = Key::new("request-id");
///
/// #[derive(Debug)]
/// struct RequestId;
/// impl Propagator for RequestId {
///     fn inject(&self, ctx: &Context, headers: &mut HeaderMap) -> Result<(), HeaderError> {
///         if let Some(id) = ctx.get(&REQUEST_ID) {
///             let value = id.parse().map_err(|_| HeaderError::new("x-request-id", "not header text"))?;
///             headers.insert("x-request-id", value);
///         }
///         Ok(())
///     }
///     fn extract(&self, headers: &HeaderMap, ctx: &Context) -> Result<Context, HeaderError> {
///         match headers.get("x-request-id") {
///             None => Ok(ctx.clone()),
///             Some(v) => {
///                 let id = v.to_str().map_err(|_| HeaderError::new("x-request-id", "not visible ASCII"))?;
///                 Ok(ctx.with(&REQUEST_ID, id.to_owned()))
///             }
///         }
///     }
/// }
///
/// let mut headers = HeaderMap::new();
/// RequestId.inject(&Context::background().with(&REQUEST_ID, "r-1".to_owned()), &mut headers).unwrap();
/// let ctx = RequestId.extract(&headers, &Context::background()).unwrap();
/// assert_eq!(ctx.get(&REQUEST_ID).map(String::as_str), Some("r-1"));
/// ```
pub trait Propagator: fmt::Debug + Send + Sync {
    /// Writes what `ctx` carries into an outgoing request's `headers` (replacing headers of the
    /// same names).
    ///
    /// # Errors
    /// [`HeaderError`] naming the header that cannot be written; the request is then not sent.
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_core::{Context, MetaInfo};
    /// use localsession_tokio::tower::{KitexMetainfo, Propagator};
    /// let ctx = MetaInfo::with_persistent(&Context::background(), "TENANT", "acme");
    /// let mut headers = HeaderMap::new();
    /// KitexMetainfo::new().inject(&ctx, &mut headers).unwrap();
    /// assert_eq!(headers["rpc-persist-tenant"], "acme");
    /// ```
    fn inject(&self, ctx: &Context, headers: &mut HeaderMap) -> Result<(), HeaderError>;

    /// `ctx` plus what an incoming request's `headers` carry.
    ///
    /// # Errors
    /// [`HeaderError`] naming the header that is malformed or too large; the server answers
    /// `400 Bad Request` with its message (gRPC mode: the status `INVALID_ARGUMENT`; see
    /// [`Rejection`](super::Rejection)).
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_core::{Context, MetaInfo};
    /// use localsession_tokio::tower::{KitexMetainfo, Propagator};
    /// let mut headers = HeaderMap::new();
    /// headers.insert("rpc-persist-tenant", "acme".parse().unwrap());
    /// let ctx = KitexMetainfo::new().extract(&headers, &Context::background()).unwrap();
    /// assert_eq!(MetaInfo::of(&ctx).persistent("TENANT"), Some("acme"));
    /// ```
    fn extract(&self, headers: &HeaderMap, ctx: &Context) -> Result<Context, HeaderError>;

    /// `ctx` plus what it lacks of this propagator's data, taken from `prev`, the request's
    /// backed-up context — the client layer's recovery step (Kitex `RecoverCtxOnDemands`), run
    /// by [`ClientBackup`](super::ClientBackup) after its handler accepted the backup
    /// (`backup == true`). What `ctx` has wins. By default `ctx` unchanged: the persistent
    /// metainfo ([`KitexMetainfo`], [`W3cBaggage`](super::W3cBaggage)) is already merged by
    /// [`recover_ctx_on_demands`](localsession_core::recover_ctx_on_demands);
    /// [`W3cTraceContext`](super::W3cTraceContext) recovers the trace context.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Context;
    /// use localsession_tokio::tower::{Propagator, TraceContext, TraceParent, W3cTraceContext};
    ///
    /// let parent = TraceParent { version: 0, trace_id: [1; 16], parent_id: [2; 8], flags: 1 };
    /// let request = TraceContext { parent, state: None }.attach(&Context::background());
    /// let call = W3cTraceContext::new().recover(&request, &Context::background());
    /// assert_eq!(TraceContext::of(&call).unwrap().parent, parent);
    /// ```
    fn recover(&self, prev: &Context, ctx: &Context) -> Context {
        let _ = prev;
        ctx.clone()
    }

    /// Writes the backward values a server recorded on the request's `ctx` (see
    /// [`MetaInfo::send_backward_value`]) into its response `headers`. Nothing by default.
    /// Infallible: values that cannot be written are dropped (the response is already made).
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_core::{Context, MetaInfo};
    /// use localsession_tokio::tower::{KitexMetainfo, Propagator};
    /// let ctx = MetaInfo::with_backward_values_to_send(&Context::background());
    /// MetaInfo::send_backward_value(&ctx, "CACHE_HIT", "1");
    /// let mut headers = HeaderMap::new();
    /// KitexMetainfo::new().inject_backward(&ctx, &mut headers);
    /// assert_eq!(headers["rpc-backward-cache-hit"], "1");
    /// ```
    fn inject_backward(&self, ctx: &Context, headers: &mut HeaderMap) {
        let _ = (ctx, headers);
    }

    /// Adds the backward values of a response's `headers` to `values`. Nothing by default.
    /// Lenient: entries that are malformed or beyond the limits are skipped.
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_tokio::tower::{BackwardValues, KitexMetainfo, Propagator};
    /// let mut headers = HeaderMap::new();
    /// headers.insert("rpc-backward-cache-hit", "1".parse().unwrap());
    /// let mut values = BackwardValues::default();
    /// KitexMetainfo::new().extract_backward(&headers, &mut values);
    /// assert_eq!(values.get("CACHE_HIT"), Some("1"));
    /// ```
    fn extract_backward(&self, headers: &HeaderMap, values: &mut BackwardValues) {
        let _ = (headers, values);
    }
}

/// The backward values a server sent back in its response (Kitex `RecvAllBackwardValues`):
/// [`ClientBackup`](super::ClientBackup) puts them in every response's extensions.
///
/// # Examples
/// ```
/// use localsession_tokio::tower::BackwardValues;
/// let mut values = BackwardValues::default();
/// values.insert("B", "2");
/// values.insert("A", "1");
/// assert_eq!(values.get("A"), Some("1"));
/// assert_eq!(values.iter().collect::<Vec<_>>(), [("A", "1"), ("B", "2")]);
/// assert_eq!(values.len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackwardValues(BTreeMap<String, String>);

impl BackwardValues {
    /// The value of `key` (Kitex `RecvBackwardValue`).
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::BackwardValues;
    /// assert_eq!(BackwardValues::default().get("K"), None);
    /// ```
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Sets a value (replacing one of the same key).
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::BackwardValues;
    /// let mut values = BackwardValues::default();
    /// values.insert("K", "1");
    /// values.insert("K", "2");
    /// assert_eq!(values.get("K"), Some("2"));
    /// ```
    pub fn insert(&mut self, key: &str, value: &str) {
        self.0.insert(key.to_owned(), value.to_owned());
    }

    /// The values, in key order.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::BackwardValues;
    /// let mut values = BackwardValues::default();
    /// values.insert("K", "v");
    /// assert_eq!(values.iter().next(), Some(("K", "v")));
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of values.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::BackwardValues;
    /// assert_eq!(BackwardValues::default().len(), 0);
    /// ```
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::BackwardValues;
    /// assert!(BackwardValues::default().is_empty());
    /// ```
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An HTTP header key (after the metainfo prefix) as a metainfo key, the CGI-variable way of
/// bytedance/gopkg's `metainfo` (`HTTPHeaderToCGIVariable`): upper-cased, `-` becomes `_`.
///
/// # Examples
/// ```
/// use localsession_tokio::tower::header_to_cgi_key;
/// assert_eq!(header_to_cgi_key("abc-def"), "ABC_DEF");
/// ```
#[must_use]
pub fn header_to_cgi_key(header_key: &str) -> String {
    header_key.bytes().map(|b| if b == b'-' { '_' } else { char::from(b.to_ascii_uppercase()) }).collect()
}

/// A metainfo key as an HTTP header key (to put after the metainfo prefix), the inverse of
/// [`header_to_cgi_key`] (gopkg `CGIVariableToHTTPHeader`): lower-cased, `_` becomes `-`.
///
/// # Examples
/// ```
/// use localsession_tokio::tower::cgi_key_to_header;
/// assert_eq!(cgi_key_to_header("ABC_DEF"), "abc-def");
/// ```
#[must_use]
pub fn cgi_key_to_header(key: &str) -> String {
    key.chars().map(|c| if c == '_' { '-' } else { c.to_ascii_lowercase() }).collect()
}

/// Kitex/Hertz metainfo headers, as bytedance/gopkg's `metainfo` maps them (see the
/// [module docs](super) for the rules): `rpc-persist-abc-def: v` is the persistent value
/// `ABC_DEF = v`, `rpc-transit-x-y` the transient value `X_Y` received from upstream, and the
/// response's `rpc-backward-<key>` the backward values. The default propagator of both layers.
///
/// [`verbatim_keys`](KitexMetainfo::verbatim_keys) keeps this crate's earlier convention
/// (the header key is the metainfo key; lower-cased on send) — not understood by Go peers.
///
/// # Examples
/// ```
/// use http::HeaderMap;
/// use localsession_core::MetaInfo;
/// use localsession_tokio::tower::KitexMetainfo;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("rpc-persist-abc-def", "v".parse().unwrap());
/// headers.insert("rpc-transit-x-y", "w".parse().unwrap());
/// let meta = KitexMetainfo::new().read(&headers).unwrap();
/// assert_eq!(meta.persistent("ABC_DEF"), Some("v"));
/// assert_eq!(meta.transient("X_Y"), Some("w"));
///
/// let mut out = HeaderMap::new();
/// KitexMetainfo::new().write(&meta, &mut out).unwrap();
/// assert_eq!(out["rpc-persist-abc-def"], "v"); // the upstream transient value is not sent on
/// assert_eq!(out.len(), 1);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KitexMetainfo {
    verbatim: bool,
    max_entries: usize,
    max_bytes: usize,
}

impl Default for KitexMetainfo {
    fn default() -> Self {
        KitexMetainfo::new()
    }
}

impl KitexMetainfo {
    /// Default limit on the number of metainfo headers of one message.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::KitexMetainfo;
    /// assert_eq!(KitexMetainfo::DEFAULT_MAX_ENTRIES, 256);
    /// ```
    pub const DEFAULT_MAX_ENTRIES: usize = 256;
    /// Default limit on the total size (names and values) of the metainfo headers of one message.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::KitexMetainfo;
    /// assert_eq!(KitexMetainfo::DEFAULT_MAX_BYTES, 16 * 1024);
    /// ```
    pub const DEFAULT_MAX_BYTES: usize = 16 * 1024;

    /// The gopkg convention (CGI-variable keys) with the default limits.
    ///
    /// # Examples
    /// ```
    /// use localsession_tokio::tower::KitexMetainfo;
    /// assert_eq!(KitexMetainfo::new(), KitexMetainfo::default());
    /// ```
    #[must_use]
    pub const fn new() -> Self {
        KitexMetainfo { verbatim: false, max_entries: Self::DEFAULT_MAX_ENTRIES, max_bytes: Self::DEFAULT_MAX_BYTES }
    }

    /// This crate's earlier convention: the header key after the prefix *is* the metainfo key
    /// (`rpc-persist-tenant` <-> `tenant`; keys are lower-cased on send). Go peers use CGI
    /// keys (`TENANT`) and will not see these values under the names they expect.
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_tokio::tower::KitexMetainfo;
    /// let mut headers = HeaderMap::new();
    /// headers.insert("rpc-persist-abc-def", "v".parse().unwrap());
    /// let meta = KitexMetainfo::new().verbatim_keys().read(&headers).unwrap();
    /// assert_eq!(meta.persistent("abc-def"), Some("v"));
    /// ```
    #[must_use]
    pub const fn verbatim_keys(self) -> Self {
        KitexMetainfo { verbatim: true, ..self }
    }

    /// Limits the number of metainfo headers (persistent, transient or backward) of one
    /// message; more is a [`HeaderError`] (on receive: `400`).
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_tokio::tower::KitexMetainfo;
    /// let mut headers = HeaderMap::new();
    /// headers.insert("rpc-persist-a", "1".parse().unwrap());
    /// headers.insert("rpc-persist-b", "2".parse().unwrap());
    /// let err = KitexMetainfo::new().max_entries(1).read(&headers).unwrap_err();
    /// assert!(err.to_string().contains("more than 1 metainfo headers"));
    /// ```
    #[must_use]
    pub const fn max_entries(self, max: usize) -> Self {
        KitexMetainfo { max_entries: max, ..self }
    }

    /// Limits the total size in bytes of the names and values of the metainfo headers of one
    /// message; more is a [`HeaderError`] (on receive: `400`), detected before anything is
    /// copied.
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_tokio::tower::KitexMetainfo;
    /// let mut headers = HeaderMap::new();
    /// headers.insert("rpc-persist-big", "x".repeat(100).parse().unwrap());
    /// let err = KitexMetainfo::new().max_bytes(64).read(&headers).unwrap_err();
    /// assert_eq!(err.header(), "rpc-persist-big");
    /// ```
    #[must_use]
    pub const fn max_bytes(self, max: usize) -> Self {
        KitexMetainfo { max_bytes: max, ..self }
    }

    fn to_key(self, header_key: &str) -> String {
        if self.verbatim { header_key.to_owned() } else { header_to_cgi_key(header_key) }
    }

    fn to_header_key(self, key: &str) -> String {
        if self.verbatim { key.to_ascii_lowercase() } else { cgi_key_to_header(key) }
    }

    /// Visits the metainfo headers of `headers` with one of `prefixes`, leniently where gopkg
    /// is (empty keys and empty values are skipped) and strictly on size and encoding.
    fn visit<'h>(
        self,
        headers: &'h HeaderMap,
        prefixes: &[&str],
        mut f: impl FnMut(usize, &'h str, &'h str),
    ) -> Result<(), HeaderError> {
        let (mut entries, mut bytes) = (0usize, 0usize);
        for name in headers.keys() {
            let name = name.as_str();
            let Some((which, key)) =
                prefixes.iter().enumerate().find_map(|(i, p)| name.strip_prefix(p).map(|k| (i, k)))
            else {
                continue;
            };
            // First value of the name, as Go's `http.Header.Get`.
            let Some(value) = headers.get(name) else { continue };
            entries += 1;
            bytes = bytes.saturating_add(name.len()).saturating_add(value.len());
            if entries > self.max_entries {
                return Err(HeaderError::new(
                    name,
                    format!("more than {} metainfo headers in one message", self.max_entries),
                ));
            }
            if bytes > self.max_bytes {
                return Err(HeaderError::new(
                    name,
                    format!("the metainfo headers exceed {} bytes in one message", self.max_bytes),
                ));
            }
            if key.is_empty() || value.is_empty() {
                continue; // as gopkg: nothing to set
            }
            let value = std::str::from_utf8(value.as_bytes())
                .map_err(|_| HeaderError::new(name, "the value is not UTF-8 text"))?;
            f(which, key, value);
        }
        Ok(())
    }

    /// Reads the metainfo of an incoming request: `rpc-persist-*` become persistent values,
    /// `rpc-transit-*` transient values received from upstream (readable here, not forwarded).
    ///
    /// Lenient as gopkg: a header with an empty key (`rpc-persist-` alone) or an empty value is
    /// skipped. Of a header repeated, the first value counts. Values may be any UTF-8 text.
    ///
    /// # Errors
    /// [`HeaderError`] naming the header if a value is not UTF-8, or if the metainfo headers
    /// exceed [`max_entries`](KitexMetainfo::max_entries) or
    /// [`max_bytes`](KitexMetainfo::max_bytes).
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_tokio::tower::KitexMetainfo;
    /// let mut headers = HeaderMap::new();
    /// headers.insert("rpc-persist-tenant", "acme".parse().unwrap());
    /// headers.insert("rpc-persist-empty", "".parse().unwrap()); // skipped
    /// headers.insert("rpc-persist-", "no key".parse().unwrap()); // skipped
    /// let meta = KitexMetainfo::new().read(&headers).unwrap();
    /// assert_eq!(meta.persistent_values().collect::<Vec<_>>(), [("TENANT", "acme")]);
    /// ```
    pub fn read(&self, headers: &HeaderMap) -> Result<MetaInfo, HeaderError> {
        let mut meta = MetaInfo::default();
        self.visit(headers, &[PERSISTENT_PREFIX, TRANSIENT_PREFIX], |which, key, value| {
            let key = self.to_key(key);
            if which == 0 {
                meta.set_persistent(&key, value);
            } else {
                meta.set_upstream(&key, value);
            }
        })?;
        Ok(meta)
    }

    /// Checks one outgoing entry and makes its header.
    fn entry(self, prefix: &str, key: &str, value: &str) -> Result<(HeaderName, HeaderValue), HeaderError> {
        let header = format!("{prefix}{}", self.to_header_key(key));
        if key.is_empty() {
            return Err(HeaderError::new(header, "the metainfo key is empty"));
        }
        let name = HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| HeaderError::new(&header, "the metainfo key is not a valid HTTP header name token"))?;
        if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
            return Err(HeaderError::new(header, "the value has leading or trailing whitespace (HTTP would trim it)"));
        }
        let value = HeaderValue::from_bytes(value.as_bytes())
            .map_err(|_| HeaderError::new(&header, "the value has control characters (not header-safe text)"))?;
        Ok((name, value))
    }

    fn write_entries<'a>(
        self,
        entries: impl Iterator<Item = (&'a str, &'a str, &'a str)>,
        headers: &mut HeaderMap,
    ) -> Result<(), HeaderError> {
        // Staged, then written: on an error `headers` is left as it was (no half-sent metainfo).
        // Keyed by header name, so that two keys that become one header (`TENANT` and `tenant`,
        // `A_B` and `A-B`) are an error naming both instead of the second silently replacing the
        // first.
        let mut staged: Vec<(HeaderName, HeaderValue)> = Vec::new();
        let mut keys: HashMap<HeaderName, &'a str> = HashMap::new();
        let (mut count, mut bytes) = (0usize, 0usize);
        for (prefix, key, value) in entries {
            if value.is_empty() {
                continue; // the receiver would skip it
            }
            let (name, value) = self.entry(prefix, key, value)?;
            count += 1;
            bytes = bytes.saturating_add(name.as_str().len()).saturating_add(value.len());
            if let Some(first) = keys.get(&name) {
                return Err(HeaderError::new(
                    name.as_str(),
                    format!(
                        "the metainfo keys `{first}` and `{key}` both become this header (one value would be lost)"
                    ),
                ));
            }
            if count > self.max_entries {
                return Err(HeaderError::new(
                    name.as_str(),
                    format!("more than {} metainfo headers in one message", self.max_entries),
                ));
            }
            if bytes > self.max_bytes {
                return Err(HeaderError::new(
                    name.as_str(),
                    format!("the metainfo headers exceed {} bytes in one message", self.max_bytes),
                ));
            }
            keys.insert(name.clone(), key);
            staged.push((name, value));
        }
        // The message's metainfo becomes exactly `meta`'s: metainfo headers already on it (a
        // request received from upstream and forwarded as it is) would otherwise carry the
        // upstream's transient values a second hop, and keys removed since.
        let stale: Vec<HeaderName> = headers
            .keys()
            .filter(|name| {
                let name = name.as_str();
                name.starts_with(PERSISTENT_PREFIX) || name.starts_with(TRANSIENT_PREFIX)
            })
            .cloned()
            .collect();
        for name in stale {
            headers.remove(name);
        }
        for (name, value) in staged {
            headers.insert(name, value);
        }
        Ok(())
    }

    /// Writes the metainfo an outgoing request carries: every persistent value, and the
    /// transient values set at this hop (not those received from upstream). Replaces every
    /// `rpc-persist-*` / `rpc-transit-*` header `headers` had (a request forwarded as it was
    /// received must not carry the upstream's one-hop values further). Empty values are not
    /// sent (a gopkg receiver skips them).
    ///
    /// Strict, unlike gopkg (which drops what it cannot send): the metainfo is this program's
    /// own data, and silently losing a tenant is worse than an error.
    ///
    /// # Errors
    /// [`HeaderError`] naming the header the key would have become, for an empty key, a key
    /// that is not a header-name token, a value with control characters or leading/trailing
    /// whitespace, two keys that become the same header (`TENANT` and `tenant`, `A_B` and
    /// `A-B`: one of the values would be lost), or more than the limits. On an error nothing is
    /// written to `headers`.
    ///
    /// # Examples
    /// ```
    /// use http::HeaderMap;
    /// use localsession_core::{Context, MetaInfo};
    /// use localsession_tokio::tower::KitexMetainfo;
    /// let ctx = MetaInfo::with_persistent(&Context::background(), "ABC_DEF", "v");
    /// let mut headers = HeaderMap::new();
    /// KitexMetainfo::new().write(MetaInfo::of(&ctx), &mut headers).unwrap();
    /// assert_eq!(headers["rpc-persist-abc-def"], "v");
    /// ```
    pub fn write(&self, meta: &MetaInfo, headers: &mut HeaderMap) -> Result<(), HeaderError> {
        let persistent = meta.persistent_values().map(|(k, v)| (PERSISTENT_PREFIX, k, v));
        let transient = meta.outgoing_transient_values().map(|(k, v)| (TRANSIENT_PREFIX, k, v));
        self.write_entries(persistent.chain(transient), headers)
    }
}

impl Propagator for KitexMetainfo {
    fn inject(&self, ctx: &Context, headers: &mut HeaderMap) -> Result<(), HeaderError> {
        self.write(MetaInfo::of(ctx), headers)
    }

    fn extract(&self, headers: &HeaderMap, ctx: &Context) -> Result<Context, HeaderError> {
        let received = self.read(headers)?;
        if received.is_empty() {
            return Ok(ctx.clone());
        }
        let mut meta = MetaInfo::of(ctx).clone();
        for (k, v) in received.persistent_values() {
            meta.set_persistent(k, v);
        }
        for (k, v) in received.transient_values() {
            meta.set_upstream(k, v);
        }
        Ok(MetaInfo::attach(ctx, meta))
    }

    fn inject_backward(&self, ctx: &Context, headers: &mut HeaderMap) {
        // Lenient (the response is made): values that cannot be headers, or beyond the limits,
        // are dropped, as gopkg drops what it cannot send.
        // A second key that becomes a header already written here is dropped too (the first
        // value is kept, as the receiver would have read it).
        let (mut count, mut bytes) = (0usize, 0usize);
        let mut written = std::collections::HashSet::new();
        for (k, v) in MetaInfo::backward_values_to_send(ctx) {
            if v.is_empty() {
                continue;
            }
            let Ok((name, value)) = self.entry(BACKWARD_PREFIX, &k, &v) else { continue };
            let size = name.as_str().len() + value.len();
            if count < self.max_entries && bytes + size <= self.max_bytes && written.insert(name.clone()) {
                count += 1;
                bytes += size;
                headers.insert(name, value);
            }
        }
    }

    fn extract_backward(&self, headers: &HeaderMap, values: &mut BackwardValues) {
        // Lenient: an oversize or non-UTF-8 set stops reading; what was read is kept.
        let _ = self.visit(headers, &[BACKWARD_PREFIX], |_, key, value| values.insert(&self.to_key(key), value));
    }
}

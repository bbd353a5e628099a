//! Session values on spans and log lines (feature `tracing`): [`SessionFields`] chooses them,
//! [`SessionFieldsLayer`] records them on every span, [`SessionFieldsFormat`] writes them on
//! every log line of `tracing_subscriber::fmt`.
//!
//! # Why a layer and a format
//! A span or an event has the fields its callsite declared; no layer can add fields to an
//! event that other layers then see. So the values are recorded where each consumer reads them:
//! - **spans:** [`SessionFieldsLayer`] reads the session current where a span is created (the
//!   span's creator runs in the request) and stores the values in the span's extensions as
//!   [`RecordedSessionFields`], which any layer can read (`span.extensions().get::<RecordedSessionFields>()`),
//!   and appends them to the span's `FormattedFields<DefaultFields>`, which `fmt` prints in the
//!   span's context on every line inside the span (`request{request_id=abc}: ...`);
//! - **events:** [`SessionFieldsFormat`] wraps an event format of `fmt` and writes the values
//!   of the session current where the event is emitted in front of each line, also for events
//!   outside any span.
//!
//! The values are rendered with `Display` when the span is created or the event formatted (the
//! session cannot be read later: by then another request may run on the thread). Only values
//! present in the session are written; nothing is written without a session.
//!
//! # Format
//! Each value is written `name=value`, as `fmt` writes its own fields — and, as `fmt` does for
//! its string fields, quoted and escaped (Rust's `{:?}` of the string: `"a b"`, `"x\ny"`,
//! `"\u{1b}[31m"`) when it is empty or holds whitespace, `=`, `"`, `\` or a control character.
//! Session values often come from request headers: unescaped, a value such as
//! `"acme\ntenant=globex ..."` or `"mallory tenant=globex"` would forge a line, or a field, of
//! another tenant. [`RecordedSessionFields`] and [`SessionFields::current_values`] keep the
//! values as rendered (unescaped). A render that panics (a `Display` of a value, a `field`
//! closure) is caught: the field is left out of that span or line.

use std::any::Any;
use std::fmt::{self, Display, Write as _};
use std::sync::Arc;

use localsession_core::{AnySession, Key};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

type Render = Arc<dyn Fn(&AnySession) -> Option<String> + Send + Sync>;

/// The session values to record on spans and log lines, each under a field name.
///
/// # Examples
/// ```
/// use localsession_core::{Context, Key, SessionCtx};
/// use localsession_std::{scope, SessionFields};
///
/// static REQUEST_ID: Key<u64> = Key::new("request_id");
/// let fields = SessionFields::new()
///     .key("request_id", &REQUEST_ID)
///     .field("tenant", |s| s.value_cloned::<&str, _>(&"tenant").map(str::to_owned));
/// let session = SessionCtx::new(&Context::background()).with(&REQUEST_ID, 42).with_value("tenant", "acme");
/// let values = scope(session, || fields.current_values());
/// assert_eq!(values, vec![("request_id", "42".to_owned()), ("tenant", "acme".to_owned())]);
/// ```
#[derive(Clone, Default)]
pub struct SessionFields {
    fields: Vec<(&'static str, Render)>,
}

impl SessionFields {
    /// No fields yet.
    ///
    /// # Examples
    /// ```
    /// assert!(localsession_std::SessionFields::new().current_values().is_empty());
    /// ```
    #[must_use]
    pub fn new() -> SessionFields {
        SessionFields::default()
    }

    /// Records the value of a typed key, with `Display`, as field `name`.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::{Key, SessionMap};
    /// use localsession_std::{scope, SessionFields};
    /// static USER: Key<String> = Key::new("user");
    /// let fields = SessionFields::new().key("user", &USER);
    /// let values = scope(SessionMap::new().with(&USER, "ann".to_owned()), || fields.current_values());
    /// assert_eq!(values, vec![("user", "ann".to_owned())]);
    /// ```
    #[must_use]
    pub fn key<T: Display + Any + Send + Sync>(self, name: &'static str, key: &'static Key<T>) -> SessionFields {
        self.field(name, move |s| s.read_key(key, |v| v.map(ToString::to_string)))
    }

    /// Records what `render` returns for the current session (nothing for `None`) as field
    /// `name`: for hashed keys, or values that need formatting of their own. `render` runs
    /// wherever a span is created or an event formatted; if it panics, the field is left out
    /// (the panic hook reports it).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::SessionMap;
    /// use localsession_std::{scope, SessionFields};
    /// let fields = SessionFields::new().field("valid", |s| Some(s.is_valid().to_string()));
    /// let values = scope(SessionMap::new(), || fields.current_values());
    /// assert_eq!(values, vec![("valid", "true".to_owned())]);
    /// ```
    #[must_use]
    pub fn field(
        mut self,
        name: &'static str,
        render: impl Fn(&AnySession) -> Option<String> + Send + Sync + 'static,
    ) -> SessionFields {
        self.fields.push((name, Arc::new(render)));
        self
    }

    /// The fields' values in the session current on this thread, in the order they were
    /// added; empty without a session, and for a session that has ended (disabled, cancelled,
    /// past its deadline): a task left over from an ended request does not stamp its identity
    /// on the lines it logs for later requests.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::Key;
    /// static ID: Key<u32> = Key::new("id");
    /// let fields = localsession_std::SessionFields::new().key("id", &ID);
    /// assert!(fields.current_values().is_empty()); // no session bound
    /// ```
    #[must_use]
    pub fn current_values(&self) -> Vec<(&'static str, String)> {
        if self.fields.is_empty() {
            return Vec::new();
        }
        crate::with_current(|session| match session {
            Some(s) if s.is_valid() => self
                .fields
                .iter()
                .filter_map(|(name, render)| {
                    // User code (a value's `Display`, a `field` closure), run inside a
                    // subscriber's callback: a panic there would break the log call (and leak
                    // the span the registry had already opened). Caught: the field is left out.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| render(s)))
                        .ok()
                        .flatten()
                        .map(|v| (*name, v))
                })
                .collect(),
            _ => Vec::new(),
        })
    }

    /// A layer recording these fields on every span (see [`SessionFieldsLayer`]).
    ///
    /// # Examples
    /// ```
    /// use tracing_subscriber::layer::SubscriberExt;
    /// let fields = localsession_std::SessionFields::new();
    /// let subscriber = tracing_subscriber::registry().with(fields.layer());
    /// # drop(subscriber);
    /// ```
    #[must_use]
    pub fn layer(&self) -> SessionFieldsLayer {
        SessionFieldsLayer { fields: self.clone() }
    }

    /// An event format writing these fields in front of each line that `inner` formats (see
    /// [`SessionFieldsFormat`]).
    ///
    /// # Examples
    /// ```
    /// let fields = localsession_std::SessionFields::new();
    /// let fmt = tracing_subscriber::fmt::layer::<tracing_subscriber::Registry>()
    ///     .event_format(fields.format(tracing_subscriber::fmt::format()));
    /// # drop(fmt);
    /// ```
    #[must_use]
    pub fn format<E>(&self, inner: E) -> SessionFieldsFormat<E> {
        SessionFieldsFormat { inner, fields: self.clone() }
    }
}

impl fmt::Debug for SessionFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.fields.iter().map(|(name, _)| name)).finish()
    }
}

/// The session values a [`SessionFieldsLayer`] recorded for a span, in its extensions.
///
/// # Examples
/// ```
/// use tracing_subscriber::layer::{Context, Layer};
/// use tracing_subscriber::registry::LookupSpan;
/// use localsession_std::RecordedSessionFields;
///
/// // A layer of yours, after the session fields layer, reads them when a span closes:
/// struct Export;
/// impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Export {
///     fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
///         let span = ctx.span(&id).unwrap();
///         if let Some(fields) = span.extensions().get::<RecordedSessionFields>() {
///             let _request_id: Option<&str> = fields.get("request_id");
///         }
///     }
/// }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordedSessionFields {
    values: Vec<(&'static str, String)>,
}

impl RecordedSessionFields {
    /// The value recorded under `name`.
    ///
    /// # Examples
    /// See [`RecordedSessionFields`].
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// Every recorded `(name, value)`, in the order of the [`SessionFields`].
    ///
    /// # Examples
    /// ```
    /// let fields = localsession_std::RecordedSessionFields::default();
    /// assert_eq!(fields.iter().count(), 0);
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.values.iter().map(|(n, v)| (*n, v.as_str()))
    }
}

/// A `tracing_subscriber` layer that records chosen session values on every span created
/// while a session is current (see [`SessionFields`]): as [`RecordedSessionFields`] in
/// the span's extensions, and appended to the span's `FormattedFields<DefaultFields>` so that
/// `fmt` prints them with the span. Made by [`SessionFields::layer`].
///
/// # Examples
/// ```
/// use localsession_core::{Key, SessionMap};
/// use localsession_std::{scope, SessionFields};
/// use tracing_subscriber::layer::SubscriberExt;
///
/// static REQUEST_ID: Key<u64> = Key::new("request_id");
/// let subscriber = tracing_subscriber::registry()
///     .with(SessionFields::new().key("request_id", &REQUEST_ID).layer())
///     .with(tracing_subscriber::fmt::layer().with_ansi(false));
/// tracing::subscriber::with_default(subscriber, || {
///     scope(SessionMap::new().with(&REQUEST_ID, 7), || {
///         let _span = tracing::info_span!("handler").entered();
///         tracing::info!("hello"); // printed as `... handler{request_id=7}: ...: hello`
///     });
/// });
/// ```
#[derive(Clone, Debug)]
pub struct SessionFieldsLayer {
    fields: SessionFields,
}

impl<S> Layer<S> for SessionFieldsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let values = self.fields.current_values();
        if values.is_empty() {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        // For `fmt` (with its default field formatter): if `fmt` ran first, append; otherwise
        // format the span's own fields as `fmt` would, and `fmt` keeps what it finds.
        if let Some(formatted) = extensions.get_mut::<FormattedFields<DefaultFields>>() {
            append(&mut formatted.fields, &values);
        } else {
            let mut formatted = FormattedFields::<DefaultFields>::new(String::new());
            if DefaultFields::new().format_fields(formatted.as_writer(), attrs).is_ok() {
                append(&mut formatted.fields, &values);
                extensions.insert(formatted);
            }
        }
        extensions.insert(RecordedSessionFields { values });
    }
}

fn append(out: &mut String, values: &[(&'static str, String)]) {
    for (name, value) in values {
        if !out.is_empty() {
            out.push(' ');
        }
        let _ = write!(out, "{name}={}", Escaped(value));
    }
}

/// A value written as `fmt` writes its string fields: as is when that is unambiguous, else
/// quoted and escaped (`{:?}`; see the module docs, "Format").
struct Escaped<'a>(&'a str);

impl Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = !self.0.is_empty()
            && !self.0.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '=' | '"' | '\\'));
        if plain { f.write_str(self.0) } else { write!(f, "{:?}", self.0) }
    }
}

/// An event format of `tracing_subscriber::fmt` that writes chosen session values of the
/// session current where an event is emitted in front of each line `inner` formats
/// (`request_id=7 2026-... INFO ...`), also for events outside any span. Made by
/// [`SessionFields::format`].
///
/// # Examples
/// ```
/// use std::sync::{Arc, Mutex};
/// use localsession_core::{Key, SessionMap};
/// use localsession_std::{scope, SessionFields};
/// use tracing_subscriber::layer::SubscriberExt;
///
/// static REQUEST_ID: Key<u64> = Key::new("request_id");
/// let out = Arc::new(Mutex::new(Vec::<u8>::new()));
/// let sink = out.clone();
/// let format = SessionFields::new().key("request_id", &REQUEST_ID).format(tracing_subscriber::fmt::format().without_time());
/// let fmt = tracing_subscriber::fmt::layer()
///     .with_ansi(false)
///     .event_format(format)
///     .with_writer(move || WriteTo(sink.clone()));
/// tracing::subscriber::with_default(tracing_subscriber::registry().with(fmt), || {
///     scope(SessionMap::new().with(&REQUEST_ID, 7), || tracing::info!("hello"));
/// });
/// let line = String::from_utf8(out.lock().unwrap().clone()).unwrap();
/// assert!(line.starts_with("request_id=7 ") && line.contains("hello"), "{line}");
///
/// struct WriteTo(Arc<Mutex<Vec<u8>>>);
/// impl std::io::Write for WriteTo {
///     fn write(&mut self, b: &[u8]) -> std::io::Result<usize> { self.0.lock().unwrap().extend_from_slice(b); Ok(b.len()) }
///     fn flush(&mut self) -> std::io::Result<()> { Ok(()) }
/// }
/// ```
#[derive(Clone, Debug)]
pub struct SessionFieldsFormat<E> {
    inner: E,
    fields: SessionFields,
}

impl<S, N, E> FormatEvent<S, N> for SessionFieldsFormat<E>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    E: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        // In front, so that `inner` writes straight to the (possibly coloured) writer.
        for (name, value) in self.fields.current_values() {
            write!(writer, "{name}={} ", Escaped(&value))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

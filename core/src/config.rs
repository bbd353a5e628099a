//! Session-manager configuration: [`ManagerOptions`] and the `CLOUDWEGO_SESSION_CONFIG_KEY` format.
//!
//! [`ManagerOptions::parse_env`] parses the value format of Go's `CLOUDWEGO_SESSION_CONFIG_KEY`
//! environment variable (its durations with the private parser of `config/duration.rs`).
//!
//! This module only parses strings; it never reads the environment (it is
//! `no_std`). A `std` adapter reads the variable named by [`ENV_KEY`] and hands
//! its value to [`ManagerOptions::parse_env`].
//!
//! # Defaults
//!
//! [`ManagerOptions::default()`] matches Go's `DefaultManagerOptions()`:
//!
//! | field               | default                                   | Go field                        |
//! |---------------------|-------------------------------------------|---------------------------------|
//! | `shard_number`      | 100 ([`DEFAULT_SHARD_NUMBER`])            | `ShardNumber`                   |
//! | `gc_interval`       | 10 minutes ([`DEFAULT_GC_INTERVAL`])      | `GCInterval`                    |
//! | `implicit_transmit` | `false`                                   | `EnableImplicitlyTransmitAsync` |
//!
//! # Format
//!
//! `[implicit][,shards][,gc_interval]`: up to three comma-separated fields,
//! each optional. Surrounding ASCII whitespace in each field is trimmed, and
//! an empty field keeps the value of the `base` options passed to
//! [`ManagerOptions::parse_env`]. An empty string keeps everything.
//!
//! * `implicit` is one of Go's `strconv.ParseBool` spellings: `1`, `t`, `T`,
//!   `TRUE`, `true`, `True`, `0`, `f`, `F`, `FALSE`, `false`, `False`.
//! * `shards` is a decimal integer from 1 to [`MAX_SHARD_NUMBER`] (a leading `+` is allowed).
//! * `gc_interval` is a Go `time.ParseDuration` string such as `10m`, `1h30m`
//!   or `1.5h` (Go's `time.ParseDuration` syntax) of at least [`MIN_GC_INTERVAL`] (1s).
//!
//! ```
//! use core::time::Duration;
//! use localsession_core::config::ManagerOptions;
//!
//! let opts = ManagerOptions::parse_env("true,10,1h", ManagerOptions::default())?;
//! assert_eq!(
//!     opts,
//!     ManagerOptions {
//!         shard_number: 10,
//!         gc_interval: Some(Duration::from_secs(3600)),
//!         implicit_transmit: true,
//!     }
//! );
//!
//! // Empty fields keep the base value.
//! let opts = ManagerOptions::parse_env(",,30m", ManagerOptions::default())?;
//! assert_eq!(opts.shard_number, 100);
//! assert_eq!(opts.gc_interval, Some(Duration::from_secs(30 * 60)));
//! # Ok::<(), localsession_core::config::ConfigError>(())
//! ```
//!
//! # Differences from Go
//!
//! * Go silently ignores malformed input and keeps the previous value (or, for
//!   a shard number of 0 or less, panics later when the manager is built).
//!   Here every malformed or out-of-range field is an error ([`ConfigError`])
//!   naming the field and the offending value.
//! * Go enables implicit transmission when the first field, lowercased, is
//!   exactly `true`, and otherwise leaves the setting as it was (so the
//!   environment can only switch it on). Here the field accepts exactly the
//!   `strconv.ParseBool` spellings listed above, `false`, `0` and friends
//!   switch it off, and anything else, including mixed-case spellings such as
//!   `tRuE`, is an error.
//! * Go does not trim whitespace (so `" 10"` was ignored); here it is trimmed.
//! * Go applies the GC field only when it is strictly greater than 1s; here
//!   exactly 1s is accepted, matching the `GCInterval < time.Second` check Go
//!   makes when it starts the GC loop.
//! * More than three fields is an error; Go ignores extra fields.
//! * Go disables GC with `GCInterval == 0`; here that is
//!   `gc_interval: None`. The string format cannot express `None`.
//! * Durations are parsed into [`Duration`]: negative values are rejected, the
//!   maximum is `u64::MAX` nanoseconds (about 584 years; Go's is `i64::MAX`,
//!   about 292 years), and fractions are computed exactly (see
//!   Go's `time.ParseDuration`).
//!
//! # Examples
//! Rejecting a malformed `CLOUDWEGO_SESSION_CONFIG_KEY` value with a message
//! that names the field, where Go would silently keep the old value:
//! ```
//! use localsession_core::config::{ConfigField, ManagerOptions};
//!
//! let err = ManagerOptions::parse_env("yes,10", ManagerOptions::default()).unwrap_err();
//! assert_eq!(err.field(), ConfigField::Implicit);
//! assert_eq!(err.value(), "yes");
//! assert!(err.to_string().starts_with(r#"invalid implicit transmit flag "yes""#));
//! ```

use alloc::string::{String, ToString};
use core::fmt;
use core::str::FromStr;
use core::time::Duration;

mod duration;

pub use duration::DurationError;
pub(crate) use duration::{GoDuration, format_go_duration, parse_go_duration};

/// The most session shards a [`ManagerOptions`] may ask for (65 536). A shard is a lock and a
/// map allocated up front: Go accepts any `int` and then fails to allocate, or panics, for a
/// large one; here a larger value is a [`ConfigError`] naming the shard number, from
/// [`ManagerOptions::validate`] and from parsing the environment variable.
///
/// # Examples
/// ```
/// use localsession_core::config::{ManagerOptions, MAX_SHARD_NUMBER};
/// assert!(ManagerOptions { shard_number: MAX_SHARD_NUMBER, ..Default::default() }.validate().is_ok());
/// let err = ",65537".parse::<ManagerOptions>().unwrap_err();
/// assert_eq!(err.to_string(), r#"invalid shard number "65537": too large (the maximum is 65536)"#);
/// ```
pub const MAX_SHARD_NUMBER: usize = 1 << 16;

/// Default number of session shards (Go's `DefaultManagerOptions().ShardNumber`).
///
/// # Examples
/// ```
/// use localsession_core::config::{DEFAULT_SHARD_NUMBER, ManagerOptions};
///
/// assert_eq!(DEFAULT_SHARD_NUMBER, 100);
/// assert_eq!(ManagerOptions::default().shard_number, DEFAULT_SHARD_NUMBER);
/// ```
pub const DEFAULT_SHARD_NUMBER: usize = 100;

/// Default interval between garbage-collection passes: 10 minutes (Go's
/// `DefaultManagerOptions().GCInterval`).
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use localsession_core::config::{DEFAULT_GC_INTERVAL, ManagerOptions};
///
/// assert_eq!(DEFAULT_GC_INTERVAL, Duration::from_secs(600));
/// assert_eq!(ManagerOptions::default().gc_interval, Some(DEFAULT_GC_INTERVAL));
/// ```
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// Smallest accepted GC interval: 1 second (Go's manager panics with
/// "`GCInterval` must be larger than 1 second" below it).
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use localsession_core::config::{MIN_GC_INTERVAL, ManagerOptions};
///
/// assert_eq!(MIN_GC_INTERVAL, Duration::from_secs(1));
/// let opts = ManagerOptions { gc_interval: Some(MIN_GC_INTERVAL), ..ManagerOptions::default() };
/// assert!(opts.validate().is_ok());
/// ```
pub const MIN_GC_INTERVAL: Duration = Duration::from_secs(1);

/// Name of the environment variable Go's localsession reads its options from.
///
/// This module does not read it; a `std` adapter passes its value to
/// [`ManagerOptions::parse_env`].
///
/// # Examples
/// ```
/// use localsession_core::config::ENV_KEY;
///
/// assert_eq!(ENV_KEY, "CLOUDWEGO_SESSION_CONFIG_KEY");
/// ```
pub const ENV_KEY: &str = "CLOUDWEGO_SESSION_CONFIG_KEY";

/// Go's `strconv.ParseBool` spellings, as listed in error messages.
const BOOL_SPELLINGS: &str = "1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False";

/// Options of a session manager (Go's `ManagerOptions`).
///
/// Build it with a struct literal, usually on top of
/// [`ManagerOptions::default()`], or parse it from the environment-variable
/// format with [`ManagerOptions::parse_env`] or [`str::parse`].
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use localsession_core::config::ManagerOptions;
///
/// let opts = ManagerOptions {
///     shard_number: 32,
///     gc_interval: None,
///     implicit_transmit: true,
/// };
/// assert!(opts.validate().is_ok());
///
/// let parsed: ManagerOptions = "true,32,5m".parse()?;
/// assert_eq!(parsed.gc_interval, Some(Duration::from_secs(300)));
/// # Ok::<(), localsession_core::config::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManagerOptions {
    /// Number of shards session ids are spread over; from 1 to [`MAX_SHARD_NUMBER`]
    /// (Go's `ShardNumber`).
    pub shard_number: usize,
    /// Interval between garbage-collection passes that drop invalid
    /// sessions; `None` disables periodic GC (Go's `GCInterval`, where 0
    /// disables it). When `Some`, it must be at least [`MIN_GC_INTERVAL`].
    pub gc_interval: Option<Duration>,
    /// Whether the current session is implicitly transmitted to spawned
    /// tasks (Go's `EnableImplicitlyTransmitAsync`).
    pub implicit_transmit: bool,
}

impl Default for ManagerOptions {
    /// Go's `DefaultManagerOptions()`: 100 shards, GC every 10 minutes,
    /// implicit transmission disabled.
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::config::ManagerOptions;
    ///
    /// let opts = ManagerOptions::default();
    /// assert_eq!(opts.shard_number, 100);
    /// assert_eq!(opts.gc_interval, Some(Duration::from_secs(600)));
    /// assert!(!opts.implicit_transmit);
    /// ```
    fn default() -> Self {
        ManagerOptions {
            shard_number: DEFAULT_SHARD_NUMBER,
            gc_interval: Some(DEFAULT_GC_INTERVAL),
            implicit_transmit: false,
        }
    }
}

impl ManagerOptions {
    /// Checks that `shard_number` is at least 1 and that `gc_interval`, when
    /// `Some`, is at least [`MIN_GC_INTERVAL`]. The shard number is checked
    /// first.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] whose [`field`](ConfigError::field) is
    /// [`ConfigField::Shards`] or [`ConfigField::GcInterval`] and whose
    /// [`value`](ConfigError::value) renders the offending value (durations
    /// in Go's format).
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::config::{ConfigField, ManagerOptions};
    ///
    /// assert!(ManagerOptions::default().validate().is_ok());
    ///
    /// let err = ManagerOptions { shard_number: 0, ..ManagerOptions::default() }
    ///     .validate()
    ///     .unwrap_err();
    /// assert_eq!(err.field(), ConfigField::Shards);
    /// assert_eq!(err.to_string(), r#"invalid shard number "0": must be at least 1"#);
    ///
    /// let opts = ManagerOptions {
    ///     gc_interval: Some(Duration::from_millis(500)),
    ///     ..ManagerOptions::default()
    /// };
    /// let err = opts.validate().unwrap_err();
    /// assert_eq!(err.field(), ConfigField::GcInterval);
    /// assert_eq!(err.value(), "500ms");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_shards(self.shard_number)?;
        check_gc_interval(self.gc_interval)?;
        Ok(())
    }

    /// Parses Go's `[implicit][,shards][,gc_interval]` format on top of
    /// `base`, then validates the result.
    ///
    /// Each field is trimmed of surrounding ASCII whitespace; an empty field
    /// keeps `base`'s value, so an empty string returns `base` unchanged
    /// (provided `base` itself is valid). See the [module
    /// documentation](self) for the syntax of each field.
    ///
    /// # Errors
    ///
    /// * More than three fields: [`ConfigField::Format`], reported before
    ///   anything else, with the whole (trimmed) input as the value.
    /// * Otherwise the first field, in the order implicit, shards,
    ///   `gc_interval`, whose resulting value is invalid: either its text does
    ///   not parse or is out of range, or it is empty and `base`'s value is
    ///   out of range (as [`validate`](Self::validate) would report it).
    ///
    /// # Examples
    /// ```
    /// use core::time::Duration;
    /// use localsession_core::config::{ConfigField, ManagerOptions};
    ///
    /// let base = ManagerOptions::default();
    /// let opts = ManagerOptions::parse_env(" True , +8 , 1h30m ", base)?;
    /// assert!(opts.implicit_transmit);
    /// assert_eq!(opts.shard_number, 8);
    /// assert_eq!(opts.gc_interval, Some(Duration::from_secs(90 * 60)));
    ///
    /// assert_eq!(ManagerOptions::parse_env("", base)?, base);
    /// assert_eq!(ManagerOptions::parse_env("false,,", base)?, base);
    ///
    /// let err = ManagerOptions::parse_env("true,ab", base).unwrap_err();
    /// assert_eq!(err.field(), ConfigField::Shards);
    /// assert_eq!(err.value(), "ab");
    /// # Ok::<(), localsession_core::config::ConfigError>(())
    /// ```
    pub fn parse_env(value: &str, base: ManagerOptions) -> Result<ManagerOptions, ConfigError> {
        let mut fields = value.split(',');
        let implicit = fields.next().unwrap_or_default().trim_ascii();
        let shards = fields.next().unwrap_or_default().trim_ascii();
        let gc = fields.next().unwrap_or_default().trim_ascii();
        if fields.next().is_some() {
            return Err(ConfigError::new(ConfigField::Format, value.trim_ascii(), Reason::TooManyFields));
        }

        let mut out = base;
        if !implicit.is_empty() {
            out.implicit_transmit = parse_bool(implicit)
                .ok_or_else(|| ConfigError::new(ConfigField::Implicit, implicit, Reason::NotBool))?;
        }
        if shards.is_empty() {
            check_shards(base.shard_number)?;
        } else {
            out.shard_number = parse_shards(shards)?;
        }
        if gc.is_empty() {
            check_gc_interval(base.gc_interval)?;
        } else {
            out.gc_interval = Some(parse_gc_interval(gc)?);
        }
        Ok(out)
    }
}

impl FromStr for ManagerOptions {
    type Err = ConfigError;

    /// Same as [`ManagerOptions::parse_env`] with
    /// [`ManagerOptions::default()`] as the base.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::config::{ConfigField, ManagerOptions};
    ///
    /// let opts: ManagerOptions = "t,16".parse()?;
    /// assert!(opts.implicit_transmit);
    /// assert_eq!(opts.shard_number, 16);
    /// assert_eq!(opts.gc_interval, ManagerOptions::default().gc_interval);
    ///
    /// let err = "true,1,1h,4".parse::<ManagerOptions>().unwrap_err();
    /// assert_eq!(err.field(), ConfigField::Format);
    /// # Ok::<(), localsession_core::config::ConfigError>(())
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_env(s, Self::default())
    }
}

/// Go's `strconv.ParseBool`.
fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Parses a shard number: optional sign, then ASCII digits (Go's `Atoi`),
/// which must be in `1..=MAX_SHARD_NUMBER`.
fn parse_shards(text: &str) -> Result<usize, ConfigError> {
    let err = |reason| ConfigError::new(ConfigField::Shards, text, reason);
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(Reason::NotDecimal));
    }
    if negative {
        // Zero or negative: either way below the minimum.
        return Err(err(Reason::ZeroShards));
    }
    let n = digits
        .bytes()
        .try_fold(0_usize, |acc, b| acc.checked_mul(10)?.checked_add(usize::from(b.wrapping_sub(b'0'))))
        .ok_or_else(|| err(Reason::TooManyShards))?;
    if n == 0 {
        return Err(err(Reason::ZeroShards));
    }
    if n > MAX_SHARD_NUMBER {
        return Err(err(Reason::TooManyShards));
    }
    Ok(n)
}

/// Parses a GC interval and applies the minimum.
fn parse_gc_interval(text: &str) -> Result<Duration, ConfigError> {
    let d =
        parse_go_duration(text).map_err(|e| ConfigError::new(ConfigField::GcInterval, text, Reason::Duration(e)))?;
    if d < MIN_GC_INTERVAL {
        return Err(ConfigError::new(ConfigField::GcInterval, text, Reason::BelowMinimum));
    }
    Ok(d)
}

fn check_shards(n: usize) -> Result<(), ConfigError> {
    if n == 0 {
        return Err(ConfigError::new(ConfigField::Shards, "0", Reason::ZeroShards));
    }
    if n > MAX_SHARD_NUMBER {
        return Err(ConfigError::new(ConfigField::Shards, &n.to_string(), Reason::TooManyShards));
    }
    Ok(())
}

fn check_gc_interval(gc: Option<Duration>) -> Result<(), ConfigError> {
    match gc {
        Some(d) if d < MIN_GC_INTERVAL => {
            Err(ConfigError::new(ConfigField::GcInterval, &format_go_duration(d), Reason::BelowMinimum))
        }
        _ => Ok(()),
    }
}

/// Which part of the configuration a [`ConfigError`] is about.
///
/// # Examples
/// ```
/// use localsession_core::config::{ConfigField, ManagerOptions};
///
/// let base = ManagerOptions::default();
/// let field = |s: &str| ManagerOptions::parse_env(s, base).unwrap_err().field();
/// assert_eq!(field("yes"), ConfigField::Implicit);
/// assert_eq!(field(",0"), ConfigField::Shards);
/// assert_eq!(field(",,10x"), ConfigField::GcInterval);
/// assert_eq!(field(",,,"), ConfigField::Format);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigField {
    /// The implicit-transmission flag (first field; Go's
    /// `EnableImplicitlyTransmitAsync`).
    Implicit,
    /// The shard number (second field; Go's `ShardNumber`).
    Shards,
    /// The GC interval (third field; Go's `GCInterval`).
    GcInterval,
    /// The string as a whole: more than three comma-separated fields.
    Format,
}

impl ConfigField {
    fn label(self) -> &'static str {
        match self {
            ConfigField::Implicit => "implicit transmit flag",
            ConfigField::Shards => "shard number",
            ConfigField::GcInterval => "GC interval",
            ConfigField::Format => "session config",
        }
    }
}

/// An invalid [`ManagerOptions`] field, from
/// [`ManagerOptions::parse_env`], [`str::parse`] or
/// [`ManagerOptions::validate`].
///
/// Its message names the field and quotes the offending value (escaped like a
/// Rust string literal). For an unparsable GC interval,
/// [`source`](core::error::Error::source) returns the [`DurationError`].
///
/// # Examples
/// ```
/// use core::error::Error;
/// use localsession_core::config::{ConfigField, DurationError, ManagerOptions};
///
/// let err = ManagerOptions::parse_env(",, 10x ", ManagerOptions::default()).unwrap_err();
/// assert_eq!(err.field(), ConfigField::GcInterval);
/// assert_eq!(err.value(), "10x");
/// assert_eq!(
///     err.to_string(),
///     r#"invalid GC interval "10x": unknown unit "x" (valid units are ns, us, µs, ms, s, m, h)"#
/// );
/// assert!(err.source().is_some_and(|s| s.is::<DurationError>()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: ConfigField,
    value: String,
    reason: Reason,
}

/// Why a [`ConfigError`] was raised.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reason {
    NotBool,
    NotDecimal,
    ZeroShards,
    TooManyShards,
    Duration(DurationError),
    BelowMinimum,
    TooManyFields,
}

impl ConfigError {
    fn new(field: ConfigField, value: &str, reason: Reason) -> Self {
        ConfigError { field, value: value.to_string(), reason }
    }

    /// The field that is invalid.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::config::{ConfigField, ManagerOptions};
    ///
    /// let err = "tru".parse::<ManagerOptions>().unwrap_err();
    /// assert_eq!(err.field(), ConfigField::Implicit);
    /// ```
    #[must_use]
    pub fn field(&self) -> ConfigField {
        self.field
    }

    /// The offending text, trimmed of surrounding ASCII whitespace; the whole
    /// input for [`ConfigField::Format`]; for errors about a value that did
    /// not come from text (from [`ManagerOptions::validate`] or the `base`
    /// of [`ManagerOptions::parse_env`]), the value rendered as text
    /// (durations with `format_go_duration`).
    ///
    /// # Examples
    /// ```
    /// use localsession_core::config::ManagerOptions;
    ///
    /// let err = "true, 0 ".parse::<ManagerOptions>().unwrap_err();
    /// assert_eq!(err.value(), "0");
    /// ```
    #[must_use]
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {:?}: ", self.field.label(), self.value)?;
        match &self.reason {
            Reason::NotBool => write!(f, "expected true or false (accepted: {BOOL_SPELLINGS})"),
            Reason::NotDecimal => f.write_str("not a decimal integer"),
            Reason::ZeroShards => f.write_str("must be at least 1"),
            Reason::TooManyShards => write!(f, "too large (the maximum is {MAX_SHARD_NUMBER})"),
            Reason::Duration(e) => e.fmt_reason(f),
            Reason::BelowMinimum => write!(f, "below the {} minimum", GoDuration(MIN_GC_INTERVAL)),
            Reason::TooManyFields => {
                f.write_str("expected at most 3 comma-separated fields ([implicit][,shards][,gc_interval])")
            }
        }
    }
}

impl core::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match &self.reason {
            Reason::Duration(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::error::Error as _;

    fn base() -> ManagerOptions {
        ManagerOptions::default()
    }

    fn parse(s: &str) -> Result<ManagerOptions, ConfigError> {
        ManagerOptions::parse_env(s, base())
    }

    fn err(s: &str) -> ConfigError {
        match parse(s) {
            Ok(opts) => panic!("{s:?} parsed as {opts:?}"),
            Err(e) => e,
        }
    }

    fn opts(implicit: bool, shards: usize, gc_secs: u64) -> ManagerOptions {
        ManagerOptions {
            shard_number: shards,
            gc_interval: Some(Duration::from_secs(gc_secs)),
            implicit_transmit: implicit,
        }
    }

    #[test]
    fn defaults_and_constants() {
        assert_eq!(base(), opts(false, 100, 600));
        assert_eq!(DEFAULT_SHARD_NUMBER, 100);
        assert_eq!(DEFAULT_GC_INTERVAL, Duration::from_secs(600));
        assert_eq!(MIN_GC_INTERVAL, Duration::from_secs(1));
        assert_eq!(ENV_KEY, "CLOUDWEGO_SESSION_CONFIG_KEY");
        assert_eq!(base().validate(), Ok(()));
    }

    #[test]
    fn validate() {
        let ok = |o: ManagerOptions| assert_eq!(o.validate(), Ok(()));
        ok(ManagerOptions { gc_interval: None, ..base() });
        ok(ManagerOptions { gc_interval: Some(MIN_GC_INTERVAL), ..base() });
        ok(ManagerOptions { shard_number: 1, ..base() });
        ok(ManagerOptions {
            shard_number: MAX_SHARD_NUMBER,
            gc_interval: Some(Duration::MAX),
            implicit_transmit: true,
        });
        let e = ManagerOptions { shard_number: usize::MAX, ..base() }.validate().unwrap_err();
        assert_eq!(e.field(), ConfigField::Shards);
        assert!(e.to_string().contains("too large"), "{e}");

        let e = ManagerOptions { shard_number: 0, gc_interval: Some(Duration::ZERO), ..base() }.validate().unwrap_err();
        assert_eq!(e.field(), ConfigField::Shards);
        assert_eq!(e.value(), "0");
        assert_eq!(e.to_string(), r#"invalid shard number "0": must be at least 1"#);
        assert!(e.source().is_none());

        let gc_err = |d: Duration| ManagerOptions { gc_interval: Some(d), ..base() }.validate().unwrap_err();
        let e = gc_err(Duration::from_millis(500));
        assert_eq!(e.field(), ConfigField::GcInterval);
        assert_eq!(e.value(), "500ms");
        assert_eq!(e.to_string(), r#"invalid GC interval "500ms": below the 1s minimum"#);
        assert!(e.source().is_none());
        assert_eq!(gc_err(Duration::ZERO).value(), "0s");
        assert_eq!(gc_err(Duration::from_nanos(999_999_999)).value(), "999.999999ms");
    }

    #[test]
    fn brief_examples() {
        assert_eq!(parse("true,10,1h"), Ok(opts(true, 10, 3600)));
        assert_eq!(parse("true"), Ok(opts(true, 100, 600)));
        assert_eq!(parse(",10"), Ok(opts(false, 10, 600)));
        assert_eq!(parse(",,30m"), Ok(opts(false, 100, 1800)));
        assert_eq!(parse("false,,"), Ok(base()));
        assert_eq!("true,10,1h".parse(), Ok(opts(true, 10, 3600)));
    }

    #[test]
    fn empty_input_and_fields_keep_base() {
        let custom = ManagerOptions { shard_number: 7, gc_interval: None, implicit_transmit: true };
        for s in ["", " ", " \t\r\n", ",", ",,", " , , ", "\t,\n,\r"] {
            assert_eq!(ManagerOptions::parse_env(s, custom), Ok(custom), "{s:?}");
            assert_eq!(parse(s), Ok(base()), "{s:?}");
        }
        // A present field replaces `None`.
        assert_eq!(
            ManagerOptions::parse_env(",,2s", custom),
            Ok(ManagerOptions { gc_interval: Some(Duration::from_secs(2)), ..custom })
        );
        assert_eq!(ManagerOptions::parse_env("0", custom), Ok(ManagerOptions { implicit_transmit: false, ..custom }));
    }

    #[test]
    fn partial_fields() {
        assert_eq!(parse("true,10"), Ok(opts(true, 10, 600)));
        assert_eq!(parse("true,,1h"), Ok(opts(true, 100, 3600)));
        assert_eq!(parse(",10,1h"), Ok(opts(false, 10, 3600)));
        assert_eq!(parse("1,"), Ok(opts(true, 100, 600)));
        assert_eq!(parse(",5,"), Ok(opts(false, 5, 600)));
    }

    #[test]
    fn whitespace_is_trimmed() {
        assert_eq!(parse(" true , 10 , 1h "), Ok(opts(true, 10, 3600)));
        assert_eq!(parse("\ttrue\n,\r10,  1h\r\n"), Ok(opts(true, 10, 3600)));
        assert_eq!(parse("  ,  ,  90s  "), Ok(opts(false, 100, 90)));
        // Only surrounding whitespace: inner whitespace is an error.
        assert_eq!(err("t rue").field(), ConfigField::Implicit);
        assert_eq!(err(",1 0").field(), ConfigField::Shards);
        assert_eq!(err(",,1 h").field(), ConfigField::GcInterval);
        // Non-ASCII whitespace is not trimmed.
        assert_eq!(err("\u{a0}true").field(), ConfigField::Implicit);
        assert_eq!(err(",\u{3000}10").field(), ConfigField::Shards);
    }

    #[test]
    fn parse_bool_set() {
        for s in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse(s).map(|o| o.implicit_transmit), Ok(true), "{s:?}");
        }
        for s in ["0", "f", "F", "FALSE", "false", "False"] {
            let on = ManagerOptions { implicit_transmit: true, ..base() };
            let got = ManagerOptions::parse_env(s, on).map(|o| o.implicit_transmit);
            assert_eq!(got, Ok(false), "{s:?}");
        }
        for s in ["tru", "tRuE", "TRue", "yes", "no", "on", "off", "2", "01", "y", "truee", "１", "true\0", "-1"] {
            let e = err(s);
            assert_eq!(e.field(), ConfigField::Implicit, "{s:?}");
            assert_eq!(e.value(), s);
        }
        assert_eq!(
            err(" tru ,10").to_string(),
            "invalid implicit transmit flag \"tru\": expected true or false \
             (accepted: 1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False)"
        );
    }

    #[test]
    fn shards() {
        let n = |s: &str| parse(&alloc::format!(",{s}")).map(|o| o.shard_number);
        assert_eq!(n("1"), Ok(1));
        assert_eq!(n("+10"), Ok(10));
        assert_eq!(n("007"), Ok(7));
        assert_eq!(n(&MAX_SHARD_NUMBER.to_string()), Ok(MAX_SHARD_NUMBER));
        // Accepted before, then `ShardedStore::new` panicked ("capacity overflow").
        assert!(n(&usize::MAX.to_string()).unwrap_err().to_string().contains("too large"));
        assert!(n(&(MAX_SHARD_NUMBER + 1).to_string()).is_err());

        let e = |s: &str| err(&alloc::format!("true,{s},1h"));
        let msg = |s: &str| e(s).to_string();
        for s in ["0", "+0", "000", "-0", "-5", "-99999999999999999999"] {
            assert_eq!(e(s).field(), ConfigField::Shards, "{s:?}");
            assert_eq!(msg(s), alloc::format!("invalid shard number {s:?}: must be at least 1"));
        }
        for s in ["ab", "+", "-", "+-1", "--1", "1.5", "1e3", "0x10", "1_000", "１０", "10\0", "١"] {
            assert_eq!(e(s).field(), ConfigField::Shards, "{s:?}");
            assert_eq!(e(s).value(), s);
            assert_eq!(msg(s), alloc::format!("invalid shard number {s:?}: not a decimal integer"));
        }
        assert_eq!(msg("ab"), r#"invalid shard number "ab": not a decimal integer"#);
        assert_eq!(msg("10\0"), r#"invalid shard number "10\0": not a decimal integer"#);

        let too_big = e("99999999999999999999");
        assert_eq!(too_big.field(), ConfigField::Shards);
        assert_eq!(too_big.value(), "99999999999999999999");
        assert!(too_big.to_string().contains("too large"));
        let one_more = (u128::try_from(usize::MAX).unwrap() + 1).to_string();
        assert_eq!(e(&one_more).field(), ConfigField::Shards);
    }

    #[test]
    fn gc_interval_field() {
        let gc = |s: &str| parse(&alloc::format!(",,{s}")).map(|o| o.gc_interval);
        assert_eq!(gc("1s"), Ok(Some(Duration::from_secs(1))));
        assert_eq!(gc("1.5h"), Ok(Some(Duration::from_secs(5400))));
        assert_eq!(gc("+2m"), Ok(Some(Duration::from_secs(120))));
        assert_eq!(gc("1000ms"), Ok(Some(Duration::from_secs(1))));

        let e = |s: &str| {
            let e = err(&alloc::format!("true,10,{s}"));
            assert_eq!(e.field(), ConfigField::GcInterval, "{s:?}");
            assert_eq!(e.value(), s.trim_ascii());
            e
        };
        for s in ["500ms", "0", "0s", "+0", "999ms", "999999999ns", " 0.5s "] {
            let got = e(s);
            assert!(got.source().is_none());
            assert_eq!(
                got.to_string(),
                alloc::format!("invalid GC interval {:?}: below the 1s minimum", s.trim_ascii())
            );
        }
        assert_eq!(e("500ms").to_string(), r#"invalid GC interval "500ms": below the 1s minimum"#);
        assert_eq!(
            e("10x").to_string(),
            r#"invalid GC interval "10x": unknown unit "x" (valid units are ns, us, µs, ms, s, m, h)"#
        );
        for s in [
            "10x",
            "10",
            ".",
            "-1s",
            "-0",
            "1h\u{0}",
            "9999999999999999999h",
            "99999999999999999999s",
            "１０s",
            "10ｓ",
            "1h 30m",
            "never",
        ] {
            let got = e(s);
            let src = got.source().and_then(|s| s.downcast_ref::<DurationError>());
            let src = src.unwrap_or_else(|| panic!("{s:?}: no DurationError source"));
            assert_eq!(src.input(), s);
            // The GC message ends with the duration error's explanation.
            let duration_msg = src.to_string();
            let reason = duration_msg.split_once(": ").unwrap().1;
            assert_eq!(got.to_string(), alloc::format!("invalid GC interval {s:?}: {reason}"));
        }
        assert_eq!(
            e("1h\u{0}").to_string(),
            r#"invalid GC interval "1h\0": unknown unit "h\0" (valid units are ns, us, µs, ms, s, m, h)"#
        );
        assert!(e("-1s").to_string().contains("negative"));
        assert!(e("9999999999999999999h").to_string().contains("out of range"));
    }

    #[test]
    fn too_many_fields() {
        let e = err("true,1,1h,4");
        assert_eq!(e.field(), ConfigField::Format);
        assert_eq!(e.value(), "true,1,1h,4");
        assert_eq!(
            e.to_string(),
            "invalid session config \"true,1,1h,4\": expected at most 3 \
             comma-separated fields ([implicit][,shards][,gc_interval])"
        );
        assert!(e.source().is_none());
        // Reported before any bad field, and the value is the trimmed input.
        let e = err(" tru,0,0,  ");
        assert_eq!(e.field(), ConfigField::Format);
        assert_eq!(e.value(), "tru,0,0,");
        assert_eq!(err(",,,").field(), ConfigField::Format);
        assert_eq!(err("1,2,3s,4,5").field(), ConfigField::Format);
    }

    #[test]
    fn error_order_and_invalid_base() {
        // First bad field wins.
        assert_eq!(err("tru,0,10x").field(), ConfigField::Implicit);
        assert_eq!(err("true,0,10x").field(), ConfigField::Shards);
        assert_eq!(err("true,1,10x").field(), ConfigField::GcInterval);

        let bad_base =
            ManagerOptions { shard_number: 0, gc_interval: Some(Duration::from_millis(10)), implicit_transmit: false };
        let e = |s: &str| ManagerOptions::parse_env(s, bad_base).unwrap_err();
        assert_eq!(e("").field(), ConfigField::Shards);
        assert_eq!(e("").value(), "0");
        assert_eq!(e("bad").field(), ConfigField::Implicit);
        let gc = e(",4");
        assert_eq!(gc.field(), ConfigField::GcInterval);
        assert_eq!(gc.value(), "10ms");
        assert_eq!(
            ManagerOptions::parse_env(",4,1m", bad_base),
            Ok(ManagerOptions {
                shard_number: 4,
                gc_interval: Some(Duration::from_secs(60)),
                implicit_transmit: false,
            })
        );
    }

    #[test]
    fn from_str_uses_defaults() {
        assert_eq!("".parse(), Ok(base()));
        assert_eq!("t,16".parse(), Ok(opts(true, 16, 600)));
        assert_eq!("x".parse::<ManagerOptions>().map_err(|e| e.field()), Err(ConfigField::Implicit));
    }
}

//! Session-manager configuration: [`ManagerOptions`] and a parser for the
//! value format of Go's `CLOUDWEGO_SESSION_CONFIG_KEY` environment variable.
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
//! * `shards` is a decimal integer of at least 1 (a leading `+` is allowed).
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

/// Units accepted by `parse_go_duration`, as listed in error messages.
const VALID_UNITS: &str = "ns, us, µs, ms, s, m, h";

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
    /// Number of shards session ids are spread over; must be at least 1
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
/// which must be in `1..=usize::MAX`.
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

/// Parses a duration in Go's `time.ParseDuration` syntax.
///
/// The input is a sequence of decimal numbers, each with an optional fraction
/// and a mandatory unit: `ns`, `us`, `µs` (U+00B5), `μs` (U+03BC), `ms`, `s`,
/// `m` or `h`; for example `300ms`, `1.5h`, `2h45m` or `1h0m0.5s`. A single
/// leading `+` is allowed and `0` on its own means zero. No whitespace is
/// allowed anywhere.
///
/// Fractions are exact: the fractional part of each number contributes its
/// exact value truncated to whole nanoseconds (`1.5h` is exactly 90 minutes,
/// `0.9999999999s` is 999 999 999 ns). Go computes the same truncation in
/// floating point, which agrees for all practical inputs.
///
/// # Errors
///
/// A [`DurationError`] naming the input when it is empty, negative (any
/// leading `-`, since a [`Duration`] cannot be negative), has no digits
/// where a number is expected (`"."`, `"x1s"`), lacks a unit (`"10"`), has
/// an unknown unit (`"10x"`, `"1h "`), or exceeds `u64::MAX` nanoseconds
/// (about 584 years).
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use localsession_core::__private::parse_go_duration;
///
/// assert_eq!(parse_go_duration("300ms")?, Duration::from_millis(300));
/// assert_eq!(parse_go_duration("1.5h")?, Duration::from_secs(90 * 60));
/// assert_eq!(parse_go_duration("2h45m")?, Duration::from_secs(2 * 3600 + 45 * 60));
/// assert_eq!(parse_go_duration("1h0m0.5s")?, Duration::from_millis(3_600_500));
/// assert_eq!(parse_go_duration("0")?, Duration::ZERO);
/// assert_eq!(parse_go_duration("+1µs")?, Duration::from_micros(1));
///
/// let err = parse_go_duration("10x").unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     r#"invalid duration "10x": unknown unit "x" (valid units are ns, us, µs, ms, s, m, h)"#
/// );
/// assert!(parse_go_duration("-1s").is_err());
/// assert!(parse_go_duration("10").is_err());
/// # Ok::<(), localsession_core::config::DurationError>(())
/// ```
pub(crate) fn parse_go_duration(s: &str) -> Result<Duration, DurationError> {
    let err = |kind| DurationError { input: s.to_string(), kind };
    if s.starts_with('-') {
        return Err(err(DurationErrorKind::Negative));
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(err(DurationErrorKind::Empty));
    }

    let mut total: u64 = 0;
    while let Some(first) = rest.chars().next() {
        if first != '.' && !first.is_ascii_digit() {
            return Err(err(DurationErrorKind::UnexpectedChar(first)));
        }
        let (int_digits, after_int) = split_while(rest, |b| b.is_ascii_digit());
        let int_value = parse_u64(int_digits).ok_or_else(|| err(DurationErrorKind::Overflow))?;
        let (frac_digits, after_number) = match after_int.strip_prefix('.') {
            Some(after_dot) => split_while(after_dot, |b| b.is_ascii_digit()),
            None => ("", after_int),
        };
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(err(DurationErrorKind::NoDigits));
        }

        // The unit is everything up to the next number (Go's rule), so
        // "1h " has the unknown unit "h ".
        let (unit, after_unit) = split_while(after_number, |b| b != b'.' && !b.is_ascii_digit());
        if unit.is_empty() {
            return Err(err(DurationErrorKind::MissingUnit));
        }
        let unit_nanos = unit_nanos(unit).ok_or_else(|| err(DurationErrorKind::UnknownUnit(unit.to_string())))?;

        let component = int_value
            .checked_mul(unit_nanos)
            .and_then(|whole| whole.checked_add(fraction_nanos(frac_digits, unit_nanos)))
            .ok_or_else(|| err(DurationErrorKind::Overflow))?;
        total = total.checked_add(component).ok_or_else(|| err(DurationErrorKind::Overflow))?;
        rest = after_unit;
    }
    Ok(Duration::from_nanos(total))
}

/// Splits `s` before the first byte that does not satisfy `keep`.
///
/// `keep` must reject every non-ASCII byte or accept all of them, so the split
/// falls on a character boundary; the fallback is unreachable in that case.
fn split_while(s: &str, keep: impl Fn(u8) -> bool) -> (&str, &str) {
    let end = s.bytes().position(|b| !keep(b)).unwrap_or(s.len());
    s.split_at_checked(end).unwrap_or((s, ""))
}

/// Parses ASCII digits (possibly none, giving 0); `None` on overflow.
fn parse_u64(digits: &str) -> Option<u64> {
    digits.bytes().try_fold(0_u64, |acc, b| acc.checked_mul(10)?.checked_add(u64::from(b.wrapping_sub(b'0'))))
}

/// `floor(0.<digits> * unit)`, exactly, for any number of digits.
///
/// Horner's scheme from the last digit: with `T` the exact value of the
/// digits after `d` times `unit`, the value including `d` is
/// `(d * unit + T) / 10`, and `floor((d * unit + T) / 10) ==
/// floor((d * unit + floor(T)) / 10)`, so only the integer part needs to be
/// carried. It stays below `unit` (at most 3.6e12), so nothing overflows.
fn fraction_nanos(digits: &str, unit: u64) -> u64 {
    digits.bytes().rev().fold(0, |carried, b| {
        let digit = u64::from(b.wrapping_sub(b'0')).min(9);
        // Cannot saturate: digit <= 9 and carried < unit <= 3.6e12.
        digit.saturating_mul(unit).saturating_add(carried) / 10
    })
}

fn unit_nanos(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => 1,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        _ => return None,
    })
}

/// Formats a duration the way Go's `time.Duration.String` does.
///
/// Durations of a second or more are written as hours, minutes and seconds
/// with a decimal fraction of a second, leading zero units omitted (`1h0m0s`,
/// `1m30s`, `1.5s`); shorter ones use the largest of `ms`, `µs` (U+00B5) and
/// `ns` that keeps the integer part non-zero (`500ms`, `1.5µs`); zero is
/// `0s`. Hours are not folded into days.
///
/// `parse_go_duration` reads the output back to the same value for every
/// duration of at most `u64::MAX` nanoseconds (about 584 years).
///
/// # Examples
/// ```
/// use core::time::Duration;
/// use localsession_core::__private::{format_go_duration, parse_go_duration};
///
/// assert_eq!(format_go_duration(Duration::from_secs(3600)), "1h0m0s");
/// assert_eq!(format_go_duration(Duration::from_secs(90)), "1m30s");
/// assert_eq!(format_go_duration(Duration::from_millis(500)), "500ms");
/// assert_eq!(format_go_duration(Duration::from_millis(1500)), "1.5s");
/// assert_eq!(format_go_duration(Duration::from_nanos(1500)), "1.5µs");
/// assert_eq!(format_go_duration(Duration::ZERO), "0s");
///
/// let d = Duration::new(12_345, 6_789);
/// assert_eq!(parse_go_duration(&format_go_duration(d)), Ok(d));
/// ```
#[must_use]
pub(crate) fn format_go_duration(d: Duration) -> String {
    GoDuration(d).to_string()
}

/// [`Duration`] displayed in Go's format (see `format_go_duration`).
#[derive(Debug, Clone, Copy)]
struct GoDuration(Duration);

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        let nanos = self.0.subsec_nanos();
        if secs == 0 {
            let (int, frac, width, unit) = match nanos {
                0 => return f.write_str("0s"),
                1..1_000 => (nanos, 0, 0, "ns"),
                1_000..1_000_000 => (nanos / 1_000, nanos % 1_000, 3, "\u{b5}s"),
                _ => (nanos / 1_000_000, nanos % 1_000_000, 6, "ms"),
            };
            write!(f, "{int}")?;
            write_fraction(f, frac, width)?;
            return f.write_str(unit);
        }
        let hours = secs / 3_600;
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if secs >= 60 {
            write!(f, "{}m", secs / 60 % 60)?;
        }
        write!(f, "{}", secs % 60)?;
        write_fraction(f, nanos, 9)?;
        f.write_str("s")
    }
}

/// Writes `.<frac>` with `width` digits minus trailing zeros; nothing if 0.
fn write_fraction(f: &mut fmt::Formatter<'_>, mut frac: u32, mut width: usize) -> fmt::Result {
    if frac == 0 {
        return Ok(());
    }
    while frac.is_multiple_of(10) {
        frac /= 10;
        width = width.saturating_sub(1);
    }
    write!(f, ".{frac:0width$}")
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
            Reason::TooManyShards => write!(f, "too large (the maximum is {})", usize::MAX),
            Reason::Duration(e) => e.kind.fmt(f),
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

/// A string that Go's duration syntax rejects (`CLOUDWEGO_SESSION_CONFIG_KEY`'s GC interval).
///
/// Its message quotes the input (escaped like a Rust string literal) and says
/// what is wrong with it.
///
/// # Examples
/// ```
/// use localsession_core::__private::parse_go_duration;
///
/// let err = parse_go_duration("-5m").unwrap_err();
/// assert_eq!(err.input(), "-5m");
/// assert_eq!(
///     err.to_string(),
///     r#"invalid duration "-5m": negative durations are not allowed"#
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError {
    input: String,
    kind: DurationErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DurationErrorKind {
    Empty,
    Negative,
    UnexpectedChar(char),
    NoDigits,
    MissingUnit,
    UnknownUnit(String),
    Overflow,
}

impl DurationError {
    /// The rejected input, exactly as given.
    ///
    /// # Examples
    /// ```
    /// use localsession_core::__private::parse_go_duration;
    ///
    /// assert_eq!(parse_go_duration("1 h").unwrap_err().input(), "1 h");
    /// ```
    #[must_use]
    pub fn input(&self) -> &str {
        &self.input
    }
}

impl fmt::Display for DurationErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const EXPECTED: &str = r#"expected a number followed by a unit, e.g. "10m" or "1h30m""#;
        match self {
            DurationErrorKind::Empty => write!(f, "empty ({EXPECTED})"),
            DurationErrorKind::Negative => f.write_str("negative durations are not allowed"),
            DurationErrorKind::UnexpectedChar(c) => {
                write!(f, "unexpected character {c:?} ({EXPECTED})")
            }
            DurationErrorKind::NoDigits => f.write_str("'.' without digits"),
            DurationErrorKind::MissingUnit => {
                write!(f, "missing unit (valid units are {VALID_UNITS})")
            }
            DurationErrorKind::UnknownUnit(unit) => {
                write!(f, "unknown unit {unit:?} (valid units are {VALID_UNITS})")
            }
            DurationErrorKind::Overflow => write!(
                f,
                "out of range (the maximum is {}, about 584 years)",
                GoDuration(Duration::from_nanos(u64::MAX))
            ),
        }
    }
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid duration {:?}: {}", self.input, self.kind)
    }
}

impl core::error::Error for DurationError {}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use core::error::Error as _;

    const SEC: u64 = 1_000_000_000;

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

    fn dur(s: &str) -> Duration {
        match parse_go_duration(s) {
            Ok(d) => d,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    fn dur_err(s: &str) -> DurationErrorKind {
        match parse_go_duration(s) {
            Ok(d) => panic!("{s:?} parsed as {d:?}"),
            Err(e) => {
                assert_eq!(e.input(), s);
                e.kind
            }
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
        ok(ManagerOptions { shard_number: usize::MAX, gc_interval: Some(Duration::MAX), implicit_transmit: true });

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
        assert_eq!(n(&usize::MAX.to_string()), Ok(usize::MAX));

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
    fn go_durations() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("+0", 0),
            ("0s", 0),
            ("0.0h", 0),
            ("300ms", 300_000_000),
            ("1.5h", 5_400 * SEC),
            ("2h45m", (2 * 3_600 + 45 * 60) * SEC),
            ("1h0m0.5s", 3_600 * SEC + SEC / 2),
            ("1ns", 1),
            ("1us", 1_000),
            ("1\u{b5}s", 1_000),
            ("1\u{3bc}s", 1_000),
            ("1.5µs", 1_500),
            ("1ms", 1_000_000),
            ("1s", SEC),
            ("1m", 60 * SEC),
            ("1h", 3_600 * SEC),
            ("+5s", 5 * SEC),
            (".5s", SEC / 2),
            ("1.s", SEC),
            ("1.5m30.25s", 120 * SEC + SEC / 4),
            ("1s1s1s", 3 * SEC),
            ("1m1h", 3_660 * SEC),
            ("00001s", SEC),
            ("0.5ns", 0),
            ("1.9ns", 1),
            // Digits beyond nanosecond precision are truncated.
            ("1.0000000001s", SEC),
            ("0.9999999999s", SEC - 1),
            ("0.99999999999999999999999999999999999h", 3_600 * SEC - 1),
            ("1.1234567891h", 3_600 * SEC + 444_444_440_760),
            ("0.1234567890123456789012345678901234567890h", 444_444_440_444),
            ("18446744073709551615ns", u64::MAX),
            ("18446744073.709551615s", u64::MAX),
            ("5124095h", 5_124_095 * 3_600 * SEC),
            ("5124095h34m33.709551615s", u64::MAX),
        ];
        for &(s, nanos) in cases {
            assert_eq!(dur(s), Duration::from_nanos(nanos), "{s:?}");
        }
    }

    #[test]
    fn go_duration_errors() {
        use DurationErrorKind as K;
        assert_eq!(dur_err(""), K::Empty);
        assert_eq!(dur_err("+"), K::Empty);
        assert_eq!(dur_err("-"), K::Negative);
        assert_eq!(dur_err("-0"), K::Negative);
        assert_eq!(dur_err("-1s"), K::Negative);
        assert_eq!(dur_err("+-1s"), K::UnexpectedChar('-'));
        assert_eq!(dur_err("++1s"), K::UnexpectedChar('+'));
        assert_eq!(dur_err("."), K::NoDigits);
        assert_eq!(dur_err(".s"), K::NoDigits);
        assert_eq!(dur_err("1s.s"), K::NoDigits);
        assert_eq!(dur_err("1h."), K::NoDigits);
        assert_eq!(dur_err("s"), K::UnexpectedChar('s'));
        assert_eq!(dur_err(" 1h"), K::UnexpectedChar(' '));
        assert_eq!(dur_err("１０s"), K::UnexpectedChar('１'));
        assert_eq!(dur_err("µs"), K::UnexpectedChar('µ'));
        assert_eq!(dur_err("1"), K::MissingUnit);
        assert_eq!(dur_err("00"), K::MissingUnit);
        assert_eq!(dur_err("1.5"), K::MissingUnit);
        assert_eq!(dur_err("1h30"), K::MissingUnit);
        assert_eq!(dur_err("1..5s"), K::MissingUnit);
        assert_eq!(dur_err("1.5.5s"), K::MissingUnit);
        assert_eq!(dur_err("10x"), K::UnknownUnit("x".into()));
        assert_eq!(dur_err("1h "), K::UnknownUnit("h ".into()));
        assert_eq!(dur_err("1 h"), K::UnknownUnit(" h".into()));
        assert_eq!(dur_err("1h\u{0}"), K::UnknownUnit("h\0".into()));
        assert_eq!(dur_err("1H"), K::UnknownUnit("H".into()));
        assert_eq!(dur_err("1d"), K::UnknownUnit("d".into()));
        assert_eq!(dur_err("1sec"), K::UnknownUnit("sec".into()));
        assert_eq!(dur_err("1ｓ"), K::UnknownUnit("ｓ".into()));
        assert_eq!(dur_err("1\u{3bc}"), K::UnknownUnit("\u{3bc}".into()));
        assert_eq!(dur_err("9999999999999999999h"), K::Overflow);
        assert_eq!(dur_err("99999999999999999999"), K::Overflow);
        assert_eq!(dur_err("99999999999999999999ns"), K::Overflow);
        assert_eq!(dur_err("18446744073709551616ns"), K::Overflow);
        assert_eq!(dur_err("18446744073.709551616s"), K::Overflow);
        assert_eq!(dur_err("5124096h"), K::Overflow);
        assert_eq!(dur_err("5124095h34m34s"), K::Overflow);
        assert_eq!(dur_err("18446744073709551615ns1ns"), K::Overflow);
    }

    #[test]
    fn go_duration_messages() {
        let msg = |s: &str| parse_go_duration(s).unwrap_err().to_string();
        assert_eq!(
            msg(""),
            r#"invalid duration "": empty (expected a number followed by a unit, e.g. "10m" or "1h30m")"#
        );
        assert_eq!(msg("-1s"), r#"invalid duration "-1s": negative durations are not allowed"#);
        assert_eq!(
            msg("x1s"),
            r#"invalid duration "x1s": unexpected character 'x' (expected a number followed by a unit, e.g. "10m" or "1h30m")"#
        );
        assert_eq!(msg("."), r#"invalid duration ".": '.' without digits"#);
        assert_eq!(msg("10"), r#"invalid duration "10": missing unit (valid units are ns, us, µs, ms, s, m, h)"#);
        assert_eq!(msg("10x"), r#"invalid duration "10x": unknown unit "x" (valid units are ns, us, µs, ms, s, m, h)"#);
        assert_eq!(
            msg("9999999999999999999h"),
            r#"invalid duration "9999999999999999999h": out of range (the maximum is 5124095h34m33.709551615s, about 584 years)"#
        );
    }

    #[test]
    fn format() {
        let f = |nanos: u64| format_go_duration(Duration::from_nanos(nanos));
        assert_eq!(f(0), "0s");
        assert_eq!(f(1), "1ns");
        assert_eq!(f(999), "999ns");
        assert_eq!(f(1_000), "1µs");
        assert_eq!(f(1_500), "1.5µs");
        assert_eq!(f(1_001), "1.001µs");
        assert_eq!(f(500_000_000), "500ms");
        assert_eq!(f(1_234_567), "1.234567ms");
        assert_eq!(f(SEC), "1s");
        assert_eq!(f(SEC + SEC / 2), "1.5s");
        assert_eq!(f(SEC + 1), "1.000000001s");
        assert_eq!(f(59 * SEC), "59s");
        assert_eq!(f(60 * SEC), "1m0s");
        assert_eq!(f(90 * SEC), "1m30s");
        assert_eq!(f(3_600 * SEC), "1h0m0s");
        assert_eq!(f(3_600 * SEC + SEC / 2), "1h0m0.5s");
        assert_eq!(f(2 * 3_600 * SEC + 45 * 60 * SEC), "2h45m0s");
        assert_eq!(f(u64::MAX), "5124095h34m33.709551615s");
        // Beyond u64 nanoseconds: formats without overflow.
        assert_eq!(format_go_duration(Duration::MAX), "5124095576030431h0m15.999999999s");
    }

    #[test]
    fn format_round_trips() {
        let nanos: Vec<u64> = alloc::vec![
            0,
            1,
            999,
            1_000,
            1_500,
            999_999,
            1_000_001,
            SEC - 1,
            SEC,
            SEC + 1,
            90 * SEC,
            3_600 * SEC,
            3_600 * SEC + 1,
            86_400 * SEC * 365 * 100 + 123_456_789,
            u64::MAX,
        ];
        for n in nanos {
            let d = Duration::from_nanos(n);
            assert_eq!(parse_go_duration(&format_go_duration(d)), Ok(d), "{n}");
        }
    }

    #[test]
    fn from_str_uses_defaults() {
        assert_eq!("".parse(), Ok(base()));
        assert_eq!("t,16".parse(), Ok(opts(true, 16, 600)));
        assert_eq!("x".parse::<ManagerOptions>().map_err(|e| e.field()), Err(ConfigField::Implicit));
    }
}

//! Go's duration syntax: the private parser and formatter of the GC-interval field, and its error.
//!
//! Used for the GC-interval field of `CLOUDWEGO_SESSION_CONFIG_KEY`.
//!
//! [`parse_go_duration`] reads Go's `time.ParseDuration` syntax exactly (fractions are exact,
//! not floating point); [`format_go_duration`] writes `time.Duration.String`'s format, which the
//! parser reads back to the same value. Neither is public API: the configuration parser uses
//! them, and the fuzz harness reaches them through `__private`. [`DurationError`] is public, as
//! the [`source`](core::error::Error::source) of a `ConfigError`, at its `config` path.

use alloc::string::{String, ToString};
use core::fmt;
use core::time::Duration;

/// Units accepted by `parse_go_duration`, as listed in error messages.
const VALID_UNITS: &str = "ns, us, µs, ms, s, m, h";

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
pub(crate) struct GoDuration(pub(crate) Duration);

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

    /// What is wrong with the input, without the input (a `ConfigError` quotes it itself).
    pub(crate) fn fmt_reason(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.kind, f)
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

    const SEC: u64 = 1_000_000_000;

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
}

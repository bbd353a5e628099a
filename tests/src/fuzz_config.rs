//! Fuzz interpreter for the `CLOUDWEGO_SESSION_CONFIG_KEY` parser and Go durations.
//!
//! [`run`] reads the input as a (lossy UTF-8) value of the environment variable and checks what
//! a user relies on:
//!
//! - [`ManagerOptions::parse_env`] never panics; on success the options validate, have at least
//!   one shard and a GC interval of at least 1 s (or none, when the base has none);
//! - an error quotes its value as `{:?}` renders it and names its field; the value comes from
//!   the input (for a valid base);
//! - the result is exactly what a small reference parser written here says, over three bases
//!   (Go's defaults, a base without GC, and an invalid base whose errors must surface when a
//!   field is left empty);
//! - accepted options written back in the same format parse to the same options;
//! - [`parse_go_duration`] agrees with a reference that computes fractions by exact decimal
//!   multiplication, and `parse_go_duration(&format_go_duration(d)) == Ok(d)` for every
//!   duration it accepts (and for a duration decoded from the raw bytes).
//!
//! The reference parsers are deliberately written differently from the library's (a character
//! state machine, and a big-decimal product instead of Horner's scheme), so that they do not
//! share its mistakes.

use core::error::Error as _;
use core::hint::black_box;
use core::time::Duration;

use localsession_core::__private::{format_go_duration, parse_go_duration};
use localsession_core::config::{ConfigError, ConfigField, DurationError, ManagerOptions};

const NS: u64 = 1;
const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;
const MIN_GC: Duration = Duration::from_secs(1);

/// Interprets `data` as a configuration string and checks every invariant; panics on a
/// violation.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;

    let bases = [
        ManagerOptions::default(),
        ManagerOptions { shard_number: 1, gc_interval: None, implicit_transmit: true },
        // Invalid: errors about it must surface (with a rendered value) when a field is empty.
        ManagerOptions { shard_number: 0, gc_interval: Some(Duration::from_millis(10)), implicit_transmit: false },
    ];
    for (i, base) in bases.into_iter().enumerate() {
        let base_valid = i < 2;
        let got = ManagerOptions::parse_env(s, base);
        check_config(s, base, base_valid, &got);
        let _ = black_box(got);
    }
    let parsed: Result<ManagerOptions, ConfigError> = s.parse();
    assert_eq!(parsed, ManagerOptions::parse_env(s, ManagerOptions::default()), "FromStr differs from parse_env");

    // Durations: the whole input, and each field both raw and trimmed.
    check_duration(s);
    for field in s.split(',').take(8) {
        check_duration(field);
        check_duration(field.trim_ascii());
    }

    // A duration decoded from the raw bytes: formatting never panics, and round-trips up to
    // u64::MAX nanoseconds.
    if let Some(d) = duration_from_bytes(data) {
        let formatted = format_go_duration(d);
        if d.as_nanos() <= u128::from(u64::MAX) {
            assert_eq!(parse_go_duration(&formatted), Ok(d), "round trip of {d:?} via {formatted:?}");
        }
        black_box(formatted);
    }
}

/// Checks one `parse_env` result against the invariants and the reference parser.
fn check_config(s: &str, base: ManagerOptions, base_valid: bool, got: &Result<ManagerOptions, ConfigError>) {
    let summary = got.as_ref().map(|o| *o).map_err(|e| (e.field(), e.value().to_owned()));
    assert_eq!(summary, reference_config(s, base), "{s:?} (base {base:?}): parse_env disagrees with the reference");
    match got {
        Ok(o) => {
            assert!(o.validate().is_ok(), "{s:?}: accepted options do not validate: {o:?}");
            assert!(o.shard_number >= 1, "{s:?}: zero shards accepted");
            assert!(o.gc_interval.is_none_or(|d| d >= MIN_GC), "{s:?}: GC interval below 1s accepted: {o:?}");
            // Written back in the same format, the options parse to themselves.
            let gc = o.gc_interval.map(format_go_duration).unwrap_or_default();
            let written = format!("{},{},{gc}", o.implicit_transmit, o.shard_number);
            assert_eq!(ManagerOptions::parse_env(&written, base).as_ref(), Ok(o), "{written:?} does not round-trip");
            if let Some(d) = o.gc_interval {
                assert_round_trip(d);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            let quoted = format!("{:?}", e.value());
            assert!(msg.contains(&quoted), "{s:?}: message {msg:?} does not quote the value {quoted}");
            let label = field_label(e.field());
            assert!(msg.contains(label), "{s:?}: message {msg:?} does not name the field ({label})");
            assert!(msg.starts_with(&format!("invalid {label} {quoted}: ")), "{s:?}: message {msg:?}");
            if base_valid {
                assert!(s.contains(e.value()), "{s:?}: error value {:?} is not from the input", e.value());
            }
            // An unparsable GC interval (not one below the minimum, nor the base's) carries the
            // duration error as its source.
            let gc_text = s.split(',').nth(2).unwrap_or_default().trim_ascii();
            let unparsable_gc =
                e.field() == ConfigField::GcInterval && !gc_text.is_empty() && reference_duration(gc_text).is_none();
            match e.source().map(|src| src.downcast_ref::<DurationError>()) {
                Some(Some(src)) => {
                    assert!(unparsable_gc, "{s:?}: unexpected duration source {src:?}");
                    assert_eq!(src.input(), e.value(), "{s:?}: the source's input is not the value");
                }
                Some(None) => panic!("{s:?}: a source that is not a DurationError"),
                None => assert!(!unparsable_gc, "{s:?}: unparsable GC interval without a source"),
            }
        }
    }
}

fn field_label(field: ConfigField) -> &'static str {
    match field {
        ConfigField::Implicit => "implicit transmit flag",
        ConfigField::Shards => "shard number",
        ConfigField::GcInterval => "GC interval",
        ConfigField::Format => "session config",
    }
}

/// What `parse_env(s, base)` must return: the options, or the field and value of the error.
fn reference_config(s: &str, base: ManagerOptions) -> Result<ManagerOptions, (ConfigField, String)> {
    let fields: Vec<&str> = s.split(',').collect();
    if fields.len() > 3 {
        return Err((ConfigField::Format, s.trim_ascii().to_owned()));
    }
    let field = |i: usize| fields.get(i).map_or("", |f| f.trim_ascii());
    let mut out = base;

    let implicit = field(0);
    if !implicit.is_empty() {
        out.implicit_transmit = match implicit {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => true,
            "0" | "f" | "F" | "FALSE" | "false" | "False" => false,
            _ => return Err((ConfigField::Implicit, implicit.to_owned())),
        };
    }

    let shards = field(1);
    if shards.is_empty() {
        if base.shard_number == 0 {
            return Err((ConfigField::Shards, "0".to_owned()));
        }
    } else {
        out.shard_number = reference_shards(shards).ok_or_else(|| (ConfigField::Shards, shards.to_owned()))?;
    }

    let gc = field(2);
    if gc.is_empty() {
        if let Some(d) = base.gc_interval.filter(|&d| d < MIN_GC) {
            return Err((ConfigField::GcInterval, format_go_duration(d)));
        }
    } else {
        let d = reference_duration(gc).filter(|&n| n >= SEC).ok_or_else(|| (ConfigField::GcInterval, gc.to_owned()))?;
        out.gc_interval = Some(Duration::from_nanos(d));
    }
    Ok(out)
}

/// Go's `Atoi` restricted to `1..=MAX_SHARD_NUMBER`.
fn reference_shards(text: &str) -> Option<usize> {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) || text.starts_with('-') {
        return None;
    }
    let n: u128 = digits.trim_start_matches('0').chars().try_fold(0u128, |acc, c| {
        let next = acc * 10 + u128::from(c.to_digit(10)?);
        (next <= usize::MAX as u128).then_some(next)
    })?;
    usize::try_from(n).ok().filter(|&n| (1..=localsession_core::config::MAX_SHARD_NUMBER).contains(&n))
}

/// Reference for Go's `time.ParseDuration` restricted to non-negative `u64` nanoseconds.
fn reference_duration(s: &str) -> Option<u64> {
    if s.starts_with('-') {
        return None;
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Some(0);
    }
    if s.is_empty() {
        return None;
    }
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut total: u64 = 0;
    while i < chars.len() {
        let int_start = i;
        while i < chars.len() && chars[i].is_ascii_digit() {
            i += 1;
        }
        let int: String = chars[int_start..i].iter().collect();
        let mut frac = String::new();
        if i < chars.len() && chars[i] == '.' {
            i += 1;
            let frac_start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            frac = chars[frac_start..i].iter().collect();
        }
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let unit_start = i;
        while i < chars.len() && chars[i] != '.' && !chars[i].is_ascii_digit() {
            i += 1;
        }
        let unit: String = chars[unit_start..i].iter().collect();
        let unit = match unit.as_str() {
            "ns" => NS,
            "us" | "\u{b5}s" | "\u{3bc}s" => US,
            "ms" => MS,
            "s" => SEC,
            "m" => 60 * SEC,
            "h" => 3_600 * SEC,
            _ => return None,
        };
        let int = decimal_u64(&int)?;
        let component = int.checked_mul(unit)?.checked_add(fraction_times(&frac, unit))?;
        total = total.checked_add(component)?;
    }
    Some(total)
}

/// ASCII digits (possibly none, giving 0) as a `u64`; `None` on overflow.
fn decimal_u64(digits: &str) -> Option<u64> {
    let mut n: u64 = 0;
    for c in digits.chars() {
        n = n.checked_mul(10)?.checked_add(u64::from(c.to_digit(10)?))?;
    }
    Some(n)
}

/// `floor(0.<digits> * unit)`, by multiplying the digit string by `unit` exactly and dropping
/// as many low digits as the fraction has.
fn fraction_times(digits: &str, unit: u64) -> u64 {
    // Little-endian decimal digits of digits * unit.
    let mut product: Vec<u8> = Vec::with_capacity(digits.len() + 16);
    let mut carry: u128 = 0;
    for c in digits.bytes().rev() {
        let v = u128::from(c - b'0') * u128::from(unit) + carry;
        product.push((v % 10) as u8);
        carry = v / 10;
    }
    while carry > 0 {
        product.push((carry % 10) as u8);
        carry /= 10;
    }
    let high = product.get(digits.len()..).unwrap_or(&[]);
    let int = high.iter().rev().fold(0u128, |acc, &d| acc * 10 + u128::from(d));
    assert!(int < u128::from(unit), "a fraction below one unit");
    int as u64
}

/// Checks `parse_go_duration(s)` against the reference, its error's message, and the round trip.
fn check_duration(s: &str) {
    let got = parse_go_duration(s);
    let want = reference_duration(s);
    match &got {
        Ok(d) => {
            assert_eq!(
                Some(d.as_nanos()),
                want.map(u128::from),
                "parse_go_duration({s:?}) disagrees with the reference"
            );
            assert_round_trip(*d);
        }
        Err(e) => {
            assert_eq!(want, None, "parse_go_duration({s:?}) rejected a valid duration: {e}");
            assert_eq!(e.input(), s, "the error's input is not the input");
            let msg = e.to_string();
            assert!(msg.contains(&format!("{s:?}")), "duration message {msg:?} does not quote the input");
        }
    }
    let _ = black_box(got);
}

fn assert_round_trip(d: Duration) {
    let formatted = format_go_duration(d);
    assert_eq!(parse_go_duration(&formatted), Ok(d), "{d:?} formatted as {formatted:?} does not round-trip");
    assert_eq!(reference_duration(&formatted).map(u128::from), Some(d.as_nanos()), "{formatted:?}: reference");
}

/// The last 12 bytes as seconds and nanoseconds (nanoseconds below one second).
fn duration_from_bytes(data: &[u8]) -> Option<Duration> {
    let tail: &[u8; 12] = data.last_chunk()?;
    let (secs, nanos) = tail.split_at(8);
    let secs = u64::from_le_bytes(secs.try_into().ok()?);
    let nanos = u32::from_le_bytes(nanos.try_into().ok()?) % 1_000_000_000;
    // Mostly short durations, so that the interesting small ones come up often.
    let secs = match secs % 4 {
        0 => secs % 4,
        1 => secs % 100_000,
        2 => secs % (u64::MAX / SEC + 1),
        _ => secs,
    };
    Some(Duration::new(secs, nanos))
}

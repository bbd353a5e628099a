//! Model-based property tests for `localsession_core::config`.
//!
//! Strings in the `[implicit][,shards][,gc_interval]` format are generated
//! field by field, each field together with what it should mean (absent,
//! a known valid value, or known to be invalid). A plain reference model then
//! says what `ManagerOptions::parse_env` must return, and the test checks the
//! real parser against it. Durations are additionally checked against a
//! straightforward `u128` reference parser, for panics on arbitrary input,
//! and for `format_go_duration` / `parse_go_duration` round trips.

use core::fmt::Debug;
use core::time::Duration;

use localsession_core::__private::{format_go_duration, parse_go_duration};
use localsession_core::config::{ConfigField, ManagerOptions};
use proptest::prelude::*;
use proptest::sample::select;

const NS: u64 = 1;
const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;
const MIN: u64 = 60 * SEC;
const HOUR: u64 = 60 * MIN;

/// Every unit spelling accepted by Go, with its length in nanoseconds.
const UNITS: &[(&str, u64)] =
    &[("ns", NS), ("us", US), ("\u{b5}s", US), ("\u{3bc}s", US), ("ms", MS), ("s", SEC), ("m", MIN), ("h", HOUR)];

/// What a generated field should mean.
#[derive(Debug, Clone)]
enum Meaning<T> {
    /// Empty (or whitespace only, or not written at all): keep `base`.
    Absent,
    /// Parses to this value.
    Valid(T),
    /// Must be rejected.
    Invalid,
}

/// One generated field: its text (without padding) and its meaning.
#[derive(Debug, Clone)]
struct Field<T> {
    text: String,
    meaning: Meaning<T>,
}

fn absent<T: Debug + Clone + 'static>() -> BoxedStrategy<Field<T>> {
    Just(Field { text: String::new(), meaning: Meaning::Absent }).boxed()
}

fn invalid<T: Debug + Clone + 'static>(bad: &'static [&'static str]) -> BoxedStrategy<Field<T>> {
    select(bad).prop_map(|text| Field { text: text.to_owned(), meaning: Meaning::Invalid }).boxed()
}

fn implicit_field() -> BoxedStrategy<Field<bool>> {
    const SPELLINGS: &[(&str, bool)] = &[
        ("1", true),
        ("t", true),
        ("T", true),
        ("TRUE", true),
        ("true", true),
        ("True", true),
        ("0", false),
        ("f", false),
        ("F", false),
        ("FALSE", false),
        ("false", false),
        ("False", false),
    ];
    const BAD: &[&str] = &[
        "tru",
        "yes",
        "no",
        "on",
        "off",
        "2",
        "-1",
        "+1",
        "01",
        "10",
        "TRue",
        "tRUE",
        "fAlse",
        "y",
        "n",
        "truefalse",
        "true.",
        "t rue",
        "１",
        "ｔｒｕｅ",
        "é",
        "true\0",
        "\u{a0}true",
    ];
    prop_oneof![
        absent(),
        select(SPELLINGS).prop_map(|(text, b)| Field { text: text.to_owned(), meaning: Meaning::Valid(b) }),
        invalid(BAD),
    ]
    .boxed()
}

fn shards_field() -> BoxedStrategy<Field<usize>> {
    const BAD: &[&str] = &[
        "0",
        "+0",
        "000",
        "-0",
        "-1",
        "-10000",
        "abc",
        "1.5",
        "1e3",
        "0x10",
        "1_000",
        "1 0",
        "10\0",
        "１０",
        "+",
        "-",
        "++1",
        "65537",
        "1000000",
        "99999999999999999999",
        "18446744073709551616",
        "340282366920938463463374607431768211456",
    ];
    let valid = (1..=10_000_usize, 0..3_u8).prop_map(|(n, style)| Field {
        text: match style {
            0 => n.to_string(),
            1 => format!("+{n}"),
            _ => format!("00{n}"),
        },
        meaning: Meaning::Valid(n),
    });
    prop_oneof![absent(), valid, invalid(BAD)].boxed()
}

/// One `<number><unit>` component of a Go duration: integer part, up to
/// three fraction digits (`None`: no '.'), unit index into `UNITS`.
#[derive(Debug, Clone)]
struct Component {
    int: u64,
    frac: Option<String>,
    unit: usize,
}

impl Component {
    fn text(&self) -> String {
        let (unit, _) = UNITS[self.unit];
        match &self.frac {
            Some(frac) => format!("{}.{frac}{unit}", self.int),
            None => format!("{}{unit}", self.int),
        }
    }

    /// Exact value in nanoseconds, truncating below one nanosecond.
    fn nanos(&self) -> u64 {
        let (_, unit) = UNITS[self.unit];
        let frac = self.frac.as_deref().unwrap_or("");
        let frac_value: u64 = if frac.is_empty() { 0 } else { frac.parse().unwrap() };
        let scale = 10_u64.pow(u32::try_from(frac.len()).unwrap());
        self.int * unit + frac_value * unit / scale
    }
}

fn component(ints: core::ops::RangeInclusive<u64>, units: &'static [usize]) -> impl Strategy<Value = Component> {
    (ints, prop::option::of("[0-9]{0,3}"), select(units)).prop_map(|(int, frac, unit)| Component { int, frac, unit })
}

fn gc_field() -> BoxedStrategy<Field<Duration>> {
    const BAD: &[&str] = &[
        // Parse, but below the 1s minimum.
        "0",
        "+0",
        "0s",
        "0.5s",
        "500ms",
        "999ms",
        "999999999ns",
        "0.99s",
        "999999us",
        // Do not parse.
        "10x",
        "10",
        "1.5",
        ".",
        "..",
        ".s",
        "-1s",
        "-0",
        "+-1s",
        "++1s",
        "1h\0",
        "9999999999999999999h",
        "99999999999999999999s",
        "18446744073709551616ns",
        "１０s",
        "10ｓ",
        "1 h",
        "1h 30m",
        "1h30",
        "1..5s",
        "h",
        "1d",
        "1H",
        "1sec",
        "never",
    ];
    // The first component is at least 1s, so the total is too; the others
    // use any unit, in any order (Go allows "1m1h").
    let valid = (
        any::<bool>(),
        component(1..=500, &[5, 6, 7]),
        prop::collection::vec(component(0..=1_000, &[0, 1, 2, 3, 4, 5, 6, 7]), 0..3),
    )
        .prop_map(|(plus, first, rest)| {
            let mut text = String::from(if plus { "+" } else { "" });
            let mut nanos = 0;
            for c in core::iter::once(&first).chain(&rest) {
                text.push_str(&c.text());
                nanos += c.nanos();
            }
            Field { text, meaning: Meaning::Valid(Duration::from_nanos(nanos)) }
        });
    // Spellings of exactly the 1s minimum, which is allowed.
    let minimum = select(
        &[
            "1s",
            "+1s",
            "1.s",
            "1.000s",
            "1000ms",
            "999ms1000us",
            "0.5s500ms",
            "1000000us",
            "1000000\u{b5}s",
            "1000000\u{3bc}s",
            "1000000000ns",
            "0.01666666666666666667m",
        ][..],
    )
    .prop_map(|text| Field { text: text.to_owned(), meaning: Meaning::Valid(Duration::from_secs(1)) });
    prop_oneof![3 => absent(), 3 => valid, 1 => minimum, 3 => invalid(BAD)].boxed()
}

fn padding() -> impl Strategy<Value = &'static str> {
    select(&["", "", " ", "  ", "\t", "\n", "\r\n", " \t "][..])
}

fn base_options() -> impl Strategy<Value = ManagerOptions> {
    let shards = prop_oneof![9 => 1..=1_000_usize, 1 => Just(0_usize)];
    let gc = prop_oneof![
        2 => Just(None),
        6 => (SEC..=86_400 * SEC).prop_map(|n| Some(Duration::from_nanos(n))),
        // Invalid: below the minimum.
        1 => (0..SEC).prop_map(|n| Some(Duration::from_nanos(n))),
    ];
    (shards, gc, any::<bool>()).prop_map(|(shard_number, gc_interval, implicit_transmit)| ManagerOptions {
        shard_number,
        gc_interval,
        implicit_transmit,
    })
}

#[derive(Debug, Clone)]
struct Case {
    base: ManagerOptions,
    implicit: Field<bool>,
    shards: Field<usize>,
    gc: Field<Duration>,
    /// How many of the three fields are written (later ones are absent).
    written: usize,
    /// Extra fields past the third (making the input invalid), if any.
    extra: Option<Vec<&'static str>>,
    pads: [(&'static str, &'static str); 3],
}

fn case() -> impl Strategy<Value = Case> {
    (
        base_options(),
        implicit_field(),
        shards_field(),
        gc_field(),
        1..=3_usize,
        prop::option::weighted(0.1, prop::collection::vec(select(&["", "4", "x", " "][..]), 1..3)),
        [(padding(), padding()), (padding(), padding()), (padding(), padding())],
    )
        .prop_map(|(base, implicit, shards, mut gc_field, written, extra, pads)| {
            let mut shards_field = shards;
            let written = if extra.is_some() { 3 } else { written };
            if written < 3 {
                gc_field = Field { text: String::new(), meaning: Meaning::Absent };
            }
            if written < 2 {
                shards_field = Field { text: String::new(), meaning: Meaning::Absent };
            }
            Case { base, implicit, shards: shards_field, gc: gc_field, written, extra, pads }
        })
}

impl Case {
    fn input(&self) -> String {
        let texts = [&self.implicit.text, &self.shards.text, &self.gc.text];
        let mut fields: Vec<String> = texts
            .iter()
            .zip(self.pads)
            .take(self.written)
            .map(|(text, (left, right))| format!("{left}{text}{right}"))
            .collect();
        for extra in self.extra.iter().flatten() {
            fields.push((*extra).to_owned());
        }
        fields.join(",")
    }
}

/// The value an error is expected to report.
#[derive(Debug, PartialEq)]
enum ErrValue {
    Text(String),
    Shards(usize),
    Gc(Duration),
}

/// The reference model: what `parse_env(case.input(), case.base)` returns.
fn model(case: &Case) -> Result<ManagerOptions, (ConfigField, ErrValue)> {
    let input = case.input();
    if case.extra.is_some() {
        return Err((ConfigField::Format, ErrValue::Text(input.trim_ascii().to_owned())));
    }
    let mut out = case.base;
    match &case.implicit.meaning {
        Meaning::Absent => {}
        Meaning::Valid(b) => out.implicit_transmit = *b,
        Meaning::Invalid => {
            return Err((ConfigField::Implicit, ErrValue::Text(case.implicit.text.clone())));
        }
    }
    match &case.shards.meaning {
        Meaning::Absent if case.base.shard_number == 0 => {
            return Err((ConfigField::Shards, ErrValue::Shards(0)));
        }
        Meaning::Absent => {}
        Meaning::Valid(n) => out.shard_number = *n,
        Meaning::Invalid => {
            return Err((ConfigField::Shards, ErrValue::Text(case.shards.text.clone())));
        }
    }
    match &case.gc.meaning {
        Meaning::Absent => match case.base.gc_interval {
            Some(d) if d < Duration::from_secs(1) => {
                return Err((ConfigField::GcInterval, ErrValue::Gc(d)));
            }
            _ => {}
        },
        Meaning::Valid(d) => out.gc_interval = Some(*d),
        Meaning::Invalid => {
            return Err((ConfigField::GcInterval, ErrValue::Text(case.gc.text.clone())));
        }
    }
    Ok(out)
}

/// Reference for `parse_go_duration`: total nanoseconds in `u128`, `None` if
/// rejected. Written directly from Go's grammar
/// `[+]?("0" | ([0-9]*(\.[0-9]*)?unit)+)`, where a unit runs up to the next
/// digit or '.'. Returns `Err(())` for fractions of more than 24 digits,
/// which it cannot compute exactly in `u128`.
fn reference_duration(s: &str) -> Result<Option<u128>, ()> {
    let chars: Vec<char> = s.strip_prefix('+').unwrap_or(s).chars().collect();
    if chars == ['0'] {
        return Ok(Some(0));
    }
    if chars.is_empty() {
        return Ok(None);
    }
    let mut i = 0;
    let mut total: u128 = 0;
    let mut overflow = false;
    while i < chars.len() {
        let start = i;
        while i < chars.len() && chars[i].is_ascii_digit() {
            i += 1;
        }
        let int: String = chars[start..i].iter().collect();
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
            return Ok(None);
        }
        let unit_start = i;
        while i < chars.len() && !chars[i].is_ascii_digit() && chars[i] != '.' {
            i += 1;
        }
        let unit: String = chars[unit_start..i].iter().collect();
        let Some((_, unit_nanos)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Ok(None);
        };
        let unit_nanos = u128::from(*unit_nanos);
        let int = int.trim_start_matches('0');
        if int.len() > 20 {
            // At least 10^20 units: more than u64::MAX nanoseconds.
            overflow = true;
            continue;
        }
        if frac.len() > 24 {
            return Err(());
        }
        let int_value: u128 = if int.is_empty() { 0 } else { int.parse().unwrap() };
        let frac_value: u128 = if frac.is_empty() { 0 } else { frac.parse().unwrap() };
        let scale = 10_u128.pow(u32::try_from(frac.len()).unwrap());
        total += int_value * unit_nanos + frac_value * unit_nanos / scale;
    }
    Ok((!overflow && total <= u128::from(u64::MAX)).then_some(total))
}

/// Duration-like strings: up to four components with numbers of up to 20
/// digits (so `reference_duration` cannot overflow) and good or bad units.
fn duration_like() -> impl Strategy<Value = String> {
    let unit = select(&["ns", "us", "µs", "μs", "ms", "s", "m", "h", "", "x", " ", "H", "sm", "h "][..]);
    // Mostly random digits; sometimes numbers near the u64 nanosecond limit.
    let int = prop_oneof![
        4 => "[0-9]{0,20}".boxed(),
        1 => select(
            &[
                "18446744073709551615",
                "18446744073709551616",
                "18446744073",
                "9223372036854775807",
                "5124095",
                "5124096",
                "307445734",
            ][..]
        )
        .prop_map(str::to_owned)
        .boxed(),
    ];
    let number = (int, prop::option::of("[0-9]{0,20}"));
    let comp = (number, unit).prop_map(|((int, frac), unit)| match frac {
        Some(frac) => format!("{int}.{frac}{unit}"),
        None => format!("{int}{unit}"),
    });
    (select(&["", "", "+", "-", "0"][..]), prop::collection::vec(comp, 0..5))
        .prop_map(|(sign, comps)| format!("{sign}{}", comps.concat()))
}

fn any_duration() -> impl Strategy<Value = Duration> {
    const CENTURY: u64 = 100 * 365 * 24 * HOUR;
    prop_oneof![0..US, 0..MS, 0..SEC, 0..HOUR, (0..=CENTURY / SEC).prop_map(|s| s * SEC), 0..=CENTURY,]
        .prop_map(Duration::from_nanos)
}

proptest! {
    #[test]
    fn parse_env_matches_model(case in case()) {
        let input = case.input();
        let got = ManagerOptions::parse_env(&input, case.base);
        match (model(&case), got) {
            (Ok(expected), Ok(got)) => prop_assert_eq!(expected, got),
            (Err((field, value)), Err(err)) => {
                prop_assert_eq!(err.field(), field);
                match value {
                    ErrValue::Text(text) => prop_assert_eq!(err.value(), text),
                    ErrValue::Shards(n) => prop_assert_eq!(err.value(), n.to_string()),
                    ErrValue::Gc(d) => prop_assert_eq!(parse_go_duration(err.value()), Ok(d)),
                }
                let quoted = format!("{:?}", err.value());
                let message = err.to_string();
                prop_assert!(message.contains(&quoted), "{message} lacks {quoted}");
            }
            (expected, got) => {
                prop_assert!(false, "input {:?}: model {:?}, parser {:?}", input, expected, got);
            }
        }
    }

    #[test]
    fn from_str_is_parse_env_on_default(case in case()) {
        let input = case.input();
        prop_assert_eq!(
            input.parse::<ManagerOptions>(),
            ManagerOptions::parse_env(&input, ManagerOptions::default())
        );
    }

    #[test]
    fn parse_go_duration_never_panics_on_strings(s in ".*") {
        let _ = parse_go_duration(&s);
        let _ = ManagerOptions::parse_env(&s, ManagerOptions::default());
    }

    #[test]
    fn parse_go_duration_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let s = String::from_utf8_lossy(&bytes);
        let _ = parse_go_duration(&s);
        let _ = ManagerOptions::parse_env(&s, ManagerOptions::default());
    }

    #[test]
    fn parse_go_duration_matches_reference(s in duration_like()) {
        let got = parse_go_duration(&s).map(|d| d.as_nanos());
        let expected = if s.starts_with('-') {
            None
        } else {
            let reference = reference_duration(&s);
            prop_assume!(reference.is_ok(), "fraction too long for the reference");
            reference.unwrap()
        };
        prop_assert_eq!(got.ok(), expected, "input {:?}", s);
    }

    #[test]
    fn format_round_trips(d in any_duration()) {
        let text = format_go_duration(d);
        prop_assert_eq!(parse_go_duration(&text), Ok(d), "formatted as {:?}", text);
    }
}

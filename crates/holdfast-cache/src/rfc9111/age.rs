//! The `Age` and `Date` of a received response: `Age` parsed as RFC 9111
//! §5.1 says, `Date` in any of the three HTTP-date formats (RFC 9110
//! §5.6.7), and a `Date` recorded for a response that came without a valid
//! one (RFC 9110 §6.6.1). Pure functions: times are inputs.

use hyper::header::{self, HeaderMap, HeaderValue};

use crate::range::{format_http_date, parse_http_date};

/// The age a delta-seconds value too large to represent counts as (RFC
/// 9111 §1.2.2: 2^31).
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// The `Age` of a response, seconds, or `None` when it has none or an
/// invalid one, which a cache ignores (§5.1). A list (`Age: 1, 2`, or the
/// field repeated) counts by its first member; a member that is not a
/// non-negative integer (`-5`, `1.5`, `+3`, `7 days`) is invalid; a value
/// too large counts as 2^31.
pub fn age_value(h: &HeaderMap) -> Option<u64> {
    let first = h.get_all(header::AGE).iter().next()?;
    let first = std::str::from_utf8(first.as_bytes()).ok()?;
    let member = first.split(',').next().unwrap_or("").trim_matches([' ', '\t']);
    delta_seconds(member)
}

/// A delta-seconds value (§1.2.2): `1*DIGIT`, saturated at 2^31.
pub fn delta_seconds(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().map_or(MAX_DELTA_SECONDS, |v| v.min(MAX_DELTA_SECONDS)))
}

/// The `Date` of a response, Unix seconds, or `None` when it has none or
/// its first one is not an HTTP-date.
pub fn date_value(h: &HeaderMap) -> Option<u64> {
    let v = h.get_all(header::DATE).iter().next()?.to_str().ok()?;
    parse_http_date(v).map(|s| s.max(0) as u64)
}

/// Gives a received response without a valid `Date` the time it was
/// received (`received`, Unix seconds), as a recipient with a clock does
/// before it stores or forwards it (RFC 9110 §6.6.1). True when it did.
pub fn record_date(h: &mut HeaderMap, received: u64) -> bool {
    if date_value(h).is_some() {
        return false;
    }
    match HeaderValue::from_str(&format_http_date(received as i64)) {
        Ok(v) => {
            h.insert(header::DATE, v);
            true
        }
        Err(_) => false,
    }
}

/// [`record_date`] for stored fields (names lowercase).
pub fn record_date_in(fields: &mut Vec<(String, String)>, received: u64) {
    let valid = fields
        .iter()
        .find(|(k, _)| k == "date")
        .is_some_and(|(_, v)| parse_http_date(v).is_some());
    if !valid {
        fields.retain(|(k, _)| k != "date");
        fields.push(("date".to_string(), format_http_date(received as i64)));
    }
}

/// Parses the two obsolete HTTP-date formats a recipient must still accept
/// (RFC 9110 §5.6.7): rfc850-date (`Sunday, 06-Nov-94 08:49:37 GMT`) and
/// asctime-date (`Sun Nov  6 08:49:37 1994`), to Unix seconds. `this_year`
/// places a two-digit year: one more than 50 years ahead of it is in the
/// past century.
pub fn parse_obsolete_date(s: &str, this_year: i64) -> Option<i64> {
    let s = s.trim();
    let digits = |s: &str, min: usize, max: usize| -> Option<i64> {
        (s.len() >= min && s.len() <= max && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.parse().ok())?
    };
    let (year, month, day, time) = if let Some((_, rest)) = s.split_once(", ") {
        // rfc850-date: day-name "," SP DD-Mon-YY SP time SP "GMT"
        let mut it = rest.split(' ');
        let mut d = it.next()?.split('-');
        let day = digits(d.next()?, 2, 2)?;
        let month = month_number(d.next()?)?;
        let yy = digits(d.next()?, 2, 2)?;
        let time = it.next()?;
        if d.next().is_some() || it.next()? != "GMT" || it.next().is_some() {
            return None;
        }
        let mut year = this_year - this_year.rem_euclid(100) + yy;
        if year > this_year + 50 {
            year -= 100;
        }
        (year, month, day, time)
    } else {
        // asctime-date: day-name SP month SP ( 2DIGIT / ( SP DIGIT ) ) SP time SP year
        let mut it = s.split_whitespace();
        let _day_name = it.next()?;
        let month = month_number(it.next()?)?;
        let day = digits(it.next()?, 1, 2)?;
        let time = it.next()?;
        let year = digits(it.next()?, 4, 4)?;
        if it.next().is_some() {
            return None;
        }
        (year, month, day, time)
    };
    let mut hms = time.split(':');
    let h = digits(hms.next()?, 2, 2)?;
    let m = digits(hms.next()?, 2, 2)?;
    let sec = digits(hms.next()?, 2, 2)?;
    if hms.next().is_some() || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(holdfast_model::days_from_civil(year, month, day as u32) * 86_400 + h * 3600 + m * 60 + sec)
}

fn month_number(m: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    MONTHS.iter().position(|x| *x == m).map(|i| i as u32 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderName;

    fn map(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn age_is_the_first_member_and_invalid_values_are_ignored() {
        let age = |fields: &[(&str, &str)]| age_value(&map(fields));
        assert_eq!(age(&[("age", "30")]), Some(30));
        assert_eq!(age(&[("age", " 30 ")]), Some(30));
        assert_eq!(age(&[("age", "7200, 0")]), Some(7200), "a list: its first member");
        assert_eq!(age(&[("age", "0, 7200")]), Some(0));
        assert_eq!(age(&[("age", "0"), ("age", "7200")]), Some(0), "repeated: the first");
        assert_eq!(age(&[("age", "7200"), ("age", "0")]), Some(7200));
        for bad in ["-7200", "7200.0", "1.5", "+30", "abc", "", "30 s", "0x10", "7200;a=1"] {
            assert_eq!(age(&[("age", bad)]), None, "{bad:?} is ignored");
        }
        assert_eq!(age(&[]), None);
        assert_eq!(age(&[("age", "2147483648")]), Some(MAX_DELTA_SECONDS));
        assert_eq!(age(&[("age", "99999999999999999999999")]), Some(MAX_DELTA_SECONDS));
    }

    #[test]
    fn a_response_without_a_valid_date_gets_the_time_it_was_received() {
        let mut h = map(&[("date", "yesterday")]);
        assert_eq!(date_value(&h), None);
        assert!(record_date(&mut h, 1000));
        assert_eq!(date_value(&h), Some(1000));
        assert!(!record_date(&mut h, 2000), "a valid Date is kept");
        let mut none = HeaderMap::new();
        assert!(record_date(&mut none, 5));
        assert_eq!(date_value(&none), Some(5));
        let mut fields = vec![
            ("date".to_string(), "0".to_string()),
            ("x".to_string(), "y".to_string()),
        ];
        record_date_in(&mut fields, 1000);
        assert_eq!(fields[0].0, "x");
        assert_eq!(fields[1], ("date".to_string(), format_http_date(1000)));
    }

    #[test]
    fn obsolete_date_formats() {
        let imf = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_obsolete_date("Sunday, 06-Nov-94 08:49:37 GMT", 2025), Some(imf));
        assert_eq!(parse_obsolete_date("Sun Nov  6 08:49:37 1994", 2025), Some(imf));
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(imf));
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Some(imf));
        // A two-digit year more than 50 years ahead is in the past century.
        let y = |s: &str, now| parse_obsolete_date(s, now).map(|t| holdfast_model::civil_from_days(t / 86_400).0);
        assert_eq!(y("Monday, 06-Nov-30 08:49:37 GMT", 2025), Some(2030));
        assert_eq!(y("Monday, 06-Nov-80 08:49:37 GMT", 2025), Some(1980));
        for bad in [
            "Sun Nov 6 08:49 1994",
            "Sunday, 06-Nov-1994 08:49:37 GMT",
            "06 Nov 1994",
            "x, y",
        ] {
            assert_eq!(parse_obsolete_date(bad, 2025), None, "{bad:?}");
        }
    }
}

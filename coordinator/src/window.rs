//! Maintenance windows: when a cluster may be upgraded, as weekday and hour ranges in a time zone,
//! e.g. `Sat-Sun 01:00-05:00 Europe/Berlin` or `Mon-Fri 22:00-02:00 UTC` (wrapping midnight: the
//! days name the day a window opens). Several windows are joined with `;`. Cron syntax is not
//! supported.

use jiff::Timestamp;
use jiff::civil::Weekday;
use jiff::tz::TimeZone;
use std::fmt;
use std::str::FromStr;

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const MINUTES_PER_DAY: u16 = 24 * 60;

/// Why a window specification was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "maintenance window {spec:?}: {reason}; write it like \"Sat-Sun 01:00-05:00 Europe/Berlin\" or \"Mon-Fri 22:00-02:00 UTC\""
)]
pub struct WindowError {
    spec: String,
    reason: String,
}

/// One weekly span: the days it opens on (Monday = bit 0), opening and closing minute of the day.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    days: u8,
    start_min: u16,
    /// Exclusive; at or before `start_min` the span closes the next day.
    end_min: u16,
}

/// A validated maintenance window: one or more spans in one time zone.
#[derive(Clone)]
pub struct Window {
    spec: String,
    spans: Vec<Span>,
    zone: TimeZone,
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

impl PartialEq for Window {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

fn day_index(name: &str) -> Option<u8> {
    DAY_NAMES
        .iter()
        .position(|d| d.eq_ignore_ascii_case(name))
        .map(|i| i as u8)
}

/// `Mon-Fri`, `Sat,Sun`, `Fri-Mon` (wrapping), `Daily` or `*` as a bit set.
fn parse_days(text: &str) -> Result<u8, String> {
    if text == "*" || text.eq_ignore_ascii_case("daily") {
        return Ok(0x7f);
    }
    let mut days = 0u8;
    for part in text.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let first = day_index(a).ok_or_else(|| format!("unknown day {a:?} (use Mon..Sun)"))?;
        let last = day_index(b).ok_or_else(|| format!("unknown day {b:?} (use Mon..Sun)"))?;
        let mut d = first;
        loop {
            days |= 1 << d;
            if d == last {
                break;
            }
            d = (d + 1) % 7;
        }
    }
    Ok(days)
}

/// `HH:MM`; `24:00` only as a closing time.
fn parse_clock(text: &str, closing: bool) -> Result<u16, String> {
    let bad = || format!("{text:?} is not a time of day (HH:MM)");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    let minutes = h * 60 + m;
    if m >= 60 || minutes > MINUTES_PER_DAY || (minutes == MINUTES_PER_DAY && !closing) {
        return Err(bad());
    }
    Ok(minutes)
}

fn parse_span(text: &str) -> Result<(Span, Option<&str>), String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let (days, hours, zone) = match words.as_slice() {
        [d, h] => (*d, *h, None),
        [d, h, z] => (*d, *h, Some(*z)),
        _ => return Err("expected DAYS HH:MM-HH:MM [TIME-ZONE]".into()),
    };
    let (start, end) = hours
        .split_once('-')
        .ok_or_else(|| format!("{hours:?} is not an hour range (HH:MM-HH:MM)"))?;
    let start_min = parse_clock(start, false)?;
    let end_min = parse_clock(end, true)?;
    if start_min == end_min {
        return Err("the window opens and closes at the same time".into());
    }
    Ok((
        Span {
            days: parse_days(days)?,
            start_min,
            end_min,
        },
        zone,
    ))
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(spec: &str) -> Result<Self, WindowError> {
        let err = |reason: String| WindowError {
            spec: spec.to_string(),
            reason,
        };
        let mut spans = Vec::new();
        let mut zone_name: Option<&str> = None;
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (span, zone) = parse_span(part).map_err(err)?;
            if let Some(z) = zone {
                if zone_name.is_some_and(|prev| prev != z) {
                    return Err(err("all parts of a window take one time zone".into()));
                }
                zone_name = Some(z);
            }
            spans.push(span);
        }
        if spans.is_empty() {
            return Err(err("empty".into()));
        }
        let zone = match zone_name {
            None => TimeZone::UTC,
            Some(name) => {
                TimeZone::get(name).map_err(|e| err(format!("unknown time zone {name:?} ({e})")))?
            }
        };
        Ok(Self {
            spec: spec.trim().to_string(),
            spans,
            zone,
        })
    }
}

impl Window {
    /// The local weekday and time at `now`, for messages (`Tue 10:04 Europe/Berlin`).
    pub fn local_time(&self, now: Timestamp) -> String {
        let local = now.to_zoned_datetime(self.zone.clone());
        format!(
            "{} {:02}:{:02} {}",
            DAY_NAMES[local.weekday().to_monday_zero_offset() as usize],
            local.hour(),
            local.minute(),
            self.zone.iana_name().unwrap_or("UTC")
        )
    }
}

/// Whether `now` falls inside the window, in the window's own time zone.
pub fn in_window(window: &Window, now: Timestamp) -> bool {
    let local = now.to_zoned_datetime(window.zone.clone());
    let day = local.weekday().to_monday_zero_offset() as u8;
    let yesterday = Weekday::from_monday_zero_offset(day as i8)
        .map(|w| w.previous().to_monday_zero_offset() as u8)
        .unwrap_or((day + 6) % 7);
    let minute = local.hour() as u16 * 60 + local.minute() as u16;
    window.spans.iter().any(|s| {
        let opens_today = s.days & (1 << day) != 0;
        if s.start_min < s.end_min {
            opens_today && minute >= s.start_min && minute < s.end_min
        } else {
            // Wraps midnight: the evening part today, or the morning part of yesterday's window.
            let opened_yesterday = s.days & (1 << yesterday) != 0;
            (opens_today && minute >= s.start_min) || (opened_yesterday && minute < s.end_min)
        }
    })
}

/// How far ahead `next_opening` looks: every weekly window opens within a week.
const LOOKAHEAD_MINUTES: i64 = 8 * MINUTES_PER_DAY as i64;

/// When the window next opens after `now` (to the minute), or `None` when it is open now or
/// never opens.
pub fn next_opening(window: &Window, now: Timestamp) -> Option<Timestamp> {
    if in_window(window, now) {
        return None;
    }
    let start = Timestamp::from_second(now.as_second() - now.as_second().rem_euclid(60)).ok()?;
    (1..=LOOKAHEAD_MINUTES)
        .filter_map(|m| start.checked_add(jiff::SignedDuration::from_mins(m)).ok())
        .find(|t| in_window(window, *t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_opening_is_the_first_minute_inside() {
        let w: Window = "Sat-Sun 01:00-05:00 UTC".parse().unwrap();
        // 2024-06-04 is a Tuesday.
        let tuesday: Timestamp = "2024-06-04T12:00:30Z".parse().unwrap();
        let next = next_opening(&w, tuesday).unwrap();
        assert_eq!(next, "2024-06-08T01:00:00Z".parse::<Timestamp>().unwrap());
        let inside: Timestamp = "2024-06-08T02:00:00Z".parse().unwrap();
        assert_eq!(next_opening(&w, inside), None);
    }

    /// A UTC instant from an RFC 3339 string.
    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn w(spec: &str) -> Window {
        spec.parse().unwrap()
    }

    #[test]
    fn weekend_night_in_berlin() {
        let win = w("Sat-Sun 01:00-05:00 Europe/Berlin");
        // 2024-06-01 is a Saturday; Berlin is UTC+2 in summer.
        assert!(!in_window(&win, at("2024-05-31T22:59:00Z")), "00:59 Sat");
        assert!(in_window(&win, at("2024-05-31T23:00:00Z")), "01:00 Sat");
        assert!(in_window(&win, at("2024-06-01T02:59:00Z")), "04:59 Sat");
        assert!(!in_window(&win, at("2024-06-01T03:00:00Z")), "05:00 Sat");
        assert!(in_window(&win, at("2024-06-02T00:30:00Z")), "02:30 Sun");
        assert!(!in_window(&win, at("2024-06-03T00:30:00Z")), "02:30 Mon");
        // Winter: UTC+1.
        assert!(in_window(&win, at("2024-01-06T00:30:00Z")), "01:30 Sat CET");
        assert!(
            !in_window(&win, at("2024-01-05T23:30:00Z")),
            "00:30 Sat CET"
        );
        assert_eq!(
            win.local_time(at("2024-01-05T23:30:00Z")),
            "Sat 00:30 Europe/Berlin"
        );
    }

    #[test]
    fn wrapping_midnight_belongs_to_the_opening_day() {
        let win = w("Mon-Fri 22:00-02:00 UTC");
        // 2024-06-03 is a Monday.
        assert!(
            !in_window(&win, at("2024-06-03T01:00:00Z")),
            "Mon 01:00: Sun did not open"
        );
        assert!(!in_window(&win, at("2024-06-03T21:59:00Z")));
        assert!(in_window(&win, at("2024-06-03T22:00:00Z")));
        assert!(
            in_window(&win, at("2024-06-04T01:59:00Z")),
            "Tue 01:59 from Mon"
        );
        assert!(!in_window(&win, at("2024-06-04T02:00:00Z")));
        assert!(
            in_window(&win, at("2024-06-08T01:00:00Z")),
            "Sat 01:00 from Fri"
        );
        assert!(!in_window(&win, at("2024-06-08T22:30:00Z")), "Sat evening");
        assert!(!in_window(&win, at("2024-06-09T01:00:00Z")), "Sun 01:00");
    }

    #[test]
    fn day_lists_ranges_and_several_spans() {
        let win = w("Fri-Mon 00:00-24:00; Wed 12:00-13:00");
        for (t, want) in [
            ("2024-06-07T10:00:00Z", true),  // Fri
            ("2024-06-09T23:59:00Z", true),  // Sun
            ("2024-06-10T10:00:00Z", true),  // Mon
            ("2024-06-11T10:00:00Z", false), // Tue
            ("2024-06-12T12:30:00Z", true),  // Wed
            ("2024-06-12T13:00:00Z", false), // Wed
            ("2024-06-13T12:30:00Z", false), // Thu
        ] {
            assert_eq!(in_window(&win, at(t)), want, "{t}");
        }
        let daily = w("daily 03:00-04:00");
        assert!(in_window(&daily, at("2024-06-11T03:10:00Z")));
        assert!(!in_window(&daily, at("2024-06-11T04:10:00Z")));
        let list = w("sat,SUN 00:00-01:00 America/New_York");
        assert!(
            in_window(&list, at("2024-06-08T04:30:00Z")),
            "Sat 00:30 EDT"
        );
        assert!(
            !in_window(&list, at("2024-06-08T00:30:00Z")),
            "Fri 20:30 EDT"
        );
    }

    #[test]
    fn bad_specs_are_refused_with_reasons() {
        for (spec, why) in [
            ("", "empty"),
            ("Sat-Sun", "expected DAYS"),
            ("Sat-Sun 01:00 UTC", "hour range"),
            ("Sat-Sun 25:00-05:00 UTC", "not a time of day"),
            ("Sat-Sun 01:60-05:00 UTC", "not a time of day"),
            ("Sat-Sun 24:00-05:00 UTC", "not a time of day"),
            ("Sat-Sun 01:00-01:00 UTC", "same time"),
            ("Sam-Sun 01:00-05:00 UTC", "unknown day"),
            ("Sat-Sun 01:00-05:00 Mars/Olympus", "unknown time zone"),
            (
                "Sat 01:00-05:00 UTC; Sun 01:00-05:00 Europe/Berlin",
                "one time zone",
            ),
            ("Sat 01:00-05:00 UTC extra", "expected DAYS"),
        ] {
            let err = spec.parse::<Window>().unwrap_err().to_string();
            assert!(err.contains(why), "{spec:?}: {err}");
            assert!(err.contains("write it like"), "{err}");
        }
    }

    #[test]
    fn zone_defaults_to_utc_and_applies_to_every_span() {
        let win = w("Sat 01:00-02:00; Sun 01:00-02:00");
        assert!(in_window(&win, at("2024-06-09T01:30:00Z")));
        let berlin = w("Sat 01:00-02:00; Sun 01:00-02:00 Europe/Berlin");
        assert!(!in_window(&berlin, at("2024-06-09T01:30:00Z")));
        assert!(in_window(&berlin, at("2024-06-08T23:30:00Z")));
        assert_eq!(
            berlin.to_string(),
            "Sat 01:00-02:00; Sun 01:00-02:00 Europe/Berlin"
        );
    }
}

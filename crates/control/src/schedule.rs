//! When a schedule fires: frequencies (`daily 03:00`, `weekly sun 03:00`, `monthly 31 03:00`,
//! `cron EXPR`) and the instant of their next firing in an IANA time zone. Pure logic, no I/O:
//! the scheduler asks [`Frequency::next_after`] and stores the answer.
//!
//! Frequencies are wall-clock rules, so the civil times they name are mapped to instants by one
//! monotone rule (docs/scheduling.md): a civil time the clocks skip maps to the instant of the
//! jump, a civil time that happens twice to its first occurrence. Monotone matters: the next
//! firing is then the first candidate civil time whose instant is after the given one, and
//! several candidates in one gap collapse into one firing.

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp};

/// A frequency the text form of which is invalid, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FrequencyError(String);

fn invalid(message: impl Into<String>) -> FrequencyError {
    FrequencyError(message.into())
}

/// How often a schedule fires. Its text form (`Display`/`FromStr`) is what the API, the CLI
/// and the database carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frequency {
    Daily {
        at: Time,
    },
    Weekly {
        weekday: Weekday,
        at: Time,
    },
    /// Day 1–31; a month shorter than `day` fires on its last day.
    Monthly {
        day: u8,
        at: Time,
    },
    Cron(Cron),
}

/// How far ahead [`Frequency::next_after`] looks: 29 years covers every weekday/date
/// combination (they repeat every 28 years) and 29 February on a Monday included.
const SEARCH_DAYS: u32 = 29 * 366;

const YEAR: SignedDuration = SignedDuration::from_hours(366 * 24);

impl Frequency {
    /// The first firing strictly after `after`, or None if there is none within 29 years
    /// (cron expressions that never fire are refused when parsed).
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        // Candidates at or before `after`'s own civil time map to instants at or before it
        // (the mapping is monotone), so they are skipped without converting them.
        let civil_after = tz.to_datetime(after);
        let mut day = civil_after.date();
        for _ in 0..SEARCH_DAYS {
            for time in self.times_on(day) {
                let candidate = day.to_datetime(time);
                if candidate <= civil_after {
                    continue;
                }
                let at = instant_of(tz, candidate)?;
                if at > after {
                    return Some(at);
                }
            }
            day = day.tomorrow().ok()?;
        }
        None
    }

    /// The longest time between two firings from `from` on: the recovery point objective the
    /// schedule promises. Daily, weekly and monthly frequencies have a fixed interval (a day,
    /// a week, 31 days); a cron expression's is the widest gap between its firings over the
    /// coming year.
    pub fn interval(&self, from: Timestamp, tz: &TimeZone) -> SignedDuration {
        match self {
            Frequency::Daily { .. } => SignedDuration::from_hours(24),
            Frequency::Weekly { .. } => SignedDuration::from_hours(7 * 24),
            Frequency::Monthly { .. } => SignedDuration::from_hours(31 * 24),
            Frequency::Cron(_) => self.widest_gap(from, tz).unwrap_or(YEAR),
        }
    }

    /// A cron expression names the same times on every day it matches, so the widest gap is
    /// either between two times of one day or from the last time of one matching day to the
    /// first of the next: one pass over the matching days of the coming year, not over every
    /// firing (a per-minute expression fires half a million times a year).
    fn widest_gap(&self, from: Timestamp, tz: &TimeZone) -> Option<SignedDuration> {
        let Frequency::Cron(cron) = self else { return None };
        let minutes_of_day: Vec<i64> =
            bits(u64::from(cron.hours)).flat_map(|h| bits(cron.minutes).map(move |m| i64::from(h * 60 + m))).collect();
        let (first, last) = (*minutes_of_day.first()?, *minutes_of_day.last()?);
        let within_a_day = minutes_of_day.windows(2).map(|pair| pair[1] - pair[0]).max().unwrap_or(0);
        let mut widest = SignedDuration::from_mins(within_a_day);
        let time_of = |minute: i64| Time::constant((minute / 60) as i8, (minute % 60) as i8, 0, 0);
        let mut day = tz.to_datetime(from).date();
        let horizon = day.checked_add(YEAR).ok()?;
        let mut previous_last_firing: Option<Timestamp> = None;
        let mut between_days = false;
        for _ in 0..SEARCH_DAYS {
            if cron.day_matches(day) {
                let first_firing = instant_of(tz, day.to_datetime(time_of(first)))?;
                if let Some(previous) = previous_last_firing {
                    widest = widest.max(first_firing.duration_since(previous));
                    between_days = true;
                    // The gap that ends past the year still counts: a yearly expression's
                    // interval is its year, a 29 February one's four years.
                    if day > horizon {
                        break;
                    }
                }
                previous_last_firing = Some(instant_of(tz, day.to_datetime(time_of(last)))?);
            }
            day = day.tomorrow().ok()?;
        }
        between_days.then_some(widest)
    }

    /// The civil times of `day` this frequency names, in order.
    fn times_on(&self, day: Date) -> Box<dyn Iterator<Item = Time> + '_> {
        match self {
            Frequency::Daily { at } => Box::new(std::iter::once(*at)),
            Frequency::Weekly { weekday, at } => Box::new((day.weekday() == *weekday).then_some(*at).into_iter()),
            Frequency::Monthly { day: wanted, at } => {
                let fires = day.day() == (*wanted as i8).min(day.days_in_month());
                Box::new(fires.then_some(*at).into_iter())
            }
            Frequency::Cron(cron) => {
                if !cron.day_matches(day) {
                    return Box::new(std::iter::empty());
                }
                Box::new(
                    bits(u64::from(cron.hours))
                        .flat_map(move |h| bits(cron.minutes).map(move |m| Time::constant(h as i8, m as i8, 0, 0))),
                )
            }
        }
    }
}

/// The instant a civil time names in `tz`: a skipped time the instant of the jump, a repeated
/// time its first occurrence.
fn instant_of(tz: &TimeZone, civil: DateTime) -> Option<Timestamp> {
    match tz.to_ambiguous_timestamp(civil).offset() {
        AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(civil).ok(),
        AmbiguousOffset::Fold { before, .. } => before.to_timestamp(civil).ok(),
        AmbiguousOffset::Gap { after, .. } => {
            // Read with the offset after the jump, a skipped time lies before the jump; the
            // next transition from there is the jump itself.
            let before_jump = after.to_timestamp(civil).ok()?;
            tz.following(before_jump).next().map(|transition| transition.timestamp())
        }
    }
}

/// The positions of the set bits of `set`, lowest first.
fn bits(set: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |bit| set & (1 << bit) != 0)
}

const WEEKDAYS: [(&str, Weekday); 7] = [
    ("sun", Weekday::Sunday),
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
];

const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];

fn weekday_name(weekday: Weekday) -> &'static str {
    WEEKDAYS.iter().find(|(_, w)| *w == weekday).map(|(name, _)| *name).expect("every weekday has a name")
}

fn parse_weekday(text: &str) -> Result<Weekday, FrequencyError> {
    let lower = text.to_ascii_lowercase();
    WEEKDAYS
        .iter()
        .find(|(name, weekday)| lower == *name || lower == format!("{weekday:?}").to_ascii_lowercase())
        .map(|(_, weekday)| *weekday)
        .ok_or_else(|| invalid(format!("{text:?} is not a weekday (mon, tue, wed, thu, fri, sat, sun)")))
}

fn parse_time(text: &str) -> Result<Time, FrequencyError> {
    let bad = || invalid(format!("{text:?} is not a time of day HH:MM (00:00 to 23:59)"));
    let (hour, minute) = text.split_once(':').ok_or_else(bad)?;
    if hour.is_empty() || hour.len() > 2 || minute.len() != 2 {
        return Err(bad());
    }
    let hour: i8 = hour.parse().map_err(|_| bad())?;
    let minute: i8 = minute.parse().map_err(|_| bad())?;
    Time::new(hour, minute, 0, 0).map_err(|_| bad())
}

fn show_time(at: Time) -> String {
    format!("{:02}:{:02}", at.hour(), at.minute())
}

impl fmt::Display for Frequency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frequency::Daily { at } => write!(f, "daily {}", show_time(*at)),
            Frequency::Weekly { weekday, at } => write!(f, "weekly {} {}", weekday_name(*weekday), show_time(*at)),
            Frequency::Monthly { day, at } => write!(f, "monthly {day} {}", show_time(*at)),
            Frequency::Cron(cron) => write!(f, "cron {}", cron.text),
        }
    }
}

const FORMS: &str = "daily HH:MM, weekly DAY HH:MM, monthly D HH:MM or cron EXPR";

impl FromStr for Frequency {
    type Err = FrequencyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let Some((kind, rest)) = words.split_first() else {
            return Err(invalid(format!("a frequency is one of {FORMS}")));
        };
        match (kind.to_ascii_lowercase().as_str(), rest) {
            ("daily", [at]) => Ok(Frequency::Daily { at: parse_time(at)? }),
            ("weekly", [weekday, at]) => {
                Ok(Frequency::Weekly { weekday: parse_weekday(weekday)?, at: parse_time(at)? })
            }
            ("monthly", [day, at]) => {
                let day: u8 = day
                    .parse()
                    .ok()
                    .filter(|d| (1..=31).contains(d))
                    .ok_or_else(|| invalid(format!("{day:?} is not a day of the month (1 to 31)")))?;
                Ok(Frequency::Monthly { day, at: parse_time(at)? })
            }
            ("cron", fields) if !fields.is_empty() => Ok(Frequency::Cron(fields.join(" ").parse()?)),
            _ => Err(invalid(format!("{text:?} is not a frequency: use {FORMS}"))),
        }
    }
}

impl serde::Serialize for Frequency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Frequency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A five-field cron expression (minute, hour, day of month, month, day of week), as Vixie
/// cron reads it: when both day fields are restricted a day matches if either does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    /// The expression as written, lower-cased with single spaces: what `Display` shows.
    text: String,
    minutes: u64,
    hours: u32,
    /// Bits 1–31.
    days_of_month: u32,
    /// Bits 1–12.
    months: u16,
    /// Bits 0–6, Sunday 0.
    days_of_week: u8,
    /// Vixie cron's rule: a day field written starting with `*` does not restrict, so the day
    /// matches on the other field alone; when both are written otherwise, either may match.
    either_day: bool,
}

/// One field's range and, for months and weekdays, its names (index = value - first).
struct Field {
    name: &'static str,
    first: u32,
    last: u32,
    names: &'static [&'static str],
}

const MINUTE: Field = Field { name: "minute", first: 0, last: 59, names: &[] };
const HOUR: Field = Field { name: "hour", first: 0, last: 23, names: &[] };
const DAY_OF_MONTH: Field = Field { name: "day of month", first: 1, last: 31, names: &[] };
const MONTH: Field = Field { name: "month", first: 1, last: 12, names: &MONTHS };
// 7 is Sunday too; folded onto 0 after parsing.
const DAY_OF_WEEK: Field =
    Field { name: "day of week", first: 0, last: 7, names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"] };

impl Field {
    fn value(&self, text: &str) -> Result<u32, FrequencyError> {
        let lower = text.to_ascii_lowercase();
        let value = match self.names.iter().position(|name| *name == lower) {
            Some(index) => self.first + index as u32,
            None => text.parse().map_err(|_| invalid(format!("{text:?} is not a {} value", self.name)))?,
        };
        if !(self.first..=self.last).contains(&value) {
            return Err(invalid(format!("{} {value} is outside {}-{}", self.name, self.first, self.last)));
        }
        Ok(value)
    }

    /// The set of values `text` names: `*`, `N`, `A-B`, each optionally `/STEP`, comma lists.
    fn parse(&self, text: &str) -> Result<u64, FrequencyError> {
        let mut set = 0u64;
        for item in text.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => {
                    let step: u32 = step
                        .parse()
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| invalid(format!("{step:?} is not a step (a whole number above 0)")))?;
                    (range, Some(step))
                }
                None => (item, None),
            };
            let (low, high) = if range == "*" {
                (self.first, self.last)
            } else if let Some((low, high)) = range.split_once('-') {
                (self.value(low)?, self.value(high)?)
            } else {
                let value = self.value(range)?;
                // `5/15` means from 5 to the end, every 15 (as cronie reads it).
                (value, if step.is_some() { self.last } else { value })
            };
            if low > high {
                return Err(invalid(format!("{} range {range:?} runs backwards", self.name)));
            }
            for value in (low..=high).step_by(step.unwrap_or(1) as usize) {
                set |= 1 << value;
            }
        }
        Ok(set)
    }
}

impl Cron {
    fn day_matches(&self, day: Date) -> bool {
        if self.months & (1 << day.month()) == 0 {
            return false;
        }
        let by_month_day = self.days_of_month & (1 << day.day()) != 0;
        let by_weekday = self.days_of_week & (1 << day.weekday().to_sunday_zero_offset()) != 0;
        if self.either_day {
            by_month_day || by_weekday
        } else {
            by_month_day && by_weekday
        }
    }

    /// Whether some day matches. Dates and weekdays repeat every 28 years, so 28 years from
    /// any start tell; a valid expression stops at its first match, within days.
    fn ever_fires(&self) -> bool {
        let Ok(mut day) = Date::new(2000, 1, 1) else { return false };
        for _ in 0..28 * 366 {
            if self.day_matches(day) {
                return true;
            }
            match day.tomorrow() {
                Ok(next) => day = next,
                Err(_) => return false,
            }
        }
        false
    }
}

impl FromStr for Cron {
    type Err = FrequencyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let normal = text.split_whitespace().collect::<Vec<_>>().join(" ").to_ascii_lowercase();
        let expanded = match normal.as_str() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            macro_ if macro_.starts_with('@') => {
                return Err(invalid(format!(
                    "{text:?} is not a cron macro cairn knows (@hourly, @daily, @weekly, @monthly, @yearly)"
                )))
            }
            other => other,
        };
        let fields: Vec<&str> = expanded.split(' ').collect();
        let [minute, hour, day_of_month, month, day_of_week] = fields[..] else {
            return Err(invalid(format!(
                "{text:?} has {} fields; a cron expression has 5: minute hour day-of-month month day-of-week",
                fields.len()
            )));
        };
        let mut days_of_week = DAY_OF_WEEK.parse(day_of_week)?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week | 1) & 0x7F;
        }
        let cron = Cron {
            text: normal.clone(),
            minutes: MINUTE.parse(minute)?,
            hours: HOUR.parse(hour)? as u32,
            days_of_month: DAY_OF_MONTH.parse(day_of_month)? as u32,
            months: MONTH.parse(month)? as u16,
            days_of_week: days_of_week as u8,
            either_day: !day_of_month.starts_with('*') && !day_of_week.starts_with('*'),
        };
        if !cron.ever_fires() {
            return Err(invalid(format!("cron {normal:?} never fires: no date matches its day and month fields")));
        }
        Ok(cron)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tz(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    /// The next `count` firings after `from`, as RFC 3339 UTC instants.
    fn firings(frequency: &str, zone: &str, from: &str, count: usize) -> Vec<String> {
        let frequency: Frequency = frequency.parse().unwrap();
        let zone = tz(zone);
        let mut after = at(from);
        (0..count)
            .map(|_| {
                after = frequency.next_after(after, &zone).unwrap();
                after.to_string()
            })
            .collect()
    }

    #[test]
    fn text_forms_round_trip_and_normalise() {
        for (text, shown) in [
            ("daily 03:00", "daily 03:00"),
            ("Daily 3:05", "daily 03:05"),
            ("weekly sun 03:00", "weekly sun 03:00"),
            ("weekly Sunday 23:59", "weekly sun 23:59"),
            ("monthly 31 04:00", "monthly 31 04:00"),
            ("cron  */15 *  * * *", "cron */15 * * * *"),
            ("cron @Daily", "cron @daily"),
            ("cron 0 3 * JAN-mar mon-fri", "cron 0 3 * jan-mar mon-fri"),
        ] {
            let frequency: Frequency = text.parse().unwrap();
            assert_eq!(frequency.to_string(), shown);
            assert_eq!(shown.parse::<Frequency>().unwrap(), frequency);
            let json = serde_json::to_string(&frequency).unwrap();
            assert_eq!(serde_json::from_str::<Frequency>(&json).unwrap(), frequency);
        }
    }

    #[test]
    fn bad_frequencies_are_refused_with_the_reason() {
        for (text, reason) in [
            ("", "a frequency is one of"),
            ("hourly", "is not a frequency"),
            ("daily", "is not a frequency"),
            ("daily 24:00", "not a time of day"),
            ("daily 3:7", "not a time of day"),
            ("weekly someday 03:00", "not a weekday"),
            ("monthly 0 03:00", "not a day of the month"),
            ("monthly 32 03:00", "not a day of the month"),
            ("cron", "is not a frequency"),
            ("cron 0 3 * *", "has 4 fields"),
            ("cron 60 * * * *", "minute 60 is outside 0-59"),
            ("cron 0 3 * * 8", "day of week 8 is outside 0-7"),
            ("cron */0 * * * *", "not a step"),
            ("cron 5-1 * * * *", "runs backwards"),
            ("cron 0 0 30 2 *", "never fires"),
            ("cron 0 0 31 apr,jun,sep,nov *", "never fires"),
            ("cron @reboot", "not a cron macro"),
        ] {
            let error = text.parse::<Frequency>().unwrap_err().to_string();
            assert!(error.contains(reason), "{text:?}: {error}");
        }
    }

    #[test]
    fn daily_weekly_and_monthly_fire_at_their_wall_clock_time() {
        assert_eq!(
            firings("daily 03:00", "UTC", "2026-01-01T03:00:00Z", 2),
            ["2026-01-02T03:00:00Z", "2026-01-03T03:00:00Z"]
        );
        // 2026-01-01 is a Thursday.
        assert_eq!(
            firings("weekly sun 03:00", "UTC", "2026-01-01T00:00:00Z", 2),
            ["2026-01-04T03:00:00Z", "2026-01-11T03:00:00Z"]
        );
        assert_eq!(firings("daily 03:00", "Asia/Kolkata", "2026-01-01T00:00:00Z", 1), ["2026-01-01T21:30:00Z"]);
    }

    #[test]
    fn monthly_day_31_fires_on_the_last_day_of_shorter_months() {
        let days: Vec<String> = firings("monthly 31 04:00", "UTC", "2027-12-31T12:00:00Z", 14)
            .iter()
            .map(|t| t[..10].to_string())
            .collect();
        assert_eq!(
            days,
            [
                "2028-01-31",
                "2028-02-29",
                "2028-03-31",
                "2028-04-30",
                "2028-05-31",
                "2028-06-30",
                "2028-07-31",
                "2028-08-31",
                "2028-09-30",
                "2028-10-31",
                "2028-11-30",
                "2028-12-31",
                "2029-01-31",
                "2029-02-28"
            ]
        );
        // Cron's 31 skips short months, as every cron does.
        let cron: Vec<String> =
            firings("cron 0 4 31 * *", "UTC", "2028-01-01T00:00:00Z", 3).iter().map(|t| t[..10].to_string()).collect();
        assert_eq!(cron, ["2028-01-31", "2028-03-31", "2028-05-31"]);
    }

    #[test]
    fn berlin_spring_gap_fires_at_the_jump_and_autumn_fold_once() {
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC). 02:30 does not exist.
        assert_eq!(
            firings("daily 02:30", "Europe/Berlin", "2026-03-27T12:00:00Z", 3),
            ["2026-03-28T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]
        );
        // Every quarter hour: the four in the gap make one firing at the jump.
        assert_eq!(
            firings("cron */15 2 * * *", "Europe/Berlin", "2026-03-29T00:50:00Z", 2),
            ["2026-03-29T01:00:00Z", "2026-03-30T00:00:00Z"]
        );
        // 2026-10-25: 03:00 CEST goes back to 02:00 CET (01:00 UTC); 02:30 happens twice.
        assert_eq!(
            firings("daily 02:30", "Europe/Berlin", "2026-10-24T12:00:00Z", 3),
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z", "2026-10-27T01:30:00Z"]
        );
        // From inside the second pass of the fold, the next 02:30 is tomorrow's.
        assert_eq!(firings("daily 02:30", "Europe/Berlin", "2026-10-25T01:10:00Z", 1), ["2026-10-26T01:30:00Z"]);
        // Hourly through the fold: 02:00 once (the first), then 03:00.
        assert_eq!(
            firings("cron 0 * * * *", "Europe/Berlin", "2026-10-24T23:30:00Z", 3),
            ["2026-10-25T00:00:00Z", "2026-10-25T02:00:00Z", "2026-10-25T03:00:00Z"]
        );
    }

    #[test]
    fn new_york_gap_and_fold() {
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00 UTC).
        assert_eq!(
            firings("daily 02:15", "America/New_York", "2026-03-07T12:00:00Z", 2),
            ["2026-03-08T07:00:00Z", "2026-03-09T06:15:00Z"]
        );
        // 2026-11-01: 02:00 EDT goes back to 01:00 EST; 01:30 is first at 05:30 UTC.
        assert_eq!(
            firings("daily 01:30", "America/New_York", "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]
        );
    }

    #[test]
    fn cron_fields_follow_vixie_cron() {
        // Both day fields restricted: either matches. 2026-02-01 is a Sunday.
        let either: Vec<String> = firings("cron 0 0 13 * fri", "UTC", "2026-02-01T00:00:00Z", 4)
            .iter()
            .map(|t| t[..10].to_string())
            .collect();
        assert_eq!(either, ["2026-02-06", "2026-02-13", "2026-02-20", "2026-02-27"]);
        // A `*`-led day field does not restrict: weekdays only, and 7 is Sunday.
        let sundays: Vec<String> =
            firings("cron 0 0 * * 7", "UTC", "2026-02-01T00:00:00Z", 2).iter().map(|t| t[..10].to_string()).collect();
        assert_eq!(sundays, ["2026-02-08", "2026-02-15"]);
        assert_eq!(
            firings("cron 5/20 9-10 * * *", "UTC", "2026-02-01T00:00:00Z", 4),
            ["2026-02-01T09:05:00Z", "2026-02-01T09:25:00Z", "2026-02-01T09:45:00Z", "2026-02-01T10:05:00Z"]
        );
        assert_eq!(firings("cron @yearly", "UTC", "2026-02-01T00:00:00Z", 1), ["2027-01-01T00:00:00Z"]);
        // 29 February only: every leap year.
        assert_eq!(firings("cron 0 0 29 2 *", "UTC", "2026-02-01T00:00:00Z", 1), ["2028-02-29T00:00:00Z"]);
    }

    #[test]
    fn interval_is_the_widest_gap_between_firings() {
        let from = at("2026-01-01T00:00:00Z");
        let utc = tz("UTC");
        let interval = |text: &str| text.parse::<Frequency>().unwrap().interval(from, &utc).as_secs();
        assert_eq!(interval("daily 03:00"), 86_400);
        assert_eq!(interval("weekly mon 03:00"), 7 * 86_400);
        assert_eq!(interval("monthly 1 03:00"), 31 * 86_400);
        assert_eq!(interval("cron * * * * *"), 60);
        assert_eq!(interval("cron */15 * * * *"), 900);
        // Weekdays at 9 to 17: the widest gap is Friday 17:00 to Monday 09:00.
        assert_eq!(interval("cron 0 9-17 * * mon-fri"), 64 * 3600);
        // Every five minutes on weekdays: the weekend is the gap, however many firings come first.
        assert_eq!(interval("cron */5 * * * 1-5"), 2 * 86_400 + 300);
        assert_eq!(interval("cron 30 4 1 1 *"), 365 * 86_400);
        assert_eq!(interval("cron 0 0 29 2 *"), (4 * 365 + 1) * 86_400);
    }

    const ZONES: [&str; 5] = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"];

    /// The model: walk instants minute by minute; each instant reaches the civil minutes
    /// from the previous instant's (exclusive) to its own (inclusive); none when the clock
    /// went back. The first instant that reaches a civil minute the frequency names fires.
    fn brute_force_next(
        frequency: &Frequency,
        after: Timestamp,
        zone: &TimeZone,
        limit_minutes: i64,
    ) -> Option<Timestamp> {
        let minute = SignedDuration::from_mins(1);
        let mut previous_civil = zone.to_datetime(after);
        let mut instant = after;
        for _ in 0..limit_minutes {
            instant += minute;
            let civil = zone.to_datetime(instant);
            let mut reached = previous_civil;
            while reached < civil {
                reached = reached.checked_add(minute).unwrap();
                if frequency.times_on(reached.date()).any(|t| t == reached.time()) {
                    return Some(instant);
                }
            }
            previous_civil = previous_civil.max(civil);
        }
        None
    }

    fn any_frequency() -> impl Strategy<Value = String> {
        let time = (0u8..24, 0u8..60).prop_map(|(h, m)| format!("{h:02}:{m:02}"));
        let near_changes = prop_oneof![Just("01:30".to_string()), Just("02:00".to_string()), Just("02:30".to_string())];
        let time = prop_oneof![time, near_changes];
        prop_oneof![
            time.clone().prop_map(|t| format!("daily {t}")),
            (0usize..7, time.clone()).prop_map(|(d, t)| format!("weekly {} {t}", WEEKDAYS[d].0)),
            (1u8..=31, time).prop_map(|(d, t)| format!("monthly {d} {t}")),
            (1u8..=30, 0u8..4).prop_map(|(step, hour)| format!("cron */{step} {hour}-{} * * *", hour + 1)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// next_after agrees with the minute-by-minute model, from anywhere in the year and
        /// in the days around each of the zone's clock changes.
        #[test]
        fn next_after_matches_the_civil_minute_model(
            frequency in any_frequency(),
            zone in 0usize..ZONES.len(),
            change in 0usize..3,
            minute in 0i64..(366 * 24 * 60),
        ) {
            let frequency: Frequency = frequency.parse().unwrap();
            let zone = tz(ZONES[zone]);
            let new_year = at("2026-01-01T00:00:00Z");
            // change 0: anywhere in 2026; 1 and 2: within two days before the 1st or 2nd change.
            let after = match zone.following(new_year).nth(change.wrapping_sub(1)) {
                Some(transition) if change > 0 => {
                    transition.timestamp() - SignedDuration::from_mins(minute % (2 * 24 * 60))
                }
                _ => new_year + SignedDuration::from_mins(minute),
            };
            let expected = brute_force_next(&frequency, after, &zone, 32 * 24 * 60);
            prop_assert_eq!(frequency.next_after(after, &zone), expected);
        }
    }
}

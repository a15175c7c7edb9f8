//! Retention rules (R3): which of a series of dated restore points to keep. Pure, so backup
//! pruning and schedules share one definition and tests need no clock.
//!
//! The rules follow restic's `forget`: `keep_last` keeps the newest N; each period rule keeps
//! the newest point of each of the N most recent periods (days, ISO weeks, months, years, in
//! the given time zone) that hold one; `keep_within_days` keeps every point younger than that
//! many days. A point kept by any rule is kept; the reasons say which.

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::Error;

/// How many restore points to keep, by count and by period. All `None` is refused: a plan
/// with no rule would delete everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRules {
    pub keep_last: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Keep every point younger than this many days, whatever the counts say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within_days: Option<u32>,
}

/// One restore point's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub id: String,
    pub time: Timestamp,
    pub keep: bool,
    /// The rules that keep it ("last", "daily", …); empty when it goes.
    pub reasons: Vec<&'static str>,
}

#[derive(Clone, Copy)]
enum Period {
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    /// A number naming the period that holds `time` in `tz`; equal for equal periods.
    fn of(self, time: Timestamp, tz: &TimeZone) -> i64 {
        let date = time.to_zoned(tz.clone()).date();
        let (year, month, day) = (date.year() as i64, date.month() as i64, date.day() as i64);
        match self {
            Period::Day => (year * 100 + month) * 100 + day,
            Period::Week => {
                let week = date.iso_week_date();
                week.year() as i64 * 100 + week.week() as i64
            }
            Period::Month => year * 100 + month,
            Period::Year => year,
        }
    }
}

impl RetentionRules {
    pub fn check(&self) -> Result<(), Error> {
        let counts = [
            self.keep_last,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
            self.keep_within_days,
        ];
        if counts.iter().all(Option::is_none) {
            return Err(Error::invalid("rules", "give at least one keep rule (keep_last, keep_daily, …)"));
        }
        if counts.iter().all(|c| c.is_none_or(|n| n == 0)) {
            return Err(Error::invalid("rules", "every keep rule is 0: that would delete everything"));
        }
        Ok(())
    }

    /// The verdict on each point, oldest first, judged at `now` (for `keep_within_days`).
    /// Points are `(id, time)`; ties in time are broken by id, so the plan is the same whatever
    /// order they come in.
    pub fn plan(&self, points: &[(String, Timestamp)], tz: &TimeZone, now: Timestamp) -> Vec<Verdict> {
        let mut verdicts: Vec<Verdict> = points
            .iter()
            .map(|(id, time)| Verdict { id: id.clone(), time: *time, keep: false, reasons: Vec::new() })
            .collect();
        verdicts.sort_by(|a, b| (b.time, &b.id).cmp(&(a.time, &a.id)));
        for v in verdicts.iter_mut().take(self.keep_last.unwrap_or(0) as usize) {
            v.reasons.push("last");
        }
        let periods = [
            (self.keep_daily, Period::Day, "daily"),
            (self.keep_weekly, Period::Week, "weekly"),
            (self.keep_monthly, Period::Month, "monthly"),
            (self.keep_yearly, Period::Year, "yearly"),
        ];
        for (count, period, reason) in periods {
            let Some(count) = count else { continue };
            let mut kept = 0;
            let mut last_period = None;
            for v in verdicts.iter_mut() {
                if kept == count {
                    break;
                }
                let this = period.of(v.time, tz);
                if last_period != Some(this) {
                    v.reasons.push(reason);
                    kept += 1;
                    last_period = Some(this);
                }
            }
        }
        if let Some(days) = self.keep_within_days {
            let since = now - jiff::SignedDuration::from_hours(24 * i64::from(days));
            for v in verdicts.iter_mut().filter(|v| v.time > since) {
                v.reasons.push("within");
            }
        }
        for v in &mut verdicts {
            v.keep = !v.reasons.is_empty();
        }
        verdicts.reverse();
        verdicts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn points(times: &[&str]) -> Vec<(String, Timestamp)> {
        times.iter().enumerate().map(|(i, t)| (format!("b{i}"), at(t))).collect()
    }

    fn kept(rules: &RetentionRules, times: &[&str], tz: &TimeZone) -> Vec<String> {
        rules
            .plan(&points(times), tz, at("2030-01-01T00:00:00Z"))
            .into_iter()
            .filter(|v| v.keep)
            .map(|v| v.id)
            .collect()
    }

    #[test]
    fn keep_last_keeps_the_newest_whatever_the_input_order() {
        let rules = RetentionRules { keep_last: Some(2), ..Default::default() };
        let times = ["2026-01-03T00:00:00Z", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"];
        assert_eq!(kept(&rules, &times, &TimeZone::UTC), ["b2", "b0"]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day_and_counts_days_that_have_one() {
        let rules = RetentionRules { keep_daily: Some(3), ..Default::default() };
        let times = [
            "2026-03-01T01:00:00Z",
            "2026-03-01T23:00:00Z",
            "2026-03-03T05:00:00Z",
            "2026-03-06T05:00:00Z",
            "2026-03-06T07:00:00Z",
        ];
        // Days with points: 6th (newest at 07:00), 3rd, 1st (newest at 23:00).
        assert_eq!(kept(&rules, &times, &TimeZone::UTC), ["b1", "b2", "b4"]);
    }

    #[test]
    fn periods_are_counted_in_the_given_time_zone() {
        let rules = RetentionRules { keep_daily: Some(1), ..Default::default() };
        // 23:30 UTC on the 1st and 00:30 UTC on the 2nd are both the 2nd in Berlin.
        let times = ["2026-03-01T23:30:00Z", "2026-03-02T00:30:00Z"];
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        assert_eq!(kept(&rules, &times, &berlin), ["b1"]);
        let both = RetentionRules { keep_daily: Some(2), ..Default::default() };
        assert_eq!(kept(&both, &times, &TimeZone::UTC), ["b0", "b1"]);
        assert_eq!(kept(&both, &times, &berlin), ["b1"]);
    }

    #[test]
    fn weeks_are_iso_weeks_across_the_new_year() {
        let rules = RetentionRules { keep_weekly: Some(2), ..Default::default() };
        // 2026-12-28 (Monday) to 2027-01-03 (Sunday) is ISO week 53 of 2026.
        let times = ["2026-12-27T12:00:00Z", "2026-12-28T12:00:00Z", "2027-01-03T12:00:00Z"];
        assert_eq!(kept(&rules, &times, &TimeZone::UTC), ["b0", "b2"]);
    }

    #[test]
    fn rules_combine_and_report_their_reasons() {
        let rules = RetentionRules { keep_last: Some(1), keep_monthly: Some(2), ..Default::default() };
        let plan = rules.plan(
            &points(&["2026-01-05T00:00:00Z", "2026-02-05T00:00:00Z", "2026-02-06T00:00:00Z"]),
            &TimeZone::UTC,
            at("2026-03-01T00:00:00Z"),
        );
        let reasons: Vec<Vec<&str>> = plan.iter().map(|v| v.reasons.clone()).collect();
        assert_eq!(reasons, [vec!["monthly"], vec![], vec!["last", "monthly"]]);
    }

    #[test]
    fn keep_within_keeps_everything_younger_than_its_days() {
        let rules = RetentionRules { keep_last: Some(1), keep_within_days: Some(2), ..Default::default() };
        let times = ["2026-01-01T00:00:00Z", "2026-01-08T12:00:00Z", "2026-01-09T12:00:00Z", "2026-01-10T00:00:00Z"];
        let plan = rules.plan(&points(&times), &TimeZone::UTC, at("2026-01-10T06:00:00Z"));
        let kept: Vec<&str> = plan.iter().filter(|v| v.keep).map(|v| v.id.as_str()).collect();
        // Two days before 01-10 06:00 is 01-08 06:00: the 8th at 12:00 is inside.
        assert_eq!(kept, ["b1", "b2", "b3"]);
        assert!(RetentionRules { keep_within_days: Some(1), ..Default::default() }.check().is_ok());
    }

    #[test]
    fn no_rule_or_all_zero_is_refused() {
        assert!(RetentionRules::default().check().is_err());
        assert!(RetentionRules { keep_last: Some(0), ..Default::default() }.check().is_err());
        assert!(RetentionRules { keep_yearly: Some(1), ..Default::default() }.check().is_ok());
    }

    proptest! {
        /// Against a brute-force reading of the rules: the newest point is always kept; keep_last
        /// N keeps at least min(N, points); daily N keeps exactly min(N, distinct days) points
        /// on its own, each the newest of its day.
        #[test]
        fn plans_match_a_brute_force_reading(
            hours in proptest::collection::vec(0u32..24 * 60, 1..40),
            last in 0u32..5,
            daily in 1u32..6,
        ) {
            let base = at("2026-01-01T00:00:00Z");
            let pts: Vec<(String, Timestamp)> = hours
                .iter()
                .enumerate()
                .map(|(i, h)| (format!("p{i:02}"), base + jiff::SignedDuration::from_hours(*h as i64)))
                .collect();
            let rules = RetentionRules { keep_last: Some(last), keep_daily: Some(daily), ..Default::default() };
            let plan = rules.plan(&pts, &TimeZone::UTC, base);
            let newest = pts.iter().max_by_key(|(id, t)| (*t, id.clone())).unwrap();
            prop_assert!(plan.iter().any(|v| v.id == newest.0 && v.keep));
            let daily_kept: Vec<&Verdict> = plan.iter().filter(|v| v.reasons.contains(&"daily")).collect();
            let mut days: Vec<i64> = pts.iter().map(|(_, t)| t.as_second().div_euclid(86400)).collect();
            days.sort();
            days.dedup();
            prop_assert_eq!(daily_kept.len(), days.len().min(daily as usize));
            for v in daily_kept {
                let day = v.time.as_second().div_euclid(86400);
                let newest_that_day = pts
                    .iter()
                    .filter(|(_, t)| t.as_second().div_euclid(86400) == day)
                    .max_by_key(|(id, t)| (*t, id.clone()))
                    .unwrap();
                prop_assert_eq!(&v.id, &newest_that_day.0);
            }
            let last_kept = plan.iter().filter(|v| v.reasons.contains(&"last")).count();
            prop_assert_eq!(last_kept, pts.len().min(last as usize));
        }
    }
}

//! Small human formats: byte sizes, times, ages.

use time::OffsetDateTime;

/// Binary units with one decimal, as `nix path-info -h` prints them:
/// `512 B`, `1.2 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    // Move up a unit before rounding would print "1024.0 KiB".
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn utc(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

/// RFC 3339 in UTC with milliseconds: `2025-06-01T07:15:02.123Z`.
pub fn rfc3339(ms: i64) -> String {
    match utc(ms) {
        Some(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        None => format!("@{ms}ms"),
    }
}

/// `rfc3339`, or JSON null for "never" (the protocol's 0).
pub fn rfc3339_or_null(ms: i64) -> serde_json::Value {
    if ms == 0 {
        serde_json::Value::Null
    } else {
        rfc3339(ms).into()
    }
}

/// Time of day in UTC, for one line per event: `07:15:02`.
pub fn clock(ms: i64) -> String {
    match utc(ms) {
        Some(t) => format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second()),
        None => "--:--:--".to_owned(),
    }
}

/// Date and time in UTC for tables: `2025-06-01 07:15:02`.
pub fn datetime(ms: i64) -> String {
    if ms == 0 {
        return "-".to_owned();
    }
    match utc(ms) {
        Some(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        None => "-".to_owned(),
    }
}

/// How long ago `then_ms` was: `12s ago`, `5m ago`, `3h ago`, `2d ago`, `never`.
pub fn ago(now_ms: i64, then_ms: i64) -> String {
    if then_ms == 0 {
        return "never".to_owned();
    }
    let secs = (now_ms - then_ms).max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// `9,998`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// How long something took: `850ms`, `4.2s`, `3m12s`, `2h05m`.
pub fn span(ms: i64) -> String {
    let ms = ms.max(0);
    let secs = ms / 1000;
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{}.{}s", secs, (ms % 1000) / 100),
        60_000..=3_599_999 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// When a certificate ends, seen from `now_ms`: `in 29d`, `in 5h`,
/// `expired 2d ago`; `-` when not known.
pub fn expires(now_ms: i64, not_after_ms: i64) -> String {
    if not_after_ms == 0 {
        return "-".to_owned();
    }
    if not_after_ms <= now_ms {
        return format!("expired {}", ago(now_ms, not_after_ms));
    }
    let secs = (not_after_ms - now_ms) / 1000;
    match secs {
        0..=59 => format!("in {secs}s"),
        60..=3599 => format!("in {}m", secs / 60),
        3600..=86_399 => format!("in {}h", secs / 3600),
        _ => format!("in {}d", secs / 86_400),
    }
}

/// At most `max` characters, with `…` when cut.
/// `s` safe to print on a terminal: control characters (escape sequences,
/// carriage returns, newlines) and bidirectional overrides, which an agent
/// or an artifact could use to erase or forge what an operator sees, are
/// shown as `\u{1b}`. JSON output never goes through this: it stays exact.
pub fn safe(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// The first 12 characters of a commit id, as `git log --oneline` would.
pub fn short_commit(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// Names as people sort them: `m-2` before `m-10`.
pub fn natural_order(a: &str, b: &str) -> std::cmp::Ordering {
    natord::compare(a, b)
}

/// A store path as tables show it: the first 8 characters of its hash,
/// then its name (`6h5k23a2…-nixos-system-worker-1-gen1`); anything else
/// as it is. `--wide` and JSON show the whole path.
pub fn short_store_path(path: &str) -> String {
    match path
        .strip_prefix("/nix/store/")
        .and_then(|rest| rest.split_at_checked(32))
    {
        Some((hash, name)) if name.starts_with('-') => format!("{}…{name}", &hash[..8]),
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(thousands(9_998), "9,998");
        assert_eq!(thousands(100), "100");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }

    #[test]
    fn spans_read_at_a_glance() {
        let shown: Vec<String> = [0, 850, 4_250, 192_000, 7_500_000].map(span).into();
        assert_eq!(shown, ["0ms", "850ms", "4.2s", "3m12s", "2h05m"]);
    }

    #[test]
    fn numbers_in_names_sort_as_numbers() {
        let mut names = ["m-10", "m-2", "m-1", "web-1"];
        names.sort_by(|a, b| natural_order(a, b));
        assert_eq!(names, ["m-1", "m-2", "m-10", "web-1"]);
    }

    #[test]
    fn store_paths_are_shortened_to_hash_start_and_name() {
        let path = "/nix/store/6h5k23a2x0c1r6kmd0vzz2a5i8n9b3q4-nixos-system-worker-1-gen1";
        assert_eq!(
            short_store_path(path),
            "6h5k23a2…-nixos-system-worker-1-gen1"
        );
        assert_eq!(short_store_path("-"), "-");
        assert_eq!(short_store_path("/nix/store/short"), "/nix/store/short");
    }

    #[test]
    fn certificate_ends_read_from_now() {
        let now = 1_748_762_102_000;
        assert_eq!(expires(now, 0), "-");
        assert_eq!(expires(now, now + 29 * 86_400_000 + 1), "in 29d");
        assert_eq!(expires(now, now + 5 * 3_600_000), "in 5h");
        assert_eq!(expires(now, now + 90_000), "in 1m");
        assert_eq!(expires(now, now - 2 * 86_400_000), "expired 2d ago");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1_258_291), "1.2 MiB");
        assert_eq!(bytes(3_565_158), "3.4 MiB");
        assert_eq!(bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn times_are_utc() {
        // 2025-06-01T07:15:02.123Z
        let ms = 1_748_762_102_123;
        assert_eq!(rfc3339(ms), "2025-06-01T07:15:02.123Z");
        assert_eq!(clock(ms), "07:15:02");
        assert_eq!(datetime(ms), "2025-06-01 07:15:02");
        assert_eq!(datetime(0), "-");
        assert_eq!(rfc3339_or_null(0), serde_json::Value::Null);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn out_of_range_times_do_not_panic() {
        assert_eq!(clock(i64::MAX), "--:--:--");
        assert!(rfc3339(i64::MIN).starts_with('@'));
    }

    #[test]
    fn ages() {
        let now = 1_000_000_000;
        assert_eq!(ago(now, 0), "never");
        assert_eq!(ago(now, now - 12_000), "12s ago");
        assert_eq!(ago(now, now - 300_000), "5m ago");
        assert_eq!(ago(now, now - 3 * 3_600_000), "3h ago");
        assert_eq!(ago(now, now - 2 * 86_400_000), "2d ago");
        assert_eq!(
            ago(now, now + 5_000),
            "0s ago",
            "clock skew is not negative"
        );
    }

    #[test]
    fn truncation_and_commits() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("a long reason", 6), "a lon…");
        assert_eq!(short_commit("3f2c1a9b8e7d6c5b4a39"), "3f2c1a9b8e7d");
        assert_eq!(short_commit("3f2c1a9"), "3f2c1a9");
    }
}

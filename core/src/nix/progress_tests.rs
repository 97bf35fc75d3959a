//! The parser against stderr captured from real `nix copy` runs (Nix 2.8).

use super::*;

/// `nix copy --from http://127.0.0.1:PORT` of a 4-path closure (three 8 MiB
/// NARs, uncompressed) into a fresh store.
const HTTP_COPY: &str = include_str!("testdata/copy-http-nix-2.8.jsonl");
/// The same closure from a `file://` cache: Nix reports no bytes here.
const FILE_COPY: &str = include_str!("testdata/copy-file-nix-2.8.jsonl");
/// A copy refused because the cache's signature is not from a trusted key.
const WRONG_KEY: &str = include_str!("testdata/copy-wrong-key-nix-2.8.jsonl");

fn run(log: &str) -> (CopyTracker, Vec<CopyProgress>) {
    let mut tracker = CopyTracker::new(10);
    let mut seen = Vec::new();
    for line in log.lines() {
        if tracker.feed(line) {
            seen.push(tracker.progress());
        }
    }
    (tracker, seen)
}

#[test]
fn http_copy_reports_bytes_of_nar_transfers_and_paths() {
    let (tracker, seen) = run(HTTP_COPY);
    let last = tracker.progress();
    // Three NARs of 8388888 bytes and one of 600; narinfo downloads don't count.
    assert_eq!(last.bytes_expected, 3 * 8_388_888 + 600);
    assert_eq!(last.bytes_done, last.bytes_expected);
    assert_eq!((last.paths_done, last.paths_expected), (4, 4));
    // Progress grows monotonically through the copy.
    assert!(seen.len() > 10, "{seen:?}");
    for pair in seen.windows(2) {
        assert!(pair[1].bytes_done >= pair[0].bytes_done, "{pair:?}");
        assert!(pair[1].paths_done >= pair[0].paths_done, "{pair:?}");
    }
    assert!(
        seen.iter()
            .any(|p| p.bytes_done > 0 && p.bytes_done < p.bytes_expected)
    );
    assert_eq!(tracker.messages(), "");
}

#[test]
fn file_copy_reports_paths_only() {
    let (tracker, _) = run(FILE_COPY);
    let last = tracker.progress();
    assert_eq!((last.paths_done, last.paths_expected), (4, 4));
    assert_eq!((last.bytes_done, last.bytes_expected), (0, 0));
}

#[test]
fn error_lines_are_kept_without_colour() {
    let (tracker, _) = run(WRONG_KEY);
    let messages = tracker.messages();
    assert_eq!(
        messages,
        "error: cannot add path '/nix/store/icnf43x5pxxwzavzmg9csr8raqzf48q3-dep' because it lacks a valid signature"
    );
}

#[test]
fn plain_text_lines_are_kept_and_the_oldest_dropped() {
    let mut tracker = CopyTracker::new(2);
    assert!(!tracker.feed("\u{1b}[31;1merror:\u{1b}[0m one"));
    tracker.feed("two");
    tracker.feed("   ");
    tracker.feed("@nix {not json");
    assert_eq!(tracker.messages(), "two\n@nix {not json");
}

#[test]
fn newer_nix_progress_on_copy_paths_and_copy_path_is_understood() {
    // The shape Nix >= 2.4 uses when the destination reports per-path bytes.
    let lines = [
        r#"@nix {"action":"start","id":1,"level":3,"text":"copying 2 paths","type":103}"#,
        r#"@nix {"action":"result","fields":[100,3000],"id":1,"type":106}"#,
        r#"@nix {"action":"start","fields":["/nix/store/x-a","https://c","local"],"id":2,"level":3,"text":"copying path","type":100}"#,
        r#"@nix {"action":"result","fields":[500,1000,0,0],"id":2,"type":105}"#,
        r#"@nix {"action":"result","fields":[1,2,1,0],"id":1,"type":105}"#,
    ];
    let mut tracker = CopyTracker::new(4);
    for line in lines {
        tracker.feed(line);
    }
    assert_eq!(
        tracker.progress(),
        CopyProgress {
            bytes_done: 500,
            bytes_expected: 3000,
            paths_done: 1,
            paths_expected: 2
        }
    );
}

#[test]
fn with_narinfo_sizes_the_bytes_fill_even_when_nix_reports_none() {
    // Nix 2.8 from a file:// cache: paths start and stop, no bytes at all.
    let lines = [
        r#"@nix {"action":"start","id":1,"level":3,"text":"copying 2 paths","type":103}"#,
        r#"@nix {"action":"start","fields":["/nix/store/x-a","file:///c","local"],"id":2,"level":3,"text":"copying path","type":100}"#,
        r#"@nix {"action":"stop","id":2}"#,
        r#"@nix {"action":"start","fields":["/nix/store/x-b","file:///c","local"],"id":3,"level":3,"text":"copying path","type":100}"#,
    ];
    let sizes = [("/nix/store/x-a", 1000), ("/nix/store/x-b", 3000)]
        .map(|(p, n)| (p.to_owned(), n))
        .into();
    let mut tracker = CopyTracker::new(4).expecting(sizes);
    for line in lines {
        tracker.feed(line);
    }
    let halfway = tracker.progress();
    assert_eq!((halfway.bytes_done, halfway.bytes_expected), (1000, 4000));
    tracker.feed(r#"@nix {"action":"stop","id":3}"#);
    // A path reported twice still counts once.
    tracker.feed(r#"@nix {"action":"stop","id":3}"#);
    assert_eq!(
        tracker.progress(),
        CopyProgress {
            bytes_done: 4000,
            bytes_expected: 4000,
            paths_done: 2,
            paths_expected: 2
        }
    );
}

#[test]
fn copying_n_paths_is_parsed() {
    assert_eq!(parse_copying_n_paths("copying 4 paths"), Some(4));
    assert_eq!(parse_copying_n_paths("copying 1 path"), Some(1));
    assert_eq!(parse_copying_n_paths("copying path '/nix/store/x'"), None);
    assert_eq!(parse_copying_n_paths(""), None);
}

#[test]
fn strip_ansi_removes_colour_and_keeps_text() {
    // A real message from Nix 2.8's internal-json log.
    let msg = "\u{1b}[31;1merror:\u{1b}[0m cannot add path '\u{1b}[35;1m/nix/store/icnf43x5pxxwzavzmg9csr8raqzf48q3-dep\u{1b}[0m' because it lacks a valid signature";
    assert_eq!(
        strip_ansi(msg),
        "error: cannot add path '/nix/store/icnf43x5pxxwzavzmg9csr8raqzf48q3-dep' because it lacks a valid signature"
    );
    assert_eq!(strip_ansi("\u{1b}]0;title\u{7}ok\u{1b}[2K"), "ok");
    assert_eq!(
        strip_ansi("a\u{1b}]8;;http://x\u{1b}\\link\u{1b}]8;;\u{1b}\\b"),
        "alinkb"
    );
    assert_eq!(strip_ansi("plain ünïcode"), "plain ünïcode");
    assert_eq!(strip_ansi("trailing \u{1b}"), "trailing ");
}

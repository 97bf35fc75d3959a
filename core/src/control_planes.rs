//! The control plane's addresses as a client holds them: every replica's,
//! or one load balancer's. They are tried in turn; the one that answered
//! last is tried first, so a client stays with a replica while it serves.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct ControlPlanes {
    urls: Vec<String>,
    /// The index of the one to try first.
    current: AtomicUsize,
}

impl ControlPlanes {
    /// `urls` in the order given, each once; at least one.
    pub fn new(urls: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut unique: Vec<String> = Vec::new();
        for url in urls {
            let url = url.trim().to_owned();
            if !url.is_empty() && !unique.contains(&url) {
                unique.push(url);
            }
        }
        if unique.is_empty() {
            return Err("no control plane given: pass --control-plane https://HOST:PORT (once per replica), or set PROCURATOR_CONTROL_PLANE (space separated)".into());
        }
        Ok(Self {
            urls: unique,
            current: AtomicUsize::new(0),
        })
    }

    pub fn all(&self) -> &[String] {
        &self.urls
    }

    /// The one to try first.
    pub fn current(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    /// Every URL once, the current one first, then the others in turn.
    pub fn in_turn(&self) -> impl Iterator<Item = &str> {
        let start = self.current.load(Ordering::Relaxed) % self.urls.len();
        (0..self.urls.len()).map(move |i| self.urls[(start + i) % self.urls.len()].as_str())
    }

    /// `url` answered: try it first from now on.
    pub fn answered(&self, url: &str) {
        if let Some(i) = self.urls.iter().position(|u| u == url) {
            self.current.store(i, Ordering::Relaxed);
        }
    }

    /// `url` did not answer: if it was the current one, the next in turn is.
    pub fn failed(&self, url: &str) {
        if let Some(i) = self.urls.iter().position(|u| u == url) {
            let _ = self.current.compare_exchange(
                i,
                (i + 1) % self.urls.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}

impl std::fmt::Display for ControlPlanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.urls.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planes(urls: &[&str]) -> ControlPlanes {
        ControlPlanes::new(urls.iter().map(|u| (*u).to_owned())).unwrap()
    }

    #[test]
    fn they_are_tried_in_turn_from_the_one_that_answered() {
        let p = planes(&[
            "https://a:7700",
            "https://b:7700",
            "https://a:7700",
            "https://c:7700",
        ]);
        assert_eq!(
            p.all(),
            ["https://a:7700", "https://b:7700", "https://c:7700"]
        );
        assert_eq!(p.current(), "https://a:7700");
        p.failed("https://a:7700");
        assert_eq!(p.current(), "https://b:7700");
        // A late failure of one that is no longer current moves nothing.
        p.failed("https://a:7700");
        assert_eq!(p.current(), "https://b:7700");
        p.failed("https://b:7700");
        p.failed("https://c:7700");
        assert_eq!(p.current(), "https://a:7700", "round again");
        p.answered("https://c:7700");
        let order: Vec<&str> = p.in_turn().collect();
        assert_eq!(
            order,
            ["https://c:7700", "https://a:7700", "https://b:7700"]
        );
        assert_eq!(
            p.to_string(),
            "https://a:7700 https://b:7700 https://c:7700"
        );
    }

    #[test]
    fn none_is_refused_with_what_to_do() {
        let e = ControlPlanes::new(["  ".to_owned()]).unwrap_err();
        assert!(e.contains("--control-plane"), "{e}");
    }
}

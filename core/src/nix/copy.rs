//! `nix copy --from`: pulling a closure from a binary cache, checking its
//! signatures against the caller's keys only, and reporting progress.

use std::collections::HashMap;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt as _, BufReader};

use super::progress::{CopyProgress, CopyTracker};
use super::{Nix, NixError, PathInfoQuery, RunError, TAIL_LINES};
use crate::store_path::StorePath;

impl Nix {
    /// `nix copy --from SUBSTITUTER CLOSURE` into the local store (or the
    /// destination set with [`Nix::with_store`]).
    ///
    /// Signatures must come from one of `trusted_keys` (`name:base64`): the
    /// keys in nix.conf are replaced, not extended, so an unsigned or
    /// otherwise-signed closure is refused. With no keys nothing that is
    /// missing can be copied. `on_progress` is called whenever the progress
    /// changes; the final progress is returned. Its bytes come from the
    /// narinfos of the paths the destination lacks, so they add up on
    /// every cache and Nix version (Nix itself reports none from `file://`).
    pub async fn copy_from(
        &self,
        substituter: &str,
        closure: &StorePath,
        trusted_keys: &[String],
        mut on_progress: impl FnMut(CopyProgress),
    ) -> Result<CopyProgress, NixError> {
        let keys = trusted_keys.join(" ");
        let mut args = vec!["copy", "--from", substituter];
        if let Some(destination) = &self.destination {
            args.extend(["--to", destination]);
        }
        args.extend([
            closure.as_str(),
            "--option",
            "trusted-public-keys",
            &keys,
            "--option",
            "require-sigs",
            "true",
            // A path published a moment ago must not stay "missing" for an
            // hour because an earlier lookup missed it.
            "--option",
            "narinfo-cache-negative-ttl",
            "0",
            // After everything else: `-L` and friends would switch it back.
            "--log-format",
            "internal-json",
            "-v",
        ]);
        // Asked before the copy starts, which would change the answer.
        let sizes = self.missing_sizes(substituter, closure).await;
        let mut command = self.nix(&args);
        // The options are always the same: name what differs.
        let name = format!("nix copy --from {substituter} {closure}");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| RunError::Spawn {
            command: name.clone(),
            source,
        })?;
        let mut tracker = CopyTracker::new(TAIL_LINES).expecting(sizes);

        let follow = async {
            let mut last = CopyProgress::default();
            if let Some(stderr) = child.stderr.take() {
                let mut lines = BufReader::new(stderr);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match lines.read_until(b'\n', &mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let line = String::from_utf8_lossy(&buf);
                    if tracker.feed(line.trim_end()) {
                        let now = tracker.progress();
                        if now != last {
                            last = now;
                            on_progress(now);
                        }
                    }
                }
            }
            child.wait().await
        };
        let waited = match self.timeout {
            Some(limit) => match tokio::time::timeout(limit, follow).await {
                Ok(waited) => waited,
                Err(_) => {
                    // Dropping the future dropped the child: kill_on_drop ends it.
                    return Err(RunError::TimedOut {
                        command: name,
                        timeout: limit,
                        tail: tracker.messages(),
                        output: String::new(),
                    }
                    .into());
                }
            },
            None => follow.await,
        };
        let status = waited.map_err(|source| RunError::Wait {
            command: name.clone(),
            source,
        })?;
        if status.success() {
            Ok(tracker.progress())
        } else {
            Err(NixError::Failed {
                command: name,
                status,
                tail: tracker.messages(),
            })
        }
    }

    /// The NAR size of each path of `closure` the destination lacks, from
    /// `substituter`'s narinfos; empty when either cannot say (the copy
    /// then reports what Nix does, and fails with the real reason), and
    /// without asking the substituter when the destination holds `closure`
    /// already (then it holds all of its closure).
    async fn missing_sizes(&self, substituter: &str, closure: &StorePath) -> HashMap<String, u64> {
        let local = PathInfoQuery {
            store: self.destination.as_deref(),
            ..PathInfoQuery::default()
        };
        let top = self.path_info(local, std::slice::from_ref(closure)).await;
        if top.is_ok_and(|held| held.iter().any(|p| p.valid)) {
            return HashMap::new();
        }
        let remote = PathInfoQuery {
            store: Some(substituter),
            recursive: true,
            closure_size: false,
        };
        let Ok(offered) = self.path_info(remote, std::slice::from_ref(closure)).await else {
            return HashMap::new();
        };
        let paths: Vec<StorePath> = offered.iter().map(|p| p.path.clone()).collect();
        let Ok(held) = self.path_info(local, &paths).await else {
            return HashMap::new();
        };
        let held: std::collections::HashSet<&StorePath> =
            held.iter().filter(|p| p.valid).map(|p| &p.path).collect();
        offered
            .iter()
            .filter(|p| p.valid && !held.contains(&p.path))
            .map(|p| (p.path.as_str().to_owned(), p.nar_size))
            .collect()
    }
}

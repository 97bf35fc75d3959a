//! Parsed artifacts of recent deployments. A stored artifact never changes,
//! and parsing a 10,000-machine one takes tens of milliseconds: too much to
//! repeat for every machine sent and every scheduler run.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::StoreError;
use super::engine::{Sql, SqlExt as _};
use procurator_core::DeploymentArtifact;

/// Running deployments are few; older ones are rarely read again.
const KEEP: usize = 8;

#[derive(Default)]
pub(crate) struct ArtifactCache {
    recent: Mutex<VecDeque<(String, Arc<DeploymentArtifact>)>>,
}

impl ArtifactCache {
    /// Deployment `id`'s artifact if it was read already.
    pub fn cached(&self, id: &str) -> Option<Arc<DeploymentArtifact>> {
        self.lock()
            .iter()
            .find(|(k, _)| k == id)
            .map(|found| found.1.clone())
    }

    /// Deployment `id`'s artifact, read and parsed on first use.
    pub fn get(&self, conn: &dyn Sql, id: &str) -> Result<Arc<DeploymentArtifact>, StoreError> {
        if let Some(found) = self.cached(id) {
            return Ok(found);
        }
        let json: String = conn.fetch_one(
            "SELECT artifact FROM deployments WHERE id = ?1",
            &[&id],
            |r| r.get(0),
        )?;
        let parsed = Arc::new(DeploymentArtifact::from_json(json.as_bytes()).map_err(|e| {
            StoreError::Corrupt(format!("the stored artifact of {id} is invalid: {e}"))
        })?);
        let mut recent = self.lock();
        if recent.len() >= KEEP {
            recent.pop_front();
        }
        recent.push_back((id.to_owned(), parsed.clone()));
        Ok(parsed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, Arc<DeploymentArtifact>)>> {
        // A plain cache: a panicking holder leaves nothing half-done.
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

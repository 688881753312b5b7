//! Flow versions: which registered flow a recorded saga runs on, and the
//! unfinished sagas whose version is not registered here.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::engine::Registered;
use crate::error::{Error, Result};
use crate::saga::{FlowVersion, SagaRecord};

use super::Orchestrator;

/// Unfinished sagas of one flow version that is not registered here: they
/// wait, untouched, until a start registers it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingVersion {
    /// The facade.
    pub facade: String,
    /// The version the sagas started on; `None` for sagas that recorded none
    /// (begun before versions were recorded) whose facade has no registered
    /// version with their number of steps.
    pub version: Option<FlowVersion>,
    /// How many unfinished sagas need it.
    pub sagas: usize,
    /// Their request ids.
    pub request_ids: Vec<String>,
}

/// How a flow version stands here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionRole {
    /// New sagas of the facade start on it.
    Current,
    /// Kept beside the current one for the sagas begun on it.
    Kept,
    /// Not registered here: its unfinished sagas wait for a start that registers it.
    Missing,
}

/// How many unfinished sagas of one facade run on one flow version: what tells
/// when a kept version can be retired (none left) and which sagas wait for one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionUse {
    /// The facade.
    pub facade: String,
    /// The version; `None` for sagas begun before versions were recorded.
    pub version: Option<FlowVersion>,
    /// How it stands here.
    pub role: VersionRole,
    /// Its unfinished sagas (running, compensating or stuck), on every replica.
    pub unfinished: usize,
}

/// The missing versions, as the refusal to start names them.
pub(crate) fn describe_missing(missing: &[MissingVersion]) -> String {
    missing
        .iter()
        .map(|m| {
            let version = m.version.as_ref().map_or_else(|| "any".to_owned(), ToString::to_string);
            let noun = if m.sagas == 1 { "saga" } else { "sagas" };
            format!("facade `{}` version {version}: {} unfinished {noun}", m.facade, m.sagas)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Orchestrator {
    /// The registered flow that runs this saga: the version it started on, if
    /// registered here (see `Registered::resolve` for sagas that recorded none).
    pub(crate) fn flow_of(&self, record: &SagaRecord) -> Option<Arc<dyn Registered>> {
        self.flows.get(&record.facade)?.clone().resolve(record)
    }

    /// The unfinished sagas this replica answers for whose flow version is not
    /// registered here, per facade and version: they wait for a start that
    /// registers it (see [`Options::start_with_missing_versions`](super::Options)).
    pub async fn waiting_for_versions(&self) -> Result<Vec<MissingVersion>> {
        let me = self.engine.options.pod_id.as_str();
        let mut unfinished = self.engine.log.unfinished_of(me).await?;
        if self.engine.log.shared() {
            unfinished.retain(|r| r.owner.as_deref() == Some(me));
        }
        let mut missing: BTreeMap<(String, Option<String>), MissingVersion> = BTreeMap::new();
        for record in unfinished.into_iter().filter(|r| self.flow_of(r).is_none()) {
            let key = (record.facade.clone(), record.version.as_ref().map(|v| v.fingerprint.clone()));
            let entry = missing.entry(key).or_insert_with(|| MissingVersion {
                facade: record.facade.clone(),
                version: record.version.clone(),
                sagas: 0,
                request_ids: Vec::new(),
            });
            entry.sagas += 1;
            entry.request_ids.push(record.request_id);
        }
        let mut missing: Vec<MissingVersion> = missing.into_values().collect();
        missing.iter_mut().for_each(|m| m.request_ids.sort());
        Ok(missing)
    }

    /// Every registered flow version with its unfinished sagas, then the
    /// versions unfinished sagas need that are not registered here.
    pub async fn version_use(&self) -> Result<Vec<VersionUse>> {
        let mut uses: BTreeMap<(String, Option<String>), VersionUse> = BTreeMap::new();
        for flow in self.flows() {
            let versions = std::iter::once((flow.version, VersionRole::Current))
                .chain(flow.kept.into_iter().map(|v| (v, VersionRole::Kept)));
            for (version, role) in versions {
                let key = (flow.facade.clone(), Some(version.fingerprint.clone()));
                uses.insert(
                    key,
                    VersionUse { facade: flow.facade.clone(), version: Some(version), role, unfinished: 0 },
                );
            }
        }
        for record in self.engine.log.unfinished().await? {
            let resolved = self.flow_of(&record).map(|flow| flow.info().version.fingerprint);
            let key =
                (record.facade.clone(), resolved.or_else(|| record.version.as_ref().map(|v| v.fingerprint.clone())));
            let entry = uses.entry(key).or_insert_with(|| VersionUse {
                facade: record.facade.clone(),
                version: record.version.clone(),
                role: VersionRole::Missing,
                unfinished: 0,
            });
            entry.unfinished += 1;
        }
        Ok(uses.into_values().collect())
    }

    /// At start: refuses when unfinished sagas need a version not registered,
    /// unless the options say to start anyway.
    pub(super) async fn check_versions(&self) -> Result<()> {
        let missing = self.waiting_for_versions().await?;
        if missing.is_empty() {
            return Ok(());
        }
        if !self.engine.options.start_with_missing_versions {
            return Err(Error::MissingVersions { missing });
        }
        for m in &missing {
            let version = m.version.as_ref().map_or_else(|| "any".to_owned(), ToString::to_string);
            tracing::warn!(facade = %m.facade, %version, sagas = m.sagas, "unfinished sagas wait for a flow version not registered here");
        }
        Ok(())
    }
}

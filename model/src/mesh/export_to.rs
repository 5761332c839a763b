//! Who may import a service: the targets of `strait.io/export-to`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use strait_ca::ClusterName;

use super::ModelError;
use crate::names;

/// One entry of `strait.io/export-to`: a cluster of the own mesh, or a whole
/// peered mesh (`mesh:<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ExportTarget {
    Cluster(ClusterName),
    Mesh(String),
}

impl ExportTarget {
    /// Parses `cluster-name` or `mesh:mesh-name` (no surrounding whitespace).
    pub fn parse(item: &str) -> Result<Self, ModelError> {
        match item.strip_prefix("mesh:") {
            Some(mesh) if names::is_dns1123_subdomain(mesh) => {
                Ok(ExportTarget::Mesh(mesh.to_string()))
            }
            Some(mesh) => Err(ModelError::MeshName(mesh.to_string())),
            None => ClusterName::new(item)
                .map(ExportTarget::Cluster)
                .map_err(ModelError::ClusterName),
        }
    }
}

impl fmt::Display for ExportTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportTarget::Cluster(c) => f.write_str(c.as_str()),
            ExportTarget::Mesh(m) => write!(f, "mesh:{m}"),
        }
    }
}

impl FromStr for ExportTarget {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ExportTarget::parse(s)
    }
}

impl TryFrom<String> for ExportTarget {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ExportTarget::parse(&s)
    }
}

impl From<ExportTarget> for String {
    fn from(t: ExportTarget) -> String {
        t.to_string()
    }
}

/// Who may import a service.
///
/// Without `strait.io/export-to`, every cluster of the exporter's own mesh
/// may, and no peered mesh. With it, exactly the listed clusters of the own
/// mesh and the listed peered meshes (`mesh:<name>`) may; a list with only
/// `mesh:` entries exports to no cluster of the own mesh.
///
/// Serialized as `{"clusters": [...], "meshes": [...]}`; `clusters` absent
/// means every cluster of the own mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "RawExportTo", into = "RawExportTo")]
pub struct ExportTo {
    /// `None`: every cluster of the own mesh.
    clusters: Option<BTreeSet<ClusterName>>,
    meshes: BTreeSet<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExportTo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clusters: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    meshes: Vec<String>,
}

impl TryFrom<RawExportTo> for ExportTo {
    type Error = ModelError;
    fn try_from(r: RawExportTo) -> Result<Self, Self::Error> {
        let clusters = match r.clusters {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|c| ClusterName::new(c).map_err(ModelError::ClusterName))
                    .collect::<Result<_, _>>()?,
            ),
        };
        let meshes = r
            .meshes
            .into_iter()
            .map(|m| match ExportTarget::parse(&format!("mesh:{m}"))? {
                ExportTarget::Mesh(m) => Ok(m),
                ExportTarget::Cluster(_) => Err(ModelError::MeshName(m)),
            })
            .collect::<Result<_, _>>()?;
        Ok(ExportTo { clusters, meshes })
    }
}

impl From<ExportTo> for RawExportTo {
    fn from(e: ExportTo) -> Self {
        RawExportTo {
            clusters: e
                .clusters
                .map(|set| set.iter().map(|c| c.to_string()).collect()),
            meshes: e.meshes.into_iter().collect(),
        }
    }
}

impl ExportTo {
    /// Every cluster of the own mesh (the default, no `export-to`).
    pub fn whole_mesh() -> Self {
        ExportTo::default()
    }

    /// Exactly these targets (an explicit `export-to` list).
    pub fn only(targets: impl IntoIterator<Item = ExportTarget>) -> Self {
        let mut clusters = BTreeSet::new();
        let mut meshes = BTreeSet::new();
        for t in targets {
            match t {
                ExportTarget::Cluster(c) => {
                    clusters.insert(c);
                }
                ExportTarget::Mesh(m) => {
                    meshes.insert(m);
                }
            }
        }
        ExportTo {
            clusters: Some(clusters),
            meshes,
        }
    }

    /// True when every cluster of the own mesh may import.
    pub fn is_whole_mesh(&self) -> bool {
        self.clusters.is_none()
    }

    /// May this cluster of the exporter's own mesh import?
    pub fn allows_cluster(&self, cluster: &ClusterName) -> bool {
        self.clusters
            .as_ref()
            .is_none_or(|set| set.contains(cluster))
    }

    /// May the peered mesh of this name import? Only when listed.
    pub fn allows_mesh(&self, mesh: &str) -> bool {
        self.meshes.contains(mesh)
    }

    /// The listed targets (clusters, then meshes, each sorted); empty for
    /// the whole own mesh.
    pub fn targets(&self) -> impl Iterator<Item = ExportTarget> + '_ {
        let clusters = self.clusters.iter().flatten().cloned();
        clusters
            .map(ExportTarget::Cluster)
            .chain(self.meshes.iter().cloned().map(ExportTarget::Mesh))
    }

    /// Everyone either allows: for a service exported by two signals (an
    /// annotation and a `ServiceExport`).
    pub fn union(&self, other: &ExportTo) -> ExportTo {
        let clusters = match (&self.clusters, &other.clusters) {
            (Some(a), Some(b)) => Some(a.union(b).cloned().collect()),
            _ => None,
        };
        ExportTo {
            clusters,
            meshes: self.meshes.union(&other.meshes).cloned().collect(),
        }
    }
}

impl fmt::Display for ExportTo {
    /// The annotation form (`west,mesh:partner`); the whole own mesh shows
    /// as `<whole mesh>` (plus any meshes).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = Vec::new();
        if self.is_whole_mesh() {
            items.push("<whole mesh>".to_string());
        }
        items.extend(self.targets().map(|t| t.to_string()));
        f.write_str(&items.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str) -> ClusterName {
        ClusterName::new(name).unwrap()
    }

    #[test]
    fn export_targets() {
        assert_eq!(
            ExportTarget::parse("west").unwrap(),
            ExportTarget::Cluster(cluster("west"))
        );
        assert_eq!(
            ExportTarget::parse("mesh:partner.example").unwrap(),
            ExportTarget::Mesh("partner.example".into())
        );
        assert_eq!(ExportTarget::parse("mesh:p").unwrap().to_string(), "mesh:p");
        for bad in [
            "",
            "West",
            "mesh:",
            "mesh:Partner",
            "mesh:a..b",
            "a b",
            "x:y",
        ] {
            assert!(ExportTarget::parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            ExportTarget::parse("mesh"),
            Ok(ExportTarget::Cluster(_))
        ));
    }

    #[test]
    fn export_to_rules() {
        let west = cluster("west");
        let east = cluster("east");
        let whole = ExportTo::whole_mesh();
        assert!(whole.is_whole_mesh() && whole.allows_cluster(&west));
        assert!(
            !whole.allows_mesh("partner"),
            "a bare export is for the own mesh only"
        );

        let some = ExportTo::only([
            ExportTarget::Cluster(west.clone()),
            ExportTarget::Mesh("partner".into()),
        ]);
        assert!(some.allows_cluster(&west) && !some.allows_cluster(&east));
        assert!(some.allows_mesh("partner") && !some.allows_mesh("other"));
        assert_eq!(some.to_string(), "west,mesh:partner");

        let mesh_only = ExportTo::only([ExportTarget::Mesh("partner".into())]);
        assert!(!mesh_only.allows_cluster(&west));

        let u = whole.union(&mesh_only);
        assert!(u.allows_cluster(&east) && u.allows_mesh("partner"));
        assert_eq!(u.to_string(), "<whole mesh>,mesh:partner");
        let u = some.union(&ExportTo::only([ExportTarget::Cluster(east.clone())]));
        assert!(u.allows_cluster(&east) && u.allows_cluster(&west) && !u.is_whole_mesh());
    }

    #[test]
    fn export_to_serde() {
        let some = ExportTo::only([
            ExportTarget::Mesh("partner".into()),
            ExportTarget::Cluster(cluster("west")),
        ]);
        let json = serde_json::to_value(&some).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"clusters": ["west"], "meshes": ["partner"]})
        );
        assert_eq!(serde_json::from_value::<ExportTo>(json).unwrap(), some);
        assert_eq!(
            serde_json::to_value(ExportTo::whole_mesh()).unwrap(),
            serde_json::json!({})
        );
        assert_eq!(
            serde_json::from_value::<ExportTo>(serde_json::json!({})).unwrap(),
            ExportTo::whole_mesh()
        );
        for bad in [
            serde_json::json!({"clusters": ["West"]}),
            serde_json::json!({"meshes": ["Bad"]}),
            serde_json::json!({"other": 1}),
        ] {
            assert!(
                serde_json::from_value::<ExportTo>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}

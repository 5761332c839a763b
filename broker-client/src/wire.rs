//! Conversions between the broker's protobuf messages and the mesh model,
//! at the boundary: the inside never sees a raw proto. Every error names the
//! field and value that were wrong.

use std::collections::{BTreeMap, BTreeSet};

use strait_ca::{ClusterName, TrustDomain};
use strait_model::mesh::{
    ClusterInfo, ExportTarget, ExportTo, ExportedService, GatewayAddress, Locality,
    LocalityEndpoints, Network, Protocol, RemoteService, ServiceKey, ServicePort,
};
use strait_proto::strait::broker::v1 as pb;

/// A message field that did not convert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct WireError {
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl ToString) -> WireError {
    WireError {
        field: field.into(),
        reason: reason.to_string(),
    }
}

pub fn service_key(r: &pb::ServiceRef) -> Result<ServiceKey, WireError> {
    ServiceKey::new(&r.namespace, &r.name).map_err(|e| err("service", e))
}

pub fn service_ref(k: &ServiceKey) -> pb::ServiceRef {
    pb::ServiceRef {
        namespace: k.namespace().to_string(),
        name: k.name().to_string(),
    }
}

fn locality_opt(field: &str, s: &str) -> Result<Option<Locality>, WireError> {
    if s.is_empty() {
        Ok(None)
    } else {
        Locality::parse(s).map(Some).map_err(|e| err(field, e))
    }
}

pub fn exported_service(p: &pb::ExportedService) -> Result<ExportedService, WireError> {
    let key = ServiceKey::new(&p.namespace, &p.name).map_err(|e| err("service", e))?;
    let at = |f: &str| format!("{key}.{f}");
    let ports = p
        .ports
        .iter()
        .map(|port| {
            let number = u16::try_from(port.number).map_err(|_| {
                err(
                    at("ports"),
                    format!("number {} is out of range", port.number),
                )
            })?;
            let target = match port.target_port {
                0 => None,
                t => Some(
                    u16::try_from(t)
                        .map_err(|_| err(at("ports"), format!("targetPort {t} is out of range")))?,
                ),
            };
            let protocol = Protocol::parse(&port.protocol).map_err(|e| err(at("ports"), e))?;
            ServicePort::new(&port.name, number, protocol, target).map_err(|e| err(at("ports"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let endpoints = p
        .endpoints
        .iter()
        .map(|e| {
            Ok(LocalityEndpoints {
                locality: locality_opt(&at("endpoints.locality"), &e.locality)?,
                healthy: e.healthy,
                total: e.total,
            })
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let export_to = if p.export_to.is_empty() {
        ExportTo::whole_mesh()
    } else {
        ExportTo::only(
            p.export_to
                .iter()
                .map(|t| ExportTarget::parse(t).map_err(|e| err(at("exportTo"), e)))
                .collect::<Result<Vec<_>, _>>()?,
        )
    };
    let mut s = ExportedService::new(key.clone(), ports);
    s.labels = p
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    s.service_accounts = p.service_accounts.iter().cloned().collect::<BTreeSet<_>>();
    s.endpoint_labels = p
        .endpoint_labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    s.endpoints = endpoints;
    s.export_to = export_to;
    s.addresses = p.addresses.clone();
    s.validate().map_err(|e| err(key.to_string(), e))?;
    Ok(s)
}

pub fn exported_service_pb(s: &ExportedService) -> pb::ExportedService {
    pb::ExportedService {
        namespace: s.key.namespace().to_string(),
        name: s.key.name().to_string(),
        ports: s
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                name: p.name().to_string(),
                number: u32::from(p.number()),
                protocol: p.protocol().as_str().to_string(),
                target_port: p.target_port().map_or(0, u32::from),
            })
            .collect(),
        labels: s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        service_accounts: s.service_accounts.iter().cloned().collect(),
        endpoint_labels: s
            .endpoint_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| pb::LocalityEndpoints {
                locality: e
                    .locality
                    .as_ref()
                    .map(|l| l.to_string())
                    .unwrap_or_default(),
                healthy: e.healthy,
                total: e.total,
            })
            .collect(),
        export_to: s.export_to.targets().map(|t| t.to_string()).collect(),
        addresses: s.addresses.clone(),
    }
}

/// The identities a cluster says it runs: each `<ns>/<sa>`, a namespace
/// (DNS label) and a service account name (DNS subdomain), as Kubernetes
/// names them. At most [`MAX_SERVICE_ACCOUNTS`].
pub fn service_accounts(names: &[String]) -> Result<BTreeSet<String>, WireError> {
    if names.len() > MAX_SERVICE_ACCOUNTS {
        return Err(err(
            "info.service_accounts",
            format!("{} entries, at most {MAX_SERVICE_ACCOUNTS}", names.len()),
        ));
    }
    names
        .iter()
        .map(|n| match n.split_once('/') {
            Some((ns, sa))
                if strait_model::names::is_dns1123_label(ns)
                    && strait_model::names::is_dns1123_subdomain(sa) =>
            {
                Ok(n.clone())
            }
            _ => Err(err(
                "info.service_accounts",
                format!("{n:?} is not <namespace>/<service account>"),
            )),
        })
        .collect()
}

/// The most identities one cluster may say it runs.
pub const MAX_SERVICE_ACCOUNTS: usize = 100_000;

/// A cluster's self-description; the name and trust domain come from its
/// authenticated identity, never from the message.
pub fn cluster_info(
    name: &ClusterName,
    td: &TrustDomain,
    p: &pb::ClusterInfo,
) -> Result<ClusterInfo, WireError> {
    Ok(ClusterInfo {
        name: name.clone(),
        network: Network::new(&p.network).map_err(|e| err("info.network", e))?,
        locality: locality_opt("info.locality", &p.locality)?,
        gateways: p
            .gateways
            .iter()
            .map(|g| GatewayAddress::parse(g).map_err(|e| err("info.gateways", e)))
            .collect::<Result<_, _>>()?,
        trust_domain: td.clone(),
    })
}

pub fn cluster_info_pb(c: &ClusterInfo) -> pb::ClusterInfo {
    pb::ClusterInfo {
        network: c.network.as_str().to_string(),
        locality: c
            .locality
            .as_ref()
            .map(|l| l.to_string())
            .unwrap_or_default(),
        gateways: c.gateways.iter().map(|g| g.to_string()).collect(),
        // The exporter's CA is its own business: importers are not told.
        leaf_ttl_max_seconds: 0,
        service_accounts: vec![],
    }
}

pub fn remote_pb(r: &RemoteService) -> pb::RemoteService {
    pb::RemoteService {
        cluster: r.from.name.to_string(),
        trust_domain: r.from.trust_domain.to_string(),
        cluster_info: Some(cluster_info_pb(&r.from)),
        service: Some(exported_service_pb(&r.service)),
    }
}

pub fn imported_pb(key: &ServiceKey, remotes: &[RemoteService]) -> pb::ImportedService {
    pb::ImportedService {
        namespace: key.namespace().to_string(),
        name: key.name().to_string(),
        remotes: remotes.iter().map(remote_pb).collect(),
    }
}

/// An importer's view of a pushed import, back into the model (clients).
pub fn remote(p: &pb::RemoteService) -> Result<RemoteService, WireError> {
    let name = ClusterName::new(&p.cluster).map_err(|e| err("remote.cluster", e))?;
    let td = TrustDomain::new(&p.trust_domain).map_err(|e| err("remote.trustDomain", e))?;
    let info = p
        .cluster_info
        .as_ref()
        .ok_or_else(|| err("remote.clusterInfo", "missing"))?;
    let service = p
        .service
        .as_ref()
        .ok_or_else(|| err("remote.service", "missing"))?;
    Ok(RemoteService {
        from: cluster_info(&name, &td, info)?,
        service: exported_service(service)?,
    })
}

/// Imports keyed by service, from a pushed update's upserts.
pub fn imports(
    list: &[pb::ImportedService],
) -> Result<BTreeMap<ServiceKey, Vec<RemoteService>>, WireError> {
    list.iter()
        .map(|i| {
            let key = ServiceKey::new(&i.namespace, &i.name).map_err(|e| err("import", e))?;
            let remotes = i
                .remotes
                .iter()
                .map(remote)
                .collect::<Result<Vec<_>, _>>()?;
            Ok((key, remotes))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::ExportedService {
        pb::ExportedService {
            namespace: "bookinfo".into(),
            name: "reviews".into(),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                number: 9080,
                protocol: "HTTP".into(),
                target_port: 0,
            }],
            labels: [("app".to_string(), "reviews".to_string())].into(),
            service_accounts: vec!["bookinfo-reviews".into()],
            endpoints: vec![pb::LocalityEndpoints {
                locality: "us-east/a".into(),
                healthy: 2,
                total: 3,
            }],
            export_to: vec!["west".into(), "mesh:partner".into()],
            addresses: vec![],
            endpoint_labels: [("version".to_string(), "v1".to_string())].into(),
        }
    }

    #[test]
    fn round_trip() {
        let p = sample();
        let s = exported_service(&p).unwrap();
        assert_eq!(s.healthy(), 2);
        let mut back = exported_service_pb(&s);
        back.export_to.sort();
        let mut want = p.clone();
        want.export_to.sort();
        assert_eq!(back, want);
    }

    #[test]
    fn errors_name_the_field() {
        let mut p = sample();
        p.ports[0].number = 70000;
        let e = exported_service(&p).unwrap_err();
        assert!(
            e.to_string().contains("reviews.bookinfo.ports") || e.field.contains("ports"),
            "{e}"
        );
        let mut p = sample();
        p.ports[0].protocol = "SMTP".into();
        assert!(
            exported_service(&p)
                .unwrap_err()
                .to_string()
                .contains("SMTP")
        );
        let mut p = sample();
        p.namespace = "Bad_NS".into();
        assert!(
            exported_service(&p)
                .unwrap_err()
                .to_string()
                .contains("Bad_NS")
        );
        let mut p = sample();
        p.export_to = vec!["mesh:".into()];
        assert!(exported_service(&p).is_err());
        let mut p = sample();
        p.endpoints[0].locality = "/zone".into();
        assert!(exported_service(&p).unwrap_err().field.contains("locality"));
    }

    #[test]
    fn service_accounts_are_namespace_slash_name() {
        let ok = service_accounts(&["demo/client".into(), "shop/pay.v2".into()]).unwrap();
        assert_eq!(ok.len(), 2);
        for bad in [
            "client",
            "demo/",
            "/client",
            "Demo/client",
            "demo/client/x",
            "demo/Cl",
        ] {
            let e = service_accounts(&[bad.into()]).unwrap_err();
            assert!(e.reason.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        let many = vec!["a/b".to_string(); MAX_SERVICE_ACCOUNTS + 1];
        assert!(service_accounts(&many).is_err());
    }

    #[test]
    fn cluster_info_takes_identity_from_the_caller() {
        let name = ClusterName::new("east").unwrap();
        let td = TrustDomain::new("td").unwrap();
        let info = cluster_info(
            &name,
            &td,
            &pb::ClusterInfo {
                network: "net1".into(),
                locality: "us-east".into(),
                gateways: vec!["127.0.0.1:15443".into()],
                leaf_ttl_max_seconds: 0,
                service_accounts: vec![],
            },
        )
        .unwrap();
        assert_eq!(info.name, name);
        assert_eq!(cluster_info_pb(&info).gateways, ["127.0.0.1:15443"]);
        let bad = pb::ClusterInfo {
            network: "".into(),
            ..Default::default()
        };
        assert!(
            cluster_info(&name, &td, &bad)
                .unwrap_err()
                .field
                .contains("network")
        );
    }
}

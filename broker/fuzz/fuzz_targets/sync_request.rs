//! A cluster's `SyncRequest` on untrusted bytes: decoding and the conversion
//! into the mesh model never panic, and whatever converts survives a round
//! trip back through the protobuf form.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strait_broker::wire;
use strait_ca::{ClusterName, TrustDomain};
use strait_proto::strait::broker::v1::{SyncRequest, sync_request};

fn identity() -> &'static (ClusterName, TrustDomain) {
    static ID: OnceLock<(ClusterName, TrustDomain)> = OnceLock::new();
    ID.get_or_init(|| {
        (
            ClusterName::new("east").expect("valid cluster name"),
            TrustDomain::new("fuzz.example").expect("valid trust domain"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = SyncRequest::decode(data) else {
        return;
    };
    match req.msg {
        Some(sync_request::Msg::Exports(update)) => {
            for upsert in &update.upserts {
                if let Ok(s) = wire::exported_service(upsert) {
                    let pb = wire::exported_service_pb(&s);
                    let back = wire::exported_service(&pb).expect("a converted export converts back");
                    assert_eq!(back, s);
                    assert_eq!(wire::exported_service_pb(&back), pb);
                    // The protobuf bytes round trip too.
                    let bytes = pb.encode_to_vec();
                    let decoded = strait_proto::strait::broker::v1::ExportedService::decode(
                        bytes.as_slice(),
                    )
                    .expect("re-encoded export decodes");
                    assert_eq!(decoded, pb);
                }
            }
            for removal in &update.removals {
                if let Ok(k) = wire::service_key(removal) {
                    let r = wire::service_ref(&k);
                    assert_eq!(wire::service_key(&r).expect("a key converts back"), k);
                }
            }
        }
        Some(sync_request::Msg::Info(info)) => {
            let (name, td) = identity();
            if let Ok(ci) = wire::cluster_info(name, td, &info) {
                assert_eq!(&ci.name, name);
                assert_eq!(&ci.trust_domain, td);
                let pb = wire::cluster_info_pb(&ci);
                let back = wire::cluster_info(name, td, &pb).expect("a converted info converts back");
                assert_eq!(back, ci);
            }
        }
        Some(sync_request::Msg::Hello(hello)) => {
            if let Some(info) = &hello.info {
                let (name, td) = identity();
                let _ = wire::cluster_info(name, td, info);
            }
        }
        _ => {}
    }
});

//! Deterministic encodings of the discovery resources: prost writes `map`
//! fields in hash-map order, so these encode them with entries sorted by
//! key; a protobuf decoder reads the result as the same message.

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use strait_proto::strait::mesh::v1 as pb;

/// A message with a deterministic encoding (map entries sorted by key).
pub trait Canonical {
    /// The encoded message; decodes as the same message.
    fn canonical_bytes(&self) -> Vec<u8>;
}

fn put_bytes(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

fn put_string_map(tag: u32, map: &HashMap<String, String>, buf: &mut Vec<u8>) {
    let sorted: BTreeMap<&String, &String> = map.iter().collect();
    for (k, v) in sorted {
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, k, &mut entry);
        prost::encoding::string::encode(2, v, &mut entry);
        put_bytes(tag, &entry, buf);
    }
}

fn put_string_u32_map(tag: u32, map: &HashMap<String, u32>, buf: &mut Vec<u8>) {
    let sorted: BTreeMap<&String, &u32> = map.iter().collect();
    for (k, v) in sorted {
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, k, &mut entry);
        prost::encoding::uint32::encode(2, v, &mut entry);
        put_bytes(tag, &entry, buf);
    }
}

fn put_u32_map(tag: u32, map: &HashMap<u32, u32>, buf: &mut Vec<u8>) {
    let sorted: BTreeMap<&u32, &u32> = map.iter().collect();
    for (k, v) in sorted {
        let mut entry = Vec::new();
        prost::encoding::uint32::encode(1, k, &mut entry);
        prost::encoding::uint32::encode(2, v, &mut entry);
        put_bytes(tag, &entry, buf);
    }
}

/// Encodes `message` canonically: map fields (emptied by `strip`) are
/// appended by `maps` in key order. Protobuf decoders merge fields that
/// appear after the others, so the bytes decode to the same message.
fn with_maps<M: Message + Clone>(
    message: &M,
    strip: impl FnOnce(&mut M),
    maps: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let mut head = message.clone();
    strip(&mut head);
    let mut buf = head.encode_to_vec();
    maps(&mut buf);
    buf
}

impl Canonical for pb::Endpoint {
    fn canonical_bytes(&self) -> Vec<u8> {
        with_maps(
            self,
            |m| m.labels.clear(),
            |b| put_string_map(4, &self.labels, b),
        )
    }
}

impl Canonical for pb::Service {
    fn canonical_bytes(&self) -> Vec<u8> {
        with_maps(
            self,
            |m| m.endpoints.clear(),
            |b| {
                for e in &self.endpoints {
                    put_bytes(8, &e.canonical_bytes(), b);
                }
            },
        )
    }
}

impl Canonical for pb::Workload {
    fn canonical_bytes(&self) -> Vec<u8> {
        with_maps(
            self,
            |m| {
                m.labels.clear();
                m.ports.clear();
            },
            |b| {
                put_string_map(4, &self.labels, b);
                put_string_u32_map(10, &self.ports, b);
            },
        )
    }
}

impl Canonical for pb::Labels {
    fn canonical_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string_map(1, &self.labels, &mut b);
        b
    }
}

impl Canonical for pb::GatewayEndpoint {
    fn canonical_bytes(&self) -> Vec<u8> {
        with_maps(
            self,
            |m| {
                m.ports.clear();
                m.labels.clear();
            },
            |b| {
                put_u32_map(2, &self.ports, b);
                put_string_map(3, &self.labels, b);
            },
        )
    }
}

impl Canonical for pb::GatewayRoute {
    fn canonical_bytes(&self) -> Vec<u8> {
        with_maps(
            self,
            |m| {
                m.subsets.clear();
                m.endpoints.clear();
            },
            |b| {
                let sorted: BTreeMap<&String, &pb::Labels> = self.subsets.iter().collect();
                for (name, labels) in sorted {
                    let mut entry = Vec::new();
                    prost::encoding::string::encode(1, name, &mut entry);
                    put_bytes(2, &labels.canonical_bytes(), &mut entry);
                    put_bytes(3, &entry, b);
                }
                for e in &self.endpoints {
                    put_bytes(4, &e.canonical_bytes(), b);
                }
            },
        )
    }
}

/// Messages without map fields encode deterministically as they are.
macro_rules! plain_canonical {
    ($($t:ty),*) => {$(
        impl Canonical for $t {
            fn canonical_bytes(&self) -> Vec<u8> {
                self.encode_to_vec()
            }
        }
    )*};
}
plain_canonical!(pb::Policy, pb::TrustBundle, pb::Network, pb::MeshSettings);

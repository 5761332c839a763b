//! `straitctl`'s connection to a broker: the addresses of its replicas
//! (`--broker HOST:PORT[,HOST:PORT...]`, or a lab's `lab.json`), the first
//! of them that answers, the next one when it goes away, and the broker's
//! refusals in words that say what to check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use strait_broker_client::client::{self, ClientError};
use strait_proto::strait::broker::v1 as pb;
use tonic::transport::Channel;

use super::{Ctl, NotFound};
use crate::cli::UsageError;

/// How long one broker address may take to answer (TCP and TLS) before
/// the next is tried.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to one of a broker's addresses, with the others to move on
/// to.
pub(super) struct Conn {
    pub(super) admin: pb::admin_client::AdminClient<Channel>,
    /// The address connected to.
    pub(super) broker: String,
    addresses: Vec<String>,
    /// Which of `addresses` is `broker`.
    at: usize,
    creds: PathBuf,
}

impl Conn {
    /// Connects to the first of the broker's addresses that answers.
    pub(super) async fn open(ctl: &Ctl) -> Result<Self> {
        let (lab_broker, lab_creds) = match &ctl.lab {
            Some(dir) => {
                let (b, c) = read_lab(dir, ctl.mesh.as_deref())?;
                (Some(b), Some(c))
            }
            None => (None, None),
        };
        let addresses = match &ctl.broker {
            Some(text) => parse_addresses(text).map_err(|e| UsageError(format!("--broker {e}")))?,
            None => lab_broker.ok_or_else(|| {
                UsageError(
                    "no broker address: pass --broker HOST:PORT[,HOST:PORT...] or set \
                     STRAIT_BROKER"
                        .into(),
                )
            })?,
        };
        let creds = ctl.creds.clone().or(lab_creds).ok_or_else(|| {
            UsageError(
                "no admin credentials: pass --creds DIR or set STRAIT_CREDS (the broker writes \
                 them to DATA/admin on first start)"
                    .into(),
            )
        })?;
        let (at, channel) = connect(&addresses, &creds, 0).await?;
        Ok(Conn {
            admin: pb::admin_client::AdminClient::new(channel),
            broker: addresses[at].clone(),
            addresses,
            at,
            creds,
        })
    }

    /// Connects again, to the first address that answers after the one
    /// connected to (round the list, ending with that one): for a broker
    /// replica that went away.
    pub(super) async fn reconnect(&mut self) -> Result<()> {
        let (at, channel) = connect(&self.addresses, &self.creds, self.at + 1).await?;
        self.admin = pb::admin_client::AdminClient::new(channel);
        self.broker = self.addresses[at].clone();
        self.at = at;
        Ok(())
    }

    /// The admin credentials directory.
    pub(super) fn creds(&self) -> &Path {
        &self.creds
    }

    /// How many addresses the broker has.
    pub(super) fn replicas(&self) -> usize {
        self.addresses.len()
    }

    /// The broker's refusal as an error naming the broker, with a hint
    /// of what to check.
    pub(super) fn fail(&self, status: tonic::Status) -> anyhow::Error {
        if status.code() == tonic::Code::NotFound {
            return NotFound(format!("broker {}: {}", self.broker, status.message())).into();
        }
        let hint = match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => {
                " (is the broker running, and are these its admin credentials?)"
            }
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                " (are these the broker's admin credentials?)"
            }
            _ => "",
        };
        anyhow::anyhow!("broker {}: {}{hint}", self.broker, status.message())
    }
}

/// Connects to the first of `addresses`, from number `from` round the
/// list, that answers within [`CONNECT_TIMEOUT`]: its number and channel.
/// The error names every address tried and why it did not do.
async fn connect(addresses: &[String], creds: &Path, from: usize) -> Result<(usize, Channel)> {
    let mut failures = Vec::new();
    for i in (0..addresses.len()).map(|k| (from + k) % addresses.len()) {
        let address = &addresses[i];
        match tokio::time::timeout(CONNECT_TIMEOUT, client::connect(address, creds)).await {
            Ok(Ok(channel)) => return Ok((i, channel)),
            // The text names the address.
            Ok(Err(ClientError::Connect(e))) => failures.push(e.to_string()),
            Ok(Err(e)) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("admin credentials in {}", creds.display()));
            }
            Err(_) => failures.push(format!(
                "{address}: no answer within {}",
                crate::cli::format_duration(CONNECT_TIMEOUT)
            )),
        }
    }
    let hint = "is the broker running, and are these its admin credentials?";
    Err(match failures.as_slice() {
        [one] => anyhow::anyhow!("broker {one} ({hint})"),
        all => anyhow::anyhow!(
            "no broker address answered ({} tried; {hint}): {}",
            all.len(),
            all.join("; ")
        ),
    })
}

/// The addresses of `--broker` (or of lab.json): `HOST:PORT[,HOST:PORT...]`;
/// the error quotes the text and names the bad address.
pub(super) fn parse_addresses(text: &str) -> Result<Vec<String>, String> {
    let addresses: Vec<String> = text.split(',').map(|a| a.trim().to_string()).collect();
    for (i, a) in addresses.iter().enumerate() {
        let ok = a
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(format!(
                "{text:?}: address {} {a:?} is not HOST:PORT (several: HOST:PORT,HOST:PORT)",
                i + 1
            ));
        }
    }
    Ok(addresses)
}

/// The broker addresses and admin credentials of a lab directory: the
/// broker of mesh `mesh` from `brokers`, or the first one (`broker`). A
/// broker entry has `"address": "HOST:PORT"` or `"addresses": [...]`.
pub(super) fn read_lab(dir: &Path, mesh: Option<&str>) -> Result<(Vec<String>, PathBuf)> {
    let path = dir.join("lab.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "--lab {}: no lab.json (is a lab running there?)",
            dir.display()
        )
    })?;
    let v: Value = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    let broker = match mesh {
        None => &v["broker"],
        Some(m) => {
            let brokers = v["brokers"].as_array().cloned().unwrap_or_default();
            let names: Vec<String> = brokers
                .iter()
                .filter_map(|b| b["mesh"].as_str().map(str::to_string))
                .collect();
            let found = v["brokers"]
                .as_array()
                .and_then(|bs| bs.iter().find(|b| b["mesh"] == m));
            found.ok_or_else(|| {
                UsageError(format!(
                    "--mesh {m:?}: the lab has no such mesh (meshes: {})",
                    names.join(", ")
                ))
            })?
        }
    };
    let addresses =
        lab_addresses(broker).map_err(|e| anyhow::anyhow!("{}: broker {e}", path.display()))?;
    let creds = broker["admin_creds"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{}: broker admin_creds is missing", path.display()))?;
    let creds = PathBuf::from(creds);
    let creds = if creds.is_relative() {
        dir.join(creds)
    } else {
        creds
    };
    Ok((addresses, creds))
}

/// The addresses of a broker entry of lab.json: `"address"` (a string) or
/// `"addresses"` (a list of strings; an HA lab writes both, the list wins).
fn lab_addresses(broker: &Value) -> Result<Vec<String>, String> {
    match (&broker["address"], &broker["addresses"]) {
        (Value::String(a), Value::Null) => parse_addresses(a).map_err(|e| format!("address {e}")),
        (Value::Null | Value::String(_), Value::Array(list)) if !list.is_empty() => {
            let texts: Option<Vec<&str>> = list.iter().map(Value::as_str).collect();
            let texts = texts.ok_or_else(|| format!("addresses {list:?}: not all strings"))?;
            parse_addresses(&texts.join(",")).map_err(|e| format!("addresses {e}"))
        }
        (Value::Null, Value::Null) => Err("address is missing".into()),
        (a, b) => Err(format!(
            "address {a} / addresses {b}: expected \"address\": \"HOST:PORT\" or \
             \"addresses\": [\"HOST:PORT\", ...]"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_lists_parse_and_a_bad_address_is_named() {
        assert_eq!(
            parse_addresses("a:1, b:2,[::1]:15011").unwrap(),
            ["a:1", "b:2", "[::1]:15011"]
        );
        assert_eq!(
            parse_addresses("127.0.0.1:15011").unwrap(),
            ["127.0.0.1:15011"]
        );
        let e = parse_addresses("a:1,,b:2").unwrap_err();
        assert!(e.contains("address 2 \"\""), "{e}");
        let e = parse_addresses("a:1,b").unwrap_err();
        assert!(
            e.contains("\"a:1,b\"") && e.contains("address 2 \"b\""),
            "{e}"
        );
        let e = parse_addresses("a:99999").unwrap_err();
        assert!(e.contains("\"a:99999\" is not HOST:PORT"), "{e}");
        assert!(parse_addresses(":1").is_err());
    }

    #[test]
    fn a_lab_broker_has_one_address_or_a_list() {
        let one = serde_json::json!({"address": "127.0.0.1:1"});
        assert_eq!(lab_addresses(&one).unwrap(), ["127.0.0.1:1"]);
        let list = serde_json::json!({"addresses": ["127.0.0.1:1", "127.0.0.1:2"]});
        assert_eq!(
            lab_addresses(&list).unwrap(),
            ["127.0.0.1:1", "127.0.0.1:2"]
        );
        let e = lab_addresses(&serde_json::json!({})).unwrap_err();
        assert!(e.contains("missing"), "{e}");
        let e = lab_addresses(&serde_json::json!({"addresses": ["a:1", 2]})).unwrap_err();
        assert!(e.contains("not all strings"), "{e}");
        let e = lab_addresses(&serde_json::json!({"addresses": []})).unwrap_err();
        assert!(e.contains("expected"), "{e}");
        let e = lab_addresses(&serde_json::json!({"addresses": ["nope"]})).unwrap_err();
        assert!(e.contains("\"nope\" is not HOST:PORT"), "{e}");
        let both = serde_json::json!({"address": "a:1", "addresses": ["b:2", "c:3"]});
        assert_eq!(
            lab_addresses(&both).unwrap(),
            ["b:2", "c:3"],
            "the list wins"
        );
    }
}

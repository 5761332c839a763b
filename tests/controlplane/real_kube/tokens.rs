//! The CA's TokenReview of real service-account tokens: the right
//! account's token is accepted; one for another account, of another
//! audience, of a deleted ServiceAccount, expired, or bound to a Pod or a
//! Secret that was deleted is refused.
//!
//! Expiry: TokenRequest refuses durations under 10 minutes (checked
//! below), so an expired token is made the one way there is without
//! waiting: a real token's claims with `exp` (and `iat`, `nbf`) moved an
//! hour back, signed again with the API server's service-account key. The
//! same re-signing without moving the time is accepted, so `exp` is what
//! the refusal is about.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

use super::*;

/// Accounts, a pod and a secret tokens are bound to.
const OBJECTS: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: bookinfo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bookinfo-reviews, namespace: bookinfo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: other, namespace: bookinfo}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo}
spec:
  serviceAccountName: bookinfo-reviews
  automountServiceAccountToken: false
  containers: [{name: reviews, image: example.invalid/reviews:v1}]
---
apiVersion: v1
kind: Secret
metadata: {name: reviews-binding, namespace: bookinfo}
"#;

/// A token for bookinfo-reviews (audience istio-ca) bound to the object
/// `kind/name`: invalid once that object is gone.
fn bound_token(api: &ApiServer, kind: &str, name: &str) -> String {
    let (code, out, err) = api.kubectl(&[
        "create",
        "token",
        "bookinfo-reviews",
        "-n",
        "bookinfo",
        "--audience",
        "istio-ca",
        "--duration",
        "600s",
        "--bound-object-kind",
        kind,
        "--bound-object-name",
        name,
    ]);
    assert_eq!(
        code, 0,
        "kubectl create token (bound to {kind} {name}): {err}"
    );
    out.trim().to_string()
}

/// The ECDSA P-256 signature (JWS ES256: r and s, 32 bytes each) of
/// `input` by the key at `key`, made by openssl.
fn es256(key: &Path, input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl dgst -sign");
    // DER: SEQUENCE { INTEGER r, INTEGER s }, short lengths for P-256.
    let der = out.stdout;
    assert_eq!(der[0], 0x30, "not a DER signature");
    let mut at = 2;
    let mut raw = Vec::with_capacity(64);
    for _ in 0..2 {
        assert_eq!(der[at], 0x02);
        let len = der[at + 1] as usize;
        let int = &der[at + 2..at + 2 + len];
        let int = &int[int.len().saturating_sub(32)..];
        raw.extend(std::iter::repeat_n(0, 32 - int.len()));
        raw.extend_from_slice(int);
        at += 2 + len;
    }
    raw
}

/// `token` with its claims changed by `edit`, signed again with the API
/// server's service-account signing key (its header, `kid` included,
/// kept).
fn resigned(api: &ApiServer, token: &str, edit: impl Fn(&mut Value)) -> String {
    let mut parts = token.split('.');
    let header = parts.next().unwrap();
    let mut claims: Value =
        serde_json::from_slice(&B64.decode(parts.next().unwrap()).unwrap()).unwrap();
    edit(&mut claims);
    let input = format!(
        "{header}.{}",
        B64.encode(serde_json::to_vec(&claims).unwrap())
    );
    let signature = es256(&api.dir.join("pki/sa.key"), input.as_bytes());
    format!("{input}.{}", B64.encode(signature))
}

/// Asks for a certificate with `token` until the answer is a refusal
/// (the API server caches a successful authentication for a few
/// seconds), and returns it.
async fn until_refused(cp: &ControlPlane, token: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        match certificate_with(cp, "bookinfo-reviews", token).await {
            Err(e) => return e,
            Ok(_) => assert!(Instant::now() < deadline, "still accepted after {WAIT:?}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_refuses_foreign_expired_and_invalidated_tokens() {
    let s = Scratch::new();
    let Some(api) = ApiServer::start(&s.path("kube")) else {
        return;
    };
    api.apply(OBJECTS);
    let broker = Broker::start(&s.path("broker"), TD);
    let east = ControlPlane::east_on_kube(&s, &broker, &api.kubeconfig, &[]);
    let reviews = format!("spiffe://{TD}/ns/bookinfo/sa/bookinfo-reviews");

    // The account's own token: its identity; for another account: no.
    let token = api.token("bookinfo", "bookinfo-reviews", "istio-ca", 600);
    let identity = certificate_with(&east, "bookinfo-reviews", &token)
        .await
        .unwrap();
    assert_eq!(identity.spiffe_id.as_str(), reviews);
    let refused = certificate_with(&east, "other", &token).await.unwrap_err();
    assert!(refused.contains("bookinfo-reviews"), "{refused}");
    // Another audience.
    let wrong_audience = api.token("bookinfo", "bookinfo-reviews", "not-istio-ca", 600);
    let refused = certificate_with(&east, "bookinfo-reviews", &wrong_audience)
        .await
        .unwrap_err();
    assert!(
        refused.contains(r#"token audiences ["not-istio-ca"] is invalid"#),
        "{refused}"
    );
    // A deleted ServiceAccount.
    let other = api.token("bookinfo", "other", "istio-ca", 600);
    let (code, _, err) = api.kubectl(&["delete", "serviceaccount", "other", "-n", "bookinfo"]);
    assert_eq!(code, 0, "{err}");
    let refused = certificate_with(&east, "other", &other).await.unwrap_err();
    assert!(
        refused.contains(r#"serviceaccounts "other" not found"#),
        "{refused}"
    );

    // Expired. TokenRequest gives nothing shorter than 10 minutes...
    let (code, _, err) = api.kubectl(&[
        "create",
        "token",
        "bookinfo-reviews",
        "-n",
        "bookinfo",
        "--audience",
        "istio-ca",
        "--duration",
        "60s",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("10 minutes"), "{err}");
    // ... so: the same token re-signed is accepted, and re-signed an hour
    // older (expired for an hour) is refused.
    let same = resigned(&api, &token, |_| {});
    let identity = certificate_with(&east, "bookinfo-reviews", &same)
        .await
        .unwrap();
    assert_eq!(identity.spiffe_id.as_str(), reviews);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = resigned(&api, &token, |c| {
        c["iat"] = json_u64(now - 7200);
        c["nbf"] = json_u64(now - 7200);
        c["exp"] = json_u64(now - 3600);
    });
    let refused = certificate_with(&east, "bookinfo-reviews", &expired)
        .await
        .unwrap_err();
    assert!(refused.contains("token has expired"), "{refused}");

    // Bound to a Pod or a Secret, then that object deleted: refused. A
    // token never reviewed is refused at once; one reviewed before once
    // the API server's cache of the success lapses (10 s).
    let pod_bound = bound_token(&api, "Pod", "reviews-v1");
    let secret_bound = bound_token(&api, "Secret", "reviews-binding");
    let never_reviewed = bound_token(&api, "Secret", "reviews-binding");
    for t in [&pod_bound, &secret_bound] {
        let identity = certificate_with(&east, "bookinfo-reviews", t)
            .await
            .unwrap();
        assert_eq!(identity.spiffe_id.as_str(), reviews);
    }
    let (code, _, err) = api.kubectl(&["delete", "pod", "reviews-v1", "-n", "bookinfo", "--wait"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = api.kubectl(&["delete", "secret", "reviews-binding", "-n", "bookinfo"]);
    assert_eq!(code, 0, "{err}");
    let refused = certificate_with(&east, "bookinfo-reviews", &never_reviewed)
        .await
        .unwrap_err();
    assert!(refused.contains("token has been invalidated"), "{refused}");
    let deleted = Instant::now();
    for t in [&pod_bound, &secret_bound] {
        let refused = until_refused(&east, t).await;
        assert!(refused.contains("token has been invalidated"), "{refused}");
    }
    eprintln!(
        "tokens bound to deleted objects refused {:?} after the deletion",
        deleted.elapsed()
    );
}

fn json_u64(n: u64) -> Value {
    Value::from(n)
}

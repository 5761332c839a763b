//! An incremental TLS ClientHello reader: the SNI and ALPN of a connection
//! without terminating TLS.
//!
//! Feed it the bytes read so far; it answers "need more", the parsed hello,
//! or an error naming what was malformed. It copes with a ClientHello split
//! across TCP segments and across several TLS records, skips GREASE and
//! unknown extensions, and enforces size limits so a client cannot make the
//! gateway buffer without bound. No I/O, no clock: the caller owns both.

/// The largest ClientHello accepted (real ones are < 2 KiB; post-quantum
/// key shares push some to ~1.8 KiB, session tickets a little more).
pub const MAX_HELLO_BYTES: usize = 16 * 1024;
const RECORD_HEADER: usize = 5;
const MAX_RECORD: usize = 16384 + 256;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// What the first bytes of a connection said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name (SNI), lowercase; `None` when the client sent none.
    pub server_name: Option<String>,
    /// ALPN protocols offered, in order.
    pub alpn: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not a TLS handshake (first byte {0:#04x})")]
    NotHandshake(u8),
    #[error("unsupported record version {0:#06x}")]
    RecordVersion(u16),
    #[error("TLS record of {0} bytes exceeds the maximum")]
    RecordTooLarge(usize),
    #[error("handshake message type {0} is not a ClientHello")]
    NotClientHello(u8),
    #[error("ClientHello of {0} bytes exceeds the {MAX_HELLO_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("a non-handshake record (type {0}) interrupts the ClientHello")]
    Interleaved(u8),
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("malformed server_name extension: {0}")]
    BadServerName(&'static str),
}

/// The outcome of feeding bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Not enough bytes yet; read more (at most this many more are useful
    /// for the next step, a hint only).
    NeedMore,
    Done(ClientHello),
}

/// Parses the ClientHello at the start of `buf` (everything read so far).
pub fn parse(buf: &[u8]) -> Result<Progress, HelloError> {
    // Reassemble the handshake message from as many records as it spans.
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        if buf.len() < pos + RECORD_HEADER {
            return check_partial(buf, pos, &handshake);
        }
        let content = buf[pos];
        if content != CONTENT_HANDSHAKE {
            return Err(if pos == 0 {
                HelloError::NotHandshake(content)
            } else {
                HelloError::Interleaved(content)
            });
        }
        let version = u16::from_be_bytes([buf[pos + 1], buf[pos + 2]]);
        // 0x0301 (TLS 1.0) is what clients put in the first record; 0x0300
        // to 0x0304 are all seen in the wild for record-layer versions.
        if !(0x0300..=0x0304).contains(&version) {
            return Err(HelloError::RecordVersion(version));
        }
        let len = usize::from(u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]));
        if len > MAX_RECORD {
            return Err(HelloError::RecordTooLarge(len));
        }
        if len == 0 {
            return Err(HelloError::Malformed("empty handshake record"));
        }
        let start = pos + RECORD_HEADER;
        if buf.len() < start + len {
            handshake.extend_from_slice(&buf[start..]);
            return check_partial(buf, buf.len(), &handshake);
        }
        handshake.extend_from_slice(&buf[start..start + len]);
        pos = start + len;
        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::NotClientHello(handshake[0]));
            }
            let body_len = (usize::from(handshake[1]) << 16)
                | (usize::from(handshake[2]) << 8)
                | usize::from(handshake[3]);
            if body_len + 4 > MAX_HELLO_BYTES {
                return Err(HelloError::TooLarge(body_len + 4));
            }
            if handshake.len() >= body_len + 4 {
                return parse_body(&handshake[4..4 + body_len]).map(Progress::Done);
            }
        }
        if handshake.len() > MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge(handshake.len()));
        }
    }
}

/// Checks what can be checked of an incomplete prefix.
fn check_partial(buf: &[u8], consumed: usize, handshake: &[u8]) -> Result<Progress, HelloError> {
    if let Some(&b) = buf.get(consumed)
        && consumed < buf.len()
        && b != CONTENT_HANDSHAKE
    {
        return Err(if consumed == 0 {
            HelloError::NotHandshake(b)
        } else {
            HelloError::Interleaved(b)
        });
    }
    if let Some(&t) = handshake.first()
        && t != HANDSHAKE_CLIENT_HELLO
    {
        return Err(HelloError::NotClientHello(t));
    }
    if buf.len() > MAX_HELLO_BYTES + 64 * RECORD_HEADER {
        return Err(HelloError::TooLarge(buf.len()));
    }
    Ok(Progress::NeedMore)
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.data.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u8(what)?);
        self.take(n, what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader { data: body };
    r.u16("client version")?;
    r.take(32, "random")?;
    let session = r.vec8("session id")?;
    if session.len() > 32 {
        return Err(HelloError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16("cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher suites list"));
    }
    let compression = r.vec8("compression methods")?;
    if compression.is_empty() {
        return Err(HelloError::Malformed("no compression method"));
    }
    let mut hello = ClientHello {
        server_name: None,
        alpn: Vec::new(),
    };
    if r.data.is_empty() {
        return Ok(hello); // no extensions at all (old clients)
    }
    let mut exts = Reader {
        data: r.vec16("extensions")?,
    };
    if !r.data.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let mut seen = std::collections::BTreeSet::new();
    while !exts.data.is_empty() {
        let kind = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        if !seen.insert(kind) {
            return Err(HelloError::Malformed("duplicate extension"));
        }
        match kind {
            EXT_SERVER_NAME => hello.server_name = server_name(data)?,
            EXT_ALPN => hello.alpn = alpn(data)?,
            _ => {} // GREASE (0x?a?a) and everything else: skipped
        }
    }
    Ok(hello)
}

fn server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { data };
    let mut list = Reader {
        data: r
            .vec16("server name list")
            .map_err(|_| HelloError::BadServerName("truncated list"))?,
    };
    if !r.data.is_empty() {
        return Err(HelloError::BadServerName("bytes after the list"));
    }
    let mut host = None;
    while !list.data.is_empty() {
        let kind = list
            .u8("name type")
            .map_err(|_| HelloError::BadServerName("truncated entry"))?;
        let name = list
            .vec16("name")
            .map_err(|_| HelloError::BadServerName("truncated name"))?;
        if kind != 0 {
            continue; // unknown name types are ignored (RFC 6066)
        }
        if host.is_some() {
            return Err(HelloError::BadServerName("two host names"));
        }
        if name.is_empty() || name.len() > 253 {
            return Err(HelloError::BadServerName("empty or over-long host name"));
        }
        if !name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(HelloError::BadServerName(
                "host name has characters outside [A-Za-z0-9._-]",
            ));
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        host = Some(name.strip_suffix('.').unwrap_or(&name).to_string());
    }
    Ok(host)
}

fn alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut r = Reader { data };
    let mut list = Reader {
        data: r.vec16("ALPN list")?,
    };
    let mut out = Vec::new();
    while !list.data.is_empty() {
        let p = list.vec8("ALPN protocol")?;
        if p.is_empty() {
            return Err(HelloError::Malformed("empty ALPN protocol"));
        }
        out.push(p.to_vec());
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ClientHello as rustls writes it (the real thing), for `sni`/`alpn`.
    pub(crate) fn rustls_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        use std::sync::Arc;
        #[derive(Debug)]
        struct NoVerify;
        impl rustls::client::danger::ServerCertVerifier for NoVerify {
            fn verify_server_cert(
                &self,
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &[rustls::pki_types::CertificateDer<'_>],
                _: &rustls::pki_types::ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                vec![rustls::SignatureScheme::ECDSA_NISTP256_SHA256]
            }
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify))
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    fn done(buf: &[u8]) -> ClientHello {
        match parse(buf).unwrap() {
            Progress::Done(h) => h,
            Progress::NeedMore => panic!("incomplete"),
        }
    }

    const ISTIO: &str = "outbound_.9080_._.reviews.bookinfo.svc.cluster.local";

    #[test]
    fn reads_sni_and_alpn_from_a_real_hello() {
        let h = done(&rustls_hello(ISTIO, &[b"istio", b"istio-http/1.1"]));
        assert_eq!(h.server_name.as_deref(), Some(ISTIO));
        assert_eq!(h.alpn, [b"istio".to_vec(), b"istio-http/1.1".to_vec()]);
    }

    #[test]
    fn every_prefix_needs_more_and_never_errors() {
        let full = rustls_hello(ISTIO, &[b"istio"]);
        for n in 0..full.len() {
            assert_eq!(parse(&full[..n]), Ok(Progress::NeedMore), "prefix {n}");
        }
        assert!(matches!(parse(&full), Ok(Progress::Done(_))));
    }

    /// Re-frames a single-record hello into records of `chunk` bytes.
    fn split_records(full: &[u8], chunk: usize) -> Vec<u8> {
        let body = &full[RECORD_HEADER..];
        let mut out = Vec::new();
        for part in body.chunks(chunk) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn hello_split_across_records() {
        let full = rustls_hello(ISTIO, &[b"istio"]);
        for chunk in [1, 7, 64, 100] {
            let framed = split_records(&full, chunk);
            assert_eq!(
                done(&framed).server_name.as_deref(),
                Some(ISTIO),
                "chunk {chunk}"
            );
            for n in 0..framed.len() {
                assert_eq!(
                    parse(&framed[..n]),
                    Ok(Progress::NeedMore),
                    "chunk {chunk} prefix {n}"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_after_the_hello_are_fine() {
        let mut full = rustls_hello("a.example", &[]);
        full.extend_from_slice(b"early data the gateway must forward");
        assert_eq!(done(&full).server_name.as_deref(), Some("a.example"));
    }

    #[test]
    fn garbage_is_refused_early() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(HelloError::NotHandshake(b'G'))
        );
        assert_eq!(
            parse(&[22, 9, 9, 0, 5]),
            Err(HelloError::RecordVersion(0x0909))
        );
        assert_eq!(
            parse(&[22, 3, 1, 0xff, 0xff]),
            Err(HelloError::RecordTooLarge(0xffff))
        );
        assert_eq!(
            parse(&[22, 3, 1, 0, 0]),
            Err(HelloError::Malformed("empty handshake record"))
        );
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
            Err(HelloError::NotClientHello(2))
        );
        assert_eq!(
            parse(&[22, 3, 1, 0, 4, 1, 0xff, 0, 0]),
            Err(HelloError::TooLarge(0xff0004))
        );
        // A first record, then an alert instead of the rest.
        let full = rustls_hello("a.example", &[]);
        let framed = split_records(&full, 10);
        let mut mixed = framed[..15].to_vec();
        mixed.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
        assert_eq!(parse(&mixed), Err(HelloError::Interleaved(21)));
    }

    /// Builds a ClientHello from parts, for shapes no library emits.
    fn handmade(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut e = Vec::new();
        for (t, d) in exts {
            e.extend_from_slice(&t.to_be_bytes());
            e.extend_from_slice(&(d.len() as u16).to_be_bytes());
            e.extend_from_slice(d);
        }
        body.extend_from_slice(&(e.len() as u16).to_be_bytes());
        body.extend_from_slice(&e);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (t, n) in entries {
            list.push(*t);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut d = (list.len() as u16).to_be_bytes().to_vec();
        d.extend_from_slice(&list);
        d
    }

    #[test]
    fn grease_and_unknown_extensions_are_skipped() {
        let h = done(&handmade(&[
            (0x0a0a, vec![]),
            (0xfafa, vec![1, 2, 3]),
            (0, sni_ext(&[(0, b"Svc.Example.")])),
            (0x1a1a, vec![0]),
        ]));
        assert_eq!(h.server_name.as_deref(), Some("svc.example"));
    }

    #[test]
    fn bad_server_names() {
        for (ext, want) in [
            (sni_ext(&[(0, b"a"), (0, b"b")]), "two host names"),
            (sni_ext(&[(0, b"")]), "empty or over-long host name"),
            (
                sni_ext(&[(0, b"a b")]),
                "host name has characters outside [A-Za-z0-9._-]",
            ),
            (vec![0, 9, 0], "truncated list"),
            (vec![0, 3, 0, 0, 9], "truncated name"),
        ] {
            assert_eq!(
                parse(&handmade(&[(0, ext)])),
                Err(HelloError::BadServerName(want))
            );
        }
        // Unknown name types are ignored.
        let h = done(&handmade(&[(0, sni_ext(&[(7, b"x"), (0, b"ok.example")]))]));
        assert_eq!(h.server_name.as_deref(), Some("ok.example"));
    }

    #[test]
    fn other_malformations() {
        assert_eq!(
            parse(&handmade(&[
                (0, sni_ext(&[(0, b"a")])),
                (0, sni_ext(&[(0, b"b")]))
            ])),
            Err(HelloError::Malformed("duplicate extension"))
        );
        assert_eq!(
            parse(&handmade(&[(16, vec![0, 2, 0, 0])])),
            Err(HelloError::Malformed("empty ALPN protocol"))
        );
        let no_sni = done(&handmade(&[]));
        assert_eq!(no_sni.server_name, None);
    }
}

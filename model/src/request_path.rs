//! HTTP request path normalization, as Istio's `meshConfig.pathNormalization`
//! sets it up in Envoy, so that AuthorizationPolicy `paths`/`notPaths`,
//! VirtualService `uri` matches and the app all see one path
//! (CVE-2021-31920: `/public/../admin` must not pass a rule written for
//! `/public/*`, nor `/%61dmin` one written for `/admin`). Pure: no I/O.
//!
//! # What each mode does (Istio's names)
//!
//! Istio's `buildHTTPConnectionManager` (pilot/pkg/networking/core,
//! `listener_builder.go`) sets, for every HTTP listener of a proxy,
//! `path_with_escaped_slashes_action: KEEP_UNCHANGED` and then, by
//! `meshConfig.pathNormalization.normalization`:
//!
//! | mode | Envoy HTTP connection manager settings |
//! |---|---|
//! | `NONE` | `normalize_path: false` |
//! | `BASE` (and `DEFAULT`, the default) | `normalize_path: true` |
//! | `MERGE_SLASHES` | `normalize_path: true`, `merge_slashes: true` |
//! | `DECODE_AND_MERGE_SLASHES` | as `MERGE_SLASHES`, and `path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD` |
//!
//! Envoy (`ConnectionManagerUtility::maybeNormalizePath`,
//! source/common/http/path_utility.cc) applies them to the path before the
//! query (`?` and after are kept apart, untouched) in this order:
//!
//! 1. A `#` anywhere in the path is refused (`http_reject_path_with_fragment`).
//! 2. `DECODE_AND_MERGE_SLASHES` only: `%2F`/`%2f` become `/` and
//!    `%5C`/`%5c` become `\`. Otherwise escaped slashes are kept as they
//!    are (`KEEP_UNCHANGED`): `/a%2Fb` stays `/a%2Fb`, matched and forwarded so.
//! 3. `normalize_path` (every mode but `NONE`): Chromium's URL path
//!    canonicalization (`url::CanonicalizePath`, url_canon_path.cc), which
//!    - turns `\` into `/`;
//!    - removes dot segments as RFC 3986 §5.2.4 does, where `%2e`/`%2E`
//!      counts as a dot and `\` as a slash (`/x/../admin`, `/./admin`,
//!      `/%2e/admin`, `/a/..\admin` are all `/admin`; `..` above the root
//!      stays at the root);
//!    - decodes percent-encoded unreserved characters (`A-Z a-z 0-9 - _ ~`,
//!      and `.` as above): `/%61dmin` is `/admin`;
//!    - percent-encodes (upper-case hex) what may not appear raw in a path:
//!      controls, space, `"`, `<`, `>`, `^`, `` ` ``, `{`, `|`, `}`, DEL and
//!      every byte from 0x80 (`/admin x` is `/admin%20x`);
//!    - keeps every other escape as written (its hex case too);
//!    - refuses a NUL, raw or as `%00`: Envoy answers 400.
//!
//!    Before it, a dot segment carrying parameters (`..;x`, `.;x`) counts as
//!    the bare dot segment (Envoy's `strip_dotdot_segments_with_parameters`):
//!    Tomcat and Spring resolve `/public/..;/admin` to `/admin`.
//! 4. `MERGE_SLASHES` and `DECODE_AND_MERGE_SLASHES`: runs of `/` become
//!    one (`/a//b` is `/a/b`).
//!
//! The result goes to the app as the request's path, as Envoy forwards the
//! normalized `:path`.
//!
//! # Where strait is stricter than Envoy
//!
//! Each keeps [`normalize`] idempotent (`normalize(normalize(p)) ==
//! normalize(p)`), which Envoy's pipeline is not, and each closes a way
//! around a policy:
//!
//! - A `%` that does not start an escape (two hex digits) is refused (RFC
//!   3986 allows none). Chromium copies it, so `/%%36%31dmin` becomes
//!   `/%61dmin`: a DENY on `/admin` does not match it, and an app that
//!   decodes its path serves `/admin`.
//! - A dot segment with parameters is recognized wherever a dot segment is
//!   (`\..;\`, `/%2e%2e;/`), not only between two literal `/`.
//! - A path of slashes alone merges to `/` (Envoy leaves `//`).
//!
//! `NONE` passes the path through unchanged (no check at all), as Envoy
//! does without `normalize_path`; policies then see raw paths, which is
//! what CVE-2021-31920 is about.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

/// How request paths are normalized (Istio's
/// `meshConfig.pathNormalization.normalization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PathNormalization {
    /// No normalization: policies and the app see the path as sent.
    None,
    /// RFC 3986 dot segments, `\` to `/`, unreserved characters decoded,
    /// NUL refused (Istio's default).
    #[default]
    Base,
    /// [`Base`](Self::Base), then runs of `/` merged.
    MergeSlashes,
    /// `%2F` and `%5C` decoded, then [`MergeSlashes`](Self::MergeSlashes).
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    /// Every mode, in Istio's order.
    pub const ALL: [PathNormalization; 4] = [
        PathNormalization::None,
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ];

    /// Istio's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            PathNormalization::None => "NONE",
            PathNormalization::Base => "BASE",
            PathNormalization::MergeSlashes => "MERGE_SLASHES",
            PathNormalization::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }

    fn merges_slashes(self) -> bool {
        matches!(
            self,
            PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
        )
    }
}

impl fmt::Display for PathNormalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mode name that is not one of Istio's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{value:?} is not a path normalization (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)"
)]
pub struct UnknownPathNormalization {
    /// What was given.
    pub value: String,
}

impl FromStr for PathNormalization {
    type Err = UnknownPathNormalization;

    /// Istio's names, any case; `DEFAULT` is `BASE`, as in Istio.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.to_ascii_uppercase();
        match upper.as_str() {
            "NONE" => Ok(PathNormalization::None),
            "BASE" | "DEFAULT" => Ok(PathNormalization::Base),
            "MERGE_SLASHES" => Ok(PathNormalization::MergeSlashes),
            "DECODE_AND_MERGE_SLASHES" => Ok(PathNormalization::DecodeAndMergeSlashes),
            _ => Err(UnknownPathNormalization {
                value: s.to_owned(),
            }),
        }
    }
}

/// Why a request path is refused (the request is answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A NUL byte, raw or `%00`.
    #[error("request path {path:?} has a NUL byte (raw or %00) at byte {at}")]
    Nul {
        /// The path (cut to 256 bytes).
        path: String,
        /// Where, in bytes.
        at: usize,
    },
    /// A `%` not followed by two hex digits.
    #[error("request path {path:?} has a '%' that starts no escape (two hex digits) at byte {at}")]
    BadEscape {
        /// The path (cut to 256 bytes).
        path: String,
        /// Where, in bytes.
        at: usize,
    },
    /// A `#`: a fragment has no place in a request.
    #[error("request path {path:?} has a fragment ('#') at byte {at}")]
    Fragment {
        /// The path (cut to 256 bytes).
        path: String,
        /// Where, in bytes.
        at: usize,
    },
}

/// The longest piece of a refused path an error quotes.
const QUOTED: usize = 256;

fn quoted(path: &str) -> String {
    let mut end = path.len().min(QUOTED);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path[..end].to_owned()
}

// Chromium's path character classes (url_canon_path.cc, `kPathCharLookup`).
/// Copied as is.
const PASS: u8 = 0;
/// Percent-encoded in the output.
const ESCAPE: u8 = 1;
/// Decoded when found percent-encoded.
const UNESCAPE: u8 = 2;
/// Refused.
const INVALID: u8 = 3;
/// `.`, `%` and `\`: handled on their own.
const SPECIAL: u8 = 4;

fn class(b: u8) -> u8 {
    match b {
        0 => INVALID,
        b'.' | b'%' | b'\\' => SPECIAL,
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => UNESCAPE,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'/' | b':' | b';'
        | b'=' | b'@' | b'[' | b']' => PASS,
        // Controls, space, " # < > ? ^ ` { | } DEL and every byte >= 0x80.
        _ => ESCAPE,
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte `%XX` at `i` stands for, when `s[i..]` starts with one.
fn escape_at(s: &[u8], i: usize) -> Option<u8> {
    match s.get(i..i + 3) {
        Some([b'%', h, l]) => Some((hex(*h)? << 4) | hex(*l)?),
        _ => None,
    }
}

fn is_slash(b: u8) -> bool {
    b == b'/' || b == b'\\'
}

/// The length of the dot at `i` (`.` is 1, `%2e` 3), 0 when none.
fn dot_at(s: &[u8], i: usize) -> usize {
    match s.get(i..) {
        Some([b'.', ..]) => 1,
        Some([b'%', b'2', b'e' | b'E', ..]) => 3,
        _ => 0,
    }
}

/// What a dot that begins a segment starts.
enum Dot {
    /// A name that begins with a dot (`.profile`, `..x`).
    Name,
    /// `.`: this many bytes after the dot belong to the segment.
    Current(usize),
    /// `..`: this many bytes after the first dot belong to the segment.
    Up(usize),
}

/// The bytes from `i` to the end of the segment, its slash included:
/// after a dot segment's `;`, its parameters.
fn to_segment_end(s: &[u8], i: usize) -> usize {
    match s[i..].iter().position(|&b| is_slash(b)) {
        Some(n) => n + 1,
        None => s.len() - i,
    }
}

/// Chromium's `ClassifyAfterDot`, with dot segments' parameters.
fn classify_after_dot(s: &[u8], after: usize) -> Dot {
    let rest = |i: usize| -> Option<usize> {
        match s.get(i) {
            None => Some(0),
            Some(&b) if is_slash(b) => Some(1),
            Some(b';') => Some(to_segment_end(s, i)),
            Some(_) => None,
        }
    };
    if let Some(n) = rest(after) {
        return Dot::Current(n);
    }
    let second = dot_at(s, after);
    if second > 0
        && let Some(n) = rest(after + second)
    {
        return Dot::Up(second + n);
    }
    Dot::Name
}

/// Rewinds `out` (which ends in `/`) to the slash before the last segment,
/// never above the root.
fn back_up(out: &mut String) {
    let body = &out.as_bytes()[..out.len() - 1];
    let keep = body.iter().rposition(|&b| b == b'/').map_or(1, |i| i + 1);
    out.truncate(keep);
}

fn push_escaped(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

/// Chromium's `CanonicalizePath` on `path` (no query), with NUL refused.
/// `original` is the whole target, for errors.
fn canonicalize(path: &[u8], original: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len() + 1);
    if path.first().is_none_or(|&b| !is_slash(b)) {
        out.push('/');
    }
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        let dot = dot_at(path, i);
        if dot > 0 {
            if out.ends_with('/') {
                match classify_after_dot(path, i + dot) {
                    Dot::Name => out.push('.'),
                    Dot::Current(n) => i += n,
                    Dot::Up(n) => {
                        back_up(&mut out);
                        i += n;
                    }
                }
            } else {
                out.push('.');
            }
            i += dot;
            continue;
        }
        match class(b) {
            SPECIAL if b == b'\\' => out.push('/'),
            SPECIAL => {
                // `%` (a dot was handled above).
                let Some(v) = escape_at(path, i) else {
                    return Err(PathError::BadEscape {
                        path: quoted(original),
                        at: i,
                    });
                };
                match class(v) {
                    UNESCAPE => out.push(char::from(v)),
                    INVALID => {
                        return Err(PathError::Nul {
                            path: quoted(original),
                            at: i,
                        });
                    }
                    _ => {
                        // Kept as written, hex case included.
                        out.push('%');
                        out.push(char::from(path[i + 1]));
                        out.push(char::from(path[i + 2]));
                    }
                }
                i += 3;
                continue;
            }
            INVALID => {
                return Err(PathError::Nul {
                    path: quoted(original),
                    at: i,
                });
            }
            ESCAPE => push_escaped(&mut out, b),
            _ => out.push(char::from(b)),
        }
        i += 1;
    }
    Ok(out)
}

/// `%2F`/`%2f` as `/` and `%5C`/`%5c` as `\` (Envoy's `unescapeSlashes`).
fn decode_slashes(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let s = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut last = 0;
    let mut i = 0;
    while i < s.len() {
        let decoded = match s.get(i..i + 3) {
            Some([b'%', b'2', b'F' | b'f']) => Some('/'),
            Some([b'%', b'5', b'C' | b'c']) => Some('\\'),
            _ => None,
        };
        if let Some(c) = decoded {
            out.push_str(&path[last..i]);
            out.push(c);
            i += 3;
            last = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&path[last..]);
    Cow::Owned(out)
}

fn merge_slashes(path: &mut String) {
    if path.contains("//") {
        let mut out = String::with_capacity(path.len());
        for c in path.chars() {
            if !(c == '/' && out.ends_with('/')) {
                out.push(c);
            }
        }
        *path = out;
    }
}

/// Whether `path` is already what `mode` makes of it, by a quick scan that
/// may say no to some normal paths (those take the full way).
fn plainly_normal(path: &[u8], mode: PathNormalization) -> bool {
    let merge = mode.merges_slashes();
    let mut prev = 0u8;
    if path.first() != Some(&b'/') {
        return false;
    }
    for &b in path {
        let ok = match b {
            b'.' => prev != b'/',
            b'/' => !(merge && prev == b'/'),
            _ => matches!(class(b), PASS | UNESCAPE),
        };
        if !ok {
            return false;
        }
        prev = b;
    }
    true
}

/// Normalizes a request target's path (origin form: the path, then `?`
/// and the query, which is kept as it is) by `mode`. `*` (asterisk form)
/// passes unchanged. An error means the request must be refused with 400.
pub fn normalize(target: &str, mode: PathNormalization) -> Result<Cow<'_, str>, PathError> {
    if mode == PathNormalization::None || target == "*" {
        return Ok(Cow::Borrowed(target));
    }
    let (path, query) = match target.find('?') {
        Some(q) => target.split_at(q),
        None => (target, ""),
    };
    if let Some(at) = path.find('#') {
        return Err(PathError::Fragment {
            path: quoted(target),
            at,
        });
    }
    if plainly_normal(path.as_bytes(), mode) {
        return Ok(Cow::Borrowed(target));
    }
    // Every `%` must start an escape before anything is decoded: decoding
    // could otherwise complete a stray one into a new escape.
    let bytes = path.as_bytes();
    if let Some(at) = (0..bytes.len()).find(|&i| bytes[i] == b'%' && escape_at(bytes, i).is_none())
    {
        return Err(PathError::BadEscape {
            path: quoted(target),
            at,
        });
    }
    let path = match mode {
        PathNormalization::DecodeAndMergeSlashes => decode_slashes(path),
        _ => Cow::Borrowed(path),
    };
    let mut out = canonicalize(path.as_bytes(), target)?;
    if mode.merges_slashes() {
        merge_slashes(&mut out);
    }
    out.push_str(query);
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(p: &str) -> String {
        normalize(p, PathNormalization::Base).unwrap().into_owned()
    }

    #[test]
    fn the_issue_18_bypasses_normalize_to_admin() {
        for p in [
            "/admin",
            "/x/../admin",
            "/./admin",
            "/%61dmin",
            "/%2e/admin",
            "/%2E/admin",
            "/x/%2e%2e/admin",
            "/x/.%2E/admin",
            "/public/../admin",
            "/public/..\\admin",
            "\\admin",
            "/../../admin",
            "/public/..;/admin",
            "/public/..;jsessionid=1/admin",
            "/.;/admin",
            "/%41%44MIN/../admin",
        ] {
            assert_eq!(base(p), "/admin", "{p}");
        }
        assert_eq!(base("/admin\\x"), "/admin/x");
        assert_eq!(base("/admin/./x/"), "/admin/x/");
    }

    #[test]
    fn nul_and_stray_percent_and_fragments_are_refused() {
        for mode in [
            PathNormalization::Base,
            PathNormalization::MergeSlashes,
            PathNormalization::DecodeAndMergeSlashes,
        ] {
            for (p, at) in [("/admin%00", 6), ("/a\0", 2)] {
                assert_eq!(
                    normalize(p, mode),
                    Err(PathError::Nul { path: p.into(), at }),
                    "{p}"
                );
            }
            for (p, at) in [("/%", 1), ("/a%4", 2), ("/%%36%31dmin", 1), ("/a%zz", 2)] {
                assert_eq!(
                    normalize(p, mode),
                    Err(PathError::BadEscape { path: p.into(), at }),
                    "{p}"
                );
            }
            assert!(matches!(
                normalize("/a#b", mode),
                Err(PathError::Fragment { at: 2, .. })
            ));
        }
        let err = normalize("/admin%00", PathNormalization::Base).unwrap_err();
        assert_eq!(
            err.to_string(),
            "request path \"/admin%00\" has a NUL byte (raw or %00) at byte 6"
        );
        // A long path is quoted cut.
        let long = format!("/{}%00", "a".repeat(1000));
        let err = normalize(&long, PathNormalization::Base).unwrap_err();
        assert!(err.to_string().len() < 400, "{err}");
    }

    #[test]
    fn the_query_is_kept_apart_and_untouched() {
        assert_eq!(base("/x/../a?b=/../c&d=%00#"), "/a?b=/../c&d=%00#");
        assert_eq!(base("/a?"), "/a?");
        assert_eq!(base("/a/%2e?%2e"), "/a/?%2e");
        assert_eq!(
            normalize("/a//b?x//y", PathNormalization::MergeSlashes).unwrap(),
            "/a/b?x//y"
        );
    }

    #[test]
    fn base_keeps_escaped_slashes_and_other_escapes() {
        assert_eq!(base("/a%2Fb"), "/a%2Fb");
        assert_eq!(base("/a%2f..%5c"), "/a%2f..%5c");
        assert_eq!(base("/a%3b%3B"), "/a%3b%3B");
        assert_eq!(base("/%7e%7E%5F%2D"), "/~~_-");
        assert_eq!(base("/a%20b%25"), "/a%20b%25");
        assert_eq!(base("/a//b"), "/a//b");
    }

    #[test]
    fn characters_a_path_may_not_hold_raw_are_escaped() {
        assert_eq!(base("/a b"), "/a%20b");
        assert_eq!(base("/\"<>^`{|}"), "/%22%3C%3E%5E%60%7B%7C%7D");
        assert_eq!(base("/caf\u{e9}"), "/caf%C3%A9");
        assert_eq!(base("/\x01\x7f"), "/%01%7F");
        assert_eq!(base("/!$&'()*+,:;=@[]"), "/!$&'()*+,:;=@[]");
    }

    #[test]
    fn dot_names_are_not_dot_segments() {
        assert_eq!(base("/.well-known/x"), "/.well-known/x");
        assert_eq!(base("/a/..b/...c"), "/a/..b/...c");
        assert_eq!(base("/a/b./c.."), "/a/b./c..");
        assert_eq!(base("/a/%2e%2ex"), "/a/..x");
        assert_eq!(base("/index.html"), "/index.html");
        assert_eq!(base("/a/."), "/a/");
        assert_eq!(base("/a/.."), "/");
        assert_eq!(base(".."), "/");
        assert_eq!(base(""), "/");
        assert_eq!(base("a/b"), "/a/b");
        assert_eq!(base("*"), "*");
    }

    #[test]
    fn merge_slashes_merges_after_base() {
        let m = |p| {
            normalize(p, PathNormalization::MergeSlashes)
                .unwrap()
                .into_owned()
        };
        assert_eq!(m("//a///b//"), "/a/b/");
        assert_eq!(m("/a\\\\b"), "/a/b");
        assert_eq!(m("//"), "/");
        assert_eq!(m("/a/.//b"), "/a/b");
        assert_eq!(m("/a%2F%2Fb"), "/a%2F%2Fb");
    }

    #[test]
    fn decode_and_merge_slashes_decodes_escaped_slashes_first() {
        let d = |p| {
            normalize(p, PathNormalization::DecodeAndMergeSlashes)
                .unwrap()
                .into_owned()
        };
        assert_eq!(d("/a%2fb"), "/a/b");
        assert_eq!(d("/a%2F%2F%5cb"), "/a/b");
        assert_eq!(d("/public%2F..%2Fadmin"), "/admin");
        assert_eq!(d("/public%5C..%5Cadmin"), "/admin");
        assert_eq!(d("/a%252Fb"), "/a%252Fb");
    }

    #[test]
    fn none_passes_everything_through() {
        for p in ["/x/../admin", "/admin%00", "/%", "/a#b", "/a\\b"] {
            assert_eq!(normalize(p, PathNormalization::None).unwrap(), p);
        }
    }

    #[test]
    fn plain_paths_are_borrowed() {
        for p in ["/", "/api/v1/items?x=1", "/a.b/c-d_e~f", "/a//b"] {
            assert!(matches!(
                normalize(p, PathNormalization::Base),
                Ok(Cow::Borrowed(_))
            ));
        }
        assert!(matches!(
            normalize("/a//b", PathNormalization::MergeSlashes),
            Ok(Cow::Owned(_))
        ));
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        let samples = [
            "/x/../admin",
            "/%2e%2e;/a/..;b/%2E;/c",
            "\\..;\\admin",
            "/a/%2e%2e%2fb",
            "/a%2f%2e%2e%2fadmin",
            "/a/..%5c..%5cb",
            "//..//a",
            "/.%2e%41/b",
            "/a b/%20/\u{1F600}",
        ];
        for mode in PathNormalization::ALL {
            for p in samples {
                let Ok(once) = normalize(p, mode) else {
                    continue;
                };
                assert_eq!(normalize(&once, mode).unwrap(), once, "{mode} {p}");
            }
        }
    }

    #[test]
    fn modes_parse_from_istio_names() {
        for m in PathNormalization::ALL {
            assert_eq!(m.as_str().parse::<PathNormalization>(), Ok(m));
            assert_eq!(
                m.to_string().to_lowercase().parse::<PathNormalization>(),
                Ok(m)
            );
        }
        assert_eq!("DEFAULT".parse(), Ok(PathNormalization::Base));
        assert_eq!(PathNormalization::default(), PathNormalization::Base);
        let err = "merge".parse::<PathNormalization>().unwrap_err();
        assert_eq!(err.value, "merge");
        assert!(
            err.to_string().contains("DECODE_AND_MERGE_SLASHES"),
            "{err}"
        );
    }
}

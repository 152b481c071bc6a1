//! Who is calling the REST API: HTTP Basic with the system administrator's user and password, a
//! Bearer token (the administrator's, or a user's personal access token without system-admin
//! rights), or nobody. Pure: the answer depends on the `Authorization` header and the shared
//! properties only.

use super::settings::{ADMIN_PASSWORD, ADMIN_TOKEN, ADMIN_USER, Knobs, USER_TOKEN};

/// The caller of an administrative resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A system administrator (Basic or Bearer).
    SysAdmin,
    /// Authenticated, but without system-admin rights (the user token).
    User,
    /// No `Authorization` header.
    Anonymous,
    /// Credentials that match nobody, or a header that cannot be read.
    BadCredentials,
}

/// Decides who sent `authorization` (the header's value, if any).
pub fn authenticate(knobs: &Knobs, authorization: Option<&str>) -> Caller {
    let Some(header) = authorization.map(str::trim) else {
        return Caller::Anonymous;
    };
    let (scheme, value) = header.split_once(' ').unwrap_or((header, ""));
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if value.is_empty() {
            return Caller::BadCredentials;
        }
        if knobs.shared(ADMIN_TOKEN) == Some(value) {
            return Caller::SysAdmin;
        }
        if knobs.shared(USER_TOKEN) == Some(value) {
            return Caller::User;
        }
        return Caller::BadCredentials;
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let (Some(user), Some(password)) = (knobs.shared(ADMIN_USER), knobs.shared(ADMIN_PASSWORD))
        else {
            return Caller::BadCredentials;
        };
        let Some(decoded) = decode_base64(value).and_then(|b| String::from_utf8(b).ok()) else {
            return Caller::BadCredentials;
        };
        return match decoded.split_once(':') {
            Some((u, p)) if u == user && p == password => Caller::SysAdmin,
            _ => Caller::BadCredentials,
        };
    }
    Caller::BadCredentials
}

/// The `Authorization` header value for HTTP Basic with `user` and `password`.
pub fn basic_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        encode_base64(format!("{user}:{password}").as_bytes())
    )
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn encode_base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64, padding optional; `None` for anything else.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character carries fewer than 8 bits: not base64.
    (bits < 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::properties;

    fn knobs(text: &str) -> Knobs {
        let mut k = Knobs::new("node1");
        k.set_file(properties::parse(text));
        k
    }

    #[test]
    fn base64_round_trip() {
        for s in ["", "a", "ab", "abc", "admin:s3cr:et", "\u{e9}t\u{e9}"] {
            let e = encode_base64(s.as_bytes());
            assert_eq!(decode_base64(&e).as_deref(), Some(s.as_bytes()), "{s}");
        }
        assert_eq!(encode_base64(b"admin:admin"), "YWRtaW46YWRtaW4=");
        assert_eq!(
            decode_base64("YWRtaW46YWRtaW4").as_deref(),
            Some(&b"admin:admin"[..])
        );
        assert_eq!(decode_base64("a"), None);
        assert_eq!(decode_base64("ab$c"), None);
    }

    #[test]
    fn callers() {
        let k = knobs(
            "sim.admin.token=t1\nsim.user.token=u1\nsim.admin.user=admin\nsim.admin.password=pw:x\n",
        );
        assert_eq!(authenticate(&k, None), Caller::Anonymous);
        assert_eq!(authenticate(&k, Some("Bearer t1")), Caller::SysAdmin);
        assert_eq!(authenticate(&k, Some("bearer  t1 ")), Caller::SysAdmin);
        assert_eq!(authenticate(&k, Some("Bearer u1")), Caller::User);
        assert_eq!(
            authenticate(&k, Some("Bearer nope")),
            Caller::BadCredentials
        );
        assert_eq!(authenticate(&k, Some("Bearer")), Caller::BadCredentials);
        assert_eq!(
            authenticate(&k, Some(&basic_header("admin", "pw:x"))),
            Caller::SysAdmin
        );
        assert_eq!(
            authenticate(&k, Some(&basic_header("admin", "pw"))),
            Caller::BadCredentials
        );
        assert_eq!(authenticate(&k, Some("Basic !!")), Caller::BadCredentials);
        assert_eq!(authenticate(&k, Some("Digest x")), Caller::BadCredentials);
        // No user configured: Basic never succeeds, not even with empty credentials.
        let k = knobs("sim.admin.token=t1\n");
        assert_eq!(
            authenticate(&k, Some(&basic_header("", ""))),
            Caller::BadCredentials
        );
    }
}

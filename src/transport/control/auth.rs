//! Who may send commands: HMAC-SHA256 signatures over the signing time and
//! the command (SPEC §9), the keys that verify them (two during a
//! rotation), and the explicit opt-in to unsigned commands.

use chrono::Utc;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The header carrying `sha256=<hex HMAC-SHA256 of "<timestamp>.<value>">`.
pub const SIGNATURE_HEADER: &str = "x-signature";
/// The header carrying the signing time in Unix seconds; it is part of the
/// signed bytes, so a captured command cannot be replayed later.
pub const SIGNATURE_TIMESTAMP_HEADER: &str = "x-signature-timestamp";
/// A signature older (or further in the future) than this is refused.
pub const MAX_SIGNATURE_AGE_SECS: i64 = 300;
/// The shortest HMAC key accepted (SPEC §9).
pub const MIN_KEY_BYTES: usize = 32;

/// Why a command was not authenticated: no signature at all, or one that
/// does not verify. Rendered as the reply's error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    Unsigned(String),
    BadSignature(String),
}

impl AuthFailure {
    pub fn code(&self) -> &'static str {
        match self {
            AuthFailure::Unsigned(_) => "Unauthorized",
            AuthFailure::BadSignature(_) => "InvalidSignature",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            AuthFailure::Unsigned(m) | AuthFailure::BadSignature(m) => m,
        }
    }
}

/// Who may send commands: the keys that verify signatures (the current one
/// and, during a rotation, the previous one), or nobody-signs when the
/// operator opted in to unsigned commands.
#[derive(Clone, Default)]
pub struct Authenticator {
    keys: Vec<crate::config::Secret>,
    allow_unsigned: bool,
}

impl Authenticator {
    pub fn new(config: &crate::config::ControlConfig) -> Authenticator {
        let keys =
            [&config.hmac_key, &config.hmac_key_previous].into_iter().filter(|k| !k.is_empty()).cloned().collect();
        Authenticator { keys, allow_unsigned: config.allow_unsigned }
    }

    /// The key that signs what this side sends (commands, replies).
    pub fn signing_key(&self) -> Option<&str> {
        self.keys.first().map(|k| k.expose())
    }

    /// Checks a command's headers. With a key configured every command must
    /// carry a valid, fresh signature; without one, only an explicit
    /// `allow_unsigned` lets commands through.
    pub fn check(
        &self,
        value: &[u8],
        timestamp: Option<&[u8]>,
        signature: Option<&[u8]>,
        now_unix: i64,
    ) -> Result<(), AuthFailure> {
        if self.keys.is_empty() {
            return if self.allow_unsigned {
                Ok(())
            } else {
                Err(AuthFailure::Unsigned(
                    "unsigned commands are refused: configure control.hmac_key and sign commands \
                     (or set control.allow_unsigned = true)"
                        .into(),
                ))
            };
        }
        let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
            return Err(AuthFailure::Unsigned(format!(
                "the command is not signed ({SIGNATURE_HEADER} and {SIGNATURE_TIMESTAMP_HEADER} headers required)"
            )));
        };
        let keys: Vec<&str> = self.keys.iter().map(|k| k.expose()).collect();
        verify_signature(&keys, value, timestamp, signature, now_unix).map_err(AuthFailure::BadSignature)
    }
}

/// Checks `x-signature: sha256=<hex>` against the HMAC-SHA256 of
/// `"<timestamp>.<value>"` under any of `keys`, in constant time, and the
/// timestamp against `now_unix` (at most [`MAX_SIGNATURE_AGE_SECS`] apart).
pub fn verify_signature(
    keys: &[&str],
    value: &[u8],
    timestamp: &[u8],
    signature: &[u8],
    now_unix: i64,
) -> Result<(), String> {
    let timestamp = std::str::from_utf8(timestamp).map_err(|_| format!("{SIGNATURE_TIMESTAMP_HEADER} is not text"))?;
    if timestamp.is_empty() || timestamp.len() > 12 || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{SIGNATURE_TIMESTAMP_HEADER} must be Unix seconds"));
    }
    let signed_at: i64 = timestamp.parse().map_err(|_| format!("{SIGNATURE_TIMESTAMP_HEADER} must be Unix seconds"))?;
    if (now_unix - signed_at).abs() > MAX_SIGNATURE_AGE_SECS {
        return Err(format!(
            "the signature is {}s from now; at most {MAX_SIGNATURE_AGE_SECS}s are accepted",
            now_unix - signed_at
        ));
    }
    let signature = std::str::from_utf8(signature).map_err(|_| format!("{SIGNATURE_HEADER} is not text"))?;
    let hex = signature.trim().strip_prefix("sha256=").ok_or(format!("{SIGNATURE_HEADER} must be 'sha256=<hex>'"))?;
    let tag = decode_hex(hex).ok_or(format!("{SIGNATURE_HEADER} is not hexadecimal"))?;
    for key in keys {
        if let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.as_bytes()) {
            mac.update(timestamp.as_bytes());
            mac.update(b".");
            mac.update(value);
            if mac.verify_slice(&tag).is_ok() {
                return Ok(());
            }
        }
    }
    Err(format!("{SIGNATURE_HEADER} does not match"))
}

/// `sha256=<hex HMAC-SHA256 of "<timestamp>.<value>">`.
pub fn sign(key: &str, timestamp_unix: i64, value: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(key.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp_unix.to_string().as_bytes());
    mac.update(b".");
    mac.update(value);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The signature headers of a Kafka message: (`x-signature-timestamp`, `x-signature`).
pub fn signature_headers_of<M: rdkafka::Message>(message: &M) -> (Option<&[u8]>, Option<&[u8]>) {
    use rdkafka::message::Headers;
    let header = |name: &str| message.headers().and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value));
    (header(SIGNATURE_TIMESTAMP_HEADER), header(SIGNATURE_HEADER))
}

/// The two signature headers for `value`, signed now with `key`.
pub fn signature_headers(key: &str, value: &[u8]) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, OwnedHeaders};
    let now = Utc::now().timestamp();
    let timestamp = now.to_string();
    let signature = sign(key, now, value);
    OwnedHeaders::new()
        .insert(Header { key: SIGNATURE_TIMESTAMP_HEADER, value: Some(timestamp.as_str()) })
        .insert(Header { key: SIGNATURE_HEADER, value: Some(signature.as_str()) })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

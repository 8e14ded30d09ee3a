//! Realistic Copilot feedback events for `demo` and `produce`: every
//! interaction and scenario type, real-looking ids and contexts, and a chosen
//! share of invalid events covering each validation failure.

use chrono::{Duration, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::reason::Reason;
use crate::table::table;

/// A deterministic xorshift generator: reproducible load without a crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    pub fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(
            ((u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())).to_be_bytes(),
        )
        .into_uuid()
    }
}

/// Invalid event kinds the generator produces (one per reason it can provoke).
pub const INVALID_KINDS: [Reason; 12] = [
    Reason::MalformedJson,
    Reason::NotAnObject,
    Reason::MissingRequiredField,
    Reason::InvalidType,
    Reason::ValueTooLong,
    Reason::InvalidOption,
    Reason::InvalidGuid,
    Reason::InvalidDatetime,
    Reason::OutOfRange,
    Reason::UnknownField,
    Reason::ReadOnlyField,
    Reason::PayloadTooLarge,
];

pub struct Generator {
    rng: Rng,
    invalid_ratio: f64,
    /// A pool of conversations so feedback events share scenario requests.
    requests: Vec<(String, String)>,
}

/// One generated message: key, value, and the reason it must be rejected (if any).
pub struct Generated {
    pub key: String,
    pub value: Vec<u8>,
    pub expected: Option<Reason>,
}

impl Generator {
    pub fn new(seed: u64, invalid_ratio: f64) -> Generator {
        let mut rng = Rng::new(seed);
        let requests =
            (0..512).map(|_| (rng.uuid().to_string(), format!("{}", 1000000 + rng.below(8999999)))).collect();
        Generator { rng, invalid_ratio: invalid_ratio.clamp(0.0, 1.0), requests }
    }

    pub fn valid_event(&mut self) -> serde_json::Value {
        let t = table();
        // Borrowed from the table: copying every option per event was about
        // an eighth of the load generator's CPU (2.23 → 1.93 s per 500,000).
        let it = t.column("msdyn_interactiontype").map_or(&[][..], |c| c.options.as_slice());
        let st = t.column("msdyn_scenariotype").map_or(&[][..], |c| c.options.as_slice());
        let interaction = &it[self.rng.below(it.len() as u64) as usize];
        let scenario = &st[self.rng.below(st.len() as u64) as usize];
        let (request, case) = self.requests[self.rng.below(self.requests.len() as u64) as usize].clone();
        let when = Utc::now() - Duration::milliseconds(self.rng.below(86_400_000) as i64);
        // Clients send option sets in several spellings; all must normalize alike.
        let interaction_value = match self.rng.below(3) {
            0 => json!(interaction.value),
            1 => json!(interaction.label),
            _ => json!(interaction.value.to_string()),
        };
        let for_available = interaction.label == "Available";
        let locale = ["en-US", "de-DE", "ja-JP", "fr-FR"][self.rng.below(4) as usize];
        let mut event = json!({
            "msdyn_name": format!("{} - {}", interaction.label, scenario.label),
            "msdyn_scenariorequestid": request,
            "msdyn_interactiontype": interaction_value,
            "msdyn_scenariotype": scenario.label,
            "msdyn_clienttimestamp": when.to_rfc3339(),
            "msdyn_interactionforid": if for_available { self.rng.uuid().to_string() } else { format!("CAS-{case}") },
            "msdyn_interactionforlogicalname": if for_available { "systemuser" } else { "incident" },
            "msdyn_interactioncontext": {
                "client": "agent-desktop",
                "version": "9.2.24064",
                "locale": locale,
                "latencyMs": self.rng.below(3000),
                "responseLength": self.rng.below(2000),
            },
        });
        if self.rng.chance(0.3) {
            event["msdyn_interactiondataid"] = json!(format!("{{{}}}", self.rng.uuid().to_string().to_uppercase()));
        }
        if self.rng.chance(0.2) {
            event["msdyn_copilotinteractionid"] = json!(self.rng.uuid().to_string());
        }
        event
    }

    fn invalid_event(&mut self, reason: Reason) -> Vec<u8> {
        let mut e = self.valid_event();
        match reason {
            Reason::MalformedJson => return b"{\"msdyn_name\": \"truncated".to_vec(),
            Reason::NotAnObject => return b"[1,2,3]".to_vec(),
            Reason::MissingRequiredField => {
                e.as_object_mut().map(|o| o.remove("msdyn_scenariorequestid"));
            }
            Reason::InvalidType => e["msdyn_name"] = json!(42),
            Reason::ValueTooLong => e["msdyn_name"] = json!("x".repeat(101)),
            Reason::InvalidOption => e["msdyn_interactiontype"] = json!("ThumbsSideways"),
            Reason::InvalidGuid => e["msdyn_interactiondataid"] = json!("not-a-guid"),
            Reason::InvalidDatetime => e["msdyn_clienttimestamp"] = json!("1700-01-01T00:00:00Z"),
            Reason::OutOfRange => e["timezoneruleversionnumber"] = json!(-2),
            Reason::UnknownField => e["msdyn_sentiment"] = json!("positive"),
            Reason::ReadOnlyField => e["statecode"] = json!(1),
            Reason::PayloadTooLarge => {
                return format!("{{\"msdyn_name\":\"{}\"}}", "y".repeat(crate::normalize::MAX_PAYLOAD_BYTES))
                    .into_bytes();
            }
            _ => {}
        }
        e.to_string().into_bytes()
    }

    /// The next message; invalid with the configured probability. Payloads
    /// too large for a broker's default limits are left out of the mix.
    pub fn next(&mut self, allow_oversized: bool) -> Generated {
        let key = self.requests[self.rng.below(self.requests.len() as u64) as usize].0.clone();
        if self.rng.chance(self.invalid_ratio) && self.invalid_ratio > 0.0 {
            let kinds = if allow_oversized { &INVALID_KINDS[..] } else { &INVALID_KINDS[..INVALID_KINDS.len() - 1] };
            let reason = kinds[self.rng.below(kinds.len() as u64) as usize];
            return Generated { key, value: self.invalid_event(reason), expected: Some(reason) };
        }
        Generated { key, value: self.valid_event().to_string().into_bytes(), expected: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::Normalizer;

    #[test]
    fn generated_events_are_rejected_exactly_when_intended() {
        let mut g = Generator::new(7, 0.5);
        let n = Normalizer::default();
        for _ in 0..2000 {
            let m = g.next(true);
            let got = n.normalize_json(&m.value, None, Utc::now()).err().map(|r| r.reason);
            assert_eq!(got, m.expected, "{}", String::from_utf8_lossy(&m.value[..m.value.len().min(300)]));
        }
    }
}

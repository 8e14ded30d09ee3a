//! Routing a Kafka message value to its decoder (SPEC §4 `format`): JSON, or
//! Avro in the Confluent framing; `auto` decides by the magic byte 0. Both
//! end in the same validation and normalization.

use chrono::{DateTime, Utc};

pub mod avro;
pub(crate) mod flat_json;
pub(crate) mod json;

use crate::config::Format;
use crate::normalize::Normalizer;
use crate::reason::{Reason, Rejection};
use crate::record::{Origin, Record};
use avro::{AvroSchemas, Lookup};

pub enum Decoded {
    Record(Record),
    Rejected(Rejection),
    /// The schema id is not known yet; the registry must be asked first.
    NeedsSchema(u32),
}

pub struct Decoder {
    pub normalizer: Normalizer,
    pub format: Format,
    pub avro: AvroSchemas,
}

impl Decoder {
    pub fn decode(&self, payload: &[u8], origin: Option<&Origin>, now: DateTime<Utc>) -> Decoded {
        let framed = avro::frame(payload);
        let use_avro = match self.format {
            Format::Json => false,
            Format::Avro => true,
            Format::Auto => payload.first() == Some(&0),
        };
        if !use_avro {
            return match self.normalizer.normalize_json(payload, origin, now) {
                Ok(r) => Decoded::Record(r),
                Err(e) => Decoded::Rejected(e),
            };
        }
        if payload.len() > self.normalizer.max_payload_bytes {
            return Decoded::Rejected(Rejection::new(
                Reason::PayloadTooLarge,
                None,
                format!("message is {} bytes; the limit is {}", payload.len(), self.normalizer.max_payload_bytes),
            ));
        }
        let Some((id, datum)) = framed else {
            return Decoded::Rejected(Rejection::new(
                Reason::MalformedAvro,
                None,
                "not Confluent-framed Avro (magic byte 0 and a 4-byte schema id)",
            ));
        };
        match self.avro.lookup(id) {
            Lookup::Ready(reader) => match avro::decode(reader, datum) {
                Ok(fields) => match self.normalizer.normalize_fields(fields, origin, now) {
                    Ok(r) => Decoded::Record(r),
                    Err(e) => Decoded::Rejected(e),
                },
                Err(e) => Decoded::Rejected(e),
            },
            Lookup::Fetch => Decoded::NeedsSchema(id),
            Lookup::Unknown => {
                Decoded::Rejected(Rejection::new(Reason::UnknownSchemaId, None, format!("schema id {id} is not known")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AvroConfig;
    use serde_json::json;

    fn decoder(format: Format) -> Decoder {
        Decoder { normalizer: Normalizer::default(), format, avro: AvroSchemas::load(&AvroConfig::default()).unwrap() }
    }

    fn schema(id: u32) -> apache_avro::Schema {
        apache_avro::Schema::parse_str(avro::BUNDLED.iter().find(|(i, _)| *i == id).unwrap().1).unwrap()
    }

    fn event() -> serde_json::Value {
        json!({"msdyn_name": "n", "msdyn_scenariorequestid": "r", "msdyn_interactiontype": "ThumbsUp",
               "msdyn_scenariotype": 100230204, "msdyn_clienttimestamp": 1_700_000_000_000i64,
               "msdyn_copilotinteractionid": "0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d",
               "msdyn_interactioncontext": {"a": 1}})
    }

    fn reason(d: Decoded) -> Option<Reason> {
        match d {
            Decoded::Rejected(r) => Some(r.reason),
            _ => None,
        }
    }

    #[test]
    fn avro_and_json_twins_normalize_alike() {
        let d = decoder(Format::Auto);
        let now = Utc::now();
        let from_json = match d.decode(event().to_string().as_bytes(), None, now) {
            Decoded::Record(r) => r,
            _ => panic!("json"),
        };
        let payload = avro::framed(2, &avro::encode_json(&schema(2), &event()).unwrap());
        let Decoded::Record(from_avro) = d.decode(&payload, None, now) else { panic!("avro") };
        assert_eq!(from_avro, from_json);
    }

    #[test]
    fn malformed_avro_gets_a_reason_and_never_panics() {
        let d = decoder(Format::Avro);
        let now = Utc::now();
        let good = avro::framed(2, &avro::encode_json(&schema(2), &event()).unwrap());
        // Not framed at all, or a JSON payload with format = avro.
        assert_eq!(reason(d.decode(br#"{"msdyn_name":"x"}"#, None, now)), Some(Reason::MalformedAvro));
        assert_eq!(reason(d.decode(&[0, 0, 0], None, now)), Some(Reason::MalformedAvro));
        // Unknown schema id (no registry configured).
        assert_eq!(reason(d.decode(&avro::framed(99, &good[5..]), None, now)), Some(Reason::UnknownSchemaId));
        // Every truncation of a valid datum.
        for cut in 5..good.len() {
            let r = reason(d.decode(&good[..cut], None, now));
            assert!(matches!(r, Some(Reason::MalformedAvro)), "cut at {cut}: {r:?}");
        }
        // Trailing bytes.
        let mut long = good.clone();
        long.push(7);
        assert_eq!(reason(d.decode(&long, None, now)), Some(Reason::MalformedAvro));
        // A datum written with another schema (v1 bytes read as v2 and vice versa) fails or validates, never panics.
        let v1 = avro::encode_json(&schema(1), &json!({"msdyn_name": "n", "msdyn_scenariorequestid": "r", "msdyn_interactiontype": 1, "msdyn_scenariotype": 2})).unwrap();
        let _ = d.decode(&avro::framed(2, &v1), None, now);
        // A huge length prefix for the first string: refused, not allocated.
        let mut huge = vec![0, 0, 0, 0, 2];
        huge.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0x0f]);
        huge.extend_from_slice(b"abc");
        assert_eq!(reason(d.decode(&huge, None, now)), Some(Reason::MalformedAvro));
        // Garbage of every length.
        let mut rng = crate::generator::Rng::new(3);
        for len in 0..300 {
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if bytes.len() >= 5 {
                bytes[..5].copy_from_slice(&[0, 0, 0, 0, 2]);
            }
            let _ = d.decode(&bytes, None, now);
        }
    }

    #[test]
    fn auto_routes_by_the_magic_byte() {
        let d = decoder(Format::Auto);
        assert!(
            matches!(d.decode(br#"[1]"#, None, Utc::now()), Decoded::Rejected(r) if r.reason == Reason::NotAnObject)
        );
        assert_eq!(
            reason(decoder(Format::Json).decode(&avro::framed(2, b"x"), None, Utc::now())),
            Some(Reason::MalformedJson)
        );
    }

    #[test]
    fn older_schema_versions_decode_with_fewer_fields() {
        let d = decoder(Format::Auto);
        let v1_event = json!({"msdyn_name": "n", "msdyn_scenariorequestid": "r", "msdyn_interactiontype": "Copy",
                              "msdyn_scenariotype": "Copilot", "msdyn_clienttimestamp": "2024-01-01T00:00:00Z"});
        let payload = avro::framed(1, &avro::encode_json(&schema(1), &v1_event).unwrap());
        let Decoded::Record(r) = d.decode(&payload, None, Utc::now()) else { panic!("v1") };
        let Decoded::Record(j) = d.decode(v1_event.to_string().as_bytes(), None, Utc::now()) else { panic!("json") };
        assert_eq!(r.id(), j.id());
    }
}

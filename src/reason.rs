//! Stable, machine-readable reasons why an event is not written. They appear in
//! the DLQ header `x-ingest-error-reason`, in `validate` output and as the
//! `reason` label of the rejection and DLQ counters, so they never change.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    MalformedJson,
    MalformedAvro,
    UnknownSchemaId,
    NotAnObject,
    MissingRequiredField,
    InvalidType,
    ValueTooLong,
    InvalidOption,
    InvalidGuid,
    InvalidDatetime,
    OutOfRange,
    UnknownField,
    ReadOnlyField,
    PayloadTooLarge,
    /// The id exists in the sink with different content.
    DuplicateIdConflict,
    /// The sink refused the record permanently (a constraint, a value it cannot store).
    SinkRejected,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::MalformedJson,
        Reason::MalformedAvro,
        Reason::UnknownSchemaId,
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
        Reason::DuplicateIdConflict,
        Reason::SinkRejected,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::MalformedJson => "malformed_json",
            Reason::MalformedAvro => "malformed_avro",
            Reason::UnknownSchemaId => "unknown_schema_id",
            Reason::NotAnObject => "not_an_object",
            Reason::MissingRequiredField => "missing_required_field",
            Reason::InvalidType => "invalid_type",
            Reason::ValueTooLong => "value_too_long",
            Reason::InvalidOption => "invalid_option",
            Reason::InvalidGuid => "invalid_guid",
            Reason::InvalidDatetime => "invalid_datetime",
            Reason::OutOfRange => "out_of_range",
            Reason::UnknownField => "unknown_field",
            Reason::ReadOnlyField => "read_only_field",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::DuplicateIdConflict => "duplicate_id_conflict",
            Reason::SinkRejected => "sink_rejected",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Why one event cannot be written: the reason code, the offending field (if
/// any) and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub field: Option<String>,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: Reason, field: Option<&str>, message: impl Into<String>) -> Self {
        Rejection { reason, field: field.map(str::to_owned), message: message.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{} ({}): {}", self.reason, field, self.message),
            None => write!(f, "{}: {}", self.reason, self.message),
        }
    }
}

//! The table definition of `msdyn_copilotinteraction`, read from
//! `schemas/msdyn_copilotinteraction.table.json` — the one source of truth for
//! column names, types, length limits, integer ranges and option sets. The
//! validator and the SQL DDL are derived from it; nothing here re-types a limit.

use std::collections::HashSet;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde::Deserialize;

const TABLE_JSON: &str = include_str!("../schemas/msdyn_copilotinteraction.table.json");

/// The parsed table definition, built once at first use.
/// What a stored column beyond the table definition holds; each backend maps
/// it to its own type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraColumnKind {
    /// `msft_datastate`: 0 live, 1 retained (not null, default 0).
    DataState,
    Guid,
    Text,
    Int,
    Bigint,
}

/// The columns every backend stores beside the table definition's: the
/// retention state and the operation that retained the row, the Kafka source
/// coordinates, and the content digest that tells a replay from a conflict.
pub const EXTRA_COLUMNS: [(&str, ExtraColumnKind); 6] = [
    ("msft_datastate", ExtraColumnKind::DataState),
    ("msft_retention_operationid", ExtraColumnKind::Guid),
    ("ingest_topic", ExtraColumnKind::Text),
    ("ingest_partition", ExtraColumnKind::Int),
    ("ingest_offset", ExtraColumnKind::Bigint),
    ("ingest_content_hash", ExtraColumnKind::Guid),
];

pub fn table() -> &'static Table {
    static TABLE: LazyLock<Table> = LazyLock::new(|| {
        // The file is compiled into the binary and covered by unit tests, so a
        // parse failure is a build defect, not an input error.
        Table::parse(TABLE_JSON).unwrap_or_else(|e| panic!("schemas/msdyn_copilotinteraction.table.json: {e}"))
    });
    &TABLE
}

/// Column data types, named as Dataverse names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Uniqueidentifier,
    Lookup,
    String,
    Memo,
    Picklist,
    State,
    Status,
    Integer,
    Bigint,
    Datetime,
}

impl ColumnType {
    pub fn is_option_set(self) -> bool {
        matches!(self, ColumnType::Picklist | ColumnType::State | ColumnType::Status)
    }
    pub fn is_text(self) -> bool {
        matches!(self, ColumnType::String | ColumnType::Memo)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptionValue {
    pub value: i32,
    pub label: String,
    /// For `status` options: the state this status belongs to.
    #[serde(default)]
    pub state: Option<i32>,
    /// For `state` options: the status a record gets in this state by default.
    #[serde(default)]
    pub default_status: Option<i32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub logical_name: String,
    pub schema_name: String,
    #[serde(rename = "type")]
    pub column_type: ColumnType,
    #[serde(default)]
    pub max_length: Option<usize>,
    #[serde(default)]
    pub min_value: Option<i64>,
    #[serde(default)]
    pub max_value: Option<i64>,
    #[serde(default)]
    pub options: Vec<OptionValue>,
    #[serde(default)]
    pub targets: Vec<String>,
    pub valid_for_create: bool,
    /// Whether Update may change it (Dataverse's IsValidForUpdate).
    pub valid_for_update: bool,
    /// Whether the sink table has this column.
    pub stored: bool,
    #[serde(default)]
    pub required: Option<String>,
    #[serde(default)]
    pub default_value: Option<i32>,
    #[serde(default)]
    pub datetime_behavior: Option<String>,
    /// A datetime that may not lie in the future (`overriddencreatedon`).
    #[serde(default)]
    pub not_in_future: bool,
    #[serde(default)]
    pub description: Option<String>,
    /// Option labels folded for lookup (see [`fold_label`]), filled after parsing.
    #[serde(skip)]
    folded_labels: Vec<(String, i32)>,
}

impl Column {
    /// Required on create: the event must carry a value.
    pub fn is_required(&self) -> bool {
        matches!(self.required.as_deref(), Some("ApplicationRequired"))
    }

    /// The option value for a label written in any case and spacing.
    pub fn option_by_label(&self, label: &str) -> Option<i32> {
        // Most clients send the label exactly as defined: no folding needed.
        if let Some(option) = self.options.iter().find(|o| o.label == label) {
            return Some(option.value);
        }
        // Labels arrive with every event: fold short ASCII ones on the stack.
        let mut buffer = [0u8; 64];
        if label.is_ascii() && label.len() <= buffer.len() {
            let mut len = 0;
            for b in label.bytes().filter(|&b| !is_label_separator(char::from(b))) {
                buffer[len] = b.to_ascii_lowercase();
                len += 1;
            }
            let folded = &buffer[..len];
            return self.folded_labels.iter().find(|(l, _)| l.as_bytes() == folded).map(|(_, v)| *v);
        }
        let folded = fold_label(label);
        self.folded_labels.iter().find(|(l, _)| *l == folded).map(|(_, v)| *v)
    }

    pub fn option(&self, value: i32) -> Option<&OptionValue> {
        self.options.iter().find(|o| o.value == value)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    #[serde(rename = "$comment", default)]
    _comment: Option<String>,
    pub logical_name: String,
    pub entity_set_name: String,
    pub primary_id_attribute: String,
    pub primary_name_attribute: String,
    pub min_datetime: DateTime<Utc>,
    pub max_datetime: DateTime<Utc>,
    pub columns: Vec<Column>,
    #[serde(skip)]
    by_name: NameIndex,
    /// `<logical_name>_tombstone`: ids purged or deleted, never re-created.
    #[serde(skip)]
    tombstone_table: String,
}

impl Table {
    /// The table of tombstones (one row per purged or deleted id), the same
    /// name in every backend.
    pub fn tombstone_table(&self) -> &str {
        &self.tombstone_table
    }

    fn parse(text: &str) -> Result<Table, String> {
        let mut table: Table = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut names = HashSet::new();
        for col in table.columns.iter_mut() {
            col.folded_labels = col.options.iter().map(|o| (fold_label(&o.label), o.value)).collect();
            if !names.insert(col.logical_name.clone()) {
                return Err(format!("column {} defined twice", col.logical_name));
            }
            if col.column_type.is_text() && col.max_length.is_none() {
                return Err(format!("text column {} has no max_length", col.logical_name));
            }
            if col.column_type.is_option_set() && col.options.is_empty() {
                return Err(format!("option set {} has no options", col.logical_name));
            }
        }
        table.by_name = NameIndex::build(table.columns.iter().map(|c| c.logical_name.as_str()));
        if table.index_of(&table.primary_id_attribute).is_none() {
            return Err("primary id attribute is not a column".into());
        }
        table.tombstone_table = format!("{}_tombstone", table.logical_name);
        Ok(table)
    }

    /// Index of a column by logical name (exact, lowercase).
    pub fn index_of(&self, logical_name: &str) -> Option<usize> {
        self.by_name.get(logical_name, self.columns.len(), |i| &self.columns[i].logical_name)
    }

    pub fn column(&self, logical_name: &str) -> Option<&Column> {
        self.index_of(logical_name).map(|i| &self.columns[i])
    }

    /// Columns the sink table stores, in definition order.
    pub fn stored_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().filter(|c| c.stored)
    }
}

/// Folds an option label for comparison: case, spaces, underscores and hyphens
/// do not matter ("ThumbsUp", "thumbs up", "THUMBS_UP" are one label).
pub fn fold_label(label: &str) -> String {
    label.chars().filter(|&c| !is_label_separator(c)).flat_map(char::to_lowercase).collect()
}

fn is_label_separator(c: char) -> bool {
    c.is_whitespace() || c == '_' || c == '-'
}

/// Column lookup by exact name in one probe. Every field of every event is
/// looked up, so instead of a general map the index is an array of slots in
/// which no two columns share one: the name's length and first and last
/// eight bytes are mixed by a multiplier searched for when the table is
/// loaded. Any other name lands on an empty slot or fails the one compare.
/// Names the mix cannot tell apart (same length and same first and last
/// eight bytes) leave the index empty, and lookup scans the columns instead.
#[derive(Debug, Default)]
struct NameIndex {
    multiplier: u64,
    shift: u32,
    slots: Vec<Option<u16>>,
}

impl NameIndex {
    /// Multipliers tried per slot count before the array is doubled; with
    /// four slots or more per name a few dozen tries usually do.
    const ATTEMPTS: u64 = 4096;

    fn build<'n>(names: impl Iterator<Item = &'n str>) -> NameIndex {
        let keys: Vec<u64> = names.map(|name| name_key(name.as_bytes())).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        // Equal keys no multiplier can separate; nor can u16 slots hold more names.
        if sorted.windows(2).any(|pair| pair[0] == pair[1]) || keys.len() >= usize::from(u16::MAX) {
            return NameIndex::default();
        }
        let mut bits = (keys.len() * 4).next_power_of_two().trailing_zeros().max(4);
        while bits <= 16 {
            for attempt in 0..Self::ATTEMPTS {
                let multiplier = 0x9e37_79b9_7f4a_7c15u64.wrapping_add(attempt.wrapping_mul(0x6a09_e667_f3bc_c90a)) | 1;
                let mut index = NameIndex { multiplier, shift: 64 - bits, slots: vec![None; 1 << bits] };
                let placed = keys.iter().enumerate().all(|(column, &key)| {
                    let slot = index.slot(key);
                    let free = index.slots[slot].is_none();
                    // `column` fits in a u16: the count was checked above.
                    index.slots[slot] = Some(column as u16);
                    free
                });
                if placed {
                    return index;
                }
            }
            bits += 1;
        }
        NameIndex::default()
    }

    fn slot(&self, key: u64) -> usize {
        (key.wrapping_mul(self.multiplier) >> self.shift) as usize
    }

    /// The index of `name` among the names the index was built from, which
    /// `name_of` gives back by index.
    fn get<'n>(&self, name: &str, count: usize, name_of: impl Fn(usize) -> &'n str) -> Option<usize> {
        if self.slots.is_empty() {
            return (0..count).find(|&i| name_of(i) == name);
        }
        let column = usize::from(self.slots[self.slot(name_key(name.as_bytes()))]?);
        (name_of(column) == name).then_some(column)
    }
}

/// The length and the first and last eight bytes of a name, in one word.
fn name_key(bytes: &[u8]) -> u64 {
    let word = |part: &[u8]| {
        let mut w = [0u8; 8];
        w[..part.len()].copy_from_slice(part);
        u64::from_le_bytes(w)
    };
    let (head, tail) =
        if bytes.len() >= 8 { (word(&bytes[..8]), word(&bytes[bytes.len() - 8..])) } else { (word(bytes), 0) };
    head.rotate_left(29) ^ tail ^ (bytes.len() as u64).rotate_left(47)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_definition_parses_and_has_the_documented_limits() {
        let t = table();
        assert_eq!(t.logical_name, "msdyn_copilotinteraction");
        assert_eq!(t.column("msdyn_name").and_then(|c| c.max_length), Some(100));
        assert_eq!(t.column("msdyn_interactioncontext").and_then(|c| c.max_length), Some(1_048_576));
        assert_eq!(t.column("timezoneruleversionnumber").and_then(|c| c.min_value), Some(-1));
        assert!(!t.column("statecode").map(|c| c.valid_for_create).unwrap_or(true));
        let required: Vec<_> = t.columns.iter().filter(|c| c.is_required()).map(|c| c.logical_name.as_str()).collect();
        assert_eq!(required, ["msdyn_name", "msdyn_scenariorequestid", "msdyn_interactiontype", "msdyn_scenariotype"]);
    }

    #[test]
    fn every_column_is_found_by_its_exact_name_and_nothing_else_is() {
        let t = table();
        assert!(!t.by_name.slots.is_empty(), "the shipped table's names get a slot each");
        for (i, column) in t.columns.iter().enumerate() {
            let name = column.logical_name.as_str();
            assert_eq!(t.index_of(name), Some(i), "{name}");
            for other in
                [name.to_uppercase(), format!("{name}x"), name[..name.len() - 1].to_owned(), format!(" {name}")]
            {
                assert_eq!(t.index_of(&other), None, "{other}");
            }
        }
        for other in ["", "x", "msdyn_", "msdyn_copilotinteractionid\0"] {
            assert_eq!(t.index_of(other), None, "{other:?}");
        }
    }

    #[test]
    fn names_the_slot_index_cannot_tell_apart_are_scanned_for() {
        // Same length, same first and last eight bytes: one key.
        let names = ["prefix__A__suffix", "prefix__B__suffix", "short"];
        assert_eq!(name_key(names[0].as_bytes()), name_key(names[1].as_bytes()));
        let index = NameIndex::build(names.iter().copied());
        assert!(index.slots.is_empty());
        for (i, name) in names.iter().enumerate() {
            assert_eq!(index.get(name, names.len(), |i| names[i]), Some(i));
        }
        assert_eq!(index.get("prefix__C__suffix", names.len(), |i| names[i]), None);
        // Names it can tell apart get a slot each.
        let index = NameIndex::build(names[1..].iter().copied());
        assert!(!index.slots.is_empty());
        assert_eq!(index.get("short", 2, |i| names[1 + i]), Some(1));
        assert_eq!(index.get("prefix__A__suffix", 2, |i| names[1 + i]), None);
    }

    #[test]
    fn labels_match_in_any_case_and_spacing() {
        let it = table().column("msdyn_interactiontype").unwrap();
        for l in ["ThumbsUp", "thumbs up", "THUMBS_UP", "thumbs-up", " Thumbs Up "] {
            assert_eq!(it.option_by_label(l), Some(100230301), "{l}");
        }
        let st = table().column("msdyn_scenariotype").unwrap();
        assert_eq!(st.option_by_label("Case summary"), Some(100230205));
        assert_eq!(st.option_by_label("CASE_SUMMARY"), Some(100230205));
        assert_eq!(st.option_by_label("casesummary"), Some(100230205));
        assert_eq!(st.option_by_label("summary"), None);
        // Past the stack-folded fast path (non-ASCII, long): the same answers.
        assert_eq!(it.option_by_label("Thumbs\u{00a0}Up"), Some(100230301), "non-breaking space");
        assert_eq!(it.option_by_label(&format!("thumbs{}up", " ".repeat(80))), Some(100230301));
        assert_eq!(it.option_by_label("Thümbs Up"), None);
    }

    proptest::proptest! {
        /// The allocation-free lookup agrees with folding the whole label, on
        /// real labels in random case with separators (ASCII or not) inserted,
        /// and on noise.
        #[test]
        fn stack_folded_lookup_agrees_with_fold_label(
            pick in 0usize..1000,
            upper in proptest::collection::vec(proptest::prelude::any::<bool>(), 64),
            separator in "[ _\\-\\t\u{a0}é]{0,3}",
            noise in "[ _a-zA-Z\u{a0}]{0,70}",
        ) {
            for column in table().columns.iter().filter(|c| c.column_type.is_option_set()) {
                let option = &column.options[pick % column.options.len()];
                let mut label: String = option.label.chars().zip(upper.iter().cycle())
                    .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
                    .collect();
                let middle = label.char_indices().nth(label.chars().count() / 2).map_or(0, |(i, _)| i);
                label.insert_str(middle, &separator);
                for candidate in [&label, &noise] {
                    let folded = fold_label(candidate);
                    let expected = column.folded_labels.iter().find(|(l, _)| *l == folded).map(|(_, v)| *v);
                    proptest::prop_assert_eq!(column.option_by_label(candidate), expected, "{:?}", candidate);
                }
                if !separator.contains('é') {
                    proptest::prop_assert_eq!(column.option_by_label(&label), Some(option.value), "{:?}", label);
                }
            }
        }
    }
}

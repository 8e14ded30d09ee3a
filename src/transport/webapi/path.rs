//! The resource an OData path names, below `/api/data/v9.x/`.

use uuid::Uuid;

use crate::normalize::parse_guid;
use crate::table::table;

/// What a request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// `/api/data/v9.2/`: the service document.
    Service,
    Metadata,
    Batch,
    WhoAmI,
    /// `EntityDefinitions` (filtered by the query) or `EntityDefinitions(LogicalName='…')`.
    EntityDefinitions {
        logical_name: Option<String>,
    },
    /// `EntityDefinitions(LogicalName='…')/Attributes[/Microsoft.Dynamics.CRM.<Kind>AttributeMetadata]`.
    Attributes {
        logical_name: String,
        picklists_only: bool,
    },
    /// `msdyn_copilotinteractions`.
    EntitySet,
    /// `msdyn_copilotinteractions/$count`.
    Count,
    /// `msdyn_copilotinteractions(<id>)` or `(msdyn_copilotinteractionid=<id>)`.
    Entity(Uuid),
    /// An action bound to the entity set (`…/Microsoft.Dynamics.CRM.CreateMultiple`).
    SetAction(String),
    /// An action bound to one record (`…(<id>)/Microsoft.Dynamics.CRM.Retain`).
    EntityAction(Uuid, String),
    /// `retentionconfigs[(<id>)]` or `retentionoperations[(<id>)]`: the retention bookkeeping.
    Bookkeeping {
        entity: &'static str,
        key: Option<Uuid>,
    },
    /// An unbound action or function: `Retain`, `IsValidStateTransition(Entity=@p1,…)`;
    /// the text between the parentheses is kept.
    Operation {
        name: String,
        arguments: Option<String>,
    },
}

/// The versions served (the seed's clients use v9.0 to v9.2).
pub const VERSIONS: [&str; 3] = ["v9.0", "v9.1", "v9.2"];

/// Splits `/api/data/v9.x/<rest>` into the version and the resource;
/// `None` for any other path.
pub fn split(path: &str) -> Option<(&'static str, &str)> {
    let rest = path.strip_prefix("/api/data/")?;
    let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let version = VERSIONS.into_iter().find(|v| *v == version)?;
    Some((version, rest))
}

/// The resource of a (percent-decoded) path below the version.
pub fn parse(rest: &str) -> Result<Resource, String> {
    let t = table();
    let rest = rest.trim_end_matches('/');
    let unknown = || format!("Resource not found for the segment '{}'", rest.chars().take(100).collect::<String>());
    match rest {
        "" => return Ok(Resource::Service),
        "$metadata" => return Ok(Resource::Metadata),
        "$batch" => return Ok(Resource::Batch),
        "WhoAmI" | "WhoAmI()" => return Ok(Resource::WhoAmI),
        "EntityDefinitions" => return Ok(Resource::EntityDefinitions { logical_name: None }),
        _ => {}
    }
    if let Some(after) = rest.strip_prefix("EntityDefinitions(") {
        let (key, tail) = after.split_once(')').ok_or_else(unknown)?;
        let logical_name = key
            .strip_prefix("LogicalName=")
            .map(|v| v.trim_matches('\'').to_owned())
            .ok_or_else(|| "EntityDefinitions is addressed by LogicalName='…'".to_owned())?;
        return match tail {
            "" => Ok(Resource::EntityDefinitions { logical_name: Some(logical_name) }),
            "/Attributes" => Ok(Resource::Attributes { logical_name, picklists_only: false }),
            "/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata" => {
                Ok(Resource::Attributes { logical_name, picklists_only: true })
            }
            // Other kinds of attribute metadata: none of this table's are asked for by name.
            _ if tail.starts_with("/Attributes/Microsoft.Dynamics.CRM.") => {
                Ok(Resource::Attributes { logical_name, picklists_only: true })
            }
            _ => Err(unknown()),
        };
    }
    let (set, key) = match rest.split_once('(') {
        Some((set, key)) => (set, key.strip_suffix(')')),
        None => (rest, None),
    };
    if let Some(entity) = super::bookkeeping::entity_of_set(set) {
        let key = match key {
            None if !rest.contains('(') => None,
            Some(k) => Some(
                parse_guid(k.trim_matches(|c| c == '{' || c == '}'))
                    .ok_or_else(|| format!("'{}' is not a GUID", k.chars().take(64).collect::<String>()))?,
            ),
            None => return Err(unknown()),
        };
        return Ok(Resource::Bookkeeping { entity, key });
    }
    if let Some(after) = rest.strip_prefix(t.entity_set_name.as_str()) {
        if after.is_empty() {
            return Ok(Resource::EntitySet);
        }
        if after == "/$count" {
            return Ok(Resource::Count);
        }
        if let Some(action) = after.strip_prefix('/') {
            return Ok(Resource::SetAction(action_name(action).to_owned()));
        }
        if let Some(key) = after.strip_prefix('(') {
            let (key, tail) = key.split_once(')').ok_or_else(unknown)?;
            let id = entity_key(key)?;
            return match tail.strip_prefix('/') {
                None if tail.is_empty() => Ok(Resource::Entity(id)),
                Some(action) => Ok(Resource::EntityAction(id, action_name(action).to_owned())),
                None => Err(unknown()),
            };
        }
        return Err(unknown());
    }
    let name = action_name(rest);
    if name.is_empty() || name.contains('/') {
        return Err(unknown());
    }
    match name.split_once('(') {
        Some((name, arguments)) => {
            let arguments = arguments.strip_suffix(')').ok_or_else(unknown)?;
            Ok(Resource::Operation { name: name.to_owned(), arguments: Some(arguments.to_owned()) })
        }
        None => Ok(Resource::Operation { name: name.to_owned(), arguments: None }),
    }
}

/// `Microsoft.Dynamics.CRM.Retain` and `Retain` name the same action.
fn action_name(segment: &str) -> &str {
    segment.strip_prefix("Microsoft.Dynamics.CRM.").unwrap_or(segment)
}

/// `<guid>`, `{<guid>}` or the primary key as an alternate key:
/// `msdyn_copilotinteractionid=<guid>` or `='<guid>'` (Microsoft's Python SDK upserts so).
fn entity_key(key: &str) -> Result<Uuid, String> {
    let t = table();
    let value = match key.split_once('=') {
        Some((name, value)) if name == t.primary_id_attribute => value.trim_matches('\''),
        Some((name, _)) => {
            return Err(format!(
                "'{}' is not a key of {}; address records by {}",
                name.chars().take(64).collect::<String>(),
                t.logical_name,
                t.primary_id_attribute
            ));
        }
        None => key,
    };
    parse_guid(value.trim_start_matches('{').trim_end_matches('}'))
        .ok_or_else(|| format!("'{}' is not a record id (a GUID)", value.chars().take(64).collect::<String>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_the_clients_send_is_understood() {
        let id = Uuid::new_v4();
        assert_eq!(split("/api/data/v9.2/msdyn_copilotinteractions"), Some(("v9.2", "msdyn_copilotinteractions")));
        assert_eq!(split("/api/data/v8.0/x"), None);
        assert_eq!(split("/metrics"), None);
        let cases = [
            ("", Resource::Service),
            ("$metadata", Resource::Metadata),
            ("$batch", Resource::Batch),
            ("WhoAmI()", Resource::WhoAmI),
            ("EntityDefinitions", Resource::EntityDefinitions { logical_name: None }),
            (
                "EntityDefinitions(LogicalName='msdyn_copilotinteraction')",
                Resource::EntityDefinitions { logical_name: Some("msdyn_copilotinteraction".into()) },
            ),
            (
                "EntityDefinitions(LogicalName='msdyn_copilotinteraction')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
                Resource::Attributes { logical_name: "msdyn_copilotinteraction".into(), picklists_only: true },
            ),
            ("msdyn_copilotinteractions", Resource::EntitySet),
            ("msdyn_copilotinteractions/$count", Resource::Count),
            (
                "msdyn_copilotinteractions/Microsoft.Dynamics.CRM.CreateMultiple",
                Resource::SetAction("CreateMultiple".into()),
            ),
            (&format!("msdyn_copilotinteractions({id})"), Resource::Entity(id)),
            (&format!("msdyn_copilotinteractions({{{id}}})"), Resource::Entity(id)),
            (&format!("msdyn_copilotinteractions(msdyn_copilotinteractionid='{id}')"), Resource::Entity(id)),
            (
                &format!("msdyn_copilotinteractions({id})/Microsoft.Dynamics.CRM.Retain"),
                Resource::EntityAction(id, "Retain".into()),
            ),
            ("BulkDelete", Resource::Operation { name: "BulkDelete".into(), arguments: None }),
            (
                "IsValidStateTransition(Entity=@p1,NewState=@p2,NewStatus=@p3)",
                Resource::Operation {
                    name: "IsValidStateTransition".into(),
                    arguments: Some("Entity=@p1,NewState=@p2,NewStatus=@p3".into()),
                },
            ),
        ];
        for (path, expected) in cases {
            assert_eq!(parse(path), Ok(expected), "{path}");
        }
        for bad in ["msdyn_copilotinteractions(nope)", "msdyn_copilotinteractions(msdyn_name='x')", "accounts/x/y"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}

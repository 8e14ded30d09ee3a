//! One request as the handlers see it: the resource, the decoded query
//! options, the `Prefer` preferences and the base URL the caller used.

use axum::http::{HeaderMap, Method, header};
use bytes::Bytes;
use percent_encoding::percent_decode_str;

use super::auth::Caller;
use super::error::ApiError;
use super::path::{self, Resource};

/// Rows a page holds unless `Prefer: odata.maxpagesize` asks for fewer.
pub const DEFAULT_PAGE_SIZE: i64 = 5000;

#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub resource: Resource,
    /// `scheme://host/api/data/v9.x`, as the caller addressed it: the base of
    /// `@odata.nextLink`, `OData-EntityId` and `@odata.context`.
    pub base: String,
    /// Query options, names and values percent-decoded (`+` is a space).
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub prefer: Prefer,
    pub caller: Caller,
}

impl Call {
    /// `target` is the path and query of the request line.
    pub fn new(
        method: Method,
        target: &str,
        headers: HeaderMap,
        body: Bytes,
        scheme: &str,
        caller: Caller,
    ) -> Result<Call, ApiError> {
        let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
        let decoded_path = percent_decode_str(raw_path).decode_utf8_lossy();
        let (version, rest) = path::split(&decoded_path).ok_or_else(|| {
            ApiError::not_found(format!(
                "no resource at '{}': the Web API is under /api/data/v9.0, v9.1 or v9.2",
                decoded_path.chars().take(100).collect::<String>()
            ))
        })?;
        let resource = path::parse(rest).map_err(|e| {
            if e.starts_with("Resource not found") { ApiError::not_found(e) } else { ApiError::bad_request(e) }
        })?;
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
        let base = format!("{scheme}://{host}/api/data/{version}");
        let prefer = Prefer::parse(&headers);
        Ok(Call { method, resource, base, query: decode_query(raw_query), headers, body, prefer, caller })
    }

    /// The first value of a query option (`$select` and `%24select` alike).
    pub fn option(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The value of a header, if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The entity set's URL.
    pub fn entity_set_url(&self) -> String {
        format!("{}/{}", self.base, crate::table::table().entity_set_name)
    }
}

/// Form-urlencoded query parsing: `+` is a space, names and values are
/// percent-decoded (clients send `$select`, `%24select`, spaces as `+` or `%20`).
pub fn decode_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned();
            (decode(name), decode(value))
        })
        .collect()
}

/// The `Prefer` preferences the table honours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prefer {
    pub max_page_size: Option<i64>,
    pub return_representation: bool,
    /// `odata.include-annotations` patterns (`*`, `OData.Community.Display.V1.FormattedValue`, …).
    pub annotations: Vec<String>,
}

impl Prefer {
    pub fn parse(headers: &HeaderMap) -> Prefer {
        let mut prefer = Prefer::default();
        for value in headers.get_all("Prefer").iter().filter_map(|v| v.to_str().ok()) {
            for preference in split_outside_quotes(value) {
                let (name, argument) = preference.split_once('=').unwrap_or((preference, ""));
                let argument = argument.trim().trim_matches('"');
                match name.trim() {
                    "odata.maxpagesize" => prefer.max_page_size = argument.parse().ok().filter(|n| *n > 0),
                    "return" if argument == "representation" => prefer.return_representation = true,
                    "odata.include-annotations" => {
                        prefer.annotations.extend(argument.split(',').map(|a| a.trim().to_owned()))
                    }
                    _ => {}
                }
            }
        }
        prefer
    }

    /// Whether `annotation` (e.g. `Microsoft.Dynamics.CRM.morerecords`) was asked for.
    pub fn wants(&self, annotation: &str) -> bool {
        self.annotations.iter().any(|pattern| {
            pattern == "*"
                || pattern == annotation
                || pattern.strip_suffix('*').is_some_and(|prefix| annotation.starts_with(prefix))
        })
    }
}

/// Splits a header value on commas that are not inside double quotes:
/// `odata.include-annotations="a,b",odata.maxpagesize=5` is two preferences.
fn split_outside_quotes(value: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(value[start..].trim());
    parts.retain(|p| !p.is_empty());
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_in_every_form_the_clients_send() {
        let q = decode_query(
            "%24select=a%2Cb&%24filter=msdyn_name+eq+%27x+y%27&$top=3&fetchXml=%3Cfetch%20a%3D%221%22%2F%3E",
        );
        assert_eq!(
            q,
            vec![
                ("$select".into(), "a,b".into()),
                ("$filter".into(), "msdyn_name eq 'x y'".into()),
                ("$top".into(), "3".into()),
                ("fetchXml".into(), "<fetch a=\"1\"/>".into()),
            ]
        );
    }

    #[test]
    fn prefer_respects_quotes() {
        let mut h = HeaderMap::new();
        h.insert(
            "Prefer",
            "odata.include-annotations=\"Microsoft.Dynamics.CRM.fetchxmlpagingcookie,Microsoft.Dynamics.CRM.morerecords\",odata.maxpagesize=7"
                .parse()
                .unwrap(),
        );
        h.append("Prefer", "return=representation".parse().unwrap());
        let p = Prefer::parse(&h);
        assert_eq!(p.max_page_size, Some(7));
        assert!(p.return_representation);
        assert!(
            p.wants("Microsoft.Dynamics.CRM.morerecords") && p.wants("Microsoft.Dynamics.CRM.fetchxmlpagingcookie")
        );
        assert!(!p.wants("OData.Community.Display.V1.FormattedValue"));
        let mut h = HeaderMap::new();
        h.insert("Prefer", "odata.include-annotations=\"*\"".parse().unwrap());
        assert!(Prefer::parse(&h).wants("OData.Community.Display.V1.FormattedValue"));
    }
}

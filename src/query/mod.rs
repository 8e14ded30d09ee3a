//! Queries over the table, independent of any backend: FetchXML criteria
//! parsed and validated against the table definition, compiled to bound SQL
//! in either dialect.

pub mod bookkeeping;
pub mod compile;
pub mod fetchxml;
pub mod odata;
pub mod page;

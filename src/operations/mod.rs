//! The table's messages, one function per Dataverse message, written once
//! over the [`Backend`](crate::backend::Backend) interface. They know nothing
//! about Kafka or HTTP: a transport parses a request into the parameter
//! types here, calls the operation and encodes its response.

pub mod create_multiple;

//! Connecting to PostgreSQL with the URL's `sslmode` and `sslrootcert`, as
//! libpq reads them (tokio-postgres knows only disable/prefer/require and no
//! root certificate):
//!
//! | sslmode | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it | no (libpq's behaviour) |
//! | `require` | always | only when `sslrootcert` is given (then as `verify-ca`) |
//! | `verify-ca` | always | chain against `sslrootcert`, or the system's trust store |
//! | `verify-full` | always | chain and host name |
//!
//! A certificate that does not verify, or a server without TLS when TLS is
//! required, is a configuration error ([`BackendError::Fatal`]): the process
//! exits 2 at start instead of retrying forever.

use std::path::PathBuf;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::{Client, NoTls};

use crate::backend::BackendError;
use crate::config::redact_url;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            // libpq's "allow" tries plaintext first; TLS when offered is the safer reading.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode '{other}' is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }
}

/// A PostgreSQL URL split into what tokio-postgres understands and the TLS settings.
#[derive(Debug)]
pub struct ConnectOptions {
    pub config: tokio_postgres::Config,
    pub ssl_mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

impl ConnectOptions {
    pub fn parse(url: &str) -> Result<ConnectOptions, String> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut ssl_mode = SslMode::Prefer;
        let mut root_cert = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => ssl_mode = SslMode::parse(&percent_decode(value))?,
                "sslrootcert" => root_cert = Some(PathBuf::from(percent_decode(value))),
                _ => kept.push(pair),
            }
        }
        let rebuilt = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
        let mut config: tokio_postgres::Config = rebuilt.parse().map_err(|e| format!("not a PostgreSQL URL ({e})"))?;
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        if let Some(path) = &root_cert
            && !path.is_file()
        {
            return Err(format!("sslrootcert {} is not a readable file", path.display()));
        }
        Ok(ConnectOptions { config, ssl_mode, root_cert })
    }

    fn tls(&self) -> Result<MakeTlsConnector, String> {
        let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(|e| format!("TLS setup: {e}"))?;
        let verify = match self.ssl_mode {
            SslMode::Disable | SslMode::Prefer => false,
            SslMode::Require => self.root_cert.is_some(),
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        };
        if verify {
            builder.set_verify(SslVerifyMode::PEER);
            if let Some(path) = &self.root_cert {
                builder.set_ca_file(path).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
        } else {
            builder.set_verify(SslVerifyMode::NONE);
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        if self.ssl_mode != SslMode::VerifyFull {
            connector.set_callback(|config, _host| {
                config.set_verify_hostname(false);
                Ok(())
            });
        }
        Ok(connector)
    }
}

/// Opens one connection (its I/O driven by a spawned task).
pub async fn connect(url: &str) -> Result<Client, BackendError> {
    let options = ConnectOptions::parse(url).map_err(|e| BackendError::Fatal(format!("{}: {e}", redact_url(url))))?;
    let failed = |e: tokio_postgres::Error| {
        // tokio-postgres leaves the cause (e.g. OpenSSL's "certificate verify failed") out of its text.
        let mut detail = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            detail.push_str(&format!(": {c}"));
            cause = c.source();
        }
        let message = format!("connecting to {}: {detail}", redact_url(url));
        // A TLS failure does not heal by retrying: the certificate, the CA or
        // the server's TLS settings must change.
        if e.to_string().contains("TLS") { BackendError::Fatal(message) } else { BackendError::Transient(message) }
    };
    let client = if options.ssl_mode == SslMode::Disable {
        let (client, connection) = options.config.connect(NoTls).await.map_err(failed)?;
        spawn_connection(connection);
        client
    } else {
        let tls = options.tls().map_err(BackendError::Fatal)?;
        let (client, connection) = options.config.connect(tls).await.map_err(failed)?;
        spawn_connection(connection);
        client
    };
    Ok(client)
}

fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
}

/// `%XX` escapes decoded (for paths in query values).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = value.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_settings_are_read_from_the_url_and_the_rest_is_kept() {
        let o = ConnectOptions::parse("postgres://u:pw@h:5433/db?sslmode=verify-full&application_name=x").unwrap();
        assert_eq!((o.ssl_mode, o.root_cert.is_none()), (SslMode::VerifyFull, true));
        assert_eq!(o.config.get_application_name(), Some("x"));
        assert_eq!(o.config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        let o = ConnectOptions::parse("postgres://h/db").unwrap();
        assert_eq!(o.ssl_mode, SslMode::Prefer, "libpq's default");
        let err = ConnectOptions::parse("postgres://h/db?sslmode=maybe").unwrap_err();
        assert!(err.contains("sslmode 'maybe'"), "{err}");
        let err = ConnectOptions::parse("postgres://h/db?sslmode=verify-ca&sslrootcert=%2Fno%2Fsuch.pem").unwrap_err();
        assert!(err.contains("sslrootcert /no/such.pem"), "{err}");
    }
}

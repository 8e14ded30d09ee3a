//! The HTTP client for the two services we call: a Schema Registry and the
//! Dataverse Web API with its token endpoint. It is `ureq` (blocking, so call
//! it off the async runtime with `spawn_blocking`) over OpenSSL with the
//! system's trust store (`SSL_CERT_FILE` adds a private CA), keep-alive
//! connections, `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` with `NO_PROXY`
//! from the environment, and bounded response heads and bodies: a hostile
//! or broken server yields an error, never a panic.

use std::time::Duration;

use ureq::tls::{RootCerts, TlsConfig, TlsProvider};

/// Largest response body accepted (a CreateMultiple answer for 1000 ids is ~50 KB).
const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Idle keep-alive connections kept per endpoint.
const MAX_IDLE: usize = 64;

/// Where requests go: `http[s]://user:pass@host:port/base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" for the root).
    pub base_path: String,
    /// `user:password` from the URL, if any.
    pub userinfo: Option<String>,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err("must be an http:// or https:// URL".into());
        };
        let (authority, path) = rest
            .split_once('/')
            .map(|(a, p)| (a, format!("/{}", p.trim_end_matches('/'))))
            .unwrap_or((rest, String::new()));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_owned()), h),
            None => (None, authority),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse::<u16>().map_err(|_| "bad port".to_owned())?),
            None => (hostport.to_owned(), if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        Ok(Endpoint { tls, host, port, base_path: if path == "/" { String::new() } else { path }, userinfo })
    }

    /// `scheme://host[:port]` (no credentials), for messages and scopes.
    pub fn origin(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        let scheme = if self.tls { "https" } else { "http" };
        if self.port == default_port {
            format!("{scheme}://{}", self.host)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Why a request produced no response: always worth retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

pub struct HttpClient {
    endpoint: Endpoint,
    agent: ureq::Agent,
}

impl HttpClient {
    pub fn new(endpoint: Endpoint, timeout: Duration) -> Result<HttpClient, String> {
        let tls = TlsConfig::builder().provider(TlsProvider::NativeTls).root_certs(RootCerts::PlatformVerifier).build();
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_global(Some(timeout))
            // Statuses are the callers' to interpret (429, 404, 5xx).
            .http_status_as_error(false)
            .max_response_header_size(MAX_HEADER_BYTES)
            .max_idle_connections(MAX_IDLE)
            .max_idle_connections_per_host(MAX_IDLE)
            .max_redirects(0)
            .build();
        Ok(HttpClient { endpoint, agent: config.into() })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends one request. `path` is appended to the endpoint's base path;
    /// `headers` must not include Host, Content-Length or Connection.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, TransportError> {
        // The origin carries no credentials: they travel in headers only.
        let url = format!("{}{}{path}", self.endpoint.origin(), self.endpoint.base_path);
        let mut request = ureq::http::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(body.to_vec()).map_err(|e| TransportError(format!("request: {e}")))?;
        let mut response = self.agent.run(request).map_err(|e| match e {
            ureq::Error::NativeTls(e) => {
                TransportError(format!("TLS handshake with {} failed: {e}", self.endpoint.origin()))
            }
            ureq::Error::Tls(e) => TransportError(format!("TLS handshake with {} failed: {e}", self.endpoint.origin())),
            other => TransportError(other.to_string()),
        })?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_vec()
            .map_err(|e| TransportError(format!("response body: {e}")))?;
        Ok(Response { status, headers, body })
    }
}

/// RFC 3986's unreserved characters stay, everything else is encoded
/// (form values, query parameters).
const COMPONENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

pub fn percent_encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, COMPONENT).to_string()
}

pub fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (input, expected) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("https://u:p@reg.example.com:8443/base/").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port, e.base_path.as_str()), (true, "reg.example.com", 8443, "/base"));
        assert_eq!(e.userinfo.as_deref(), Some("u:p"));
        assert_eq!(e.origin(), "https://reg.example.com:8443");
        let e = Endpoint::parse("http://localhost").unwrap();
        assert_eq!((e.port, e.base_path.as_str(), e.origin()), (80, "", "http://localhost".to_owned()));
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("http://:80").is_err());
    }

    #[test]
    fn percent_encoding_keeps_unreserved_characters() {
        assert_eq!(percent_encode("a b&c=d/é~"), "a%20b%26c%3Dd%2F%C3%A9~");
    }

    /// A keep-alive server answering with Content-Length, then chunked, then close-delimited bodies.
    /// Serves `answers` in turn on one listener (each after reading a request head).
    fn serve(answers: Vec<Vec<u8>>) -> (u16, std::thread::JoinHandle<()>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut answers = answers.into_iter().peekable();
            while answers.peek().is_some() {
                let Ok((stream, _)) = listener.accept() else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            break;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    if line != "\r\n" {
                        break;
                    }
                    let Some(answer) = answers.next() else { return };
                    let _ = writer.write_all(&answer);
                }
            }
        });
        (port, server)
    }

    #[test]
    fn reads_every_body_framing() {
        let (port, server) = serve(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n".to_vec(),
            b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\nX-Thing: A\r\n\r\nbye".to_vec(),
        ]);
        let client =
            HttpClient::new(Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap(), Duration::from_secs(5))
                .unwrap();
        let r = client.request("GET", "/a", &[], b"").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let r = client.request("POST", "/b", &[("Content-Type", "text/plain")], b"x").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"abcde"[..]));
        let r = client.request("GET", "/c", &[], b"").unwrap();
        assert_eq!((r.status, r.body.as_slice(), r.header("x-thing")), (500, &b"bye"[..], Some("A")));
        drop(client);
        let _ = server.join();
    }

    /// A chunk size near `usize::MAX`, a head over the limit, a body cut
    /// short: each an error, never a panic.
    #[test]
    fn hostile_responses_are_errors_not_panics() {
        let answers = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffffff\r\nabc\r\n".to_vec(),
            [b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec(), vec![b'a'; 100 * 1024], b"\r\n\r\n".to_vec()].concat(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort".to_vec(),
        ];
        for answer in answers {
            let (port, server) = serve(vec![answer]);
            let client =
                HttpClient::new(Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap(), Duration::from_secs(5))
                    .unwrap();
            let outcome = std::thread::spawn(move || client.request("GET", "/", &[], b"").map(|r| r.body.len()));
            let result = outcome.join().expect("no panic");
            assert!(result.is_err(), "{result:?}");
            let _ = server.join();
        }
    }
}

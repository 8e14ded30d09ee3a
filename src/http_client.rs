//! A small blocking HTTP/1.1 client over TCP or TLS (OpenSSL, the system's
//! trust store; `SSL_CERT_FILE` adds a private CA) with keep-alive
//! connections, for the two services we call: a Schema Registry and the
//! Dataverse Web API with its token endpoint. Bodies are bounded; responses
//! are read by `Content-Length`, chunked encoding, or connection close.
//! Call it off the async runtime (`spawn_blocking`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use openssl::ssl::{SslConnector, SslMethod, SslStream};

/// Largest response body accepted (a CreateMultiple answer for 1000 ids is ~50 KB).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
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

enum Stream {
    Plain(TcpStream),
    Tls(Box<SslStream<TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

type Connection = BufReader<Stream>;

pub struct HttpClient {
    endpoint: Endpoint,
    connector: Option<SslConnector>,
    timeout: Duration,
    idle: Mutex<Vec<Connection>>,
}

impl HttpClient {
    pub fn new(endpoint: Endpoint, timeout: Duration) -> Result<HttpClient, String> {
        let connector = if endpoint.tls {
            Some(SslConnector::builder(SslMethod::tls_client()).map_err(|e| format!("TLS setup: {e}"))?.build())
        } else {
            None
        };
        Ok(HttpClient { endpoint, connector, timeout, idle: Mutex::new(Vec::new()) })
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
        let mut head = format!("{method} {}{path} HTTP/1.1\r\nHost: {}", self.endpoint.base_path, self.endpoint.host);
        if self.endpoint.port != if self.endpoint.tls { 443 } else { 80 } {
            head.push_str(&format!(":{}", self.endpoint.port));
        }
        head.push_str("\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");

        // A pooled connection may have been closed by the server while idle:
        // on failure, try once more on a fresh one.
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        if let Some(mut connection) = pooled
            && let Ok((response, reusable)) = exchange(&mut connection, &head, body)
        {
            self.release(connection, reusable);
            return Ok(response);
        }
        let mut connection = self.connect()?;
        let (response, reusable) = exchange(&mut connection, &head, body)
            .map_err(|e| TransportError(format!("{}: {e}", self.endpoint.origin())))?;
        self.release(connection, reusable);
        Ok(response)
    }

    fn release(&self, connection: Connection, reusable: bool) {
        if reusable
            && let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(connection);
        }
    }

    fn connect(&self) -> Result<Connection, TransportError> {
        let e = &self.endpoint;
        let addr = (e.host.as_str(), e.port)
            .to_socket_addrs()
            .map_err(|err| TransportError(format!("resolving {}: {err}", e.host)))?
            .next()
            .ok_or_else(|| TransportError(format!("{} has no address", e.host)))?;
        let tcp = TcpStream::connect_timeout(&addr, self.timeout.min(Duration::from_secs(10)))
            .map_err(|err| TransportError(format!("connecting to {}: {err}", e.origin())))?;
        let _ = tcp.set_nodelay(true);
        tcp.set_read_timeout(Some(self.timeout)).map_err(|err| TransportError(err.to_string()))?;
        tcp.set_write_timeout(Some(self.timeout)).map_err(|err| TransportError(err.to_string()))?;
        let stream = match &self.connector {
            Some(connector) => Stream::Tls(Box::new(
                connector
                    .connect(&e.host, tcp)
                    .map_err(|err| TransportError(format!("TLS handshake with {}: {err}", e.origin())))?,
            )),
            None => Stream::Plain(tcp),
        };
        Ok(BufReader::new(stream))
    }
}

/// Writes the request, reads the response. Returns whether the connection
/// may carry another request.
fn exchange(connection: &mut Connection, head: &str, body: &[u8]) -> std::io::Result<(Response, bool)> {
    let stream = connection.get_mut();
    // Head and body in one write: fewer packets, and no Nagle stall on small bodies.
    let mut bytes = Vec::with_capacity(head.len() + body.len());
    bytes.extend_from_slice(head.as_bytes());
    bytes.extend_from_slice(body);
    stream.write_all(&bytes)?;
    stream.flush()?;

    let mut header_bytes = 0usize;
    let mut line = String::new();
    read_line(connection, &mut line, &mut header_bytes)?;
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or("");
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| invalid("malformed status line"))?;
    let mut keep_alive = version == "HTTP/1.1";
    let mut headers = Vec::new();
    loop {
        read_line(connection, &mut line, &mut header_bytes)?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((k, v)) = trimmed.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if let Some(c) = header("connection") {
        keep_alive = !c.eq_ignore_ascii_case("close") && (keep_alive || c.eq_ignore_ascii_case("keep-alive"));
    }
    let chunked = header("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    let length = header("content-length").and_then(|l| l.parse::<usize>().ok());
    let mut body = Vec::new();
    if status == 204 || status == 304 || (100..200).contains(&status) {
        // No body.
    } else if chunked {
        loop {
            read_line(connection, &mut line, &mut header_bytes)?;
            let size_text = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                // Trailers end with an empty line.
                loop {
                    read_line(connection, &mut line, &mut header_bytes)?;
                    if line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            if body.len() + size > MAX_BODY_BYTES {
                return Err(invalid("response body too large"));
            }
            let start = body.len();
            body.resize(start + size, 0);
            connection.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            connection.read_exact(&mut crlf)?;
        }
    } else if let Some(length) = length {
        if length > MAX_BODY_BYTES {
            return Err(invalid("response body too large"));
        }
        body.resize(length, 0);
        connection.read_exact(&mut body)?;
    } else {
        connection.take(MAX_BODY_BYTES as u64).read_to_end(&mut body)?;
        keep_alive = false;
    }
    Ok((Response { status, headers, body }, keep_alive))
}

fn read_line(connection: &mut Connection, line: &mut String, total: &mut usize) -> std::io::Result<()> {
    line.clear();
    let n = connection.by_ref().take((MAX_HEADER_BYTES + 2) as u64).read_line(line)?;
    if n == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    *total += n;
    if *total > MAX_HEADER_BYTES {
        return Err(invalid("response head too large"));
    }
    Ok(())
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// `application/x-www-form-urlencoded` / URL query component encoding.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
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
    #[test]
    fn reads_every_body_framing_and_reuses_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let answers: [&[u8]; 3] = [
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
                b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\nbye",
            ];
            for answer in answers {
                let mut line = String::new();
                loop {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    if line == "\r\n" {
                        break;
                    }
                }
                writer.write_all(answer).unwrap();
            }
        });
        let client =
            HttpClient::new(Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap(), Duration::from_secs(5))
                .unwrap();
        let r = client.request("GET", "/a", &[], b"").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let r = client.request("GET", "/b", &[], b"").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"abcde"[..]));
        let r = client.request("GET", "/c", &[], b"").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (500, &b"bye"[..]));
        server.join().unwrap();
        assert!(client.idle.lock().unwrap().is_empty(), "a closed connection is not pooled");
    }
}

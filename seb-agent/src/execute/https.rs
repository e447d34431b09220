//! The HTTPS executor, for internal APIs: per mutation, the broker mints a short-lived
//! X.509 client certificate from its issuing CA (subject from the contract, the decision
//! id as a URI SAN `urn:seb:decision:<id>`), and speaks mTLS with it.
//!
//! Canonical live state of a target URL: `{"status"}` of a GET, plus the body as
//! canonical JSON when it is JSON, or its `sha256` otherwise.

use std::{path::PathBuf, sync::Arc, time::Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Uri};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType, SerialNumber};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio_rustls::rustls::{
    ClientConfig, RootCertStore,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
};

use super::{
    Executor, MintedIdentity, Mutation, Performed, Prepared, Refusal, Timings,
    broker_http::{BrokerHttp, roots_from_pem_file, tls_builder},
    identity_mismatch, mint_failed, ms, read_failed, unsupported,
};
use crate::{
    admission::RequestSummary,
    cert::{
        MutationRequest, Provider,
        ca::{self, CaFiles},
        contract::{ScopedIdentity, canonical_json},
    },
};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// PEM CA certificates that internal APIs' server certificates chain to.
    pub trust_anchors: PathBuf,
    /// The broker's issuing CA for client certificates; created on first start.
    #[serde(default = "default_client_ca_cert")]
    pub client_ca_cert: PathBuf,
    #[serde(default = "default_client_ca_key")]
    pub client_ca_key: PathBuf,
    /// Lifetime of each minted client certificate, in seconds.
    #[serde(default = "default_ttl")]
    pub client_cert_ttl_seconds: u64,
}

fn default_client_ca_cert() -> PathBuf {
    PathBuf::from("/var/lib/seb/client-ca.pem")
}
fn default_client_ca_key() -> PathBuf {
    PathBuf::from("/var/lib/seb/client-ca.key")
}
fn default_ttl() -> u64 {
    300
}

/// One HTTP mutation of an internal API.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpOperation {
    pub method: Method,
    pub url: Uri,
    pub body: Option<Bytes>,
}

impl HttpOperation {
    pub fn parse(request: &MutationRequest) -> Result<Self> {
        let method = match request.operation.as_str() {
            "PUT" => Method::PUT,
            "POST" => Method::POST,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            other => bail!("HTTP operation `{other}` is not a mutation (PUT, POST, PATCH or DELETE)"),
        };
        let url = target_url(&request.target)?;
        super::only_params(&request.operation, &request.params, &["body"])?;
        // Sent in its canonical form, the bytes the request digest covers (`1.0` and `1`
        // digest alike; the server receives the one form).
        let body = request.params.get("body").map(|body| Bytes::from(canonical_json(body)));
        Ok(Self { method, url, body })
    }
}

/// The https:// URL a request targets, in one spelling: policies and prefixes compare
/// its text, while the server resolves dot segments and escapes. So no user info (`a@b`
/// names host b), no `.` or `..` segment, and no escaped `.`, `/` or `\` in the path.
pub fn target_url(target: &str) -> Result<Uri> {
    let url: Uri = target.parse().with_context(|| format!("`{target}` is not a URL"))?;
    if url.scheme_str() != Some("https") {
        bail!("HTTP targets must be https:// URLs (mutual TLS with a minted client certificate)");
    }
    if url.authority().is_some_and(|authority| authority.as_str().contains('@')) {
        bail!("the URL `{target}` carries user info before its host");
    }
    let path = url.path();
    let lower = path.to_ascii_lowercase();
    if path.split('/').any(|segment| segment == "." || segment == "..")
        || path.contains('\\')
        || ["%2e", "%2f", "%5c"].iter().any(|escape| lower.contains(escape))
    {
        bail!(
            "the URL `{target}` has a dot segment or an escaped `.`, `/` or `\\` in its path: name the resource plainly"
        );
    }
    check_path_spelling(target, path)?;
    if let Some(query) = url.query() {
        check_escapes(target, "query", query, plain_in_query, |byte| b"&=".contains(&byte))?;
    }
    let canonical = canonical_url(&url)?;
    if canonical != target {
        bail!("the URL `{target}` is not in its one spelling; write it `{canonical}`");
    }
    Ok(url)
}

/// Characters a path may hold as they are (RFC 3986 `pchar` and `/`, less `;`): any
/// other is written escaped, and these never are, so each character has one spelling.
fn plain_in_path(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@/".contains(&byte)
}

/// Characters a query may hold as they are and never escaped: the path's and `?`, less
/// `&` and `=`, which divide it and are data when escaped (so either spelling is its
/// own), and `+`, a space to form decoders and a plus to others (write `%20` or `%2B`).
fn plain_in_query(byte: u8) -> bool {
    !b"&=+".contains(&byte) && (plain_in_path(byte) || byte == b'?')
}

/// Path spellings servers commonly read as another path: empty segments (merged by
/// nginx), `;` (Tomcat and Jetty drop `..;` to `..`), an escaped character that has a
/// plain form (`%73ecrets` is `secrets` to most routers, `%2C` is `,`), a character
/// written plainly that has to be escaped (`café` is `caf%C3%A9`), an escaped control
/// character (`%00` ends the path for some back ends) and lower-case escapes (`%c3` =
/// `%C3`).
fn check_path_spelling(target: &str, path: &str) -> Result<()> {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    // The last may be empty: `/items/7/` is its own resource to some frameworks.
    if segments.iter().rev().skip(1).any(|segment| segment.is_empty()) {
        bail!("the URL `{target}` has an empty path segment (`//`)");
    }
    if path.contains(';') {
        bail!("the URL `{target}` has a `;` in its path, which some servers read as a parameter and drop");
    }
    check_escapes(target, "path", path, plain_in_path, |_| false)
}

/// One spelling per character in `text`, the URL's `part`: each byte `plain` or
/// `either` as it is, every other one escaped, in upper case, never a control character
/// or a `plain` one.
fn check_escapes(target: &str, part: &str, text: &str, plain: fn(u8) -> bool, either: fn(u8) -> bool) -> Result<()> {
    let bytes = text.as_bytes();
    if let Some(byte) = bytes.iter().find(|byte| !plain(**byte) && !either(**byte) && **byte != b'%') {
        bail!("the URL `{target}` has `{}` written plainly in its {part}; write it escaped", byte.escape_ascii());
    }
    for (at, _) in text.match_indices('%') {
        let hex = bytes.get(at + 1..at + 3).unwrap_or_default();
        let value = std::str::from_utf8(hex).ok().and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match value {
            None => bail!("the URL `{target}` has a `%` that starts no escape"),
            Some(byte) if plain(byte) => {
                bail!("the URL `{target}` escapes `{}` in its {part}, which must be written plainly", byte as char)
            }
            Some(byte) if byte.is_ascii_control() => {
                bail!("the URL `{target}` escapes a control character ({byte:#04x})")
            }
            Some(_) if hex.iter().any(u8::is_ascii_lowercase) => {
                bail!("the URL `{target}` has an escape in lower case; write escapes in upper case")
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The URL as one text: `https://`, the host in lower case without a trailing dot, the
/// port unless 443, the path, and the query unless empty. A target must be written so,
/// because the SAB's rules compare the text (`resource == ...`, `url`) and the host.
fn canonical_url(url: &Uri) -> Result<String> {
    let host = url.host().context("the URL names no host")?;
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    // An address in its one text (`[::1]`, not `[0::1]`); a name of digits and dots
    // only is an address some resolvers read another way (`127.000.000.001`, octal).
    let host = match host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(address)) => format!("[{address}]"),
        Ok(address) => address.to_string(),
        Err(_) if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') => {
            bail!("the host `{host}` is neither a name nor an address in its usual form")
        }
        Err(_) => host.to_owned(),
    };
    let port = url.port_u16().filter(|port| *port != 443).map(|port| format!(":{port}")).unwrap_or_default();
    let query = url.query().filter(|query| !query.is_empty()).map(|query| format!("?{query}")).unwrap_or_default();
    Ok(format!("https://{host}{port}{}{query}", url.path()))
}

/// Whether `url` is under `prefix` (a URL, from the config) at a segment boundary:
/// `https://api/v1` covers `https://api/v1/x` and `https://api/v1?q`, not `https://api/v1x`.
pub fn is_under(url: &str, prefix: &str) -> bool {
    url.strip_prefix(prefix)
        .is_some_and(|rest| prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?']))
}

fn http_request(url: &Uri, method: Method, body: Option<Bytes>) -> Result<Request<Bytes>> {
    let host = url.authority().context("URL without host")?.to_string();
    let body = body.unwrap_or_default();
    let mut builder = Request::builder().method(method).uri(url.clone()).header(http::header::HOST, host);
    if !body.is_empty() {
        builder = builder.header(http::header::CONTENT_TYPE, "application/json");
    }
    Ok(builder.header(http::header::CONTENT_LENGTH, body.len()).body(body)?)
}

/// A minted client certificate, as TLS configuration.
pub struct ClientSession {
    tls: Arc<ClientConfig>,
    pub identity: MintedIdentity,
}

pub struct HttpsExecutor {
    http: BrokerHttp,
    roots: RootCertStore,
    issuing_ca: CaFiles,
    ttl: time::Duration,
}

impl HttpsExecutor {
    pub fn new(config: HttpConfig, http: BrokerHttp) -> Result<Self> {
        let roots = roots_from_pem_file(&config.trust_anchors, "http.trust_anchors")?;
        let issuing_ca = CaFiles { cert: config.client_ca_cert, key: config.client_ca_key };
        if !issuing_ca.cert.exists() {
            ca::create(&issuing_ca, "seb broker client CA", &rcgen::PKCS_ECDSA_P256_SHA256)?;
        }
        Ok(Self { http, roots, issuing_ca, ttl: time::Duration::seconds(config.client_cert_ttl_seconds as i64) })
    }

    /// Mint a client certificate for one decision.
    pub fn mint(&self, subject: &str, decision_id: &str) -> Result<ClientSession> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, subject);
        let decision_uri = format!("urn:seb:decision:{decision_id}");
        params.subject_alt_names = vec![SanType::URI(decision_uri.as_str().try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let serial = ca::random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::seconds(30);
        params.not_after = now + self.ttl;
        let cert = params.signed_by(&key, &self.issuing_ca.issuer()?)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let tls = tls_builder()
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(vec![cert.der().clone()], key_der)?;
        let identity = MintedIdentity::X509Client {
            subject: subject.into(),
            serial: hex::encode(serial),
            decision_uri,
            not_after: params.not_after.unix_timestamp(),
        };
        Ok(ClientSession { tls: Arc::new(tls), identity })
    }

    /// GET the target: status, body, and the digest of its canonical state.
    pub async fn get(&self, url: &Uri, session: &ClientSession) -> Result<(u16, Bytes, String)> {
        let response = self.http.send_with(http_request(url, Method::GET, None)?, session.tls.clone()).await?;
        let status = response.status().as_u16();
        if !is_state(status) {
            bail!("reading {url} answered HTTP {status}, which is no state of the target (2xx, 404 and 410 are)");
        }
        let digest = crate::cert::contract::digest_of(&canonical_state(status, response.body()));
        Ok((status, response.into_body(), digest))
    }

    pub async fn mutate(&self, operation: &HttpOperation, session: &ClientSession) -> Result<(u16, Option<String>)> {
        let request = http_request(&operation.url, operation.method.clone(), operation.body.clone())?;
        let response = self.http.send_with(request, session.tls.clone()).await?;
        let status = response.status();
        let error = (!status.is_success()).then(|| format!("HTTP {}: {}", status.as_u16(), excerpt(response.body())));
        Ok((status.as_u16(), error))
    }
}

/// What a signed outcome record keeps of an error response: its first bytes (an internal
/// API's error page may be large, or echo what it should not), and how long it was.
fn excerpt(body: &[u8]) -> String {
    crate::audit::clipped(&String::from_utf8_lossy(body), 512)
}

/// A minted client certificate and the mutation it may perform.
struct HttpsMutation<'a> {
    executor: &'a HttpsExecutor,
    operation: HttpOperation,
    session: ClientSession,
}

impl<'a> Mutation<'a> for HttpsMutation<'a> {
    fn identity(&self) -> &MintedIdentity {
        &self.session.identity
    }

    fn perform(self: Box<Self>) -> BoxFuture<'a, Performed> {
        Box::pin(async move {
            let result = self.executor.mutate(&self.operation, &self.session).await;
            let resulting = self.executor.get(&self.operation.url, &self.session).await.ok().map(|(_, _, d)| d);
            (result, resulting)
        })
    }

    fn discard(self: Box<Self>) -> BoxFuture<'a, ()> {
        // A client certificate cannot be recalled; it expires with its short lifetime.
        Box::pin(async {})
    }
}

impl Executor for HttpsExecutor {
    fn prepare<'a: 'r, 'r>(
        &'a self,
        identity: &'r ScopedIdentity,
        request: &'r MutationRequest,
        decision_id: &'r str,
    ) -> BoxFuture<'r, Result<(Prepared<'a>, String, Timings), Refusal>> {
        Box::pin(async move {
            let ScopedIdentity::X509Client { subject } = identity else {
                return Err(identity_mismatch(Provider::Http, identity));
            };
            let operation = HttpOperation::parse(request).map_err(unsupported)?;
            let clock = Instant::now();
            let session = self.mint(subject, decision_id).map_err(mint_failed)?;
            let mint_ms = ms(clock);
            let clock = Instant::now();
            let (_, _, digest) = self.get(&operation.url, &session).await.map_err(read_failed)?;
            let timings = Timings { mint_ms, drift_check_ms: ms(clock), execute_ms: 0.0 };
            Ok((Box::new(HttpsMutation { executor: self, operation, session }) as Prepared<'a>, digest, timings))
        })
    }

    fn read_again<'a>(
        &'a self,
        request: &'a RequestSummary,
        identity: &'a ScopedIdentity,
        decision_id: &'a str,
    ) -> BoxFuture<'a, Result<(MintedIdentity, String)>> {
        Box::pin(async move {
            let ScopedIdentity::X509Client { subject } = identity else { bail!("an HTTP target needs an x509_client") };
            let session = self.mint(subject, decision_id)?;
            let (_, _, digest) = self.get(&target_url(&request.target)?, &session).await?;
            Ok((session.identity, digest))
        })
    }
}

/// Whether a GET's answer is the target's state: a 2xx, or 404/410 (it does not
/// exist). A redirect, an authorization failure, a rate limit or a server error says
/// nothing of the target, and its digest would match whatever the target holds.
fn is_state(status: u16) -> bool {
    (200..300).contains(&status) || status == 404 || status == 410
}

fn canonical_state(status: u16, body: &[u8]) -> Value {
    // A JSON body of more values than a state decodes into is digested as bytes.
    let parsed = if crate::cert::ijson::values_in(body) > crate::cert::ijson::MAX_STATE_VALUES {
        Err(())
    } else {
        serde_json::from_slice::<Value>(body).map_err(drop)
    };
    match parsed {
        Ok(json) => json!({"status": status, "body": canonical_json(&json)}),
        Err(_) if body.is_empty() => json!({"status": status}),
        Err(_) => json!({"status": status, "sha256": hex::encode(Sha256::digest(body))}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_success_or_an_absence_is_a_state() {
        for status in [200, 204, 404, 410] {
            assert!(is_state(status), "{status}");
        }
        for status in [301, 304, 401, 403, 405, 429, 500, 503] {
            assert!(!is_state(status), "{status}");
        }
    }

    #[test]
    fn an_error_body_is_kept_in_part() {
        assert_eq!(excerpt(b"not found"), "not found");
        let long = excerpt(&vec![b'e'; 10_000]);
        assert!(long.len() < 700 && long.contains("… (10000 bytes, sha256:"), "{long}");
    }

    #[test]
    fn a_url_has_one_spelling_and_prefixes_end_at_a_segment() {
        for url in [
            "https://api/v1/../admin/keys",
            "https://api/v1/%2e%2e/admin/keys",
            "https://api/v1/%2E%2E%2Fadmin",
            "https://api/v1/./x",
            "https://api/v1/a%2fb",
            "https://api/v1/a\\b",
            "https://api@other/v1/x",
            // Spellings servers or the SAB's text rules would read as another.
            "https://api/v1/%73ecrets/x",
            "https://api/v1//secrets",
            "https://api/v1/..;/admin",
            "https://api/v1/x;jsessionid=1",
            "https://api/v1/caf%c3%a9",
            "https://api/v1/100%",
            "https://API/v1/x",
            "HTTPS://api/v1/x",
            "https://api./v1/x",
            "https://api:443/v1/x",
            "https://api/v1/x?",
            "https://api",
            "https://api/v1/café",
            "https://api/v1/a%2Cb",
            "https://api/v1/a%40b",
            "https://api/v1/x%00.json",
            "https://api/v1/a\"b",
            "https://[0::1]/v1/x",
            "https://127.000.000.001/v1/x",
            // The query, likewise: one spelling per character.
            "https://api/v1/x?_method=%44ELETE",
            "https://api/v1/x?id=%37",
            "https://api/v1/x?a=b+c",
            "https://api/v1/x?a=%c3%a9",
            "https://api/v1/x?a=caf\u{e9}",
            "https://api/v1/x?a=%00",
            "https://api/v1/x?a;b=c",
            "https://api/v1/x?a=\"b\"",
        ] {
            assert!(target_url(url).is_err(), "{url}");
        }
        target_url("https://api/v1/x?a=1&b=%26%3D%2B%20&c=/d?e").unwrap();
        target_url("https://api/v1/config.json?version=2").unwrap();
        target_url("https://api:8443/v1/caf%C3%A9%20menu").unwrap();
        target_url("https://api/").unwrap();
        target_url("https://api/v1/items/7/").unwrap();
        target_url("https://[::1]:8443/v1/a,b@c:d").unwrap();
        target_url("https://127.0.0.1/v1/a%3Bb").unwrap();
        let error = format!("{:#}", target_url("https://API:443/v1/x").unwrap_err());
        assert!(error.contains("write it `https://api/v1/x`"), "{error}");
        assert!(is_under("https://api/v1/x", "https://api/v1"));
        assert!(is_under("https://api/v1?q=1", "https://api/v1"));
        assert!(is_under("https://api/v1/x", "https://api/v1/"));
        assert!(!is_under("https://api/v1x/admin", "https://api/v1"));
        assert!(!is_under("https://api.evil/v1", "https://api"));
    }

    #[test]
    fn only_https_mutations_are_accepted() {
        let request = |operation: &str, target: &str| MutationRequest {
            provider: crate::cert::Provider::Http,
            operation: operation.into(),
            target: target.into(),
            params: json!({"body": {"replicas": 3}}),
        };
        let op = HttpOperation::parse(&request("PUT", "https://api.internal:8443/v1/config")).unwrap();
        assert_eq!(op.body.as_deref(), Some(br#"{"replicas":3}"#.as_slice()));
        assert!(HttpOperation::parse(&request("GET", "https://api.internal/x")).is_err());
        assert!(HttpOperation::parse(&request("PUT", "http://api.internal/x")).is_err());
        // A key nothing sends is no part of what is certified.
        let decoy =
            MutationRequest { params: json!({"body": 1, "ticket": "CHG-1"}), ..request("PUT", "https://api/x") };
        let refused = format!("{:#}", HttpOperation::parse(&decoy).unwrap_err());
        assert!(refused.contains("params.ticket means nothing to PUT (it takes params.body)"), "{refused}");
    }
}

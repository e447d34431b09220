//! The broker socket protocol: each message is a 4-byte big-endian length followed by
//! that many bytes of JSON. Every message carries the protocol version `v`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::UnixStream,
};

pub const VERSION: u32 = 1;
/// Largest message accepted, either way.
pub const MAX_MESSAGE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness of the broker.
    Ping,
    /// Admin diagnostic (uid 0 only): can the broker itself reach a protected endpoint?
    /// Opens a TCP connection as the broker and closes it without sending data.
    ProbeEgress { addr: String },
    /// An agent's proposal: a SAB certificate and the request it certifies.
    Propose { certificate: String, request: crate::cert::MutationRequest },
    /// Admin (uid 0): revoke a certificate serial or a contract id.
    Revoke {
        target: crate::admission::state::RevocationTarget,
        value: String,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Admin (uid 0): set the active epochs (either or both).
    SetEpochs {
        #[serde(default)]
        policy: Option<u64>,
        #[serde(default)]
        revocation: Option<u64>,
    },
    /// The active epochs.
    GetEpochs,
    /// A read-only passthrough request (`provider`, `operation`, `target`), no certificate.
    Read { request: crate::cert::MutationRequest },
    /// Admin (uid 0): attached programs, map sizes, epochs, the last denial.
    Status,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Pong {
        version: String,
    },
    ProbeEgress {
        addr: String,
        connected: bool,
        error: Option<String>,
    },
    Decision(Box<crate::admission::Decision>),
    Revoked {
        record_seq: i64,
    },
    Epochs(crate::admission::state::Epochs),
    Read(crate::execute::passthrough::ReadResult),
    Status(Box<StatusReport>),
    /// The request could not be served; `code` is stable, `message` is for people.
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// What `seb-agent status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    /// Every link is still pinned (and so attached).
    pub ready: bool,
    pub links: Vec<crate::enforcement::LinkState>,
    /// The last check of the kernel against what the agent installed.
    #[serde(default)]
    pub integrity: crate::enforcement::integrity::Integrity,
    pub map_entries: std::collections::BTreeMap<String, u64>,
    pub epochs: crate::admission::state::Epochs,
    pub ring_lost_total: u64,
    pub last_denial: Option<crate::audit::KernelDenial>,
    /// Cluster mode: this node and how current its copy of the cluster state is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node: String,
    /// SebPolicy and SebRevocation have both been read and applied.
    pub synced: bool,
    /// Every watcher (pods, namespaces, API server addresses too) has listed once.
    pub settled: bool,
    /// Why admissions are denied now, if they are.
    pub stale: Option<String>,
    /// Seconds since the API server last answered.
    pub api_age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Malformed,
    TooLarge,
    UnsupportedVersion,
    Forbidden,
    Internal,
    /// A limit was reached (connections, request memory, the audit queue): try again later.
    Busy,
    /// The request did not arrive whole in time.
    Timeout,
}

/// A message with its protocol version.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub v: u32,
    #[serde(flatten)]
    pub body: T,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("truncated message: {0}")]
    Truncated(std::io::Error),
}

/// Why a frame is not a request: the error code it is answered with, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub code: ErrorCode,
    pub message: String,
}

/// What is read of a message before the request: its protocol version, so that a
/// message of another version is told so rather than found invalid. Only an object has
/// one (a derived struct would also read `[1]` as version 1); the last `v` counts.
struct Versioned {
    v: Option<serde_json::Value>,
}

impl<'de> Deserialize<'de> for Versioned {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Versioned;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Versioned, A::Error> {
                let mut v = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "v" {
                        v = Some(map.next_value()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(Versioned { v })
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A frame's body as the broker reads it: JSON, protocol version [`VERSION`], a known
/// request. Read from the bytes twice (the version, then the request), never through a
/// `serde_json::Value`.
pub fn parse_request(frame: &[u8]) -> Result<Request, RequestError> {
    let error = |code, message: String| RequestError { code, message };
    let versioned: Versioned = serde_json::from_slice(frame).map_err(|e| {
        let what = if e.is_data() { "a versioned JSON object" } else { "JSON" };
        error(ErrorCode::Malformed, format!("the message is not {what}: {e}"))
    })?;
    match versioned.v.as_ref().and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(error(
                ErrorCode::UnsupportedVersion,
                format!("protocol version {v} is not supported; this broker speaks {VERSION}"),
            ));
        }
        None => return Err(error(ErrorCode::Malformed, "the message has no protocol version field `v`".into())),
    }
    let envelope: Envelope<Request> =
        serde_json::from_slice(frame).map_err(|e| error(ErrorCode::Malformed, format!("invalid request: {e}")))?;
    Ok(envelope.body)
}

/// Bytes read at a time: a body's buffer grows with what arrived, never to the announced
/// length up front.
const READ_CHUNK: usize = 64 * 1024;

pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, FrameError> {
    let len = read_len(reader).await?;
    read_body(reader, len).await
}

/// A frame's length prefix, checked against [`MAX_MESSAGE`].
pub async fn read_len<R: AsyncRead + Unpin>(reader: &mut R) -> Result<usize, FrameError> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Truncated(e)),
    }
    frame_len(len)
}

/// The length a frame's prefix announces, checked against [`MAX_MESSAGE`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_MESSAGE {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// A frame's body of `len` bytes; memory is taken as the bytes arrive.
pub async fn read_body<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> Result<Vec<u8>, FrameError> {
    read_body_from(reader, len, Vec::new()).await
}

/// The same, `body` holding the bytes of it already read (at most `len`).
pub async fn read_body_from<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: usize,
    mut body: Vec<u8>,
) -> Result<Vec<u8>, FrameError> {
    while body.len() < len {
        if body.capacity() == body.len() {
            // Double, from one chunk, up to the announced length: at most twice what arrived.
            body.reserve_exact(body.capacity().max(READ_CHUNK).min(len - body.len()));
        }
        let room = (body.capacity() - body.len()).min(len - body.len());
        let read = (&mut *reader).take(room as u64).read_buf(&mut body).await.map_err(FrameError::Truncated)?;
        if read == 0 {
            return Err(FrameError::Truncated(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(body)
}

/// Write one frame in one write, so that the peer wakes once for it, not once for the
/// length and again for the body.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, body: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| std::io::Error::other("message too large"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    writer.write_all(&frame).await?;
    writer.flush().await
}

/// Room for a usual frame (a decision with its outcome), so that encoding one does not
/// grow the buffer step by step.
const USUAL_FRAME: usize = 2 * 1024;

/// `message` as one frame (length prefix and JSON), encoded in place.
pub fn encode_frame<T: Serialize>(message: &T) -> std::io::Result<Vec<u8>> {
    let mut frame = Vec::with_capacity(USUAL_FRAME);
    frame.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut frame, message).map_err(std::io::Error::other)?;
    let len = u32::try_from(frame.len() - 4).map_err(|_| std::io::Error::other("message too large"))?;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    Ok(frame)
}

/// In the chain of a [`call`]'s error: the request was sent whole and no valid reply was
/// read, so the broker may have acted on it (a proposal may have been executed).
#[derive(Debug, thiserror::Error)]
#[error("the request was sent whole, but no valid reply was read: the broker may have acted on it")]
pub struct SentWithoutReply;

/// Whether `error` (from [`call`]) came after the request was sent whole.
pub fn sent_without_reply(error: &anyhow::Error) -> bool {
    error.downcast_ref::<SentWithoutReply>().is_some()
}

/// One request, one response: the client side used by the CLI.
pub async fn call(socket: &Path, request: &Request) -> Result<Response> {
    let body = serde_json::to_vec(&Envelope { v: VERSION, body: request })?;
    if body.len() > MAX_MESSAGE {
        bail!("the request is {} bytes, more than the broker takes ({MAX_MESSAGE}); not sent", body.len());
    }
    let mut stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to the broker at {}", socket.display()))?;
    write_frame(&mut stream, &body).await.context("sending the request")?;
    let reply = async {
        let reply = read_frame(&mut stream).await.context("reading the broker's reply")?;
        let envelope: Envelope<Response> = serde_json::from_slice(&reply).context("the broker's reply is not valid")?;
        if envelope.v != VERSION {
            bail!("the broker speaks protocol version {}, this client {VERSION}", envelope.v);
        }
        Ok(envelope.body)
    };
    reply.await.map_err(|e| e.context(SentWithoutReply))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proposal sent whole and left without a reply may have been executed: the error
    /// says so, and one that was never sent does not.
    #[tokio::test]
    async fn an_error_after_the_request_was_sent_is_told_apart_from_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("broker.sock");
        let ping = Request::Ping;
        let unreachable = call(&socket, &ping).await.unwrap_err();
        assert!(!sent_without_reply(&unreachable), "{unreachable:#}");

        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let silent = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let len = read_frame_len(&mut stream).await;
            read_body_from(&mut stream, len, Vec::new()).await.unwrap();
            // Closed without a reply (a broker that stopped).
        });
        let unanswered = call(&socket, &ping).await.unwrap_err();
        silent.await.unwrap();
        assert!(sent_without_reply(&unanswered), "{unanswered:#}");
        assert!(format!("{unanswered:#}").contains("may have acted on it"), "{unanswered:#}");

        let huge = Request::Read {
            request: serde_json::from_value(serde_json::json!({
                "provider": "http", "operation": "GET", "target": "x".repeat(MAX_MESSAGE),
            }))
            .unwrap(),
        };
        let refused = call(&socket, &huge).await.unwrap_err();
        assert!(!sent_without_reply(&refused) && format!("{refused:#}").contains("not sent"), "{refused:#}");
    }

    async fn read_frame_len(stream: &mut tokio::net::UnixStream) -> usize {
        use tokio::io::AsyncReadExt;
        let mut prefix = [0; 4];
        stream.read_exact(&mut prefix).await.unwrap();
        frame_len(prefix).unwrap()
    }

    #[test]
    fn requests_have_a_stable_wire_form() {
        let json =
            serde_json::to_value(Envelope { v: VERSION, body: Request::ProbeEgress { addr: "[::1]:443".into() } })
                .unwrap();
        assert_eq!(json, serde_json::json!({"v": 1, "type": "probe_egress", "addr": "[::1]:443"}));
        let ping: Envelope<Request> = serde_json::from_str(r#"{"v":1,"type":"ping"}"#).unwrap();
        assert_eq!(ping.body, Request::Ping);
    }

    #[test]
    fn a_request_is_read_with_its_version_checked_first() {
        let refused = |frame: &[u8]| parse_request(frame).unwrap_err();
        assert_eq!(parse_request(br#"{"type":"ping","v":1}"#).unwrap(), Request::Ping);
        let propose = parse_request(
            br#"{"v":1,"type":"propose","certificate":"PEM","request":{"provider":"aws","operation":"o","target":"t","params":{}}}"#,
        )
        .unwrap();
        assert!(matches!(propose, Request::Propose { certificate, .. } if certificate == "PEM"));
        let not_json = refused(b"{not json");
        assert_eq!(not_json.code, ErrorCode::Malformed);
        assert!(not_json.message.starts_with("the message is not JSON"), "{}", not_json.message);
        assert!(refused(b"[1]").message.contains("not a versioned JSON object"));
        assert!(refused(br#"{"type":"ping"}"#).message.contains("no protocol version"));
        assert_eq!(refused(br#"{"type":"launch","v":99}"#).code, ErrorCode::UnsupportedVersion);
        let unknown = refused(br#"{"v":1,"type":"launch_missiles"}"#);
        assert_eq!(unknown.code, ErrorCode::Malformed);
        assert!(unknown.message.starts_with("invalid request"), "{}", unknown.message);
        let unknown_field = br#"{"v":1,"type":"propose","certificate":"PEM","x":1,"request":{"provider":"aws","operation":"o","target":"t","params":{}}}"#;
        assert_eq!(refused(unknown_field).code, ErrorCode::Malformed);
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let mut oversized: &[u8] = &(MAX_MESSAGE as u32 + 1).to_be_bytes();
        assert!(matches!(read_frame(&mut oversized).await, Err(FrameError::TooLarge(_))));
        let mut truncated: &[u8] = &[0, 0, 0, 10, b'{'];
        assert!(matches!(read_frame(&mut truncated).await, Err(FrameError::Truncated(_))));
        let mut empty: &[u8] = &[];
        assert!(matches!(read_frame(&mut empty).await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn a_body_arrives_intact_across_many_reads_and_no_further() {
        let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let (mut client, mut server) = tokio::io::duplex(1 << 12);
        let sent = payload.clone();
        let writer = tokio::spawn(async move { client.write_all(&sent).await.unwrap() });
        let body = read_body(&mut server, payload.len() - 1).await.unwrap();
        assert_eq!(body, payload[..payload.len() - 1]);
        assert!(body.capacity() < payload.len() * 2);
        assert_eq!(read_body(&mut server, 1).await.unwrap(), payload[payload.len() - 1..]);
        writer.await.unwrap();
    }

    /// Counts the writes it is given.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.push(buf.to_vec());
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_frame_is_written_in_one_write_and_encoded_frames_read_back() {
        let mut writes = Writes::default();
        write_frame(&mut writes, b"{\"v\":1}").await.unwrap();
        assert_eq!(writes.0, [b"\0\0\0\x07{\"v\":1}".to_vec()], "one write: the peer wakes once per frame");

        let ping = Envelope { v: VERSION, body: Request::Ping };
        let frame = encode_frame(&ping).unwrap();
        let body = read_frame(&mut &frame[..]).await.unwrap();
        assert_eq!(serde_json::from_slice::<Envelope<Request>>(&body).unwrap().body, Request::Ping);
        assert_eq!(body.len() + 4, frame.len());
    }
}

//! The HTTPS executor against an internal API that demands mutual TLS, on a protected
//! loopback address in the sandbox's namespace: the broker mints a client certificate
//! per decision; the agent can neither connect nor present a certificate of its own.

use seb_agent::{
    admission::Reason,
    cert::{
        MutationRequest,
        contract::{ScopedIdentity, digest_of},
    },
    execute::{MintedIdentity, OutcomeStatus},
};
use seb_sandbox::{
    Sandbox, Tools,
    broker::{Broker, certified, this_process},
    mtls::{self, InternalApi},
};
use serde_json::json;

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

const API: &str = "127.0.0.3:9443";
const SUBJECT: &str = "seb-executor@config-service";

struct World {
    api: InternalApi,
    broker: Broker,
}

fn world(label: &str) -> World {
    let sandbox = Sandbox::new(label, tools()).unwrap();
    let api = mtls::start(&sandbox.netns, API.parse().unwrap(), &sandbox.dir).unwrap();
    let extra = format!(
        "[[enforcement.protected]]\ncidr = \"127.0.0.3\"\nport = 9443\nprotocol = \"tcp\"\n\n\
         [http]\ntrust_anchors = \"{}\"\nclient_ca_cert = \"{}\"\nclient_ca_key = \"{}\"\nclient_cert_ttl_seconds = 120\n\n\
         [passthrough]\nhttp_subject = \"seb-reader\"\nhttp_prefixes = [\"https://{API}/v1/\"]\nmints_per_uid_per_second = 5\n",
        api.server_ca.display(),
        api.client_ca.cert.display(),
        api.client_ca.key.display()
    );
    World { broker: Broker::start(sandbox, &extra, true).unwrap(), api }
}

fn put(body: serde_json::Value) -> MutationRequest {
    serde_json::from_value(json!({
        "provider": "http", "operation": "PUT", "target": format!("https://{API}/v1/config"), "params": {"body": body}
    }))
    .unwrap()
}

/// The canonical state the API shows for /v1/config (what a SAB certifies).
fn state(value: Option<&serde_json::Value>) -> String {
    match value {
        None => digest_of(&json!({"status": 404})),
        Some(body) => digest_of(&json!({"status": 200, "body": seb_agent::cert::contract::canonical_json(body)})),
    }
}

#[test]
fn a_certified_change_goes_through_with_a_client_certificate_minted_for_it() {
    let w = world("https");
    let body = json!({"replicas": 3});
    let request = put(body.clone());
    let role = ScopedIdentity::X509Client { subject: SUBJECT.into() };
    let decision =
        w.broker.decide(&certified("c-http-1", this_process(), &request, &state(None), role.clone()), &request);
    assert!(decision.admitted, "{decision:?}");
    let outcome = decision.outcome.clone().unwrap();
    assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.resulting_state_digest, Some(state(Some(&body))));
    let Some(MintedIdentity::X509Client { subject, decision_uri, not_after, .. }) = outcome.identity else {
        panic!("a client certificate is minted: {outcome:?}");
    };
    assert_eq!(subject, SUBJECT);
    assert_eq!(decision_uri, format!("urn:seb:decision:{}", decision.decision_id));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(not_after <= now + 120, "the certificate lives at most the configured 120 s");

    // The API saw exactly that certificate, and stored exactly the certified body.
    let seen = w.api.seen.lock().unwrap().clone();
    let put_seen = seen.iter().find(|s| s.method == "PUT").expect("the API saw the PUT");
    assert_eq!(put_seen.client_subject, SUBJECT);
    assert_eq!(put_seen.client_uris, vec![decision_uri]);
    let stored = w.api.store.lock().unwrap().get("/v1/config").cloned().unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&stored).unwrap(), body);

    // Certified against the state before that change: drift, and the API is not called.
    let stale = put(json!({"replicas": 5}));
    let decision = w.broker.decide(&certified("c-http-2", this_process(), &stale, &state(None), role.clone()), &stale);
    assert_eq!(decision.reason, Reason::Drift, "{decision:?}");
    assert_eq!(w.api.seen.lock().unwrap().iter().filter(|s| s.method == "PUT").count(), 1);

    // The API takes a write and then answers past what the broker reads: the change was
    // made, so the outcome is `unknown`, never `failed` (which an agent would retry).
    *w.api.write_answer_bytes.lock().unwrap() = Some(17 << 20);
    let change = put(json!({"replicas": 7}));
    let decision = w.broker.decide(&certified("c-http-3", this_process(), &change, &state(Some(&body)), role), &change);
    let outcome = decision.outcome.clone().unwrap_or_else(|| panic!("{decision:?}"));
    assert_eq!(outcome.status, OutcomeStatus::Unknown, "{outcome:?}");
    assert!(outcome.error.as_deref().is_some_and(|e| e.contains("may or may not")), "{outcome:?}");
    let stored = w.api.store.lock().unwrap().get("/v1/config").cloned().unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&stored).unwrap(), json!({"replicas": 7}));
}

#[test]
fn two_certificates_for_one_target_proposed_at_once_execute_one_after_the_other() {
    let w = world("httpsrace");
    let role = ScopedIdentity::X509Client { subject: SUBJECT.into() };
    let changes = [put(json!({"replicas": 3})), put(json!({"replicas": 5}))];
    let certificates: Vec<String> = changes
        .iter()
        .enumerate()
        .map(|(i, change)| {
            let contract = certified(&format!("c-http-race-{i}"), this_process(), change, &state(None), role.clone());
            w.broker.issue(&contract, &Default::default())
        })
        .collect();
    // Each drift read answered 400 ms late: without one execution at a time, both reads
    // see the certified (empty) state and both writes land.
    *w.api.read_delay.lock().unwrap() = std::time::Duration::from_millis(400);
    let decisions: Vec<_> = std::thread::scope(|s| {
        let proposing: Vec<_> = certificates
            .iter()
            .zip(&changes)
            .map(|(certificate, change)| s.spawn(|| w.broker.propose(certificate, change)))
            .collect();
        proposing.into_iter().map(|p| p.join().unwrap()).collect()
    });
    let executed: Vec<_> = decisions.iter().filter(|d| d.admitted).collect();
    assert_eq!(executed.len(), 1, "one executes, the other sees its result: {decisions:?}");
    let refused = decisions.iter().find(|d| !d.admitted).unwrap();
    assert_eq!(refused.reason, Reason::Drift, "{refused:?}");
    assert_eq!(w.api.seen.lock().unwrap().iter().filter(|s| s.method == "PUT").count(), 1);
}

/// A certificate refused for drift is not prepared again (minted for, read for) within
/// a second: a caller re-proposing it in a loop spends one mint and one read a second,
/// not as many as it can send.
#[test]
fn a_certificate_refused_for_drift_waits_a_second_before_it_is_prepared_again() {
    let w = world("httpsretry");
    let change = put(json!({"replicas": 4}));
    let role = ScopedIdentity::X509Client { subject: SUBJECT.into() };
    // Certified against a state the target is not in.
    let stale = state(Some(&json!({"replicas": 1})));
    let certificate =
        w.broker.issue(&certified("c-http-retry", this_process(), &change, &stale, role), &Default::default());
    let reads = || w.api.seen.lock().unwrap().iter().filter(|s| s.method == "GET").count();
    assert_eq!(w.broker.propose(&certificate, &change).reason, Reason::Drift);
    assert_eq!(reads(), 1);
    for _ in 0..5 {
        let again = w.broker.propose(&certificate, &change);
        assert_eq!(again.reason, Reason::LiveStateUnavailable, "{again:?}");
        assert!(again.message.contains("nothing was minted or read"), "{again:?}");
    }
    assert_eq!(reads(), 1, "re-proposed at once, the target was not read again");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(w.broker.propose(&certificate, &change).reason, Reason::Drift, "after a second it is checked again");
    assert_eq!(reads(), 2);
}

/// An answer after which the write may have been made (a gateway timeout, a redirection:
/// here the API did make it) is `unknown`, which an agent must not retry blindly; a refusal such as
/// a conflict, or a method the server does not implement, is `failed`.
#[test]
fn a_server_error_answer_is_unknown_and_a_refusal_failed() {
    let w = world("https5xx");
    let role = ScopedIdentity::X509Client { subject: SUBJECT.into() };
    let mut current: Option<serde_json::Value> = None;
    // 524: a CDN's timeout after it forwarded the request; 501: the method not handled;
    // 303: "see other" for a POST taken (nothing follows redirects).
    for (i, (code, expected)) in [
        (303, OutcomeStatus::Unknown),
        (504, OutcomeStatus::Unknown),
        (524, OutcomeStatus::Unknown),
        (501, OutcomeStatus::Failed),
        (409, OutcomeStatus::Failed),
    ]
    .into_iter()
    .enumerate()
    {
        let status = hyper::StatusCode::from_u16(code).unwrap();
        *w.api.write_status.lock().unwrap() = Some(status);
        let body = json!({"replicas": 20 + i});
        let change = put(body.clone());
        let contract =
            certified(&format!("c-http-5xx-{i}"), this_process(), &change, &state(current.as_ref()), role.clone());
        let decision = w.broker.decide(&contract, &change);
        let outcome = decision.outcome.clone().unwrap_or_else(|| panic!("{decision:?}"));
        assert_eq!((outcome.status, outcome.api_status), (expected, Some(status.as_u16())), "{outcome:?}");
        current = Some(body);
    }
}

/// A certificate valid when its proposal arrived, expired by the time the live state was
/// read (answered 9 s late), is not admitted: validity is checked again as the decision
/// is recorded.
#[test]
fn a_certificate_that_expires_while_its_proposal_waits_is_not_admitted() {
    let w = world("httpsexpiry");
    let change = put(json!({"replicas": 9}));
    let role = ScopedIdentity::X509Client { subject: SUBJECT.into() };
    let contract = certified("c-http-expiry", this_process(), &change, &state(None), role);
    // Valid, with the broker's 30 s of clock skew, until 6 s from now (whole seconds:
    // room for a loaded machine before the proposal arrives), read 9 s late.
    let ttl = std::time::Duration::from_secs(120);
    let options =
        seb_agent::cert::dev_sab::IssueOptions { ttl, start_offset_secs: -(120 + 30) + 6, ..Default::default() };
    let certificate = w.broker.issue(&contract, &options);
    *w.api.read_delay.lock().unwrap() = std::time::Duration::from_secs(9);
    let decision = w.broker.propose(&certificate, &change);
    assert!(!decision.admitted, "{decision:?}");
    assert_eq!(decision.reason, Reason::Expired, "{decision:?}");
    assert!(decision.message.contains("before the decision was recorded"), "{decision:?}");
    assert_eq!(w.api.seen.lock().unwrap().iter().filter(|s| s.method == "PUT").count(), 0, "nothing was written");
}

#[test]
fn the_agent_can_neither_connect_nor_authenticate_on_its_own() {
    let w = world("httpsagent");
    let outcome = w.broker.sandbox.attempt("workload", "tcp", API).unwrap();
    assert_eq!(outcome["result"], "EPERM", "{outcome}");

    // Even from outside enforcement, a client without a minted certificate is refused.
    let server_ca = w.api.server_ca.clone();
    let handshake = seb_sandbox::moto::in_netns(&w.broker.sandbox.netns, move || async move {
        use tokio_rustls::rustls::{
            RootCertStore,
            pki_types::{CertificateDer, ServerName, pem::PemObject},
        };
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_file_iter(&server_ca)? {
            roots.add(der?)?;
        }
        let config = seb_agent::execute::broker_http::tls_builder().with_root_certificates(roots).with_no_client_auth();
        let stream = tokio::net::TcpStream::connect(API).await?;
        let name = ServerName::try_from("127.0.0.3")?;
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, stream).await?;
        // TLS 1.3 reports a refused client certificate on the first read.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"GET /v1/config HTTP/1.1\r\nhost: x\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        Ok(tls.read(&mut buf).await.map(|n| n > 0))
    })
    .unwrap();
    assert!(!matches!(handshake, Ok(true)), "a client without a certificate must be refused: {handshake:?}");
    assert!(w.api.seen.lock().unwrap().is_empty(), "the API served nobody");
}

#[test]
fn passthrough_gets_are_served_with_a_reader_certificate_and_only_under_their_prefixes() {
    use seb_agent::protocol::{Request, Response};
    let w = world("httpsread");
    w.api.store.lock().unwrap().insert("/v1/config".into(), bytes::Bytes::from_static(br#"{"replicas":3}"#));
    let get = |target: &str| -> MutationRequest {
        serde_json::from_value(json!({"provider": "http", "operation": "GET", "target": target})).unwrap()
    };
    let Response::Read(result) = w.broker.call(Request::Read { request: get(&format!("https://{API}/v1/config")) })
    else {
        panic!("expected a read result");
    };
    assert_eq!(result.status, 200);
    assert_eq!(result.body.as_deref(), Some(r#"{"replicas":3}"#));
    assert_eq!(result.state_digest, state(Some(&json!({"replicas": 3}))));
    assert_eq!(w.api.seen.lock().unwrap().last().unwrap().client_subject, "seb-reader");

    let outside = w.broker.call(Request::Read { request: get(&format!("https://{API}/admin/keys")) });
    assert!(matches!(outside, Response::Error { .. }), "{outside:?}");
    assert_eq!(w.api.seen.lock().unwrap().len(), 1, "nothing outside the prefixes reached the API");

    // An answer no reply can carry (1 MiB at most) is refused, not sent to be dropped.
    let big = format!("\"{}\"", "\u{1}".repeat(200_000));
    w.api.store.lock().unwrap().insert("/v1/big".into(), bytes::Bytes::from(big));
    let refused = w.broker.call(Request::Read { request: get(&format!("https://{API}/v1/big")) });
    assert!(format!("{refused:?}").contains("more than one carries"), "{refused:?}");

    // Reads of one uid at once are bounded (each mints a credential): with the API
    // answering a second late, two of three concurrent reads are served, one is busy.
    *w.api.read_delay.lock().unwrap() = std::time::Duration::from_secs(1);
    let socket = w.broker.sandbox.socket.clone();
    let answers: Vec<Response> = std::thread::scope(|scope| {
        let reads: Vec<_> = (0..3)
            .map(|_| {
                let (socket, request) = (socket.clone(), get(&format!("https://{API}/v1/config")));
                scope.spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    runtime.block_on(seb_agent::protocol::call(&socket, &Request::Read { request })).unwrap()
                })
            })
            .collect();
        reads.into_iter().map(|read| read.join().unwrap()).collect()
    });
    let served = answers.iter().filter(|a| matches!(a, Response::Read(_))).count();
    let busy = answers.iter().filter(|a| format!("{a:?}").contains("passthrough reads under way")).count();
    assert_eq!((served, busy), (2, 1), "{answers:?}");

    // Five credentials a second (as this broker is configured) are minted for one uid's
    // reads; a read refused before its mint spends none.
    *w.api.read_delay.lock().unwrap() = std::time::Duration::ZERO;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let read = |target: &str| w.broker.call(Request::Read { request: get(&format!("https://{API}{target}")) });
    for i in 0..20 {
        let refused = read("/admin/keys");
        assert!(format!("{refused:?}").contains("Forbidden"), "{i}: {refused:?}");
    }
    let per_uid = 5; // passthrough.mints_per_uid_per_second
    let started = std::time::Instant::now();
    let answers: Vec<Response> = (0..=per_uid).map(|_| read("/v1/config")).collect();
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "slower than the window: {:?}", started.elapsed());
    assert!(answers[..per_uid].iter().all(|a| matches!(a, Response::Read(_))), "{answers:?}");
    let last = format!("{:?}", answers[per_uid]);
    assert!(last.contains("Busy") && last.contains("minted in the last second"), "{last}");
}

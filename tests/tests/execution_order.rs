//! The order of one AWS execution, seen from the API's side. A stand-in endpoint on a
//! protected address answers STS, the precondition read and the mutation, and looks into
//! the broker's audit store as each mutation arrives: the decision record must already be
//! committed. It also counts what the broker asked for: a denied proposal costs no STS
//! call, and the resulting state is read only for a contract with a postcondition.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::AsFd,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, service::service_fn};
use hyper_util::rt::TokioIo;
use seb_agent::{
    admission::{DECISION_KIND, Reason},
    cert::{MutationRequest, contract::ScopedIdentity, dev_sab::IssueOptions},
    execute::{OutcomeStatus, aws::AwsOperation},
};
use seb_sandbox::{
    Sandbox, Tools,
    broker::{Broker, certified, this_process},
    moto::put_object,
};
use serde_json::json;

const API: &str = "127.0.0.2:8443";
const ROLE: &str = "arn:aws:iam::123456789012:role/seb-executor";
const READER: &str = "arn:aws:iam::123456789012:role/seb-reader";
/// A role STS refuses to assume.
const UNASSUMABLE: &str = "arn:aws:iam::123456789012:role/unassumable";
const ABSENT: &str = "<Error><Code>NoSuchKey</Code><Message>absent</Message></Error>";

/// What the stand-in saw, in arrival order.
#[derive(Default)]
struct Seen {
    /// RoleSessionName of each AssumeRole.
    sessions: Vec<String>,
    /// Access key id issued to each session name.
    keys: HashMap<String, String>,
    reads: usize,
    /// For each mutation: whether its decision was a committed, admitted record when it
    /// arrived.
    mutations: Vec<bool>,
}

/// Serve the stand-in on `API` inside `netns`, checking mutations against `database`.
fn stand_in(netns: &str, database: PathBuf) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (path, state) = (format!("/run/netns/{netns}"), seen.clone());
    let (ready, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(std::fs::File::open(&path).unwrap().as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(API.parse::<SocketAddr>().unwrap()).await.unwrap();
            ready.send(()).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (state, database) = (state.clone(), database.clone());
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (state, database) = (state.clone(), database.clone());
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(answer(&state, &database, Request::from_parts(parts, body)))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
    });
    listening.recv().unwrap();
    seen
}

fn answer(seen: &Mutex<Seen>, database: &PathBuf, request: Request<Bytes>) -> Response<Full<Bytes>> {
    let mut seen = seen.lock().unwrap();
    let reply = |status: u16, body: String| Response::builder().status(status).body(Full::from(body)).unwrap();
    match request.method().as_str() {
        "POST" => {
            let form: HashMap<String, String> = form_urlencoded::parse(request.body()).into_owned().collect();
            assert_eq!(form.get("Action").map(String::as_str), Some("AssumeRole"), "{form:?}");
            if form["RoleArn"] == UNASSUMABLE {
                return reply(403, "<ErrorResponse><Error><Code>AccessDenied</Code></Error></ErrorResponse>".into());
            }
            let name = form["RoleSessionName"].clone();
            let key = format!("ASIA{:016}", seen.sessions.len());
            seen.sessions.push(name.clone());
            seen.keys.insert(key.clone(), name);
            reply(
                200,
                format!(
                    "<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>{key}</AccessKeyId>\
                     <SecretAccessKey>secret</SecretAccessKey><SessionToken>token</SessionToken>\
                     <Expiration>2099-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>"
                ),
            )
        }
        "GET" => {
            seen.reads += 1;
            reply(404, ABSENT.into())
        }
        "PUT" => {
            let authorization = request.headers()["authorization"].to_str().unwrap();
            let key = authorization.split("Credential=").nth(1).unwrap().split('/').next().unwrap();
            let decision_id = seen.keys[key].strip_prefix("seb-").unwrap().to_string();
            let recorded = committed_admission(database, &decision_id);
            seen.mutations.push(recorded);
            reply(200, String::new())
        }
        other => panic!("unexpected {other} {}", request.uri()),
    }
}

/// Whether the audit store holds a committed record admitting `decision_id` (another
/// connection sees only committed transactions).
fn committed_admission(database: &PathBuf, decision_id: &str) -> bool {
    let conn = rusqlite::Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    conn.query_row(
        "SELECT count(*) FROM records WHERE kind = ?1 AND json_extract(body, '$.decision_id') = ?2 \
         AND json_extract(body, '$.admitted')",
        rusqlite::params![DECISION_KIND, decision_id],
        |row| row.get::<_, i64>(0),
    )
    .unwrap()
        == 1
}

/// The digest the broker computes for the stand-in's answer to a precondition read.
fn absent_digest(request: &MutationRequest) -> String {
    let response = http::Response::builder().status(404).body(Bytes::from(ABSENT)).unwrap();
    AwsOperation::parse(request).unwrap().precondition.digest(&response).unwrap()
}

#[test]
fn the_decision_is_durable_before_the_mutation_and_a_denial_costs_no_sts_call() {
    let sandbox = Sandbox::new("execorder", Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))).unwrap();
    let seen = stand_in(&sandbox.netns, sandbox.database.clone());
    let credentials = sandbox.dir.join("aws-broker.json");
    std::fs::write(&credentials, r#"{"access_key_id":"AKIDBROKER","secret_access_key":"secret"}"#).unwrap();
    let extra = format!(
        "[[enforcement.protected]]\ncidr = \"127.0.0.2\"\nport = 8443\nprotocol = \"tcp\"\n\n\
         [aws]\nendpoint = \"http://{API}\"\ncredentials_file = \"{}\"\nread_role_arn = \"{READER}\"\n",
        credentials.display()
    );
    let broker = Broker::start(sandbox, &extra, true).unwrap();
    let role = ScopedIdentity::AwsRole { role_arn: ROLE.into() };

    // Several executions, each mutation arriving only after its decision is on disk.
    let mut certificates = Vec::new();
    for i in 0..5 {
        let request = put_object("seb-demo", &format!("config/{i}.json"), "x");
        let contract =
            certified(&format!("c-order-{i}"), this_process(), &request, &absent_digest(&request), role.clone());
        let certificate = broker.issue(&contract, &IssueOptions::default());
        let decision = broker.propose(&certificate, &request);
        assert!(decision.admitted, "{decision:?}");
        let outcome = decision.outcome.expect("an outcome");
        assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{outcome:?}");
        assert_eq!(outcome.resulting_state_digest, None);
        certificates.push((certificate, request));
    }
    let (sessions, reads) = {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.mutations, vec![true; 5], "a mutation arrived before its decision record was committed");
        // One kept session of the read role, then one session per mutation.
        assert_eq!(seen.sessions.len(), 6, "{:?}", seen.sessions);
        let readers = seen.sessions.iter().filter(|name| *name == "seb-broker-reader").count();
        assert_eq!(readers, 1, "{:?}", seen.sessions);
        // Only the precondition is read: none of these contracts has a postcondition.
        assert_eq!(seen.reads, 5, "the resulting state is read only for a postcondition");
        (seen.sessions.len(), seen.reads)
    };

    // Replayed certificates are denied before anything is minted or read.
    for (certificate, request) in &certificates {
        let decision = broker.propose(certificate, request);
        assert_eq!(decision.reason, Reason::Replayed, "{decision:?}");
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.sessions.len(),
            sessions,
            "a replayed certificate made the broker call STS: {:?}",
            seen.sessions
        );
        assert_eq!(seen.reads, reads, "a replayed certificate made the broker read");
        assert_eq!(seen.mutations.len(), 5);
    }

    // A contract with a postcondition: the resulting state is read after the mutation.
    let request = seb_agent::execute::aws::preset::request(
        "s3:PutObject",
        "arn:aws:s3:::seb-demo/config/post.json",
        &json!({"body": "x", "postcondition": true}),
    )
    .unwrap();
    let contract = certified("c-order-post", this_process(), &request, &absent_digest(&request), role);
    let decision = broker.decide(&contract, &request);
    let outcome = decision.outcome.expect("an outcome");
    assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.resulting_state_digest, Some(absent_digest(&request)));
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.reads, reads + 2, "precondition and postcondition");
        assert_eq!(seen.mutations, vec![true; 6]);
    }

    // A session STS refuses: not admitted (the certificate stays unused), nothing sent.
    let request = put_object("seb-demo", "config/refused.json", "x");
    let refused = ScopedIdentity::AwsRole { role_arn: UNASSUMABLE.into() };
    let contract = certified("c-order-refused", this_process(), &request, &absent_digest(&request), refused);
    let decision = broker.decide(&contract, &request);
    assert!(!decision.admitted, "{decision:?}");
    assert_eq!(decision.reason, Reason::LiveStateUnavailable, "{decision:?}");
    assert!(decision.message.contains("minting the scoped identity failed"), "{decision:?}");
    assert_eq!(seen.lock().unwrap().mutations.len(), 6, "nothing is sent without a session");
}

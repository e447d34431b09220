//! moto, the AWS API emulator, as the sandbox's production API: started inside the
//! sandbox's network namespace on a loopback address, with SigV4 and IAM enforced after
//! a fixed number of unauthenticated set-up actions.

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use seb_agent::execute::{
    aws::{AwsCredentials, operation::ServiceCall, sign::sign_request, xml::Element},
    broker_http::exchange,
};
use serde_json::json;

/// How many unauthenticated actions `seed` takes; IAM is enforced from the next one on.
const SEED_ACTIONS: u32 = 21;
pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";
/// A role whose attached policies the executor role may change.
pub const TARGET_ROLE: &str = "app-service";
/// A managed policy the executor may attach to it.
pub const ATTACHABLE_POLICY: &str = "arn:aws:iam::123456789012:policy/app-extra";

/// The AWS world the tests and the demo work in.
#[derive(Debug, Clone)]
pub struct AwsWorld {
    pub endpoint: String,
    /// The broker's base identity: may only assume the executor role.
    pub broker: AwsCredentials,
    /// The AI agent's own identity: may read, not mutate.
    pub agent: AwsCredentials,
    /// The assurance authority's read identity, for computing preconditions.
    pub sab: AwsCredentials,
    /// Long-lived credentials allowed to write the bucket: the baseline a broker is
    /// compared against.
    pub static_writer: AwsCredentials,
    pub role_arn: String,
    /// A read-only role, for passthrough reads.
    pub reader_role_arn: String,
    /// A bucket the executor role may write to, and one it may not.
    pub bucket: String,
    pub other_bucket: String,
    pub security_group: String,
}

pub struct Moto {
    child: Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start moto in `netns` listening on `addr`, and wait until it accepts connections.
pub fn start(netns: &str, addr: SocketAddr) -> Result<Moto> {
    let child = Command::new("ip")
        .args(["netns", "exec", netns, "moto_server", "-H", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", SEED_ACTIONS.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting moto_server (pip install 'moto[server]')")?;
    let moto = Moto { child };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !in_netns(netns, move || async move { Ok(tokio::net::TcpStream::connect(addr).await.is_ok()) })? {
        ensure!(Instant::now() < deadline, "moto did not start listening on {addr} within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(moto)
}

/// Run an async job on a thread inside the namespace (setns moves only that thread).
pub fn in_netns<T, F, Fut>(netns: &str, job: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || -> Result<T> {
        let ns = std::fs::File::open(&path)?;
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(job())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

/// One signed AWS call from inside the namespace, over a plain (unregistered) socket.
pub fn call(
    netns: &str,
    endpoint: &str,
    call: ServiceCall,
    credentials: &AwsCredentials,
) -> Result<http::Response<Bytes>> {
    let service = call.service;
    let mut request = call.into_request(endpoint)?;
    sign_request(&mut request, credentials, service, REGION)?;
    let authority = request.uri().authority().context("no authority")?.to_string();
    in_netns(netns, move || async move {
        let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
        exchange(stream, request).await
    })
}

fn query(
    netns: &str,
    endpoint: &str,
    service: &'static str,
    params: &[(&str, &str)],
    credentials: &AwsCredentials,
) -> Result<Element> {
    let params: Vec<(&str, String)> = params.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let response = call(netns, endpoint, ServiceCall::query(service, &params), credentials)?;
    if !response.status().is_success() {
        bail!("{service} {:?}: {}", params.first(), seb_agent::execute::aws::operation::api_error(&response));
    }
    Element::parse(response.body())
}

/// Create users, keys, the executor role, buckets and a security group, in exactly
/// `SEED_ACTIONS` unauthenticated actions.
pub fn seed(netns: &str, endpoint: &str) -> Result<AwsWorld> {
    let anyone = AwsCredentials { access_key_id: "seed".into(), secret_access_key: "seed".into(), session_token: None };
    let iam = |params: &[(&str, &str)]| {
        query(netns, endpoint, "iam", &[&[("Version", "2010-05-08")], params].concat(), &anyone)
    };
    let role_arn = format!("arn:aws:iam::{ACCOUNT}:role/seb-executor");
    let (bucket, other_bucket) = ("seb-demo".to_string(), "seb-other".to_string());
    let user = |name: &str, policy: serde_json::Value| -> Result<AwsCredentials> {
        iam(&[("Action", "CreateUser"), ("UserName", name)])?;
        let key = iam(&[("Action", "CreateAccessKey"), ("UserName", name)])?;
        let key = key.at(&["CreateAccessKeyResult", "AccessKey"]).context("no access key")?;
        iam(&[
            ("Action", "PutUserPolicy"),
            ("UserName", name),
            ("PolicyName", "only"),
            ("PolicyDocument", &policy.to_string()),
        ])?;
        Ok(AwsCredentials {
            access_key_id: key.text_at(&["AccessKeyId"]).context("no key id")?,
            secret_access_key: key.text_at(&["SecretAccessKey"]).context("no secret")?,
            session_token: None,
        })
    };
    let allow = |actions: &[&str], resource: &str| json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resource}]});
    let broker = user("seb-broker", allow(&["sts:AssumeRole"], &format!("arn:aws:iam::{ACCOUNT}:role/seb-*")))?;
    let agent = user("ai-agent", allow(&["s3:GetObject", "ec2:Describe*"], "*"))?;
    let sab = user("sab-reader", allow(&["s3:GetObject", "s3:GetBucketPolicy", "ec2:Describe*", "iam:List*"], "*"))?;
    let static_writer = user("static-writer", allow(&["s3:PutObject"], &format!("arn:aws:s3:::{bucket}/*")))?;
    let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:user/seb-broker")}, "Action": "sts:AssumeRole"}]});
    iam(&[("Action", "CreateRole"), ("RoleName", "seb-executor"), ("AssumeRolePolicyDocument", &trust.to_string())])?;
    let role_policy = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject", "s3:DeleteObject"], "Resource": format!("arn:aws:s3:::{bucket}/*")},
        {"Effect": "Allow", "Action": ["s3:PutBucketPolicy", "s3:GetBucketPolicy"], "Resource": format!("arn:aws:s3:::{bucket}")},
        {"Effect": "Allow", "Action": ["ec2:AuthorizeSecurityGroupIngress", "ec2:RevokeSecurityGroupIngress", "ec2:DescribeSecurityGroups"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["iam:AttachRolePolicy", "iam:DetachRolePolicy", "iam:ListAttachedRolePolicies"], "Resource": format!("arn:aws:iam::{ACCOUNT}:role/{TARGET_ROLE}")}
    ]});
    iam(&[
        ("Action", "PutRolePolicy"),
        ("RoleName", "seb-executor"),
        ("PolicyName", "executor"),
        ("PolicyDocument", &role_policy.to_string()),
    ])?;
    iam(&[("Action", "CreateRole"), ("RoleName", TARGET_ROLE), ("AssumeRolePolicyDocument", &trust.to_string())])?;
    let extra = allow(&["s3:ListBucket"], "*").to_string();
    iam(&[("Action", "CreatePolicy"), ("PolicyName", "app-extra"), ("PolicyDocument", &extra)])?;
    let reader_role_arn = format!("arn:aws:iam::{ACCOUNT}:role/seb-reader");
    iam(&[("Action", "CreateRole"), ("RoleName", "seb-reader"), ("AssumeRolePolicyDocument", &trust.to_string())])?;
    let read_policy = allow(&["s3:GetObject", "s3:GetBucketPolicy", "ec2:Describe*", "iam:List*"], "*");
    iam(&[
        ("Action", "PutRolePolicy"),
        ("RoleName", "seb-reader"),
        ("PolicyName", "reader"),
        ("PolicyDocument", &read_policy.to_string()),
    ])?;
    for name in [&bucket, &other_bucket] {
        let create = ServiceCall {
            service: "s3",
            method: http::Method::PUT,
            path: format!("/{name}"),
            body: Bytes::new(),
            content_type: None,
        };
        let response = call(netns, endpoint, create, &anyone)?;
        ensure!(response.status().is_success(), "creating bucket {name}: {}", response.status());
    }
    let group = query(
        netns,
        endpoint,
        "ec2",
        &[
            ("Action", "CreateSecurityGroup"),
            ("Version", "2016-11-15"),
            ("GroupName", "seb-demo"),
            ("GroupDescription", "seb demo"),
        ],
        &anyone,
    )?;
    let security_group = group.text_at(&["groupId"]).context("no security group id")?;
    Ok(AwsWorld {
        endpoint: endpoint.into(),
        broker,
        agent,
        sab,
        static_writer,
        role_arn,
        reader_role_arn,
        bucket,
        other_bucket,
        security_group,
    })
}

/// What the SAB does before certifying: read the target's live state and digest it.
pub fn live_digest(netns: &str, world: &AwsWorld, request: &seb_agent::cert::MutationRequest) -> Result<String> {
    let operation = seb_agent::execute::aws::AwsOperation::parse(request)?;
    let response = call(netns, &world.endpoint, operation.state_read(), &world.sab)?;
    Ok(seb_agent::execute::aws::operation::state_digest(&operation.canonical_state(&response)?))
}

/// `s3:PutObject` of `body` at `bucket/key`.
pub fn put_object(bucket: &str, key: &str, body: &str) -> seb_agent::cert::MutationRequest {
    serde_json::from_value(json!({
        "provider": "aws", "operation": "s3:PutObject",
        "target": format!("arn:aws:s3:::{bucket}/{key}"), "params": {"body": body}
    }))
    .expect("valid request")
}

/// `ec2:AuthorizeSecurityGroupIngress` of tcp/`port` from 10.0.0.0/8.
pub fn authorize_ingress(group: &str, port: u16) -> seb_agent::cert::MutationRequest {
    serde_json::from_value(json!({
        "provider": "aws", "operation": "ec2:AuthorizeSecurityGroupIngress",
        "target": format!("arn:aws:ec2:{REGION}:{ACCOUNT}:security-group/{group}"),
        "params": {"ip_permissions": [{"protocol": "tcp", "from_port": port, "to_port": port, "cidrs": ["10.0.0.0/8"]}]}
    }))
    .expect("valid request")
}

//! moto, the AWS API emulator, as the sandbox's production API: started inside the
//! sandbox's network namespace on a loopback address, with SigV4 and IAM enforced after
//! a fixed number of unauthenticated set-up actions.

use std::{
    net::SocketAddr,
    os::fd::AsFd,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use seb_agent::{
    cert::MutationRequest,
    execute::{
        aws::{
            AwsCredentials, AwsOperation, canonical, preset,
            request::{AwsCall, api_error},
            sign::sign_request,
        },
        broker_http::exchange,
    },
};
use serde_json::{Value, json};

/// How many unauthenticated actions `seed` takes; IAM is enforced from the next one on.
const SEED_ACTIONS: u32 = 24;
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
    /// Allowed everything: changes made "by another path" than the broker.
    pub admin: AwsCredentials,
    pub role_arn: String,
    /// A read-only role, for passthrough reads.
    pub reader_role_arn: String,
    /// A bucket the executor role may write to, and one it may not.
    pub bucket: String,
    pub other_bucket: String,
    pub security_group: String,
    /// A second security group, for group-pair rules.
    pub peer_group: String,
    pub table: String,
    pub queue_url: String,
    pub parameter: String,
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

/// Sign and send one request for `service` from inside the namespace, over a plain
/// (unregistered) socket.
pub fn send(
    netns: &str,
    mut request: http::Request<Bytes>,
    service: &str,
    credentials: &AwsCredentials,
) -> Result<http::Response<Bytes>> {
    sign_request(&mut request, credentials, service, REGION)?;
    let authority = request.uri().authority().context("no authority")?.to_string();
    in_netns(netns, move || async move {
        let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
        exchange(stream, request).await
    })
}

/// One certified call (a mutation or a read), signed with `credentials`.
pub fn call(
    netns: &str,
    endpoint: &str,
    call: &AwsCall,
    credentials: &AwsCredentials,
) -> Result<http::Response<Bytes>> {
    send(netns, call.http_request(endpoint)?, &call.service, credentials)
}

fn request(
    endpoint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Result<http::Request<Bytes>> {
    let uri: http::Uri = format!("{endpoint}{path}").parse()?;
    let mut builder = http::Request::builder()
        .method(method)
        .header(http::header::HOST, uri.authority().context("no authority")?.as_str())
        .header(http::header::CONTENT_LENGTH, body.len());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    Ok(builder.uri(uri).body(Bytes::from(body))?)
}

/// A query-protocol call; the response as JSON (see `canonical::xml_to_json`).
pub fn query(
    netns: &str,
    endpoint: &str,
    service: &str,
    form: &[(&str, &str)],
    credentials: &AwsCredentials,
) -> Result<Value> {
    let content = [("content-type", "application/x-www-form-urlencoded; charset=utf-8")];
    let http = request(endpoint, "POST", "/", &content, preset::query_body(form))?;
    let response = send(netns, http, service, credentials)?;
    ensure!(response.status().is_success(), "{service} {form:?}: {}", api_error(&response));
    canonical::xml_to_json(response.body())
}

/// A JSON-protocol call (`target` is the X-Amz-Target); the response body.
pub fn json_call(
    netns: &str,
    endpoint: &str,
    service: &str,
    target: &str,
    body: &Value,
    credentials: &AwsCredentials,
) -> Result<Value> {
    let headers = [("x-amz-target", target), ("content-type", "application/x-amz-json-1.0")];
    let response = send(netns, request(endpoint, "POST", "/", &headers, body.to_string())?, service, credentials)?;
    ensure!(response.status().is_success(), "{target}: {}", api_error(&response));
    canonical::decode(response.body(), canonical::Decode::Json)
}

fn text(value: &Value, pointer: &str) -> Result<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("no {pointer} in {value}"))
}

/// Create users, keys, the executor and reader roles, buckets and a security group, in
/// exactly `SEED_ACTIONS` unauthenticated actions; then, as an administrator, a DynamoDB
/// table, an SQS queue and an SSM parameter.
pub fn seed(netns: &str, endpoint: &str) -> Result<AwsWorld> {
    let anyone = AwsCredentials { access_key_id: "seed".into(), secret_access_key: "seed".into(), session_token: None };
    let iam =
        |form: &[(&str, &str)]| query(netns, endpoint, "iam", &[&[("Version", "2010-05-08")], form].concat(), &anyone);
    let role_arn = format!("arn:aws:iam::{ACCOUNT}:role/seb-executor");
    let (bucket, other_bucket) = ("seb-demo".to_string(), "seb-other".to_string());
    let user = |name: &str, policy: Value| -> Result<AwsCredentials> {
        iam(&[("Action", "CreateUser"), ("UserName", name)])?;
        let key = iam(&[("Action", "CreateAccessKey"), ("UserName", name)])?;
        let key =
            |field: &str| text(&key, &format!("/CreateAccessKeyResponse/CreateAccessKeyResult/AccessKey/{field}"));
        let credentials = AwsCredentials {
            access_key_id: key("AccessKeyId")?,
            secret_access_key: key("SecretAccessKey")?,
            session_token: None,
        };
        iam(&[
            ("Action", "PutUserPolicy"),
            ("UserName", name),
            ("PolicyName", "only"),
            ("PolicyDocument", &policy.to_string()),
        ])?;
        Ok(credentials)
    };
    let allow = |actions: &[&str], resource: &str| json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resource}]});
    let broker = user("seb-broker", allow(&["sts:AssumeRole"], &format!("arn:aws:iam::{ACCOUNT}:role/seb-*")))?;
    let agent = user("ai-agent", allow(&["s3:GetObject", "ec2:Describe*"], "*"))?;
    let sab = user("sab-reader", allow(READS, "*"))?;
    let static_writer = user("static-writer", allow(&["s3:PutObject", "dynamodb:PutItem"], "*"))?;
    let admin = user("admin", allow(&["*"], "*"))?;
    let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{ACCOUNT}:user/seb-broker")}, "Action": "sts:AssumeRole"}]});
    iam(&[("Action", "CreateRole"), ("RoleName", "seb-executor"), ("AssumeRolePolicyDocument", &trust.to_string())])?;
    let role_policy = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject", "s3:DeleteObject"], "Resource": format!("arn:aws:s3:::{bucket}/*")},
        {"Effect": "Allow", "Action": ["s3:PutBucketPolicy", "s3:GetBucketPolicy"], "Resource": format!("arn:aws:s3:::{bucket}")},
        {"Effect": "Allow", "Action": ["ec2:AuthorizeSecurityGroupIngress", "ec2:RevokeSecurityGroupIngress", "ec2:DescribeSecurityGroups"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["iam:AttachRolePolicy", "iam:DetachRolePolicy", "iam:ListAttachedRolePolicies"], "Resource": format!("arn:aws:iam::{ACCOUNT}:role/{TARGET_ROLE}")},
        {"Effect": "Allow", "Action": ["dynamodb:PutItem", "dynamodb:GetItem", "sqs:SetQueueAttributes", "sqs:GetQueueAttributes",
            "ssm:PutParameter", "ssm:GetParameter"], "Resource": "*"}
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
    let read_policy = allow(READS, "*");
    iam(&[
        ("Action", "PutRolePolicy"),
        ("RoleName", "seb-reader"),
        ("PolicyName", "reader"),
        ("PolicyDocument", &read_policy.to_string()),
    ])?;
    for name in [&bucket, &other_bucket] {
        let response = send(netns, request(endpoint, "PUT", &format!("/{name}"), &[], String::new())?, "s3", &anyone)?;
        ensure!(response.status().is_success(), "creating bucket {name}: {}", response.status());
    }
    // (No spaces in signed form values: moto re-encodes them as `+` before checking signatures.)
    fn ec2(name: &str) -> [(&str, &str); 4] {
        [("Version", "2016-11-15"), ("Action", "CreateSecurityGroup"), ("GroupDescription", name), ("GroupName", name)]
    }
    let group = query(netns, endpoint, "ec2", &ec2("seb-demo"), &anyone)?;
    let security_group = text(&group, "/CreateSecurityGroupResponse/groupId")?;

    // IAM is enforced from here on.
    let peer = query(netns, endpoint, "ec2", &ec2("seb-peer"), &admin)?;
    let peer_group = text(&peer, "/CreateSecurityGroupResponse/groupId")?;
    let table = "seb-table".to_string();
    json_call(
        netns,
        endpoint,
        "dynamodb",
        "DynamoDB_20120810.CreateTable",
        &json!({
        "TableName": table, "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [{"AttributeName": "id", "AttributeType": "S"}],
        "KeySchema": [{"AttributeName": "id", "KeyType": "HASH"}]}),
        &admin,
    )?;
    let queue = json_call(netns, endpoint, "sqs", "AmazonSQS.CreateQueue", &json!({"QueueName": "seb-queue"}), &admin)?;
    let queue_url = text(&queue, "/QueueUrl")?;
    let parameter = "/seb/config".to_string();
    json_call(
        netns,
        endpoint,
        "ssm",
        "AmazonSSM.PutParameter",
        &json!({"Name": parameter, "Value": "replicas=3", "Type": "String"}),
        &admin,
    )?;
    Ok(AwsWorld {
        endpoint: endpoint.into(),
        broker,
        agent,
        sab,
        static_writer,
        admin,
        role_arn,
        reader_role_arn,
        bucket,
        other_bucket,
        security_group,
        peer_group,
        table,
        queue_url,
        parameter,
    })
}

/// What the SAB and the broker's read identity may read.
const READS: &[&str] = &[
    "s3:GetObject",
    "s3:GetBucketPolicy",
    "ec2:Describe*",
    "iam:List*",
    "dynamodb:GetItem",
    "sqs:GetQueueAttributes",
    "ssm:GetParameter",
];

/// What the SAB does before certifying: read the target's live state and digest it.
pub fn live_digest(netns: &str, world: &AwsWorld, request: &MutationRequest) -> Result<String> {
    let read = AwsOperation::parse(request)?.precondition;
    read.digest(&call(netns, &world.endpoint, &read.call, &world.sab)?)
}

/// The session policies moto received with each AssumeRole, by session name. moto does
/// not enforce session policies, so tests check what the broker asked for.
pub fn session_policies(netns: &str, endpoint: &str) -> Result<Vec<(String, Option<Value>)>> {
    let http = request(endpoint, "GET", "/moto-api/data.json", &[], String::new())?;
    let authority = http.uri().authority().context("no authority")?.to_string();
    let response = in_netns(netns, move || async move {
        exchange(tokio::net::TcpStream::connect(authority.as_str()).await?, http).await
    })?;
    let data: Value = serde_json::from_slice(response.body()).context("moto's model data")?;
    let sessions =
        data.pointer("/sts/AssumedRole").and_then(Value::as_array).context("no STS sessions in moto's data")?;
    sessions
        .iter()
        .map(|s| {
            let policy = s["policy"].as_str().map(serde_json::from_str).transpose()?;
            Ok((s["session_name"].as_str().unwrap_or_default().to_string(), policy))
        })
        .collect()
}

/// `s3:PutObject` of `body` at `bucket/key` (preset).
pub fn put_object(bucket: &str, key: &str, body: &str) -> MutationRequest {
    preset::request("s3:PutObject", &format!("arn:aws:s3:::{bucket}/{key}"), &json!({"body": body}))
        .expect("valid preset")
}

/// `ec2:AuthorizeSecurityGroupIngress` of tcp/`port` from 10.0.0.0/8 (preset).
pub fn authorize_ingress(group: &str, port: u16) -> MutationRequest {
    let target = format!("arn:aws:ec2:{REGION}:{ACCOUNT}:security-group/{group}");
    let rule =
        json!({"ip_permissions": [{"protocol": "tcp", "from_port": port, "to_port": port, "cidrs": ["10.0.0.0/8"]}]});
    preset::request("ec2:AuthorizeSecurityGroupIngress", &target, &rule).expect("valid preset")
}

/// A JSON-protocol mutation with a JSON-protocol precondition read, written out in full:
/// what a contract for any AWS API looks like.
pub fn json_request(
    action: &str,
    target: &str,
    x_amz_target: &str,
    body: Value,
    read: (&str, &str, Value),
    volatile: &[&str],
) -> MutationRequest {
    let (read_action, read_target, read_body) = read;
    let headers = |target: &str| json!({"x-amz-target": target, "content-type": "application/x-amz-json-1.0"});
    serde_json::from_value(json!({
        "provider": "aws", "operation": action, "target": target,
        "params": {
            "protocol": "json",
            "request": {"method": "POST", "path": "/", "headers": headers(x_amz_target), "body": body.to_string()},
            "precondition": {"action": read_action, "protocol": "json",
                "request": {"method": "POST", "path": "/", "headers": headers(read_target), "body": read_body.to_string()},
                "volatile": volatile}
        }
    }))
    .expect("valid request")
}

/// `dynamodb:PutItem` of `item` into `table`, certified against GetItem of its key `id`.
pub fn put_item(table: &str, item: Value) -> MutationRequest {
    let key = json!({"id": item["id"].clone()});
    json_request(
        "dynamodb:PutItem",
        &format!("arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{table}"),
        "DynamoDB_20120810.PutItem",
        json!({"TableName": table, "Item": item}),
        (
            "dynamodb:GetItem",
            "DynamoDB_20120810.GetItem",
            json!({"TableName": table, "Key": key, "ConsistentRead": true}),
        ),
        &[],
    )
}

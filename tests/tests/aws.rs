//! Any AWS API under a certified request, against one moto (SigV4 and IAM enforced) shared
//! by the whole file: S3 (rest-xml), EC2 and IAM (query), DynamoDB, SQS and SSM (json).
//! For each service: the broker executes the certified request with a session minted for
//! it, and the session policy it asked STS for is exactly the certified action on the
//! certified resources; a change made by another path, to any field the precondition
//! read returns, is `drift` and nothing is executed.

use seb_agent::{
    admission::{Decision, Reason},
    cert::{ExecutionContract, MutationRequest, contract::ScopedIdentity},
    execute::{
        OutcomeStatus,
        aws::{AwsOperation, preset},
    },
};
use seb_sandbox::{
    Sandbox, Tools,
    broker::{Broker, certified, this_process},
    moto::{self, ACCOUNT, AwsWorld, Moto, REGION},
};
use serde_json::{Value, json};

const API: &str = "127.0.0.2:8443";

struct World {
    // Declared first so moto stops before the sandbox goes.
    _moto: Moto,
    broker: Broker,
    aws: AwsWorld,
    /// Each session minted, with the session policy it must have carried.
    minted: std::cell::RefCell<Vec<(String, Value)>>,
    /// The policy of each agent-written (full-form) precondition read: the read role's
    /// session for it must be narrowed to the target.
    narrowed_reads: std::cell::RefCell<Vec<Value>>,
}

fn world() -> World {
    let sandbox = Sandbox::new("awsapis", Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))).unwrap();
    let moto = moto::start(&sandbox.netns, API.parse().unwrap()).unwrap();
    let aws = moto::seed(&sandbox.netns, &format!("http://{API}")).unwrap();
    let credentials = sandbox.dir.join("aws-broker.json");
    std::fs::write(&credentials, serde_json::to_string(&aws.broker).unwrap()).unwrap();
    let extra = format!(
        "[[enforcement.protected]]\ncidr = \"127.0.0.2\"\nport = 8443\nprotocol = \"tcp\"\n\n\
         [aws]\nendpoint = \"http://{API}\"\ncredentials_file = \"{}\"\nread_role_arn = \"{}\"\n",
        credentials.display(),
        aws.reader_role_arn
    );
    World {
        _moto: moto,
        broker: Broker::start(sandbox, &extra, true).unwrap(),
        aws,
        minted: Default::default(),
        narrowed_reads: Default::default(),
    }
}

impl World {
    fn netns(&self) -> &str {
        &self.broker.sandbox.netns
    }

    fn live_digest(&self, request: &MutationRequest) -> String {
        moto::live_digest(self.netns(), &self.aws, request).unwrap()
    }

    fn contract(&self, request: &MutationRequest) -> ExecutionContract {
        let role = ScopedIdentity::AwsRole { role_arn: self.aws.role_arn.clone() };
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let id = format!("c-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        certified(&id, this_process(), request, &self.live_digest(request), role)
    }

    /// Certified against the live state, executed (its session policy is checked at the end).
    #[track_caller]
    fn executes(&self, request: &MutationRequest) {
        let decision = self.broker.decide(&self.contract(request), request);
        let outcome =
            decision.outcome.as_ref().unwrap_or_else(|| panic!("{} not executed: {decision:?}", request.operation));
        assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{}: {outcome:?}", request.operation);
        let resources = request.params.get("resources").cloned().unwrap_or_else(|| json!([request.target]));
        let mut statement = json!({"Effect": "Allow", "Action": [request.operation], "Resource": resources});
        if let Some(condition) = request.params.get("condition") {
            statement["Condition"] = condition.clone();
        }
        let policy = json!({"Version": "2012-10-17", "Statement": [statement]});
        self.minted.borrow_mut().push((format!("seb-{}", decision.decision_id), policy));
        let read = request.params.get("precondition").filter(|read| {
            // The broker's own (preset) reads may use the kept session; the agent's may not.
            let preset = read["action"].as_str().and_then(|action| preset::read(action, &request.target).ok());
            preset.is_none_or(|preset| serde_json::to_value(preset).unwrap() != **read)
        });
        if let Some(read) = read {
            let statement = json!({"Effect": "Allow", "Action": [read["action"]], "Resource": [request.target]});
            self.narrowed_reads.borrow_mut().push(json!({"Version": "2012-10-17", "Statement": [statement]}));
        }
    }

    /// The session policy STS received for each mutation is exactly the certified action
    /// on the certified resources (read from moto once: its model dump is slow).
    fn check_session_policies(&self) {
        let received = moto::session_policies(self.netns(), &self.aws.endpoint).unwrap();
        for (session, expected) in self.minted.borrow().iter() {
            let (_, policy) = received.iter().find(|(name, _)| name == session).expect("the session was minted");
            assert_eq!(
                policy.as_ref(),
                Some(expected),
                "{session}: exactly the certified action on the certified resources"
            );
        }
        assert_eq!(self.minted.borrow().len(), 6);
        // An agent's read names its own path: the read role serves it only narrowed to
        // the target (a read aimed at another resource is IAM's to refuse; moto does not
        // apply session policies, so what the broker asked for is what is checked).
        let readers: Vec<_> = received.iter().filter(|(name, _)| name.starts_with("seb-reader-")).collect();
        for expected in self.narrowed_reads.borrow().iter() {
            assert!(
                readers.iter().any(|(_, policy)| policy.as_ref() == Some(expected)),
                "no read-role session narrowed to {expected}: {readers:?}"
            );
        }
        assert!(self.narrowed_reads.borrow().len() >= 3, "the full-form services' reads were checked");
    }

    /// Certify `request` against the live state, let `change` alter the target by another
    /// path, and see the broker refuse with `drift` and execute nothing.
    #[track_caller]
    fn drifts(&self, request: &MutationRequest, what: &str, change: impl FnOnce(&World)) {
        let contract = self.contract(request);
        change(self);
        let live = self.live_digest(request);
        assert_ne!(live, contract.precondition, "{what}: the digest must change");
        let decision: Decision = self.broker.decide(&contract, request);
        assert!(!decision.admitted, "{what}: {decision:?}");
        assert_eq!(decision.reason, Reason::Drift, "{what}: {decision:?}");
        assert!(decision.outcome.is_none(), "{what}: nothing is executed on drift");
        // The live digest is the record's, not the caller's (who may not read that state).
        assert!(!decision.message.contains(&live), "{what}: the answer names the live digest: {}", decision.message);
        if decision.record_seq == 0 {
            return; // Past the uid's record budget for refusals: counted, not recorded.
        }
        let output = self.broker.sandbox.agent_cli(&["audit", "list", "--kind", "decision", "--json"]).unwrap();
        let recorded = String::from_utf8(output.stdout).unwrap();
        let record: Value = recorded
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .find(|r| r["body"]["decision_id"] == decision.decision_id)
            .unwrap_or_else(|| panic!("{what}: no record of {}", decision.decision_id));
        assert!(record["body"]["message"].as_str().unwrap().contains(&live), "{what}: {record}");
    }

    fn query(&self, service: &str, form: &[(&str, &str)]) -> Value {
        moto::query(self.netns(), &self.aws.endpoint, service, form, &self.aws.admin).unwrap()
    }

    fn json(&self, service: &str, target: &str, body: Value) -> Value {
        moto::json_call(self.netns(), &self.aws.endpoint, service, target, &body, &self.aws.admin).unwrap()
    }

    fn s3_put(&self, path: &str, headers: &[(&str, &str)], body: &str) {
        let uri = format!("{}{path}", self.aws.endpoint);
        let mut request = http::Request::builder().method("PUT").uri(&uri).header("host", API);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.header("content-length", body.len()).body(bytes::Bytes::from(body.to_string())).unwrap();
        let response = moto::send(self.netns(), request, "s3", &self.aws.admin).unwrap();
        assert!(response.status().is_success(), "{}", String::from_utf8_lossy(response.body()));
    }
}

#[test]
fn six_aws_services_execute_under_exact_session_policies_and_any_change_is_drift() {
    let w = world();
    s3(&w);
    ec2(&w);
    iam(&w);
    dynamodb(&w);
    sqs(&w);
    ssm(&w);
    w.check_session_policies();
}

fn s3(w: &World) {
    let key = "drift/object.json";
    let request = moto::put_object(&w.aws.bucket, key, "replicas=3");
    w.executes(&request);
    let path = format!("/{}/{key}", w.aws.bucket);
    w.drifts(&request, "S3 object bytes", |w| {
        w.s3_put(&path, &[("content-type", "application/octet-stream")], "replicas=4")
    });
    w.drifts(&request, "S3 content type", |w| w.s3_put(&path, &[("content-type", "text/plain")], "replicas=4"));
    w.drifts(&request, "S3 user metadata", |w| {
        w.s3_put(&path, &[("content-type", "text/plain"), ("x-amz-meta-owner", "someone")], "replicas=4")
    });
    w.drifts(&request, "S3 storage class", |w| {
        w.s3_put(
            &path,
            &[("content-type", "text/plain"), ("x-amz-meta-owner", "someone"), ("x-amz-storage-class", "STANDARD_IA")],
            "replicas=4",
        )
    });
}

fn ec2(w: &World) {
    let group = &w.aws.security_group;
    let target = format!("arn:aws:ec2:{REGION}:{ACCOUNT}:security-group/{group}");
    let rule = json!({"ip_permissions": [{"protocol": "tcp", "from_port": 443, "to_port": 443,
        "cidrs": ["10.0.0.0/8", "2001:db8::/32"]}]});
    let request = preset::request("ec2:AuthorizeSecurityGroupIngress", &target, &rule).unwrap();
    w.executes(&request);

    // The next change, certified now, against each kind of rule another path adds.
    let next = preset::request(
        "ec2:AuthorizeSecurityGroupIngress",
        &target,
        &json!({"ip_permissions": [{"protocol": "tcp", "from_port": 8443, "to_port": 8443, "cidrs": ["10.0.0.0/8"]}]}),
    )
    .unwrap();
    let v = "2016-11-15";
    let ingress = |extra: &[(&str, &str)]| {
        let base = [("Action", "AuthorizeSecurityGroupIngress"), ("Version", v), ("GroupId", group.as_str())];
        w.query("ec2", &[&base[..], extra].concat());
    };
    w.drifts(&next, "EC2 IPv4 range", |_| {
        ingress(&[
            ("IpPermissions.1.IpProtocol", "tcp"),
            ("IpPermissions.1.FromPort", "22"),
            ("IpPermissions.1.ToPort", "22"),
            ("IpPermissions.1.IpRanges.1.CidrIp", "192.0.2.0/24"),
        ])
    });
    w.drifts(&next, "EC2 IPv6 ::/0", |_| {
        ingress(&[
            ("IpPermissions.1.IpProtocol", "tcp"),
            ("IpPermissions.1.FromPort", "22"),
            ("IpPermissions.1.ToPort", "22"),
            ("IpPermissions.1.Ipv6Ranges.1.CidrIpv6", "::/0"),
        ])
    });
    let list = w.query(
        "ec2",
        &[
            ("Action", "CreateManagedPrefixList"),
            ("Version", v),
            ("PrefixListName", "seb"),
            ("MaxEntries", "5"),
            ("AddressFamily", "IPv4"),
            ("Entry.1.Cidr", "198.51.100.0/24"),
        ],
    );
    let list = list
        .pointer("/CreateManagedPrefixListResponse/prefixList/prefixListId")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    w.drifts(&next, "EC2 prefix list", |_| {
        ingress(&[
            ("IpPermissions.1.IpProtocol", "tcp"),
            ("IpPermissions.1.FromPort", "25"),
            ("IpPermissions.1.ToPort", "25"),
            ("IpPermissions.1.PrefixListIds.1.PrefixListId", &list),
        ])
    });
    w.drifts(&next, "EC2 group pair", |_| {
        ingress(&[
            ("IpPermissions.1.IpProtocol", "tcp"),
            ("IpPermissions.1.FromPort", "5432"),
            ("IpPermissions.1.ToPort", "5432"),
            ("IpPermissions.1.Groups.1.GroupId", &w.aws.peer_group),
        ])
    });
    w.drifts(&next, "EC2 egress", |w| {
        w.query(
            "ec2",
            &[
                ("Action", "AuthorizeSecurityGroupEgress"),
                ("Version", v),
                ("GroupId", group),
                ("IpPermissions.1.IpProtocol", "udp"),
                ("IpPermissions.1.FromPort", "53"),
                ("IpPermissions.1.ToPort", "53"),
                ("IpPermissions.1.Ipv6Ranges.1.CidrIpv6", "::/0"),
            ],
        );
    });
    w.drifts(&next, "EC2 tags", |w| {
        w.query(
            "ec2",
            &[
                ("Action", "CreateTags"),
                ("Version", v),
                ("ResourceId.1", group),
                ("Tag.1.Key", "owner"),
                ("Tag.1.Value", "someone"),
            ],
        );
    });
}

fn iam(w: &World) {
    let role = format!("arn:aws:iam::{ACCOUNT}:role/{}", moto::TARGET_ROLE);
    let attach = |arn: &str| preset::request("iam:AttachRolePolicy", &role, &json!({"policy_arn": arn})).unwrap();
    w.executes(&attach(moto::ATTACHABLE_POLICY));
    let other = w.query(
        "iam",
        &[
            ("Action", "CreatePolicy"),
            ("Version", "2010-05-08"),
            ("PolicyName", "other"),
            (
                "PolicyDocument",
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:ListBucket","Resource":"*"}]}"#,
            ),
        ],
    );
    let other = other
        .pointer("/CreatePolicyResponse/CreatePolicyResult/Policy/Arn")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    let detach =
        preset::request("iam:DetachRolePolicy", &role, &json!({"policy_arn": moto::ATTACHABLE_POLICY})).unwrap();
    w.drifts(&detach, "IAM attached policy", |w| {
        w.query(
            "iam",
            &[
                ("Action", "AttachRolePolicy"),
                ("Version", "2010-05-08"),
                ("RoleName", moto::TARGET_ROLE),
                ("PolicyArn", &other),
            ],
        );
    });
}

fn dynamodb(w: &World) {
    let table = &w.aws.table;
    let request = moto::put_item(table, json!({"id": {"S": "k1"}, "replicas": {"N": "3"}}));
    w.executes(&request);
    let next = moto::put_item(table, json!({"id": {"S": "k1"}, "replicas": {"N": "5"}}));
    let put =
        |item: Value| drop(w.json("dynamodb", "DynamoDB_20120810.PutItem", json!({"TableName": table, "Item": item})));
    w.drifts(&next, "DynamoDB attribute value", |_| put(json!({"id": {"S": "k1"}, "replicas": {"N": "4"}})));
    w.drifts(&next, "DynamoDB attribute type", |_| put(json!({"id": {"S": "k1"}, "replicas": {"S": "4"}})));
    w.drifts(&next, "DynamoDB added attribute", |_| {
        put(json!({"id": {"S": "k1"}, "replicas": {"S": "4"}, "owner": {"S": "x"}}))
    });
    w.drifts(&next, "DynamoDB deleted item", |w| {
        w.json("dynamodb", "DynamoDB_20120810.DeleteItem", json!({"TableName": table, "Key": {"id": {"S": "k1"}}}));
    });
}

fn sqs_request(w: &World, attributes: Value) -> MutationRequest {
    let url = &w.aws.queue_url;
    moto::json_request(
        "sqs:SetQueueAttributes",
        &format!("arn:aws:sqs:{REGION}:{ACCOUNT}:seb-queue"),
        "AmazonSQS.SetQueueAttributes",
        json!({"QueueUrl": url, "Attributes": attributes}),
        ("sqs:GetQueueAttributes", "AmazonSQS.GetQueueAttributes", json!({"QueueUrl": url, "AttributeNames": ["All"]})),
        &[
            "/Attributes/LastModifiedTimestamp",
            "/Attributes/ApproximateNumberOfMessages",
            "/Attributes/ApproximateNumberOfMessagesNotVisible",
            "/Attributes/ApproximateNumberOfMessagesDelayed",
        ],
    )
}

fn sqs(w: &World) {
    w.executes(&sqs_request(w, json!({"VisibilityTimeout": "45"})));
    let next = sqs_request(w, json!({"VisibilityTimeout": "60"}));
    let set = |attributes: Value| {
        drop(w.json(
            "sqs",
            "AmazonSQS.SetQueueAttributes",
            json!({"QueueUrl": w.aws.queue_url, "Attributes": attributes}),
        ))
    };
    w.drifts(&next, "SQS visibility timeout", |_| set(json!({"VisibilityTimeout": "50"})));
    w.drifts(&next, "SQS delay", |_| set(json!({"DelaySeconds": "5"})));
    w.drifts(&next, "SQS policy", |_| {
        set(json!({"Policy": json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*",
            "Action": "sqs:SendMessage", "Resource": "*"}]}).to_string()}))
    });

    // Messages arriving are volatile: the certified change still goes through.
    let request = sqs_request(w, json!({"VisibilityTimeout": "60"}));
    let contract = w.contract(&request);
    w.json("sqs", "AmazonSQS.SendMessage", json!({"QueueUrl": w.aws.queue_url, "MessageBody": "m"}));
    let decision = w.broker.decide(&contract, &request);
    assert!(decision.admitted, "a volatile field is not drift: {decision:?}");
}

fn ssm(w: &World) {
    let name = &w.aws.parameter;
    let put = |value: &str| {
        moto::json_request(
            "ssm:PutParameter",
            &format!("arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{name}"),
            "AmazonSSM.PutParameter",
            json!({"Name": name, "Value": value, "Type": "String", "Overwrite": true}),
            ("ssm:GetParameter", "AmazonSSM.GetParameter", json!({"Name": name})),
            &[],
        )
    };
    w.executes(&put("replicas=4"));
    let next = put("replicas=5");
    let overwrite = |value: &str, kind: &str| {
        drop(w.json(
            "ssm",
            "AmazonSSM.PutParameter",
            json!({"Name": name, "Value": value, "Type": kind, "Overwrite": true}),
        ))
    };
    w.drifts(&next, "SSM value", |_| overwrite("replicas=9", "String"));
    w.drifts(&next, "SSM type", |_| overwrite("replicas=9", "StringList"));
    w.drifts(&next, "SSM version (same value rewritten)", |_| overwrite("replicas=9", "StringList"));
}

#[test]
fn a_contract_that_certifies_another_action_than_its_request_performs_is_refused() {
    // No moto needed: the broker refuses before minting anything.
    let sandbox = Sandbox::new("awsmismatch", Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))).unwrap();
    let credentials = sandbox.dir.join("aws-broker.json");
    std::fs::write(&credentials, r#"{"access_key_id": "a", "secret_access_key": "b"}"#).unwrap();
    let extra = format!("[aws]\nendpoint = \"http://127.0.0.2:1\"\ncredentials_file = \"{}\"\n", credentials.display());
    let broker = Broker::start(sandbox, &extra, true).unwrap();
    let mut request = moto::put_item("t", json!({"id": {"S": "k"}}));
    request.params["request"]["headers"]["x-amz-target"] = json!("DynamoDB_20120810.DeleteTable");
    assert!(AwsOperation::parse(&request).is_err());
    let role = ScopedIdentity::AwsRole { role_arn: format!("arn:aws:iam::{ACCOUNT}:role/seb-executor") };
    let contract = certified("c-mismatch", this_process(), &request, "sha256:00", role);
    let decision = broker.decide(&contract, &request);
    assert!(!decision.admitted);
    assert_eq!(decision.reason, Reason::UnsupportedOperation, "{decision:?}");
    assert!(decision.message.contains("certified action names PutItem"), "{}", decision.message);
}

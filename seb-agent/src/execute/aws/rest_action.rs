//! Which action a REST request performs. On the query and JSON protocols the wire names
//! its operation (`Action=`, `x-amz-target`), which the broker holds to the certified
//! action; on the REST protocols the method, the path and its subresource do. Left
//! unchecked, a contract certifying `s3:PutObject` of one key could carry a DELETE of
//! another, held back only by the session policy, which an S3-compatible store or an
//! emulator may ignore, and which a resource policy naming the session can bypass.
//!
//! So an S3 request must have the shape of its action, addressed to its target; and
//! other services' REST requests, whose shapes the broker does not know, may only read.

use anyhow::{Context, Result, bail, ensure};
use http::Method;

use super::preset::{s3_bucket, s3_object, s3_path};

/// What an S3 action's request looks like.
struct Shape {
    action: &'static str,
    methods: &'static [Method],
    /// An object's (`/<bucket>/<key>`), else a bucket's (`/<bucket>`).
    object: bool,
    /// The subresource the query names (`?policy`), if any.
    subresource: Option<&'static str>,
    /// Other query parameters it may carry.
    parameters: &'static [&'static str],
}

const fn shape(
    action: &'static str,
    methods: &'static [Method],
    object: bool,
    subresource: Option<&'static str>,
) -> Shape {
    Shape { action, methods, object, subresource, parameters: &[] }
}

const PUT: &[Method] = &[Method::PUT];
const GET: &[Method] = &[Method::GET];
const DELETE: &[Method] = &[Method::DELETE];
const LIST_PARAMETERS: &[&str] = &[
    "list-type",
    "prefix",
    "delimiter",
    "max-keys",
    "continuation-token",
    "start-after",
    "encoding-type",
    "fetch-owner",
];

/// S3 actions (IAM's names) and their requests' shapes.
const S3: &[Shape] = &[
    shape("s3:PutObject", PUT, true, None),
    Shape {
        action: "s3:GetObject",
        methods: &[Method::GET, Method::HEAD],
        object: true,
        subresource: None,
        parameters: &["partNumber"],
    },
    shape("s3:DeleteObject", DELETE, true, None),
    shape("s3:PutObjectTagging", PUT, true, Some("tagging")),
    shape("s3:GetObjectTagging", GET, true, Some("tagging")),
    shape("s3:DeleteObjectTagging", DELETE, true, Some("tagging")),
    shape("s3:PutObjectAcl", PUT, true, Some("acl")),
    shape("s3:GetObjectAcl", GET, true, Some("acl")),
    shape("s3:CreateBucket", PUT, false, None),
    shape("s3:DeleteBucket", DELETE, false, None),
    Shape { action: "s3:ListBucket", methods: GET, object: false, subresource: None, parameters: LIST_PARAMETERS },
    shape("s3:PutBucketPolicy", PUT, false, Some("policy")),
    shape("s3:GetBucketPolicy", GET, false, Some("policy")),
    shape("s3:DeleteBucketPolicy", DELETE, false, Some("policy")),
    shape("s3:PutBucketTagging", PUT, false, Some("tagging")),
    shape("s3:GetBucketTagging", GET, false, Some("tagging")),
    shape("s3:PutBucketVersioning", PUT, false, Some("versioning")),
    shape("s3:GetBucketVersioning", GET, false, Some("versioning")),
    shape("s3:PutBucketAcl", PUT, false, Some("acl")),
    shape("s3:GetBucketAcl", GET, false, Some("acl")),
    shape("s3:PutEncryptionConfiguration", PUT, false, Some("encryption")),
    shape("s3:GetEncryptionConfiguration", GET, false, Some("encryption")),
    shape("s3:PutBucketCORS", PUT, false, Some("cors")),
    shape("s3:GetBucketCORS", GET, false, Some("cors")),
    shape("s3:PutLifecycleConfiguration", PUT, false, Some("lifecycle")),
    shape("s3:GetLifecycleConfiguration", GET, false, Some("lifecycle")),
    shape("s3:PutBucketPublicAccessBlock", PUT, false, Some("publicAccessBlock")),
    shape("s3:GetBucketPublicAccessBlock", GET, false, Some("publicAccessBlock")),
];

/// Headers (by prefix) that make a request also another action, which IAM judges as
/// that action: a copy (`x-amz-copy-source`, reading the source), an ACL (`x-amz-acl`,
/// `x-amz-grant-*`), tags, object lock and legal hold (an object nobody can delete),
/// bucket ownership and object lock at creation, a governance bypass; and keys of the
/// caller's own (SSE-C), after which the drift check cannot read the object again.
const OTHER_ACTION_HEADERS: &[&str] = &[
    "x-amz-copy-source",
    "x-amz-acl",
    "x-amz-grant-",
    "x-amz-tagging",
    "x-amz-object-lock-",
    "x-amz-bucket-object-lock-",
    "x-amz-object-ownership",
    "x-amz-bypass-governance-retention",
    "x-amz-server-side-encryption-customer-",
];

/// `method` `path` (query included) with `headers` performs `action` on `target`, for
/// a REST request to `service`.
pub fn ensure_performs(
    service: &str,
    action: &str,
    method: &Method,
    path: &str,
    headers: &[(http::HeaderName, http::HeaderValue)],
    target: &str,
) -> Result<()> {
    if service != "s3" {
        ensure!(
            matches!(*method, Method::GET | Method::HEAD),
            "the broker cannot tell which action a {method} request of `{service}`'s REST protocol performs: of \
             REST services, only S3's actions are taken (other services' REST requests may only read)"
        );
        return Ok(());
    }
    let shape = S3.iter().find(|s| s.action == action).with_context(|| {
        format!("`{action}` is not an S3 action whose request the broker knows: it cannot tell what the request does")
    })?;
    ensure!(shape.methods.contains(method), "`{action}` is a {:?} request, not {method}", shape.methods);
    // An ACL action's canned ACL and grants are the action itself.
    let own = |header: &str| action.ends_with("Acl") && (header == "x-amz-acl" || header.starts_with("x-amz-grant-"));
    for (name, _) in headers {
        ensure!(
            own(name.as_str()) || !OTHER_ACTION_HEADERS.iter().any(|other| name.as_str().starts_with(other)),
            "the header {name} makes the request another action than `{action}`"
        );
    }
    let (resource, query) = path.split_once('?').unwrap_or((path, ""));
    let addressed = if shape.object {
        let (bucket, key) = s3_object(target).with_context(|| format!("`{action}` acts on an object"))?;
        s3_path(&bucket, Some(&key))
    } else {
        s3_path(&s3_bucket(target).with_context(|| format!("`{action}` acts on a bucket"))?, None)
    };
    let bucket_slash = format!("{addressed}/");
    ensure!(
        resource == addressed || (!shape.object && resource == bucket_slash),
        "the request's path {resource} is not the target's ({addressed})"
    );
    let mut keys: Vec<&str> =
        query.split('&').filter(|p| !p.is_empty()).map(|p| p.split('=').next().unwrap_or(p)).collect();
    keys.sort_unstable();
    let before = keys.len();
    keys.dedup();
    ensure!(keys.len() == before, "the query `{query}` names a parameter twice");
    let mut named_subresource = false;
    for key in keys {
        if Some(key) == shape.subresource {
            named_subresource = true;
        } else if key == "x-id" {
            // What AWS SDKs add: the operation's name, which must be the action's.
            let named = query.split('&').find_map(|p| p.strip_prefix("x-id=")).unwrap_or_default();
            ensure!(
                Some(named) == action.strip_prefix("s3:"),
                "the query's x-id `{named}` names another operation than `{action}`"
            );
        } else if !shape.parameters.contains(&key) {
            bail!("the query parameter `{key}` makes the request another action than `{action}`");
        }
    }
    if let Some(subresource) = shape.subresource {
        ensure!(named_subresource, "`{action}` names the subresource `?{subresource}`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(action: &str, method: Method, path: &str, headers: &[(&str, &str)], target: &str) -> Result<()> {
        let headers: Vec<_> =
            headers.iter().map(|(n, v)| (n.parse().unwrap(), http::HeaderValue::from_str(v).unwrap())).collect();
        ensure_performs("s3", action, &method, path, &headers, target)
    }

    #[test]
    fn an_s3_request_must_have_its_actions_shape_on_its_target() {
        let object = "arn:aws:s3:::b/cfg.json";
        check("s3:PutObject", Method::PUT, "/b/cfg.json", &[("content-type", "text/plain")], object).unwrap();
        check("s3:GetObject", Method::HEAD, "/b/cfg.json", &[], object).unwrap();
        check("s3:PutBucketPolicy", Method::PUT, "/b?policy", &[], "arn:aws:s3:::b").unwrap();
        check("s3:ListBucket", Method::GET, "/b/?list-type=2&prefix=x", &[], "arn:aws:s3:::b").unwrap();
        let refused = |action, method, path: &str, headers: &[(&str, &str)]| {
            format!("{:#}", check(action, method, path, headers, object).unwrap_err())
        };
        // A certified put of one key carrying a delete, another key, a multi-delete, a copy.
        assert!(refused("s3:PutObject", Method::DELETE, "/b/cfg.json", &[]).contains("not DELETE"));
        assert!(refused("s3:PutObject", Method::PUT, "/b/other.json", &[]).contains("is not the target's"));
        assert!(refused("s3:PutObject", Method::PUT, "/b/cfg.json?delete", &[]).contains("`delete`"));
        let copy = refused("s3:PutObject", Method::PUT, "/b/cfg.json", &[("x-amz-copy-source", "/b/secret.json")]);
        assert!(copy.contains("x-amz-copy-source"), "{copy}");
        for header in [
            ("x-amz-acl", "public-read"),
            ("x-amz-grant-read", "id=x"),
            ("x-amz-tagging", "a=b"),
            ("x-amz-object-lock-mode", "COMPLIANCE"),
            ("x-amz-server-side-encryption-customer-key", "k"),
        ] {
            let e = refused("s3:PutObject", Method::PUT, "/b/cfg.json", &[header]);
            assert!(e.contains("makes the request another action"), "{header:?}: {e}");
        }
        check("s3:PutObject", Method::PUT, "/b/cfg.json?x-id=PutObject", &[], object).unwrap();
        check("s3:PutObjectAcl", Method::PUT, "/b/cfg.json?acl", &[("x-amz-acl", "private")], object).unwrap();
        assert!(refused("s3:PutObject", Method::PUT, "/b/cfg.json?x-id=DeleteObject", &[]).contains("x-id"));
        assert!(refused("s3:PutObject", Method::PUT, "/b/cfg.json?tagging", &[]).contains("`tagging`"));
        assert!(refused("s3:PutObjectTagging", Method::PUT, "/b/cfg.json", &[]).contains("?tagging"));
        assert!(refused("s3:GetObject", Method::GET, "/b/cfg.json?versionId=1&versionId=2", &[]).contains("twice"));
        assert!(
            refused("s3:PutObjectRetention", Method::PUT, "/b/cfg.json?retention", &[]).contains("not an S3 action")
        );
        // Another service's REST request: reads only.
        let lambda = ensure_performs(
            "lambda",
            "lambda:InvokeFunction",
            &Method::POST,
            "/2015-03-31/functions/f/invocations",
            &[],
            "arn:aws:lambda:r:1:function:f",
        );
        assert!(format!("{:#}", lambda.unwrap_err()).contains("only S3's actions"));
        ensure_performs(
            "lambda",
            "lambda:GetFunction",
            &Method::GET,
            "/2015-03-31/functions/f",
            &[],
            "arn:aws:lambda:r:1:function:f",
        )
        .unwrap();
    }
}

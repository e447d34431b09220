//! `seb-agent check-cluster-state`: validate a `SebPolicy` or `SebRevocation` as a
//! broker would apply it. The writes themselves are [`crate::cluster::writes`].

use anyhow::{Context, Result, bail};

use crate::cluster::crd::{SebPolicy, SebRevocation};

/// Validate one object's JSON: a `SebPolicy` as a broker would apply it, or a
/// `SebRevocation`.
pub fn check_object(text: &str) -> Result<()> {
    let value: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    match value["kind"].as_str() {
        Some("SebPolicy") => {
            let object: SebPolicy = serde_json::from_value(value).context("not a valid SebPolicy")?;
            crate::cluster::sync::validate_policy(&object).map(drop)
        }
        Some("SebRevocation") => {
            serde_json::from_value::<SebRevocation>(value).context("not a valid SebRevocation").map(drop)
        }
        Some(other) => bail!("kind `{other}` is neither SebPolicy nor SebRevocation"),
        None => bail!("the object has no `kind`: it must be SebPolicy or SebRevocation"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_are_checked_as_brokers_apply_them_and_errors_name_the_field() {
        let policy = |protected: serde_json::Value| {
            serde_json::json!({"apiVersion": "seb.io/v1alpha1", "kind": "SebPolicy", "metadata": {"name": "default"},
                               "spec": {"policyEpoch": 1, "protected": protected, "exemptCgroups": ["/system.slice"]}})
            .to_string()
        };
        check_object(&policy(serde_json::json!([{"cidr": "10.0.0.0/8"}]))).unwrap();
        let error = format!("{:#}", check_object(&policy(serde_json::json!([{"cidr": "10.0.0.1/8"}]))).unwrap_err());
        assert!(error.contains("spec.protected[0].cidr"), "{error}");
        let error = format!(
            "{:#}",
            check_object(&policy(serde_json::json!([{"cidr": "10.0.0.1", "port": 443, "protocol": "sctp"}])))
                .unwrap_err()
        );
        assert!(error.contains("spec.protected[0].protocol"), "{error}");
        let error = format!("{:#}", check_object(r#"{"kind": "Pod"}"#).unwrap_err());
        assert!(error.contains("neither"), "{error}");
    }
}

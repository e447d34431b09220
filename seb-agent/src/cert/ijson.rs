//! I-JSON (RFC 7493) numbers in contracts and requests.
//!
//! RFC 8785 writes every number as an IEEE 754 double, so an integer beyond ±(2^53−1)
//! has the same canonical JSON, hence the same digest, as its neighbours, while the
//! executors send the exact value. Such numbers are refused so that a digest names
//! exactly one request. JSON has no literal for a non-finite number and serde_json
//! refuses one too large for a double, so those never reach here.

use serde_json::{Number, Value};

/// The largest integer a double holds exactly, and its neighbours do not share.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Values a live state's response may decode into, at most (about 64 MiB as `serde_json`
/// values): a state is an API answer, not a data set, and a passthrough read needs no
/// certificate. A larger JSON answer is digested as bytes, or refused, by its reader.
pub const MAX_STATE_VALUES: usize = 256 * 1024;

/// How many values a JSON text holds, at most, counted without parsing it: one, plus one
/// per separator (`,` `:`) and opening (`[` `{`) outside strings. Parsing JSON costs
/// memory per value, not per byte (`[0,0,…]` is two bytes a value on the wire and over a
/// hundred once parsed), so what bounds the parse is this count.
pub fn values_in(text: &[u8]) -> usize {
    let (mut values, mut in_string, mut escaped) = (1usize, false, false);
    for &byte in text {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match byte {
                b'"' => in_string = true,
                b',' | b':' | b'[' | b'{' => values += 1,
                _ => {}
            }
        }
    }
    values
}

/// Where numbers may appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbers {
    /// Any number in range (request parameters).
    Any,
    /// Integers only (contracts: uid and epochs).
    Integers,
}

/// A number that is not allowed, and the JSON path to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumberError {
    #[error("{path} = {number} is beyond ±(2^53−1), the I-JSON range in which a number's canonical JSON is exact")]
    OutOfRange { path: String, number: String },
    #[error("{path} = {number} must be an integer")]
    NotInteger { path: String, number: String },
}

/// Check every number in `value`; `path` names `value` itself in the error.
pub fn check(value: &Value, numbers: Numbers, path: &str) -> Result<(), NumberError> {
    check_at(value, numbers, &Path::Root(path))
}

/// Check an integer field; `path` names it in the error.
pub fn check_integer(value: u64, path: &str) -> Result<(), NumberError> {
    check_number(&Number::from(value), Numbers::Integers, &Path::Root(path))
}

/// Where a value is, spelt out only for an error: a check that passes allocates nothing.
enum Path<'a> {
    Root(&'a str),
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl std::fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Root(root) => f.write_str(root),
            Self::Key(parent, key) => write!(f, "{parent}.{key}"),
            Self::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

fn check_at(value: &Value, numbers: Numbers, path: &Path<'_>) -> Result<(), NumberError> {
    match value {
        Value::Number(number) => check_number(number, numbers, path),
        Value::Array(items) => {
            items.iter().enumerate().try_for_each(|(i, item)| check_at(item, numbers, &Path::Index(path, i)))
        }
        Value::Object(fields) => {
            fields.iter().try_for_each(|(key, item)| check_at(item, numbers, &Path::Key(path, key)))
        }
        Value::Null | Value::Bool(_) | Value::String(_) => Ok(()),
    }
}

fn check_number(number: &Number, numbers: Numbers, path: &Path<'_>) -> Result<(), NumberError> {
    let in_range = if let Some(n) = number.as_u64() {
        n <= MAX_SAFE_INTEGER
    } else if let Some(n) = number.as_i64() {
        n.unsigned_abs() <= MAX_SAFE_INTEGER
    } else {
        // A double: integral beyond 2^53, or a fraction (doubles above 2^52 have none).
        number.as_f64().is_some_and(|f| f.is_finite() && f.abs() <= MAX_SAFE_INTEGER as f64)
    };
    let error = |make: fn(String, String) -> NumberError| Err(make(path.to_string(), number.to_string()));
    if !in_range {
        return error(|path, number| NumberError::OutOfRange { path, number });
    }
    if numbers == Numbers::Integers && !(number.is_u64() || number.is_i64()) {
        return error(|path, number| NumberError::NotInteger { path, number });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn integers_within_the_safe_range_pass_and_beyond_it_fail() {
        let max = MAX_SAFE_INTEGER as i64;
        for ok in [json!(max), json!(-max), json!(0), json!(1.5), json!({"a": [1, 2.25, "9007199254740993"]})] {
            assert_eq!(check(&ok, Numbers::Any, "params"), Ok(()), "{ok}");
        }
        for (bad, path) in [
            (json!(max + 1), "params"),
            (json!(-max - 1), "params"),
            (json!(u64::MAX), "params"),
            (json!({"a": [0, 9007199254740993u64]}), "params.a[1]"),
            (serde_json::from_str("123456789012345678901234567890").unwrap(), "params"),
            (json!(1e300), "params"),
        ] {
            match check(&bad, Numbers::Any, "params") {
                Err(NumberError::OutOfRange { path: at, .. }) => assert_eq!(at, path, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn where_integers_are_expected_a_fraction_fails() {
        assert_eq!(check(&json!({"policy_epoch": 7}), Numbers::Integers, "contract"), Ok(()));
        let fraction = check(&json!({"policy_epoch": 7.5}), Numbers::Integers, "contract");
        assert!(matches!(&fraction, Err(NumberError::NotInteger { path, .. }) if path == "contract.policy_epoch"));
        let out = check(&json!({"policy_epoch": 9007199254740992u64}), Numbers::Integers, "contract");
        assert!(matches!(out, Err(NumberError::OutOfRange { .. })), "{out:?}");
    }
}

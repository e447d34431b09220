//! Canonical form of an AWS read response, for the drift check: the response body as a
//! JSON document (XML mapped to JSON, JSON as is, anything else as its SHA-256), without
//! the fields the contract names as volatile, with the arrays it names as unordered
//! sorted, digested as RFC 8785 (JCS) canonical JSON.
//!
//! XML → JSON, deterministic and lossless for AWS responses:
//! - an element with neither child elements nor attributes is its text, exactly
//!   (entities and numeric character references decoded); empty is `""`;
//! - otherwise an object: each child under its local name, an array when the name repeats
//!   or is a list wrapper (`item`, `member`); attributes as `@name` (namespace
//!   declarations left out); non-blank text among children as `#text`;
//! - the document is `{<root name>: <root>}`.

use anyhow::{Context, Result, bail};
use quick_xml::{
    Reader,
    events::{BytesStart, Event},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::cert::ijson::MAX_STATE_VALUES;

/// How the body of a read's response is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decode {
    Xml,
    Json,
    /// Opaque bytes (an S3 object): only their SHA-256 is compared.
    Sha256,
}

/// Deepest XML nesting accepted (AWS responses are a dozen levels deep).
const MAX_DEPTH: usize = 128;
/// Most attributes an element may carry (AWS elements carry a few). The XML reader
/// checks each attribute's name against every earlier one's: an object written as one
/// element with 150,000 attributes took tens of seconds of a runtime thread to read.
const MAX_ATTRIBUTES: usize = 64;

/// Decode a response body into the JSON document that is compared.
pub fn decode(body: &[u8], decode: Decode) -> Result<Value> {
    // JSON values are counted by their separators, XML ones by their tags and attributes.
    let values = match decode {
        Decode::Json => crate::cert::ijson::values_in(body),
        Decode::Xml => body.iter().filter(|b| matches!(**b, b'<' | b'=')).count(),
        Decode::Sha256 => 0,
    };
    anyhow::ensure!(
        values <= MAX_STATE_VALUES,
        "the response holds about {values} values, more than the {MAX_STATE_VALUES} a state may decode into \
         (read it with `decode: \"sha256\"`)"
    );
    match decode {
        Decode::Json if body.iter().all(u8::is_ascii_whitespace) => Ok(Value::Object(Map::new())),
        Decode::Json => serde_json::from_slice(body).context("the response body is not JSON"),
        Decode::Xml => xml_to_json(body),
        Decode::Sha256 => Ok(serde_json::json!({"sha256": hex::encode(Sha256::digest(body))})),
    }
}

struct Open {
    name: String,
    fields: Vec<(String, Value)>,
    text: String,
    has_attributes: bool,
}

impl Open {
    fn new(start: &BytesStart) -> Result<Self> {
        let name = String::from_utf8(start.local_name().as_ref().to_vec()).context("XML name is not UTF-8")?;
        let mut fields = Vec::new();
        for (n, attribute) in start.attributes().enumerate() {
            anyhow::ensure!(n < MAX_ATTRIBUTES, "an XML element carries more than {MAX_ATTRIBUTES} attributes");
            let attribute = attribute.context("malformed XML attribute")?;
            let key = attribute.key;
            if key.as_ref() == b"xmlns" || key.prefix().is_some_and(|p| p.as_ref() == b"xmlns") {
                continue;
            }
            let local = String::from_utf8(key.local_name().as_ref().to_vec()).context("XML name is not UTF-8")?;
            let value = attribute.unescape_value().context("malformed XML attribute value")?;
            fields.push((format!("@{local}"), Value::String(value.into_owned())));
        }
        let has_attributes = !fields.is_empty();
        Ok(Self { name, fields, text: String::new(), has_attributes })
    }

    fn close(self) -> (String, Value) {
        if self.fields.is_empty() && !self.has_attributes {
            return (self.name, Value::String(self.text));
        }
        let mut counts = std::collections::HashMap::<&str, usize>::new();
        for (name, _) in &self.fields {
            *counts.entry(name.as_str()).or_default() += 1;
        }
        let listed: std::collections::HashSet<String> = counts
            .into_iter()
            .filter(|(name, n)| *n > 1 || matches!(*name, "item" | "member"))
            .map(|(name, _)| name.to_string())
            .collect();
        let mut object = Map::new();
        for (name, value) in self.fields {
            if listed.contains(&name) {
                match object.entry(name).or_insert_with(|| Value::Array(Vec::new())) {
                    Value::Array(items) => items.push(value),
                    _ => unreachable!("listed names only hold arrays"),
                }
            } else {
                object.insert(name, value);
            }
        }
        if !self.text.trim().is_empty() {
            object.insert("#text".into(), Value::String(self.text));
        }
        (self.name, Value::Object(object))
    }
}

/// Map an XML document to JSON (see the module documentation).
pub fn xml_to_json(xml: &[u8]) -> Result<Value> {
    let mut reader = Reader::from_reader(xml);
    let mut stack: Vec<Open> = Vec::new();
    let mut root: Option<(String, Value)> = None;
    loop {
        let event = reader.read_event().context("malformed XML")?;
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    bail!("XML with more than one root element");
                }
                if stack.len() >= MAX_DEPTH {
                    bail!("XML nested deeper than {MAX_DEPTH} elements");
                }
                stack.push(Open::new(&start)?);
            }
            Event::Empty(empty) => {
                let (name, value) = Open::new(&empty)?.close();
                match stack.last_mut() {
                    Some(parent) => parent.fields.push((name, value)),
                    None if root.is_none() => root = Some((name, value)),
                    None => bail!("XML with more than one root element"),
                }
            }
            Event::End(_) => {
                let (name, value) = stack.pop().context("unbalanced XML")?.close();
                match stack.last_mut() {
                    Some(parent) => parent.fields.push((name, value)),
                    None => root = Some((name, value)),
                }
            }
            Event::Text(text) => {
                let text = text.decode().context("XML text is not UTF-8")?;
                match stack.last_mut() {
                    Some(open) => open.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => bail!("text outside the XML root element"),
                }
            }
            Event::CData(data) => {
                let open = stack.last_mut().context("CDATA outside the XML root element")?;
                open.text.push_str(std::str::from_utf8(&data).context("CDATA is not UTF-8")?);
            }
            Event::GeneralRef(reference) => {
                let open = stack.last_mut().context("entity outside the XML root element")?;
                if let Some(c) = reference.resolve_char_ref().context("invalid XML character reference")? {
                    open.text.push(c);
                } else {
                    let name = reference.decode().context("XML entity name is not UTF-8")?;
                    open.text.push_str(match name.as_ref() {
                        "amp" => "&",
                        "lt" => "<",
                        "gt" => ">",
                        "quot" => "\"",
                        "apos" => "'",
                        other => bail!("undefined XML entity &{other};"),
                    });
                }
            }
            Event::DocType(_) => bail!("XML with a DOCTYPE is not an AWS response"),
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
        }
    }
    if !stack.is_empty() {
        bail!("unbalanced XML: {} element(s) not closed", stack.len());
    }
    let (name, value) = root.context("empty XML document")?;
    Ok(Value::Object(Map::from_iter([(name, value)])))
}

/// A JSON pointer (RFC 6901) in which a `*` token stands for every member or element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer(Vec<String>);

impl Pointer {
    pub fn parse(text: &str) -> Result<Self> {
        let Some(rest) = text.strip_prefix('/') else {
            bail!("`{text}` is not a JSON pointer to a field (it must start with `/`)");
        };
        Ok(Self(rest.split('/').map(|token| token.replace("~1", "/").replace("~0", "~")).collect()))
    }

    /// Remove every field the pointer names.
    pub fn remove(&self, value: &mut Value) {
        let (last, parents) = self.0.split_last().expect("a pointer has at least one token");
        visit(value, parents, &mut |parent| match parent {
            Value::Object(map) if last == "*" => map.clear(),
            Value::Object(map) => drop(map.remove(last)),
            Value::Array(items) if last == "*" => items.clear(),
            Value::Array(items) => {
                if let Some(i) = last.parse::<usize>().ok().filter(|i| *i < items.len()) {
                    items.remove(i);
                }
            }
            _ => {}
        });
    }

    /// Sort every array the pointer names (by canonical JSON): a set, whatever the
    /// order the service lists it in.
    pub fn sort(&self, value: &mut Value) {
        visit(value, &self.0, &mut |target| {
            if let Value::Array(items) = target {
                items.sort_by_cached_key(crate::cert::contract::canonical_json);
            }
        });
    }
}

fn visit(value: &mut Value, tokens: &[String], apply: &mut dyn FnMut(&mut Value)) {
    let Some((first, rest)) = tokens.split_first() else { return apply(value) };
    match value {
        Value::Object(map) if first == "*" => map.values_mut().for_each(|v| visit(v, rest, apply)),
        Value::Object(map) => {
            if let Some(v) = map.get_mut(first) {
                visit(v, rest, apply)
            }
        }
        Value::Array(items) if first == "*" => items.iter_mut().for_each(|v| visit(v, rest, apply)),
        Value::Array(items) => {
            if let Some(v) = first.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                visit(v, rest, apply)
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn a_response_of_more_values_than_a_state_holds_is_not_decoded() {
        let wide = [b"[".as_slice(), &b"0,".repeat(MAX_STATE_VALUES), b"0]"].concat();
        let e = format!("{:#}", decode(&wide, Decode::Json).unwrap_err());
        assert!(e.contains("more than the 262144 a state may decode into"), "{e}");
        let tags = b"<a/>".repeat(MAX_STATE_VALUES + 1);
        assert!(decode(&tags, Decode::Xml).is_err());
        assert!(decode(&wide, Decode::Sha256).is_ok(), "a digest of the bytes holds no values");
        let narrow = [b"[".as_slice(), &b"0,".repeat(1000), b"0]"].concat();
        assert_eq!(decode(&narrow, Decode::Json).unwrap().as_array().unwrap().len(), 1001);
    }

    #[test]
    fn attributes_count_as_values_and_an_element_carries_few() {
        let element = |n: usize| {
            let attributes: String = (0..n).map(|i| format!(" a{i}=\"\"")).collect();
            format!("<a{attributes}/>").into_bytes()
        };
        // 150,000 attributes on one element: refused at once (it took tens of seconds).
        let started = std::time::Instant::now();
        let e = format!("{:#}", decode(&element(150_000), Decode::Xml).unwrap_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
        assert!(e.contains("more than 64 attributes"), "{e}");
        let attributed = b"<a b=\"\"/>".repeat(MAX_STATE_VALUES / 2 + 1);
        let e = format!("{:#}", decode(&attributed, Decode::Xml).unwrap_err());
        assert!(e.contains("more than the 262144"), "{e}");
        let e = format!("{:#}", decode(&element(65), Decode::Xml).unwrap_err());
        assert!(e.contains("more than 64 attributes"), "{e}");
        assert_eq!(decode(&element(64), Decode::Xml).unwrap()["a"].as_object().unwrap().len(), 64);
    }

    #[test]
    fn aws_xml_maps_to_json_with_lists_and_decoded_references() {
        let xml = br#"<?xml version="1.0"?>
            <DescribeSecurityGroupsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
              <requestId>r-1</requestId>
              <securityGroupInfo><item><groupId>sg-1</groupId>
                <ipPermissions><item><ipv6Ranges><item><cidrIpv6>::/0</cidrIpv6></item></ipv6Ranges>
                  <description>a &amp; b &#233;&#x2603; &lt;x&gt;</description><empty/></item></ipPermissions>
              </item></securityGroupInfo>
            </DescribeSecurityGroupsResponse>"#;
        let value = xml_to_json(xml).unwrap();
        let rule = &value["DescribeSecurityGroupsResponse"]["securityGroupInfo"]["item"][0]["ipPermissions"]["item"][0];
        assert_eq!(rule["ipv6Ranges"]["item"], json!([{"cidrIpv6": "::/0"}]));
        assert_eq!(rule["description"], "a & b é☃ <x>");
        assert_eq!(rule["empty"], "");
        let flattened =
            xml_to_json(b"<R a=\"1\"><Contents><K>x</K></Contents><Contents><K>y</K></Contents></R>").unwrap();
        assert_eq!(flattened, json!({"R": {"@a": "1", "Contents": [{"K": "x"}, {"K": "y"}]}}));
    }

    #[test]
    fn malformed_or_hostile_xml_is_refused_with_its_fault_named() {
        let refused = |xml: &str| xml_to_json(xml.as_bytes()).unwrap_err().to_string();
        assert!(refused("<a>&foo;</a>").contains("undefined XML entity &foo;"));
        assert!(refused("<a>&#xD800;</a>").contains("character reference"));
        assert!(refused("<!DOCTYPE a [<!ENTITY x 'y'>]><a/>").contains("DOCTYPE"));
        assert!(refused("<a><b></a>").contains("XML"));
        assert!(refused("<a/><b/>").contains("more than one root"));
        assert!(refused(&"<a>".repeat(MAX_DEPTH + 1)).contains("nested deeper"));
    }

    #[test]
    fn volatile_pointers_remove_fields_everywhere_a_wildcard_reaches() {
        let mut value =
            json!({"R": {"requestId": "x", "items": [{"id": 1, "at": "t1"}, {"id": 2, "at": "t2"}], "a/b": 1}});
        for pointer in ["/R/requestId", "/R/items/*/at", "/R/a~1b", "/R/missing/x"] {
            Pointer::parse(pointer).unwrap().remove(&mut value);
        }
        assert_eq!(value, json!({"R": {"items": [{"id": 1}, {"id": 2}]}}));
        assert!(Pointer::parse("R/x").unwrap_err().to_string().contains("must start with `/`"));
        let mut listed = json!({"s": [3, 1, 2]});
        Pointer::parse("/s").unwrap().sort(&mut listed);
        assert_eq!(listed, json!({"s": [1, 2, 3]}));
    }

    /// Text without markup-significant characters, including non-ASCII.
    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 :/._\u{e9}\u{2603}-]{0,12}"
    }

    fn escape_with_references(text: &str, numeric: bool) -> String {
        text.chars()
            .map(|c| match c {
                '&' => "&amp;".to_string(),
                '<' => "&lt;".to_string(),
                c if numeric && !c.is_ascii_alphanumeric() => format!("&#x{:X};", c as u32),
                c => c.to_string(),
            })
            .collect()
    }

    proptest! {
        /// Whichever way a service escapes a value (literally, by entity, by numeric
        /// character reference), the canonical document is the same, and it carries the value.
        #[test]
        fn escaping_does_not_change_the_canonical_document(value in "[^\u{0}-\u{8}\u{b}\u{c}\u{e}-\u{1f}\u{fffe}\u{ffff}\r]{0,24}") {
            let literal = xml_to_json(format!("<R><v>{}</v></R>", escape_with_references(&value, false)).as_bytes()).unwrap();
            let numeric = xml_to_json(format!("<R><v>{}</v></R>", escape_with_references(&value, true)).as_bytes()).unwrap();
            prop_assert_eq!(&literal, &numeric);
            prop_assert_eq!(&literal["R"]["v"], &json!(value));
        }

        /// Different values give different canonical documents: no field value is lost.
        #[test]
        fn distinct_values_give_distinct_digests(a in text(), b in text(), list in proptest::collection::vec(text(), 0..4)) {
            let doc = |v: &str| {
                let items: String = list.iter().map(|i| format!("<item>{i}</item>")).collect();
                xml_to_json(format!("<R><v>{}</v><l>{items}</l></R>", escape_with_references(v, true)).as_bytes()).unwrap()
            };
            let (one, two) = (crate::cert::contract::digest_of(&doc(&a)), crate::cert::contract::digest_of(&doc(&b)));
            prop_assert_eq!(one == two, a == b);
        }

        /// JSON bodies: key order and whitespace never change the digest; removing a
        /// volatile field makes documents that differ only there equal.
        #[test]
        fn json_digest_ignores_order_and_volatile_fields(
            fields in proptest::collection::btree_map("[a-z]{1,6}", any::<i32>(), 1..6),
            volatile in any::<u64>(), other in any::<u64>(),
        ) {
            let forward: String = fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect::<Vec<_>>().join(", ");
            let backward: String = fields.iter().rev().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(",");
            let one = format!("{{\"Meta\": {{\"RequestId\": {volatile}}}, {forward}}}");
            let two = format!("{{ {backward} ,\"Meta\":{{\"RequestId\":{other}}}}}");
            let pointer = Pointer::parse("/Meta/RequestId").unwrap();
            let canonical = |body: &str| {
                let mut value = decode(body.as_bytes(), Decode::Json).unwrap();
                pointer.remove(&mut value);
                crate::cert::contract::digest_of(&value)
            };
            prop_assert_eq!(canonical(&one), canonical(&two));
        }
    }
}

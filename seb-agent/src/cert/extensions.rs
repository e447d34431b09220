//! A certificate's extensions read as strict DER (X.690 §10), with RustCrypto's `der`.
//!
//! x509-parser reads BER leniently: a BOOLEAN of 0x7f, a non-minimal length or trailing
//! bytes pass, and of two extensions with one OID the first wins. Another tool reading
//! the same certificate could then see another contract than the broker. So the leaf's
//! extensions are read here once, strictly: any encoding two readers could disagree on is
//! refused, and so is an OID that appears twice (RFC 5280 §4.2).

use std::borrow::Cow;

use der::{
    Decode, ErrorKind, Reader, SliceReader, Tag, TagNumber, Tagged,
    asn1::{AnyRef, OctetStringRef, Utf8StringRef},
};
use x509_parser::oid_registry::Oid;

/// One extension: `Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension<'a> {
    /// The OID's content octets.
    pub oid: &'a [u8],
    pub critical: bool,
    /// The content of `extnValue`'s OCTET STRING.
    pub value: &'a [u8],
}

impl Extension<'_> {
    pub fn oid(&self) -> Oid<'_> {
        Oid::new(Cow::Borrowed(self.oid))
    }
}

/// Why extensions were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtensionError {
    /// The certificate around the extensions.
    #[error("{what} is not DER: {detail}")]
    Certificate { what: String, detail: String },
    #[error("{what} is not strict DER: {detail}")]
    NotDer { what: String, detail: String },
    #[error("extension {oid} appears more than once")]
    Duplicate { oid: String },
}

/// The extensions of a DER certificate, in order; none if it has none.
pub fn read(certificate: &[u8]) -> Result<Vec<Extension<'_>>, ExtensionError> {
    fn not_der(what: &'static str) -> impl Fn(der::Error) -> ExtensionError {
        move |e| ExtensionError::Certificate { what: what.into(), detail: describe(e) }
    }
    let tbs = AnyRef::from_der(certificate)
        .and_then(|certificate| {
            certificate.sequence(|r| {
                let tbs = AnyRef::decode(r)?;
                AnyRef::decode(r)?; // signatureAlgorithm
                AnyRef::decode(r)?; // signatureValue
                Ok(tbs)
            })
        })
        .map_err(not_der("the certificate"))?;
    let extensions_tag = Tag::ContextSpecific { constructed: true, number: TagNumber::N3 };
    let block = tbs
        .sequence(|r| {
            let mut block = None;
            while !r.is_finished() {
                let field = AnyRef::decode(r)?;
                if field.tag() == extensions_tag {
                    block = Some(field.value());
                }
            }
            Ok(block)
        })
        .map_err(not_der("the TBSCertificate"))?;
    let Some(block) = block else { return Ok(Vec::new()) };
    let items = AnyRef::from_der(block)
        .and_then(|list| {
            list.sequence(|r| {
                let mut items = Vec::new();
                while !r.is_finished() {
                    items.push(AnyRef::decode(r)?);
                }
                Ok(items)
            })
        })
        .map_err(|e| ExtensionError::NotDer { what: "the extensions list".into(), detail: describe(e) })?;
    let mut extensions: Vec<Extension<'_>> = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let extension = item.sequence(one_extension).map_err(|e| {
            // Name the extension by its OID when that much could be read.
            let oid = SliceReader::new(item.value())
                .and_then(|mut r| AnyRef::decode(&mut r))
                .ok()
                .filter(|oid| oid.tag() == Tag::ObjectIdentifier);
            let what = match oid {
                Some(oid) => format!("extension {}", Oid::new(Cow::Borrowed(oid.value())).to_id_string()),
                None => format!("extension #{index}"),
            };
            ExtensionError::NotDer { what, detail: describe(e) }
        })?;
        if extensions.iter().any(|seen| seen.oid == extension.oid) {
            return Err(ExtensionError::Duplicate { oid: extension.oid().to_id_string() });
        }
        extensions.push(extension);
    }
    Ok(extensions)
}

fn one_extension<'a>(r: &mut SliceReader<'a>) -> der::Result<Extension<'a>> {
    let oid = AnyRef::decode(r)?;
    oid.tag().assert_eq(Tag::ObjectIdentifier)?;
    if oid.value().is_empty() {
        return Err(ErrorKind::OidMalformed.into());
    }
    let critical = if r.peek_tag()? == Tag::Boolean { bool::decode(r)? } else { false };
    let value = OctetStringRef::decode(r)?;
    Ok(Extension { oid: oid.value(), critical, value: value.as_bytes() })
}

/// A DER `UTF8String` filling `value` exactly.
pub fn utf8_string(value: &[u8]) -> Result<&str, String> {
    Utf8StringRef::from_der(value).map(|text| text.as_str()).map_err(describe)
}

/// The encoding rule a `der` error broke, in words.
fn describe(error: der::Error) -> String {
    let at = error.position().map(|p| format!(" (at byte {p})")).unwrap_or_default();
    let what = match error.kind() {
        ErrorKind::Overlength => "a length is not minimal".to_string(),
        // What `der` reports for an overlong length in a TLV header.
        ErrorKind::Length { tag } => format!("the length of a {tag} is not minimal, or wrong for the type"),
        ErrorKind::TagUnknown { byte } => format!("tag {byte:#04x}, which DER does not allow here"),
        ErrorKind::IndefiniteLength => "an indefinite length".to_string(),
        ErrorKind::Noncanonical { tag: Tag::Boolean } => "a BOOLEAN other than 0x00 or 0xFF".to_string(),
        ErrorKind::TrailingData { remaining, .. } => format!("{remaining} trailing bytes after the value"),
        ErrorKind::TagUnexpected { expected: Some(expected), actual } => {
            format!("tag {actual} where {expected} is required")
        }
        ErrorKind::Incomplete { .. } => "truncated: a length runs past the end".to_string(),
        other => other.to_string(),
    };
    format!("{what}{at}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TLV with a short-form length.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        assert!(content.len() < 0x80);
        [vec![tag, content.len() as u8], content.to_vec()].concat()
    }

    /// A certificate skeleton around the given `Extension` encodings: the TBSCertificate
    /// holds only a serial and the extensions, which is all `read` looks at.
    fn certificate(extensions: &[Vec<u8>]) -> Vec<u8> {
        let list = tlv(0x30, &extensions.concat());
        let tbs = tlv(0x30, &[tlv(0x02, &[1]), tlv(0xa3, &list)].concat());
        tlv(0x30, &[tbs, tlv(0x30, &[]), tlv(0x03, &[0])].concat())
    }

    const OID_A: &[u8] = &[0x06, 0x03, 0x2a, 0x03, 0x04]; // 1.2.3.4
    const OID_B: &[u8] = &[0x06, 0x03, 0x2a, 0x03, 0x05]; // 1.2.3.5

    fn extension(oid: &[u8], critical: Option<&[u8]>, value: &[u8]) -> Vec<u8> {
        let critical = critical.map(|c| c.to_vec()).unwrap_or_default();
        tlv(0x30, &[oid.to_vec(), critical, tlv(0x04, value)].concat())
    }

    #[test]
    fn strict_extensions_are_read_with_their_criticality() {
        let der = certificate(&[
            extension(OID_A, Some(&[0x01, 0x01, 0xff]), &[0x0c, 0x02, b'h', b'i']),
            extension(OID_B, None, &[0x05, 0x00]),
        ]);
        let read = read(&der).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!((read[0].oid().to_id_string(), read[0].critical), ("1.2.3.4".to_string(), true));
        assert_eq!(utf8_string(read[0].value), Ok("hi"));
        assert!(!read[1].critical);
        assert_eq!(read[1].value, &[0x05, 0x00]);
        // No extensions block at all.
        let bare = tlv(0x30, &[tlv(0x30, &tlv(0x02, &[1])), tlv(0x30, &[]), tlv(0x03, &[0])].concat());
        assert_eq!(super::read(&bare), Ok(Vec::new()));
    }

    #[test]
    fn a_boolean_other_than_0x00_or_0xff_is_refused() {
        let der = certificate(&[extension(OID_A, Some(&[0x01, 0x01, 0x7f]), &[0x05, 0x00])]);
        let error = read(&der).unwrap_err().to_string();
        assert!(error.contains("extension 1.2.3.4") && error.contains("BOOLEAN other than 0x00 or 0xFF"), "{error}");
    }

    #[test]
    fn a_non_minimal_length_is_refused() {
        // The OCTET STRING's length 2 written in long form, 0x81 0x02.
        let value = [0x04, 0x81, 0x02, 0x05, 0x00];
        let der = certificate(&[tlv(0x30, &[OID_A, &value[..]].concat())]);
        let error = read(&der).unwrap_err().to_string();
        assert!(error.contains("extension 1.2.3.4") && error.contains("not minimal"), "{error}");
        assert!(utf8_string(&[0x0c, 0x81, 0x02, b'h', b'i']).unwrap_err().contains("not minimal"));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        assert!(utf8_string(&[0x0c, 0x02, b'h', b'i', 0x00]).unwrap_err().contains("1 trailing bytes"));
        // Inside an extension, after its OCTET STRING.
        let der = certificate(&[tlv(0x30, &[OID_A, &[0x04, 0x00], &[0x05, 0x00]].concat())]);
        assert!(read(&der).unwrap_err().to_string().contains("trailing bytes"));
    }

    #[test]
    fn a_string_with_another_tag_is_refused() {
        // PrintableString, OCTET STRING, and a constructed UTF8String.
        for tag in [0x13, 0x04] {
            let error = utf8_string(&[tag, 0x02, b'h', b'i']).unwrap_err();
            assert!(error.contains("where UTF8String is required"), "{tag:#x}: {error}");
        }
        let constructed = utf8_string(&[0x2c, 0x04, 0x0c, 0x02, b'h', b'i']).unwrap_err();
        assert!(constructed.contains("tag 0x2c"), "{constructed}");
        assert!(utf8_string(&[0x0c, 0x01, 0xff]).is_err(), "not UTF-8");
    }

    #[test]
    fn an_extension_twice_is_refused() {
        let twice = certificate(&[
            extension(OID_A, None, &[0x05, 0x00]),
            extension(OID_B, None, &[0x05, 0x00]),
            extension(OID_A, Some(&[0x01, 0x01, 0xff]), &[0x05, 0x01]),
        ]);
        assert_eq!(read(&twice), Err(ExtensionError::Duplicate { oid: "1.2.3.4".into() }));
    }

    #[test]
    fn a_truncated_or_indefinite_certificate_is_refused() {
        let der = certificate(&[extension(OID_A, None, &[0x05, 0x00])]);
        assert!(read(&der[..der.len() - 1]).is_err());
        let mut indefinite = der.clone();
        indefinite[1] = 0x80;
        assert!(read(&indefinite).unwrap_err().to_string().contains("indefinite"));
    }
}

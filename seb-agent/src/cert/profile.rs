//! What RFC 5280 path validation requires of the certificates seb uses: a SAB leaf is an
//! end entity for digital signatures with the SAB extended key usage, and every
//! certificate that issues another is a CA allowed to sign certificates, within its path
//! length constraint.

use x509_parser::{
    extensions::{BasicConstraints, ParsedExtension},
    oid_registry::{OID_X509_EXT_BASIC_CONSTRAINTS, Oid},
    prelude::*,
};

use super::{
    contract::SAB_EKU_OID,
    verify::{Rejection, reject},
};
use crate::admission::Reason;

/// The leaf: not a CA, keyUsage digitalSignature, extendedKeyUsage with the SAB OID.
pub fn check_leaf(leaf: &X509Certificate<'_>) -> Result<(), Rejection> {
    let malformed = |e: String| reject(Reason::MalformedCertificate, e);
    check_serial(leaf.raw_serial()).map_err(malformed)?;
    if basic_constraints(leaf).map_err(malformed)?.is_some_and(|bc| bc.ca) {
        return Err(reject(
            Reason::LeafIsCa,
            "the certificate is a CA certificate (basicConstraints cA); a SAB certificate is an end entity",
        ));
    }
    let key_usage = leaf.key_usage().map_err(|e| malformed(format!("keyUsage: {e}")))?;
    if !key_usage.is_some_and(|ku| ku.value.digital_signature()) {
        return Err(reject(Reason::LeafLacksDigitalSignature, "the certificate's keyUsage lacks digitalSignature"));
    }
    let sab = Oid::from(SAB_EKU_OID).expect("valid OID");
    let eku = leaf.extended_key_usage().map_err(|e| malformed(format!("extendedKeyUsage: {e}")))?;
    if !eku.is_some_and(|eku| eku.value.other.contains(&sab)) {
        return Err(reject(
            Reason::LeafLacksSabEku,
            format!("the certificate's extendedKeyUsage lacks the SAB purpose {sab}"),
        ));
    }
    Ok(())
}

/// A serial as RFC 5280 (4.1.2.2) and DER write it: a positive integer of at most 20
/// octets, minimally encoded. Serials are compared as these bytes (replay, revocation),
/// so a second encoding of one integer must not exist.
fn check_serial(raw: &[u8]) -> Result<(), String> {
    let minimal = match raw {
        [] | [0] => false,
        [0, next, ..] => *next >= 0x80,
        [first, ..] => *first < 0x80,
    };
    if !minimal || raw.len() > 21 || (raw.len() == 21 && raw[0] != 0) {
        return Err(format!(
            "the serial {} is not a positive, minimally encoded integer of at most 20 octets",
            hex::encode(raw)
        ));
    }
    Ok(())
}

/// An issuer with `below` intermediates between it and the leaf: a CA, allowed to sign
/// certificates, whose pathLenConstraint admits `below`.
pub fn check_issuer(issuer: &X509Certificate<'_>, below: usize) -> Result<(), Rejection> {
    let name = issuer.subject();
    let constraints = basic_constraints(issuer).map_err(|e| reject(Reason::MalformedCertificate, e))?;
    let Some(constraints) = constraints.filter(|bc| bc.ca) else {
        return Err(reject(Reason::IssuerNotCa, format!("issuer `{name}` is not a CA (no basicConstraints cA)")));
    };
    let key_usage = issuer.key_usage().map_err(|e| reject(Reason::MalformedCertificate, format!("keyUsage: {e}")))?;
    if !key_usage.is_some_and(|ku| ku.value.key_cert_sign()) {
        return Err(reject(
            Reason::IssuerLacksKeyCertSign,
            format!("issuer `{name}` may not sign certificates (its keyUsage lacks keyCertSign)"),
        ));
    }
    if let Some(limit) = constraints.path_len_constraint
        && below > limit as usize
    {
        return Err(reject(
            Reason::PathLenExceeded,
            format!(
                "issuer `{name}` allows {limit} intermediate(s) below it (pathLenConstraint), the path has {below}"
            ),
        ));
    }
    Ok(())
}

/// basicConstraints, if present; present but unreadable is an error, not "absent".
fn basic_constraints<'c>(cert: &'c X509Certificate<'_>) -> Result<Option<&'c BasicConstraints>, String> {
    let Some(ext) = cert.extensions().iter().find(|ext| ext.oid == OID_X509_EXT_BASIC_CONSTRAINTS) else {
        return Ok(None);
    };
    match ext.parsed_extension() {
        ParsedExtension::BasicConstraints(bc) => Ok(Some(bc)),
        _ => Err(format!("the basicConstraints of `{}` do not parse", cert.subject())),
    }
}

#[cfg(test)]
mod tests {
    use super::check_serial;

    #[test]
    fn a_serial_has_one_encoding() {
        for minimal in [&[0x01][..], &[0x00, 0x80], &[0x7f, 0x00], &[[0x00].as_slice(), &[0xff; 20]].concat()] {
            check_serial(minimal).unwrap();
        }
        for other in [&[][..], &[0x00], &[0x00, 0x01], &[0x80], &[0x00, 0x00, 0x80], &[0x01; 21]] {
            assert!(check_serial(other).unwrap_err().contains("minimally encoded"), "{other:02x?}");
        }
    }
}

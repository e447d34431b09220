//! Every committed fuzz input, corpus and crash alike, replayed through the fuzz targets'
//! own checks (`fuzz/src/lib.rs`) on stable, so that a fixed finding stays fixed. Seeds
//! named `valid-*` must be accepted, so that the corpus reaches past the first check.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::Path;

fn replay(target: &str, run: fn(&[u8]) -> bool) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            eprintln!("{target}: {}", path.display());
            let accepted = run(&input);
            if path.file_name().unwrap().to_string_lossy().starts_with("valid-") {
                assert!(accepted, "{} is a valid input, and was refused", path.display());
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no committed input for the {target} target");
}

#[test]
fn frames() {
    replay("frames", harness::frames);
}

#[test]
fn requests() {
    replay("request", harness::request);
}

#[test]
fn certificates() {
    replay("certificate", harness::certificate);
}

#[test]
fn contracts() {
    replay("contract", harness::contract);
}

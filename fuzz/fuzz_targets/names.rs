//! Store paths, machine names, deployment ids and the clipping of peers'
//! strings: no input panics, what parses prints back as it was given, and
//! an error quotes a bounded part of its input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use procurator_core::limits::clip;
use procurator_core::{DeploymentId, MachineName, StorePath};

/// No error message may be longer: it quotes at most 256 bytes of its
/// input, escaped (a control character takes up to 10).
const MAX_ERROR_BYTES: usize = 4096;

fuzz_target!(|input: (&str, u16)| {
    let (text, max) = input;
    match StorePath::parse(text) {
        Ok(path) => {
            assert_eq!(path.as_str(), text);
            assert!(text.len() <= 255, "a store path longer than Nix allows");
            assert!(path.name().len() <= text.len());
        }
        Err(e) => assert!(
            e.to_string().len() <= MAX_ERROR_BYTES,
            "{} bytes",
            e.to_string().len()
        ),
    }
    match MachineName::parse(text) {
        Ok(name) => {
            assert_eq!(name.to_string(), text);
            assert_eq!(name.as_str().parse::<MachineName>().ok(), Some(name));
        }
        Err(e) => assert!(e.to_string().len() <= MAX_ERROR_BYTES),
    }
    match DeploymentId::parse(text) {
        Ok(id) => assert_eq!(id.as_str(), text),
        Err(e) => assert!(e.to_string().len() <= MAX_ERROR_BYTES),
    }

    let max = usize::from(max);
    let clipped = clip(text, max);
    assert!(
        clipped.len() <= max.max(text.len().min(max)),
        "clip({}, {max}) is {} bytes",
        text.len(),
        clipped.len()
    );
    if text.len() <= max {
        assert_eq!(clipped, text);
    }
});

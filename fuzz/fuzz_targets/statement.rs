//! Signed statements as an agent receives them from the control plane:
//! no input panics, and nothing verifies against a key that signed nothing.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use procurator_core::intent::{PublicKey, Statement};

/// A key no input was signed with (the public half of a fixed secret).
static KEY: LazyLock<PublicKey> = LazyLock::new(|| {
    "fuzz-1:AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
        .parse()
        .expect("a valid public key")
});

fuzz_target!(|text: &str| {
    if let Ok(key) = text.parse::<PublicKey>() {
        let _ = key;
    }
    let Ok(statement) = Statement::parse(text) else {
        return;
    };
    let _ = statement.key_name();
    let _ = statement.unverified_intent();
    assert!(
        statement.verify(std::slice::from_ref(&*KEY)).is_err(),
        "a statement no one signed verified"
    );
});

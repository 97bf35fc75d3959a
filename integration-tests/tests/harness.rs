//! The harness itself against real Nix, without an agent: the fixture
//! flake builds NixOS-shaped closures, a signed cache serves them, a test
//! host's namespace sees its own store and /run, and the fixture's
//! switch-to-configuration moves the links the other tests assert on.

use std::path::Path;

use procurator_integration_tests::{
    self as harness, Fixture, NixEnv, SigningKey, TestHost, fixture,
};
use serde_json::json;

#[test]
fn fixture_builds_nixos_shaped_closures() {
    harness::require_root().expect("root");
    let nix = NixEnv::temp().expect("nix env");
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = Fixture::copy_to(&dir.path().join("flake")).expect("copy fixture");

    let blueprint = fixture.blueprint(&nix).expect("eval blueprintJSON");
    for m in harness::MACHINES {
        let spec = &blueprint[m];
        for field in ["role", "cpu", "memory", "labels", "replicas", "deployment"] {
            assert!(spec.get(field).is_some(), "{m} lacks {field}: {spec}");
        }
        let check = &spec["deployment"]["healthChecks"][0];
        assert_eq!(
            check["command"],
            "test \"$(cat /run/current-system/health)\" = ok"
        );
        assert_eq!(spec["deployment"]["autoRollback"], true);
    }

    let gen1 = fixture.build(&nix).expect("build generation 1");
    let again = fixture.build(&nix).expect("build again");
    assert_eq!(gen1, again, "the same settings build the same closures");
    for (m, closure) in &gen1 {
        let out = Path::new(closure);
        for file in [
            "bin/switch-to-configuration",
            "kernel",
            "initrd",
            "init",
            "nixos-version",
            "system",
            "health",
        ] {
            assert!(out.join(file).exists(), "{m}: {closure} lacks {file}");
        }
        assert_eq!(
            std::fs::read_to_string(out.join("health")).expect("health"),
            "ok\n"
        );
        let closure_paths = nix.closure(closure).expect("closure");
        assert!(
            closure_paths.len() >= 3,
            "{m}: a closure of several paths: {closure_paths:?}"
        );
    }

    let broken = fixture
        .build_with(
            &nix,
            &json!({ "generation": 1, "machines": { "worker-2": { "health": "broken" } } }),
        )
        .expect("build with a broken worker-2");
    assert_eq!(
        broken["worker-1"], gen1["worker-1"],
        "only worker-2 changes"
    );
    assert_ne!(broken["worker-2"], gen1["worker-2"]);
    let health =
        std::fs::read_to_string(Path::new(&broken["worker-2"]).join("health")).expect("health");
    assert_eq!(health, "broken\n");

    let gen2 = fixture
        .build_with(&nix, &json!({ "generation": 2 }))
        .expect("generation 2");
    for m in harness::MACHINES {
        assert_ne!(gen1[m], gen2[m], "{m}: a new generation is a new closure");
    }
}

#[test]
fn test_host_pulls_signed_closure_and_activates_in_its_namespace() {
    harness::require_root().expect("root");
    let nix = NixEnv::temp().expect("nix env");
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = Fixture::copy_to(&dir.path().join("flake")).expect("copy fixture");
    let old = fixture
        .build_with(&nix, &json!({ "generation": 0 }))
        .expect("old closures");
    let new = fixture
        .build_with(
            &nix,
            &json!({ "generation": 1, "machines": { "worker-1": { "failActivation": true } } }),
        )
        .expect("new closures");
    let key =
        SigningKey::generate(&nix, &dir.path().join("signing"), "harness-test-1").expect("key");
    let signed = dir.path().join("signed-cache");
    let unsigned = dir.path().join("unsigned-cache");
    fixture::publish(&nix, &signed, Some(&key), &new).expect("publish signed");
    fixture::publish(&nix, &unsigned, None, &new).expect("publish unsigned");

    let host = TestHost::create(&nix, &dir.path().join("host"), "worker-2", &old["worker-2"])
        .expect("host");
    assert_eq!(
        host.current_system().expect("read").as_deref(),
        None,
        "no agent has run yet"
    );
    assert_eq!(
        host.system_profile().expect("read").as_deref(),
        Some(old["worker-2"].as_str())
    );
    assert_eq!(host.system_generation().expect("read"), "system-1-link");
    assert_eq!(
        host.boot_entry().expect("read").as_deref(),
        Some(old["worker-2"].as_str())
    );
    assert!(host.has_path(&old["worker-2"]));
    assert!(!host.has_path(&new["worker-2"]));

    let target = new["worker-2"].as_str();
    // The namespace's /nix is the host's store: unsigned paths are refused…
    let refused = host
        .run(
            &nix,
            "nix",
            &[
                "copy",
                "--from",
                &format!("file://{}", unsigned.display()),
                "--option",
                "trusted-public-keys",
                &key.public,
                target,
            ],
        )
        .expect("run nix copy");
    assert_ne!(refused.code, Some(0), "unsigned copy must fail: {refused}");
    assert!(
        harness::strip_ansi(&refused.stderr).contains("signature"),
        "{refused}"
    );
    assert!(!host.has_path(target));

    // …signed ones are copied, and activation moves the host's links.
    let script = format!(
        "nix copy --from file://{} --option trusted-public-keys '{}' {target} && \
         {target}/bin/switch-to-configuration test && \
         nix-env -p /nix/var/nix/profiles/system --set {target} && \
         {target}/bin/switch-to-configuration boot && readlink /run/booted-system",
        signed.display(),
        key.public
    );
    let out = host.run(&nix, "sh", &["-c", &script]).expect("activate");
    out.expect_code(0).expect("activation in the namespace");
    assert_eq!(
        out.stdout.lines().last(),
        Some(old["worker-2"].as_str()),
        "booted-system stays: {out}"
    );
    assert!(host.has_path(target));
    assert_eq!(
        host.current_system().expect("read").as_deref(),
        Some(target)
    );
    assert_eq!(
        host.booted_system().expect("read").as_deref(),
        Some(old["worker-2"].as_str())
    );
    assert_eq!(
        host.system_profile().expect("read").as_deref(),
        Some(target)
    );
    assert_eq!(host.system_generation().expect("read"), "system-2-link");
    assert_eq!(host.boot_entry().expect("read").as_deref(), Some(target));
    // The namespace's mounts did not leak into this one.
    for outside in [
        "/run/current-system",
        "/nix/var/nix/procurator-test/boot-entry",
    ] {
        let link = std::fs::read_link(outside).ok();
        assert_ne!(
            link.as_deref(),
            Some(Path::new(target)),
            "{outside} changed outside the host"
        );
    }

    // The fail-activation marker makes `test` fail without touching /run.
    let failing = new["worker-1"].as_str();
    let script = format!(
        "nix copy --from file://{} --option trusted-public-keys '{}' {failing} && {failing}/bin/switch-to-configuration test",
        signed.display(),
        key.public
    );
    let out = host
        .run(&nix, "sh", &["-c", &script])
        .expect("run failing activation");
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("fail-activation"), "{out}");
    assert_eq!(
        host.current_system().expect("read").as_deref(),
        Some(target)
    );
}

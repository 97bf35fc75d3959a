//! `procurator_core::nix` against real Nix: build a tiny closure, publish it
//! to signed and unsigned `file://` caches, pull it into fresh chroot stores.

// A test that cannot set up should panic.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use procurator_core::StorePath;
use procurator_core::nix::{CopyProgress, Nix, NixError, PathInfoQuery};

const NIX_CONF: &str = "experimental-features = nix-command flakes
build-users-group =
substituters =
sandbox = true
sandbox-paths = /bin/sh=/bin/busybox
";

struct Fixture {
    dir: tempfile::TempDir,
    nix: Nix,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir(&conf).unwrap();
        std::fs::write(conf.join("nix.conf"), NIX_CONF).unwrap();
        let nix = Nix::new().with_env("NIX_CONF_DIR", &conf);
        Fixture { dir, nix }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A two-path closure unique to this test run.
    async fn closure(&self, tag: &str) -> StorePath {
        let unique = format!("{tag}-{}", self.dir.path().display());
        let expr = format!(
            r#"let dep = builtins.derivation {{ name = "dep"; system = "x86_64-linux"; builder = "/bin/sh";
                  args = [ "-c" "mkdir $out; echo {unique} > $out/data" ]; }};
               in builtins.derivation {{ name = "top"; system = "x86_64-linux"; builder = "/bin/sh";
                  args = [ "-c" "mkdir $out; echo ${{dep}} > $out/ref" ]; }}"#
        );
        let built = self
            .nix
            .build(&["--impure", "--expr", &expr])
            .await
            .unwrap();
        assert_eq!(built.len(), 1, "{built:?}");
        built.into_iter().next().unwrap()
    }

    /// A key pair: (secret key file, public key).
    fn key(&self, name: &str) -> (PathBuf, String) {
        let sk = self.path(&format!("{name}.sk"));
        let secret = run_nix(self, &["key", "generate-secret", "--key-name", name], None);
        std::fs::write(&sk, &secret).unwrap();
        let public = run_nix(self, &["key", "convert-secret-to-public"], Some(&secret));
        (sk, String::from_utf8(public).unwrap().trim().to_owned())
    }

    fn cache_url(&self, name: &str, key: Option<&Path>) -> String {
        let url = format!("file://{}", self.path(name).display());
        match key {
            Some(sk) => format!("{url}?secret-key={}", sk.display()),
            None => url,
        }
    }
}

fn run_nix(fixture: &Fixture, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = Command::new("nix")
        .args(args)
        .env("NIX_CONF_DIR", fixture.path("conf"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "nix {args:?} failed");
    out.stdout
}

fn is_in_store(root: &Path, closure: &StorePath) -> bool {
    root.join(closure.as_str().trim_start_matches('/')).exists()
}

#[tokio::test]
async fn copy_from_checks_signatures_against_only_the_given_keys() {
    let f = Fixture::new();
    let closure = f.closure("signed").await;
    let (sk, pk) = f.key("cache-1");
    let (_, other_pk) = f.key("other-1");
    f.nix
        .copy_to(
            &f.cache_url("signed", Some(&sk)),
            std::slice::from_ref(&closure),
        )
        .await
        .unwrap();
    f.nix
        .copy_to(
            &f.cache_url("unsigned", None),
            std::slice::from_ref(&closure),
        )
        .await
        .unwrap();

    // The right key: copied, with progress that ends at 2 of 2 paths.
    let dest = f.path("dest-ok");
    let mut seen = Vec::new();
    let last = f
        .nix
        .clone()
        .with_store(dest.display().to_string())
        .copy_from(
            &f.cache_url("signed", None),
            &closure,
            &[other_pk.clone(), pk.clone()],
            |p| seen.push(p),
        )
        .await
        .unwrap();
    assert!(is_in_store(&dest, &closure));
    assert_eq!((last.paths_done, last.paths_expected), (2, 2));
    // Bytes from the narinfos: Nix reports none from a file:// cache.
    let offered = f
        .nix
        .path_info(
            PathInfoQuery {
                store: Some(&f.cache_url("signed", None)),
                recursive: true,
                closure_size: false,
            },
            std::slice::from_ref(&closure),
        )
        .await
        .unwrap();
    let nar_bytes: u64 = offered.iter().map(|p| p.nar_size).sum();
    assert!(nar_bytes > 0, "{offered:?}");
    assert_eq!(
        (last.bytes_done, last.bytes_expected),
        (nar_bytes, nar_bytes)
    );
    assert!(seen.contains(&last) && seen.len() >= 2, "{seen:?}");
    assert!(seen.first().is_some_and(|p| p.paths_done < 2), "{seen:?}");

    // Another key: refused, and the message says why without colour codes.
    for (cache, keys) in [
        ("signed", vec![other_pk.clone()]),
        ("unsigned", vec![pk.clone()]),
        ("signed", vec![]),
    ] {
        let dest = f.path(&format!("dest-{cache}-{}", keys.len()));
        let err = f
            .nix
            .clone()
            .with_store(dest.display().to_string())
            .copy_from(
                &f.cache_url(cache, None),
                &closure,
                &keys,
                |_: CopyProgress| {},
            )
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, NixError::Failed { .. }), "{text}");
        assert!(
            text.contains("lacks a valid signature"),
            "{cache} {keys:?}: {text}"
        );
        assert!(text.starts_with("nix copy --from file://"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert!(!is_in_store(&dest, &closure));
    }
}

#[tokio::test]
async fn copy_from_a_cache_without_the_closure_fails_clearly() {
    let f = Fixture::new();
    let closure = f.closure("missing").await;
    std::fs::create_dir(f.path("empty")).unwrap();
    let err = f
        .nix
        .clone()
        .with_store(f.path("dest").display().to_string())
        .copy_from(&f.cache_url("empty", None), &closure, &[], |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains(closure.as_str()), "{err}");
}

#[tokio::test]
async fn version_and_profiles() {
    let f = Fixture::new();
    let version = f.nix.version().await.unwrap();
    assert!(version.starts_with("nix (Nix) "), "{version}");

    let first = f.closure("profile-1").await;
    let second = f.closure("profile-2").await;
    let profile = f.path("profiles/system");
    std::fs::create_dir_all(profile.parent().unwrap()).unwrap();
    f.nix.set_profile(&profile, &first).await.unwrap();
    f.nix.set_profile(&profile, &second).await.unwrap();
    assert_eq!(
        std::fs::canonicalize(&profile).unwrap(),
        Path::new(second.as_str())
    );
    assert_eq!(
        std::fs::canonicalize(f.path("profiles/system-1-link")).unwrap(),
        Path::new(first.as_str())
    );

    let missing = StorePath::parse("/nix/store/00000000000000000000000000000000-gone").unwrap();
    let err = f.nix.set_profile(&profile, &missing).await.unwrap_err();
    assert!(err.to_string().starts_with("nix-env -p "), "{err}");
    assert_eq!(
        std::fs::canonicalize(&profile).unwrap(),
        Path::new(second.as_str())
    );
}

#[tokio::test]
async fn build_and_eval_report_nix_errors() {
    let f = Fixture::new();
    let value = f
        .nix
        .eval_json(&["--expr", "{ a = 1; b = [ \"x\" ]; }"])
        .await
        .unwrap();
    assert_eq!(value, serde_json::json!({ "a": 1, "b": ["x"] }));
    let err = f
        .nix
        .eval_json(&["--expr", "throw \"no such machine\""])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no such machine"), "{err}");
    assert!(!err.to_string().contains('\u{1b}'), "{err:?}");
}

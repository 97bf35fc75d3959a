use super::*;

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const TWO: &str = r#"
current-context = "a"

[contexts.a]
control-plane = "https://a.example:7700"
tls-ca = "a/ca.crt"
tls-cert = "~/a.crt"
tls-key = "/etc/a.key"

[contexts.b]
control-plane = ["https://b-1.example:7700", "https://b-2.example:7700"]
intent-key = "b.secret"
"#;

#[test]
fn the_current_context_is_used_unless_one_is_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), TWO);
    let (name, why, a) = context(Some(&path), None, Some("/home/op"))
        .unwrap()
        .unwrap();
    assert_eq!((name.as_str(), why.as_str()), ("a", "current-context"));
    assert_eq!(a.control_plane, ["https://a.example:7700"]);
    assert_eq!(
        a.tls_ca,
        Some(dir.path().join("a/ca.crt")),
        "relative to the file"
    );
    assert_eq!(
        a.tls_cert,
        Some(PathBuf::from("/home/op/a.crt")),
        "~ is home"
    );
    assert_eq!(a.tls_key, Some(PathBuf::from("/etc/a.key")));

    let chosen = Some(("b".to_owned(), "--context".to_owned()));
    let (name, _, b) = context(Some(&path), chosen, None).unwrap().unwrap();
    assert_eq!(name, "b");
    assert_eq!(b.control_plane.len(), 2);
    assert_eq!(b.intent_key, Some(dir.path().join("b.secret")));
}

#[test]
fn an_unknown_context_or_a_broken_file_is_an_error_that_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), TWO);
    let chosen = Some(("prod".to_owned(), "$PROCURATOR_CONTEXT".to_owned()));
    let err = context(Some(&path), chosen.clone(), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("$PROCURATOR_CONTEXT names context \"prod\"")
            && err.contains("it holds: a, b"),
        "{err}"
    );

    let missing = dir.path().join("none.toml");
    let err = context(Some(&missing), chosen, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("there is no config file"), "{err}");
    assert_eq!(
        context(Some(&missing), None, None).unwrap(),
        None,
        "no file, no context: nothing"
    );

    let broken = write(dir.path(), "[contexts.a]\ncontrol-plan = \"x\"\n");
    let err = format!("{:#}", context(Some(&broken), None, None).unwrap_err());
    assert!(
        err.contains("is not a valid config file") && err.contains("control-plan"),
        "{err}"
    );
}

#[test]
fn the_file_is_found_by_variable_then_xdg_then_home() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let explicit = env(&[("PROCURATOR_CONFIG", "/x/c.toml"), ("HOME", "/h")]);
    assert_eq!(config_path(&explicit), Some(PathBuf::from("/x/c.toml")));
    let xdg = env(&[("XDG_CONFIG_HOME", "/xdg"), ("HOME", "/h")]);
    assert_eq!(
        config_path(&xdg),
        Some(PathBuf::from("/xdg/procurator/config.toml"))
    );
    let home = env(&[("HOME", "/h")]);
    assert_eq!(
        config_path(&home),
        Some(PathBuf::from("/h/.config/procurator/config.toml"))
    );
    assert_eq!(config_path(&env(&[])), None);
}

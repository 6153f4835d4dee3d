//! Configuration layering, environment lists, validation messages, and the CLI around them.

use std::collections::HashMap;

use ordercloud_cdp_forwarder::config::{ConfigSources, Settings};

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn later_layers_win() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "config/default.toml",
        "[ordercloud]\nhash_keys=[\"from-default-0001\"]\n[cdp]\ndry_run=true\nlanguage=\"DE\"\ncurrency=\"EUR\"\nchannel=\"MOBILE_WEB\"\n",
    );
    let file = write(
        dir.path(),
        "override.toml",
        "[cdp]\ncurrency=\"GBP\"\nchannel=\"MOBILE_APP\"\n",
    );
    let sources = ConfigSources {
        file: Some(file),
        base_dir: Some(dir.path().to_path_buf()),
    };
    let s = Settings::load_with_env(&sources, Some(env(&[("FORWARDER__CDP__CHANNEL", "WEB")]))).unwrap();
    assert_eq!(s.cdp.language, "DE", "default.toml over built-in defaults");
    assert_eq!(s.cdp.currency, "GBP", "--config file over default.toml");
    assert_eq!(s.cdp.channel, "WEB", "environment over the file");
    assert_eq!(s.server.listen, "0.0.0.0:8080", "built-in default");
    assert_eq!(s.ordercloud.hash_keys[0].expose(), "from-default-0001");
}

/// The shipped config/default.toml allows the same OrderCloud hosts as the built-in default: every
/// documented one, so a token of `https://westeurope-production.ordercloud.io` is enriched.
#[test]
fn the_shipped_defaults_allow_every_documented_ordercloud_host() {
    let sources = ConfigSources {
        file: None,
        base_dir: Some(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    };
    let s = Settings::load_with_env(
        &sources,
        Some(env(&[
            ("FORWARDER__ORDERCLOUD__HASH_KEYS", "shipped-default-01"),
            ("FORWARDER__CDP__DRY_RUN", "true"),
        ])),
    )
    .unwrap();
    let built_in: Vec<String> = ordercloud_cdp_forwarder::config::ORDERCLOUD_API_HOSTS
        .iter()
        .map(|h| h.to_string())
        .collect();
    assert_eq!(s.ordercloud.api_urls, built_in);
    assert!(s
        .ordercloud
        .api_urls
        .iter()
        .any(|u| u == "https://westeurope-production.ordercloud.io"));
    assert_eq!(s.ordercloud.api_urls.len(), 15);
}

#[test]
fn environment_lists_are_comma_separated() {
    let dir = tempfile::tempdir().unwrap();
    let sources = ConfigSources {
        file: None,
        base_dir: Some(dir.path().to_path_buf()),
    };
    let s = Settings::load_with_env(
        &sources,
        Some(env(&[
            ("FORWARDER__ORDERCLOUD__HASH_KEYS", "first-key-000001,second-key-00002"),
            (
                "FORWARDER__ORDERCLOUD__API_URLS",
                "http://127.0.0.1:1,https://api.ordercloud.io",
            ),
            ("FORWARDER__CDP__DRY_RUN", "true"),
            ("FORWARDER__SERVER__MAX_BODY_BYTES", "2048"),
        ])),
    )
    .unwrap();
    let keys: Vec<&str> = s.ordercloud.hash_keys.iter().map(|k| k.expose()).collect();
    assert_eq!(keys, ["first-key-000001", "second-key-00002"]);
    assert_eq!(
        s.ordercloud.api_urls,
        ["http://127.0.0.1:1", "https://api.ordercloud.io"]
    );
    assert_eq!(s.server.max_body_bytes, 2048);
}

#[test]
fn missing_hash_key_is_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let sources = ConfigSources {
        file: None,
        base_dir: Some(dir.path().to_path_buf()),
    };
    let err = Settings::load_with_env(&sources, Some(env(&[("FORWARDER__CDP__DRY_RUN", "true")])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ordercloud.hash_keys"), "{err}");
    assert!(err.contains("FORWARDER__ORDERCLOUD__HASH_KEYS"), "{err}");
}

/// The order ledger's settings: a client id needs its secret; the dedupe must remember submits
/// for as long as a pass looks back; the secret never prints.
#[test]
fn reconciliation_settings_are_checked_and_the_client_secret_never_prints() {
    let dir = tempfile::tempdir().unwrap();
    let sources = ConfigSources {
        file: None,
        base_dir: Some(dir.path().to_path_buf()),
    };
    let base = [
        ("FORWARDER__ORDERCLOUD__HASH_KEYS", "reconcile-key-0001"),
        ("FORWARDER__CDP__DRY_RUN", "true"),
        ("FORWARDER__ORDERCLOUD__CLIENT_ID", "ledger"),
    ];
    let err = Settings::load_with_env(&sources, Some(env(&base)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ordercloud.client_secret"), "{err}");
    let mut short = base.to_vec();
    short.extend([
        ("FORWARDER__ORDERCLOUD__CLIENT_SECRET", "ledger-secret-123"),
        ("FORWARDER__STORE__DEDUPE_RETENTION_SECS", "3600"),
    ]);
    let err = Settings::load_with_env(&sources, Some(env(&short)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("store.dedupe_retention_secs"), "{err}");
    assert!(!err.contains("ledger-secret-123"), "{err}");
    let mut good = base.to_vec();
    good.push(("FORWARDER__ORDERCLOUD__CLIENT_SECRET", "ledger-secret-123"));
    // The default ordercloud.api_urls lists every region's host: which one is the marketplace's?
    let err = Settings::load_with_env(&sources, Some(env(&good)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("reconcile.api_url"), "{err}");
    good.push((
        "FORWARDER__ORDERCLOUD__API_URLS",
        "https://westeurope-production.ordercloud.io",
    ));
    let s = Settings::load_with_env(&sources, Some(env(&good))).unwrap();
    assert!(s.reconciles());
    assert_eq!(
        s.reconcile_api_url(),
        "https://westeurope-production.ordercloud.io",
        "the only one of ordercloud.api_urls"
    );
    // The client secret never goes over plain HTTP to another machine.
    good.push(("FORWARDER__RECONCILE__API_URL", "http://api.ordercloud.io"));
    let err = Settings::load_with_env(&sources, Some(env(&good)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("https"), "{err}");
    let printed = format!("{s:?} {}", serde_json::to_string(&s).unwrap());
    assert!(!printed.contains("ledger-secret-123"), "{printed}");
}

#[test]
fn invalid_values_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let sources = ConfigSources {
        file: None,
        base_dir: Some(dir.path().to_path_buf()),
    };
    let err = Settings::load_with_env(
        &sources,
        Some(env(&[
            ("FORWARDER__ORDERCLOUD__HASH_KEYS", "k"),
            ("FORWARDER__CDP__LANGUAGE", "en-US"),
            ("FORWARDER__CDP__CLIENT_KEY", "ck"),
        ])),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cdp.language"), "{err}");
    assert!(err.contains("cdp.pos"), "{err}");
}

fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_ordercloud-cdp-forwarder"))
}

#[test]
fn check_config_masks_secrets_and_fails_on_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let ok = bin()
        .current_dir(dir.path())
        .arg("check-config")
        .env("FORWARDER__ORDERCLOUD__HASH_KEYS", "super-secret-hash-key")
        .env("FORWARDER__CDP__CLIENT_KEY", "super-secret-client-key")
        .env("FORWARDER__CDP__POS", "shop")
        .env(
            "FORWARDER__STORE__URL",
            "postgres://forwarder:super-secret-db-password@db/forwarder",
        )
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains("\"pos\": \"shop\""), "{out}");
    assert!(!out.contains("super-secret"), "secrets printed: {out}");
    assert!(out.contains("********"));
    assert!(out.contains("postgres://forwarder:********@db/forwarder"), "{out}");

    let bad = bin().current_dir(dir.path()).arg("check-config").output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("ordercloud.hash_keys"));
}

/// The key can stay out of argv: `--key-file` (trailing newline trimmed) or `FORWARDER_SIGN_KEY`.
#[test]
fn sign_reads_the_key_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let body = r#"{"Route":"v1/buyers/{buyerID}/addresses/{addressID}","Verb":"PUT","Request":{"Body":{"City":"Minneapolis"}},"ConfigData":{"Foo":"blah"}}"#;
    let file = write(dir.path(), "a.json", body);
    let key_file = write(dir.path(), "key", "myhashkey\n");
    let vector = "4NPw1O9AviSOC1A3C+HqkDutRLNwyABneY/3M2OqByE=";
    let out = bin()
        .args(["sign", "--key-file"])
        .arg(&key_file)
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), vector);
    let out = bin()
        .arg("sign")
        .arg(&file)
        .env("FORWARDER_SIGN_KEY", "myhashkey")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), vector);
    let none = bin()
        .arg("sign")
        .arg(&file)
        .env_remove("FORWARDER_SIGN_KEY")
        .output()
        .unwrap();
    assert!(!none.status.success(), "no key is an error");
}

#[test]
fn sign_prints_vector_a() {
    let dir = tempfile::tempdir().unwrap();
    let body = r#"{"Route":"v1/buyers/{buyerID}/addresses/{addressID}","Verb":"PUT","Request":{"Body":{"City":"Minneapolis"}},"ConfigData":{"Foo":"blah"}}"#;
    let file = write(dir.path(), "a.json", body);
    let out = bin().args(["sign", "--key", "myhashkey"]).arg(&file).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "4NPw1O9AviSOC1A3C+HqkDutRLNwyABneY/3M2OqByE="
    );
}

/// With the landing check on, the dedupe must remember a repair until its check can come due again
/// (`delivery.max_age_secs` + `reconcile.verify_after_secs`): a shorter retention is refused at
/// start, and the API token is not shown.
#[test]
fn a_dedupe_shorter_than_a_landing_checks_round_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sources = ConfigSources {
        file: None,
        base_dir: Some(dir.path().to_path_buf()),
    };
    let base = [
        ("FORWARDER__ORDERCLOUD__HASH_KEYS", "landing-key-0001"),
        ("FORWARDER__CDP__CLIENT_KEY", "ck"),
        ("FORWARDER__CDP__POS", "pos"),
        ("FORWARDER__CDP__API_TOKEN", "cdp-api-token-secret-9"),
    ];
    let mut short = base.to_vec();
    short.push(("FORWARDER__STORE__DEDUPE_RETENTION_SECS", "3600"));
    let err = Settings::load_with_env(&sources, Some(env(&short)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("store.dedupe_retention_secs") && err.contains("delivery.max_age_secs"),
        "{err}"
    );
    assert!(!err.contains("cdp-api-token-secret-9"), "{err}");
    Settings::load_with_env(&sources, Some(env(&base))).expect("the defaults cover it");
    // The landing check looks once the CHECKOUT's session has closed.
    let mut early = base.to_vec();
    early.push(("FORWARDER__RECONCILE__VERIFY_AFTER_SECS", "60"));
    let err = Settings::load_with_env(&sources, Some(env(&early)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reconcile.verify_after_secs") && err.contains("cdp.session_timeout_secs"),
        "{err}"
    );
}

/// A key no setting has (a typo) stops the service at start and is named, instead of being ignored
/// (`ADMINLISTEN` would have left the operations routes on the public port); an empty or plain-http
/// `ordercloud.api_urls` is refused; secrets lose the newline a secret file leaves.
#[test]
fn unknown_keys_bad_ordercloud_hosts_and_untrimmed_secrets_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let sources = ConfigSources {
        file: None,
        base_dir: Some(dir.path().to_path_buf()),
    };
    let base = [
        ("FORWARDER__ORDERCLOUD__HASH_KEYS", "typo-key-0000001"),
        ("FORWARDER__CDP__CLIENT_KEY", "ck-from-a-file\n"),
        ("FORWARDER__CDP__POS", "pos"),
    ];
    let settings = Settings::load_with_env(&sources, Some(env(&base))).expect("valid");
    assert_eq!(settings.cdp.client_key.expose(), "ck-from-a-file");

    let mut typo = base.to_vec();
    typo.push(("FORWARDER__SERVER__ADMINLISTEN", "0.0.0.0:9090"));
    let err = Settings::load_with_env(&sources, Some(env(&typo)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("adminlisten"), "{err}");

    let mut empty = base.to_vec();
    empty.push(("FORWARDER__ORDERCLOUD__API_URLS", ""));
    let err = Settings::load_with_env(&sources, Some(env(&empty)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ordercloud.api_urls is empty"), "{err}");

    let mut plain = base.to_vec();
    plain.push(("FORWARDER__ORDERCLOUD__API_URLS", "http://api.ordercloud.io"));
    let err = Settings::load_with_env(&sources, Some(env(&plain)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an https URL"), "{err}");
    let mut local = base.to_vec();
    local.push(("FORWARDER__ORDERCLOUD__API_URLS", "http://127.0.0.1:8081"));
    Settings::load_with_env(&sources, Some(env(&local))).expect("plain http to this machine");
}

/// An idle replica asks the store for work every `delivery.poll_interval_ms`: 0 (or a few
/// milliseconds) made the dispatcher a loop hammering the store. And a reconciliation without lag
/// would move its watermark past orders OrderCloud's lists have not yet caught up with. Both are
/// refused at start, named.
#[test]
fn a_poll_interval_that_would_spin_and_a_reconciliation_without_lag_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sources = ConfigSources {
        file: None,
        base_dir: Some(dir.path().to_path_buf()),
    };
    let load = |extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("FORWARDER__ORDERCLOUD__HASH_KEYS", "a-long-enough-hash-key-0123456789"),
            ("FORWARDER__CDP__CLIENT_KEY", "ck"),
            ("FORWARDER__CDP__POS", "pos"),
            ("FORWARDER__ORDERCLOUD__CLIENT_ID", "ledger"),
            ("FORWARDER__ORDERCLOUD__CLIENT_SECRET", "ledger-secret-123"),
            ("FORWARDER__RECONCILE__API_URL", "https://api.ordercloud.io"),
        ];
        pairs.extend_from_slice(extra);
        Settings::load_with_env(&sources, Some(env(&pairs))).map_err(|e| e.to_string())
    };
    load(&[]).expect("the defaults start");
    for poll in ["0", "9"] {
        let err = load(&[("FORWARDER__DELIVERY__POLL_INTERVAL_MS", poll)]).unwrap_err();
        assert!(err.contains("delivery.poll_interval_ms"), "{err}");
    }
    load(&[("FORWARDER__DELIVERY__POLL_INTERVAL_MS", "10")]).expect("10 ms is allowed");
    let err = load(&[("FORWARDER__RECONCILE__LAG_SECS", "0")]).unwrap_err();
    assert!(err.contains("reconcile.lag_secs"), "{err}");
}

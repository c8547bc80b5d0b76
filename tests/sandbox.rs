//! Adversarial tests: each hostile guest attempts one breach and must fail
//! its own stage with a reason naming the cause, while the host keeps
//! running and a deployment of another application, run beside the attack
//! on the same engine, succeeds. The positive side — granted access works —
//! is shown with the `probe` guest.

use cordon_runtime::runner::{Outcome, Status};
use cordon_tests::{Dirs, Server, beside_a_neighbour, load, run};

/// The stage failed, with a reason containing `expected`, and was not a
/// breach.
fn assert_contained(outcome: &Outcome, expected: &[&str]) {
    eprintln!("reason: {}", outcome.message);
    assert_eq!(outcome.status, Status::Failure, "breach not stopped: {outcome:?}");
    assert!(!outcome.message.contains("BREACH"), "{outcome:?}");
    for e in expected {
        assert!(outcome.message.contains(e), "expected {e:?} in the reason: {:?}", outcome.message);
    }
}

#[tokio::test]
async fn dotdot_cannot_leave_the_source() {
    let plugin = load("fs-dotdot", "").await.unwrap();
    let dirs = Dirs::new();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "FS_DOTDOT", "{}", dirs.run_dirs())).await;
    assert_contained(&outcome, &["/source/../../../../etc/hostname", "not permitted"]);
}

#[tokio::test]
async fn absolute_paths_do_not_exist() {
    let plugin = load("fs-absolute", "").await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "FS_ABSOLUTE", "{}", Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["read /etc/hostname"]);
}

#[tokio::test]
async fn planted_symlinks_do_not_lead_outside() {
    let plugin = load("fs-symlink", "").await.unwrap();
    let dirs = Dirs::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "host secret").unwrap();
    let src = dirs.source.path();
    std::os::unix::fs::symlink(outside.path(), src.join("escape")).unwrap();
    std::os::unix::fs::symlink("escape", src.join("chain")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), src.join("trailing")).unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "FS_SYMLINK", "{}", dirs.run_dirs())).await;
    assert_contained(&outcome, &["escape/secret.txt", "chain/secret.txt", "trailing/"]);
    assert!(!outcome.message.contains("host secret"));
}

/// Runs a guest that attacks the read-only source and checks the source is
/// byte-for-byte what it was.
async fn read_only_attack(guest: &str, stage: &str, expected: &[&str]) {
    let plugin = load(guest, "").await.unwrap();
    let dirs = Dirs::new();
    let before = dirs.snapshot();
    let (outcome, _) = beside_a_neighbour(run(&plugin, stage, "{}", dirs.run_dirs())).await;
    assert_eq!(dirs.snapshot(), before, "the read-only source changed: {outcome:?}");
    assert_contained(&outcome, expected);
}

#[tokio::test]
async fn read_only_source_refuses_writes() {
    read_only_attack("ro-write", "RO_WRITE", &["create /source/planted.txt", "append /source/index.html", "mkdir /source/newdir"]).await;
}

#[tokio::test]
async fn read_only_source_refuses_truncation() {
    read_only_attack("ro-truncate", "RO_TRUNCATE", &["open /source/index.html with truncate", "set_len /source/index.html"]).await;
}

#[tokio::test]
async fn read_only_source_refuses_renames() {
    read_only_attack("ro-rename", "RO_RENAME", &["/scratch/mine.txt -> /source/index.html", "/source/index.html -> /source/moved.html", "/source/index.html -> /scratch/stolen.html"]).await;
}

#[tokio::test]
async fn read_only_source_refuses_hard_links() {
    read_only_attack("ro-hardlink", "RO_HARDLINK", &["/scratch/mine.txt -> /source/linked.txt", "/source/index.html -> /scratch/index-link.html"]).await;
}

#[tokio::test]
async fn tcp_needs_a_grant() {
    let server = Server::ok("hello").await;
    let target = format!("\"127.0.0.1:{}\"", server.port);
    // No network grant at all: sockets cannot even be created.
    let plugin = load("net-connect", "").await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "NET_CONNECT", &target, Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &[&format!("connect 127.0.0.1:{}", server.port)]);
    // A grant for another destination: the host names the refused address.
    let plugin = load("net-connect", "    grants: { network: { allow: [\"tcp://127.0.0.1:1\"] } }\n").await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "NET_CONNECT", &target, Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &[&format!("sandbox denied TCP connection to 127.0.0.1:{}", server.port)]);
    assert_eq!(server.hits(), 0, "a denied connection reached the server");
}

#[tokio::test]
async fn http_needs_a_grant() {
    let server = Server::ok("hello").await;
    let plugin = load("net-http", "    grants: { network: { allow: [\"http://127.0.0.1:1\"] } }\n").await.unwrap();
    let url = format!("\"http://127.0.0.1:{}/\"", server.port);
    let (outcome, _) = beside_a_neighbour(run(&plugin, "NET_HTTP", &url, Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &[&format!("sandbox denied HTTP request to http://127.0.0.1:{}", server.port), "denied"]);
    assert_eq!(outcome.message.matches("sandbox denied").count(), 1, "the denial is named once: {}", outcome.message);
    assert_eq!(server.hits(), 0);
}

/// `*` grants never reach the unspecified address (which Linux routes to
/// the local host) or any other special address, however the guest writes it.
#[tokio::test]
async fn wildcard_grants_never_reach_special_literals() {
    let server = Server::ok("hello").await;
    let plugin = load("net-http", "    grants: { network: { allow: [\"http://*:*\"] } }\n").await.unwrap();
    for host in ["0.0.0.0", "[::ffff:0.0.0.0]", "[::]"] {
        let url = format!("\"http://{host}:{}/\"", server.port);
        let (outcome, _) = beside_a_neighbour(run(&plugin, "NET_HTTP", &url, Dirs::new().run_dirs())).await;
        assert_contained(&outcome, &["sandbox denied HTTP request to http://"]);
    }
    assert_eq!(server.hits(), 0, "a special address was reached through a wildcard grant");
    let url = format!("\"http://127.0.0.1:{}/\"", server.port);
    let (outcome, _) = beside_a_neighbour(run(&plugin, "NET_HTTP", &url, Dirs::new().run_dirs())).await;
    assert!(outcome.message.contains("BREACH"), "the wildcard grant should reach loopback: {}", outcome.message);
}

#[tokio::test]
async fn name_lookup_needs_a_grant() {
    let plugin = load("net-lookup", "").await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "NET_LOOKUP", "{}", Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["lookup localhost:80"]);
}

#[tokio::test]
async fn redirects_are_checked_hop_by_hop() {
    let forbidden = Server::ok("you should not see this").await;
    let target = forbidden.port;
    let allowed = Server::start(move |_| {
        format!("HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:{target}/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    })
    .await;
    let grant = format!("    grants: {{ network: {{ allow: [\"http://127.0.0.1:{}\"] }} }}\n", allowed.port);
    let plugin = load("net-redirect", &grant).await.unwrap();
    let url = format!("\"http://127.0.0.1:{}/start\"", allowed.port);
    let (outcome, _) = beside_a_neighbour(run(&plugin, "NET_REDIRECT", &url, Dirs::new().run_dirs())).await;
    assert_eq!(allowed.hits(), 1, "the granted host must be reached: {outcome:?}");
    assert_contained(&outcome, &[&format!("sandbox denied HTTP request to http://127.0.0.1:{target}")]);
    assert_eq!(forbidden.hits(), 0, "the redirect target was reached");
}

#[tokio::test]
async fn infinite_loop_times_out() {
    let plugin = load("spin", "    limits: { timeout: 1s }\n").await.unwrap();
    let started = std::time::Instant::now();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "SPIN", "{}", Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["timed out after 1s"]);
    assert!(started.elapsed().as_secs() < 10, "the timeout took {:?}", started.elapsed());
}

#[tokio::test]
async fn memory_bomb_hits_the_cap() {
    let plugin = load("memory-bomb", "    limits: { memory: 64MiB }\n").await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "MEMORY_BOMB", "{}", Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["memory limit exceeded", "its limit is 67108864 bytes"]);
}

#[tokio::test]
async fn unbounded_recursion_overflows_cleanly() {
    let plugin = load("recursion", "").await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "RECURSION", "{}", Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["stack overflow"]);
}

#[tokio::test]
async fn panic_is_reported_with_its_message() {
    let plugin = load("panic", "").await.unwrap();
    let (outcome, log) = beside_a_neighbour(run(&plugin, "PANIC", "{}", Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["plugin panicked", "hostile guest panicked on purpose"]);
    assert!(log.text().contains("hostile guest panicked on purpose"), "{}", log.text());
}

#[tokio::test]
async fn log_flood_is_capped_and_the_stage_ends() {
    let plugin = load("log-flood", "    limits: { log-bytes: 64KiB }\n").await.unwrap();
    let (outcome, log) = beside_a_neighbour(run(&plugin, "LOG_FLOOD", "{}", Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["log output passed the plugin's limit of 65536 bytes"]);
    assert!(log.bytes() < 65536 + 1024, "{} bytes of log were kept", log.bytes());
}

/// One `log.write` of four million empty lines is charged per line before
/// any is stored: the stage fails at once instead of storing millions of
/// lines (one transaction each) past its timeout.
#[tokio::test]
async fn empty_line_floods_are_charged_per_line() {
    let plugin = load("log-flood", "    limits: { log-lines: 1000 }\n").await.unwrap();
    let (outcome, log) = beside_a_neighbour(run(&plugin, "LOG_FLOOD", "\"newlines\"", Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["log output passed the plugin's limit of"]);
    let kept = log.0.lock().unwrap().len();
    assert!(kept <= 1, "{kept} lines were kept");
}

/// Descriptors are handles: a plugin that hoards them stops at its own
/// budget, far below the process's limit, and the host's descriptors are
/// all given back when the call ends.
#[tokio::test]
async fn descriptor_hoarding_stops_at_the_handle_budget() {
    let open_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = open_fds();
    let plugin = load("fd-hoard", "    limits: { handles: 200 }\n").await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "FD_HOARD", "{}", Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["handle limit exceeded", "limits.handles"]);
    assert!(open_fds() < before + 150, "descriptors leaked: {} before, {} after", before, open_fds());
}

/// Filling `/scratch` stops at `limits.scratch`, whether with bytes or
/// with empty files (each entry is charged), within one walk's overshoot.
#[tokio::test]
async fn scratch_stops_at_its_disk_budget() {
    let plugin = load("disk-fill", "    limits: { scratch: 8MiB }\n").await.unwrap();
    for options in [r#"{"dir": "/scratch"}"#, r#"{"dir": "/scratch", "files": true}"#] {
        let dirs = Dirs::new();
        let (outcome, _) = beside_a_neighbour(run(&plugin, "DISK_FILL", options, dirs.run_dirs())).await;
        assert_contained(&outcome, &["disk budget exceeded: /scratch took", "its limit is 8388608 bytes", "limits.scratch"]);
        let used = cordon_runtime::sandbox::disk::usage(dirs.scratch.path());
        eprintln!("{options}: /scratch holds {used} bytes against a budget of 8 MiB");
        assert!(used < 8 * (1 << 20) + (256 << 20), "overshoot beyond a walk's worth: {used}");
    }
}

/// A read-write mount with a `quota` is budgeted the same way, and its
/// reason names the mount; a quota on a read-only mount is refused.
#[tokio::test]
async fn a_mount_quota_bounds_a_read_write_mount() {
    let www = tempfile::tempdir().unwrap();
    let grants = format!("    grants: {{ mounts: [{{ host: {}, guest: /www, access: read-write, quota: 4MiB }}] }}\n", www.path().display());
    let plugin = load("disk-fill", &grants).await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "DISK_FILL", r#"{"dir": "/www"}"#, Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["disk budget exceeded: /www took", "the `quota` of the mount at /www"]);
    let read_only = grants.replace("read-write", "read-only");
    let err = format!("{:#}", load("disk-fill", &read_only).await.err().unwrap());
    assert!(err.contains("is read-only, so its `quota` means nothing"), "{err}");
}

/// Metadata and blobs stop at their quotas with an error the plugin sees;
/// the reason names the limits.
#[tokio::test]
async fn durable_state_stops_at_its_quotas() {
    let plugin = load("state-flood", "    limits: { metadata-bytes: 1MiB, blob-bytes: 40MiB }\n").await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "STATE_FLOOD", r#""metadata""#, Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["refused after 15 writes (15 metadata entries)", "the deployment's metadata may hold 1000 entries and 1048576 bytes", "limits.metadata-bytes"]);
    let (outcome, _) = beside_a_neighbour(run(&plugin, "STATE_FLOOD", r#""blobs""#, Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["refused after 2 writes", "the blobs of this plugin and application may hold 64 entries", "limits.blob-bytes"]);
}

/// Header maps are small and count as handles: a flood of them stops at
/// the handle budget, and an oversized header is refused.
#[tokio::test]
async fn http_fields_are_bounded_host_resources() {
    let plugin = load("http-flood", "    limits: { handles: 512 }\n").await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "HTTP_FLOOD", r#""fields""#, Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["handle limit exceeded"]);
    let (outcome, _) = beside_a_neighbour(run(&plugin, "HTTP_FLOOD", r#""big""#, Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["HTTP header limit exceeded", "limit of 32768 bytes"]);
}

/// At most 16 requests of a call are in flight at once; the rest are
/// refused, and the reason says so.
#[tokio::test]
async fn http_requests_in_flight_are_capped() {
    let server = Server::ok("pong").await;
    let grants = format!("    grants: {{ network: {{ allow: [\"http://127.0.0.1:{}\"] }} }}\n", server.port);
    let plugin = load("http-flood", &grants).await.unwrap();
    let options = serde_json::json!({ "requests": format!("127.0.0.1:{}", server.port) }).to_string();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "HTTP_FLOOD", &options, Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["request refused after 16 answered", "an HTTP request beyond 16 in flight at once"]);
}

/// A plugin that runs far more calls at once than its share of the
/// instance pool allows makes its own calls wait — those that wait their
/// whole timeout fail saying so — never another application's: the
/// neighbour deploys beside them, and no call fails for want of a slot in
/// the pool itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_calls_of_one_plugin_leave_the_pool_to_others() {
    let plugin = std::sync::Arc::new(load("spin", "    limits: { timeout: 1s }\n").await.unwrap());
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let plugin = plugin.clone();
        calls.spawn(async move { run(&plugin, "SPIN", "{}", Dirs::new().run_dirs()).await.0 });
    }
    let outcomes = beside_a_neighbour(calls.join_all()).await;
    let waited = outcomes.iter().filter(|o| o.message.contains("no instance slot became free within 1s")).count();
    eprintln!("{} calls ran until their timeout, {waited} waited for a slot of the plugin's share", outcomes.len() - waited);
    assert!(waited > 0, "300 calls at once should pass one plugin's share of the pool");
    for outcome in &outcomes {
        assert_eq!(outcome.status, Status::Failure);
        assert!(outcome.message.contains("timed out after 1s") || outcome.message.contains("no instance slot"), "{outcome:?}");
    }
}

#[tokio::test]
async fn huge_return_value_is_refused() {
    let plugin = load("huge-return", "").await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "HUGE_RETURN", "{}", Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["above the plugin's limit of 1048576 bytes"]);
    assert!(outcome.message.len() < 1024);
}

/// The optional `options` export is a call like any other: schemas over the
/// result limit together are refused while they are read (the plugin does
/// not load), a check that never returns ends within the plan-time cap
/// (10 s) though the plugin's own timeout is an hour, and the refusal's
/// words come back masked, for the CLI to print escaped.
#[tokio::test]
async fn the_options_export_cannot_hold_the_host() {
    let err = format!("{:#}", load("options-abuse", "").await.err().expect("four 300 KiB schemas loaded under a 1 MiB result limit"));
    assert!(err.contains("cannot read the schemas of its options") && err.contains("above the plugin's limit of 1048576 bytes"), "{err}");
    let inspect = std::process::Command::new(cordon_tests::cordon_bin()).args(["plugin", "inspect"]).arg(cordon_tests::guest("options-abuse")).output().unwrap();
    let said = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success() && said.contains("options:   cannot be read: returned 1228876 bytes, above the plugin's limit"), "{said}");
    let plugin = load("options-abuse", "    limits: { result-bytes: 2MiB, timeout: 1h }\n").await.unwrap();
    assert_eq!(plugin.described.as_ref().map(|d| d.stages.len()), Some(4));
    let engine = cordon_tests::engine();
    let subject = cordon_runtime::plugin::Subject::Stage("ABUSE_A".into());
    let started = std::time::Instant::now();
    let spun = beside_a_neighbour(cordon_runtime::runner::check_options(engine, &plugin, &subject, r#"{"spin": true}"#)).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "the check ran {:?}", started.elapsed());
    assert!(spun.as_ref().is_err_and(|e| e.to_string().contains("timed out after 10s")), "{spun:?}");
    let refused = cordon_runtime::runner::check_options(engine, &plugin, &subject, "{}").await.unwrap();
    assert_eq!(refused, Err("the options say \u{1b}[31mred\u{1b}[0m".to_string()));
}

#[tokio::test]
async fn env_is_only_what_was_granted() {
    // SAFETY: set before any thread of this test reads the environment; the
    // variable is unique to this test.
    unsafe { std::env::set_var("CORDON_TEST_SECRET", "agent-only") };
    let plugin = load("env-read", "    grants: { env: { GRANTED: yes } }\n").await.unwrap();
    let (outcome, _) = beside_a_neighbour(run(&plugin, "ENV_READ", "{}", Dirs::new().run_dirs())).await;
    assert_contained(&outcome, &["env CORDON_TEST_SECRET", "visible vars: [GRANTED]"]);
    assert!(!outcome.message.contains("agent-only"));
}

/// A granted secret's value reaches no reason in clear, however the plugin
/// tries (denial texts, its own message), and is refused by metadata and
/// blobs; a multi-line secret is masked line by line.
#[tokio::test]
async fn secrets_do_not_leak_into_reasons_or_state() {
    let dir = tempfile::tempdir().unwrap();
    let pem = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0B\nAQEAz9aXeEEzfaQxyz\n-----END KEY-----\n";
    std::fs::write(dir.path().join("token"), "leakme-4f9a7c").unwrap();
    std::fs::write(dir.path().join("pem"), pem).unwrap();
    let grants = format!(
        "    grants:\n      network: {{ allow: [\"http://*:*\"] }}\n      secrets: {{ token: {{ file: {0}/token }}, pem: {{ file: {0}/pem }} }}\n",
        dir.path().display()
    );
    let plugin = load("probe", &grants).await.unwrap();
    let (outcome, log) = beside_a_neighbour(run(&plugin, "PROBE", r#"{"leak": "token"}"#, Dirs::new().run_dirs())).await;
    assert_eq!(outcome.status, Status::Failure);
    assert!(!outcome.message.contains("leakme"), "the secret leaked into the reason: {}", outcome.message);
    assert!(outcome.message.contains("leaking ***") && outcome.message.contains("may not contain a granted secret"), "{}", outcome.message);
    assert!(!log.text().contains("leakme"), "{}", log.text());
    let (outcome, log) = beside_a_neighbour(run(&plugin, "PROBE", r#"{"secret": "pem"}"#, Dirs::new().run_dirs())).await;
    assert_eq!(outcome.status, Status::Success, "{outcome:?}");
    for part in ["MIIEvQIBADANBgkqhkiG9w0B", "AQEAz9aXeEEzfaQxyz"] {
        assert!(!log.text().contains(part), "a line of the PEM secret leaked:\n{}", log.text());
    }
}

/// The positive side: what is granted works, and secrets are masked.
#[tokio::test]
async fn granted_access_works() {
    let server = Server::ok("pong").await;
    let mounts = tempfile::tempdir().unwrap();
    std::fs::write(mounts.path().join("config.txt"), "from a mount").unwrap();
    unsafe { std::env::set_var("CORDON_TEST_TOKEN", "s3cr3t-value") };
    let grants = format!(
        "    grants:\n      mounts: [{{ host: {}, guest: /config, access: read-only }}]\n      network: {{ allow: [\"http://127.0.0.1:{port}\", \"tcp://127.0.0.1:{port}\"] }}\n      env: {{ GREETING: hi }}\n      secrets: {{ token: {{ env: CORDON_TEST_TOKEN }} }}\n",
        mounts.path().display(),
        port = server.port
    );
    let plugin = load("probe", &grants).await.unwrap();
    let dirs = Dirs::new();
    let options = serde_json::json!({
        "read": "/config/config.txt",
        "write": "/scratch/out.txt",
        "env": "GREETING",
        "secret": "token",
        "http": format!("http://127.0.0.1:{}/ping", server.port),
        "connect": format!("127.0.0.1:{}", server.port),
        "metadata": "v1",
    });
    let (outcome, log) = beside_a_neighbour(run(&plugin, "PROBE", &options.to_string(), dirs.run_dirs())).await;
    assert_eq!(outcome.status, Status::Success, "{outcome:?}\n{}", log.text());
    for part in ["read=from a mount", "wrote=/scratch/out.txt", "env=hi", "secret=fetched", "http=200 pong", "metadata-before="] {
        assert!(outcome.message.contains(part), "{part:?} missing from {:?}", outcome.message);
    }
    assert_eq!(std::fs::read_to_string(dirs.scratch.path().join("out.txt")).unwrap(), "written by probe");
    let text = log.text();
    assert!(!text.contains("s3cr3t-value"), "a secret leaked into the log:\n{text}");
    assert!(text.contains("the secret is ***") && text.contains("stdout also has ***"), "{text}");
}

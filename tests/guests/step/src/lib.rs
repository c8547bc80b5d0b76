//! `STEP`: a pipeline stage that does what its options say, for the
//! pipeline engine's tests.
//!
//! Options (all optional): `sleep_ms` (sleep first), `status` (`success`,
//! `failure`, `exited`, `skipped`, `cancelled`), `marker` (append one line
//! to this file per execution, to count runs), `wait_for` (`approve`: wait
//! until an approve command arrives, and name who sent it), `secret` (log
//! the value of this granted secret, which the host must mask), `log`,
//! `read` (a file to read last: its content becomes the message),
//! `refuse_first` (refuse the first approval, with the value of `secret`
//! in the reason, which the host must mask too).
use std::io::Write;
use std::time::Duration;

use cordon_sdk::executor::cordon::plugin::{commands, log, secrets, types::StageStatus};
use cordon_sdk::executor::exports::cordon::plugin::execution::{StageRequest, StageResult};
use cordon_sdk::executor::finish;
use serde::Deserialize;

cordon_sdk::single_stage!("STEP", "A configurable test stage", run);

#[derive(Deserialize, Default)]
#[serde(default)]
struct Options {
    sleep_ms: u64,
    status: Option<String>,
    marker: Option<String>,
    wait_for: Option<String>,
    secret: Option<String>,
    log: Option<String>,
    /// A file to read after sleeping; its content becomes the message.
    read: Option<String>,
    refuse_first: bool,
}

fn run(request: StageRequest) -> StageResult {
    let options: Options = match serde_json::from_str(&request.stage.options) {
        Ok(o) => o,
        Err(e) => return finish(StageStatus::Failure, format!("bad options: {e}")),
    };
    if let Some(marker) = &options.marker {
        let line = format!("{} {}\n", request.deployment.id, request.stage.id);
        let written = std::fs::OpenOptions::new().create(true).append(true).open(marker).and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            return finish(StageStatus::Failure, format!("marker {marker}: {e}"));
        }
    }
    if let Some(text) = &options.log {
        log::write(log::Level::Info, text);
    }
    if let Some(name) = &options.secret {
        match secrets::get(name) {
            Ok(value) => log::write(log::Level::Info, &format!("secret {name} is {value}")),
            Err(e) => return finish(StageStatus::Failure, format!("secret {name}: {e:?}")),
        }
    }
    if options.sleep_ms > 0 {
        log::write(log::Level::Info, &format!("sleeping {} ms", options.sleep_ms));
        std::thread::sleep(Duration::from_millis(options.sleep_ms));
    }
    if options.wait_for.as_deref() == Some("approve") {
        log::write(log::Level::Info, "waiting for an approval");
        let mut approvals = 0;
        loop {
            for c in commands::received().into_iter().filter(|c| c.kind == commands::CommandKind::Approve).skip(approvals) {
                approvals += 1;
                if options.refuse_first && approvals == 1 {
                    let secret = options.secret.as_deref().map(|name| secrets::get(name).unwrap_or_default()).unwrap_or_default();
                    commands::answer(&c.id, Err(&format!("not yet (secret {secret})")));
                    continue;
                }
                commands::answer(&c.id, Ok(()));
                return finish(StageStatus::Success, format!("approved by {}", c.commander));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let status = match options.status.as_deref().unwrap_or("success") {
        "success" => StageStatus::Success,
        "failure" => StageStatus::Failure,
        "exited" => StageStatus::Exited,
        "skipped" => StageStatus::Skipped,
        "cancelled" => StageStatus::Cancelled,
        other => return finish(StageStatus::Failure, format!("unknown status {other:?}")),
    };
    if let Some(path) = &options.read {
        return match std::fs::read_to_string(path) {
            Ok(text) => finish(status, format!("read {text}")),
            Err(e) => finish(StageStatus::Failure, format!("read {path}: {e}")),
        };
    }
    let message = if status == StageStatus::Failure { "failing on purpose" } else { "" };
    finish(status, message)
}

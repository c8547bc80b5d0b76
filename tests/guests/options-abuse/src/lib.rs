//! `OPTIONS_ABUSE`: a stage plugin whose `options` export abuses the host:
//! every stage's schema is 300 KiB (four stages: more than the 1 MiB result
//! limit together, less each), and `check` never returns when the options
//! say `{"spin": true}`. The host must refuse the schemas by size while it
//! reads them and end the check within seconds, whatever the plugin's own
//! timeout.

use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};
use cordon_sdk::options::bindings::exports::cordon::plugin::options::{Guest, Subject};

struct Plugin;

impl cordon_sdk::executor::exports::cordon::plugin::stages::Guest for Plugin {
    fn defined_stages() -> Vec<cordon_sdk::executor::exports::cordon::plugin::stages::StageDefinition> {
        ["ABUSE_A", "ABUSE_B", "ABUSE_C", "ABUSE_D"].iter().map(|n| cordon_sdk::executor::stage(n, "abuses the options export")).collect()
    }
}

impl cordon_sdk::executor::exports::cordon::plugin::execution::Guest for Plugin {
    fn execute_stage(_: StageRequest) -> StageResult {
        finish(StageStatus::Success, "")
    }
}

impl Guest for Plugin {
    fn schema(of: Subject) -> Option<String> {
        match of {
            Subject::Stage(_) => Some(format!("{{\"description\": \"{}\"}}", "x".repeat(300 << 10))),
            Subject::Settings => None,
        }
    }

    fn check(_: Subject, value: String) -> Result<(), String> {
        let mut n: u64 = 0;
        while value.contains("spin") {
            n = n.wrapping_add(1);
            std::hint::black_box(n);
        }
        Err("the options say \u{1b}[31mred\u{1b}[0m".to_string())
    }
}

cordon_sdk::executor::export_executor!(Plugin);
cordon_sdk::options::bindings::export_described!(Plugin);

//! `FD_HOARD`: opens `/source` again and again, keeping every descriptor,
//! until something stops it — in a host without a handle budget, the whole
//! process's descriptor limit, and with it every other stage's.
use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("FD_HOARD", "opens descriptors without closing them", run);

fn run(_request: StageRequest) -> StageResult {
    let mut kept = Vec::new();
    for _ in 0..100_000 {
        match std::fs::File::open("/source/.") {
            Ok(file) => kept.push(file),
            Err(e) => return finish(StageStatus::Failure, format!("open failed after {} descriptors: {e}", kept.len())),
        }
    }
    finish(StageStatus::Success, format!("BREACH: held {} descriptors", kept.len()))
}

//! `NOOP`: succeeds at once. The benchmark's no-op stage and the
//! well-behaved neighbour that must keep working after a hostile stage.
use cordon_sdk::executor::{cordon::plugin::types::StageStatus, exports::cordon::plugin::execution::{StageRequest, StageResult}, finish};

cordon_sdk::single_stage!("NOOP", "Does nothing", run);

fn run(_request: StageRequest) -> StageResult {
    finish(StageStatus::Success, "")
}

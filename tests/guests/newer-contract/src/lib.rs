//! A plugin built against `cordon:plugin@0.2.0`, which this host does not
//! implement; loading it must fail naming both versions.
wit_bindgen::generate!({ path: "wit", world: "executor" });

use exports::cordon::plugin::{execution, stages};

struct Newer;

impl stages::Guest for Newer {
    fn defined_stages() -> Vec<stages::StageDefinition> {
        vec![stages::StageDefinition { name: "NEWER".into(), description: "from the future".into() }]
    }
}

impl execution::Guest for Newer {
    fn execute_stage(options: String) -> String {
        options
    }
}

export!(Newer);

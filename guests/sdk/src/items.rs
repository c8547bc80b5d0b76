//! Writing an item action in plain Rust: implement [`ItemAction`] and
//! register it with [`item_action_plugin!`](crate::item_action_plugin!).
//!
//! Items arrive as parsed JSON; answer [`Action::Unchanged`] when there is
//! nothing to do so that the host passes the item on byte for byte.
//!
//! ```
//! use cordon_sdk::items::Selector;
//! use cordon_sdk::Action;
//! use serde_json::Value;
//!
//! #[derive(serde::Deserialize)]
//! struct Options { label: String }
//!
//! struct AddLabel;
//! impl cordon_sdk::ItemAction for AddLabel {
//!     type Options = Options;
//!     fn applies_to(_: &Options) -> Selector { Selector::kinds(&["ConfigMap"]) }
//!     fn execute(o: &Options, mut item: Value) -> Result<Action, String> {
//!         item["metadata"]["labels"][&o.label] = Value::from("yes");
//!         Ok(Action::Modified(item))
//!     }
//! }
//! cordon_sdk::item_action_plugin!(AddLabel);
//! # fn main() {}
//! ```

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::item_action::exports::cordon::plugin::item_rewrite::{Outcome, WithAdditional};
pub use crate::item_action::exports::cordon::plugin::item_rewrite::Selector;

impl Selector {
    /// Items of these kinds, in any namespace, with any labels.
    pub fn kinds(kinds: &[&str]) -> Self {
        Selector { kinds: kinds.iter().map(|k| k.to_string()).collect(), namespaces: Vec::new(), labels: Vec::new() }
    }

    /// Every item.
    pub fn all() -> Self {
        Self::kinds(&[])
    }
}

/// What to do with an item.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Pass it on byte for byte.
    Unchanged,
    Modified(Value),
    /// Leave it out.
    Skip,
    /// The (possibly rewritten) item, and more items to process after it.
    WithAdditional(Value, Vec<Value>),
}

/// An item action.
pub trait ItemAction {
    /// The action's options, parsed with serde.
    type Options: DeserializeOwned;

    /// Checks option values beyond their shape; an error names the bad one.
    fn check(_options: &Self::Options) -> Result<(), String> {
        Ok(())
    }

    /// Which items the action wants.
    fn applies_to(options: &Self::Options) -> Selector;

    fn execute(options: &Self::Options, item: Value) -> Result<Action, String>;
}

fn options<A: ItemAction>(text: &str) -> Result<A::Options, String> {
    let options = serde_json::from_str(text).map_err(|e| format!("invalid item action options: {e}"))?;
    A::check(&options)?;
    Ok(options)
}

fn text(value: &Value) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| e.to_string())
}

#[doc(hidden)]
pub fn applies_to<A: ItemAction>(options_text: &str) -> Result<Selector, String> {
    Ok(A::applies_to(&options::<A>(options_text)?))
}

#[doc(hidden)]
pub fn execute<A: ItemAction>(options_text: &str, item: &str) -> Result<Outcome, String> {
    let options = options::<A>(options_text)?;
    let item: Value = serde_json::from_str(item).map_err(|e| format!("item is not JSON: {e}"))?;
    Ok(match A::execute(&options, item)? {
        Action::Unchanged => Outcome::Unchanged,
        Action::Skip => Outcome::Skip,
        Action::Modified(item) => Outcome::Modified(text(&item)?),
        Action::WithAdditional(item, more) => Outcome::WithAdditionalItems(WithAdditional {
            item: text(&item)?,
            additional: more.iter().map(text).collect::<Result<_, _>>()?,
        }),
    })
}

/// Registers an [`ItemAction`] as the component's `item-rewrite` export.
#[macro_export]
macro_rules! item_action_plugin {
    ($action:ty) => {
        const _: () = {
            use $crate::item_action::exports::cordon::plugin::item_rewrite::{Guest, Outcome, Selector};
            struct CordonItemAction;
            impl Guest for CordonItemAction {
                fn applies_to(options: String) -> Result<Selector, String> {
                    $crate::items::applies_to::<$action>(&options)
                }
                fn execute(options: String, item: String) -> Result<Outcome, String> {
                    $crate::items::execute::<$action>(&options, &item)
                }
            }
            $crate::item_action::export_item_action!(CordonItemAction);
        };
    };
}

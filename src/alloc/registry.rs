//! Interned component names: a bounded table mapping names to counter slots.

use std::sync::{Arc, RwLock};

use super::counters::SLOTS;
use crate::monitor::{validate_component_name, OTHER_COMPONENT};

/// Names of slots 1..SLOTS, in interning order. Slot 0 is `other`.
static NAMES: RwLock<Vec<(&'static str, Arc<str>)>> = RwLock::new(Vec::new());

/// The slot of `name`, interning it if there is room; `other` (slot 0) for invalid
/// names, `other` itself, and once every slot is taken.
pub(crate) fn intern(name: &str) -> u8 {
    if validate_component_name(name).is_err() {
        return 0;
    }
    if let Some(slot) = lookup(name) {
        return slot;
    }
    let mut names = NAMES.write().unwrap_or_else(|p| p.into_inner());
    if let Some(index) = names.iter().position(|(n, _)| *n == name) {
        return (index + 1) as u8;
    }
    if names.len() + 1 >= SLOTS {
        return 0;
    }
    // Leaked once per name; the table is bounded, so the leak is too.
    names.push((Box::leak(name.to_owned().into_boxed_str()), Arc::from(name)));
    names.len() as u8
}

fn lookup(name: &str) -> Option<u8> {
    let names = NAMES.read().unwrap_or_else(|p| p.into_inner());
    names.iter().position(|(n, _)| *n == name).map(|i| (i + 1) as u8)
}

/// The name of a slot.
pub(crate) fn name(slot: u8) -> &'static str {
    if slot == 0 {
        return OTHER_COMPONENT;
    }
    let names = NAMES.read().unwrap_or_else(|p| p.into_inner());
    names.get(usize::from(slot) - 1).map_or(OTHER_COMPONENT, |(n, _)| *n)
}

/// Calls `f` with (slot, name) for every interned component, in slot order.
pub(crate) fn for_each(mut f: impl FnMut(u8, &Arc<str>)) {
    let names = NAMES.read().unwrap_or_else(|p| p.into_inner());
    for (i, (_, name)) in names.iter().enumerate() {
        f((i + 1) as u8, name);
    }
}

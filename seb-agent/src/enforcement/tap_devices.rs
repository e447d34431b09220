//! The character-device majors of macvtap and ipvtap devices on this node, for the
//! programs that judge writes to packet devices (`SEB_TAP_MAJORS`). Their majors are
//! assigned when the kernel (or the module) registers them, so they are read from
//! `/proc/devices` rather than known in advance; tun's (10:200) is fixed and lives in the
//! programs.

use anyhow::{Context, Result};
use seb_common::TAP_MAJOR_SLOTS;

/// The names `/proc/devices` gives them, in slot order.
const TAP_DRIVERS: [&str; TAP_MAJOR_SLOTS as usize] = ["macvtap", "ipvtap"];

/// Majors in slot order, 0 for a driver this kernel has not registered.
pub type TapMajors = [u32; TAP_MAJOR_SLOTS as usize];

/// The majors on this node now.
pub fn current() -> Result<TapMajors> {
    let path = "/proc/devices";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(parse(&text))
}

/// The majors named in a `/proc/devices` text: its character devices only (a block
/// device may share a number).
fn parse(text: &str) -> TapMajors {
    let mut majors = [0; TAP_MAJOR_SLOTS as usize];
    let character = text
        .lines()
        .skip_while(|line| line.trim() != "Character devices:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty() && !line.trim_end().ends_with(':'));
    for line in character {
        let mut fields = line.split_whitespace();
        let (Some(number), Some(name)) = (fields.next(), fields.next()) else { continue };
        if let (Some(slot), Ok(number)) = (TAP_DRIVERS.iter().position(|d| *d == name), number.parse()) {
            majors[slot] = number;
        }
    }
    majors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors_come_from_the_character_devices_only() {
        let text =
            "Character devices:\n  1 mem\n 10 misc\n245 ipvtap\n246 macvtap\n\nBlock devices:\n 7 loop\n240 macvtap\n";
        assert_eq!(parse(text), [246, 245]);
        // A kernel without them, or a block device of the name, gives none.
        assert_eq!(parse("Character devices:\n  1 mem\n\nBlock devices:\n246 macvtap\n"), [0, 0]);
        assert_eq!(parse(""), [0, 0]);
    }

    #[test]
    fn this_node_is_read() {
        let majors = current().unwrap();
        let listed = std::fs::read_to_string("/proc/devices").unwrap().contains(" macvtap\n");
        assert_eq!(majors[0] != 0, listed, "{majors:?}");
    }
}

//! The character-device majors, on this node, of drivers whose devices send packets past
//! the egress hooks, for the programs that judge opens of and writes to packet devices
//! (`SEB_DEVICE_MAJORS`). Their majors are assigned when the kernel (or the module)
//! registers them, so they are read from `/proc/devices` rather than known in advance;
//! tun's (10:200), vhost-net's (10:238) and the first RDMA verbs devices' (231:192-223)
//! are fixed and live in the programs.

use anyhow::{Context, Result};
use seb_common::{DEVICE_MAJOR_DRIVERS, DEVICE_MAJOR_SLOTS, UVERBS_MAJOR};

/// Majors in slot order, 0 for a driver this kernel has not registered.
pub type DeviceMajors = [u32; DEVICE_MAJOR_SLOTS as usize];

/// The majors on this node now.
pub fn current() -> Result<DeviceMajors> {
    let path = "/proc/devices";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(parse(&text))
}

/// The majors named in a `/proc/devices` text: its character devices only (a block
/// device may share a number).
fn parse(text: &str) -> DeviceMajors {
    let mut majors = [0; DEVICE_MAJOR_SLOTS as usize];
    let character = text
        .lines()
        .skip_while(|line| line.trim() != "Character devices:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty() && !line.trim_end().ends_with(':'));
    for line in character {
        let mut fields = line.split_whitespace();
        let (Some(number), Some(name)) = (fields.next(), fields.next()) else { continue };
        let Ok(number) = number.parse() else { continue };
        if name == "infiniband_verbs" && number == UVERBS_MAJOR {
            // The programs know it, and judge only its verbs minors: it also holds
            // `umad`'s, which carry no IP.
            continue;
        }
        if let Some(slot) = DEVICE_MAJOR_DRIVERS.iter().position(|d| *d == name) {
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
        let text = "Character devices:\n  1 mem\n 10 misc\n231 infiniband_verbs\n236 vhost-vdpa\n237 vfio-dev\n\
                    238 vfio\n244 infiniband_verbs\n245 ipvtap\n246 macvtap\n\nBlock devices:\n 7 loop\n240 macvtap\n";
        // The verbs' dynamic major, not the fixed 231 the programs know.
        assert_eq!(parse(text), [246, 245, 238, 237, 244, 236]);
        assert_eq!(parse("Character devices:\n231 infiniband_verbs\n")[4], 0);
        // A kernel without them, or a block device of the name, gives none.
        assert_eq!(parse("Character devices:\n  1 mem\n\nBlock devices:\n246 macvtap\n"), [0; 6]);
        assert_eq!(parse(""), [0; 6]);
    }

    #[test]
    fn this_node_is_read() {
        let majors = current().unwrap();
        let listed = std::fs::read_to_string("/proc/devices").unwrap().contains(" macvtap\n");
        assert_eq!(majors[0] != 0, listed, "{majors:?}");
    }
}

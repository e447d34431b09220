//! Kernel enforcement, end to end: real programs attached to a test cgroup, real
//! connects from processes in it, answers straight from the kernel.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        process::ExitStatusExt,
    },
    path::Path,
    process::Command,
    thread,
    time::Duration,
};

use seb_agent::config::SyscallTables;
use seb_common::layout;
use seb_sandbox::{
    PeerNamespace, Sandbox, Tools, parse_json_output,
    poll::{eventually, until},
    wait_gone,
};
use serde_json::Value;

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

/// Protected: 127.0.0.2 on every port and protocol, and [::1]:8443 over TCP.
/// Not protected: 127.0.0.3, and [::1]:9443.
const POLICY: &str = r#"
[[enforcement.protected]]
cidr = "127.0.0.2/32"

[[enforcement.protected]]
cidr = "::1"
port = 8443
protocol = "tcp"
"#;

/// Listeners bound to their own addresses: a wildcard listener would also answer as the
/// protected 127.0.0.2, which `wildcard_and_unspecified_destinations_are_judged_as_what_they_reach`
/// covers.
fn sandbox(label: &str) -> Sandbox {
    let mut sandbox = Sandbox::new(label, tools()).expect("creating the sandbox");
    sandbox.write_config(POLICY).unwrap();
    for addr in ["127.0.0.2:8443", "127.0.0.3:8443", "[::1]:8443", "[::1]:9443"] {
        sandbox.listen(addr.parse().unwrap()).unwrap();
    }
    sandbox
}

/// Links of a sandbox agent: one per program (one scope cgroup, one exempt cgroup).
/// The links one agent pins: one per program this node attaches (one scope cgroup).
fn attached_links() -> usize {
    seb_agent::enforcement::loader::attached_programs(SyscallTables::Auto).count()
}

fn cookie(outcome: &Value) -> u64 {
    outcome["cookie"].as_u64().unwrap_or_else(|| panic!("no socket cookie in {outcome}"))
}

#[test]
fn the_kernel_denies_every_egress_path_to_a_protected_endpoint() {
    let mut sandbox = sandbox("paths");
    // A route to somewhere neither local nor protected: out of a veth pair whose other
    // end, here too, drops what it receives (not loopback, which would deliver it here).
    sandbox.ip(&["link", "add", "seb-out", "type", "veth", "peer", "name", "seb-drop"]).unwrap();
    for device in ["seb-out", "seb-drop"] {
        sandbox.ip(&["link", "set", device, "up"]).unwrap();
    }
    sandbox.ip(&["route", "add", "192.0.2.0/24", "dev", "seb-out"]).unwrap();
    sandbox.start_agent().unwrap();

    // (method, address, the hook that must deny it)
    let denied = [
        ("tcp", "127.0.0.2:8443", "connect4"),
        ("tcp", "[::1]:8443", "connect6"),
        ("tcp", "[::ffff:127.0.0.2]:8443", "connect6"),
        ("mptcp", "127.0.0.2:8443", "connect4"),
        ("mptcp", "[::1]:8443", "connect6"),
        ("udp-connect", "127.0.0.2:8443", "connect4"),
        ("udp-sendto", "127.0.0.2:8443", "sendmsg4"),
        ("io-uring", "127.0.0.2:8443", "connect4"),
        ("raw", "127.0.0.2:8443", "egress4"),
        // A tunnel packet is refused wherever it is sent (here, to an address neither
        // local nor protected): a tunnel device where it arrives would send on what it
        // carries (here, to 127.0.0.2:8443), unjudged.
        ("ipip", "192.0.2.1:8443", "egress4"),
    ];
    for (method, addr, hook) in denied {
        // Lingering keeps /proc/<pid>/exe readable until the agent has recorded the denial.
        let outcome = sandbox.probe("workload", &["try", method, addr, "--linger-ms", "500"]).unwrap();
        assert_eq!(outcome["result"], "EPERM", "{method} to {addr} from a workload: {outcome}");
        let denial = if method == "mptcp" {
            // The hook sees the first subflow, a kernel TCP socket with a cookie of its own.
            wait_for(&sandbox, |d| d["tgid"] == outcome["pid"] && d["hook"] == hook)
        } else {
            sandbox.wait_for_denial(cookie(&outcome)).unwrap()
        };
        assert_eq!(denial["hook"], hook, "{method} to {addr}: {denial}");
        let expected_address = addr.rsplit_once(':').unwrap().0.trim_matches(['[', ']']).trim_start_matches("::ffff:");
        assert_eq!(denial["address"], expected_address, "{denial}");
        assert_eq!(denial["cgroup_path"], format!("{}/workload", sandbox.cgroup_relative), "{denial}");
        assert!(denial.get("task_cgroup_path").is_none(), "the task did not move: {denial}");
        if !["raw", "ipip"].contains(&method) {
            // Raw packets are judged on egress, where there is no task context.
            assert_eq!(denial["port"], 8443, "{denial}");
            assert_eq!(denial["tgid"], outcome["pid"], "{denial}");
            assert_eq!(denial["comm"], "seb-probe", "{denial}");
            assert!(denial["exe"].as_str().is_some_and(|exe| exe.ends_with("seb-probe")), "{denial}");
        }
    }

    assert_eq!(sandbox.received().unwrap(), 0, "a denied attempt reached a listener");

    // The broker itself, in the same enforced scope, gets through.
    let probe = sandbox.agent_cli(&["probe-egress", "127.0.0.2:8443", "--json"]).unwrap();
    let probe = parse_json_output(&probe, "probe-egress").unwrap();
    assert_eq!(probe["connected"], true, "the broker's own connection: {probe}");
    assert_eq!(sandbox.received().unwrap(), 1, "the broker's connection arrived");

    // Unprotected destinations are untouched: each attempt arrives (on loopback it is
    // queued at its listener by the time the call returns), but the one routed away.
    // (method, address, what arrives: a UDP connect sends nothing; 192.0.2.1 is routed away)
    for (method, addr, arrives) in [
        ("tcp", "127.0.0.3:8443", 1),
        ("tcp", "[::1]:9443", 1),
        ("mptcp", "127.0.0.3:8443", 1),
        ("udp-connect", "127.0.0.3:8443", 0),
        ("udp-sendto", "127.0.0.3:8443", 1),
        ("io-uring", "127.0.0.3:8443", 1),
        ("raw", "127.0.0.3:8443", 1),
        ("raw", "192.0.2.1:8443", 0),
        ("udp-sendto", "[::1]:8443", 1), // [::1]:8443 is protected for TCP only
    ] {
        let outcome = sandbox.attempt("workload", method, addr).unwrap();
        assert_eq!(outcome["result"], "ok", "{method} to unprotected {addr}: {outcome}");
        assert_eq!(sandbox.received().unwrap(), arrives, "{method} to unprotected {addr}: what arrived");
    }

    // A cgroup exempted by config (a kubelet, say) keeps working.
    let outcome = sandbox.attempt("exempt", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "ok", "exempt cgroup: {outcome}");
    assert_eq!(sandbox.received().unwrap(), 1, "the exempt connection arrived");
}

/// `0.0.0.0`, `::` and `::ffff:0.0.0.0` are not destinations: Linux connects them to the
/// bound source address or loopback. And a wildcard listener answers on every local
/// address, so where a protected endpoint is local, its port is reachable through any
/// local address. Both are judged as the protected service they reach.
#[test]
fn wildcard_and_unspecified_destinations_are_judged_as_what_they_reach() {
    let mut sandbox = Sandbox::new("local", tools()).unwrap();
    let policy = [("tcp", 8443), ("udp", 8443), ("tcp", 7443), ("tcp", 6443)].map(|(protocol, port)| {
        format!("[[enforcement.protected]]\ncidr = \"127.0.0.2/32\"\nport = {port}\nprotocol = \"{protocol}\"\n")
    });
    sandbox.write_config(&policy.concat()).unwrap();
    // One dual-stack wildcard listener serves the protected 127.0.0.2:8443 and every
    // other local address on 8443; 9443 is not protected anywhere. On 7443, a wildcard
    // listener bound to `lo`, which a socket lookup without a device never finds.
    sandbox.listen("[::]:8443".parse().unwrap()).unwrap();
    sandbox.listen("[::]:9443".parse().unwrap()).unwrap();
    sandbox.listen_on("[::]:7443".parse().unwrap(), Some("lo")).unwrap();
    // On 6443, a dual-stack listener bound to `::ffff:0.0.0.0`: a wildcard for IPv4.
    sandbox.listen("[::ffff:0.0.0.0]:6443".parse().unwrap()).unwrap();
    // A pod-like namespace routed to this one, whose side holds 198.51.100.1/24.
    let pod = pod(&sandbox);
    sandbox.start_agent().unwrap();

    // (method, destination, bound source, the address the record must name, unspecified?)
    let denied = [
        ("tcp", "0.0.0.0:8443", None, "127.0.0.1", true),
        ("tcp", "[::]:8443", None, "::1", true),
        ("tcp", "[::ffff:0.0.0.0]:8443", None, "127.0.0.1", true),
        ("tcp", "0.0.0.0:8443", Some("127.0.0.2:0"), "127.0.0.2", true),
        ("udp-sendto", "0.0.0.0:8443", None, "127.0.0.1", true),
        ("udp-connect", "[::]:8443", None, "::1", true),
        ("tcp", "127.0.0.1:8443", None, "127.0.0.1", false),
        ("tcp", "127.0.0.9:8443", None, "127.0.0.9", false),
        ("udp-sendto", "[::1]:8443", None, "::1", false),
        // Broadcast and multicast datagrams reach wildcard listeners too.
        ("udp-sendto", "198.51.100.255:8443", None, "198.51.100.255", false),
        ("udp-sendto", "255.255.255.255:8443", None, "255.255.255.255", false),
        ("udp-sendto", "224.0.0.1:8443", None, "224.0.0.1", false),
        ("udp-connect", "[ff05::1]:8443", None, "ff05::1", false),
        // Bound to the group address itself, as a decoy: the lookup would find that
        // socket, but the kernel delivers to the wildcard listener too.
        ("udp-sendto", "127.255.255.255:8443", Some("127.255.255.255:8443"), "127.255.255.255", false),
        ("udp-sendto", "198.51.100.255:8443", Some("198.51.100.255:8443"), "198.51.100.255", false),
        ("udp-sendto", "224.0.0.1:8443", Some("224.0.0.1:8443"), "224.0.0.1", false),
    ];
    for uid in [None, Some("65534")] {
        for (method, addr, bind, judged, unspecified) in denied {
            let mut args = vec!["try", method, addr, "--linger-ms", "300"];
            if let Some(bind) = bind {
                args.extend(["--bind", bind]);
            }
            let outcome = match uid {
                Some(uid) => sandbox.probe("workload", &[&["--uid", uid][..], &args].concat()).unwrap(),
                None => sandbox.probe("workload", &args).unwrap(),
            };
            assert_eq!(outcome["result"], "EPERM", "{method} to {addr} (bound {bind:?}, uid {uid:?}): {outcome}");
            let denial = sandbox.wait_for_denial(cookie(&outcome)).unwrap();
            assert_eq!(denial["address"], judged, "{method} to {addr}: {denial}");
            assert_eq!(denial["port"], 8443, "{denial}");
            assert_eq!(denial["unspecified"].as_bool().unwrap_or(false), unspecified, "{denial}");
            assert_eq!(denial["uid"].as_u64(), Some(uid.map_or(0, |u| u.parse().unwrap())), "{denial}");
        }
    }

    // Out through loopback (a socket bound to `lo`, or `IP_UNICAST_IF` naming it), a
    // datagram to any address, here one neither local nor protected, is delivered here,
    // to the wildcard listener: judged as local, by the egress program. (As uid 65534; a
    // raw socket, as root, the same.) On an unprotected port it goes through.
    let via_loopback =
        [("udp-sendto", "--device", "lo"), ("udp-sendto", "--unicast-if", "1"), ("raw", "--device", "lo")];
    for (method, option, value) in via_loopback {
        let uid = if method == "raw" { "0" } else { "65534" };
        let args = ["--uid", uid, "try", method, "192.0.2.1:8443", option, value, "--linger-ms", "300"];
        let outcome = sandbox.probe("workload", &args).unwrap();
        assert_eq!(outcome["result"], "EPERM", "{method} via loopback ({option} {value}): {outcome}");
        let denial = sandbox.wait_for_denial(cookie(&outcome)).unwrap();
        assert_eq!(
            (&denial["hook"], &denial["address"], &denial["port"]),
            (&Value::from("egress4"), &Value::from("192.0.2.1"), &Value::from(8443))
        );
        assert_eq!(sandbox.received().unwrap(), 0, "{method} via loopback ({option} {value}) reached the listener");
        let args = ["--uid", uid, "try", method, "192.0.2.1:9443", option, value];
        let outcome = sandbox.probe("workload", &args).unwrap();
        assert_eq!(outcome["result"], "ok", "{method} via loopback to an unprotected port: {outcome}");
        thread::sleep(Duration::from_millis(100));
        assert_eq!(sandbox.received().unwrap(), 1, "{method} via loopback: the unprotected port heard nothing");
    }

    // (namespace, method, destination, the address and port the record must name)
    let also_denied = [
        // The device-bound listener: no socket found is judged as the service.
        (&sandbox.netns, "tcp", "127.0.0.1:7443", "127.0.0.1", 7443),
        // The listener bound to `::ffff:0.0.0.0` answers at 127.0.0.1 too (its IPv6
        // address is not all zeros; it was taken for one bound to its own address).
        (&sandbox.netns, "tcp", "127.0.0.1:6443", "127.0.0.1", 6443),
        // A raw IP datagram to a local address, judged by the egress program.
        (&sandbox.netns, "raw", "127.0.0.1:8443", "127.0.0.1", 8443),
        // From another namespace, a node address routes to the same wildcard listener.
        (&pod.name, "tcp", "198.51.100.1:8443", "198.51.100.1", 8443),
        (&pod.name, "udp-sendto", "198.51.100.1:8443", "198.51.100.1", 8443),
    ];
    for (netns, method, addr, judged, port) in also_denied {
        let outcome = sandbox.probe_in(netns, "workload", &["try", method, addr, "--linger-ms", "300"]).unwrap();
        assert_eq!(outcome["result"], "EPERM", "{method} to {addr} from {netns}: {outcome}");
        let denial = sandbox.wait_for_denial(cookie(&outcome)).unwrap();
        assert_eq!((&denial["address"], &denial["port"]), (&Value::from(judged), &Value::from(port)), "{denial}");
    }
    assert_eq!(sandbox.received().unwrap(), 0, "a denied attempt reached the wildcard listener");
    // The pod's own loopback is its own: nothing of this namespace answers there. So is
    // what it sends to its own address (out through its own loopback).
    for (method, addr) in
        [("tcp", "127.0.0.1:8443"), ("udp-sendto", "127.0.0.1:8443"), ("udp-sendto", "198.51.100.2:8443")]
    {
        let outcome = sandbox.probe_in(&pod.name, "workload", &["try", method, addr]).unwrap();
        // Sent: a datagram leaves, a connection finds nobody listening (not a drop).
        let sent = if method == "tcp" { "Connection refused (os error 111)" } else { "ok" };
        assert_eq!(outcome["result"], sent, "{method} to the pod's own {addr}: {outcome}");
    }

    // Ports no protected endpoint uses stay reachable through the same addresses.
    for (method, addr) in [("tcp", "127.0.0.1:9443"), ("tcp", "0.0.0.0:9443"), ("tcp", "[::]:9443")] {
        let outcome = sandbox.attempt("workload", method, addr).unwrap();
        assert_eq!(outcome["result"], "ok", "{method} to {addr}: {outcome}");
    }
    assert_eq!(sandbox.received().unwrap(), 3);
}

/// A process of the scope that reaches into another process is killed before the call
/// returns, and recorded: it could take a socket made outside the scope (or one a child
/// was killed for), or make a process outside the scope connect for it. A process sharing
/// its descriptor table with a new one is killed with it. A 32-bit `ptrace` is judged by
/// the request the kernel reads (its register's low half). So is one that makes a tun
/// device. Outside the scope, the same calls go through.
#[test]
fn reaching_into_another_process_from_the_scope_kills_the_caller() {
    let mut sandbox = sandbox("access");
    // <root>/broker outside the scope: somewhere an operator can move a process out to.
    let root = sandbox.cgroup_relative.clone();
    sandbox.write_config_scoped(&[format!("{root}/workload"), format!("{root}/exempt")], POLICY).unwrap();
    sandbox.start_agent().unwrap();
    for how in ["getfd", "ptrace", "ptrace32", "vm-write", "shared-files"] {
        let (output, pid) = sandbox.probe_raw("workload", &["access", how, "127.0.0.2:8443"]).unwrap();
        assert_eq!(output.status.signal(), Some(9), "{how}: {}", String::from_utf8_lossy(&output.stdout));
        let hook = if how == "shared-files" { "shared_descriptors" } else { "process_access" };
        let record = wait_for(&sandbox, |d| d["hook"] == hook && d["tgid"] == pid);
        assert_eq!(record["action"], "killed", "{record}");
        assert_eq!(record["cgroup_path"], format!("{}/workload", sandbox.cgroup_relative), "{record}");
        if how == "shared-files" {
            // The child sharing the table dies at its first socket() once its parent is gone.
            let child = wait_for(&sandbox, |d| d["hook"] == hook && d["tgid"] != pid);
            assert_eq!(child["action"], "killed", "{child}");
        }
        if how == "vm-write" {
            // The kill is pending before the kernel pins the target's pages, and pinning
            // stops at a pending kill: nothing was written.
            assert_eq!(target_word(&output), Some(0), "the killed caller's write landed");
        }
        // Nothing listens at 127.0.0.9:9, where the exempt child sharing the table goes.
        let (output, _) = sandbox.probe_raw("exempt", &["access", how, "127.0.0.9:9"]).unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success() && stdout.contains(r#""result":"ok""#), "{how} outside the scope: {stdout}");
        if how == "vm-write" {
            assert_eq!(target_word(&output), Some(1), "the exempt write did not land: {stdout}");
        }
    }
    assert_eq!(sandbox.received().unwrap(), 0);
    let both_tables = seb_agent::enforcement::compat_syscalls::run_here();
    writing_another_process_memory_kills(&sandbox, both_tables);
    opening_a_tun_device_is_refused(&sandbox, both_tables);
    a_macvtap_device_is_refused_and_its_writes_kill(&mut sandbox);
    kernel_bypass_devices_are_refused_at_open(&sandbox);
}

/// Devices that send from the adapter or from user space, past every egress hook, are
/// refused at open like tun: RDMA verbs (a raw-packet queue pair), here at the kernel's
/// fixed numbers, whatever the node has loaded (with no driver the open fails with
/// ENXIO, which is what the exempt cgroup meets: the device program let it through);
/// the `umad` minors of the same major carry no IP and are not judged. The drivers with
/// majors assigned at load (VFIO, vhost-vdpa, the verbs past 32 devices) are in the map
/// the agent fills from /proc/devices, as macvtap's.
fn kernel_bypass_devices_are_refused_at_open(sandbox: &Sandbox) {
    let node = |name: &str, major: u32, minor: u32| {
        let path = sandbox.dir.join(name);
        if !path.exists() {
            let numbers = nix::sys::stat::makedev(major.into(), minor.into());
            nix::sys::stat::mknod(&path, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), numbers)
                .unwrap();
        }
        path.to_string_lossy().into_owned()
    };
    for (name, minor) in [("uverbs0", 192), ("uverbs31", 223)] {
        let path = node(name, 231, minor);
        let (output, pid) = sandbox.probe_raw("workload", &["open-device", &path]).unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains(r#""result":"EPERM""#), "opening {name} in the scope: {stdout}");
        let record = wait_for(sandbox, |d| d["hook"] == "tun_device" && d["tgid"] == pid);
        assert_eq!(
            (&record["action"], &record["device"]),
            (&Value::from("refused"), &Value::from(format!("231:{minor}")))
        );
        let (output, _) = sandbox.probe_raw("exempt", &["open-device", &path]).unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("No such device"), "opening {name} outside the scope: {stdout}");
    }
    let umad = node("umad0", 231, 0);
    let (output, _) = sandbox.probe_raw("workload", &["open-device", &umad]).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("No such device"), "umad in the scope is left to the node's device policy: {stdout}");

    // The map holds what /proc/devices names, slot for slot.
    let devices = std::fs::read_to_string("/proc/devices").unwrap();
    let majors = seb_common::map_names::DEVICE_MAJORS;
    for (slot, driver) in seb_common::DEVICE_MAJOR_DRIVERS.into_iter().enumerate() {
        let major = seb_sandbox::tamper::read_array_slot(&sandbox.pin_path, majors, slot as u32).unwrap();
        // The verbs' fixed major is the programs' own, not the map's.
        let fixed = seb_common::UVERBS_MAJOR.to_string();
        let listed = devices.lines().any(|line| {
            let mut fields = line.split_whitespace();
            let (number, name) = (fields.next(), fields.next());
            name == Some(driver) && !(driver == "infiniband_verbs" && number == Some(fixed.as_str()))
        });
        assert_eq!(major != 0, listed, "{driver}: slot {slot} holds {major}");
    }
}

/// A process of the scope that writes into another process's memory through
/// `/proc/<pid>/mem` (the door `ptrace` and `process_vm_writev` leave otherwise) is killed
/// and recorded, and nothing it wrote lands: with every write call (also with the
/// descriptor's register high half set, which the kernel ignores) and io_uring write (to
/// a descriptor or a fixed file, at once, forced async, or linked behind another request,
/// even an `OPENAT` that makes the descriptor). With `both_tables`, the 32-bit `write`
/// too. Outside the scope the same writes land.
fn writing_another_process_memory_kills(sandbox: &Sandbox, both_tables: bool) {
    let calls = [
        "mem-write",
        "mem-pwrite",
        "mem-writev",
        "mem-pwritev",
        "mem-pwritev2",
        "mem-write-high-fd",
        "mem-uring",
        "mem-uring-fixed",
        "mem-uring-async",
        "mem-uring-fixed-async",
        "mem-uring-after-open",
        "mem-uring-fixed-linked",
    ];
    let compat = both_tables.then_some("mem-write32");
    for how in calls.into_iter().chain(compat) {
        let (output, pid) = sandbox.probe_raw("workload", &["access", how, "127.0.0.2:8443"]).unwrap();
        assert_eq!(output.status.signal(), Some(9), "{how}: {}", String::from_utf8_lossy(&output.stdout));
        let record = wait_for(sandbox, |d| d["hook"] == "process_access" && d["tgid"] == pid);
        assert_eq!(record["action"], "killed", "{how}: {record}");
        assert_eq!(target_word(&output), Some(0), "{how}: the killed caller's write landed");
        let (output, _) = sandbox.probe_raw("exempt", &["access", how, "127.0.0.9:9"]).unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success() && stdout.contains(r#""result":"ok""#), "{how} outside the scope: {stdout}");
        assert_eq!(target_word(&output), Some(1), "{how}: the exempt write did not land: {stdout}");
    }
}

/// The word the `access vm-write` probe's child found at the target address.
fn target_word(output: &std::process::Output) -> Option<u64> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.lines().filter_map(|line| serde_json::from_str::<Value>(line).ok()).find_map(|v| v["target_word"].as_u64())
}

/// A macvtap device is used without any `ioctl`: whoever opens its node writes frames
/// that leave through the device under it, past every egress hook. From an enforced
/// cgroup the open is refused with EPERM and recorded, and no frame leaves. A descriptor
/// opened outside the scope and carried in (the process then moves into it) kills the
/// writer at its first write, and is recorded. From the exempt cgroup the frame goes out
/// and reaches a listener across a veth pair.
fn a_macvtap_device_is_refused_and_its_writes_kill(sandbox: &mut Sandbox) {
    let links: [&[&str]; 6] = [
        &["link", "add", "seb-mva", "type", "veth", "peer", "name", "seb-mvb"],
        &["link", "set", "seb-mva", "up"],
        &["link", "set", "seb-mvb", "up"],
        &["addr", "add", "10.77.0.2/24", "dev", "seb-mvb"],
        &["link", "add", "link", "seb-mva", "name", "seb-mvt", "type", "macvtap", "mode", "bridge"],
        &["link", "set", "seb-mvt", "up"],
    ];
    for args in links {
        sandbox.ip(args).unwrap();
    }
    sandbox.listen("10.77.0.2:9999".parse().unwrap()).unwrap();
    // The namespace's own sysfs (`ip netns exec` mounts it) names the device's numbers.
    let read = |path: &str| {
        let shell = ["netns", "exec", &sandbox.netns, "sh", "-c", &format!("cat {path}")];
        String::from_utf8(Command::new("ip").args(shell).output().unwrap().stdout).unwrap().trim().to_string()
    };
    let mac = read("/sys/class/net/seb-mvb/address");
    let numbers = read("/sys/class/net/seb-mvt/tap*/dev");
    let (major, minor) = numbers.split_once(':').unwrap_or_else(|| panic!("macvtap device numbers: {numbers:?}"));
    let device = sandbox.dir.join("macvtap");
    let makedev = nix::sys::stat::makedev(major.parse().unwrap(), minor.parse().unwrap());
    nix::sys::stat::mknod(&device, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), makedev).unwrap();
    let device = device.to_string_lossy();
    let write = ["tap-write", &device, "10.77.0.2:9999", "--source", "10.77.0.1", "--mac", &mac];

    let (output, pid) = sandbox.probe_raw("workload", &write).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(r#""result":"EPERM""#), "opening the macvtap device in the scope: {stdout}");
    let record = wait_for(sandbox, |d| d["hook"] == "tun_device" && d["tgid"] == pid);
    assert_eq!((&record["action"], &record["device"]), (&Value::from("refused"), &Value::from(numbers.clone())));

    let workload = sandbox.cgroup.join("workload").to_string_lossy().into_owned();
    let carried = [&write[..], &["--enter", &workload]].concat();
    let (output, pid) = sandbox.probe_raw("broker", &carried).unwrap();
    assert_eq!(output.status.signal(), Some(9), "a carried-in descriptor: {}", String::from_utf8_lossy(&output.stdout));
    let record = wait_for(sandbox, |d| d["hook"] == "tun_device" && d["tgid"] == pid);
    assert_eq!(record["action"], "killed", "{record}");
    // That one frame leaves: a tap device's write path does not stop at a pending kill
    // (unlike another process's memory). The writer writes no second one.
    thread::sleep(Duration::from_millis(100));
    assert_eq!(sandbox.received().unwrap(), 1, "the carried-in write's one frame");

    let (output, _) = sandbox.probe_raw("exempt", &write).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(r#""result":"ok""#),
        "macvtap write outside the scope: {stdout}"
    );
    // The exempt frame arrives (received without waiting: allow it a moment).
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut received = 0;
    while received == 0 && std::time::Instant::now() < deadline {
        received += sandbox.received().unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(received, 1, "the exempt frame arrives");
    sandbox.ip(&["link", "del", "seb-mvt"]).unwrap();
    sandbox.ip(&["link", "del", "seb-mva"]).unwrap();
}

/// A process of an enforced cgroup cannot open a tun device: the device program refuses
/// any node of its numbers (10:200) with EPERM, and it is recorded; no device is made.
/// So is uid 65534 opening a private node to attach to a persistent device an operator
/// made it owner of. Outside the scope the same calls work. A process of the scope that
/// an operator moved out, where no device program runs, opens it and is killed at
/// `TUNSETIFF`, with `both_tables` through the 32-bit gate too.
fn opening_a_tun_device_is_refused(sandbox: &Sandbox, both_tables: bool) {
    let make = ["tun", "seb-ptun"];
    let (output, pid) = sandbox.probe_raw("workload", &make).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains(r#""result":"EPERM""#), "opening /dev/net/tun: {stdout}");
    let record = wait_for(sandbox, |d| d["hook"] == "tun_device" && d["tgid"] == pid);
    assert_eq!((&record["action"], &record["device"]), (&Value::from("refused"), &Value::from("10:200")), "{record}");
    assert!(sandbox.ip(&["link", "show", "seb-ptun"]).is_err(), "a device was made");
    let (output, _) = sandbox.probe_raw("exempt", &make).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains(r#""result":"ok""#), "tun outside the scope: {stdout}");

    sandbox.ip(&["tuntap", "add", "dev", "seb-utun", "mode", "tun", "user", "65534"]).unwrap();
    // The machine's /dev/net/tun may be root's alone (distributions make it 0666): a node
    // of the sandbox's own that the uid may open.
    let device = sandbox.dir.join("tun");
    if !device.exists() {
        let makedev = nix::sys::stat::makedev(10, 200);
        nix::sys::stat::mknod(&device, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), makedev).unwrap();
        std::fs::set_permissions(&device, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(&sandbox.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let device = device.to_string_lossy();
    let attach = ["--uid", "65534", "tun", "seb-utun", "--device", &device];
    let (output, pid) = sandbox.probe_raw("workload", &attach).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(r#""result":"EPERM""#), "uid 65534 opening a node of its own: {stdout}");
    let record = wait_for(sandbox, |d| d["hook"] == "tun_device" && d["tgid"] == pid);
    assert_eq!((&record["action"], &record["uid"]), (&Value::from("refused"), &Value::from(65534)), "{record}");
    let (output, _) = sandbox.probe_raw("exempt", &attach).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(r#""result":"ok""#), "uid 65534 attaching outside the scope: {stdout}");
    sandbox.ip(&["tuntap", "del", "dev", "seb-utun", "mode", "tun"]).unwrap();

    let moves = [AfterMove::Tun { compat: false }, AfterMove::Tun { compat: true }];
    for how in moves.into_iter().take(if both_tables { 2 } else { 1 }) {
        let pid = killed_once_an_operator_moves_it_out(sandbox, how);
        let record = wait_for(sandbox, |d| d["hook"] == "tun_device" && d["tgid"] == pid);
        assert_eq!(record["action"], "killed", "{record}");
        assert!(sandbox.ip(&["link", "show", "seb-mtun"]).is_err(), "the killed process's device stayed");
    }
}

/// connect() is judged at the address asked for, and NAT in the caller's namespace (root
/// there, as in a pod with CAP_NET_ADMIN) may send the connection elsewhere afterwards.
/// The egress program compares each packet with the peer its socket connected to, and
/// judges one that differs where it really goes.
#[test]
fn a_connection_nat_sends_elsewhere_is_judged_where_it_goes() {
    let mut sandbox = sandbox("dnat");
    sandbox.ip(&["route", "add", "10.99.0.0/24", "dev", "lo"]).unwrap();
    let nft = |rule: &str| {
        let status = Command::new("ip").args(["netns", "exec", &sandbox.netns, "nft", rule]).status().unwrap();
        assert!(status.success(), "nft {rule}");
    };
    nft("add table ip seb_test");
    nft("add chain ip seb_test out { type nat hook output priority -100; }");
    nft("add rule ip seb_test out ip daddr 10.99.0.9 tcp dport 8443 dnat to 127.0.0.2:8443");
    nft("add rule ip seb_test out ip daddr 10.99.0.8 tcp dport 8443 dnat to 127.0.0.3:8443");
    sandbox.start_agent().unwrap();

    let outcome = sandbox.attempt("workload", "tcp", "10.99.0.9:8443").unwrap();
    assert_ne!(outcome["result"], "ok", "rewritten to the protected 127.0.0.2:8443: {outcome}");
    let denial = sandbox.wait_for_denial(cookie(&outcome)).unwrap();
    assert_eq!(denial["hook"], "egress4", "{denial}");
    assert_eq!((&denial["address"], &denial["port"]), (&Value::from("127.0.0.2"), &Value::from(8443)), "{denial}");
    assert_eq!(sandbox.received().unwrap(), 0, "the protected listener received the rewritten connection");

    // Rewritten to an unprotected address, the connection goes through.
    let outcome = sandbox.attempt("workload", "tcp", "10.99.0.8:8443").unwrap();
    assert_eq!(outcome["result"], "ok", "rewritten to 127.0.0.3:8443: {outcome}");
    assert_eq!(sandbox.received().unwrap(), 1);
}

/// A network namespace like a pod's, joined to the sandbox's by a veth pair
/// (198.51.100.1 on the sandbox's side, .2 on its own, its default route through .1).
fn pod(sandbox: &Sandbox) -> PeerNamespace {
    PeerNamespace::new(&sandbox.netns, "pod", "198.51.100.1/24", "198.51.100.2/24").unwrap()
}

/// AF_PACKET sockets hand frames to the device: no routing, no netfilter, no cgroup
/// socket-address hook ever sees them. A task in the scope that asks for one is killed
/// before `socket()` returns (this kernel refuses the BPF-LSM programs that could fail
/// the call with EPERM instead).
#[test]
fn link_layer_sockets_are_refused_in_the_scope() {
    let mut sandbox = Sandbox::new("packet", tools()).unwrap();
    sandbox.write_config(POLICY).unwrap();
    sandbox.listen("127.0.0.2:8443".parse().unwrap()).unwrap();
    // Let hand-made frames from 127.0.0.1 to 127.0.0.2 be delivered on `lo`, as frames
    // to a real endpoint would be: otherwise the IP stack drops them as martians.
    sandbox.sysctl(&["net.ipv4.conf.lo.route_localnet=1", "net.ipv4.conf.lo.accept_local=1"]).unwrap();
    sandbox.start_agent().unwrap();
    for uid in [None, Some("65534")] {
        // Also through the 32-bit gate, which the 64-bit syscall tracepoints never see.
        let compat: &[&str] = if seb_agent::enforcement::compat_syscalls::run_here() {
            &["packet-compat", "packet-socketcall"]
        } else {
            &[]
        };
        // And by an io_uring IORING_OP_SOCKET request, which makes it without socket().
        for &method in ["packet", "packet-dgram", "packet-uring"].iter().chain(compat) {
            let try_args = ["try", method, "127.0.0.2:8443"];
            let args = match uid {
                Some(uid) => [&["--uid", uid][..], &try_args].concat(),
                None => try_args.to_vec(),
            };
            let (output, pid) = sandbox.probe_raw("workload", &args).unwrap();
            assert_eq!(output.status.signal(), Some(9), "{method} as {uid:?}: killed, not {:?}", output);
            assert!(output.stdout.is_empty(), "the probe never saw its socket: {output:?}");
            let denial = wait_for(&sandbox, |d| d["hook"] == "socket_syscall" && d["tgid"] == pid);
            assert_eq!(denial["action"], "killed", "{denial}");
            assert_eq!(denial["socket_family"], "packet", "{denial}");
            assert_eq!(denial["cgroup_path"], format!("{}/workload", sandbox.cgroup_relative), "{denial}");
            assert_eq!(denial["comm"], "seb-probe", "{denial}");
        }
    }
    assert_eq!(sandbox.received().unwrap(), 0);

    // An io_uring request still runs once its submitter is killed: a packet socket made
    // into a ring's fixed files outlives the submitter in a ring its parent holds. The
    // parent's next request to that ring (installing the socket as a descriptor) kills it.
    let (output, pid) = sandbox.probe_raw("workload", &["ring-keeps-packet-socket"]).unwrap();
    assert_eq!(output.status.signal(), Some(9), "the ring's holder: killed, not {output:?}");
    let denial = wait_for(&sandbox, |d| d["hook"] == "socket_syscall" && d["tgid"] == pid);
    assert_eq!((&denial["action"], &denial["socket_family"]), (&Value::from("killed"), &Value::from("packet")));
    let report = sandbox.probe("exempt", &["ring-keeps-packet-socket"]).unwrap();
    assert!(report["installed"].as_i64().is_some_and(|fd| fd >= 0), "outside the scope the ring works: {report}");
    // The rings are gone; new ones (perhaps at a freed ring's address) are not judged by
    // what an old one made: an io_uring connect from the scope is refused by the connect
    // program (a local address, every port of 127.0.0.2 protected), its process not killed.
    for _ in 0..3 {
        let outcome = sandbox.attempt("workload", "io-uring", "127.0.0.9:9").unwrap();
        assert_eq!((&outcome["result"], &outcome["stage"]), (&Value::from("EPERM"), &Value::from("use")), "{outcome}");
    }

    // The same frame from an exempt cgroup really reaches the protected listener: the
    // vector is real, and exemption still works.
    let outcome = sandbox.attempt("exempt", "packet", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "ok", "{outcome}");
    until(Duration::from_secs(5), || sandbox.received().unwrap() > 0, || "the exempt frame never arrived".into());
}

/// `syscall_tables = "native"`: the syscall tracepoints alone (what a kernel without
/// 32-bit system calls gets). They refuse the 64-bit `socket()` of a packet socket, kill
/// a process an operator moved out of the scope at its first `socket()` or `TUNSETIFF`,
/// and one that writes another's memory (the device program refuses tun opens in the
/// scope either way); where the kernel does take 32-bit calls, the door the setting
/// leaves (and warns of) is real.
#[test]
fn the_syscall_tracepoints_alone_refuse_packet_sockets_and_escapes() {
    let mut sandbox = Sandbox::new("tables", tools()).unwrap();
    // <root>/broker is outside the scope.
    let root = sandbox.cgroup_relative.clone();
    let scope = [format!("{root}/workload"), format!("{root}/exempt")];
    sandbox.write_config_scoped(&scope, &format!("syscall_tables = \"native\"\n{POLICY}")).unwrap();
    sandbox.listen("127.0.0.2:8443".parse().unwrap()).unwrap();
    sandbox.sysctl(&["net.ipv4.conf.lo.route_localnet=1", "net.ipv4.conf.lo.accept_local=1"]).unwrap();
    sandbox.start_agent().unwrap();
    let links = sandbox.pinned_links().unwrap();
    assert!(links.iter().any(|name| name.starts_with("seb_socket_call-")), "{links:?}");
    assert!(!links.iter().any(|name| name.starts_with("seb_sys_enter-")), "{links:?}");
    for method in ["packet", "packet-dgram"] {
        let (output, pid) = sandbox.probe_raw("workload", &["try", method, "127.0.0.2:8443"]).unwrap();
        assert_eq!(output.status.signal(), Some(9), "{method}: killed, not {output:?}");
        let denial = wait_for(&sandbox, |d| d["hook"] == "socket_syscall" && d["tgid"] == pid);
        assert_eq!(denial["action"], "killed", "{denial}");
    }
    assert_eq!(sandbox.received().unwrap(), 0);

    killed_once_an_operator_moves_it_out(&sandbox, AfterMove::Tcp);
    assert_eq!(sandbox.received().unwrap(), 0);
    opening_a_tun_device_is_refused(&sandbox, false);
    writing_another_process_memory_kills(&sandbox, false);

    if seb_agent::enforcement::compat_syscalls::run_here() {
        let outcome = sandbox.attempt("workload", "packet-compat", "127.0.0.2:8443").unwrap();
        assert_eq!(outcome["result"], "ok", "the 32-bit gate is open under \"native\": {outcome}");
    }
}

/// Enforcement follows a process that has been in the scope, wherever it goes. Moving
/// itself out (to an exempt or an unenforced cgroup) after making a socket kills it before
/// it can use it; creating a child outside the scope (clone3 `CLONE_INTO_CGROUP`) kills
/// both; moved into an exempt cgroup by an operator, it stays enforced there. Each
/// record names the cgroup it was scoped in, where it went, and the executable the kernel
/// saw (the killed process is gone before the agent could read /proc).
#[test]
fn a_process_that_has_been_in_the_scope_escapes_nothing_by_leaving_it() {
    let mut sandbox = Sandbox::new("moved", tools()).unwrap();
    let root = sandbox.cgroup_relative.clone();
    let scope = [format!("{root}/workload"), format!("{root}/exempt")];
    sandbox.write_config_scoped(&scope, POLICY).unwrap();
    sandbox.listen("127.0.0.2:8443".parse().unwrap()).unwrap();
    sandbox.start_agent().unwrap();
    // <root>/broker is outside the scope; <root>/exempt is exempt.
    for target in ["exempt", "broker"] {
        let dir = sandbox.cgroup.join(target);
        let args = ["try", "tcp", "127.0.0.2:8443", "--move-to", dir.to_str().unwrap()];
        let (output, pid) = sandbox.probe_raw("workload", &args).unwrap();
        assert_eq!(output.status.signal(), Some(9), "moved itself to {target}: {output:?}");
        let record = wait_for(&sandbox, |d| d["hook"] == "cgroup_migration" && d["tgid"] == pid);
        assert_eq!(record["action"], "killed", "{record}");
        assert_eq!(record["cgroup_path"], format!("{root}/workload"), "where it was scoped: {record}");
        assert_eq!(record["task_cgroup_path"], format!("{root}/{target}"), "where it went: {record}");
        let exe = record["exe"].as_str().unwrap_or_default();
        assert!(exe.ends_with("/seb-probe"), "the kernel named the executable: {record}");

        let args = ["clone-into", "--cgroup", dir.to_str().unwrap(), "tcp", "127.0.0.2:8443"];
        let (output, parent) = sandbox.probe_raw("workload", &args).unwrap();
        assert_eq!(output.status.signal(), Some(9), "cloned a child into {target}: {output:?}");
        let child = wait_for(&sandbox, |d| {
            d["hook"] == "cgroup_migration"
                && d["tgid"] != parent
                && d["task_cgroup_path"] == format!("{root}/{target}")
                && d["tgid"].as_u64() > Some(u64::from(parent))
        });
        assert_eq!(child["action"], "killed", "the child dies at its first socket(): {child}");
    }
    assert_eq!(sandbox.received().unwrap(), 0, "nothing reached the endpoint");

    // Once its leader has ended alone, another thread moves the process out (the exiting
    // leader stays behind in the scope's cgroup): the move is still the process's own,
    // judged where the threads went, and kills it.
    for target in ["exempt", "broker"] {
        let dir = sandbox.cgroup.join(target);
        let args = ["move-after-leader-exit", "--cgroup", dir.to_str().unwrap(), "tcp", "127.0.0.2:8443"];
        let (output, pid) = sandbox.probe_raw("workload", &args).unwrap();
        assert_eq!(output.status.signal(), Some(9), "moved to {target} by a thread after its leader: {output:?}");
        let record = wait_for(&sandbox, |d| d["hook"] == "cgroup_migration" && d["tgid"] == pid);
        assert_eq!(record["action"], "killed", "{record}");
    }
    assert_eq!(sandbox.received().unwrap(), 0, "a thread moved out after its leader reached the endpoint");

    // A child placed in the scope by a parent outside it (clone3 `CLONE_INTO_CGROUP` from
    // <root>/broker), which no exec or move marks, is scoped all the same: moving itself
    // back out kills it.
    let (workload, broker) = (sandbox.cgroup.join("workload"), sandbox.cgroup.join("broker"));
    let (workload, broker) = (workload.to_str().unwrap(), broker.to_str().unwrap());
    let args = ["clone-into", "--cgroup", workload, "--then-move-to", broker, "tcp", "127.0.0.2:8443"];
    let report = sandbox.probe("broker", &args).unwrap();
    assert!(report["child_status"].as_str().unwrap_or_default().contains("SIGKILL"), "{report}");
    let child = wait_for(&sandbox, |d| d["hook"] == "cgroup_migration" && d["tgid"] == report["child"]);
    assert_eq!(child["action"], "killed", "{child}");
    assert_eq!(sandbox.received().unwrap(), 0, "the child placed in the scope reached the endpoint");

    // Moved into the exempt cgroup by an operator (this test, outside the scope); also
    // once its first thread (the leader) has ended alone: the process stays scoped until
    // its last thread ends.
    for how in [AfterMove::Tcp, AfterMove::TcpAfterLeaderExit] {
        let (mut waiting, mut lines, _) = moved_by_an_operator(&sandbox, "exempt", how);
        let outcome: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        waiting.wait().unwrap();
        assert_eq!(outcome["result"], "EPERM", "a scoped process moved into the exempt cgroup: {outcome}");
        let denial = sandbox.wait_for_denial(cookie(&outcome)).unwrap();
        assert_eq!(denial["cgroup_path"], format!("{root}/exempt"), "its socket was made there: {denial}");
        assert_eq!(sandbox.received().unwrap(), 0);
    }

    // Moved out of the scope altogether by an operator: no hook would judge a socket
    // made there, so its first socket() kills it.
    // Nor does a ring whose kernel thread submits without any system call: its first
    // request after the move kills it.
    for how in [AfterMove::Tcp, AfterMove::SqpollRing] {
        let pid = killed_once_an_operator_moves_it_out(&sandbox, how);
        let record = wait_for(&sandbox, |d| d["hook"] == "cgroup_migration" && d["tgid"] == pid);
        assert_eq!(record["action"], "killed", "{record}");
        assert_eq!(record["cgroup_path"], format!("{root}/workload"), "where it was scoped: {record}");
        assert_eq!(record["task_cgroup_path"], format!("{root}/broker"), "where it was moved: {record}");
        assert_eq!(sandbox.received().unwrap(), 0);
    }

    let outcome = sandbox.attempt("exempt", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "ok", "a process that never was in the scope, in the exempt cgroup: {outcome}");

    // A zombie "moved" into the scope moves nowhere (the kernel skips exiting tasks): its
    // pid is not marked, where it would judge whatever process gets that pid next.
    let mut zombie = sandbox.spawn_in("broker", "/bin/true", &[]).unwrap();
    let pid = zombie.id();
    let state = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !state().contains(") Z ") {
        assert!(std::time::Instant::now() < deadline, "no zombie: {}", state());
        thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(sandbox.cgroup.join("workload").join("cgroup.procs"), pid.to_string()).unwrap();
    let entry = seb_sandbox::tamper::scoped_entry(&sandbox.pin_path, pid).unwrap();
    zombie.wait().unwrap();
    assert_eq!(entry, None, "a zombie's pid was marked as of the scope");
}

/// The kernel follows at most `enforcement.max_scoped_processes` live processes of the
/// scope; past it, each new one is killed at its first socket() (and recorded), never left
/// unfollowed, while the ones it follows work on.
#[test]
fn processes_the_kernel_cannot_follow_are_killed_not_let_go() {
    let mut sandbox = Sandbox::new("full", tools()).unwrap();
    sandbox.write_config(&format!("max_scoped_processes = 16\n{POLICY}")).unwrap();
    sandbox.start_agent().unwrap();
    // Fewer than the two tables hold (16, and 16 doomed).
    let report = sandbox.probe("workload", &["fork", "--count", "24", "tcp", "127.0.0.3:9"]).unwrap();
    let killed = report["killed"].as_array().unwrap();
    let exited = report["exited"].as_array().unwrap();
    // The agent, the probe and (a few) others of the scope hold entries too.
    assert!(killed.len() >= 24 - 16, "past the table, children are killed: {report}");
    assert!(exited.len() >= 8, "the followed children work on: {report}");
    let records = eventually(
        Duration::from_secs(10),
        || {
            let denials = sandbox.denials().unwrap();
            let records: Vec<Value> = killed
                .iter()
                .filter_map(|pid| denials.iter().find(|d| d["hook"] == "scope_table_full" && d["tgid"] == *pid))
                .cloned()
                .collect();
            (records.len() == killed.len()).then_some(records)
        },
        || format!("a kill went unrecorded: {report} {:?}", sandbox.denials().unwrap()),
    );
    for record in records {
        assert_eq!(record["action"], "killed", "{record}");
        assert_eq!(record["cgroup_path"], format!("{}/workload", sandbox.cgroup_relative), "{record}");
    }
    // The kernel noted that some processes of the scope are only in the doomed table, so
    // the checks that look in one table look in both.
    assert_eq!(unfollowed_seen(&sandbox), seb_common::unfollowed::SOME_DOOMED);
}

/// A process of the scope the kernel does not track (its table was full) is still judged
/// at a write into another process's memory: once the kernel has noted that some process
/// went untracked (`SEB_UNFOLLOWED_SEEN`), the writes' cheap pre-check walks the caller's
/// cgroups instead. The probe's entry is removed by hand: with the flag clear the write
/// lands (the pre-check is what decides); with it raised, as an overflow raises it, the
/// writer is killed and the write lands nowhere.
#[test]
fn an_untracked_process_of_the_scope_is_judged_at_its_writes() {
    let mut sandbox = sandbox("untracked");
    sandbox.start_agent().unwrap();
    let flag = seb_common::map_names::UNFOLLOWED_SEEN;
    for (seen, killed) in [(seb_common::unfollowed::NONE, false), (seb_common::unfollowed::SOME_UNMARKED, true)] {
        let mut probe = sandbox.spawn_probe("workload", &["access", "--wait", "mem-write", "127.0.0.2:8443"]).unwrap();
        let mut lines = BufReader::new(probe.stdout.take().unwrap()).lines();
        let hello: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        let pid = hello["waiting"].as_u64().unwrap() as u32;
        seb_sandbox::tamper::forget_scoped_task(&sandbox.pin_path, pid).unwrap();
        seb_sandbox::tamper::write_array_slot(&sandbox.pin_path, flag, 0, seen).unwrap();
        probe.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let status = probe.wait().unwrap();
        let reports: Vec<Value> = lines.map(|line| serde_json::from_str(&line.unwrap()).unwrap()).collect();
        let word = reports.iter().find_map(|r| r["target_word"].as_u64());
        if killed {
            assert_eq!(status.signal(), Some(9), "untracked, flag raised: {reports:?}");
            assert_eq!(word, Some(0), "the killed writer wrote nothing: {reports:?}");
            let record = wait_for(&sandbox, |d| d["hook"] == "process_access" && d["tgid"] == pid);
            assert_eq!(record["action"], "killed", "{record}");
        } else {
            assert!(status.success(), "untracked, flag clear: the pre-check let it by: {reports:?}");
            assert_eq!(word, Some(1), "so the write landed (the attack is real): {reports:?}");
        }
    }
}

/// Where the kernel says the processes of the scope are tracked (`SEB_UNFOLLOWED_SEEN`).
fn unfollowed_seen(sandbox: &Sandbox) -> u32 {
    seb_sandbox::tamper::read_array_slot(&sandbox.pin_path, seb_common::map_names::UNFOLLOWED_SEEN, 0).unwrap()
}

/// With the table of doomed processes full as well (a sixteenth of the scope table, here
/// 16), the process of the scope that creates one more is killed at once, and recorded.
#[test]
fn a_process_that_creates_more_than_the_kernel_can_follow_is_killed() {
    let mut sandbox = Sandbox::new("fullest", tools()).unwrap();
    sandbox.write_config(&format!("max_scoped_processes = 16\n{POLICY}")).unwrap();
    sandbox.start_agent().unwrap();
    let (output, pid) = sandbox.probe_raw("workload", &["fork", "--count", "60", "tcp", "127.0.0.3:9"]).unwrap();
    assert_eq!(output.status.signal(), Some(9), "{}", String::from_utf8_lossy(&output.stdout));
    let record = wait_for(&sandbox, |d| d["hook"] == "scope_table_full" && d["tgid"] == pid);
    assert_eq!(record["action"], "killed", "{record}");
    assert_eq!(record["cgroup_path"], format!("{}/workload", sandbox.cgroup_relative), "{record}");
    // Some process of the scope is now in neither table: the checks that look in the
    // tables fall back to walking the caller's cgroups.
    assert_eq!(unfollowed_seen(&sandbox), seb_common::unfollowed::SOME_UNMARKED);
    // Its orphaned children go on, try and end (or are killed): none may outlive the test.
    let procs = sandbox.cgroup.join("workload").join("cgroup.procs");
    until(
        Duration::from_secs(10),
        || std::fs::read_to_string(&procs).unwrap().trim().is_empty(),
        || "children left behind".into(),
    );
}

type ProbeLines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// How a moved probe tries the protected endpoint.
#[derive(Clone, Copy)]
enum AfterMove {
    /// `socket()` and `connect()`.
    Tcp,
    /// The same from a second thread, once moved and once the process's first thread (its
    /// leader) has ended alone.
    TcpAfterLeaderExit,
    /// An io_uring set up before the move whose kernel thread (SQPOLL) makes and connects
    /// the socket afterwards, with no system call.
    SqpollRing,
    /// No connection: a tun device (`TUNSETIFF`), through the 32-bit gate with `compat`.
    Tun { compat: bool },
}

/// A probe in `<root>/workload` that waits until this test (an operator, never in the
/// scope) moves it to `<root>/<to>`, then tries the protected endpoint (or a tun device)
/// as `how` says. Returns the probe, its remaining output and its pid, once moved.
fn moved_by_an_operator(sandbox: &Sandbox, to: &str, how: AfterMove) -> (std::process::Child, ProbeLines, u64) {
    let (command, arguments): (&str, &[&str]) = match how {
        AfterMove::Tcp => ("after-moved-to", &["tcp", "127.0.0.2:8443"]),
        AfterMove::TcpAfterLeaderExit => ("after-moved-to", &["--leader-exits", "tcp", "127.0.0.2:8443"]),
        AfterMove::SqpollRing => ("sqpoll-after-moved-to", &["127.0.0.2:8443"]),
        AfterMove::Tun { compat: false } => ("tun-after-moved-to", &["seb-mtun"]),
        AfterMove::Tun { compat: true } => ("tun-after-moved-to", &["--compat", "seb-mtun"]),
    };
    moved_by_an_operator_running(sandbox, to, command, arguments)
}

/// A probe in `<root>/workload` running `command --cgroup <root>/<to> arguments`, which
/// waits until this test moves it there; the probe, its remaining output and its pid,
/// once moved.
fn moved_by_an_operator_running(
    sandbox: &Sandbox,
    to: &str,
    command: &str,
    arguments: &[&str],
) -> (std::process::Child, ProbeLines, u64) {
    let destination = sandbox.cgroup.join(to);
    let moved_to = destination.to_str().unwrap();
    let mut waiting = sandbox.spawn_probe("workload", &[&[command, "--cgroup", moved_to], arguments].concat()).unwrap();
    let mut lines = BufReader::new(waiting.stdout.take().unwrap()).lines();
    let hello: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let pid = hello["waiting"].as_u64().unwrap();
    std::fs::write(sandbox.cgroup.join(to).join("cgroup.procs"), pid.to_string()).unwrap();
    (waiting, lines, pid)
}

/// Moved out of the scope (to `<root>/broker`, unenforced) by an operator, the probe is
/// killed at its first socket() or io_uring request, before it reports anything. Returns
/// its pid.
fn killed_once_an_operator_moves_it_out(sandbox: &Sandbox, how: AfterMove) -> u64 {
    let (mut waiting, mut lines, pid) = moved_by_an_operator(sandbox, "broker", how);
    if let Some(line) = lines.next() {
        panic!("the moved process reported an outcome: {line:?}");
    }
    assert_eq!(waiting.wait().unwrap().signal(), Some(9), "moved out of the scope by an operator");
    pid
}

/// A registration is worth nothing once its broker is gone: not through a duplicate of
/// the socket kept by another process, not from a process created with the dead
/// broker's PID, also when the broker's leader thread ended before its others.
#[test]
fn a_dead_brokers_registration_is_refused_even_under_its_pid() {
    let mut sandbox = sandbox("deadbroker");
    sandbox.start_agent().unwrap();
    let pin_path = sandbox.pin_path.to_string_lossy().into_owned();
    let report = sandbox.probe("broker", &["dead-broker", "--pin-path", &pin_path, "127.0.0.2:8443"]).unwrap();
    assert_eq!(report["pid"], report["broker_pid"], "clone3 set_tid must reproduce the PID: {report}");
    assert_eq!(report["result"], "EPERM", "the dead broker's socket, from its PID: {report}");
    assert_eq!(sandbox.received().unwrap(), 0);

    // A broker whose first thread ends before the others stays a broker until its last
    // thread ends, and not a moment longer.
    let report = sandbox
        .probe("broker", &["dead-broker", "--leader-exits-first", "--pin-path", &pin_path, "127.0.0.2:8443"])
        .unwrap();
    assert_eq!(report["live"], "ok", "its second thread, once its leader has exited: {report}");
    assert_eq!(report["pid"], report["broker_pid"], "clone3 set_tid must reproduce the PID: {report}");
    assert_eq!(report["result"], "EPERM", "the dead broker's socket, from its PID: {report}");
    assert_eq!(sandbox.received().unwrap(), 1, "only the live broker's connection");

    // The running broker is unaffected.
    let probe = sandbox.agent_cli(&["probe-egress", "127.0.0.2:8443", "--json"]).unwrap();
    assert_eq!(parse_json_output(&probe, "probe-egress").unwrap()["connected"], true);
}

/// Wait for a denial record that `matches`.
fn wait_for(sandbox: &Sandbox, matches: impl Fn(&Value) -> bool) -> Value {
    eventually(
        Duration::from_secs(10),
        || sandbox.denials().unwrap().into_iter().find(&matches),
        || format!("no matching denial: {:?}", sandbox.denials().unwrap()),
    )
}

#[test]
fn only_the_running_broker_passes_not_its_neighbours_children_or_successors() {
    let mut sandbox = sandbox("identity");
    sandbox.start_agent().unwrap();
    let addr = "127.0.0.2:8443";

    // Another process in the broker's own cgroup.
    let neighbour = sandbox.attempt("broker", "tcp", addr).unwrap();
    assert_eq!(neighbour["result"], "EPERM", "a process in the broker's cgroup: {neighbour}");

    // A process registered exactly as the broker registers its sockets, and its children.
    let pin_path = sandbox.pin_path.to_string_lossy().into_owned();
    let report = sandbox.probe("broker", &["as-broker", "--pin-path", &pin_path, addr]).unwrap();
    assert_eq!(report["registered_connect"], "ok", "{report}");
    assert_eq!(report["forked_child_new_socket"], "EPERM", "{report}");
    assert_eq!(report["forked_child_inherited_socket"], "EPERM", "{report}");
    assert_eq!(report["exec_child"], "EPERM", "{report}");

    // A process that takes over that broker's PID after it exited.
    let old_pid = report["pid"].as_i64().unwrap();
    wait_gone(Path::new(&format!("/proc/{old_pid}")));
    let successor = sandbox.probe("broker", &["reuse-pid", &old_pid.to_string(), "tcp", addr]).unwrap();
    assert_eq!(successor["pid"], old_pid, "clone3 set_tid must reproduce the PID: {successor}");
    assert_eq!(successor["result"], "EPERM", "a process reusing the broker's PID: {successor}");
}

#[test]
fn enforcement_outlives_the_agent_and_a_restart_readopts_it_without_a_gap() {
    let mut sandbox = sandbox("restart");
    sandbox.start_agent().unwrap();
    let links = sandbox.pinned_links().unwrap();
    assert_eq!(links.len(), attached_links(), "{links:?}");

    sandbox.kill_agent().unwrap();
    let while_down = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(while_down["result"], "EPERM", "with the agent killed: {while_down}");

    // Connect in a loop for the whole restart: every attempt must be denied.
    const HAMMER_MS: u64 = 6_000;
    let hammering = std::time::Instant::now();
    let hammer = thread::spawn({
        let (cgroup, netns, probe) =
            (sandbox.cgroup.join("workload"), sandbox.netns.clone(), sandbox.tools.probe.clone());
        move || {
            let output = Command::new(probe)
                .arg("--cgroup")
                .arg(cgroup)
                .args(["--netns", &netns, "repeat", "tcp", "127.0.0.2:8443", "--millis", &HAMMER_MS.to_string()])
                .output()
                .unwrap();
            parse_json_output(&output, "seb-probe repeat").unwrap()
        }
    });
    thread::sleep(Duration::from_millis(200));
    let logs = sandbox.start_agent().unwrap();
    // The loop must still run once the agent is up, or it proved nothing of the restart.
    let started_after = hammering.elapsed();
    assert!(started_after < Duration::from_millis(HAMMER_MS - 500), "the agent took {started_after:?} to start");
    let hammered = hammer.join().unwrap();
    assert!(hammered["denied"].as_u64().unwrap() > 0, "{hammered}");
    assert_eq!(hammered["other"], serde_json::json!([]), "attempts not denied during the restart: {hammered}");

    let active = logs
        .iter()
        .find(|line| line["fields"]["message"] == "kernel enforcement active")
        .unwrap_or_else(|| panic!("no 'kernel enforcement active' log: {logs:?}"));
    assert_eq!(active["fields"]["adopted"], attached_links(), "all links re-adopted: {active}");
    assert_eq!(sandbox.pinned_links().unwrap(), links, "the same links stay pinned");

    // The denial made while the agent was dead waited in the pinned ring buffer.
    let denial = sandbox.wait_for_denial(cookie(&while_down)).unwrap();
    assert_eq!(denial["hook"], "connect4");

    // And the restarted broker gets through again.
    let probe = sandbox.agent_cli(&["probe-egress", "127.0.0.2:8443", "--json"]).unwrap();
    assert_eq!(parse_json_output(&probe, "probe-egress").unwrap()["connected"], true);
}

#[test]
fn a_bad_config_names_the_field_and_nothing_is_attached() {
    let sandbox = Sandbox::new("config", tools()).unwrap();
    let own = &sandbox.cgroup_relative;
    // Every case names the sandbox's own cgroup as scope: never the machine's root.
    let cases = [
        (
            format!("[enforcement]\nscope = [\"{own}\"]\n[[enforcement.protected]]\ncidr = \"10.0.0.256\"\n"),
            "enforcement.protected[0].cidr",
        ),
        (format!("[enforcement]\nscope = [\"{own}\", \"{own}/no-such-cgroup\"]\n"), "enforcement.scope[1]"),
        (
            format!("[enforcement]\nscope = [\"{own}\"]\nexempt_cgroups = [\"{own}/no-such-cgroup\"]\n"),
            "enforcement.exempt_cgroups[0]",
        ),
        (format!("[enforcement]\nscope = [\"{own}\"]\nexempt = []\n"), "exempt"),
    ];
    for (text, field) in cases {
        let config = format!("[bpf]\npin_path = \"{}\"\n{text}", sandbox.pin_path.display());
        std::fs::write(&sandbox.config, config).unwrap();
        let output = sandbox.agent_cli(&["run"]).unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(&format!("`{field}`")), "the error should name `{field}`: {stderr}");
        assert!(!sandbox.pin_path.join("links").exists(), "nothing may be attached after a config error");
    }
}

/// One cgroup refused as fast as it can call puts at most its kernel rate in the ring
/// buffer every cgroup shares: with the agent down (nothing drains it), another cgroup's
/// denial still finds room. Many cgroups flooding at once can still fill it: what does
/// not fit is counted as lost. Every denial is recorded, summed, or counted.
#[test]
fn denials_lost_to_a_full_ring_buffer_are_counted_never_silent() {
    let mut sandbox = sandbox("ringloss");
    let flooders: Vec<String> = (0..12).map(|i| format!("flood{i}")).collect();
    for cgroup in flooders.iter().chain([&"second".to_string()]) {
        std::fs::create_dir_all(sandbox.cgroup.join(cgroup)).unwrap();
    }
    sandbox.start_agent().unwrap();
    // One cgroup floods for three seconds with the agent down; then another is refused.
    sandbox.kill_agent().unwrap();
    let mut denied = flood(&sandbox, &flooders[..1], "3000");
    another_cgroup_still_finds_room(&mut sandbox, "the flood");
    denied += 1;

    // Twelve cgroups at once overflow the ring (12 x 256 a second > about 2,200 events).
    sandbox.kill_agent().unwrap();
    denied += flood(&sandbox, &flooders, "2000");
    sandbox.start_agent().unwrap();
    let loss = eventually(
        Duration::from_secs(60),
        || last_loss(&sandbox).filter(|loss| loss["lost_total"].as_u64() > Some(0)),
        || "no ring_loss record of a full ring".into(),
    );

    // What the ring held is drained: a few denials of each second in full, the rest
    // summed per second (one process denied as fast as it can call must not fill the
    // disk), and the summaries come in once each second is over.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (delivered, suppressed, counted) = loop {
        let delivered = sandbox.denials().unwrap().len() as u64;
        let summaries = audit_records(&sandbox, seb_agent::denial_budget::SUPPRESSED_KIND);
        let suppressed: u64 = summaries.iter().map(|r| r["body"]["suppressed"].as_u64().unwrap()).sum();
        let loss = last_loss(&sandbox).unwrap_or(loss.clone());
        let counted = loss["lost_total"].as_u64().unwrap() + loss["over_rate_total"].as_u64().unwrap();
        if delivered + suppressed + counted == denied || std::time::Instant::now() > deadline {
            break (delivered, suppressed, counted);
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(delivered > 0 && suppressed > 0, "delivered {delivered}, suppressed {suppressed}");
    assert_eq!(delivered + suppressed + counted, denied, "every denial is recorded, summed or counted");
    // At most a few full records per flooding process and second (each is one kind),
    // however fast it was refused: 3 s (4 seconds touched) for one, 2 s (3) for twelve,
    // and the second cgroup's one.
    let bound = u64::from(seb_agent::denial_budget::PER_KEY) * (4 + 12 * 3) + 1;
    assert!(delivered <= bound, "{delivered} recorded in full, more than {bound}");
}

/// Kills are rated like refusals: one cgroup whose processes are killed as fast as it
/// can make them (each at `socket(AF_PACKET)`, which needs no privilege to be tried)
/// does not fill the ring every cgroup shares; with the agent down, another cgroup's
/// denial still finds room, and the kills past the rate are counted.
#[test]
fn one_cgroup_killed_as_fast_as_it_forks_cannot_fill_the_ring() {
    let mut sandbox = sandbox("killflood");
    for cgroup in ["storm", "second"] {
        std::fs::create_dir_all(sandbox.cgroup.join(cgroup)).unwrap();
    }
    sandbox.start_agent().unwrap();
    sandbox.kill_agent().unwrap();
    let storm = sandbox.probe("storm", &["kill-storm", "--millis", "3000"]).unwrap();
    assert_eq!(storm["other"], 0, "{storm}");
    // More kills than the ring holds records (about 2,200).
    assert!(storm["killed"].as_u64().unwrap() > 3000, "{storm}");
    another_cgroup_still_finds_room(&mut sandbox, "the storm");
}

/// After one cgroup flooded the ring with the agent down (`what`): a denial of the
/// `second` cgroup is still recorded once the agent is back, nothing is lost, and the
/// flood's excess was counted over its rate.
fn another_cgroup_still_finds_room(sandbox: &mut Sandbox, what: &str) {
    let second = sandbox.attempt("second", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(second["result"], "EPERM", "{second}");
    sandbox.start_agent().unwrap();
    let found = sandbox.wait_for_denial(cookie(&second)).unwrap();
    assert_eq!(found["cgroup_path"], format!("{}/second", sandbox.cgroup_relative), "{found}");
    let loss =
        eventually(Duration::from_secs(30), || last_loss(sandbox), || format!("no ring_loss record after {what}"));
    assert_eq!(loss["lost_total"], 0, "{what} filled the ring: {loss}");
    assert!(loss["over_rate_total"].as_u64().unwrap() > 0, "{loss}");
}

/// `repeat` refused connects from each of `cgroups` at once for `millis`; how many were
/// refused in all (nothing else may happen to them).
fn flood(sandbox: &Sandbox, cgroups: &[String], millis: &str) -> u64 {
    thread::scope(|s| {
        let floods: Vec<_> = cgroups
            .iter()
            .map(|cgroup| {
                s.spawn(move || {
                    sandbox.probe(cgroup, &["repeat", "tcp", "127.0.0.2:8443", "--millis", millis]).unwrap()
                })
            })
            .collect();
        floods
            .into_iter()
            .map(|flood| {
                let hammered = flood.join().unwrap();
                assert_eq!(hammered["other"], serde_json::json!([]), "{hammered}");
                hammered["denied"].as_u64().unwrap()
            })
            .sum()
    })
}

fn last_loss(sandbox: &Sandbox) -> Option<Value> {
    audit_records(sandbox, "ring_loss").last().map(|record| record["body"].clone())
}

#[test]
fn a_pod_shaped_cgroup_outside_the_kubelets_hierarchy_names_no_pod() {
    let mut sandbox = sandbox("pod");
    sandbox.start_agent().unwrap();
    // Laid out as the kubelet's cgroupfs driver lays out a container, but in a subtree
    // anyone it is delegated to may shape so (the kubelet's own is `/kubepods`): a
    // denial there must not name the pod (cluster.rs covers a configured kubelet root).
    let (pod_uid, container) = ("0f3c2a1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b", format!("{:064x}", 42));
    let pod = sandbox.cgroup.join("workload").join(format!("pod{pod_uid}"));
    std::fs::create_dir_all(pod.join(&container)).unwrap();
    let relative = format!("workload/pod{pod_uid}/{container}");
    let outcome = sandbox.probe(&relative, &["try", "tcp", "127.0.0.2:8443"]).unwrap();
    assert_eq!(outcome["result"], "EPERM", "{outcome}");
    let denial = sandbox.wait_for_denial(cookie(&outcome)).unwrap();
    assert_eq!(denial["cgroup_path"], format!("{}/{relative}", sandbox.cgroup_relative), "{denial}");
    assert!(denial["pod_uid"].is_null() && denial["container_id"].is_null(), "{denial}");
    std::fs::remove_dir(pod.join(&container)).unwrap();
    std::fs::remove_dir(&pod).unwrap();
}

/// Root detaches one of seb's links (the guard that would refuse it needs BPF-LSM,
/// which this kernel does not load): connect4 refuses nothing for a moment (the egress
/// program still drops the SYN); within a second the agent notices, reports not ready,
/// re-attaches, and records it.
#[test]
fn a_detached_link_is_noticed_reported_repaired_and_recorded() {
    let mut sandbox = sandbox("tamper");
    sandbox.start_agent().unwrap();
    let pin = pin_of(&sandbox, "seb_connect4");

    seb_sandbox::tamper::detach_pinned_link(&pin).unwrap();
    let detached_at = std::time::Instant::now();
    // The connect runs alongside: it waits out its timeout, and the agent is watched
    // meanwhile.
    let (through, saw_unready, noticed_after) = thread::scope(|scope| {
        let through = scope.spawn(|| sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap());
        let (mut saw_unready, mut noticed_after) = (false, None);
        while detached_at.elapsed() < Duration::from_secs(5) {
            let status = sandbox.status().unwrap();
            saw_unready |= status["ready"] == false;
            if noticed_after.is_none() && status["integrity"]["tampered_checks"].as_u64() >= Some(1) {
                noticed_after = Some(detached_at.elapsed());
            }
            if noticed_after.is_some() && status["ready"] == true {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        (through.join().unwrap(), saw_unready, noticed_after)
    });
    let noticed_after = noticed_after.expect("the agent never noticed the detached link");
    assert!(noticed_after < Duration::from_secs(1), "noticed after {noticed_after:?}");
    assert!(saw_unready, "status never reported not ready while the link was detached");
    // connect4 refused nothing (the attack is real); the egress program still dropped the
    // SYN, so the connect times out instead.
    assert_eq!(through["result"], "timed out", "while detached: {through}");

    let status = sandbox.status().unwrap();
    assert_eq!(status["ready"], true, "ready again once repaired: {status}");
    let findings = &status["integrity"]["last_findings"];
    assert!(
        findings
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["object"] == pin.to_str().unwrap() && f["problem"].as_str().unwrap().contains("detached")),
        "{status}"
    );
    assert_eq!(status["integrity"]["repaired"], true, "{status}");
    let records = audit_records(&sandbox, "tamper");
    assert!(records.iter().any(|r| r["body"]["findings"][0]["object"] == pin.to_str().unwrap()), "{records:?}");

    // Enforced again.
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "EPERM", "after the repair: {outcome}");

    // A policy entry removed behind the agent's back is written again too.
    seb_sandbox::tamper::remove_protected_v4(&sandbox.pin_path, [127, 0, 0, 2], 32).unwrap();
    wait_for_tamper(&sandbox, "the removed prefix", |r| r["body"]["findings"][0]["object"] == "SEB_PROTECTED_V4");
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "EPERM", "after the map repair: {outcome}");

    // The offsets the programs read kernel structures at are frozen: not even root can
    // point them elsewhere (here: where 32-bit system calls are told apart).
    let layout_map = seb_common::map_names::KERNEL_LAYOUT;
    let error = seb_sandbox::tamper::write_array_slot(&sandbox.pin_path, layout_map, layout::TASK_THREAD_STATUS, 0)
        .expect_err("the kernel layout took a write");
    assert!(format!("{error:?}").contains("Operation not permitted"), "{error:?}");

    // The macvtap major zeroed (writes to such devices would go unjudged) is noticed and
    // written again from /proc/devices.
    let majors = seb_common::map_names::DEVICE_MAJORS;
    let major = seb_sandbox::tamper::read_array_slot(&sandbox.pin_path, majors, 0).unwrap();
    assert_ne!(major, 0, "this kernel registers macvtap");
    seb_sandbox::tamper::write_array_slot(&sandbox.pin_path, majors, 0, 0).unwrap();
    wait_for_tamper(&sandbox, "the zeroed major", |r| r["body"]["findings"][0]["object"] == majors);
    assert_eq!(seb_sandbox::tamper::read_array_slot(&sandbox.pin_path, majors, 0).unwrap(), major, "not repaired");

    // The flag that sends the write pre-check to the cgroup walk once a process of the
    // scope went untracked only rises in the kernel: lowered, it is noticed and raised
    // again.
    let flag = seb_common::map_names::UNFOLLOWED_SEEN;
    seb_sandbox::tamper::write_array_slot(&sandbox.pin_path, flag, 0, seb_common::unfollowed::SOME_UNMARKED).unwrap();
    thread::sleep(Duration::from_millis(1500));
    seb_sandbox::tamper::write_array_slot(&sandbox.pin_path, flag, 0, seb_common::unfollowed::NONE).unwrap();
    wait_for_tamper(&sandbox, "the lowered flag", |r| r["body"]["findings"][0]["object"] == flag);
    let level = seb_sandbox::tamper::read_array_slot(&sandbox.pin_path, flag, 0).unwrap();
    assert_eq!(level, seb_common::unfollowed::SOME_UNMARKED, "not raised again");
}

/// A link detached while the agent was down is not adopted as enforcement: the agent
/// attaches a new one.
#[test]
fn a_restart_never_adopts_a_detached_link() {
    let mut sandbox = sandbox("readopt");
    sandbox.start_agent().unwrap();
    let pin = pin_of(&sandbox, "seb_connect4");
    sandbox.kill_agent().unwrap();
    seb_sandbox::tamper::detach_pinned_link(&pin).unwrap();
    let through = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(
        through["result"], "timed out",
        "detached and nobody watching, only the egress program drops it: {through}"
    );

    let logs = sandbox.start_agent().unwrap();
    let active = logs.iter().find(|line| line["fields"]["message"] == "kernel enforcement active").unwrap();
    assert_eq!(active["fields"]["adopted"], attached_links() - 1, "the detached link is not adopted: {active}");
    let replaced = logs
        .iter()
        .find(|line| line["fields"]["message"] == "replacing a pinned link")
        .unwrap_or_else(|| panic!("no replacement logged: {logs:?}"));
    assert!(replaced["fields"]["why"].as_str().unwrap().contains("detached"), "{replaced}");
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "EPERM", "{outcome}");
}

/// Root pins, in place of seb's link of its fork-following program, that same program
/// (same instructions, same maps) linked to a tracepoint that never fires here: the
/// program and maps match, but forks would no longer be followed into the scope. Noticed
/// and repaired while the agent runs, and not adopted at a restart.
#[test]
fn a_tracepoint_link_pinned_on_another_tracepoint_is_noticed_and_not_adopted() {
    use seb_agent::enforcement::link_info::{Tracepoint, pinned_link};
    let fork_tracepoint = Tracepoint::Named("sched_process_fork".into());
    let mut sandbox = sandbox("tracepoint");
    sandbox.start_agent().unwrap();
    let pin = pin_of(&sandbox, "seb_process_fork");
    assert_eq!(pinned_link(&pin).unwrap().tracepoint, fork_tracepoint);

    seb_sandbox::tamper::pin_on_other_raw_tracepoint(&pin, "sched_move_numa").unwrap();
    assert_eq!(pinned_link(&pin).unwrap().tracepoint, Tracepoint::Named("sched_move_numa".into()));
    wait_for_tamper(&sandbox, "the link on another tracepoint", |r| {
        r["body"]["findings"].as_array().into_iter().flatten().any(|f| {
            f["object"] == pin.to_str().unwrap()
                && f["problem"].as_str().unwrap_or_default().contains("runs on tracepoint sched_move_numa")
        })
    });
    until(
        Duration::from_secs(5),
        || pinned_link(&pin).is_ok_and(|link| link.tracepoint == fork_tracepoint),
        || format!("not linked to sched_process_fork again: {:?}", pinned_link(&pin)),
    );

    sandbox.kill_agent().unwrap();
    seb_sandbox::tamper::pin_on_other_raw_tracepoint(&pin, "sched_move_numa").unwrap();
    let logs = sandbox.start_agent().unwrap();
    let replaced = logs
        .iter()
        .find(|line| {
            line["fields"]["message"] == "replacing a pinned link" && line["fields"]["pin"] == pin.to_str().unwrap()
        })
        .unwrap_or_else(|| panic!("no replacement logged: {logs:?}"));
    assert!(replaced["fields"]["why"].as_str().unwrap().contains("sched_move_numa"), "{replaced}");
    assert_eq!(pinned_link(&pin).unwrap().tracepoint, fork_tracepoint);
}

/// Root loads a program of its own bound to seb's maps (from inside the kernel it could
/// forge registrations or swallow denials, with no system call on the maps): a finding
/// for as long as it is loaded, not repairable by the agent, and gone once it is.
#[test]
fn a_foreign_program_bound_to_sebs_maps_is_reported_while_it_is_loaded() {
    let mut sandbox = sandbox("foreign");
    sandbox.start_agent().unwrap();
    let program =
        seb_sandbox::tamper::load_program_using_map(&sandbox.pin_path, seb_common::map_names::BROKER_SOCKETS).unwrap();
    wait_for_tamper(&sandbox, "the foreign program", |record| {
        record["body"]["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "program" && f["object"].as_str().unwrap().contains("root_map_user"))
            && record["body"]["repaired"] == false
    });
    assert_eq!(sandbox.status().unwrap()["ready"], false);
    // Every check finds it again; the audit store holds it once until it changes
    // (or a minute passes), not twice a second.
    thread::sleep(seb_agent::tamper::INTERVAL * 5);
    let recorded = audit_records(&sandbox, "tamper")
        .into_iter()
        .filter(|record| record["body"]["findings"].as_array().unwrap().iter().any(|f| f["kind"] == "program"))
        .count();
    assert_eq!(recorded, 1, "the unrepaired divergence is recorded at every check");
    drop(program);
    until(
        Duration::from_secs(5),
        || sandbox.status().unwrap()["ready"] == true,
        || "still not ready once the program was unloaded".into(),
    );
}

/// The kernel lets the agent (and its cgroup) make `bpf()` calls in the scope by what
/// `SEB_AGENT` names: this agent while it runs, nobody once it has ended, so that the
/// next one can start. Rewritten by root, it is noticed, recorded and written back.
#[test]
fn the_agent_is_named_to_the_kernel_while_it_runs_and_only_then() {
    let mut sandbox = sandbox("agentmap");
    sandbox.start_agent().unwrap();
    let broker_cgroup = std::fs::metadata(sandbox.cgroup.join("broker")).unwrap().ino();
    let named = [u64::from(sandbox.agent_pid().unwrap()), broker_cgroup];
    assert_eq!(seb_sandbox::tamper::agent_entry(&sandbox.pin_path).unwrap(), named);

    // The kernel names the agent's cgroup itself, at the agent's first call; the agent's
    // check keeps that and writes back either part rewritten.
    let workload = std::fs::metadata(sandbox.cgroup.join("workload")).unwrap().ino();
    let named_again = || {
        until(
            Duration::from_secs(2),
            || seb_sandbox::tamper::agent_entry(&sandbox.pin_path).unwrap() == named,
            || "SEB_AGENT never named the agent again".into(),
        );
    };
    let rewritten = |part: &'static str| {
        move |record: &Value| {
            record["body"]["findings"].as_array().unwrap().iter().any(|f| {
                f["object"] == "SEB_AGENT" && f["problem"].as_str().unwrap().starts_with(&format!("names {part}"))
            }) && record["body"]["repaired"] == true
        }
    };
    seb_sandbox::tamper::write_agent_entry(&sandbox.pin_path, [named[0], workload]).unwrap();
    wait_for_tamper(&sandbox, "the rewritten agent cgroup", rewritten("cgroup"));
    named_again();
    seb_sandbox::tamper::write_agent_entry(&sandbox.pin_path, [1, workload]).unwrap();
    wait_for_tamper(&sandbox, "the rewritten agent tgid", rewritten("tgid"));
    named_again();

    // A process of the scope that moves the agent (into its own cgroup, whose processes
    // would then be spared) is killed for it, and the agent's cgroup stays named.
    let procs = sandbox.cgroup.join("workload").join("cgroup.procs");
    let move_agent = format!("echo {} > {}", named[0], procs.display());
    let (output, _) = sandbox.probe_raw("workload", &["exec", "--", "sh", "-c", &move_agent]).unwrap();
    assert_eq!(output.status.signal(), Some(9), "moved the agent: {output:?}");
    thread::sleep(seb_agent::tamper::INTERVAL * 3);
    assert_eq!(
        seb_sandbox::tamper::agent_entry(&sandbox.pin_path).unwrap(),
        named,
        "the moved agent renamed its cgroup"
    );
    let pin_path = sandbox.pin_path.to_string_lossy().into_owned();
    let (output, _) = sandbox.probe_raw("workload", &["bpf-call", "--pin-path", &pin_path, "127.0.0.2:9000"]).unwrap();
    assert_eq!(output.status.signal(), Some(9), "bpf() from the agent's new cgroup: {output:?}");

    sandbox.kill_agent().unwrap();
    assert_eq!(seb_sandbox::tamper::agent_entry(&sandbox.pin_path).unwrap(), [0, 0], "still named once it ended");
    sandbox.start_agent().unwrap();
    let restarted = [u64::from(sandbox.agent_pid().unwrap()), broker_cgroup];
    assert_eq!(seb_sandbox::tamper::agent_entry(&sandbox.pin_path).unwrap(), restarted);
}

/// A process of the scope put into the agent's cgroup while no agent ran (a restart)
/// would be spared there, at `bpf()` and as a broker, once the next agent is named: that
/// agent kills it at start, before it arms its cgroup, and records it. A process there
/// that never was of the scope stays (the agent's cgroup is outside the scope here, as a
/// node agent's usually is).
#[test]
fn a_process_put_in_the_agents_cgroup_while_none_ran_is_killed_before_it_is_spared() {
    let mut sandbox = sandbox("entrant");
    let workload = format!("{}/workload", sandbox.cgroup_relative);
    sandbox.write_config_scoped(&[workload], "").unwrap();
    sandbox.start_agent().unwrap();
    let mut entrant = sandbox.spawn_in("workload", "sleep", &["600"]).unwrap();
    let mut bystander = sandbox.spawn_in("broker", "sleep", &["600"]).unwrap();
    let (pid, bystander_pid) = (entrant.id(), bystander.id());
    until(
        Duration::from_secs(5),
        || seb_sandbox::tamper::scoped_entry(&sandbox.pin_path, pid).unwrap().is_some(),
        || "the kernel never followed the process in the workload".into(),
    );
    sandbox.stop_agent().unwrap();
    // Moved by an operator (this test) while no agent runs: no rule judges the move.
    std::fs::write(sandbox.cgroup.join("broker").join("cgroup.procs"), pid.to_string()).unwrap();
    thread::sleep(Duration::from_millis(200));
    assert!(entrant.try_wait().unwrap().is_none(), "moved while no agent ran, it died at once");

    sandbox.start_agent().unwrap();
    let status = eventually(
        Duration::from_secs(5),
        || entrant.try_wait().unwrap(),
        || "the process put in the agent's cgroup lives on".into(),
    );
    assert_eq!(status.signal(), Some(9), "{status:?}");
    wait_for_tamper(&sandbox, "the process in the agent's cgroup", |record| {
        record["body"]["findings"].as_array().unwrap().iter().any(|f| {
            let problem = f["problem"].as_str().unwrap();
            f["kind"] == "process"
                && f["object"].as_str().unwrap().ends_with("/broker")
                && problem.contains(&format!("tgid {pid} ("))
                && !problem.contains(&format!("tgid {bystander_pid} ("))
        })
    });
    assert!(bystander.try_wait().unwrap().is_none(), "the process that never was of the scope was killed");
    // Armed once it was gone: the agent's cgroup is named without the unarmed bit.
    let broker_cgroup = std::fs::metadata(sandbox.cgroup.join("broker")).unwrap().ino();
    let named = [u64::from(sandbox.agent_pid().unwrap()), broker_cgroup];
    assert_eq!(seb_sandbox::tamper::agent_entry(&sandbox.pin_path).unwrap(), named);
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

/// A doom the full table of doomed processes refuses is not lost silently: the kernel
/// raises `SEB_UNFOLLOWED_SEEN` to its top level, and from then on the agent's cgroup
/// spares nobody at `bpf()`. Here 16 processes of the scope moved into the agent's
/// cgroup by an operator fill the table (a sixteenth of 256); the next one, moved there
/// the same way, would have been spared there: it is killed at its `bpf()` call.
#[test]
fn a_doom_the_full_table_refuses_leaves_the_agents_cgroup_sparing_nobody() {
    let mut sandbox = Sandbox::new("doomfull", tools()).unwrap();
    sandbox.write_config(&format!("max_scoped_processes = 256\n{POLICY}")).unwrap();
    sandbox.start_agent().unwrap();
    let procs = sandbox.cgroup.join("broker").join("cgroup.procs");
    let mut sleepers = Vec::new();
    for _ in 0..16 {
        let sleeper = sandbox.spawn_in("workload", "sleep", &["600"]).unwrap();
        until(
            Duration::from_secs(5),
            || seb_sandbox::tamper::scoped_entry(&sandbox.pin_path, sleeper.id()).unwrap().is_some(),
            || "the kernel never followed a sleeper".into(),
        );
        std::fs::write(&procs, sleeper.id().to_string()).unwrap();
        sleepers.push(sleeper);
    }
    assert_eq!(unfollowed_seen(&sandbox), seb_common::unfollowed::NONE, "the table was full before the last");

    let pin_path = sandbox.pin_path.to_string_lossy().into_owned();
    let arguments = ["--pin-path", &pin_path, "127.0.0.2:9000"];
    let (mut waiting, mut lines, pid) =
        moved_by_an_operator_running(&sandbox, "broker", "bpf-after-moved-to", &arguments);
    let status = waiting.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "spared in the agent's cgroup with its doom lost: {:?}", lines.next());
    wait_for(&sandbox, |d| d["hook"] == "bpf_syscall" && d["tgid"] == pid);
    assert_eq!(unfollowed_seen(&sandbox), seb_common::unfollowed::SOME_UNMARKED);
    for mut sleeper in sleepers {
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }
}

/// Root removes a link's pin (an `unlink` on bpffs, which no `bpf()` check sees): the
/// agent holds a descriptor of every link, so the link stays attached and enforcing;
/// the check notices the missing pin, records it and pins the link again.
#[test]
fn a_removed_link_pin_leaves_the_link_enforcing_until_it_is_pinned_again() {
    let mut sandbox = sandbox("unpinned");
    sandbox.start_agent().unwrap();
    let pin = pin_of(&sandbox, "seb_connect4");
    std::fs::remove_file(&pin).unwrap();
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "EPERM", "just after the pin was removed: {outcome}");
    wait_for_tamper(&sandbox, "the removed pin", |record| {
        record["body"]["findings"].as_array().unwrap().iter().any(|f| f["kind"] == "link")
            && record["body"]["repaired"] == true
    });
    assert!(pin_of(&sandbox, "seb_connect4").exists(), "pinned again");
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "EPERM", "after the repair: {outcome}");
    assert_eq!(sandbox.received().unwrap(), 0);
}

/// Map pins removed on bpffs (an `unlink`, no `bpf()` call): noticed, pinned again to
/// the agent's own maps, and recorded, so that the next start reuses them rather than
/// making fresh ones (which would forget the processes followed out of the scope and the
/// denials queued while no agent ran). Before (found by review), only link pins were
/// checked.
#[test]
fn removed_map_pins_are_noticed_and_pinned_again() {
    let mut sandbox = sandbox("mappins");
    sandbox.start_agent().unwrap();
    let maps = sandbox.pin_path.join("maps");
    let id = |name: &str| aya::maps::MapData::from_pin(maps.join(name)).unwrap().info().unwrap().id();
    let before = id(seb_common::map_names::SCOPED_TASKS);
    for name in [seb_common::map_names::SCOPED_TASKS, seb_common::map_names::DENIALS] {
        std::fs::remove_file(maps.join(name)).unwrap();
    }
    wait_for_tamper(&sandbox, "the removed map pins", |record| {
        let findings = record["body"]["findings"].as_array().unwrap();
        [seb_common::map_names::SCOPED_TASKS, seb_common::map_names::DENIALS].iter().all(|name| {
            findings.iter().any(|f| {
                f["kind"] == "map" && f["object"] == *name && f["problem"].as_str().unwrap().contains("pinned again")
            })
        })
    });
    for name in [seb_common::map_names::SCOPED_TASKS, seb_common::map_names::DENIALS] {
        assert!(maps.join(name).exists(), "{name} pinned again");
    }
    assert_eq!(id(seb_common::map_names::SCOPED_TASKS), before, "the agent's own map, pinned again");
    // A restart reuses it, and enforces as before.
    sandbox.stop_agent().unwrap();
    sandbox.start_agent().unwrap();
    assert_eq!(id(seb_common::map_names::SCOPED_TASKS), before, "reused at the restart");
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "EPERM", "{outcome}");
}

/// A scope cgroup the config names is removed (a systemd unit restarting): reported, and
/// the agent not ready, until it exists again and is enforced. Before (found by review),
/// it was dropped with a log line, and made again it ran unenforced until the next check
/// while the agent said ready.
#[test]
fn a_configured_scope_cgroup_that_disappears_is_reported_until_it_is_enforced_again() {
    let mut sandbox = sandbox("scopegone");
    let unit = format!("{}/unit", sandbox.cgroup_relative);
    let unit_dir = sandbox.cgroup.join("unit");
    std::fs::create_dir(&unit_dir).unwrap();
    sandbox.write_config_scoped(&[sandbox.cgroup_relative.clone(), unit], POLICY).unwrap();
    sandbox.start_agent().unwrap();
    std::fs::remove_dir(&unit_dir).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status = sandbox.status().unwrap();
        let reported = status["integrity"]["last_findings"]
            .as_array()
            .is_some_and(|findings| findings.iter().any(|f| f["kind"] == "scope"));
        if reported && status["ready"] == false {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the missing scope cgroup was never reported: {status}");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(status["integrity"]["last_findings"].to_string().contains("/unit"), "{status}");
    std::fs::create_dir(&unit_dir).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sandbox.status().unwrap()["ready"] != true {
        assert!(std::time::Instant::now() < deadline, "not ready again once the cgroup was back");
        thread::sleep(Duration::from_millis(50));
    }
    sandbox.stop_agent().unwrap();
    std::fs::remove_dir(&unit_dir).unwrap();
}

/// Root empties the rules for protected endpoints on local addresses (what stops a
/// wildcard listener serving one from answering at any local address): noticed,
/// written back and recorded.
#[test]
fn emptied_local_protection_is_noticed_and_written_back() {
    let mut sandbox = sandbox("local");
    sandbox.start_agent().unwrap();
    let written = seb_sandbox::tamper::local_protected_entries(&sandbox.pin_path).unwrap();
    assert_eq!(written, 2, "this namespace's rules and every other namespace's");
    assert_eq!(seb_sandbox::tamper::clear_local_protected(&sandbox.pin_path).unwrap(), 2);
    wait_for_tamper(&sandbox, "the emptied local rules", |record| {
        record["body"]["findings"][0]["object"] == "SEB_LOCAL_PROTECTED" && record["body"]["repaired"] == true
    });
    assert_eq!(seb_sandbox::tamper::local_protected_entries(&sandbox.pin_path).unwrap(), 2);
}

/// A connection opened to a protected endpoint before seb watched its cgroup (seb not
/// yet installed, a pod found late, an address protected later) was never judged at
/// connect: its packets are judged as they leave, so nothing more of it arrives.
#[test]
fn a_connection_opened_before_enforcement_is_cut_once_it_is_enforced() {
    let mut sandbox = Sandbox::new("preexisting", tools()).unwrap();
    sandbox.write_config(POLICY).unwrap();
    let endpoint = sandbox.record_tcp("127.0.0.2:8443".parse().unwrap()).unwrap();
    // One from the scope, then one from the exempt cgroup (a kubelet's watch, say).
    let mut early: Vec<_> = ["workload", "exempt"]
        .iter()
        .map(|cgroup| {
            let mut child = sandbox.spawn_probe(cgroup, &["connect-then-send", "127.0.0.2:8443"]).unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let connected: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            assert_eq!(connected["connected"], "ok", "{cgroup}, before the agent: {connected}");
            (child, lines, connected)
        })
        .collect();

    sandbox.start_agent().unwrap();
    for (child, lines, _) in &mut early {
        writeln!(child.stdin.as_mut().unwrap()).unwrap();
        let after: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(after["after"], "ok", "queued by the kernel: {after}");
    }
    let denial = sandbox.wait_for_denial(cookie(&early[0].2)).unwrap();
    assert_eq!((&denial["hook"], &denial["address"]), (&Value::from("egress4"), &Value::from("127.0.0.2")), "{denial}");
    // A connection made now, from the exempt cgroup, is answered as well.
    let exempt = sandbox.attempt("exempt", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(exempt["result"], "ok", "{exempt}");
    std::thread::sleep(Duration::from_millis(500));
    for (mut child, _, _) in early {
        drop(child.stdin.take());
        child.wait().unwrap();
    }
    let received = endpoint.stop();
    assert_eq!(
        received,
        [b"before".to_vec(), b"beforeafter".to_vec(), Vec::new()],
        "per connection: the scope's early one, the exempt early one, the exempt new one"
    );
}

/// Any process in the agent's network namespace may take every ephemeral port. The
/// agent's check must not depend on a free one: with all of them held, a detached link
/// is still noticed and repaired.
#[test]
fn tamper_checks_go_on_when_every_ephemeral_port_is_taken() {
    let mut sandbox = sandbox("ports");
    sandbox.sysctl(&["net.ipv4.ip_local_port_range=40000 40099"]).unwrap();
    sandbox.start_agent().unwrap();
    let mut holder = sandbox.spawn_probe("workload", &["hold-ports"]).unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let held: Value = serde_json::from_str(&line).unwrap();
    assert!(held["stopped_by"].as_str().unwrap().contains("in use"), "{held}");

    let pin = pin_of(&sandbox, "seb_connect4");
    seb_sandbox::tamper::detach_pinned_link(&pin).unwrap();
    wait_for_tamper(&sandbox, "the detached link", |record| {
        record["body"]["findings"][0]["object"] == pin.to_str().unwrap() && record["body"]["repaired"] == true
    });
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "EPERM", "after the repair: {outcome}");
    drop(holder.stdin.take());
    holder.wait().unwrap();
}

/// Root swaps the program of one of seb's links (`BPF_LINK_UPDATE`) for one that allows
/// every connect, or for seb's own program bound to maps root made: the link is still
/// attached where it was made, so only the program's tag and maps tell. The agent
/// notices within a second, attaches its own program again, and a restart does not adopt
/// such a link.
#[test]
fn a_link_whose_program_was_replaced_is_noticed_repaired_and_never_adopted() {
    let mut sandbox = sandbox("swap");
    sandbox.start_agent().unwrap();
    let pin = pin_of(&sandbox, "seb_connect4");
    let names_the_swap = |record: &Value| {
        record["body"]["findings"].as_array().unwrap().iter().any(|f| {
            f["object"] == pin.to_str().unwrap() && f["problem"].as_str().unwrap().contains("program was replaced")
        })
    };

    seb_sandbox::tamper::replace_connect4_program(&pin).unwrap();
    let through = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    // The swapped program refuses nothing (the attack is real); the egress program still
    // drops the SYN, so the connect times out instead.
    assert_eq!(through["result"], "timed out", "under the swapped program: {through}");
    wait_for_tamper(&sandbox, "the swapped program", names_the_swap);
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "EPERM", "after the repair: {outcome}");

    // The same program (same tag) bound to maps root made and pinned beside seb's.
    seb_sandbox::tamper::replace_connect4_with_seb_on_other_maps(&pin, &sandbox.pin_path).unwrap();
    let through = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(through["result"], "timed out", "seb's program on empty maps: {through}");
    let names_other_maps = |record: &Value| {
        record["body"]["findings"].as_array().unwrap().iter().any(|f| {
            f["object"] == pin.to_str().unwrap() && f["problem"].as_str().unwrap().contains("this agent's uses maps")
        })
    };
    wait_for_tamper(&sandbox, "seb's program on other maps", names_other_maps);
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "EPERM", "after the repair: {outcome}");

    sandbox.kill_agent().unwrap();
    seb_sandbox::tamper::replace_connect4_program(&pin).unwrap();
    let logs = sandbox.start_agent().unwrap();
    let active = logs.iter().find(|line| line["fields"]["message"] == "kernel enforcement active").unwrap();
    assert_eq!(active["fields"]["adopted"], attached_links() - 1, "the swapped link is not adopted: {active}");
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    assert_eq!(outcome["result"], "EPERM", "{outcome}");
}

/// A connect4 program on a cgroup above the scope runs after seb's (the kernel runs a
/// cgroup's own programs first, then its ancestors'), as a socket load balancer's does:
/// it sends a connect seb judged as allowed to a protected address. The SYN is judged by
/// where it really goes, so the connect fails and the protected listener hears nothing.
#[test]
fn a_connect_redirected_after_seb_judged_it_is_refused() {
    let mut sandbox = sandbox("redirect");
    let root = sandbox.cgroup_relative.clone();
    sandbox.write_config_scoped(&[format!("{root}/workload")], POLICY).unwrap();
    sandbox.start_agent().unwrap();
    let (from, to) = ("127.0.0.3".parse().unwrap(), "127.0.0.2".parse().unwrap());
    let redirect = seb_sandbox::tamper::attach_connect4_redirect(&sandbox.cgroup, from, to).unwrap();
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.3:8443").unwrap();
    assert_ne!(outcome["result"], "ok", "redirected to the protected 127.0.0.2:8443: {outcome}");
    let denial = sandbox.wait_for_denial(cookie(&outcome)).unwrap();
    assert_eq!(denial["hook"], "egress4", "{denial}");
    assert_eq!((&denial["address"], &denial["port"]), (&Value::from("127.0.0.2"), &Value::from(8443)), "{denial}");
    assert_eq!(sandbox.received().unwrap(), 0, "the protected listener received the redirected connection");
    drop(redirect);
    let outcome = sandbox.attempt("workload", "tcp", "127.0.0.3:8443").unwrap();
    assert_eq!(outcome["result"], "ok", "not protected without the redirect: {outcome}");
}

/// Behind DNS64 and a NAT64 gateway, an IPv6-only pod reaches a protected IPv4 address
/// at `64:ff9b::<address>`, past every IPv4 hook: connect6 refuses it there too.
#[test]
fn a_protected_ipv4_address_is_refused_through_the_nat64_prefix() {
    let mut sandbox = sandbox("nat64");
    sandbox.start_agent().unwrap();
    let outcome = sandbox.attempt("workload", "tcp", "[64:ff9b::7f00:2]:8443").unwrap();
    assert_eq!(outcome["result"], "EPERM", "{outcome}");
    let denial = sandbox.wait_for_denial(cookie(&outcome)).unwrap();
    assert_eq!((&denial["hook"], &denial["address"]), (&Value::from("connect6"), &Value::from("64:ff9b::7f00:2")));
    let outcome = sandbox.attempt("workload", "tcp", "[64:ff9b::7f00:3]:8443").unwrap();
    assert_ne!(outcome["result"], "EPERM", "127.0.0.3 is not protected: {outcome}");
}

/// Root with CAP_BPF can write the pinned maps (this kernel loads no BPF-LSM program to
/// stop it): it enters itself as a live broker and registers its own socket, and the
/// kernel lets that socket through. In the scope a `bpf()` call kills it, so it forges
/// outside (in an exempt cgroup) and then comes in. Within a check or two the agent
/// kills each process of the scope entered as a broker that is neither the agent nor in
/// its cgroup, cuts its sockets (nothing more of an open connection leaves, not even
/// through a duplicate another process holds) and records who it was. One outside the
/// scope loses its entry and lives; a process in the agent's own cgroup keeps its
/// registration.
#[test]
fn a_forged_broker_registration_is_killed_cut_and_recorded() {
    let mut sandbox = sandbox("forged");
    sandbox.start_agent().unwrap();
    let pin_path = sandbox.pin_path.to_string_lossy().into_owned();
    let workload = sandbox.cgroup.join("workload").to_string_lossy().into_owned();
    let forge = |cgroup: &str, wait_ms: &str, enter: Option<&str>| {
        let recorder = sandbox.record_tcp("127.0.0.2:9000".parse().unwrap()).unwrap();
        let mut args = vec!["forge-registration", "--pin-path", &pin_path, "--wait-ms", wait_ms, "127.0.0.2:9000"];
        if let Some(cgroup) = enter {
            args.extend(["--enter", cgroup]);
        }
        let report = sandbox.probe(cgroup, &args).unwrap();
        (report, recorder.stop())
    };

    let (forged, received) = forge("exempt", "3000", Some(&workload));
    assert_eq!(forged["killed"], "SIGKILL", "the forger was never killed: {forged}");
    assert!(forged["killed_after_ms"].as_u64().unwrap() < 1_500, "{forged}");
    assert_eq!(forged["still_registered"], false, "{forged}");
    // Until the agent's check the forgery works (detection, not prevention); then the
    // connection is cut: `after`, sent through the duplicate, never arrives.
    assert_eq!(
        (&forged["forged_connect"], &forged["sent_before"]),
        (&Value::from("ok"), &Value::from("ok")),
        "{forged}"
    );
    assert_eq!(received, [b"before"], "{forged}");
    let pid = forged["pid"].as_u64().unwrap();
    let names = |object: &str, record: &Value| {
        record["body"]["findings"].as_array().unwrap().iter().any(|f| {
            f["kind"] == "registration"
                && f["object"] == object
                && f["problem"].as_str().unwrap().contains(&format!("tgid {pid} ("))
        })
    };
    wait_for_tamper(&sandbox, "the forged broker", |record| {
        names("SEB_BROKER_PROCESSES", record) && names("SEB_BROKER_SOCKETS", record)
    });
    let status = sandbox.status().unwrap();
    assert!(
        status["integrity"]["last_findings"].as_array().unwrap().iter().any(|f| f["kind"] == "registration"),
        "{status}"
    );

    // Outside the scope (an exempt cgroup): nothing refused it to begin with, and its
    // tgid could be a victim's root wrote there: the entry goes, the process stays.
    let (outside, _) = forge("exempt", "1500", None);
    assert_eq!((&outside["killed"], &outside["still_registered"]), (&Value::Null, &Value::Bool(false)), "{outside}");

    // Beside the agent, in its own cgroup: a broker as the agent is, through three checks.
    let (beside, received) = forge("broker", "1500", None);
    assert_eq!((&beside["killed"], &beside["still_registered"]), (&Value::Null, &Value::Bool(true)), "{beside}");
    assert_eq!(beside["forged_connect"], "ok", "{beside}");
    assert_eq!(received, [b"beforeafter"], "{beside}");
}

/// A process of the scope is killed at its first `bpf()` call, as root or not, with a
/// record: with CAP_BPF it could edit seb's maps. The deadliest such edit: a process
/// that took `SEB_SCOPED_TASKS` before it entered the scope deletes its own entry (the
/// call completes; no BPF-LSM refuses it), then moves to an exempt cgroup, no longer
/// followed, and connects to a protected endpoint. It dies at the delete; the listener
/// hears nothing. Outside the scope the same calls work.
#[test]
fn a_bpf_call_from_the_scope_kills_the_caller() {
    let mut sandbox = sandbox("bpfcall");
    sandbox.start_agent().unwrap();
    let pin_path = sandbox.pin_path.to_string_lossy().into_owned();
    let [workload, exempt] = ["workload", "exempt"].map(|c| sandbox.cgroup.join(c).to_string_lossy().into_owned());
    let bpf_call = ["bpf-call", "--pin-path", &pin_path];
    for uid in ["0", "65534"] {
        let args = [&["--uid", uid][..], &bpf_call, &["127.0.0.2:9000"]].concat();
        let (output, pid) = sandbox.probe_raw("workload", &args).unwrap();
        assert_eq!(output.status.signal(), Some(9), "uid {uid}: {}", String::from_utf8_lossy(&output.stdout));
        let record = wait_for(&sandbox, |d| d["hook"] == "bpf_syscall" && d["tgid"] == pid);
        assert_eq!(record["action"], "killed", "{record}");
    }

    let recorder = sandbox.record_tcp("127.0.0.2:9000".parse().unwrap()).unwrap();
    let escape = [&bpf_call[..], &["--then-enter", &workload, "--escape-to", &exempt, "127.0.0.2:9000"]].concat();
    let (output, pid) = sandbox.probe_raw("exempt", &escape).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.signal(), Some(9), "the escape went on: {stdout}");
    assert_eq!(recorder.stop(), Vec::<Vec<u8>>::new(), "the protected listener heard the escaped process: {stdout}");
    wait_for(&sandbox, |d| d["hook"] == "bpf_syscall" && d["tgid"] == pid);

    // The agent's cgroup is spared (the agent may run in the scope): entering it from
    // the scope, to call from there, kills at the move.
    let broker = sandbox.cgroup.join("broker").to_string_lossy().into_owned();
    let recorder = sandbox.record_tcp("127.0.0.2:9000".parse().unwrap()).unwrap();
    let via_agent =
        ["bpf-call", "--first-enter", &broker, "--pin-path", &pin_path, "--escape-to", &exempt, "127.0.0.2:9000"];
    let (output, pid) = sandbox.probe_raw("workload", &via_agent).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.signal(), Some(9), "the escape through the agent's cgroup went on: {stdout}");
    assert_eq!(recorder.stop(), Vec::<Vec<u8>>::new(), "the protected listener heard it: {stdout}");
    let record = wait_for(&sandbox, |d| d["hook"] == "cgroup_migration" && d["tgid"] == pid);
    assert!(record["task_cgroup_path"].as_str().unwrap().ends_with("/broker"), "{record}");
    // Nor may it place a child there (clone3 `CLONE_INTO_CGROUP`): killed for it, and the
    // child at its first socket() or bpf() call.
    let (output, _) =
        sandbox.probe_raw("workload", &["clone-into", "--cgroup", &broker, "udp-sendto", "127.0.0.3:9"]).unwrap();
    assert_eq!(output.status.signal(), Some(9), "cloned a child into the agent's cgroup: {output:?}");

    // Moved there by a process outside the scope (this test, as systemd asked over D-Bus
    // would), a process of the scope is not spared either: it dies at its first `bpf()`.
    let arguments = ["--pin-path", &pin_path, "127.0.0.2:9000"];
    let (mut waiting, mut lines, pid) =
        moved_by_an_operator_running(&sandbox, "broker", "bpf-after-moved-to", &arguments);
    let status = waiting.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "moved into the agent's cgroup by an operator: {:?}", lines.next());
    wait_for(&sandbox, |d| d["hook"] == "bpf_syscall" && d["tgid"] == pid);
    // Nor a child it forks there before any watched call: doomed with its parent.
    let arguments = ["--in-child", "--pin-path", &pin_path, "127.0.0.2:9000"];
    let (mut waiting, lines, _) = moved_by_an_operator_running(&sandbox, "broker", "bpf-after-moved-to", &arguments);
    let lines: Vec<String> = lines.map(Result::unwrap).collect();
    waiting.wait().unwrap();
    assert!(lines.iter().any(|line| line.contains(r#""child_signal":9"#)), "the forked child's bpf(): {lines:?}");

    let (output, _) = sandbox.probe_raw("exempt", &[&bpf_call[..], &["127.0.0.2:9000"]].concat()).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains(r#""result":"ok""#), "outside the scope: {stdout}");
}

fn pin_of(sandbox: &Sandbox, program: &str) -> std::path::PathBuf {
    let name = sandbox.pinned_links().unwrap().into_iter().find(|name| name.starts_with(program)).unwrap();
    sandbox.pin_path.join("links").join(name)
}

/// Wait up to 5 s for a `tamper` record that `matches`; `what` names the tampering.
fn wait_for_tamper(sandbox: &Sandbox, what: &str, matches: impl Fn(&Value) -> bool) {
    until(
        Duration::from_secs(5),
        || audit_records(sandbox, "tamper").iter().any(&matches),
        || format!("{what} was never noticed: {:?}", audit_records(sandbox, "tamper")),
    );
}

fn audit_records(sandbox: &Sandbox, kind: &str) -> Vec<Value> {
    let listing = sandbox.agent_cli(&["audit", "list", "--kind", kind, "--json"]).unwrap();
    String::from_utf8(listing.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

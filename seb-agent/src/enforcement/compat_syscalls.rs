//! Whether this kernel takes 32-bit system calls from 64-bit processes (`int 0x80`).
//! Where it does, `socket()` has a second door the syscall tracepoints do not watch, and
//! the agent watches `sys_enter` (`seb_sys_enter`) to cover it. Asked of the kernel itself, once: a
//! child process tries the gate (a kernel booted with `ia32_emulation=0` kills it); under
//! a seccomp filter of its own the agent cannot tell, and assumes the gate open.

use std::sync::OnceLock;

/// Whether 32-bit system calls run here (x86_64 only; other architectures have no such
/// gate the programs know of).
pub fn run_here() -> bool {
    static ANSWER: OnceLock<bool> = OnceLock::new();
    // Under a seccomp filter the agent's own try says nothing of the pods', whose
    // filters may let the gate through: assume it open, and watch it.
    // Elsewhere there is no such gate, and `seb_sys_enter` reads x86_64 numbers and
    // registers: never chosen in place of the syscall tracepoints.
    *ANSWER.get_or_init(|| {
        cfg!(target_arch = "x86_64")
            && (under_seccomp(&std::fs::read_to_string("/proc/self/status").unwrap_or_default()) || probe())
    })
}

/// Whether a /proc/<pid>/status text shows a seccomp mode (strict or filter). Unreadable
/// counts as filtered.
fn under_seccomp(status: &str) -> bool {
    status.lines().find_map(|line| line.strip_prefix("Seccomp:")).is_none_or(|mode| mode.trim() != "0")
}

#[cfg(target_arch = "x86_64")]
fn probe() -> bool {
    use nix::{
        sys::wait::{WaitStatus, waitpid},
        unistd::{ForkResult, fork},
    };
    const IA32_GETPID: i64 = 20;
    // SAFETY: the child runs one instruction and `_exit`s, both async-signal-safe.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let pid: i64;
            // SAFETY: a system call that reads nothing; the registers the 32-bit gate may
            // change are declared.
            unsafe {
                std::arch::asm!(
                    "int 0x80",
                    inlateout("rax") IA32_GETPID => pid,
                    lateout("r8") _, lateout("r9") _, lateout("r10") _, lateout("r11") _,
                    options(nostack),
                );
            }
            // SAFETY: ends the child without running anything of the parent's.
            unsafe { libc::_exit(if pid > 0 { 0 } else { 1 }) }
        }
        Ok(ForkResult::Parent { child }) => matches!(waitpid(child, None), Ok(WaitStatus::Exited(_, 0))),
        // Cannot tell: assume the gate is open, and watch it.
        Err(_) => true,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn probe() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_seccomp_filter_or_an_unreadable_status_counts_as_filtered() {
        assert!(!super::under_seccomp("Name:\tseb-agent\nSeccomp:\t0\nSeccomp_filters:\t0\n"));
        assert!(super::under_seccomp("Name:\tseb-agent\nSeccomp:\t2\nSeccomp_filters:\t1\n"));
        assert!(super::under_seccomp(""));
    }

    /// The probe agrees with what the kernel says of itself, where it says it.
    #[test]
    fn the_gate_is_found_open_where_the_kernel_runs_32_bit_calls() {
        if !cfg!(target_arch = "x86_64") {
            return;
        }
        let config = std::process::Command::new("sh")
            .args(["-c", "zcat /proc/config.gz 2>/dev/null || cat \"/boot/config-$(uname -r)\" 2>/dev/null"])
            .output();
        let config = config.map(|out| String::from_utf8_lossy(&out.stdout).into_owned()).unwrap_or_default();
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        // Never skipped: the privileged tests of the 32-bit gate run or not by this probe.
        assert!(!config.is_empty(), "the kernel's configuration is readable neither in /proc/config.gz nor in /boot");
        let emulated = config.contains("CONFIG_IA32_EMULATION=y")
            && !config.contains("CONFIG_IA32_EMULATION_DEFAULT_DISABLED=y")
            && !cmdline.split_whitespace().any(|word| ["ia32_emulation=0", "ia32_emulation=false"].contains(&word));
        assert_eq!(super::run_here(), emulated, "config says IA32 emulation is {emulated}");
    }
}

//! System calls through the 32-bit gate (`int 0x80`), which any 64-bit process may use
//! where the kernel takes 32-bit calls. The i386 table numbers calls differently. x86_64
//! only, as is the probe.

/// i386 system call `number` with up to four arguments (ebx, ecx, edx, esi; the kernel
/// reads each register's low half): its result, or the error it returned.
///
/// # Safety
/// As for the call made; any pointer it takes must lie below 4 GiB (`low_page`).
pub unsafe fn int80(number: i64, args: [u64; 4]) -> std::io::Result<i64> {
    let result: i64;
    // SAFETY: the caller vouches for the call; rbx is LLVM's own, so the first argument
    // is swapped in and out around it, and the gate may change r8-r11.
    unsafe {
        std::arch::asm!(
            "xchg {first}, rbx",
            "int 0x80",
            "xchg {first}, rbx",
            first = inout(reg) args[0] => _,
            inlateout("rax") number => result,
            in("rcx") args[1],
            in("rdx") args[2],
            in("rsi") args[3],
            lateout("r8") _, lateout("r9") _, lateout("r10") _, lateout("r11") _,
            options(nostack),
        );
    }
    if result < 0 { Err(std::io::Error::from_raw_os_error(-result as i32)) } else { Ok(result) }
}

/// A fresh page below 4 GiB, where the 32-bit gate's pointers can reach; never unmapped.
pub fn low_page() -> std::io::Result<*mut u8> {
    // SAFETY: a new anonymous mapping; nothing else refers to it.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED { Err(std::io::Error::last_os_error()) } else { Ok(page.cast()) }
}

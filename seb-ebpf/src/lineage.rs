//! Enforcement follows a process out of the scope. A process is *scoped* once it has been
//! in an enforced, non-exempt cgroup: created there (or by a scoped parent, which covers
//! `CLONE_INTO_CGROUP`), exec'd there, or moved there. From then on, until its last
//! thread exits:
//! - an exempt cgroup exempts none of its sockets or connections;
//! - moving itself out of the scope or into an exempt cgroup kills it; moving another
//!   scoped process there, or creating a process there (`CLONE_INTO_CGROUP`) from inside
//!   the scope, kills both: the other at its first `socket()` or io_uring call;
//! - outside every enforced cgroup (moved there by anyone, an operator included), its
//!   first `socket()` or io_uring call kills it: no hook would judge a socket made there.
//! (The kernel refuses BPF-LSM programs here, which could have failed the write to
//! `cgroup.procs` or the clone instead.)

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_task, bpf_send_signal},
    },
    programs::{BtfTracePointContext, RawTracePointContext},
};

use seb_common::{Hook, unfollowed};

use crate::{DOOMED_TASKS, SCOPED_TASKS, UNFOLLOWED_SEEN, decision, task};

const SIGKILL: u32 = 9;

/// Marks a `SEB_DOOMED_TASKS` value: the process was doomed because `SEB_SCOPED_TASKS`
/// was full, not for leaving the scope. (Cgroup ids never reach the top bits.)
const UNFOLLOWED: u64 = 1 << 63;
/// Marks a `SEB_DOOMED_TASKS` value: the process shares a descriptor table with a
/// process of the scope.
const SHARES_DESCRIPTORS: u64 = 1 << 62;

/// Whether the process `tgid` has been in the scope.
#[inline(always)]
pub fn is_scoped(tgid: u32) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { SCOPED_TASKS.get(&tgid) }.is_some()
}

/// Whether the current process may be of the scope: scoped, or (once any process went
/// unfollowed) doomed, or (once one could not even be doomed) in an enforced cgroup. A
/// cheap first test for checks on calls every process makes; what it lets through is
/// judged in full.
#[inline(always)]
pub fn current_may_be_judged() -> bool {
    let tgid = current_tgid();
    if is_scoped(tgid) {
        return true;
    }
    let seen = UNFOLLOWED_SEEN.get(0).copied().unwrap_or(unfollowed::SOME_UNMARKED);
    // SAFETY: the value is only tested for presence.
    (seen != unfollowed::NONE && unsafe { DOOMED_TASKS.get(&tgid) }.is_some())
        || (seen >= unfollowed::SOME_UNMARKED && current_in_enforced_cgroup())
}

/// Raise `SEB_UNFOLLOWED_SEEN` to `level` (it never goes down).
#[inline(always)]
fn note_unfollowed(level: u32) {
    if let Some(seen) = UNFOLLOWED_SEEN.get_ptr_mut(0) {
        // SAFETY: the map's own slot; a racing writer raises it as well.
        unsafe {
            if *seen < level {
                *seen = level;
            }
        }
    }
}

/// Follow `tgid`, scoped in `cgroup_id`. A full map cannot take it, and a process that
/// is not followed could leave the scope unseen: it is doomed instead (killed at its first
/// `socket()` or io_uring call), and if even that map is full, the calling process is
/// killed now when it is of the scope itself (never an operator moving a process in).
/// Fail closed; `enforcement.max_scoped_processes` sizes the map.
#[inline(always)]
fn mark_scoped(tgid: u32, cgroup_id: u64) {
    if SCOPED_TASKS.insert(&tgid, &cgroup_id, 0).is_ok() {
        return;
    }
    if DOOMED_TASKS.insert(&tgid, &(cgroup_id | UNFOLLOWED), 0).is_ok() {
        note_unfollowed(unfollowed::SOME_DOOMED);
        return;
    }
    note_unfollowed(unfollowed::SOME_UNMARKED);
    if current_in_enforced_cgroup() || is_scoped(current_tgid()) {
        // SAFETY: the signal goes to the calling process.
        unsafe { bpf_send_signal(SIGKILL) };
        decision::report_kill(Hook::Unfollowed, cgroup_id);
    }
}

/// The current task is in an enforced cgroup that is not exempt.
#[inline(always)]
fn current_in_enforced_cgroup() -> bool {
    decision::current_task_in_scope() && !decision::current_task_is_exempt()
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// `sched_process_fork(parent, child)`, in the parent: a new process of a scoped or
/// enforced parent is scoped, wherever it was placed; so is one any parent placed in an
/// enforced cgroup.
#[inline(always)]
pub fn on_fork(ctx: &RawTracePointContext) -> i32 {
    let parent = current_tgid();
    // SAFETY: raw tracepoint arguments are the tracepoint's own (parent, child).
    let child: u64 = unsafe { *(ctx.as_ptr() as *const u64).add(1) };
    let Some(child_tgid) = task::tgid(child) else { return 0 };
    if child_tgid == parent {
        return 0;
    }
    // A doomed process's children are doomed with it: forked before its first watched
    // call, a child would otherwise go on unjudged (spared at `bpf()` in the agent's
    // cgroup it was moved into, say).
    // SAFETY: the value is only read.
    if let Some(doomed) = unsafe { DOOMED_TASKS.get(&parent) }.copied() {
        // The child's own record names the cgroup, not why its parent was doomed.
        doom(child_tgid, doomed & !(UNFOLLOWED | SHARES_DESCRIPTORS));
    }
    if !is_scoped(parent) && !current_in_enforced_cgroup() {
        // A parent outside the scope may still place the child inside it (clone3
        // `CLONE_INTO_CGROUP`), where no exec or move would mark it.
        if let Some(cgroup) = task::default_cgroup(child).filter(|cgroup| cgroup_is_enforced(*cgroup)) {
            mark_scoped(child_tgid, task::cgroup_id(cgroup));
        }
        return 0;
    }
    // SAFETY: plain helper call.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    mark_scoped(child_tgid, cgroup_id);
    // A child placed outside the enforced cgroups (clone3 CLONE_INTO_CGROUP) by a parent
    // inside them: neither may go on.
    if current_in_enforced_cgroup() && !task_in_enforced_cgroup(child) {
        doom(child_tgid, cgroup_id);
        kill_current(child_tgid);
        return 0;
    }
    // Or placed in the running agent's cgroup from outside it, as a move there would.
    let child_cgroup = task::default_cgroup(child).map(task::cgroup_id);
    if let Some(child_cgroup) = child_cgroup.filter(|child_cgroup| *child_cgroup != cgroup_id)
        && enters_agent_cgroup(child_cgroup)
    {
        doom(child_tgid, cgroup_id);
        kill_current(child_tgid);
        return 0;
    }
    // A new process sharing the parent's descriptor table (CLONE_FILES): a socket either
    // makes is the other's at once, so one killed for its socket would leave the socket
    // to the other. Neither may go on.
    // SAFETY: plain helper call.
    let parent_files = task::files(unsafe { bpf_get_current_task() });
    if parent_files.is_some() && parent_files == task::files(child) {
        doom(child_tgid, cgroup_id | SHARES_DESCRIPTORS);
        // SAFETY: the signal goes to the calling process, before it returns to user space.
        unsafe { bpf_send_signal(SIGKILL) };
        decision::report_kill(Hook::SharedDescriptors, cgroup_id);
    }
    0
}

/// Whether `task` (not the current one) is in an enforced, non-exempt cgroup.
#[inline(always)]
fn task_in_enforced_cgroup(task: u64) -> bool {
    task::default_cgroup(task).is_some_and(cgroup_is_enforced)
}

/// Whether a `struct cgroup *` is enforced and not exempt: one walk of its ancestors.
/// (No closure here: a closure the compiler keeps out of line gets a symbol named after
/// the crate's build path, and the object must build byte for byte anywhere.)
#[inline(always)]
fn cgroup_is_enforced(cgroup: u64) -> bool {
    let (mut enforced, mut exempt) = (false, false);
    let mut level = 0;
    while level < seb_common::MAX_CGROUP_DEPTH as i32 {
        let id = task::ancestor_cgroup_id(cgroup, level);
        if id == 0 {
            break;
        }
        // SAFETY: the values are only tested for presence.
        unsafe {
            enforced |= crate::SCOPE_CGROUPS.get(&id).is_some();
            exempt |= crate::EXEMPT_CGROUPS.get(&id).is_some();
        }
        level += 1;
    }
    enforced && !exempt
}

/// Kill `tgid` at its first `socket()` or io_uring call: it cannot be signalled from here.
/// A doom the full table refuses is lost: from then on every process in an enforced
/// cgroup is judged, and the agent's cgroup spares nobody at `bpf()` (see
/// [`all_dooms_held`]).
#[inline(always)]
fn doom(tgid: u32, scoped_in: u64) {
    if DOOMED_TASKS.insert(&tgid, &scoped_in, 0).is_err() {
        note_unfollowed(unfollowed::SOME_UNMARKED);
    }
}

/// No process the kernel meant to follow or doom was lost (`SEB_UNFOLLOWED_SEEN` below
/// `SOME_UNMARKED`).
#[inline(always)]
pub fn all_dooms_held() -> bool {
    UNFOLLOWED_SEEN.get(0).copied().unwrap_or(unfollowed::SOME_UNMARKED) < unfollowed::SOME_UNMARKED
}

/// Whether `tgid` was doomed (killed at its next watched call).
#[inline(always)]
pub fn is_doomed(tgid: u32) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { DOOMED_TASKS.get(&tgid) }.is_some()
}

/// Forget an exiting process's doom.
#[inline(always)]
pub fn forget_doomed(tgid: u32) {
    // SAFETY: the value is only tested for presence.
    if unsafe { DOOMED_TASKS.get(&tgid) }.is_some() {
        let _ = DOOMED_TASKS.remove(&tgid);
    }
}

/// At `socket()` or an io_uring call: kill the caller if it is doomed, or if it has been
/// in the scope and is now outside every enforced cgroup.
#[inline(always)]
pub fn kill_if_escaped() -> bool {
    let tgid = current_tgid();
    // SAFETY: the values are only read.
    let (doomed, scoped) = unsafe { (DOOMED_TASKS.get(&tgid).copied(), SCOPED_TASKS.get(&tgid).copied()) };
    let scoped_in = match (doomed, scoped) {
        (Some(scoped_in), _) => scoped_in,
        (None, Some(scoped_in)) if !decision::current_task_in_scope() => scoped_in,
        _ => return false,
    };
    // SAFETY: the signal goes to the calling process.
    unsafe { bpf_send_signal(SIGKILL) };
    if doomed.is_some() {
        let _ = DOOMED_TASKS.remove(&tgid);
    }
    // One report call: each is a large inlined body.
    let hook = if scoped_in & UNFOLLOWED != 0 {
        Hook::Unfollowed
    } else if scoped_in & SHARES_DESCRIPTORS != 0 {
        Hook::SharedDescriptors
    } else {
        Hook::Migrate
    };
    decision::report_kill(hook, scoped_in & !(UNFOLLOWED | SHARES_DESCRIPTORS));
    true
}

/// `sched_process_exec`, in the task: an exec in an enforced cgroup scopes the process.
#[inline(always)]
pub fn on_exec() -> i32 {
    if current_in_enforced_cgroup() {
        // SAFETY: plain helper call.
        mark_scoped(current_tgid(), unsafe { bpf_get_current_cgroup_id() });
    }
    0
}

/// `cgroup_attach_task(dst_cgrp, path, task, threadgroup)`, after the move, in the task
/// that wrote to `cgroup.procs` (or `cgroup.threads`). `task` is the process's leader,
/// which may have exited alone and stayed where it was while its threads moved: the
/// destination is `dst_cgrp`, never the leader's cgroup, and a move by any thread of the
/// moved process is the process moving itself.
#[inline(always)]
pub fn on_migrate(ctx: &BtfTracePointContext) -> i32 {
    let cgroup: u64 = ctx.arg(0);
    let moved: u64 = ctx.arg(2);
    if !task::is_unified_hierarchy(cgroup) {
        return 0;
    }
    let Some(moved_tgid) = task::tgid(moved) else { return 0 };
    // A zombie is not moved (the kernel skips exiting tasks): marking its pid would judge
    // whatever process gets that pid next.
    if task::process_is_gone(moved) != Some(false) {
        return 0;
    }
    let cgroup_id = task::cgroup_id(cgroup);
    if moved_tgid == current_tgid() {
        if cgroup_is_enforced(cgroup) {
            if is_scoped(moved_tgid) && enters_agent_cgroup(cgroup_id) {
                kill_current(moved_tgid);
                return 0;
            }
            mark_scoped(moved_tgid, cgroup_id);
        } else if is_scoped(moved_tgid) {
            kill_current(moved_tgid);
        }
        return 0;
    }
    let mover_of_the_scope = is_scoped(current_tgid()) || current_in_enforced_cgroup();
    if decision::is_running_agent(moved_tgid) && mover_of_the_scope && !decision::current_is_live_broker() {
        // Moving the agent (into a frozen cgroup, one with no memory, its own) is the
        // agent's container runtime's business, never a process of the scope's.
        kill_current(moved_tgid);
        return 0;
    }
    if cgroup_is_enforced(cgroup) {
        let was_scoped = is_scoped(moved_tgid);
        mark_scoped(moved_tgid, cgroup_id);
        if enters_agent_cgroup(cgroup_id) {
            // Whoever moved it (systemd asked over D-Bus, say), one that was of the scope
            // dies at its first `bpf()`, `socket()` or io_uring call; a mover of the scope
            // at once.
            if was_scoped || mover_of_the_scope {
                doom(moved_tgid, cgroup_id);
            }
            if mover_of_the_scope {
                kill_current(moved_tgid);
            }
        }
        return 0;
    }
    // A scoped process moved out by another: the process stays scoped (so an exempt
    // cgroup exempts nothing of it); a mover that is itself scoped is killed for it. Into
    // the agent's cgroup (exempt, or outside the scope), whoever moved it, it is doomed:
    // its `bpf()` calls would be spared there.
    if is_scoped(moved_tgid) && decision::is_running_agent_cgroup(cgroup_id) {
        // SAFETY: the value is only read.
        let scoped_in = unsafe { SCOPED_TASKS.get(&moved_tgid) }.copied().unwrap_or(0);
        doom(moved_tgid, scoped_in);
    }
    if is_scoped(moved_tgid) && mover_of_the_scope {
        // SAFETY: the value is only read.
        let scoped_in = unsafe { SCOPED_TASKS.get(&moved_tgid) }.copied().unwrap_or(0);
        doom(moved_tgid, scoped_in);
        kill_current(moved_tgid);
    }
    0
}

/// Whether a move by the calling process into `cgroup_id` puts a process in the running
/// agent's cgroup. A process there is a broker's peer: its `bpf()` calls are spared, and
/// it could take the agent over. So a process of the scope that is not a live broker
/// entering it, or moving another there, is killed: with write access to `cgroup.procs`
/// (a privileged pod), it would otherwise pass every `bpf()` check from there. Whoever
/// puts the agent there (its container runtime) is not of the scope.
#[inline(always)]
fn enters_agent_cgroup(cgroup_id: u64) -> bool {
    decision::is_running_agent_cgroup(cgroup_id) && !decision::current_is_live_broker()
}

/// Kill the calling process for moving `moved` (itself or another scoped process) out of
/// the scope or into the agent's cgroup, and report it with the cgroup `moved` was
/// scoped in.
#[inline(always)]
fn kill_current(moved: u32) {
    // SAFETY: the signal goes to the calling process, before it returns to user space.
    unsafe { bpf_send_signal(SIGKILL) };
    // SAFETY: the value is only read.
    let scoped_in = unsafe { SCOPED_TASKS.get(&moved) }.copied().unwrap_or(0);
    decision::report_kill(Hook::Migrate, scoped_in);
}

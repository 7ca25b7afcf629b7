//! Handing memory freed after a large pass back to the system.

/// glibc keeps freed memory in its per-thread arenas. After a full pass
/// over a large tree (maps of every path, one per side) that is tens of MiB
/// the agent would hold, idle, until the next pass an hour later.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own
    // heaps to the kernel; it may be called at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

//! `ferry-agent status`: what the journal says about each folder.

use std::fmt::Write;

use anyhow::Result;

use crate::config::FolderSpec;
use crate::journal::Journal;

/// Errors shown.
const ERRORS_SHOWN: usize = 10;
/// Pending uploads listed by name.
const PENDING_SHOWN: usize = 20;

/// Whether an agent is syncing the folder now: it holds the folder's lock
/// for as long as it runs. (The journaled pid alone could have been reused
/// by another process since an agent was killed.)
fn agent_holds_lock(spec: &FolderSpec) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(spec.lock_path()) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; a lock we get goes with the file.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    !free
}

pub fn describe(spec: &FolderSpec) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "folder:          {}", spec.dir.display())?;
    if !spec.state.exists() {
        writeln!(
            out,
            "state:           {} (never synced)",
            spec.state.display()
        )?;
        return Ok(out);
    }
    let journal = Journal::open_read_only(&spec.state)?;
    let meta = |key: &str| journal.meta(key).ok().flatten().filter(|v| !v.is_empty());
    if let Some(remote) = meta("remote") {
        writeln!(out, "remote:          {remote}")?;
    }
    writeln!(out, "state:           {}", spec.state.display())?;
    let agent = match meta("pid") {
        Some(pid) if agent_holds_lock(spec) => format!("running (pid {pid})"),
        _ => "not running".to_owned(),
    };
    writeln!(out, "agent:           {agent}")?;
    let (files, bytes) = journal.count_records()?;
    writeln!(out, "synced:          {files} files, {bytes} bytes")?;
    writeln!(
        out,
        "last full sync:  {}",
        meta("last_full_sync_at").unwrap_or_else(|| "never".into())
    )?;
    if let Some(at) = meta("last_pass_at") {
        writeln!(
            out,
            "last pass:       {at}: {}",
            meta("last_pass").unwrap_or_default()
        )?;
    }
    if let Some(n) = meta("waiting").filter(|n| n != "0") {
        writeln!(
            out,
            "waiting:         {n} paths (still being written, or retrying)"
        )?;
    }
    if let Some(text) = meta("snapshots") {
        let mut lines = text.lines();
        let n = lines.next().unwrap_or("0");
        if n != "0" {
            writeln!(
                out,
                "still changing:  {n} files, pushed as snapshots (the latest version goes once they settle, or after the next maximum delay)"
            )?;
            for line in lines {
                let (path, what) = line.split_once('\t').unwrap_or((line, ""));
                writeln!(out, "  {path} (snapshot of {what})")?;
            }
            let shown = text.lines().count() - 1;
            if let Ok(total) = n.parse::<usize>()
                && total > shown
            {
                writeln!(out, "  … and {} more", total - shown)?;
            }
        }
    }
    if let Some(n) = meta("held_deletes").filter(|n| n != "0") {
        writeln!(
            out,
            "held deletes:    {n} (more than the delete limit; see the errors below)"
        )?;
    }
    let pending = journal.all_pending()?;
    writeln!(out, "pending uploads: {}", pending.len())?;
    for p in pending.iter().take(PENDING_SHOWN) {
        let into = if p.target.ends_with(&p.path) {
            String::new()
        } else {
            format!(" -> {}", p.target)
        };
        writeln!(
            out,
            "  {}{into} ({} bytes, session {})",
            p.path, p.stamp.size, p.session_id
        )?;
    }
    if pending.len() > PENDING_SHOWN {
        writeln!(out, "  … and {} more", pending.len() - PENDING_SHOWN)?;
    }
    let errors = journal.recent_errors(ERRORS_SHOWN)?;
    if errors.is_empty() {
        writeln!(out, "errors:          none")?;
    } else {
        writeln!(out, "recent errors (newest first):")?;
        for e in errors {
            let path = if e.path.is_empty() {
                String::new()
            } else {
                format!("{}: ", e.path)
            };
            writeln!(out, "  {}  {path}{}", e.at, e.message)?;
        }
    }
    Ok(out)
}

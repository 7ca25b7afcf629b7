//! What the agent prints on standard output (`--dry-run`'s plan, `status`).
//! A reader that stops reading (`| head`) ends the agent as it ends other
//! Unix tools, by SIGPIPE, instead of a panic in whichever thread printed
//! (which left the rest of the agent waiting for it, deaf to SIGTERM).

use std::io::Write;

/// Prints one line (`say!` below) on standard output.
pub fn line(args: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        give_up(e);
    }
}

/// Prints `text` as it is.
pub fn text(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        give_up(e);
    }
}

fn give_up(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // SAFETY: restores the default action of a signal and raises it;
        // no Rust state is involved.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    eprintln!("ferry-agent: writing to standard output: {e}");
    std::process::exit(1);
}

/// `println!` for the agent's standard output.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}
pub(crate) use say;

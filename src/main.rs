use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = ferry::cli::Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr);
    match cli.log_format() {
        ferry::cli::LogFormat::Json => logs.json().init(),
        ferry::cli::LogFormat::Human => logs.init(),
    }
    match ferry::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `ferry ls | head`: the reader left; that is not a failure.
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `FERRY_LOG`, or `info`. fuser warns when it finds a mount already gone
/// as it shuts down, which is what `fusermount3 -u` (the usual way to
/// unmount) leaves it: that warning is kept out unless `FERRY_LOG` names
/// fuser. Unmounts ferry asks for report their own failures.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let configured = std::env::var("FERRY_LOG").unwrap_or_default();
    let filter = tracing_subscriber::EnvFilter::try_new(&configured)
        .ok()
        .filter(|_| !configured.trim().is_empty())
        .unwrap_or_else(|| "info".into());
    if configured.contains("fuser") {
        return filter;
    }
    filter.add_directive("fuser::mnt=error".parse().expect("a valid directive"))
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

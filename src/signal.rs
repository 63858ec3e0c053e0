//! OS signals → shutdown. The first SIGTERM or SIGINT (Kubernetes and systemd stop with SIGTERM)
//! starts a drain; a second one exits at once, for an operator who will not wait.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Exit code after a second signal: the conventional 128 + SIGINT.
const QUIT_EXIT_CODE: i32 = 130;

pub fn spawn(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        warn!("Shutdown signal received; draining (send it again to exit at once).");
        shutdown.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        warn!("Second shutdown signal; exiting now.");
        std::process::exit(QUIT_EXIT_CODE);
    });
    Ok(())
}

//! Watches the daemon's tasks, so that none dies silently.
//!
//! A pipeline stage ends when its input ends (the drain cascade, or the end of a replayed file);
//! a service (the Kafka source, the reloader, the admin server) only when the daemon stops. A
//! task that panics, returns an error, or ends before its time has *failed*: the supervisor logs
//! the task and its cause, turns `/ready` and `/live` false ([`Health`]), and `run` returns the
//! error, so the process exits 1 and systemd or Kubernetes restart it. Nothing is lost by the
//! restart: offsets are stored only for what was scored and delivered.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::error;

/// What the admin server reports: ready once everything is up, until a task fails; live until
/// a task fails.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    failed: AtomicBool,
}

impl Health {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.live()
    }

    pub fn live(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }
}

/// When a task may end without having failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ends {
    /// A pipeline stage: when its input ends.
    WithInput,
    /// A service: only once the daemon stops.
    AtShutdown,
}

type Joined = (&'static str, Ends, Result<Result<()>, JoinError>);

pub struct Tasks {
    set: JoinSet<Joined>,
    /// Pipeline stages still running.
    stages: usize,
    shutdown: CancellationToken,
    health: Arc<Health>,
}

impl Tasks {
    pub fn new(shutdown: CancellationToken, health: Arc<Health>) -> Tasks {
        Tasks { set: JoinSet::new(), stages: 0, shutdown, health }
    }

    pub fn spawn<F>(&mut self, name: &'static str, ends: Ends, task: F)
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        if ends == Ends::WithInput {
            self.stages += 1;
        }
        let handle = tokio::spawn(task);
        self.set.spawn(async move { (name, ends, handle.await) });
    }

    /// Until every pipeline stage has ended: every record read was handled. An error as soon as
    /// a task fails; the stop is then under way (the source no longer reads).
    pub async fn stages_ended(&mut self) -> Result<()> {
        while self.stages > 0 {
            self.next().await?;
        }
        Ok(())
    }

    /// Until every task has ended, or one fails.
    pub async fn all_ended(&mut self) -> Result<()> {
        while !self.set.is_empty() {
            self.next().await?;
        }
        Ok(())
    }

    async fn next(&mut self) -> Result<()> {
        let Some(joined) = self.set.join_next().await else { return Ok(()) };
        let (name, ends, result) = joined.expect("the watcher only awaits a handle");
        if ends == Ends::WithInput {
            self.stages -= 1;
        }
        let cause = match result {
            Ok(Ok(())) if ends == Ends::WithInput || self.shutdown.is_cancelled() => return Ok(()),
            Ok(Ok(())) => anyhow!("ended while the daemon was running"),
            Ok(Err(error)) => error,
            Err(error) if error.is_panic() => anyhow!("panicked: {}", panic_message(error.into_panic())),
            Err(error) => anyhow!("{error}"),
        };
        self.health.fail();
        self.shutdown.cancel();
        error!(task = name, cause = %format!("{cause:#}"), "Task failed; the daemon stops with exit code 1 (a restart replays what was not committed).");
        Err(cause.context(format!("the {name} task failed")))
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => payload.downcast_ref::<&str>().map_or_else(|| "(no message)".to_string(), |s| s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks() -> (Tasks, CancellationToken, Arc<Health>) {
        let (shutdown, health) = (CancellationToken::new(), Arc::new(Health::default()));
        health.set_ready();
        (Tasks::new(shutdown.clone(), health.clone()), shutdown, health)
    }

    #[tokio::test]
    async fn a_panicking_stage_fails_the_daemon_with_its_message() {
        let (mut t, shutdown, health) = tasks();
        t.spawn("window", Ends::WithInput, async { panic!("index out of bounds") });
        t.spawn("reload", Ends::AtShutdown, async { std::future::pending().await });
        let error = format!("{:#}", t.stages_ended().await.unwrap_err());
        assert!(error.contains("window task failed") && error.contains("index out of bounds"), "{error}");
        assert!(shutdown.is_cancelled() && !health.live() && !health.ready());
    }

    #[tokio::test]
    async fn stages_end_with_their_input_and_services_only_at_shutdown() {
        let (mut t, shutdown, health) = tasks();
        t.spawn("alert", Ends::WithInput, async { Ok(()) });
        t.spawn("admin", Ends::AtShutdown, {
            let stop = shutdown.clone();
            async move {
                stop.cancelled().await;
                Ok(())
            }
        });
        t.stages_ended().await.unwrap();
        assert!(health.ready());
        shutdown.cancel();
        t.all_ended().await.unwrap();

        let (mut t, _, health) = tasks();
        t.spawn("kafka source", Ends::AtShutdown, async { Ok(()) });
        assert!(format!("{:#}", t.all_ended().await.unwrap_err()).contains("ended while the daemon was running"));
        assert!(!health.live());
    }
}

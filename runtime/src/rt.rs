//! The tokio runtime of a strait process, and its shutdown signal.

/// A runtime with `worker_threads` workers (`None`: one per CPU). With one
/// worker it is a current-thread runtime: the I/O driver, the timers and
/// every task run on the calling thread, with no work-stealing queues and
/// no cross-thread wake-ups; the multi-thread scheduler only pays off when
/// there are several workers to balance.
pub fn build(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    match worker_threads {
        Some(0) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "worker threads: at least 1 is needed (got 0)",
        )),
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = n {
                builder.worker_threads(n);
            }
            builder.enable_all().build()
        }
    }
}

/// Resolves on SIGINT or SIGTERM (on Ctrl-C where the signal handlers
/// cannot be installed).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_workers_is_refused_and_one_is_current_thread() {
        let e = super::build(Some(0)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("got 0"), "{e}");
        let rt = super::build(Some(1)).unwrap();
        assert_eq!(
            rt.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        for n in [Some(2), None] {
            let rt = super::build(n).unwrap();
            assert_eq!(
                rt.handle().runtime_flavor(),
                tokio::runtime::RuntimeFlavor::MultiThread
            );
        }
    }
}

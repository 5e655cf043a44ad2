//! Kubernetes metadata for spans: the container of a process from its cgroup, the pod of the
//! container from the API (pods of this node only). Off outside Kubernetes: no API calls.

pub mod cgroup;
pub mod pods;
pub mod watch;

use std::sync::Arc;

use pods::{PodStore, SharedPods};

/// `--kubernetes`: auto turns the pod watcher on when the agent runs in a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Mode {
    #[default]
    Auto,
    On,
    Off,
}

/// Starts the pod watcher when Kubernetes metadata is wanted; the store the exporter reads.
pub fn start(
    mode: Mode,
    node: Option<String>,
) -> anyhow::Result<Option<(SharedPods, Arc<watch::WatchStats>)>> {
    let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if mode == Mode::Off || (mode == Mode::Auto && !in_pod) {
        return Ok(None);
    }
    let Some(node) = node.filter(|n| !n.trim().is_empty()) else {
        anyhow::bail!(
            "Kubernetes metadata needs this node's name: set NODE_NAME from the downward API (fieldRef spec.nodeName), or --kubernetes off"
        );
    };
    let pods: SharedPods = Arc::new(std::sync::RwLock::new(PodStore::default()));
    let stats = Arc::new(watch::WatchStats::default());
    tracing::info!("kubernetes: watching the pods of node {node}");
    tokio::spawn(watch::run(node, pods.clone(), stats.clone()));
    Ok(Some((pods, stats)))
}

//! Keeps the pod store current: list and watch the pods scheduled on this node only
//! (fieldSelector spec.nodeName), with kube's watcher (re-lists after a lost watch, backs off on
//! errors).

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};

use super::pods::SharedPods;

#[derive(Debug, Default)]
pub struct WatchStats {
    pub events: AtomicU64,
    pub errors: AtomicU64,
}

/// Runs until the process ends. A client that cannot be built is logged once, with what to fix.
pub async fn run(node: String, pods: SharedPods, stats: Arc<WatchStats>) {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                "kubernetes: no API client ({e}); spans get no pod metadata. In a pod, mount the service account token; elsewhere set KUBECONFIG or LOUPE_KUBERNETES=off"
            );
            return;
        }
    };
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut listing: Option<HashSet<String>> = None;
    let mut prune = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { break };
                match event {
                    Ok(event) => {
                        stats.events.fetch_add(1, Ordering::Relaxed);
                        apply(event, &pods, &mut listing);
                    }
                    Err(e) => {
                        // The watcher retries with backoff; say so once per burst.
                        if stats.errors.fetch_add(1, Ordering::Relaxed).is_multiple_of(20) {
                            tracing::warn!("kubernetes: watching pods of node {node}: {e} (retrying)");
                        }
                    }
                }
            }
            _ = prune.tick() => {
                if let Ok(mut p) = pods.write() {
                    p.prune(Instant::now());
                }
            }
        }
    }
}

fn apply(event: watcher::Event<Pod>, pods: &SharedPods, listing: &mut Option<HashSet<String>>) {
    let Ok(mut store) = pods.write() else {
        return;
    };
    match event {
        watcher::Event::Init => *listing = Some(HashSet::new()),
        watcher::Event::InitApply(pod) => {
            if let (Some(seen), Some(uid)) = (listing.as_mut(), pod.metadata.uid.as_ref()) {
                seen.insert(uid.clone());
            }
            store.apply(pod);
        }
        watcher::Event::InitDone => {
            if let Some(seen) = listing.take() {
                store.keep_only(&seen, Instant::now());
            }
            tracing::info!("kubernetes: {} pods on this node", store.live_pods());
        }
        watcher::Event::Apply(pod) => store.apply(pod),
        watcher::Event::Delete(pod) => store.delete(&pod, Instant::now()),
    }
}

//! The pods of this node, as the Kubernetes API reports them, reduced to what a span's resource
//! needs: per container id and per pod uid, the `k8s.*` attributes and a service name.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;

/// A deleted pod stays resolvable this long: its last spans may still be queued for export.
const KEEP_DELETED: Duration = Duration::from_secs(60);

/// What a span of a process in one container (or, before its status names the container, in
/// one pod) gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub attributes: Vec<(std::borrow::Cow<'static, str>, String)>,
    /// From the container's OTEL_SERVICE_NAME, else the `app.kubernetes.io/name` label, else the
    /// owning workload's name, else the pod's name.
    pub service_name: String,
}

/// The controller that owns a pod, resolved to the workload users name: a ReplicaSet made by a
/// Deployment (its name is the Deployment's plus the pod-template-hash) is the Deployment; a
/// Job made by a CronJob (its name is the CronJob's plus a scheduled-time suffix) is the CronJob.
pub fn owner(pod: &Pod) -> Option<(&'static str, String)> {
    let reference = pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))?;
    let labels = pod.metadata.labels.as_ref();
    let name = reference.name.clone();
    let owner = match reference.kind.as_str() {
        "ReplicaSet" => {
            let hash = labels.and_then(|l| l.get("pod-template-hash"));
            match hash.and_then(|h| name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => ("k8s.deployment.name", deployment.to_string()),
                None => ("k8s.replicaset.name", name),
            }
        }
        "StatefulSet" => ("k8s.statefulset.name", name),
        "DaemonSet" => ("k8s.daemonset.name", name),
        "Job" => match name.rsplit_once('-') {
            Some((cron, suffix))
                if suffix.len() >= 8 && suffix.bytes().all(|b| b.is_ascii_digit()) =>
            {
                ("k8s.cronjob.name", cron.to_string())
            }
            _ => ("k8s.job.name", name),
        },
        _ => return None,
    };
    Some(owner)
}

/// Container ids of a pod's containers (init and ephemeral ones included), by container name.
fn container_ids(pod: &Pod) -> Vec<(String, String)> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ]
    .into_iter()
    .flatten()
    .flatten()
    .filter_map(|s| {
        // "containerd://<id>", "cri-o://<id>", "docker://<id>"
        let id = s
            .container_id
            .as_ref()?
            .rsplit("://")
            .next()?
            .to_ascii_lowercase();
        Some((s.name.clone(), id))
    })
    .collect()
}

/// The OTEL_SERVICE_NAME a container's spec sets (literal values only).
fn container_service_name(pod: &Pod, container: &str) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == container)?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == "OTEL_SERVICE_NAME")?
        .value
        .clone()
        .filter(|v| !v.trim().is_empty())
}

/// The resource of a process in `container` of `pod` (None: the container is not known yet).
pub fn workload(pod: &Pod, container: Option<&str>) -> Workload {
    let meta = &pod.metadata;
    let mut attributes: Vec<(std::borrow::Cow<'static, str>, String)> = Vec::new();
    let mut push = |k: &'static str, v: Option<&String>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            attributes.push((k.into(), v.clone()));
        }
    };
    push("k8s.namespace.name", meta.namespace.as_ref());
    push("k8s.pod.name", meta.name.as_ref());
    push("k8s.pod.uid", meta.uid.as_ref());
    push(
        "k8s.node.name",
        pod.spec.as_ref().and_then(|s| s.node_name.as_ref()),
    );
    let owner = owner(pod);
    if let Some((key, name)) = &owner {
        attributes.push(((*key).into(), name.clone()));
    }
    if let Some(c) = container {
        attributes.push(("k8s.container.name".into(), c.to_string()));
    }
    let label = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/name"))
        .filter(|v| !v.is_empty())
        .cloned();
    let service_name = container
        .and_then(|c| container_service_name(pod, c))
        .or(label)
        .or(owner.map(|(_, name)| name))
        .or_else(|| meta.name.clone())
        .unwrap_or_else(|| "unknown_service".to_string());
    Workload {
        attributes,
        service_name,
    }
}

#[derive(Default)]
pub struct PodStore {
    /// pod uid -> the pod, and when it was deleted (if it was).
    pods: HashMap<String, (Pod, Option<Instant>)>,
    /// container id -> (pod uid, container name).
    containers: HashMap<String, (String, String)>,
}

pub type SharedPods = Arc<RwLock<PodStore>>;

impl PodStore {
    pub fn apply(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        for (name, id) in container_ids(&pod) {
            self.containers.insert(id, (uid.clone(), name));
        }
        self.pods.insert(uid, (pod, None));
    }

    pub fn delete(&mut self, pod: &Pod, now: Instant) {
        if let Some(entry) = pod
            .metadata
            .uid
            .as_ref()
            .and_then(|uid| self.pods.get_mut(uid))
        {
            entry.1.get_or_insert(now);
        }
    }

    /// After a (re)list: pods not in it were deleted while the watch was down.
    pub fn keep_only(&mut self, live: &std::collections::HashSet<String>, now: Instant) {
        for (uid, (_, deleted)) in self.pods.iter_mut() {
            if !live.contains(uid) {
                deleted.get_or_insert(now);
            }
        }
    }

    /// Forgets pods deleted more than a minute ago.
    pub fn prune(&mut self, now: Instant) {
        self.pods.retain(|_, (_, deleted)| {
            deleted.is_none_or(|at| now.duration_since(at) < KEEP_DELETED)
        });
        let pods = &self.pods;
        self.containers.retain(|_, (uid, _)| pods.contains_key(uid));
    }

    /// Pods currently running on the node (deleted ones excluded).
    pub fn live_pods(&self) -> usize {
        self.pods.values().filter(|(_, d)| d.is_none()).count()
    }

    /// The workload of a process in container `id`, falling back to its pod (from the cgroup
    /// path) while the pod's status does not list the container yet.
    pub fn lookup(&self, container_id: &str, pod_uid: Option<&str>) -> Option<Workload> {
        if let Some((uid, name)) = self.containers.get(container_id) {
            let (pod, _) = self.pods.get(uid)?;
            return Some(workload(pod, Some(name)));
        }
        let (pod, _) = self.pods.get(pod_uid?)?;
        Some(workload(pod, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Pod {
        let path = format!(
            "{}/../tests/fixtures/k8s/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    const CHECKOUT_APP: &str = "4f1c0b1b9a1d4c2e8f0a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e";
    const CHECKOUT_SHIPPER: &str =
        "aa11bb22cc33dd44ee55ff66aa77bb88cc99dd00ee11ff22aa33bb44cc55dd66";
    const ORDERS: &str = "b7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d5c4b3a29180";

    fn attr<'a>(w: &'a Workload, k: &str) -> Option<&'a str> {
        w.attributes
            .iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_deployments_container_gets_every_attribute() {
        let mut store = PodStore::default();
        store.apply(fixture("pod-checkout"));
        let w = store.lookup(CHECKOUT_APP, None).unwrap();
        assert_eq!(attr(&w, "k8s.namespace.name"), Some("shop"));
        assert_eq!(attr(&w, "k8s.pod.name"), Some("checkout-7d4b9c8f6d-x2kq9"));
        assert_eq!(
            attr(&w, "k8s.pod.uid"),
            Some("9b3f7a52-3c1e-4d8a-9f6b-2e7d1c0a5b43")
        );
        assert_eq!(attr(&w, "k8s.node.name"), Some("node-a"));
        assert_eq!(attr(&w, "k8s.deployment.name"), Some("checkout"));
        assert_eq!(attr(&w, "k8s.container.name"), Some("app"));
        // The container's own OTEL_SERVICE_NAME first...
        assert_eq!(w.service_name, "checkout-api");
        // ...then the app.kubernetes.io/name label.
        let sidecar = store.lookup(CHECKOUT_SHIPPER, None).unwrap();
        assert_eq!(attr(&sidecar, "k8s.container.name"), Some("log-shipper"));
        assert_eq!(sidecar.service_name, "checkout");
    }

    #[test]
    fn without_label_or_env_the_owner_names_the_service() {
        let mut store = PodStore::default();
        store.apply(fixture("pod-orders-db"));
        let w = store.lookup(ORDERS, None).unwrap();
        assert_eq!(attr(&w, "k8s.statefulset.name"), Some("orders-db"));
        assert_eq!(w.service_name, "orders-db");
    }

    #[test]
    fn owners_resolve_to_the_workload_users_name() {
        let mut pod = fixture("pod-orders-db");
        let set = |pod: &mut Pod, kind: &str, name: &str| {
            let r = &mut pod.metadata.owner_references.as_mut().unwrap()[0];
            r.kind = kind.into();
            r.name = name.into();
        };
        set(&mut pod, "DaemonSet", "node-exporter");
        assert_eq!(
            owner(&pod),
            Some(("k8s.daemonset.name", "node-exporter".into()))
        );
        set(&mut pod, "Job", "nightly-report-29384720");
        assert_eq!(
            owner(&pod),
            Some(("k8s.cronjob.name", "nightly-report".into()))
        );
        set(&mut pod, "Job", "migrate-db");
        assert_eq!(owner(&pod), Some(("k8s.job.name", "migrate-db".into())));
        // A ReplicaSet without the Deployment's hash label stands alone.
        set(&mut pod, "ReplicaSet", "legacy-rs");
        assert_eq!(
            owner(&pod),
            Some(("k8s.replicaset.name", "legacy-rs".into()))
        );
        pod.metadata.owner_references = None;
        assert_eq!(owner(&pod), None);
        assert_eq!(workload(&pod, None).service_name, "orders-db-0");
    }

    #[test]
    fn a_container_not_yet_in_the_status_resolves_by_its_pod() {
        let mut pod = fixture("pod-orders-db");
        pod.status = None;
        let mut store = PodStore::default();
        store.apply(pod);
        assert_eq!(store.lookup(ORDERS, None), None);
        let w = store
            .lookup(ORDERS, Some("3d2c1b0a-9f8e-4d7c-8b6a-5f4e3d2c1b0a"))
            .unwrap();
        assert_eq!(attr(&w, "k8s.pod.name"), Some("orders-db-0"));
        assert_eq!(attr(&w, "k8s.container.name"), None);
    }

    #[test]
    fn deleted_pods_resolve_for_a_while_then_go() {
        let mut store = PodStore::default();
        let pod = fixture("pod-orders-db");
        store.apply(pod.clone());
        let t0 = Instant::now();
        store.delete(&pod, t0);
        assert_eq!(store.live_pods(), 0);
        store.prune(t0 + Duration::from_secs(1));
        assert!(store.lookup(ORDERS, None).is_some());
        store.prune(t0 + KEEP_DELETED + Duration::from_secs(1));
        assert_eq!(store.lookup(ORDERS, None), None);
    }
}

//! Which container a process runs in, from its /proc/PID/cgroup. Container runtimes name the
//! cgroup of a container after its id; Kubernetes puts it under its pod's cgroup, named after
//! the pod uid. Formats by driver:
//!
//! - systemd (cgroup v1 or v2): `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid, '-' as '_'>.slice/cri-containerd-<id>.scope` (CRI-O: `crio-<id>.scope`,
//!   Docker: `docker-<id>.scope`); a plain Docker container: `/system.slice/docker-<id>.scope`.
//! - cgroupfs: `/kubepods/burstable/pod<uid>/<id>` (CRI-O: `.../crio-<id>`); plain Docker: `/docker/<id>`.
//!
//! cgroup v1 lists one line per hierarchy (`N:controllers:path`), v2 a single `0::path`; hybrid
//! systems have both. Any line naming a container will do: they agree.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// A bare id under a pod's cgroup (cgroupfs driver): the runtime does not say.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    /// 64 lowercase hex digits, as `container.id` and the pod status give it.
    pub id: String,
    pub runtime: Runtime,
    /// With dashes, as the API gives it; absent outside Kubernetes.
    pub pod_uid: Option<String>,
}

/// The container of a process, from the text of its /proc/PID/cgroup; None for a process that
/// runs in none (a host service).
pub fn container_of(proc_cgroup: &str) -> Option<ContainerRef> {
    proc_cgroup.lines().find_map(|line| {
        // hierarchy-ID:controller-list:path; the path may itself contain ':'.
        let path = line.splitn(3, ':').nth(2)?;
        from_path(path)
    })
}

fn from_path(path: &str) -> Option<ContainerRef> {
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    let last = parts.next_back()?;
    let (id, runtime) = container_id(last)?;
    let pod_uid = path.split('/').find_map(pod_uid);
    // A bare hex name is a container only under a pod or Docker's own cgroup.
    if runtime == Runtime::Unknown && pod_uid.is_none() {
        let parent = parts.next_back()?;
        if parent != "docker" {
            return None;
        }
        return Some(ContainerRef {
            id,
            runtime: Runtime::Docker,
            pod_uid,
        });
    }
    Some(ContainerRef {
        id,
        runtime,
        pod_uid,
    })
}

/// The id in a container's own cgroup name.
fn container_id(name: &str) -> Option<(String, Runtime)> {
    let name = name.strip_suffix(".scope").unwrap_or(name);
    let (id, runtime) = if let Some(id) = name.strip_prefix("cri-containerd-") {
        (id, Runtime::Containerd)
    } else if let Some(id) = name.strip_prefix("crio-") {
        // conmon, CRI-O's monitor process, lives beside the container: not the container.
        if id.starts_with("conmon-") {
            return None;
        }
        (id, Runtime::CriO)
    } else if let Some(id) = name.strip_prefix("docker-") {
        (id, Runtime::Docker)
    } else {
        (name, Runtime::Unknown)
    };
    is_container_id(id).then(|| (id.to_ascii_lowercase(), runtime))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(part: &str) -> Option<String> {
    let part = part.strip_suffix(".slice").unwrap_or(part);
    let at = part.rfind("pod")?;
    // "kubepods" itself contains "pod": the uid must follow the last "pod" and be one.
    let uid = part[at + 3..].replace('_', "-");
    let shape = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    shape.then(|| uid.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c0b1b9a1d4c2e8f0a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e";
    const UID: &str = "9b3f7a52-3c1e-4d8a-9f6b-2e7d1c0a5b43";

    fn uid_underscored() -> String {
        UID.replace('-', "_")
    }

    fn expect(text: &str, runtime: Runtime, pod: bool) {
        let c = container_of(text).unwrap_or_else(|| panic!("no container in {text}"));
        assert_eq!(c.id, ID, "{text}");
        assert_eq!(c.runtime, runtime, "{text}");
        assert_eq!(c.pod_uid.as_deref(), pod.then_some(UID), "{text}");
    }

    #[test]
    fn containerd_with_the_systemd_driver_on_cgroup_v2() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope\n",
            uid_underscored()
        );
        expect(&text, Runtime::Containerd, true);
    }

    #[test]
    fn containerd_with_the_cgroupfs_driver_on_cgroup_v1() {
        let text = format!(
            "12:pids:/kubepods/besteffort/pod{UID}/{ID}\n\
             11:memory:/kubepods/besteffort/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n\
             0::/\n"
        );
        expect(&text, Runtime::Unknown, true);
    }

    #[test]
    fn guaranteed_pods_have_no_qos_level() {
        let text = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope",
            uid_underscored()
        );
        expect(&text, Runtime::Containerd, true);
        expect(
            &format!("0::/kubepods/pod{UID}/{ID}"),
            Runtime::Unknown,
            true,
        );
    }

    #[test]
    fn cri_o_with_both_drivers_and_its_conmon_left_out() {
        let systemd = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{ID}.scope",
            uid_underscored()
        );
        expect(&systemd, Runtime::CriO, true);
        let cgroupfs = format!("0::/kubepods/besteffort/pod{UID}/crio-{ID}");
        expect(&cgroupfs, Runtime::CriO, true);
        let conmon = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-conmon-{ID}.scope",
            uid_underscored()
        );
        assert_eq!(container_of(&conmon), None);
    }

    #[test]
    fn docker_under_kubernetes_and_alone() {
        let dockershim = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/docker-{ID}.scope",
            uid_underscored()
        );
        expect(&dockershim, Runtime::Docker, true);
        expect(
            &format!("0::/system.slice/docker-{ID}.scope"),
            Runtime::Docker,
            false,
        );
        expect(
            &format!("4:cpu,cpuacct:/docker/{ID}\n0::/docker/{ID}"),
            Runtime::Docker,
            false,
        );
    }

    #[test]
    fn host_processes_are_in_no_container() {
        for text in [
            "0::/init.scope",
            "0::/system.slice/nginx.service",
            "0::/user.slice/user-0.slice/session-3.scope",
            "0::/",
            "12:memory:/\n0::/kubepods.slice",
            // A hex-named cgroup of someone else's is not a container.
            &format!("0::/mygroup/{ID}"),
            "",
            "garbage without colons",
        ] {
            assert_eq!(container_of(text), None, "{text}");
        }
    }
}

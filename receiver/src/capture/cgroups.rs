//! cgroup v2 ids -> paths, for telling apart clients that share an address (host
//! processes and host-network pods: `/system.slice/sshd.service`,
//! `/kubepods/besteffort/pod<uid>/<container>`). A cgroup's id is its directory's
//! inode number in the cgroup2 filesystem; the tree is walked again only when an id is
//! not known yet, at most once per call.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Where the host's cgroup2 hierarchy is mounted under `HOST_MOUNT` (the DaemonSet's
/// hostPath mount), else where this process sees cgroup2 (`/sys/fs/cgroup` on pure v2
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones). In a container with a cgroup
/// namespace of its own, only the host's mount shows other pods' cgroups.
fn cgroup2_root() -> Option<PathBuf> {
    const HOST_MOUNT: &str = "/host/sys/fs/cgroup";
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let cgroup2: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split(' ').nth(4).map(PathBuf::from))
                .flatten()
        })
        .collect();
    cgroup2
        .iter()
        .find(|path| path.starts_with(HOST_MOUNT))
        .or(cgroup2.first())
        .cloned()
}

#[derive(Default)]
pub struct CgroupPaths {
    root: Option<PathBuf>,
    by_id: HashMap<u64, String>,
}

fn walk(root: &Path, dir: &Path, out: &mut HashMap<u64, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let path = entry.path();
            let relative = path.strip_prefix(root).unwrap_or(&path);
            out.insert(meta.ino(), format!("/{}", relative.display()));
            walk(root, &path, out);
        }
    }
}

impl CgroupPaths {
    pub fn new() -> Self {
        let root = cgroup2_root();
        match &root {
            Some(root) => tracing::info!("cgroup paths from {}", root.display()),
            None => tracing::warn!(
                "no cgroup2 mount: host-network clients cannot be told apart by cgroup"
            ),
        }
        CgroupPaths {
            root,
            by_id: HashMap::new(),
        }
    }

    /// Paths of `ids` (those still present in the tree).
    pub fn paths(&mut self, ids: impl IntoIterator<Item = u64>) -> HashMap<u64, String> {
        let ids: Vec<u64> = ids.into_iter().filter(|id| *id != 0).collect();
        if ids.iter().any(|id| !self.by_id.contains_key(id)) {
            if let Some(root) = &self.root {
                let mut fresh = HashMap::new();
                if let Ok(meta) = std::fs::metadata(root) {
                    fresh.insert(meta.ino(), "/".to_owned());
                }
                walk(root, root, &mut fresh);
                self.by_id = fresh;
            }
        }
        ids.into_iter()
            .filter_map(|id| self.by_id.get(&id).map(|path| (id, path.clone())))
            .collect()
    }
}

/// The inode of the host's network namespace: `/proc/1/ns/net` (with the host's PID
/// namespace, PID 1 is the host's init), else this process's own (a daemon run on the
/// host, where PID 1 may be out of reach). 0 when neither can be read.
pub fn host_netns() -> u32 {
    let inode = |path: &str| std::fs::metadata(path).map(|m| m.ino() as u32);
    inode("/proc/1/ns/net")
        .or_else(|e| {
            tracing::info!(
                "/proc/1/ns/net: {e}; taking this process's network namespace as the host's"
            );
            inode("/proc/self/ns/net")
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_process_cgroup() {
        let mut paths = CgroupPaths::new();
        let root = paths.root.clone().expect("a cgroup2 mount");
        // This process's cgroup v2 path, from /proc/self/cgroup ("0::/path").
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            .expect("a cgroup v2 entry");
        let id = std::fs::metadata(root.join(own.trim_start_matches('/')))
            .unwrap()
            .ino();
        assert_eq!(paths.paths([id]).get(&id), Some(&own));
    }
}

//! The pin directory of the packet splice (docs/design.md#restarts-and-adoption): its maps and
//! tcx links are pinned in a bpffs directory, so the kernel keeps translating the flows while no
//! daemon runs, and the next daemon started with the same directory takes them over.
//!
//! Layout: one file per map (`PKT_FLOWS`, ...), one per link (`link-ingress-<interface>`,
//! `link-egress-<interface>`). The directory's name carries [`ABI`]: a daemon whose map layouts
//! differ never opens another's maps.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Version of the pinned maps' layouts (`zone_ingress_ebpf::packet`), part of the default
/// directory's name: bumped whenever a key or value layout changes.
pub const ABI: u32 = 2;
/// Where bpffs is mounted on a usual host.
const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` magic of bpffs (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The directory a daemon uses when none is given: one per network namespace and listener port,
/// so daemons in other namespaces (pods, tests) or on other ports never share one, while the
/// same daemon restarted finds its own. The namespace is named by its cookie, which the kernel
/// never gives to another namespace until reboot (an inode number can come back).
///
/// # Errors
/// The network namespace's cookie cannot be read (Linux < 5.14).
pub fn default_dir(listen: SocketAddr) -> io::Result<PathBuf> {
    let ns = netns_cookie()?;
    Ok(Path::new(BPFFS).join("zone-ingress").join(format!("v{ABI}-netns{ns}-port{}", listen.port())))
}

/// Directories next to `dir` (a default one, [`default_dir`]) that daemons of other versions
/// left for the same namespace and port: a daemon stopped without its drain (SIGKILL, SIGQUIT)
/// before an upgrade. Their programs stay attached and their flows keep running until an
/// operator removes them; this daemon never opens their maps.
pub fn other_versions(dir: &Path) -> Vec<PathBuf> {
    /// `v<version>-<rest>`: the version's digits and the rest.
    fn split(name: &str) -> Option<(&str, &str)> {
        let (v, rest) = name.strip_prefix('v')?.split_once('-')?;
        (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())).then_some((v, rest))
    }
    let Some((ours, rest)) = dir.file_name().and_then(|n| n.to_str()).and_then(split) else {
        return Vec::new();
    };
    let Some(Ok(entries)) = dir.parent().map(std::fs::read_dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().and_then(split).is_some_and(|(v, r)| r == rest && v != ours))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// `SO_NETNS_COOKIE` of this process's network namespace.
fn netns_cookie() -> io::Result<u64> {
    /// include/uapi/asm-generic/socket.h.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket(2); the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let s = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let mut cookie: u64 = 0;
    crate::sys::getsockopt(std::os::fd::AsFd::as_fd(&s), libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut cookie)?;
    Ok(cookie)
}

/// Creates `dir` and checks that it is on bpffs (a pin elsewhere fails, or would not survive).
///
/// # Errors
/// The directory cannot be created, or is not on bpffs (mount one: `mount -t bpf bpf /sys/fs/bpf`).
pub fn prepare(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = crate::sys::c_path(dir)?;
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(path.as_ptr(), &raw mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if fs.f_type != BPF_FS_MAGIC {
        return Err(io::Error::other(format!("{} is not on a bpf filesystem", dir.display())));
    }
    Ok(())
}

/// The pin of a link: `link-<direction>-<interface>`.
pub fn link_path(dir: &Path, direction: &str, interface: &str) -> PathBuf {
    dir.join(format!("link-{direction}-{interface}"))
}

/// Interfaces with a pinned link in `dir` (left by an earlier daemon).
pub fn pinned_interfaces(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix("link-ingress-").or_else(|| name.strip_prefix("link-egress-"))?;
            Some(rest.to_owned())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Removes every pin in `dir`, then `dir`: the maps and links are freed once no process holds
/// them (the links detach then).
pub fn remove(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
    // The default directories' parent, once the last of them is gone.
    if let Some(parent) = dir.parent().filter(|p| p.file_name().is_some_and(|n| n == "zone-ingress")) {
        let _ = std::fs::remove_dir(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dir_names_namespace_and_port() {
        let d = default_dir("198.18.0.2:10001".parse().expect("addr")).expect("netns");
        let name = d.file_name().and_then(|n| n.to_str()).expect("name").to_owned();
        assert!(name.starts_with(&format!("v{ABI}-netns")), "{name}");
        assert!(name.ends_with("-port10001"), "{name}");
        assert!(d.starts_with("/sys/fs/bpf/zone-ingress"));
    }

    #[test]
    fn other_versions_are_the_same_namespace_and_port_under_another_version() {
        let root = std::env::temp_dir().join(format!("zi-pin-versions-{}", std::process::id()));
        let ours = root.join(format!("v{ABI}-netns7-port10001"));
        for d in [
            ours.clone(),
            root.join("v1-netns7-port10001"),
            root.join("v12-netns7-port10001"),
            root.join("v1-netns8-port10001"),
            root.join("v1-netns7-port10002"),
            root.join("vx-netns7-port10001"),
            root.join("custom"),
        ] {
            std::fs::create_dir_all(&d).expect("dir");
        }
        assert_eq!(other_versions(&ours), [root.join("v1-netns7-port10001"), root.join("v12-netns7-port10001")]);
        assert!(other_versions(&root.join("custom")).is_empty(), "a directory of another shape has none");
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn pinned_interfaces_parse_names_with_dashes() {
        let dir = std::env::temp_dir().join(format!("zi-pins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for f in ["link-ingress-veth-a", "link-egress-veth-a", "link-egress-eth0", "PKT_FLOWS"] {
            std::fs::write(dir.join(f), "").expect("file");
        }
        assert_eq!(pinned_interfaces(&dir), ["eth0", "veth-a"]);
        assert!(prepare(&dir).is_err(), "a directory outside bpffs is refused");
        remove(&dir);
        assert!(!dir.exists());
    }
}

//! The observer's privileged filesystem touches: bpffs, kernel BTF, cgroup v2 ids.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs};

use super::ObserveError;

/// Where the kernel publishes its own BTF (CONFIG_DEBUG_INFO_BTF).
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Where bpffs is conventionally mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// A cgroup v2 id: what `bpf_get_current_cgroup_id()` returns for tasks in the cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupId(pub u64);

impl CgroupId {
    /// The id of the cgroup v2 directory `path`: its inode number on cgroup2fs (kernfs uses
    /// the 64-bit node id as the inode number). Refuses paths outside a cgroup2 mount, whose
    /// inode numbers mean nothing to the kernel filter.
    pub fn of_path(path: &Path) -> Result<Self, ObserveError> {
        let fs_type = statfs(path)
            .map_err(|errno| ObserveError::Cgroup {
                path: path.to_owned(),
                source: errno.into(),
            })?
            .filesystem_type();
        if fs_type != CGROUP2_SUPER_MAGIC {
            return Err(ObserveError::NotCgroup2 {
                path: path.to_owned(),
                fs_type: fs_type.0 as u64,
            });
        }
        let metadata = std::fs::metadata(path).map_err(|source| ObserveError::Cgroup {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self(metadata.ino()))
    }
}

impl std::fmt::Display for CgroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Fails with a clear error when the kernel has no BTF (tp_btf programs need it).
pub fn require_kernel_btf() -> Result<(), ObserveError> {
    std::fs::metadata(KERNEL_BTF)
        .map(drop)
        .map_err(|source| ObserveError::BtfMissing {
            path: PathBuf::from(KERNEL_BTF),
            source,
        })
}

/// Mounts bpffs at [`BPFFS`] unless a bpffs is already there (no systemd mounts it here).
pub fn ensure_bpffs() -> Result<(), ObserveError> {
    let path = Path::new(BPFFS);
    if statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC) {
        return Ok(());
    }
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|errno| ObserveError::MountBpffs {
        path: path.to_owned(),
        source: errno.into(),
    })
}

/// CLOCK_MONOTONIC now, in ns (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The system page size (ring buffers are page multiples).
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |size| size as u64)
}

/// `BPF_OBJ_GET_INFO_BY_FD` (uapi `enum bpf_cmd`).
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `sizeof(struct bpf_prog_info)` on 6.x (the kernel fills what it has, up to this).
const PROG_INFO_LEN: usize = 232;
const RECURSION_MISSES_AT: usize = kiln_ebpf::PROG_INFO_RECURSION_MISSES_AT;

/// `struct bpf_prog_info`, as bytes (8-aligned like the kernel's).
#[repr(C, align(8))]
struct ProgInfo([u8; PROG_INFO_LEN]);

/// The `info` member of `union bpf_attr`.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// How many times the kernel skipped BPF program `fd` because it was already running on the
/// CPU (`bpf_prog_info.recursion_misses`): each skip is an event nobody recorded.
pub fn prog_recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let mut info = ProgInfo([0; PROG_INFO_LEN]);
    let mut attr = InfoByFd {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| std::io::ErrorKind::InvalidInput)?,
        info_len: PROG_INFO_LEN as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD reads `attr` (a valid prefix of union bpf_attr of the size
    // passed) and writes at most `info_len` bytes to `info`, which outlives the call; the
    // kernel writes back the length it filled into `attr.info_len`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            size_of::<InfoByFd>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let filled = attr.info_len as usize;
    let field = info
        .0
        .get(RECURSION_MISSES_AT..RECURSION_MISSES_AT + 8)
        .filter(|_| filled >= RECURSION_MISSES_AT + 8)
        .ok_or(std::io::ErrorKind::Unsupported)?;
    let mut bytes = [0; 8];
    bytes.copy_from_slice(field);
    Ok(u64::from_ne_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_cgroup2_path_is_refused() {
        let err = CgroupId::of_path(Path::new("/")).unwrap_err();
        assert!(matches!(err, ObserveError::NotCgroup2 { .. }), "{err}");
    }
}

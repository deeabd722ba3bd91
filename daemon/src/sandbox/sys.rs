//! The privileged-syscall seam of the sandbox: performing [`MountOp`]s, and the few calls `nix`
//! does not wrap safely (`fork`, `_exit`, `PR_CAPBSET_DROP`, `close_range`, signal reset). Every
//! `unsafe` block of the sandbox lives here, each a small wrapper; errors become `Errno` at once.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::stat::Mode;
use nix::sys::statvfs::FsFlags;
use nix::unistd::ForkResult;

use super::rootfs::MountOp;

/// A [`MountOp`] failed.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct MountError {
    /// The operation, as displayed.
    pub op: String,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// Performs one step of the root plan (inside the helper's private mount namespace).
pub fn apply(op: &MountOp) -> Result<(), MountError> {
    apply_inner(op).map_err(|source| MountError {
        op: op.to_string(),
        source,
    })
}

fn apply_inner(op: &MountOp) -> io::Result<()> {
    match op {
        MountOp::Tmpfs {
            target,
            options,
            flags,
        } => {
            nix::mount::mount(
                Some("tmpfs"),
                target,
                Some("tmpfs"),
                *flags,
                Some(options.as_str()),
            )?;
        }
        MountOp::MakeDir { path } => {
            match nix::unistd::mkdir(path, Mode::from_bits_truncate(0o755)) {
                Ok(()) => {}
                // Only a real directory may already exist: a symlink here would redirect later mounts.
                Err(Errno::EEXIST) if std::fs::symlink_metadata(path)?.is_dir() => {}
                Err(err) => return Err(err.into()),
            }
        }
        MountOp::MakeFile { path } => {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)?;
        }
        MountOp::Symlink { target, link } => std::os::unix::fs::symlink(target, link)?,
        MountOp::Bind { source, target } => {
            nix::mount::mount(
                Some(source),
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
        }
        MountOp::Restrict {
            target,
            flags,
            recursive,
        } => match set_mount_attributes(target, *flags, *recursive) {
            // Kernels before 5.12 have no mount_setattr: one remount per mount point.
            Err(err) if err.raw_os_error() == Some(libc::ENOSYS) => {
                let mut targets = vec![target.clone()];
                if *recursive {
                    targets.extend(submounts(target)?);
                }
                for mount_point in targets {
                    remount_bind(&mount_point, *flags)?;
                }
            }
            result => result?,
        },
        MountOp::Proc { target } => {
            nix::mount::mount(
                Some("proc"),
                target,
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )?;
        }
        MountOp::PivotRoot { new_root } => {
            // pivot_root(".", ".") stacks the old root on top of the new one; detaching "." then
            // drops the old root (and every host mount under it) from this namespace for good.
            nix::unistd::chdir(new_root)?;
            nix::unistd::pivot_root(".", ".")?;
            nix::mount::umount2(".", MntFlags::MNT_DETACH)?;
            nix::unistd::chdir("/")?;
        }
        MountOp::WriteFile {
            path,
            contents,
            mode,
            uid,
            gid,
        } => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(*mode)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)?;
            file.write_all(&contents.0)?;
            std::os::unix::fs::fchown(&file, Some(*uid), Some(*gid))?;
        }
    }
    Ok(())
}

/// `mount_setattr(2)` on the mount at `target` (and, if `recursive`, every mount below it, in one
/// call that is atomic for the whole tree): adds the per-mount flags in `flags` (`MS_RDONLY`,
/// `MS_NOSUID`, `MS_NODEV`, `MS_NOEXEC`), clears nothing, so flags the mounts already have (locked
/// ones included) stay. Replaces a `/proc/self/mountinfo` scan plus one remount per mount point.
fn set_mount_attributes(target: &Path, flags: MsFlags, recursive: bool) -> io::Result<()> {
    let mut attr_set = 0;
    for (ms_flag, attr) in [
        (MsFlags::MS_RDONLY, libc::MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, libc::MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, libc::MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, libc::MOUNT_ATTR_NOEXEC),
    ] {
        if flags.contains(ms_flag) {
            attr_set |= attr;
        }
    }
    let unsupported =
        flags - (MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
    if !unsupported.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("mount flags {unsupported:?} are not per-mount attributes"),
        ));
    }
    let attr = libc::mount_attr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let path = c_string(target)?;
    // The targets are mount points the plan created under the tmpfs root: never follow a symlink.
    let mut at_flags = libc::AT_SYMLINK_NOFOLLOW;
    if recursive {
        at_flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: `path` is a NUL-terminated string and `attr` an initialised mount_attr; both outlive
    // the call, and the kernel only reads `size_of::<mount_attr>()` bytes through the pointer.
    let res = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            at_flags as libc::c_uint,
            &raw const attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    Errno::result(res).map(drop).map_err(io::Error::from)
}

/// `MS_REMOUNT|MS_BIND` sets exactly the per-mount flags given, so flags the mount already has
/// (nosuid/noexec/rdonly/atime of the source) are re-applied; with a user namespace some of them are
/// locked and omitting them would fail with EPERM.
fn remount_bind(target: &Path, flags: MsFlags) -> io::Result<()> {
    let current = nix::sys::statvfs::statvfs(target)?.flags();
    let mut keep = MsFlags::empty();
    for (fs_flag, ms_flag) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(fs_flag) {
            keep |= ms_flag;
        }
    }
    nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags | keep,
        None::<&str>,
    )?;
    Ok(())
}

/// Mount points strictly below `target` in this mount namespace (a recursive bind brings them
/// along, and a remount of the top does not restrict them).
fn submounts(target: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(mount_points()?
        .into_iter()
        .filter(|path| path != target && path.starts_with(target))
        .collect())
}

/// Every mount point of the calling process's mount namespace (`/proc/self/mountinfo`).
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mountinfo(field))))
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = bytes.get(i + 1..i + 4)
            && let Ok(text) = std::str::from_utf8(octal)
            && let Ok(value) = u8::from_str_radix(text, 8)
        {
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// `value` as a C string (`EINVAL` if it contains a NUL byte).
pub fn c_string(value: impl AsRef<std::ffi::OsStr>) -> Result<CString, Errno> {
    CString::new(value.as_ref().as_bytes()).map_err(|_| Errno::EINVAL)
}

/// `fork(2)`.
///
/// The helper is single-threaded (checked at start), so the child may allocate and run arbitrary
/// code: no other thread can hold a lock at the time of the fork.
pub fn fork() -> Result<ForkResult, Errno> {
    // SAFETY: the kiln-sandbox helper never starts a thread (`helper::main` refuses to run with more
    // than one), so the child inherits no lock held by another thread.
    unsafe { nix::unistd::fork() }
}

/// `_exit(2)`: leaves a forked process without running the parent's atexit handlers or flushing
/// buffers that the parent will flush.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it terminates the calling process immediately.
    unsafe { libc::_exit(code) }
}

/// Drops capability `cap` from the bounding set (`PR_CAPBSET_DROP`), so no later execve of a file
/// with capabilities can regain it.
pub fn drop_bounding_cap(cap: u32) -> Result<(), Errno> {
    // SAFETY: PR_CAPBSET_DROP takes an integer capability number and no pointers.
    let res = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
    Errno::result(res).map(drop)
}

/// Marks every fd from 3 up close-on-exec, so nothing the helper inherited or opened leaks into the
/// step's program.
pub fn cloexec_from_3() -> Result<(), Errno> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on fds; it closes nothing that
    // Rust owns and takes no pointers.
    let res = unsafe {
        libc::close_range(
            3,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        )
    };
    Errno::result(res).map(drop)
}

/// Securebits the step runs with, all locked: uid 0 gets no capabilities from execve
/// (`NOROOT`), uid changes never add or remove capabilities implicitly (`NO_SETUID_FIXUP`; the
/// helper clears every set explicitly), `KEEP_CAPS` stays off for good, and no ambient capability
/// can be raised. Locked bits cannot be changed back, even by a process that regains privileges.
pub const LOCKED_SECUREBITS: u32 = {
    const NOROOT: u32 = 1 << 0;
    const NOROOT_LOCKED: u32 = 1 << 1;
    const NO_SETUID_FIXUP: u32 = 1 << 2;
    const NO_SETUID_FIXUP_LOCKED: u32 = 1 << 3;
    const KEEP_CAPS_LOCKED: u32 = 1 << 5;
    const NO_CAP_AMBIENT_RAISE: u32 = 1 << 6;
    const NO_CAP_AMBIENT_RAISE_LOCKED: u32 = 1 << 7;
    NOROOT
        | NOROOT_LOCKED
        | NO_SETUID_FIXUP
        | NO_SETUID_FIXUP_LOCKED
        | KEEP_CAPS_LOCKED
        | NO_CAP_AMBIENT_RAISE
        | NO_CAP_AMBIENT_RAISE_LOCKED
};

/// `PR_SET_SECUREBITS` to [`LOCKED_SECUREBITS`] (needs `CAP_SETPCAP` in the effective set).
pub fn lock_securebits() -> Result<(), Errno> {
    // SAFETY: PR_SET_SECUREBITS takes an integer bit mask and no pointers.
    let res = unsafe {
        libc::prctl(
            libc::PR_SET_SECUREBITS,
            libc::c_ulong::from(LOCKED_SECUREBITS),
            0,
            0,
            0,
        )
    };
    Errno::result(res).map(drop)
}

/// `PR_GET_SECUREBITS` of the calling thread.
pub fn securebits() -> Result<u32, Errno> {
    // SAFETY: PR_GET_SECUREBITS takes no arguments and returns the bits as the result.
    let res = unsafe { libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0) };
    Errno::result(res).map(|bits| bits as u32)
}

/// Installs a classic-BPF seccomp filter on the calling (single-threaded) process:
/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, &prog)`. `no_new_privs` must already be set.
pub fn install_seccomp(filter: &[libc::sock_filter]) -> Result<(), Errno> {
    let len = u16::try_from(filter.len()).map_err(|_| Errno::E2BIG)?;
    let prog = libc::sock_fprog {
        len,
        // The kernel copies the program and never writes through this pointer.
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points to `len` initialized instructions that outlive the call; the kernel
    // copies (and verifies) them before returning. No TSYNC flag: the step process has one thread.
    let res = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &raw const prog,
        )
    };
    Errno::result(res).map(drop)
}

/// Restores default signal handling for the step: the Rust runtime ignores SIGPIPE, and ignored
/// signals survive execve (a `yes | head` pipeline would never end); the mask is emptied too.
pub fn reset_signals() -> Result<(), Errno> {
    // SAFETY: installing SIG_DFL registers no Rust code as a handler, so no signal-safety
    // requirement applies.
    unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) }?;
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

/// Brings the loopback interface of the calling process's network namespace up
/// (`SIOCSIFFLAGS` on `lo`): only fetch steps need it, for kilnd's proxy listener on
/// 127.0.0.1 (a fresh namespace's `lo` is down, and an address on a down interface can be neither
/// bound nor reached).
pub fn loopback_up() -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: `ifreq` is plain old data (a name array and a union of integers and structs of
    // integers); all zeroes is a valid value of it.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: `socket` is an open socket for the call's duration; SIOCSIFFLAGS reads one
    // initialised `ifreq` through the pointer, which outlives the call.
    let res = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const request) };
    Errno::result(res).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), b"/a b\\c".to_vec());
        assert_eq!(unescape_mountinfo(r"/plain\09"), b"/plain\\09".to_vec());
    }
}

//! x86_64 syscall numbers the observer reports, as names and file operations. Keep in sync
//! with ebpf/src/bpf/syscalls.bpf.c (which defines the numbers it traces).

/// `(number, name)` of the syscalls a trace names: the traced file, write and socket
/// syscalls, and the ones a sandbox profile typically denies (they show up as EPERM records).
const NAMES: &[(u32, &str)] = &[
    (0, "read"),
    (1, "write"),
    (2, "open"),
    (3, "close"),
    (4, "stat"),
    (5, "fstat"),
    (6, "lstat"),
    (9, "mmap"),
    (10, "mprotect"),
    (16, "ioctl"),
    (18, "pwrite64"),
    (20, "writev"),
    (21, "access"),
    (40, "sendfile"),
    (41, "socket"),
    (42, "connect"),
    (44, "sendto"),
    (49, "bind"),
    (50, "listen"),
    (56, "clone"),
    (57, "fork"),
    (58, "vfork"),
    (59, "execve"),
    (62, "kill"),
    (76, "truncate"),
    (80, "chdir"),
    (81, "fchdir"),
    (82, "rename"),
    (83, "mkdir"),
    (84, "rmdir"),
    (85, "creat"),
    (86, "link"),
    (87, "unlink"),
    (88, "symlink"),
    (90, "chmod"),
    (92, "chown"),
    (94, "lchown"),
    (101, "ptrace"),
    (105, "setuid"),
    (106, "setgid"),
    (113, "setreuid"),
    (114, "setregid"),
    (117, "setresuid"),
    (119, "setresgid"),
    (133, "mknod"),
    (155, "pivot_root"),
    (161, "chroot"),
    (165, "mount"),
    (166, "umount2"),
    (169, "reboot"),
    (175, "init_module"),
    (176, "delete_module"),
    (206, "io_setup"),
    (207, "io_destroy"),
    (209, "io_submit"),
    (246, "kexec_load"),
    (250, "keyctl"),
    (257, "openat"),
    (258, "mkdirat"),
    (259, "mknodat"),
    (260, "fchownat"),
    (263, "unlinkat"),
    (264, "renameat"),
    (265, "linkat"),
    (266, "symlinkat"),
    (268, "fchmodat"),
    (272, "unshare"),
    (275, "splice"),
    (296, "pwritev"),
    (298, "perf_event_open"),
    (308, "setns"),
    (313, "finit_module"),
    (316, "renameat2"),
    (321, "bpf"),
    (326, "copy_file_range"),
    (328, "pwritev2"),
    (425, "io_uring_setup"),
    (428, "open_tree"),
    (429, "move_mount"),
    (430, "fsopen"),
    (431, "fsconfig"),
    (432, "fsmount"),
    (433, "fspick"),
    (435, "clone3"),
    (437, "openat2"),
    (442, "mount_setattr"),
    (452, "fchmodat2"),
];

/// The name of syscall `nr`, when the table has it.
pub fn name(nr: u32) -> Option<&'static str> {
    NAMES
        .binary_search_by_key(&nr, |&(n, _)| n)
        .ok()
        .map(|i| NAMES[i].1)
}

/// `AT_REMOVEDIR` (unlinkat).
const AT_REMOVEDIR: u32 = 0x200;

/// The operation a traced file syscall performs (`open`, `rename`, …; docs/trace.md).
pub fn file_op(nr: u32, flags: u32) -> &'static str {
    match nr {
        2 | 85 | 257 | 437 => "open",
        82 | 264 | 316 => "rename",
        263 if flags & AT_REMOVEDIR != 0 => "rmdir",
        87 | 263 => "unlink",
        84 => "rmdir",
        83 | 258 => "mkdir",
        86 | 265 => "link",
        88 | 266 => "symlink",
        90 | 268 | 452 => "chmod",
        92 | 94 | 260 => "chown",
        76 => "truncate",
        80 | 81 => "chdir",
        _ => "other",
    }
}

/// `read`, `write`, `read-write` or `path` (O_PATH) for open flags.
pub fn open_access(flags: u32) -> &'static str {
    const O_ACCMODE: u32 = 0o3;
    const O_CREAT: u32 = 0o100;
    const O_TRUNC: u32 = 0o1000;
    const O_PATH: u32 = 0o10_000_000;
    if flags & O_PATH != 0 {
        return "path";
    }
    match flags & O_ACCMODE {
        0 if flags & (O_CREAT | O_TRUNC) != 0 => "write",
        0 => "read",
        1 => "write",
        _ => "read-write",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_names_resolve() {
        assert!(NAMES.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(name(272), Some("unshare"));
        assert_eq!(name(9999), None);
        assert_eq!(file_op(263, AT_REMOVEDIR), "rmdir");
        assert_eq!(open_access(0o101), "write");
        assert_eq!(open_access(0o2), "read-write");
        assert_eq!(open_access(0o200_000), "read");
    }
}

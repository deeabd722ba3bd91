//! Decoding ring-buffer records (`kiln_ebpf` mirrors of events.h) into [`Event`]s.
//!
//! Pure: no kernel needed, so every quirk of the wire format (leaf-first paths, cut argv) is
//! unit-tested here.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kiln_ebpf::{
    DeniedEvent, EventHeader, ExecEvent, ExitEvent, FileEvent, ForkEvent, NetEvent, Record,
    SockEvent, WriteEvent,
};

/// One observed event, decoded. The variants with paths are boxed: a step holds every event
/// of its trace until the step ends, and a storm of small records (a denied syscall is 40
/// bytes) should not cost the 176 bytes of a file record each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Exec(Box<Exec>),
    Fork(Fork),
    Exit(Exit),
    File(Box<FileOp>),
    Write(Write),
    Net(Box<Net>),
    Denied(Denied),
    Sock(Sock),
}

/// A connect or UDP send destination seen by a cgroup socket hook (before routing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sock {
    pub header: Header,
    /// `kiln_ebpf::SOCK_*`: connect4, connect6, sendmsg4, sendmsg6.
    pub hook: u32,
    /// Destination address.
    pub ip: IpAddr,
    /// Destination port.
    pub port: u16,
    /// IPPROTO_* (6 TCP, 17 UDP).
    pub protocol: u32,
}

/// A path-based file syscall with its result (struct kiln_file_event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOp {
    pub header: Header,
    /// x86_64 syscall number.
    pub nr: u32,
    /// Return value: >= 0, or -errno.
    pub result: i64,
    pub flags: u32,
    pub mode: u32,
    pub dirfd: i32,
    pub dirfd2: i32,
    /// The path argument as passed (empty for fchdir).
    pub path: PathBuf,
    /// The second path argument (rename/link destination, new symlink).
    pub path2: Option<PathBuf>,
    /// The directory `path` is relative to (cwd or dirfd), from the task's root.
    pub base: Option<PathBuf>,
    /// The directory `path2` is relative to.
    pub base2: Option<PathBuf>,
    /// For an open that returned an fd: the opened file, symlinks resolved.
    pub real: Option<PathBuf>,
    /// `kiln_ebpf::FILE_*` bits.
    pub evflags: u16,
}

/// Bytes written to one fd of a process, aggregated in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub header: Header,
    pub fd: i32,
    pub bytes: u64,
    pub writes: u64,
    /// The file, walked from the fd when it was closed (`None` for totals swept at step end).
    pub path: Option<PathBuf>,
    /// `path` is the name of a file in no directory (`pipe:[INODE]`), not a path.
    pub pseudo: bool,
    /// Some of the writes were read from user memory another task could rewrite (Linux AIO
    /// requests): their fd and byte count are the process's word.
    pub args_shared: bool,
}

/// A socket address syscall with its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Net {
    pub header: Header,
    pub nr: u32,
    pub result: i64,
    /// AF_*.
    pub family: u16,
    pub port: u16,
    /// inet/inet6 address.
    pub ip: Option<IpAddr>,
    /// unix socket path (abstract names start with a NUL byte).
    pub unix_path: Option<Vec<u8>>,
}

/// A syscall that returned -EPERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    pub header: Header,
    pub nr: u32,
    pub result: i64,
}

/// Fields every event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// CLOCK_MONOTONIC nanoseconds when the event happened.
    pub ktime_ns: u64,
    /// cgroup v2 id of the task (for a fork: of the child).
    pub cgroup_id: u64,
    /// Kernel thread id of the task the event is about (for a fork: the forking thread).
    pub pid: u32,
    /// Its process id.
    pub tgid: u32,
}

/// A successful execve: the process `header.tgid` now runs `exe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub header: Header,
    /// Parent process id.
    pub ppid: u32,
    /// When the process was forked (CLOCK_MONOTONIC ns).
    pub start_ns: u64,
    pub uid: u32,
    pub gid: u32,
    pub euid: u32,
    pub egid: u32,
    /// The path as passed to execve (after the caller's PATH search).
    pub filename: PathBuf,
    /// The executable's path from the task's root; relative when the walk was cut (then
    /// `flags` has [`kiln_ebpf::EXEC_EXE_TRUNCATED`]).
    pub exe: PathBuf,
    /// The working directory, same rules as `exe` ([`kiln_ebpf::EXEC_CWD_TRUNCATED`]).
    pub cwd: PathBuf,
    /// The arguments captured (at most [`kiln_ebpf::ARGV_MAX`] bytes); `argc` counts all.
    pub argv: Vec<OsString>,
    pub argc: u32,
    /// `kiln_ebpf::EXEC_*` bits: which fields are incomplete.
    pub flags: u32,
}

impl Exec {
    /// Whether every captured field is complete (nothing cut or unreadable).
    pub fn is_complete(&self) -> bool {
        self.flags == 0
    }
}

/// A new process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fork {
    /// `cgroup_id` is the child's; `pid`/`tgid` are the forking thread.
    pub header: Header,
    /// The child's parent process (differs from `header.tgid` with CLONE_PARENT).
    pub parent_tgid: u32,
    pub child_tgid: u32,
    pub child_start_ns: u64,
}

/// The last thread of process `header.tgid` exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub header: Header,
    /// Exit code, meaningful when `signal == 0`.
    pub code: u32,
    /// Terminating signal, 0 on a normal exit.
    pub signal: u32,
    /// The process dumped core.
    pub core_dumped: bool,
    /// When the process was forked (CLOCK_MONOTONIC ns).
    pub start_ns: u64,
}

impl Event {
    pub fn header(&self) -> &Header {
        match self {
            Event::Exec(exec) => &exec.header,
            Event::Fork(fork) => &fork.header,
            Event::Exit(exit) => &exit.header,
            Event::File(file) => &file.header,
            Event::Write(write) => &write.header,
            Event::Net(net) => &net.header,
            Event::Denied(denied) => &denied.header,
            Event::Sock(sock) => &sock.header,
        }
    }
}

/// A record that does not match events.h: the BPF object and this decoder disagree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("ring buffer record of {len} bytes is shorter than the {need}-byte record it claims")]
    Short { len: usize, need: usize },
    #[error("ring buffer record has unknown event type {kind}")]
    UnknownKind { kind: u32 },
    #[error("event type {kind} record has size {size}, expected {expected}")]
    SizeMismatch {
        kind: u32,
        size: u32,
        expected: usize,
    },
    #[error(
        "event type {kind} record of {len} bytes has size {size}, which does not hold its {fixed}-byte fixed part and its strings"
    )]
    BadStrings {
        kind: u32,
        size: u32,
        len: usize,
        fixed: usize,
    },
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader = read(bytes)?;
    match header.kind {
        kiln_ebpf::EVENT_EXEC => {
            let (exec, data) = read_variable::<ExecEvent>(bytes, &header)?;
            let strings = exec
                .strings(data)
                .ok_or_else(|| bad_strings::<ExecEvent>(bytes, &header))?;
            Ok(Event::Exec(decode_exec(&exec, &strings).into()))
        }
        kiln_ebpf::EVENT_FORK => {
            let fork: ForkEvent = read_sized(bytes, &header)?;
            Ok(Event::Fork(Fork {
                header: decode_header(&fork.hdr),
                parent_tgid: fork.parent_tgid,
                child_tgid: fork.child_tgid,
                child_start_ns: fork.child_start_ns,
            }))
        }
        kiln_ebpf::EVENT_EXIT => {
            let exit: ExitEvent = read_sized(bytes, &header)?;
            Ok(Event::Exit(Exit {
                header: decode_header(&exit.hdr),
                code: exit.code,
                signal: exit.signal,
                core_dumped: exit.status & 0x80 != 0,
                start_ns: exit.start_ns,
            }))
        }
        kiln_ebpf::EVENT_FILE => {
            let (file, data) = read_variable::<FileEvent>(bytes, &header)?;
            let strings = file
                .strings(data)
                .ok_or_else(|| bad_strings::<FileEvent>(bytes, &header))?;
            Ok(Event::File(decode_file(&file, &strings).into()))
        }
        kiln_ebpf::EVENT_WRITE => {
            let (write, data) = read_variable::<WriteEvent>(bytes, &header)?;
            let path = write
                .path(data)
                .ok_or_else(|| bad_strings::<WriteEvent>(bytes, &header))?;
            Ok(Event::Write(Write::from_kernel(
                decode_header(&write.hdr),
                write.fd,
                (write.bytes, write.writes),
                path,
                write.wflags,
            )))
        }
        kiln_ebpf::EVENT_SOCK => {
            let sock: SockEvent = read_sized(bytes, &header)?;
            let ip = if sock.family == AF_INET6 {
                IpAddr::V6(Ipv6Addr::from(sock.addr))
            } else {
                IpAddr::V4(Ipv4Addr::new(
                    sock.addr[0],
                    sock.addr[1],
                    sock.addr[2],
                    sock.addr[3],
                ))
            };
            Ok(Event::Sock(Sock {
                header: decode_header(&sock.hdr),
                hook: sock.hook,
                ip,
                port: sock.port,
                protocol: sock.protocol,
            }))
        }
        kiln_ebpf::EVENT_NET => {
            let net: NetEvent = read_sized(bytes, &header)?;
            Ok(Event::Net(decode_net(&net).into()))
        }
        kiln_ebpf::EVENT_DENIED => {
            let denied: DeniedEvent = read_sized(bytes, &header)?;
            Ok(Event::Denied(Denied {
                header: decode_header(&denied.hdr),
                nr: denied.nr,
                result: denied.result,
            }))
        }
        kind => Err(DecodeError::UnknownKind { kind }),
    }
}

fn read<T: Record>(bytes: &[u8]) -> Result<T, DecodeError> {
    T::read(bytes).ok_or(DecodeError::Short {
        len: bytes.len(),
        need: size_of::<T>(),
    })
}

fn read_sized<T: Record>(bytes: &[u8], header: &EventHeader) -> Result<T, DecodeError> {
    if header.size as usize != size_of::<T>() {
        return Err(DecodeError::SizeMismatch {
            kind: header.kind,
            size: header.size,
            expected: size_of::<T>(),
        });
    }
    read(bytes)
}

/// A variable-size record: its fixed part and its `data[]` (up to `hdr.size`), read in place.
fn read_variable<'a, T: Record>(
    bytes: &'a [u8],
    header: &EventHeader,
) -> Result<(T, &'a [u8]), DecodeError> {
    let fixed: T = read(bytes)?;
    let data = bytes
        .get(size_of::<T>()..header.size as usize)
        .ok_or_else(|| bad_strings::<T>(bytes, header))?;
    Ok((fixed, data))
}

fn bad_strings<T>(bytes: &[u8], header: &EventHeader) -> DecodeError {
    DecodeError::BadStrings {
        kind: header.kind,
        size: header.size,
        len: bytes.len(),
        fixed: size_of::<T>(),
    }
}

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

fn decode_header(hdr: &EventHeader) -> Header {
    Header {
        ktime_ns: hdr.ktime_ns,
        cgroup_id: hdr.cgroup_id,
        pid: hdr.pid,
        tgid: hdr.tgid,
    }
}

fn decode_exec(exec: &ExecEvent, strings: &kiln_ebpf::ExecStrings<'_>) -> Exec {
    Exec {
        header: decode_header(&exec.hdr),
        ppid: exec.ppid,
        start_ns: exec.start_ns,
        uid: exec.uid,
        gid: exec.gid,
        euid: exec.euid,
        egid: exec.egid,
        filename: PathBuf::from(OsString::from_vec(strings.filename.to_vec())),
        exe: walked_path(
            strings.exe,
            exec.flags & kiln_ebpf::EXEC_EXE_TRUNCATED != 0,
            exec.flags & kiln_ebpf::EXEC_EXE_DETACHED != 0,
        ),
        cwd: leaf_first_path(strings.cwd, exec.flags & kiln_ebpf::EXEC_CWD_TRUNCATED != 0),
        argv: split_argv(strings.argv),
        argc: exec.argc,
        flags: exec.flags,
    }
}

fn decode_file(file: &FileEvent, strings: &kiln_ebpf::FileStrings<'_>) -> FileOp {
    let flag = |bit: u16| file.evflags & bit != 0;
    let bytes_path = |bytes: &[u8]| PathBuf::from(OsString::from_vec(bytes.to_vec()));
    FileOp {
        header: decode_header(&file.hdr),
        nr: file.nr,
        result: file.result,
        flags: file.flags,
        mode: file.mode,
        dirfd: file.dirfd,
        dirfd2: file.dirfd2,
        path: bytes_path(strings.path),
        path2: (file.path2_len > 0 || flag(kiln_ebpf::FILE_HAS_BASE2))
            .then(|| bytes_path(strings.path2)),
        base: flag(kiln_ebpf::FILE_HAS_BASE).then(|| {
            walked_path(
                strings.base,
                flag(kiln_ebpf::FILE_BASE_TRUNCATED),
                flag(kiln_ebpf::FILE_BASE_DETACHED),
            )
        }),
        base2: flag(kiln_ebpf::FILE_HAS_BASE2)
            .then(|| leaf_first_path(strings.base2, flag(kiln_ebpf::FILE_BASE2_TRUNCATED))),
        real: flag(kiln_ebpf::FILE_HAS_REAL).then(|| real_path(strings.real, file.evflags)),
        evflags: file.evflags,
    }
}

fn decode_net(net: &NetEvent) -> Net {
    let ip = match net.family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            net.addr[0],
            net.addr[1],
            net.addr[2],
            net.addr[3],
        ))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(net.addr))),
        _ => None,
    };
    // No path at all (a listen on a unix socket: its local address is not read): none.
    let unix_path = (net.family == AF_UNIX && net.path_len > 0).then(|| {
        let path = net.unix_path();
        // A pathname socket is NUL-terminated within sun_path; an abstract one starts with NUL.
        match path.first() {
            Some(0) => path.to_vec(),
            _ => path.split(|&b| b == 0).next().unwrap_or_default().to_vec(),
        }
    });
    Net {
        header: decode_header(&net.hdr),
        nr: net.nr,
        result: net.result,
        family: net.family,
        port: net.port,
        ip,
        unix_path,
    }
}

impl Write {
    /// A write total as the kernel kept it (a write record, or a `write_totals` entry swept at
    /// step end): `leaf_first` is its walked path, `wflags` its `FILE_*` bits.
    pub(super) fn from_kernel(
        header: Header,
        fd: i32,
        (bytes, writes): (u64, u64),
        leaf_first: &[u8],
        wflags: u16,
    ) -> Self {
        Write {
            header,
            fd,
            bytes,
            writes,
            path: (wflags & kiln_ebpf::FILE_HAS_REAL != 0).then(|| real_path(leaf_first, wflags)),
            pseudo: wflags & kiln_ebpf::FILE_REAL_DETACHED != 0,
            args_shared: wflags & kiln_ebpf::FILE_ARGS_SHARED != 0,
        }
    }
}

/// The opened (or written) file: a walked path, or the pseudo name of a file in no directory.
fn real_path(leaf_first: &[u8], evflags: u16) -> PathBuf {
    walked_path(
        leaf_first,
        evflags & kiln_ebpf::FILE_REAL_TRUNCATED != 0,
        evflags & kiln_ebpf::FILE_REAL_DETACHED != 0,
    )
}

/// A path walked in the kernel: the pseudo name of a file in no directory when `detached`,
/// else the components (see [`leaf_first_path`]).
fn walked_path(leaf_first: &[u8], truncated: bool, detached: bool) -> PathBuf {
    if detached {
        pseudo_name(leaf_first)
    } else {
        leaf_first_path(leaf_first, truncated)
    }
}

/// The name of a file in no directory (`pipe:[INODE]`, `memfd:NAME`): one component, kept as
/// the kernel named it, not rooted at `/` (it is not a path), so it can never be taken for a
/// file of the tree. Empty when the kernel had no name for it.
fn pseudo_name(bytes: &[u8]) -> PathBuf {
    let name = bytes.split(|&b| b == 0).next().unwrap_or_default();
    PathBuf::from(OsString::from_vec(name.to_vec()))
}

/// Rebuilds a path from its components leaf first, each NUL-terminated (events.h). A cut walk
/// lost root-side components: the result is then relative, and a component missing its NUL
/// (cut mid-name) is dropped.
fn leaf_first_path(bytes: &[u8], truncated: bool) -> PathBuf {
    // From the end: first the piece after the last NUL (empty when the walk ended cleanly, else
    // a cut name: dropped), then the components root first. No intermediate allocation.
    let mut components = bytes.rsplit(|&b| b == 0);
    components.next();
    let mut path = Vec::with_capacity(bytes.len() + 1);
    for (i, component) in components.enumerate() {
        if i > 0 || !truncated {
            path.push(b'/');
        }
        path.extend_from_slice(component);
    }
    if path.is_empty() && !truncated {
        path.push(b'/');
    }
    PathBuf::from(OsString::from_vec(path))
}

/// Splits the argument area at NULs; a last argument cut at the limit is kept as captured.
fn split_argv(bytes: &[u8]) -> Vec<OsString> {
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|arg| OsString::from_vec(arg.to_vec()))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    fn header(kind: u32, size: usize) -> EventHeader {
        EventHeader {
            kind,
            size: size as u32,
            ktime_ns: 1_000,
            cgroup_id: 77,
            pid: 10,
            tgid: 10,
        }
    }

    /// A raw exec record as the BPF program writes it: the fixed part, the packed strings, and
    /// ring padding past `hdr.size` (which must be ignored).
    pub(crate) fn raw_exec(
        filename: &[u8],
        exe: &[u8],
        cwd: &[u8],
        argv: &[u8],
        flags: u32,
    ) -> Vec<u8> {
        let data_len = filename.len() + exe.len() + cwd.len() + argv.len();
        let ev = ExecEvent {
            hdr: header(kiln_ebpf::EVENT_EXEC, size_of::<ExecEvent>() + data_len),
            start_ns: 500,
            ppid: 1,
            uid: 1000,
            gid: 1000,
            euid: 1000,
            egid: 1000,
            argc: 0,
            flags,
            filename_len: filename.len() as u16,
            argv_len: argv.len() as u16,
            exe_len: exe.len() as u16,
            cwd_len: cwd.len() as u16,
            pad0: 0,
        };
        let mut bytes = ev.as_bytes().to_vec();
        for part in [filename, exe, cwd, argv] {
            bytes.extend_from_slice(part);
        }
        bytes.extend_from_slice(&[0xee; 7]);
        bytes
    }

    #[test]
    fn a_string_length_past_the_record_is_an_error() {
        let mut raw = raw_exec(b"/bin/tr", b"tr\0", b"", b"tr\0", 0);
        // argv_len claims 200 bytes the record does not have.
        let argv_len = std::mem::offset_of!(ExecEvent, argv_len);
        raw[argv_len..argv_len + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(matches!(
            decode(&raw),
            Err(DecodeError::BadStrings { kind: 1, .. })
        ));
        // A size past the bytes delivered, too.
        let size = std::mem::offset_of!(EventHeader, size);
        raw[size..size + 4].copy_from_slice(&4000u32.to_ne_bytes());
        assert!(matches!(decode(&raw), Err(DecodeError::BadStrings { .. })));
    }

    #[test]
    fn exec_paths_are_rebuilt_root_first() {
        let raw = raw_exec(b"/bin/tr", b"tr\0bin\0usr\0", b"", b"tr\0a\0b\0", 0);
        let Ok(Event::Exec(exec)) = decode(&raw) else {
            panic!("not an exec");
        };
        assert_eq!(exec.filename, PathBuf::from("/bin/tr"));
        assert_eq!(exec.exe, PathBuf::from("/usr/bin/tr"));
        assert_eq!(exec.cwd, PathBuf::from("/"), "zero components is the root");
        assert_eq!(exec.argv, ["tr", "a", "b"]);
        assert!(exec.is_complete());
    }

    #[test]
    fn truncated_paths_are_relative_and_drop_a_cut_component() {
        assert_eq!(
            leaf_first_path(b"tr\0bin\0us", true),
            PathBuf::from("bin/tr")
        );
        assert_eq!(leaf_first_path(b"tr\0bin\0", true), PathBuf::from("bin/tr"));
        assert_eq!(leaf_first_path(b"", true), PathBuf::new());
    }

    #[test]
    fn argv_keeps_empty_and_cut_arguments() {
        assert_eq!(split_argv(b"sh\0\0-c\0"), ["sh", "", "-c"]);
        assert_eq!(split_argv(b"echo\0abcd"), ["echo", "abcd"]);
        assert!(split_argv(b"").is_empty());
    }

    #[test]
    fn fork_and_exit_decode() {
        let fork = ForkEvent {
            hdr: header(kiln_ebpf::EVENT_FORK, size_of::<ForkEvent>()),
            parent_tgid: 10,
            child_tgid: 11,
            child_start_ns: 900,
        };
        assert_eq!(
            decode(fork.as_bytes()),
            Ok(Event::Fork(Fork {
                header: decode_header(&fork.hdr),
                parent_tgid: 10,
                child_tgid: 11,
                child_start_ns: 900
            }))
        );
        let exit = ExitEvent {
            hdr: header(kiln_ebpf::EVENT_EXIT, size_of::<ExitEvent>()),
            status: 9 | 0x80,
            code: 0,
            signal: 9,
            pad0: 0,
            start_ns: 500,
        };
        let Ok(Event::Exit(decoded)) = decode(exit.as_bytes()) else {
            panic!("not an exit");
        };
        assert_eq!((decoded.signal, decoded.core_dumped), (9, true));
    }

    #[test]
    fn files_in_no_directory_keep_their_pseudo_name() {
        let detached = kiln_ebpf::FILE_REAL_DETACHED;
        assert_eq!(real_path(b"pipe:[42]\0", detached), Path::new("pipe:[42]"));
        assert_eq!(real_path(b"memfd:x\0", detached), Path::new("memfd:x"));
        // The same bytes as a walked path: one component under the root.
        assert_eq!(real_path(b"memfd:x\0", 0), Path::new("/memfd:x"));
        assert_eq!(real_path(b"", detached), Path::new(""));
    }

    #[test]
    fn small_records_stay_small_in_memory() {
        // A step keeps its whole trace in memory until it ends: the enum is as large as its
        // largest unboxed variant (a byte-count record), not a file record's 176 bytes.
        assert!(size_of::<Event>() <= 80, "{}", size_of::<Event>());
        assert!(size_of::<FileOp>() > 80, "then FileOp need not be boxed");
    }

    #[test]
    fn malformed_records_are_errors() {
        assert_eq!(
            decode(&[0; 8]),
            Err(DecodeError::Short { len: 8, need: 32 })
        );
        let unknown = header(99, 32);
        assert_eq!(
            decode(unknown.as_bytes()),
            Err(DecodeError::UnknownKind { kind: 99 })
        );
        let wrong_size = header(kiln_ebpf::EVENT_FORK, 40);
        assert_eq!(
            decode(wrong_size.as_bytes()),
            Err(DecodeError::SizeMismatch {
                kind: kiln_ebpf::EVENT_FORK,
                size: 40,
                expected: 48
            })
        );
    }
}

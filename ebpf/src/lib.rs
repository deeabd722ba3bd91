//! kiln-ebpf: the pipeline observer's BPF programs and the `#[repr(C)]` mirrors of their events.
//!
//! Owns the kernel/userspace boundary of the observer:
//! - `src/bpf/*.bpf.c`: C CO-RE programs, one file per program family: `process` (exec,
//!   fork, exit) and `syscalls` (file operations, writes, sockets, EPERM), compiled together
//!   (`observer.bpf.c`, sharing `common.bpf.h`'s maps) and embedded as [`OBSERVER_BPF`] by
//!   `build.rs` (`KILN_SKIP_BPF=1` embeds an empty object instead, see [`BPF_BUILT`]);
//!   `floor.bpf.c`, a separate object ([`FLOOR_BPF`]), is the benchmark's baseline only;
//! - `src/bpf/events.h`: the one definition of every ring-buffer record; this file mirrors it
//!   (keep in sync with events.h) and a test compares sizes, offsets and constants with what
//!   the C compiler reports;
//! - [`Record::read`]: the only place raw ring-buffer bytes become typed records.
//!
//! Loading, attaching and decoding into rich events live in the daemon (`kilnd::observe`).

/// Whether `build.rs` really compiled the BPF programs (false under `KILN_SKIP_BPF=1`).
pub const BPF_BUILT: bool = !cfg!(kiln_bpf_skipped);

/// The observer object (`src/bpf/observer.bpf.c`): the programs of [`maps::PROGRAMS`] (tp_btf)
/// and the maps named in [`maps`]. Empty when [`BPF_BUILT`] is false.
pub static OBSERVER_BPF: &[u8] = &OBSERVER_OBJECT.bytes;

static OBSERVER_OBJECT: &AlignedObject<[u8]> = &AlignedObject {
    _align: [],
    bytes: *include_bytes!(concat!(env!("OUT_DIR"), "/observer.bpf.o")),
};

/// Benchmark baseline only, never loaded by kilnd: the object of `src/bpf/floor.bpf.c`, one
/// [`FLOOR_PROGRAM`] on tp_btf `sys_exit` that returns at once: the kernel's own cost of the
/// syscall tracepoint kiln attaches while a step is observed, which the observer benchmark
/// measures kiln against. Empty when [`BPF_BUILT`] is false.
pub static FLOOR_BPF: &[u8] = &FLOOR_OBJECT.bytes;

/// The program in [`FLOOR_BPF`] and its tp_btf tracepoint.
pub const FLOOR_PROGRAM: (&str, &str) = ("kiln_floor_sys_exit", "sys_exit");

static FLOOR_OBJECT: &AlignedObject<[u8]> = &AlignedObject {
    _align: [],
    bytes: *include_bytes!(concat!(env!("OUT_DIR"), "/floor.bpf.o")),
};

/// ELF parsers read headers in place: keep an embedded object 8-byte aligned.
#[repr(C)]
struct AlignedObject<Bytes: ?Sized> {
    _align: [u64; 0],
    bytes: Bytes,
}

/// Names shared with the C sources (keep in sync with common.bpf.h, process.bpf.c and
/// syscalls.bpf.c).
pub mod maps {
    /// `BPF_MAP_TYPE_HASH` cgroup v2 id (u64) -> events lost for that cgroup (u64).
    pub const OBSERVED_CGROUPS: &str = "observed_cgroups";
    /// `BPF_MAP_TYPE_ARRAY` of u64 words: bit `id % FILTER_BITS` is set for every observed
    /// cgroup id (a prefilter in front of `observed_cgroups`; see common.bpf.h).
    pub const OBSERVED_FILTER: &str = "observed_filter";
    /// Bits of `observed_filter` (KILN_FILTER_BITS in events.h; the layout test checks it).
    pub const FILTER_BITS: u64 = 65_536;
    /// `BPF_MAP_TYPE_RINGBUF` of records (default 16 MiB).
    pub const EVENTS: &str = "events";
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`, one u64: events lost on each CPU, all cgroups.
    pub const LOST_EVENTS: &str = "lost_events";
    /// `BPF_MAP_TYPE_HASH` [`super::WriteKey`] -> [`super::WriteTotal`]: bytes written per open
    /// fd not yet emitted by a close, and the file's path.
    pub const WRITE_TOTALS: &str = "write_totals";
    /// `BPF_MAP_TYPE_HASH` cgroup v2 id -> i64: `write_totals` entries the cgroup holds (each
    /// step may hold 4096). Created by the BPF side; userspace removes a cgroup's when it stops
    /// observing it.
    pub const WRITE_ENTRIES: &str = "write_entries";
    /// Read-only globals the loader sets: bytes of unread data that force a wakeup, and the
    /// longest time between forced wakeups while events flow.
    pub const WAKEUP_THRESHOLD: &str = "kiln_wakeup_threshold";
    pub const WAKEUP_INTERVAL_NS: &str = "kiln_wakeup_interval_ns";
    /// Programs and the tracepoints they attach to (tp_btf).
    pub const PROGRAMS: &[(&str, &str)] = &[
        ("kiln_exec", "sched_process_exec"),
        ("kiln_fork", "sched_process_fork"),
        ("kiln_exit", "sched_process_exit"),
        ("kiln_sys_exit", "sys_exit"),
    ];
    /// The programs of [`PROGRAMS`] attached only while at least one cgroup is observed: a
    /// syscall tracepoint puts every syscall of every task on the host on the kernel's slow path
    /// (the measured floor of its cost), so an idle node does not keep it. One program at
    /// sys_exit, not a sys_enter/sys_exit pair: each attached program is one more dispatch per
    /// syscall for every task.
    pub const ON_DEMAND: &[&str] = &["kiln_sys_exit"];
    /// cgroup socket-address programs (observe only, they always allow), attached as
    /// bpf_links to the cgroup v2 root: `(program, hook)`.
    pub const SOCK_PROGRAMS: &[(&str, &str)] = &[
        ("kiln_connect4", "connect4"),
        ("kiln_connect6", "connect6"),
        ("kiln_sendmsg4", "sendmsg4"),
        ("kiln_sendmsg6", "sendmsg6"),
    ];
}

// Keep in sync with events.h: constants.
/// Bytes of `filename` in an exec record (the path as passed to execve, NUL included).
pub const FILENAME_MAX: usize = 256;
/// Bytes of `exe` and `cwd` in an exec record.
pub const PATH_MAX: usize = 512;
/// Bytes of argv captured per exec; longer argument areas are cut and flagged.
pub const ARGV_MAX: usize = 1024;
/// Most path components one dentry walk follows.
pub const PATH_COMPONENTS_MAX: usize = 48;
/// Bytes of a path argument captured from user memory.
pub const ARG_MAX: usize = 256;
/// Bytes of a unix socket path.
pub const UNIX_PATH_MAX: usize = 112;
/// Most bytes of `data[]` of an exec, file and write record.
pub const EXEC_DATA_MAX: usize = FILENAME_MAX + 2 * PATH_MAX + ARGV_MAX;
pub const FILE_DATA_MAX: usize = 2 * ARG_MAX + 3 * PATH_MAX;
pub const WRITE_DATA_MAX: usize = PATH_MAX;

/// `kiln_event_header.type` values (enum kiln_event_type).
pub const EVENT_EXEC: u32 = 1;
pub const EVENT_FORK: u32 = 2;
pub const EVENT_EXIT: u32 = 3;
pub const EVENT_FILE: u32 = 4;
pub const EVENT_WRITE: u32 = 5;
pub const EVENT_NET: u32 = 6;
pub const EVENT_DENIED: u32 = 7;
pub const EVENT_SOCK: u32 = 8;

/// `kiln_sock_event.hook` values.
pub const SOCK_CONNECT4: u32 = 1;
pub const SOCK_CONNECT6: u32 = 2;
pub const SOCK_SENDMSG4: u32 = 3;
pub const SOCK_SENDMSG6: u32 = 4;

/// `kiln_file_event.evflags` bits.
pub const FILE_PATH_TRUNCATED: u16 = 1 << 0;
pub const FILE_PATH2_TRUNCATED: u16 = 1 << 1;
pub const FILE_BASE_TRUNCATED: u16 = 1 << 2;
pub const FILE_BASE2_TRUNCATED: u16 = 1 << 3;
pub const FILE_REAL_TRUNCATED: u16 = 1 << 4;
/// A path argument could not be read from user memory.
pub const FILE_PATH_FAULT: u16 = 1 << 5;
/// `base`, `base2`, `real` hold a walked path.
pub const FILE_HAS_BASE: u16 = 1 << 6;
pub const FILE_HAS_BASE2: u16 = 1 << 7;
pub const FILE_HAS_REAL: u16 = 1 << 8;
/// Offset of `recursion_misses` in the uapi `struct bpf_prog_info` (Linux 5.12+; append-only
/// uapi, so fixed), where kilnd reads how often the kernel skipped one of its programs. Checked
/// against <linux/bpf.h> by the layout test.
pub const PROG_INFO_RECURSION_MISSES_AT: usize = 208;
/// The arguments could have been rewritten by another task while the syscall ran (shared memory,
/// cwd or, for a dirfd, fd table).
pub const FILE_ARGS_SHARED: u16 = 1 << 9;
/// `flags`' access mode and `O_PATH` are the opened file's, from the kernel.
pub const FILE_FLAGS_KERNEL: u16 = 1 << 10;
/// `real` (and a write total's path) is the pseudo name of a file in no directory
/// (`pipe:[INODE]`, `socket:[INODE]`, `memfd:NAME`, `[eventfd]`…), not a path.
pub const FILE_REAL_DETACHED: u16 = 1 << 11;
/// `base` is the pseudo name of the file in no directory open as dirfd (`AT_EMPTY_PATH`).
pub const FILE_BASE_DETACHED: u16 = 1 << 12;

/// `kiln_exec_event.flags` bits.
pub const EXEC_FILENAME_TRUNCATED: u32 = 1 << 0;
pub const EXEC_ARGV_TRUNCATED: u32 = 1 << 1;
/// argv could not be read from user memory; `argv_len` is 0.
pub const EXEC_ARGV_FAULT: u32 = 1 << 2;
pub const EXEC_EXE_TRUNCATED: u32 = 1 << 3;
pub const EXEC_CWD_TRUNCATED: u32 = 1 << 4;
/// `exe` is the pseudo name of a file in no directory (a memfd: `memfd:NAME`), not a path.
pub const EXEC_EXE_DETACHED: u32 = 1 << 5;
/// The program is a script that is a file in no directory (fexecve of a memfd script: `exe` is
/// its interpreter, `filename` `/dev/fd/N`).
pub const EXEC_SCRIPT_DETACHED: u32 = 1 << 6;

/// Common header of every record (struct kiln_event_header; keep in sync with events.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventHeader {
    /// `EVENT_*`.
    pub kind: u32,
    /// Bytes of the whole record, header included.
    pub size: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ktime_ns: u64,
    /// cgroup v2 id (the inode number of the cgroup2 directory).
    pub cgroup_id: u64,
    /// Kernel pid (thread id) of the task the event is about.
    pub pid: u32,
    /// Its thread group id (the userspace pid).
    pub tgid: u32,
}

/// The fixed part of a successful execve record (struct kiln_exec_event; keep in sync with
/// events.h, which documents each field's encoding: `exe`/`cwd` are components leaf first, each
/// NUL-terminated). The strings follow it in the record: see [`ExecEvent::strings`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecEvent {
    pub hdr: EventHeader,
    /// When the process was forked, CLOCK_MONOTONIC ns.
    pub start_ns: u64,
    /// tgid of the real parent.
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub euid: u32,
    pub egid: u32,
    /// Number of arguments (all of them, also when `argv` was cut).
    pub argc: u32,
    /// `EXEC_*` bits.
    pub flags: u32,
    pub filename_len: u16,
    pub argv_len: u16,
    pub exe_len: u16,
    pub cwd_len: u16,
    /// Explicit padding (`_pad0` in C).
    pub pad0: u32,
}

/// A new process (struct kiln_fork_event; keep in sync with events.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkEvent {
    /// `pid`/`tgid` are the forking thread; `cgroup_id` is the child's.
    pub hdr: EventHeader,
    /// The child's real parent.
    pub parent_tgid: u32,
    pub child_tgid: u32,
    /// CLOCK_MONOTONIC ns.
    pub child_start_ns: u64,
}

/// The last thread of a process exited (struct kiln_exit_event; keep in sync with events.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitEvent {
    pub hdr: EventHeader,
    /// Raw wait status: `(code << 8) | signal | 0x80 if core dumped`.
    pub status: u32,
    /// Exit code, meaningful when `signal == 0`.
    pub code: u32,
    /// Terminating signal, 0 on a normal exit.
    pub signal: u32,
    /// Explicit padding (`_pad0` in C).
    pub pad0: u32,
    /// When the process was forked, CLOCK_MONOTONIC ns.
    pub start_ns: u64,
}

/// The fixed part of a path-based file syscall record (struct kiln_file_event; keep in sync
/// with events.h, which documents each field). The strings follow: [`FileEvent::strings`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileEvent {
    pub hdr: EventHeader,
    /// Return value: >= 0, or -errno.
    pub result: i64,
    /// x86_64 syscall number.
    pub nr: u32,
    pub flags: u32,
    pub mode: u32,
    pub dirfd: i32,
    pub dirfd2: i32,
    pub path_len: u16,
    pub path2_len: u16,
    pub base_len: u16,
    pub base2_len: u16,
    pub real_len: u16,
    /// `FILE_*` bits.
    pub evflags: u16,
}

/// The fixed part of a bytes-written record (struct kiln_write_event; keep in sync with
/// events.h); the path follows: [`WriteEvent::path`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteEvent {
    pub hdr: EventHeader,
    pub fd: i32,
    pub path_len: u16,
    /// `FILE_HAS_REAL` / `FILE_REAL_TRUNCATED` for `path`.
    pub wflags: u16,
    pub bytes: u64,
    pub writes: u64,
}

impl WriteEvent {
    /// Leaf-first components of the file written, from the record's `data[]`.
    pub fn path<'a>(&self, data: &'a [u8]) -> Option<&'a [u8]> {
        data.get(..usize::from(self.path_len))
    }
}

/// Key of the `write_totals` map (struct kiln_write_key; keep in sync with events.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WriteKey {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub fd: i32,
}

/// Value of the `write_totals` map (struct kiln_write_total; keep in sync with events.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteTotal {
    pub bytes: u64,
    pub writes: u64,
    /// Kernel address of the counted file's struct file (identity only; never emitted).
    pub file: u64,
    /// Kernel address of its inode (identity only; never emitted).
    pub inode: u64,
    pub path_len: u16,
    /// `FILE_HAS_REAL` / `FILE_REAL_TRUNCATED` for `path`.
    pub wflags: u16,
    /// Explicit padding (`_pad0` in C).
    pub pad0: u32,
    /// Leaf-first components of the file, walked from the fd at the first write.
    pub path: [u8; PATH_MAX],
}

impl WriteTotal {
    /// Leaf-first components of the file written (empty when it could not be named).
    pub fn path(&self) -> &[u8] {
        clamp(&self.path, self.path_len)
    }
}

/// A socket address syscall (struct kiln_net_event; keep in sync with events.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetEvent {
    pub hdr: EventHeader,
    pub result: i64,
    pub nr: u32,
    /// AF_*.
    pub family: u16,
    /// Host order.
    pub port: u16,
    /// Network order: 4 bytes for AF_INET, 16 for AF_INET6.
    pub addr: [u8; 16],
    pub addrlen: u32,
    pub path_len: u16,
    /// Explicit padding (`_pad0` in C).
    pub pad0: u16,
    pub unix_path: [u8; UNIX_PATH_MAX],
}

/// A connect or UDP send destination seen by a cgroup socket hook (struct kiln_sock_event;
/// keep in sync with events.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockEvent {
    pub hdr: EventHeader,
    /// `SOCK_*`.
    pub hook: u32,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// Host order.
    pub port: u16,
    /// Network order: 4 bytes for AF_INET, 16 for AF_INET6.
    pub addr: [u8; 16],
    /// IPPROTO_*.
    pub protocol: u32,
    /// SOCK_STREAM, SOCK_DGRAM, …
    pub sock_type: u32,
}

/// A syscall that returned -EPERM (struct kiln_denied_event; keep in sync with events.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeniedEvent {
    pub hdr: EventHeader,
    pub result: i64,
    pub nr: u32,
    /// Explicit padding (`_pad0` in C).
    pub pad0: u32,
}

/// The strings of a file record's `data[]`, split by their lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStrings<'a> {
    /// The path argument as passed.
    pub path: &'a [u8],
    /// The second path argument.
    pub path2: &'a [u8],
    /// Leaf-first components of `path`'s directory.
    pub base: &'a [u8],
    /// Leaf-first components of `path2`'s directory.
    pub base2: &'a [u8],
    /// Leaf-first components of the opened file.
    pub real: &'a [u8],
}

impl FileEvent {
    /// Splits `data` (the record after the fixed part, up to `hdr.size`) into its strings;
    /// `None` if the lengths add up to more than `data` holds.
    pub fn strings<'a>(&self, data: &'a [u8]) -> Option<FileStrings<'a>> {
        let mut rest = data;
        Some(FileStrings {
            path: take(&mut rest, self.path_len)?,
            path2: take(&mut rest, self.path2_len)?,
            base: take(&mut rest, self.base_len)?,
            base2: take(&mut rest, self.base2_len)?,
            real: take(&mut rest, self.real_len)?,
        })
    }
}

impl NetEvent {
    /// The unix socket path bytes.
    pub fn unix_path(&self) -> &[u8] {
        clamp(&self.unix_path, self.path_len)
    }
}

/// The strings of an exec record's `data[]`, split by their lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecStrings<'a> {
    /// The path as passed to execve.
    pub filename: &'a [u8],
    /// The executable's path components, leaf first, each NUL-terminated.
    pub exe: &'a [u8],
    /// The working directory's path components, leaf first, each NUL-terminated.
    pub cwd: &'a [u8],
    /// The argument area: arguments, each NUL-terminated (the last one may be cut).
    pub argv: &'a [u8],
}

impl ExecEvent {
    /// Splits `data` (the record after the fixed part, up to `hdr.size`) into its strings;
    /// `None` if the lengths add up to more than `data` holds.
    pub fn strings<'a>(&self, data: &'a [u8]) -> Option<ExecStrings<'a>> {
        let mut rest = data;
        Some(ExecStrings {
            filename: take(&mut rest, self.filename_len)?,
            exe: take(&mut rest, self.exe_len)?,
            cwd: take(&mut rest, self.cwd_len)?,
            argv: take(&mut rest, self.argv_len)?,
        })
    }
}

/// The next `len` bytes of `rest`.
fn take<'a>(rest: &mut &'a [u8], len: u16) -> Option<&'a [u8]> {
    let (head, tail) = rest.split_at_checked(usize::from(len))?;
    *rest = tail;
    Some(head)
}

fn clamp(bytes: &[u8], len: u16) -> &[u8] {
    &bytes[..usize::from(len).min(bytes.len())]
}

/// A ring-buffer record type.
///
/// # Safety
///
/// Implementors are `#[repr(C)]`, contain only integers and integer arrays (every bit pattern
/// is valid) and have no implicit padding (the layout test checks that the field sizes add up
/// to the struct size).
pub unsafe trait Record: Copy {
    /// `EventHeader::kind` of this record, or `None` for the header itself.
    const KIND: Option<u32>;

    /// Reads a record from the start of `bytes` (any alignment). `None` if `bytes` is too short.
    fn read(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: `bytes` holds at least size_of::<Self>() readable bytes (checked above),
        // read_unaligned has no alignment requirement, and every bit pattern is a valid Self
        // (trait contract).
        Some(unsafe { bytes.as_ptr().cast::<Self>().read_unaligned() })
    }

    /// The record's bytes, as the BPF program would have written them (for tests and replays).
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `self` is a valid reference to size_of::<Self>() initialized bytes: the type
        // has no implicit padding (trait contract), so every byte belongs to an initialized field.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(self).cast::<u8>(), size_of::<Self>())
        }
    }
}

// SAFETY: repr(C), u32/u64 fields only, no padding (layout test).
unsafe impl Record for EventHeader {
    const KIND: Option<u32> = None;
}
// SAFETY: repr(C), integer and u8-array fields only, explicit padding (layout test).
unsafe impl Record for ExecEvent {
    const KIND: Option<u32> = Some(EVENT_EXEC);
}
// SAFETY: repr(C), integer fields only, no padding (layout test).
unsafe impl Record for ForkEvent {
    const KIND: Option<u32> = Some(EVENT_FORK);
}
// SAFETY: repr(C), integer fields only, explicit padding (layout test).
unsafe impl Record for ExitEvent {
    const KIND: Option<u32> = Some(EVENT_EXIT);
}
// SAFETY: repr(C), integer and u8-array fields only, no padding (layout test).
unsafe impl Record for FileEvent {
    const KIND: Option<u32> = Some(EVENT_FILE);
}
// SAFETY: repr(C), integer and u8-array fields only, no padding (layout test).
unsafe impl Record for WriteEvent {
    const KIND: Option<u32> = Some(EVENT_WRITE);
}
// SAFETY: repr(C), integer and u8-array fields only, explicit padding (layout test).
unsafe impl Record for NetEvent {
    const KIND: Option<u32> = Some(EVENT_NET);
}
// SAFETY: repr(C), integer and u8-array fields only, no padding (layout test).
unsafe impl Record for SockEvent {
    const KIND: Option<u32> = Some(EVENT_SOCK);
}
// SAFETY: repr(C), integer fields only, explicit padding (layout test).
unsafe impl Record for DeniedEvent {
    const KIND: Option<u32> = Some(EVENT_DENIED);
}
// SAFETY: repr(C), integer fields only, no padding (layout test). Not a ring record: the
// `write_totals` map's key.
unsafe impl Record for WriteKey {
    const KIND: Option<u32> = None;
}
// SAFETY: repr(C), integer and u8-array fields only, explicit padding (layout test). The
// `write_totals` value.
unsafe impl Record for WriteTotal {
    const KIND: Option<u32> = None;
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    /// `(field, offset, size)`.
    type CField = (&'static str, usize, usize);
    /// `(struct, size, fields)`.
    type CStruct = (&'static str, usize, &'static [CField]);
    /// `(name, value)`.
    type CConstant = (&'static str, u64);

    /// What the C compiler reports for events.h (generated by build.rs from layout.c).
    mod c {
        include!(concat!(env!("OUT_DIR"), "/c_layout.rs"));
    }

    type Fields = Vec<(&'static str, usize, usize)>;

    const fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
        size_of::<F>()
    }

    /// `(C struct name, Rust size, [(C field name, Rust offset, Rust size)])`.
    macro_rules! mirror {
        ($c_struct:literal, $ty:ty { $($c_field:literal => $field:ident),* $(,)? }) => {
            (
                $c_struct,
                size_of::<$ty>(),
                vec![$(($c_field, offset_of!($ty, $field), field_size(|s: &$ty| &s.$field))),*],
            )
        };
    }

    fn rust_structs() -> Vec<(&'static str, usize, Fields)> {
        vec![
            mirror!("kiln_event_header", EventHeader {
                "type" => kind, "size" => size, "ktime_ns" => ktime_ns,
                "cgroup_id" => cgroup_id, "pid" => pid, "tgid" => tgid,
            }),
            mirror!("kiln_exec_event", ExecEvent {
                "hdr" => hdr, "start_ns" => start_ns, "ppid" => ppid, "uid" => uid,
                "gid" => gid, "euid" => euid, "egid" => egid, "argc" => argc, "flags" => flags,
                "filename_len" => filename_len, "argv_len" => argv_len, "exe_len" => exe_len,
                "cwd_len" => cwd_len, "_pad0" => pad0,
            }),
            mirror!("kiln_fork_event", ForkEvent {
                "hdr" => hdr, "parent_tgid" => parent_tgid, "child_tgid" => child_tgid,
                "child_start_ns" => child_start_ns,
            }),
            mirror!("kiln_exit_event", ExitEvent {
                "hdr" => hdr, "status" => status, "code" => code, "signal" => signal,
                "_pad0" => pad0, "start_ns" => start_ns,
            }),
            mirror!("kiln_file_event", FileEvent {
                "hdr" => hdr, "result" => result, "nr" => nr, "flags" => flags, "mode" => mode,
                "dirfd" => dirfd, "dirfd2" => dirfd2, "path_len" => path_len,
                "path2_len" => path2_len, "base_len" => base_len, "base2_len" => base2_len,
                "real_len" => real_len, "evflags" => evflags,
            }),
            mirror!("kiln_write_event", WriteEvent {
                "hdr" => hdr, "fd" => fd, "path_len" => path_len, "wflags" => wflags,
                "bytes" => bytes, "writes" => writes,
            }),
            mirror!("kiln_write_key", WriteKey {
                "cgroup_id" => cgroup_id, "tgid" => tgid, "fd" => fd,
            }),
            mirror!("kiln_write_total", WriteTotal {
                "bytes" => bytes, "writes" => writes, "file" => file, "inode" => inode,
                "path_len" => path_len,
                "wflags" => wflags, "_pad0" => pad0, "path" => path,
            }),
            mirror!("kiln_net_event", NetEvent {
                "hdr" => hdr, "result" => result, "nr" => nr, "family" => family, "port" => port,
                "addr" => addr, "addrlen" => addrlen, "path_len" => path_len, "_pad0" => pad0,
                "unix_path" => unix_path,
            }),
            mirror!("kiln_sock_event", SockEvent {
                "hdr" => hdr, "hook" => hook, "family" => family, "port" => port,
                "addr" => addr, "protocol" => protocol, "sock_type" => sock_type,
            }),
            mirror!("kiln_denied_event", DeniedEvent {
                "hdr" => hdr, "result" => result, "nr" => nr, "_pad0" => pad0,
            }),
        ]
    }

    fn rust_constants() -> Vec<(&'static str, u64)> {
        let usize_constants = [
            ("KILN_FILENAME_MAX", FILENAME_MAX),
            ("KILN_PATH_MAX", PATH_MAX),
            ("KILN_ARGV_MAX", ARGV_MAX),
            ("KILN_PATH_COMPONENTS_MAX", PATH_COMPONENTS_MAX),
            ("KILN_ARG_MAX", ARG_MAX),
            ("KILN_UNIX_PATH_MAX", UNIX_PATH_MAX),
        ];
        let data_constants = [
            ("KILN_EXEC_DATA_MAX", EXEC_DATA_MAX),
            ("KILN_FILE_DATA_MAX", FILE_DATA_MAX),
            ("KILN_WRITE_DATA_MAX", WRITE_DATA_MAX),
            ("KILN_FILTER_BITS", maps::FILTER_BITS as usize),
        ];
        let u32_constants = [
            ("KILN_EVENT_EXEC", EVENT_EXEC),
            ("KILN_EVENT_FORK", EVENT_FORK),
            ("KILN_EVENT_EXIT", EVENT_EXIT),
            ("KILN_EVENT_FILE", EVENT_FILE),
            ("KILN_EVENT_WRITE", EVENT_WRITE),
            ("KILN_EVENT_NET", EVENT_NET),
            ("KILN_EVENT_DENIED", EVENT_DENIED),
            ("KILN_EVENT_SOCK", EVENT_SOCK),
            ("KILN_SOCK_CONNECT4", SOCK_CONNECT4),
            ("KILN_SOCK_CONNECT6", SOCK_CONNECT6),
            ("KILN_SOCK_SENDMSG4", SOCK_SENDMSG4),
            ("KILN_SOCK_SENDMSG6", SOCK_SENDMSG6),
            ("KILN_EXEC_FILENAME_TRUNCATED", EXEC_FILENAME_TRUNCATED),
            ("KILN_EXEC_ARGV_TRUNCATED", EXEC_ARGV_TRUNCATED),
            ("KILN_EXEC_ARGV_FAULT", EXEC_ARGV_FAULT),
            ("KILN_EXEC_EXE_TRUNCATED", EXEC_EXE_TRUNCATED),
            ("KILN_EXEC_CWD_TRUNCATED", EXEC_CWD_TRUNCATED),
            ("KILN_EXEC_EXE_DETACHED", EXEC_EXE_DETACHED),
            ("KILN_EXEC_SCRIPT_DETACHED", EXEC_SCRIPT_DETACHED),
            ("KILN_FILE_PATH_TRUNCATED", u32::from(FILE_PATH_TRUNCATED)),
            ("KILN_FILE_PATH2_TRUNCATED", u32::from(FILE_PATH2_TRUNCATED)),
            ("KILN_FILE_BASE_TRUNCATED", u32::from(FILE_BASE_TRUNCATED)),
            ("KILN_FILE_BASE2_TRUNCATED", u32::from(FILE_BASE2_TRUNCATED)),
            ("KILN_FILE_REAL_TRUNCATED", u32::from(FILE_REAL_TRUNCATED)),
            ("KILN_FILE_PATH_FAULT", u32::from(FILE_PATH_FAULT)),
            ("KILN_FILE_HAS_BASE", u32::from(FILE_HAS_BASE)),
            ("KILN_FILE_HAS_BASE2", u32::from(FILE_HAS_BASE2)),
            ("KILN_FILE_HAS_REAL", u32::from(FILE_HAS_REAL)),
            ("KILN_FILE_ARGS_SHARED", u32::from(FILE_ARGS_SHARED)),
            ("KILN_FILE_FLAGS_KERNEL", u32::from(FILE_FLAGS_KERNEL)),
            ("KILN_FILE_REAL_DETACHED", u32::from(FILE_REAL_DETACHED)),
            ("KILN_FILE_BASE_DETACHED", u32::from(FILE_BASE_DETACHED)),
            (
                "KILN_PROG_INFO_RECURSION_MISSES_AT",
                u32::try_from(PROG_INFO_RECURSION_MISSES_AT).unwrap(),
            ),
        ];
        usize_constants
            .into_iter()
            .chain(data_constants)
            .map(|(name, value)| (name, value as u64))
            .chain(
                u32_constants
                    .into_iter()
                    .map(|(name, value)| (name, u64::from(value))),
            )
            .collect()
    }

    /// The C layout is missing only under KILN_SKIP_BPF=1; CI must never get here.
    fn c_layout_available() -> bool {
        if !c::C_STRUCTS.is_empty() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "built with KILN_SKIP_BPF=1 under CI=true: the layout test cannot run"
        );
        eprintln!("skipping: built with KILN_SKIP_BPF=1, no C layout to compare against");
        false
    }

    #[test]
    fn rust_mirrors_match_the_c_layout_of_events_h() {
        if !c_layout_available() {
            return;
        }
        let rust = rust_structs();
        assert_eq!(
            rust.iter().map(|s| s.0).collect::<Vec<_>>(),
            c::C_STRUCTS.iter().map(|s| s.0).collect::<Vec<_>>(),
            "every record in events.h needs a Rust mirror (and a line in layout.c)"
        );
        for ((name, rust_size, rust_fields), (_, c_size, c_fields)) in rust.iter().zip(c::C_STRUCTS)
        {
            assert_eq!(rust_size, c_size, "size of struct {name}");
            assert_eq!(
                &rust_fields[..],
                *c_fields,
                "fields (name, offset, size) of struct {name}"
            );
        }
    }

    #[test]
    fn mirrors_have_no_implicit_padding() {
        // Record::as_bytes relies on it: every byte belongs to a named field.
        for (name, size, fields) in rust_structs() {
            let covered: usize = fields.iter().map(|f| f.2).sum();
            assert_eq!(covered, size, "struct {name} has implicit padding");
            assert_eq!(
                size % 8,
                0,
                "struct {name}: ring records are 8-byte multiples"
            );
        }
    }

    #[test]
    fn constants_match_events_h() {
        if !c_layout_available() {
            return;
        }
        assert_eq!(rust_constants(), c::C_CONSTANTS);
    }

    #[test]
    fn bpf_object_is_embedded_unless_skipped() {
        if super::BPF_BUILT {
            assert_eq!(&super::OBSERVER_BPF[..4], b"\x7fELF");
            assert_eq!(super::OBSERVER_BPF.as_ptr().align_offset(8), 0);
        } else {
            assert!(super::OBSERVER_BPF.is_empty());
        }
    }

    #[test]
    fn floor_object_is_embedded_unless_skipped() {
        if super::BPF_BUILT {
            assert_eq!(&super::FLOOR_BPF[..4], b"\x7fELF");
            assert_eq!(super::FLOOR_BPF.as_ptr().align_offset(8), 0);
        } else {
            assert!(super::FLOOR_BPF.is_empty());
        }
    }

    #[test]
    fn records_round_trip_through_bytes() {
        let exit = ExitEvent {
            hdr: EventHeader {
                kind: EVENT_EXIT,
                size: size_of::<ExitEvent>() as u32,
                ktime_ns: 7,
                cgroup_id: 42,
                pid: 100,
                tgid: 100,
            },
            status: 2 << 8,
            code: 2,
            signal: 0,
            pad0: 0,
            start_ns: 3,
        };
        let mut bytes = vec![0xaa];
        bytes.extend_from_slice(exit.as_bytes());
        // Unaligned on purpose.
        assert_eq!(ExitEvent::read(&bytes[1..]), Some(exit));
        assert_eq!(EventHeader::read(&bytes[1..]), Some(exit.hdr));
        assert_eq!(ExitEvent::read(&bytes[1..bytes.len() - 1]), None);
    }
}

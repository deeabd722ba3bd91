//! Process-tree assembly: a pure function from decoded events to who ran what, under whom,
//! for how long, with which result.
//!
//! A node is one process incarnation (a pid from fork to exit). Its identity is
//! `(tgid, start_ns)`, so a pid reused within one trace is a new node even if the first
//! incarnation's exit was lost. A process whose fork was not observed (the step's first
//! process, moved into the cgroup before exec) starts at its first event and is a root unless
//! its parent is in the trace.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::time::Duration;

use super::event::{Event, Exec, Exit};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// CLOCK_MONOTONIC ns of the exit.
    pub ktime_ns: u64,
    /// Exit code, meaningful when `signal == 0`.
    pub code: u32,
    /// Terminating signal, 0 on a normal exit.
    pub signal: u32,
    pub core_dumped: bool,
}

/// One process incarnation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessNode {
    pub pid: u32,
    /// Parent pid as the kernel reported it (fork parent, or the exec's ppid).
    pub ppid: Option<u32>,
    /// Index of the parent in [`ProcessTree::nodes`], when the parent is in the trace.
    pub parent: Option<usize>,
    /// Indices of the children in [`ProcessTree::nodes`], in order of appearance.
    pub children: Vec<usize>,
    /// When the process was forked (CLOCK_MONOTONIC ns), if any event reported it.
    pub start_ns: Option<u64>,
    /// Whether its fork was observed.
    pub fork_observed: bool,
    /// Program images, in order: usually one; none for a forked child that never exec'd
    /// (a subshell), several when a process exec'd again (`sh -c 'exec ls'`).
    pub execs: Vec<Exec>,
    pub exit: Option<ExitStatus>,
}

impl ProcessNode {
    fn new(pid: u32, parent_pid: Option<u32>, start_ns: Option<u64>) -> Self {
        Self {
            pid,
            ppid: parent_pid,
            parent: None,
            children: Vec::new(),
            start_ns,
            fork_observed: false,
            execs: Vec::new(),
            exit: None,
        }
    }

    /// The image the process ran last.
    pub fn last_exec(&self) -> Option<&Exec> {
        self.execs.last()
    }

    /// The last image's arguments.
    pub fn argv(&self) -> Option<&[OsString]> {
        self.last_exec().map(|exec| exec.argv.as_slice())
    }

    /// From fork to exit, when both are known.
    pub fn duration(&self) -> Option<Duration> {
        let exit = self.exit?;
        Some(Duration::from_nanos(
            exit.ktime_ns.checked_sub(self.start_ns?)?,
        ))
    }
}

/// All processes of a trace, as a forest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessTree {
    /// Every process, in order of first appearance.
    pub nodes: Vec<ProcessNode>,
    /// Indices of the processes whose parent is not in the trace.
    pub roots: Vec<usize>,
}

impl ProcessTree {
    /// Assembles the tree from events in any order (they are ordered by time first).
    pub fn assemble(events: &[Event]) -> Self {
        let mut ordered: Vec<&Event> = events.iter().collect();
        ordered.sort_by_key(|event| event.header().ktime_ns); // stable: ties keep ring order
        let mut builder = Builder::default();
        for event in ordered {
            match event {
                Event::Fork(fork) => {
                    let child = builder.incarnation(
                        fork.child_tgid,
                        Some(fork.child_start_ns),
                        Some(fork.parent_tgid),
                    );
                    builder.tree.nodes[child].fork_observed = true;
                }
                Event::Exec(exec) => {
                    let node =
                        builder.incarnation(exec.header.tgid, Some(exec.start_ns), Some(exec.ppid));
                    builder.tree.nodes[node].execs.push(exec.as_ref().clone());
                }
                Event::Exit(exit) => builder.exit(exit),
                Event::File(_)
                | Event::Write(_)
                | Event::Net(_)
                | Event::Denied(_)
                | Event::Sock(_) => {}
            }
        }
        builder.tree
    }

    /// The processes, depth first from each root: `(depth, node)`.
    pub fn walk(&self) -> Vec<(usize, &ProcessNode)> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut stack: Vec<(usize, usize)> =
            self.roots.iter().rev().map(|&root| (0, root)).collect();
        while let Some((depth, index)) = stack.pop() {
            let node = &self.nodes[index];
            out.push((depth, node));
            stack.extend(node.children.iter().rev().map(|&child| (depth + 1, child)));
        }
        out
    }

    /// A human-readable tree: one line per process with argv, exit and duration.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (depth, node) in self.walk() {
            let command = match node.argv() {
                Some(argv) => argv
                    .iter()
                    .map(|arg| arg.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                None => "(forked, no exec)".to_owned(),
            };
            let exit = match node.exit {
                Some(ExitStatus {
                    signal: 0, code, ..
                }) => format!("exit {code}"),
                Some(ExitStatus { signal, .. }) => format!("signal {signal}"),
                None => "no exit observed".to_owned(),
            };
            let duration = node
                .duration()
                .map(|d| format!(", {:.3} ms", d.as_secs_f64() * 1e3))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{:indent$}{} {command} [{exit}{duration}]",
                "",
                node.pid,
                indent = depth * 2
            );
        }
        out
    }
}

#[derive(Default)]
struct Builder {
    tree: ProcessTree,
    /// tgid -> node of its latest incarnation.
    latest: HashMap<u32, usize>,
}

impl Builder {
    /// The node of process `tgid` started at `start_ns`: its latest incarnation if that one
    /// is still running and not contradicted by the start time, else a new node.
    fn incarnation(&mut self, tgid: u32, start_ns: Option<u64>, ppid: Option<u32>) -> usize {
        if let Some(&index) = self.latest.get(&tgid) {
            let node = &mut self.tree.nodes[index];
            let same_start = match (node.start_ns, start_ns) {
                (Some(known), Some(seen)) => known == seen,
                _ => true,
            };
            if node.exit.is_none() && same_start {
                node.start_ns = node.start_ns.or(start_ns);
                node.ppid = node.ppid.or(ppid);
                return index;
            }
        }
        let index = self.tree.nodes.len();
        self.tree.nodes.push(ProcessNode::new(tgid, ppid, start_ns));
        // The parent is the parent's running incarnation, if the trace has it.
        let parent = ppid
            .and_then(|ppid| self.latest.get(&ppid).copied())
            .filter(|&parent| self.tree.nodes[parent].exit.is_none());
        match parent {
            Some(parent) => {
                self.tree.nodes[index].parent = Some(parent);
                self.tree.nodes[parent].children.push(index);
            }
            None => self.tree.roots.push(index),
        }
        self.latest.insert(tgid, index);
        index
    }

    fn exit(&mut self, exit: &Exit) {
        let index = self.incarnation(exit.header.tgid, Some(exit.start_ns), None);
        self.tree.nodes[index].exit = Some(ExitStatus {
            ktime_ns: exit.header.ktime_ns,
            code: exit.code,
            signal: exit.signal,
            core_dumped: exit.core_dumped,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::observe::event::{Fork, Header};

    fn header(ktime_ns: u64, tgid: u32) -> Header {
        Header {
            ktime_ns,
            cgroup_id: 9,
            pid: tgid,
            tgid,
        }
    }

    fn fork(t: u64, parent: u32, child: u32) -> Event {
        Event::Fork(Fork {
            header: header(t, parent),
            parent_tgid: parent,
            child_tgid: child,
            child_start_ns: t,
        })
    }

    fn exec(t: u64, tgid: u32, parent: u32, start_ns: u64, argv: &[&str]) -> Event {
        Event::Exec(Box::new(Exec {
            header: header(t, tgid),
            ppid: parent,
            start_ns,
            uid: 0,
            gid: 0,
            euid: 0,
            egid: 0,
            filename: PathBuf::from(format!("/bin/{}", argv[0])),
            exe: PathBuf::from(format!("/usr/bin/{}", argv[0])),
            cwd: PathBuf::from("/"),
            argv: argv.iter().map(OsString::from).collect(),
            argc: argv.len() as u32,
            flags: 0,
        }))
    }

    fn exit(t: u64, pid: u32, start_ns: u64, code: u32) -> Event {
        Event::Exit(Exit {
            header: header(t, pid),
            code,
            signal: 0,
            core_dumped: false,
            start_ns,
        })
    }

    /// `sh -c 'echo a | tr a b; ls /'` as the kernel reports it: sh (moved into the cgroup
    /// before exec, so no fork) forks a subshell for echo and a child for tr, then execs ls.
    fn pipeline() -> Vec<Event> {
        vec![
            exec(100, 10, 1, 50, &["sh", "-c", "echo a | tr a b; ls /"]),
            fork(200, 10, 11),
            fork(210, 10, 12),
            exec(300, 12, 10, 210, &["tr", "a", "b"]),
            exit(400, 11, 200, 0),
            exit(500, 12, 210, 0),
            exec(600, 10, 1, 50, &["ls", "/"]),
            exit(900, 10, 50, 2),
        ]
    }

    #[test]
    fn pipeline_tree_has_parents_argv_exits_and_durations() {
        let tree = ProcessTree::assemble(&pipeline());
        assert_eq!(tree.roots, [0]);
        let sh = &tree.nodes[0];
        assert_eq!(sh.pid, 10);
        assert!(!sh.fork_observed);
        assert_eq!(sh.execs.len(), 2, "sh exec'd ls in place");
        assert_eq!(sh.argv().unwrap(), ["ls", "/"]);
        assert_eq!(sh.exit.unwrap().code, 2);
        assert_eq!(sh.duration(), Some(Duration::from_nanos(850)));
        let children: Vec<u32> = sh.children.iter().map(|&c| tree.nodes[c].pid).collect();
        assert_eq!(children, [11, 12]);
        let subshell = &tree.nodes[sh.children[0]];
        assert!(subshell.execs.is_empty() && subshell.fork_observed);
        let tr = &tree.nodes[sh.children[1]];
        assert_eq!(tr.argv().unwrap(), ["tr", "a", "b"]);
        assert_eq!(tr.parent, Some(0));
        assert_eq!(tr.duration(), Some(Duration::from_nanos(290)));
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let mut events = pipeline();
        events.reverse();
        assert_eq!(
            ProcessTree::assemble(&events),
            ProcessTree::assemble(&pipeline())
        );
    }

    #[test]
    fn a_reused_pid_is_a_new_process() {
        let events = vec![
            exec(100, 10, 1, 50, &["sh"]),
            fork(200, 10, 11),
            exit(300, 11, 200, 0),
            fork(400, 10, 11),
            exec(500, 11, 10, 400, &["true"]),
            // The exit of the second incarnation was lost; a third one shows up.
            exec(700, 11, 10, 650, &["false"]),
        ];
        let tree = ProcessTree::assemble(&events);
        let elevens: Vec<&ProcessNode> = tree.nodes.iter().filter(|n| n.pid == 11).collect();
        assert_eq!(elevens.len(), 3);
        assert!(elevens[0].execs.is_empty());
        assert_eq!(elevens[1].argv().unwrap(), ["true"]);
        assert_eq!(elevens[1].exit, None);
        assert_eq!(elevens[2].argv().unwrap(), ["false"]);
        assert_eq!(tree.nodes[0].children.len(), 3);
    }

    #[test]
    fn render_shows_the_tree() {
        let rendered = ProcessTree::assemble(&pipeline()).render();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("10 ls / [exit 2, "), "{rendered}");
        assert!(
            lines[1].starts_with("  11 (forked, no exec) [exit 0"),
            "{rendered}"
        );
        assert!(lines[2].starts_with("  12 tr a b [exit 0"), "{rendered}");
    }
}

//! How the proxy's listening socket gets from the step's network namespace into kilnd.
//!
//! A socket belongs to the network namespace it was created in, whoever holds it later. So the
//! sandbox's pid 1, right after it created the step's (empty) network namespace and mounted
//! `/proc`, brings `lo` up there, binds a TCP listener on [`PROXY_ADDR`] and sends it to kilnd
//! over a unix socketpair (`SCM_RIGHTS`) that kilnd passed as the helper's fd [`CHANNEL_FD`];
//! then it closes its copies and only then starts the step. kilnd accepts on the listener: the step's
//! connections arrive from inside its namespace, while kilnd's own outbound connections are made
//! from the host's. The step can reach nothing else: its namespace has no other interface, and
//! Landlock lets it connect to TCP port [`PROXY_ADDR`]'s port only.
//!
//! The listener exists before the step's first instruction (connections wait in its backlog until
//! kilnd accepts), so there is no start-up race.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

use crate::sandbox::sys;

/// Where a fetch step finds kilnd's proxy, inside its own network namespace.
pub const PROXY_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 3128);
/// The helper's fd of the channel kilnd receives the listener on.
pub const CHANNEL_FD: RawFd = 3;
/// Argument that tells the helper to create the listener and send it over [`CHANNEL_FD`].
pub const HELPER_ARG: &str = "--proxy-listener";

/// Handing the listener over failed (helper side: the step does not start).
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Fd [`CHANNEL_FD`] is not the socket kilnd should have passed.
    #[error("fd {CHANNEL_FD} is not a unix socket: kilnd did not pass the listener channel")]
    NoChannel,
    /// `lo` could not be brought up.
    #[error("bring up loopback in the step's network namespace: {0}")]
    Loopback(#[source] nix::Error),
    /// The listener could not be bound.
    #[error("bind the proxy listener on {PROXY_ADDR}: {0}")]
    Bind(#[source] io::Error),
    /// Sending it to kilnd failed.
    #[error("send the proxy listener to kilnd: {0}")]
    Send(#[source] nix::Error),
}

/// kilnd's end of the channel, and the end the helper gets as fd [`CHANNEL_FD`].
#[derive(Debug)]
pub struct ListenerChannel {
    kilnd_end: OwnedFd,
    helper_end: OwnedFd,
}

impl ListenerChannel {
    /// A fresh socketpair (both ends close-on-exec in kilnd).
    pub fn new() -> io::Result<Self> {
        let (kilnd_end, helper_end) = UnixStream::pair()?;
        Ok(Self {
            kilnd_end: kilnd_end.into(),
            helper_end: helper_end.into(),
        })
    }

    /// Makes the helper end fd [`CHANNEL_FD`] of the helper `command` starts (only there: it stays
    /// close-on-exec in kilnd, so no other child inherits it) and adds [`HELPER_ARG`].
    pub fn attach(&self, command: &mut tokio::process::Command) {
        let fd = self.helper_end.as_raw_fd();
        command.arg(HELPER_ARG);
        // SAFETY: the closure runs in the forked child before execve and calls only dup2/fcntl,
        // which are async-signal-safe; it allocates nothing and touches no lock.
        unsafe {
            command.pre_exec(move || {
                let res = if fd == CHANNEL_FD {
                    // dup2 onto itself would keep FD_CLOEXEC: clear it instead.
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    // dup2 gives the new fd no FD_CLOEXEC: it survives the execve.
                    libc::dup2(fd, CHANNEL_FD)
                };
                if res < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
        }
    }

    /// After the helper is spawned: closes kilnd's copy of the helper end (so a helper that dies
    /// before sending gives EOF) and waits, on a blocking thread, for the listener. `None` when
    /// the helper ended without sending one (its setup failure is in its outcome).
    pub async fn receive(self) -> io::Result<Option<tokio::net::TcpListener>> {
        drop(self.helper_end);
        let kilnd_end = self.kilnd_end;
        let listener = tokio::task::spawn_blocking(move || receive_fd(&kilnd_end))
            .await
            .map_err(io::Error::other)??;
        match listener {
            Some(fd) => {
                let listener = TcpListener::from(fd);
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener).map(Some)
            }
            None => Ok(None),
        }
    }
}

fn receive_fd(channel: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    let mut byte = [0_u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    loop {
        let message = match nix::sys::socket::recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => return Err(err.into()),
            Ok(message) => message,
        };
        if message.bytes == 0 {
            return Ok(None);
        }
        let mut received = None;
        for cmsg in message.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // SAFETY: the kernel just installed `fd` in this process for this message
                    // (MSG_CMSG_CLOEXEC); nothing else refers to it, so we own it.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if received.is_none() {
                        received = Some(owned);
                    }
                }
            }
        }
        return match received {
            Some(fd) if is_tcp_listener(&fd) => Ok(Some(fd)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the sandbox helper sent no listening TCP socket",
            )),
        };
    }
}

fn is_tcp_listener(fd: &OwnedFd) -> bool {
    use nix::sys::socket::{getsockopt, sockopt};
    getsockopt(fd, sockopt::AcceptConn).unwrap_or(false)
        && getsockopt(fd, sockopt::SockType).is_ok_and(|t| t == nix::sys::socket::SockType::Stream)
}

/// Whether kilnd asked this helper for a proxy listener.
pub fn requested() -> bool {
    std::env::args_os().skip(1).any(|arg| arg == HELPER_ARG)
}

/// Helper side, in the step's fresh network namespace (pid 1, still root, before the step
/// starts): `lo` up, listen on [`PROXY_ADDR`], send the listener to kilnd, close both.
pub fn hand_over() -> Result<(), ListenerError> {
    // stat through /proc follows the fd to its inode: a socket only if kilnd passed one.
    let is_socket = std::fs::metadata(format!("/proc/self/fd/{CHANNEL_FD}"))
        .is_ok_and(|meta| std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    if !is_socket {
        return Err(ListenerError::NoChannel);
    }
    // SAFETY: fd CHANNEL_FD is open (stat succeeded) and is a socket kilnd dup2'ed there for
    // this purpose; nothing else in the helper uses or closes it.
    let channel = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
    sys::loopback_up().map_err(ListenerError::Loopback)?;
    let listener = TcpListener::bind(PROXY_ADDR).map_err(ListenerError::Bind)?;
    let fds = [listener.as_raw_fd()];
    let mut sent = nix::sys::socket::sendmsg::<UnixAddr>(
        channel.as_raw_fd(),
        &[io::IoSlice::new(b"L")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    );
    while sent == Err(nix::errno::Errno::EINTR) {
        sent = nix::sys::socket::sendmsg::<UnixAddr>(
            channel.as_raw_fd(),
            &[io::IoSlice::new(b"L")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        );
    }
    sent.map_err(ListenerError::Send)?;
    // Dropping both closes the helper's copies: neither pid 1 nor the step inherits them.
    drop(listener);
    drop(channel);
    Ok(())
}

//! A file descriptor sent with a request over the admin socket
//! (`SCM_RIGHTS`): the stream a send writes or a receive reads, opened by
//! the client with its own rights (docs/design.md section 10).

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

/// Reads the request line and the descriptor sent with it, if any (one
/// `SCM_RIGHTS` message on the line's bytes). The client sends nothing
/// after the line, so reading past it cannot happen.
pub(super) fn read_request(conn: &UnixStream) -> std::io::Result<(String, Option<std::fs::File>)> {
    use std::os::fd::FromRawFd;
    let mut line = Vec::new();
    let mut fd = None;
    while !line.contains(&b'\n') && line.len() < (1 << 20) {
        let mut buf = [0u8; 4096];
        // Room for one control message with one descriptor (u64-aligned).
        let mut cbuf = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain old data; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        // SAFETY: valid socket, msghdr pointing at live buffers of the stated sizes.
        let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: the CMSG macros walk the control buffer recvmsg filled, within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const libc::c_int;
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<libc::c_int>();
                    for k in 0..count {
                        let raw = std::ptr::read_unaligned(data.add(k));
                        // Only the first is kept; others are closed by the drop.
                        let f = std::fs::File::from_raw_fd(raw);
                        if fd.is_none() {
                            fd = Some(f);
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n as usize]);
    }
    Ok((String::from_utf8_lossy(&line).into_owned(), fd))
}

/// Sends `msg` with descriptor `fd` attached (SCM_RIGHTS).
pub(super) fn send_with_fd(
    s: &UnixStream,
    msg: &[u8],
    fd: std::os::fd::RawFd,
) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain old data; every pointer set below outlives the call.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = &mut iov;
    m.msg_iovlen = 1;
    m.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE only computes a size.
    m.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as _;
    // SAFETY: the control buffer is large enough for one descriptor (checked
    // by CMSG_FIRSTHDR returning it); the header and data are written inside it.
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&m);
        if c.is_null() {
            return Err(std::io::Error::other("no room for the descriptor"));
        }
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::c_int, fd);
        libc::sendmsg(s.as_raw_fd(), &m, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The descriptor went with the first byte; the rest goes plainly.
    let mut w = s;
    w.write_all(&msg[n as usize..])
}

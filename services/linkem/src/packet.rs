//! An AF_PACKET raw socket bound to one interface: every frame that
//! arrives on it, read in batches (recvmmsg), and frames sent out of it as
//! they are (sendmmsg).
//!
//! The socket is promiscuous and ignores what the host itself sends on the
//! interface (PACKET_IGNORE_OUTGOING, and frames marked PACKET_OUTGOING are
//! skipped as well): a veth shows its outgoing frames to packet sockets, so
//! without this the emulator would read back what it forwards.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Largest frame read; a bigger one is reported truncated.
pub const FRAME_MAX: usize = 2048;

const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// A received frame's facts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Received {
    pub len: usize,
    /// `PACKET_HOST`, `PACKET_OUTGOING`, ... (linux/if_packet.h).
    pub pkttype: u8,
    pub truncated: bool,
}

impl Received {
    /// A frame the host sent itself (not one to forward).
    pub fn is_outgoing(&self) -> bool {
        self.pkttype == libc::PACKET_OUTGOING
    }
}

/// One interface's packet socket.
pub struct PacketSocket {
    fd: OwnedFd,
    pub iface: String,
    pub ifindex: i32,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points at a T of the given size for the call.
    check(unsafe {
        libc::setsockopt(fd, level, name, (value as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t)
    })
    .map(|_| ())
}

impl PacketSocket {
    /// Opens a non-blocking packet socket on `iface` (in the calling
    /// thread's network namespace).
    pub fn open(iface: &str) -> io::Result<PacketSocket> {
        let name = std::ffi::CString::new(iface)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name with a NUL"))?;
        // SAFETY: if_nametoindex reads a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("no interface {iface}")));
        }
        // Protocol 0 receives nothing until bind() names the interface, so
        // no frame of another interface slips in before it.
        // SAFETY: plain socket creation; the fd is owned below.
        let raw = check(unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: raw is a fresh, valid fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex;
        // SAFETY: addr is a valid sockaddr_ll of the given size.
        check(unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = ifindex;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        setsockopt(raw, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)?;
        // Older kernels lack it; the pkttype check still holds.
        let _ = setsockopt(raw, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &1 as &libc::c_int);
        let buf: libc::c_int = 8 << 20;
        for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
            if setsockopt(raw, libc::SOL_SOCKET, force, &buf).is_err() {
                setsockopt(raw, libc::SOL_SOCKET, plain, &buf)?;
            }
        }
        Ok(PacketSocket { fd, iface: iface.to_string(), ifindex })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads up to a batch of frames without blocking into `batch`;
    /// `Ok(0)` when none is waiting.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let n = batch.bufs.len();
        for i in 0..n {
            batch.iovs[i] = libc::iovec { iov_base: batch.bufs[i].as_mut_ptr().cast(), iov_len: batch.bufs[i].len() };
            let h = &mut batch.hdrs[i];
            h.msg_hdr.msg_name = (&mut batch.addrs[i] as *mut libc::sockaddr_ll).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            h.msg_hdr.msg_iov = &mut batch.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at a live buffer, iovec and address
        // of the batch, which outlives the call.
        let r = unsafe {
            libc::recvmmsg(self.fd(), batch.hdrs.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        let r = r as usize;
        for i in 0..r {
            batch.got[i] = Received {
                len: batch.hdrs[i].msg_len as usize,
                pkttype: batch.addrs[i].sll_pkttype,
                truncated: batch.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        Ok(r)
    }

    /// Sends up to a batch of frames as they are; returns how many the
    /// kernel took and the error of the frame at that index, if one failed.
    pub fn send_batch<'a>(
        &self,
        frames: impl IntoIterator<Item = &'a [u8]>,
        batch: &mut SendBatch,
    ) -> (usize, Option<io::Error>) {
        let mut n = 0;
        for f in frames.into_iter().take(batch.hdrs.len()) {
            batch.iovs[n] = libc::iovec { iov_base: f.as_ptr() as *mut _, iov_len: f.len() };
            n += 1;
        }
        if n == 0 {
            return (0, None);
        }
        for i in 0..n {
            batch.hdrs[i].msg_hdr.msg_iov = &mut batch.iovs[i];
            batch.hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live iovec over a frame the
        // caller keeps alive for the call.
        let r = unsafe { libc::sendmmsg(self.fd(), batch.hdrs.as_mut_ptr(), n as u32, libc::MSG_DONTWAIT) };
        if r < 0 {
            return (0, Some(io::Error::last_os_error()));
        }
        let sent = r as usize;
        if sent == n {
            return (n, None);
        }
        // sendmmsg keeps the error of the frame it stopped at for the next
        // call; a plain send of that frame tells it.
        let iov = batch.iovs[sent];
        // SAFETY: the iovec still points at the caller's live frame.
        let s = unsafe { libc::send(self.fd(), iov.iov_base, iov.iov_len, libc::MSG_DONTWAIT) };
        if s < 0 {
            (sent, Some(io::Error::last_os_error()))
        } else {
            (sent + 1, None)
        }
    }

    /// Frames the kernel dropped for this socket since the last call
    /// (PACKET_STATISTICS, which resets on reading).
    pub fn kernel_drops(&self) -> u64 {
        let mut st: libc::tpacket_stats = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: st and len are valid out pointers of the given size.
        let r = unsafe {
            libc::getsockopt(
                self.fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if r < 0 {
            0
        } else {
            st.tp_drops as u64
        }
    }
}

/// Buffers and headers for one recvmmsg, reused call after call; a buffer
/// may be swapped out for another of [`FRAME_MAX`] bytes between calls.
pub struct RecvBatch {
    pub bufs: Vec<Box<[u8]>>,
    pub got: Vec<Received>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_ll>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    pub fn new(n: usize) -> RecvBatch {
        RecvBatch {
            bufs: (0..n).map(|_| vec![0u8; FRAME_MAX].into_boxed_slice()).collect(),
            got: vec![Received::default(); n],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; n],
            // SAFETY: all-zero sockaddr_ll and mmsghdr are valid values.
            addrs: vec![unsafe { std::mem::zeroed() }; n],
            hdrs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
        }
    }
}

/// Headers for one sendmmsg of up to n frames, reused.
pub struct SendBatch {
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl SendBatch {
    pub fn new(n: usize) -> SendBatch {
        SendBatch {
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; n],
            // SAFETY: an all-zero mmsghdr is a valid value.
            hdrs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
        }
    }
}

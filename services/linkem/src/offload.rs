//! Turning a veth's offloads off (the SIOCETHTOOL ioctls `ethtool -K`
//! uses), so every frame crossing the emulator is a real, MTU-sized frame
//! with its checksum filled in.
//!
//! With offloads on, a veth hands its peer 64 KB TCP super-frames and
//! frames whose checksum is left for "the hardware"; a frame that AF_PACKET
//! reads and sends again would then arrive with a wrong checksum. The lab
//! turns them off on the nodes' side of an emulated link (where frames are
//! made) and linkem on its own interfaces.

use std::io;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETHTOOL_SGSO: u32 = 0x24;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_SSG: u32 = 0x19;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GTXCSUM: u32 = 0x16;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

fn ethtool(iface: &str, cmd: u32, data: u32) -> io::Result<u32> {
    if iface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {iface:?} is too long")));
    }
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: (&mut value as *mut EthtoolValue).cast(), _pad: [0; 16] };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a datagram socket for the ioctl, closed below; `req` points
    // at `value`, both live for the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut IfReq);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            return Err(err);
        }
    }
    Ok(value.data)
}

/// Turns off GRO, GSO, TSO, scatter-gather and transmit checksumming on
/// `iface` (in the calling thread's network namespace). A feature the
/// device cannot change is skipped; the transmit checksum must end up off.
pub fn disable(iface: &str) -> io::Result<()> {
    for cmd in [ETHTOOL_SGRO, ETHTOOL_SGSO, ETHTOOL_STSO, ETHTOOL_SSG, ETHTOOL_STXCSUM] {
        match ethtool(iface, cmd, 0) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{iface}: ethtool command {cmd:#x}: {e}"))),
        }
    }
    if tx_checksum(iface)? {
        return Err(io::Error::other(format!("{iface}: transmit checksumming is still on")));
    }
    Ok(())
}

/// Whether `iface` leaves transmit checksums to the device.
pub fn tx_checksum(iface: &str) -> io::Result<bool> {
    ethtool(iface, ETHTOOL_GTXCSUM, 0).map(|v| v != 0)
}

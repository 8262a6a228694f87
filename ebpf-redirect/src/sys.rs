//! The few bpf(2) commands aya 0.13 does not expose for our use: links we can pin (so capture
//! outlives the node-agent), attaching `sk_msg` to a map without a drop guard, and link info (so
//! a re-adopted or tampered link can be checked against the pod it should serve).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `enum bpf_attach_type` values used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    CgroupInetEgress = 1,
    CgroupSockOps = 3,
    SkMsgVerdict = 7,
    CgroupInet4Connect = 10,
    CgroupInet6Connect = 11,
    CgroupGetsockopt = 21,
    SkLookup = 36,
}

/// `union bpf_attr`, zeroed; only the leading fields of each command are written.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32_at(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, 8-aligned, zero-initialised 128-byte buffer laid out as the
    // kernel's `union bpf_attr` prefix for `cmd`, and its size is passed; any pointers written
    // into it (paths, info buffers) outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf returned an invalid fd"))?;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn raw(fd: impl AsFd) -> u32 {
    fd.as_fd().as_raw_fd() as u32
}

/// BPF_LINK_CREATE: attaches `prog` to `target` (a cgroup or netns fd) and returns the link.
pub fn link_create(prog: impl AsFd, target: impl AsFd, attach: AttachType) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32_at(0, raw(prog))
        .u32_at(4, raw(target))
        .u32_at(8, attach as u32);
    owned(bpf(BPF_LINK_CREATE, &mut attr)?)
}

/// BPF_PROG_ATTACH: attaches `prog` to `target` (used for sk_msg on a sockhash; the attachment
/// lives as long as the map).
pub fn prog_attach(prog: impl AsFd, target: impl AsFd, attach: AttachType) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32_at(0, raw(target))
        .u32_at(4, raw(prog))
        .u32_at(8, attach as u32);
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// BPF_OBJ_PIN: pins a map, program or link at `path` on a bpffs.
pub fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    let mut attr = Attr::new();
    attr.u64_at(0, p.as_ptr() as u64).u32_at(8, raw(fd));
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// BPF_OBJ_GET: opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = c_path(path)?;
    let mut attr = Attr::new();
    attr.u64_at(0, p.as_ptr() as u64);
    owned(bpf(BPF_OBJ_GET, &mut attr)?)
}

/// BPF_LINK_DETACH: detaches a link now, whoever else holds it.
pub fn link_detach(link: impl AsFd) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32_at(0, raw(link));
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// What a link is attached to, from `struct bpf_link_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// For cgroup links the cgroup id (0 once detached); for netns links the netns inode.
    pub target: u64,
}

pub fn link_info(link: impl AsFd, netns: bool) -> io::Result<LinkInfo> {
    let mut info = [0u8; 64];
    let mut attr = Attr::new();
    attr.u32_at(0, raw(link))
        .u32_at(4, info.len() as u32)
        .u64_at(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let u32_at = |o: usize| u32::from_ne_bytes([info[o], info[o + 1], info[o + 2], info[o + 3]]);
    let target = if netns {
        u64::from(u32_at(16))
    } else {
        let mut b = [0u8; 8];
        b.copy_from_slice(&info[16..24]);
        u64::from_ne_bytes(b)
    };
    Ok(LinkInfo {
        id: u32_at(4),
        prog_id: u32_at(8),
        target,
    })
}

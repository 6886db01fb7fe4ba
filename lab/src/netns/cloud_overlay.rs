//! [`LabOptions::cloud_overlay`]: the cloud LAN as a real cloud's network
//! is, with the pods on a Flannel-style VXLAN overlay over it.
//!
//! **The fabric.** The cloud LAN's switch delivers an IPv4 frame only when
//! its addresses are those of the hosts at its ends: a frame entering from
//! a host's port must carry that host's address as its source, and a frame
//! leaving by a port must carry that host's address as its destination
//! (nftables, bridge family, table `vpc` in `switch`, with counters). That
//! is AWS's source/destination check on every ENI, and what GCP's and
//! Azure's fabrics amount to for addresses no VPC route names: a packet
//! from a pod address, or to an edge pod address, sent to a node's MAC
//! vanishes. ARP passes.
//!
//! **The overlay.** Each cloud node (`relay`, `cloud2`, `apiserver`) has a
//! VTEP `flannel.1` (MTU 1450, its address the network address of its pod
//! CIDR as Flannel numbers them; the apiserver host gets the otherwise
//! unused `10.244.3.0/24`), a permanent neighbour entry for every other
//! node's VTEP address with that VTEP's MAC, and the route `<other node's
//! pod CIDR> via <its VTEP address> dev flannel.1 onlink`, exactly as
//! Flannel's VXLAN backend installs them; the host-gw routes of the
//! default topology are not installed. This kernel has no `vxlan` link
//! type, so `flannel.1` is a TAP device and the encapsulation is done by a
//! thread per node: a frame the kernel sends out of `flannel.1` is looked
//! up by destination MAC in a static FDB (the other VTEPs' MACs → their
//! nodes' LAN addresses; no learning, no flooding, as Flannel's
//! `nolearning` device) and sent as VXLAN (RFC 7348 header, VNI 1) in UDP
//! to port 8472 of that node's LAN address; what arrives on that port is
//! written back into `flannel.1`. The outer packet is node to node, so the
//! fabric passes it; the inner one never touches the fabric.
//!
//! With the option on, nothing routes the edge ranges on `cloud2` or the
//! apiserver host: a test runs the route agent where it needs them.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use super::{NetnsLab, Role, APISERVER_IP, CLOUD2_LAN_IP, CPOD1_CIDR, CPOD2_CIDR, RELAY_LAN_IP};

/// The VTEP device on every cloud node, named as Flannel names it.
pub const VTEP_DEV: &str = "flannel.1";
/// The VXLAN UDP port (Flannel's default, the Linux one).
pub const VXLAN_PORT: u16 = 8472;
/// The VXLAN header of every frame: flags "VNI present", VNI 1.
const VXLAN_HEADER: [u8; 8] = [0x08, 0, 0, 0, 0, 0, 1, 0];

/// One cloud node's end of the overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vtep {
    /// The node.
    pub role: Role,
    /// Its cloud-LAN address: where its VXLAN packets come from and go.
    pub lan: Ipv4Addr,
    /// Its pod CIDR.
    pub pod_cidr: &'static str,
    /// Its VTEP's address (the pod CIDR's network address).
    pub addr: Ipv4Addr,
    /// Its VTEP's MAC.
    pub mac: [u8; 6],
}

/// The overlay's nodes.
pub const VTEPS: [Vtep; 3] = [
    Vtep {
        role: Role::Relay,
        lan: RELAY_LAN_IP,
        pod_cidr: CPOD1_CIDR,
        addr: Ipv4Addr::new(10, 244, 1, 0),
        mac: [0x0e, 0xed, 0, 0, 0, 1],
    },
    Vtep {
        role: Role::Cloud2,
        lan: CLOUD2_LAN_IP,
        pod_cidr: CPOD2_CIDR,
        addr: Ipv4Addr::new(10, 244, 2, 0),
        mac: [0x0e, 0xed, 0, 0, 0, 2],
    },
    Vtep {
        role: Role::Apiserver,
        lan: APISERVER_IP,
        pod_cidr: "10.244.3.0/24",
        addr: Ipv4Addr::new(10, 244, 3, 0),
        mac: [0x0e, 0xed, 0, 0, 0, 3],
    },
];

/// The cloud LAN's switch ports and the one address each host has there.
const FABRIC_PORTS: [(&str, Ipv4Addr); 3] = [
    ("relay", RELAY_LAN_IP),
    ("cloud2", CLOUD2_LAN_IP),
    ("apisrv", APISERVER_IP),
];

/// The encapsulator threads of a lab with the overlay: each stops when
/// told (or when its sender is dropped).
pub(super) type Encapsulator = (oneshot::Sender<()>, JoinHandle<Result<()>>);

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl NetnsLab {
    /// The fabric's rules and every node's VTEP, neighbours and routes
    /// (the module docs). Called once the cloud LAN and pods exist.
    pub(super) fn build_cloud_overlay(&mut self) -> Result<()> {
        let mut rules = String::new();
        for (port, ip) in FABRIC_PORTS {
            rules += &format!(
                "    iifname \"{port}\" ip saddr != {ip} counter drop\n\
                 \x20   oifname \"{port}\" ip daddr != {ip} counter drop\n"
            );
        }
        self.nft(
            Role::Switch,
            &format!(
                "table bridge vpc {{\n\
                   chain forward {{\n\
                     type filter hook forward priority filter; policy accept;\n\
                 {rules}\
                   }}\n\
                 }}\n"
            ),
        )?;
        for v in VTEPS {
            let enc = self.encapsulator(v)?;
            self.encapsulators.push(enc);
            self.ip(
                v.role,
                &format!("link set {VTEP_DEV} address {}", mac_text(v.mac)),
            )?;
            self.ip(v.role, &format!("link set {VTEP_DEV} mtu 1450 up"))?;
            self.ip(v.role, &format!("addr add {}/32 dev {VTEP_DEV}", v.addr))?;
            for peer in VTEPS.iter().filter(|p| p.role != v.role) {
                self.ip(
                    v.role,
                    &format!(
                        "neigh add {} lladdr {} dev {VTEP_DEV} nud permanent",
                        peer.addr,
                        mac_text(peer.mac)
                    ),
                )?;
                self.ip(
                    v.role,
                    &format!(
                        "route add {} via {} dev {VTEP_DEV} onlink",
                        peer.pod_cidr, peer.addr
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// IPv4 frames the fabric has dropped so far (a lab without
    /// [`super::LabOptions::cloud_overlay`]: an error).
    pub fn fabric_drops(&self) -> Result<u64> {
        let out = self.exec(Role::Switch, &["nft", "list", "table", "bridge", "vpc"])?;
        Ok(out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum())
    }

    /// Stops the encapsulators (their TAP devices go with them).
    pub(super) fn stop_encapsulators(&mut self) {
        for (stop, join) in self.encapsulators.drain(..) {
            let _ = stop.send(());
            match join.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("netns lab: VXLAN encapsulator: {e:#}"),
                Err(_) => eprintln!("netns lab: VXLAN encapsulator panicked"),
            }
        }
    }

    /// Starts `v`'s encapsulator in its node; returns once `flannel.1`
    /// exists there.
    fn encapsulator(&self, v: Vtep) -> Result<Encapsulator> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = oneshot::channel();
        // The static FDB: the other VTEPs' MACs → their nodes.
        let fdb: BTreeMap<[u8; 6], Ipv4Addr> = VTEPS
            .iter()
            .filter(|p| p.role != v.role)
            .map(|p| (p.mac, p.lan))
            .collect();
        let join = self.spawn_in(v.role, move || async move {
            let set_up = async {
                let tap = open_tap(VTEP_DEV)?;
                let udp = UdpSocket::bind(SocketAddrV4::new(v.lan, VXLAN_PORT))
                    .await
                    .context("VXLAN socket")?;
                anyhow::Ok((tap, udp))
            };
            let (tap, udp) = match set_up.await {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            let _ = ready_tx.send(Ok(()));
            forward(tap, udp, fdb, stop_rx).await
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok((stop_tx, join)),
            Ok(Err(e)) => Err(e.context(format!("VTEP on {}", v.role))),
            Err(_) => bail!("VTEP on {} not ready within 10 s", v.role),
        }
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the
/// first member of the union that makes up the rest of its 40 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    pad: [u8; 22],
}

/// A TAP device `name` in this thread's network namespace, non-blocking,
/// frames without a packet-information header. It lives as long as the
/// returned file.
#[allow(unsafe_code)]
fn open_tap(name: &str) -> Result<AsyncFd<File>> {
    use nix::libc;
    ensure!(name.len() < 16, "interface name {name:?} too long");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .context("open /dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        // Both flags fit in the C `short` the kernel reads.
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as i16,
        pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` at the pointer;
    // `req` has its size and field offsets (see IfReq) and outlives the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("TUNSETIFF {name}"));
    }
    // Deprecated because an arbitrary `AsRawFd` may close or swap its
    // descriptor while registered; a `File` owned by the `AsyncFd` cannot.
    #[allow(deprecated)]
    let fd = AsyncFd::new(f).context("registering the TAP device")?;
    Ok(fd)
}

/// Moves frames between the TAP device and VXLAN until `stop`.
async fn forward(
    tap: AsyncFd<File>,
    udp: UdpSocket,
    fdb: BTreeMap<[u8; 6], Ipv4Addr>,
    mut stop: oneshot::Receiver<()>,
) -> Result<()> {
    // Header room in front of the frame, so it is sent without a copy.
    let mut out = vec![0u8; 8 + 65_536];
    let mut inb = vec![0u8; 8 + 65_536];
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            g = tap.readable() => {
                let mut g = g?;
                let n = match g.try_io(|t| (&mut t.get_ref()).read(&mut out[8..])) {
                    Ok(r) => r.context("reading flannel.1")?,
                    Err(_would_block) => continue,
                };
                if n < 14 {
                    continue;
                }
                let mut dst = [0u8; 6];
                dst.copy_from_slice(&out[8..14]);
                // Broadcast, multicast (IPv6 neighbour discovery) and
                // unknown MACs go nowhere: the FDB is static, no flooding.
                let Some(node) = fdb.get(&dst) else { continue };
                out[..8].copy_from_slice(&VXLAN_HEADER);
                // A send that fails is a lost packet, as on a wire.
                let _ = udp.send_to(&out[..8 + n], SocketAddrV4::new(*node, VXLAN_PORT)).await;
            }
            r = udp.recv_from(&mut inb) => {
                let (n, _) = r.context("VXLAN socket")?;
                if n < 8 + 14 || inb[..8] != VXLAN_HEADER {
                    continue;
                }
                // A full TAP queue drops the frame, as a NIC's ring would.
                let _ = (&mut tap.get_ref()).write(&inb[8..n]);
            }
        }
    }
}

//! Reads the kernel's connection tracking table (ctnetlink over a `NETLINK_NETFILTER`
//! socket) to find the real ends of connections that network address translation
//! rewrote: the backend behind a Service address (DNAT), the client behind a
//! masquerading address (SNAT). No kprobes: conntrack answers lookups by tuple.
//!
//! Conntrack is per network namespace and a netlink socket belongs to the namespace it
//! was created in, so lookups run on a thread of their own that enters the namespace
//! where the translation happened (`setns` moves the calling thread only), once per
//! namespace per batch. Reading conntrack needs `CAP_NET_ADMIN`.
use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{Context, Result};
use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple},
};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use tokio::sync::oneshot;

use crate::model::FastMap;

use super::{RequestThread, netns};

/// A TCP connection's addresses as conntrack keys them, in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// Which of an entry's two tuples a lookup names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// As the client sent its first packet: finds where it really went (DNAT).
    Original,
    /// As the server answers: finds who really sent it (SNAT).
    Reply,
}

/// One lookup: a tuple, and the namespaces (inode numbers) to look in, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatQuery {
    pub tuple: FlowTuple,
    pub direction: Direction,
    pub namespaces: Vec<u32>,
}

/// A conntrack entry: the tuple of each direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatEntry {
    pub original: FlowTuple,
    pub reply: FlowTuple,
}

impl NatEntry {
    /// The server that answers is not the one the client addressed.
    pub fn translates_destination(&self) -> bool {
        self.reply.src != self.original.dst
    }

    /// The server answers an address that is not the client's.
    pub fn translates_source(&self) -> bool {
        self.reply.dst != self.original.src
    }
}

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatAnswer {
    /// An entry that translates in the query's direction, and where it was.
    Translated(NatEntry),
    /// Entries, none of them translating.
    Untranslated,
    /// No entry in any namespace asked (never tracked, or gone).
    Missing,
}

enum Request {
    Lookup(Vec<NatQuery>, oneshot::Sender<Result<Vec<NatAnswer>>>),
    Addresses(oneshot::Sender<Result<FastMap<IpAddr, u32>>>),
}

/// The lookup thread. Dropping it stops the thread.
pub struct NatReader(RequestThread<Request>);

impl NatReader {
    pub fn spawn() -> Result<Self> {
        let mut paths = NamespacePaths::default();
        RequestThread::spawn("conntrack", move |request| match request {
            Request::Lookup(queries, reply) => {
                let _ = reply.send(lookup_all(&queries, &mut paths));
            }
            Request::Addresses(reply) => {
                paths.refresh();
                let _ = reply.send(addresses_of_every_namespace(&mut paths));
            }
        })
        .map(NatReader)
    }

    /// One answer per query, in order.
    pub async fn lookup(&self, queries: Vec<NatQuery>) -> Result<Vec<NatAnswer>> {
        self.0.ask(|reply| Request::Lookup(queries, reply)).await?
    }

    /// Every address configured in a network namespace of this host (loopback
    /// excluded), with its namespace; an address found in two namespaces is left out,
    /// because it does not say which one translated.
    pub async fn local_addresses(&self) -> Result<FastMap<IpAddr, u32>> {
        self.0.ask(Request::Addresses).await?
    }
}

/// Where each network namespace can be opened, kept between lookups: listing them
/// scans `/proc`, which on a node with many processes costs milliseconds. Read again
/// when a namespace is not found where it was (at most once per round of lookups).
#[derive(Default)]
struct NamespacePaths {
    by_inode: BTreeMap<u64, std::path::PathBuf>,
}

impl NamespacePaths {
    fn refresh(&mut self) {
        self.by_inode = netns::namespaces();
    }

    /// The namespace `inode`, opened; `None` when it is gone.
    fn open(&mut self, inode: u32, refreshed: &mut bool) -> Option<(File, std::path::PathBuf)> {
        loop {
            // A cached `/proc/<pid>/ns/net` may now be another process's: the inode
            // of what was opened must be the one asked for.
            let found = self.by_inode.get(&u64::from(inode)).and_then(|path| {
                let file = File::open(path).ok()?;
                let meta = file.metadata().ok()?;
                (std::os::unix::fs::MetadataExt::ino(&meta) == u64::from(inode))
                    .then(|| (file, path.clone()))
            });
            if found.is_some() || *refreshed {
                return found;
            }
            *refreshed = true;
            self.refresh();
        }
    }
}

/// Runs `work` inside each namespace of `wanted` (inode numbers), coming back to our
/// own after each. A namespace that is gone is skipped; failing to come back is fatal.
fn in_namespaces(
    paths: &mut NamespacePaths,
    wanted: impl IntoIterator<Item = u32>,
    mut work: impl FnMut(u32) -> Result<()>,
) -> Result<()> {
    let home = File::open("/proc/thread-self/ns/net").context("opening own network namespace")?;
    let home_inode = std::os::unix::fs::MetadataExt::ino(
        &home.metadata().context("reading own network namespace")?,
    ) as u32;
    let mut refreshed = false;
    for inode in wanted {
        if inode == home_inode {
            work(inode)?;
            continue;
        }
        let Some((ns, path)) = paths.open(inode, &mut refreshed) else {
            continue;
        };
        netns::enter(&ns).with_context(|| format!("entering {}", path.display()))?;
        let result = work(inode);
        netns::enter(&home).context("returning to own network namespace")?;
        result?;
    }
    Ok(())
}

/// Answers every query, entering each namespace once per round (a query's first
/// namespace, then its second for those still untranslated).
fn lookup_all(queries: &[NatQuery], paths: &mut NamespacePaths) -> Result<Vec<NatAnswer>> {
    let mut answers = vec![NatAnswer::Missing; queries.len()];
    let rounds = queries
        .iter()
        .map(|q| q.namespaces.len())
        .max()
        .unwrap_or(0);
    for round in 0..rounds {
        let mut by_namespace: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, query) in queries.iter().enumerate() {
            if matches!(answers[i], NatAnswer::Translated(_)) {
                continue;
            }
            if let Some(ns) = query.namespaces.get(round) {
                by_namespace.entry(*ns).or_default().push(i);
            }
        }
        in_namespaces(
            paths,
            by_namespace.keys().copied().collect::<Vec<_>>(),
            |ns| {
                let mut table = ConntrackSocket::open()?;
                let asked = &by_namespace[&ns];
                let tuples: Vec<(FlowTuple, Direction)> = asked
                    .iter()
                    .map(|&i| (queries[i].tuple, queries[i].direction))
                    .collect();
                for (&i, entry) in asked.iter().zip(table.get_many(&tuples)?) {
                    let Some(entry) = entry else { continue };
                    let translates = match queries[i].direction {
                        Direction::Original => entry.translates_destination(),
                        Direction::Reply => entry.translates_source(),
                    };
                    answers[i] = if translates {
                        NatAnswer::Translated(entry)
                    } else {
                        NatAnswer::Untranslated
                    };
                }
                Ok(())
            },
        )?;
    }
    Ok(answers)
}

/// A ctnetlink socket in the calling thread's namespace.
struct ConntrackSocket {
    socket: Socket,
    sequence: u32,
    buf: Vec<u8>,
}

/// A reply to one lookup is a few hundred bytes.
const REPLY_BUFFER: usize = 16 * 1024;
const ENOENT: i32 = 2;

impl ConntrackSocket {
    fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| {
            if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) {
                anyhow::anyhow!(
                    "this kernel has no netfilter netlink (nfnetlink and nf_conntrack_netlink \
                     are not loaded: nothing uses conntrack on this node)"
                )
            } else {
                anyhow::Error::new(e).context("opening a netfilter netlink socket")
            }
        })?;
        socket
            .bind_auto()
            .context("binding the netfilter netlink socket")?;
        set_receive_timeout(&socket, Duration::from_secs(1))?;
        Ok(ConntrackSocket {
            socket,
            sequence: 0,
            buf: Vec::with_capacity(REPLY_BUFFER),
        })
    }

    /// The entry each tuple names in its direction, if there is one. Requests go out
    /// [`REQUESTS_PER_SEND`] to a `send` (the kernel answers each message of a buffer in
    /// turn), so a lookup costs one `recv` and a share of one `send`.
    fn get_many(&mut self, tuples: &[(FlowTuple, Direction)]) -> Result<Vec<Option<NatEntry>>> {
        let mut out = Vec::with_capacity(tuples.len());
        let mut request = Vec::new();
        for chunk in tuples.chunks(REQUESTS_PER_SEND) {
            let first = self.sequence.wrapping_add(1);
            request.clear();
            for (tuple, direction) in chunk {
                self.sequence = self.sequence.wrapping_add(1);
                let message = get_request(*tuple, *direction, self.sequence);
                let at = request.len();
                request.resize(at + message.buffer_len(), 0);
                message.serialize(&mut request[at..]);
            }
            self.socket
                .send(&request, 0)
                .context("sending conntrack lookups")?;
            let mut answers: Vec<Option<Option<NatEntry>>> = vec![None; chunk.len()];
            let mut pending = chunk.len();
            while pending > 0 {
                self.buf.clear();
                self.buf.reserve(REPLY_BUFFER);
                let len = self
                    .socket
                    .recv(&mut self.buf, 0)
                    .context("reading conntrack replies")?;
                let mut at = 0;
                while at + NETLINK_HEADER_LEN <= len {
                    let reply = NetlinkMessage::<NetfilterMessage>::deserialize(&self.buf[at..len])
                        .context("parsing a conntrack reply")?;
                    let size = (reply.header.length as usize).max(NETLINK_HEADER_LEN);
                    at += size.next_multiple_of(4);
                    // An answer to a lookup of an earlier batch that timed out: not ours.
                    let index = reply.header.sequence_number.wrapping_sub(first) as usize;
                    let Some(slot) = answers.get_mut(index) else {
                        continue;
                    };
                    if slot.is_none() {
                        pending -= 1;
                    }
                    *slot = Some(entry_of_reply(reply.payload)?);
                }
            }
            out.extend(answers.into_iter().map(Option::flatten));
        }
        Ok(out)
    }
}

/// Lookups sent in one buffer: their replies (a few hundred bytes each) must fit the
/// socket's receive buffer while they are read.
const REQUESTS_PER_SEND: usize = 64;
const NETLINK_HEADER_LEN: usize = 16;

/// An `IPCTNL_MSG_CT_GET` request for the entry `tuple` names in `direction`.
fn get_request(
    tuple: FlowTuple,
    direction: Direction,
    sequence: u32,
) -> NetlinkMessage<NetfilterMessage> {
    let family = match tuple.src.ip() {
        IpAddr::V4(_) => NetfilterProtoFamily::IPv4,
        IpAddr::V6(_) => NetfilterProtoFamily::IPv6,
    };
    let attribute = match direction {
        Direction::Original => ConntrackAttribute::CtaTupleOrig(tuple_attributes(tuple)),
        Direction::Reply => ConntrackAttribute::CtaTupleReply(tuple_attributes(tuple)),
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            ConntrackMessage::Get(vec![attribute]),
        )),
    );
    message.finalize();
    message
}

/// The entry in a reply; `None` when there is none (`ENOENT`).
fn entry_of_reply(payload: NetlinkPayload<NetfilterMessage>) -> Result<Option<NatEntry>> {
    match payload {
        NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
            ..
        }) => Ok(entry_of(&attributes)),
        NetlinkPayload::Error(error) => match error.code {
            Some(code) if -code.get() == ENOENT => Ok(None),
            Some(code) => {
                Err(std::io::Error::from_raw_os_error(-code.get())).context("conntrack lookup")
            }
            None => Ok(None),
        },
        _ => Ok(None),
    }
}

fn tuple_attributes(tuple: FlowTuple) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(tuple.src.ip()),
            IPTuple::DestinationAddress(tuple.dst.ip()),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::Tcp),
            ProtoTuple::SourcePort(tuple.src.port()),
            ProtoTuple::DestinationPort(tuple.dst.port()),
        ]),
    ]
}

/// Both tuples of an entry, when the reply holds them.
fn entry_of(attributes: &[ConntrackAttribute]) -> Option<NatEntry> {
    let tuple = |parts: &[Tuple]| -> Option<FlowTuple> {
        let (mut src, mut dst, mut sport, mut dport) = (None, None, None, None);
        for part in parts {
            match part {
                Tuple::Ip(ips) => {
                    for ip in ips {
                        match ip {
                            IPTuple::SourceAddress(a) => src = Some(*a),
                            IPTuple::DestinationAddress(a) => dst = Some(*a),
                            _ => {}
                        }
                    }
                }
                Tuple::Proto(protos) => {
                    for proto in protos {
                        match proto {
                            ProtoTuple::SourcePort(p) => sport = Some(*p),
                            ProtoTuple::DestinationPort(p) => dport = Some(*p),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Some(FlowTuple {
            src: SocketAddr::new(src?, sport?),
            dst: SocketAddr::new(dst?, dport?),
        })
    };
    let mut original = None;
    let mut reply = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(parts) => original = tuple(parts),
            ConntrackAttribute::CtaTupleReply(parts) => reply = tuple(parts),
            _ => {}
        }
    }
    Some(NatEntry {
        original: original?,
        reply: reply?,
    })
}

/// A lookup never waits long: the kernel answers within the send, but a reply lost
/// to a full socket buffer must not hang the thread.
fn set_receive_timeout(socket: &Socket, timeout: Duration) -> Result<()> {
    let value = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket fd and a timeval that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const value).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting the netlink receive timeout");
    }
    Ok(())
}

/// Addresses of every namespace's interfaces (see [`NatReader::local_addresses`]).
fn addresses_of_every_namespace(paths: &mut NamespacePaths) -> Result<FastMap<IpAddr, u32>> {
    let mut found: HashMap<IpAddr, Option<u32>> = HashMap::new();
    let inodes: Vec<u32> = paths.by_inode.keys().map(|i| *i as u32).collect();
    in_namespaces(paths, inodes, |ns| {
        for addr in interface_addresses()? {
            found
                .entry(addr)
                .and_modify(|owner| {
                    if *owner != Some(ns) {
                        *owner = None;
                    }
                })
                .or_insert(Some(ns));
        }
        Ok(())
    })?;
    Ok(found
        .into_iter()
        .filter_map(|(addr, ns)| Some((addr, ns?)))
        .collect())
}

/// The non-loopback addresses of the calling thread's namespace.
fn interface_addresses() -> Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing interface addresses");
    }
    let mut out = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        // SAFETY: ifa_addr is null or points at a sockaddr of the family it names.
        if let Some(addr) = unsafe { sockaddr_ip(entry.ifa_addr) } {
            if !addr.is_loopback() {
                out.push(addr);
            }
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// # Safety
/// `addr` is null or points at a valid sockaddr whose family field tells its type.
unsafe fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: per the contract, the family says which sockaddr type this is.
    unsafe {
        match i32::from((*addr).sa_family) {
            libc::AF_INET => {
                let v4 = &*addr.cast::<libc::sockaddr_in>();
                Some(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()))
            }
            libc::AF_INET6 => {
                let v6 = &*addr.cast::<libc::sockaddr_in6>();
                Some(IpAddr::from(v6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(src: &str, dst: &str) -> FlowTuple {
        FlowTuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    #[test]
    fn an_entry_says_which_end_was_translated() {
        let dnat = NatEntry {
            original: tuple("10.0.0.2:40000", "10.96.0.10:80"),
            reply: tuple("10.0.1.5:8080", "10.0.0.2:40000"),
        };
        assert!(dnat.translates_destination() && !dnat.translates_source());
        let snat = NatEntry {
            original: tuple("10.0.0.2:40000", "10.0.2.9:80"),
            reply: tuple("10.0.2.9:80", "10.0.2.1:61000"),
        };
        assert!(!snat.translates_destination() && snat.translates_source());
    }

    /// The request is what `conntrack -G` sends, and a reply's tuples are read back.
    #[test]
    fn tuples_round_trip_through_ctnetlink_attributes() {
        let original = tuple("10.0.0.2:40000", "10.96.0.10:80");
        let reply = tuple("10.0.1.5:8080", "10.0.0.2:40000");
        let attributes = vec![
            ConntrackAttribute::CtaTupleOrig(tuple_attributes(original)),
            ConntrackAttribute::CtaTupleReply(tuple_attributes(reply)),
            ConntrackAttribute::CtaMark(7),
        ];
        assert_eq!(entry_of(&attributes), Some(NatEntry { original, reply }));
        assert_eq!(entry_of(&attributes[..1]), None);
    }
}

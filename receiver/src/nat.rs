//! Which connections need their real ends read from conntrack, and what the answers
//! mean for their links. A client that dialled a Service address is counted under the
//! backend the kernel translated it to (DNAT), with the dialled address kept; a server
//! whose client arrived through a masquerading namespace on this host is counted under
//! the real client, or left to that client's own report when it is on this host too.
//!
//! Pure logic over plain records and answers: the lookups themselves are
//! `capture::conntrack`'s. Lookups are batched once per interval, only for connections
//! not yet counted in a link, and only for destinations not known to be untranslated,
//! so that steady pod-to-pod traffic costs one lookup per destination per
//! [`DESTINATION_TTL`], not one per connection. A destination not known yet is probed
//! first with one connection (its newest) before its other connections are looked up:
//! the first interval of a busy node, or a new destination taking thousands of
//! connections a second, costs one lookup when it is not translated, not thousands.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use ridley_ebpf::SockRecord;

use crate::{
    aggregate::{ConnId, ip},
    capture::{
        OpenedAs, RecordExt,
        conntrack::{Direction, FlowTuple, NatAnswer, NatQuery},
    },
    model::{FastMap, FastSet, shrink_after_burst},
};

/// How long a destination's answer (translated or not) is trusted: a new Service
/// address is rarely one that was dialled untranslated a minute before.
pub const DESTINATION_TTL: Duration = Duration::from_secs(60);
/// Destinations remembered at most (about 64 bytes each). When full, unknown
/// destinations are looked up per connection until entries expire.
pub const MAX_DESTINATIONS: usize = 16_384;

/// What conntrack told about one connection, applied when it is first keyed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// A client end: the server that really answered, instead of the dialled address.
    Backend(SocketAddr),
    /// A server end: the client behind the masquerading address.
    Client(IpAddr),
    /// A server end whose real client is on this host: the client's socket reports it.
    LeftToClient,
}

/// One lookup asked for a connection, and how to read its answer.
#[derive(Clone, Debug)]
pub struct Pending {
    pub conn: ConnId,
    pub query: NatQuery,
    cache_key: CacheKey,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    netns: u32,
    direction: DirectionKey,
    /// The masquerading address (SNAT), unspecified for DNAT.
    client: IpAddr,
    server: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum DirectionKey {
    Original,
    Reply,
}

#[derive(Clone, Copy, Debug)]
struct Known {
    translated: bool,
    until: Duration,
}

/// Decides lookups and reads answers; counts what could not be resolved.
pub struct NatResolver {
    host_netns: u32,
    max_lookups: usize,
    destinations: FastMap<CacheKey, Known>,
    /// Addresses of this host's namespaces (see `NatReader::local_addresses`).
    local_addresses: FastMap<IpAddr, u32>,
    /// Connections to a translated destination whose entry was gone (or unreadable)
    /// when looked up: counted under the dialled address.
    pub unresolved: u64,
    /// Connections not looked up because the interval's lookups were used up.
    pub over_limit: u64,
    /// Lookups asked this interval.
    asked: usize,
}

impl NatResolver {
    pub fn new(host_netns: u32, max_lookups: usize) -> Self {
        NatResolver {
            host_netns,
            max_lookups,
            destinations: FastMap::default(),
            local_addresses: FastMap::default(),
            unresolved: 0,
            over_limit: 0,
            asked: 0,
        }
    }

    pub fn set_local_addresses(&mut self, addresses: FastMap<IpAddr, u32>) {
        self.local_addresses = addresses;
    }

    /// A new interval: lookups may be asked again.
    pub fn start_interval(&mut self, now: Duration) {
        self.asked = 0;
        // Every interval, not only when full: a node whose destinations change (new
        // pods, new ports) would otherwise keep every answer of the last hours up to the
        // bound, and its memory would climb for as long (a visible slope in the soak).
        self.destinations.retain(|_, known| known.until > now);
        // And the capacity a burst of destinations grew it to.
        shrink_after_burst!(self.destinations);
    }

    /// The lookup a connection that is about to be keyed needs, if any. `None` also
    /// when the interval's lookups are used up (counted): it is keyed as it is. Called
    /// per close record: nothing is allocated unless a lookup is asked.
    pub fn lookup_for(&mut self, rec: &SockRecord, now: Duration) -> Option<Pending> {
        let local = SocketAddr::new(ip(rec.local_addr), rec.local_port);
        let remote = SocketAddr::new(ip(rec.remote_addr), rec.remote_port);
        if remote.ip().is_loopback() || remote.ip().is_unspecified() {
            return None;
        }
        let cache_key = match rec.opened_as() {
            OpenedAs::Client => CacheKey {
                netns: rec.netns,
                direction: DirectionKey::Original,
                client: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                server: remote,
            },
            OpenedAs::Server => {
                // Only a client address that another namespace of this host owns can
                // be that namespace's masquerade.
                let owner = *self.local_addresses.get(&remote.ip())?;
                if owner == rec.netns {
                    return None;
                }
                CacheKey {
                    netns: owner,
                    direction: DirectionKey::Reply,
                    client: remote.ip(),
                    server: local,
                }
            }
            OpenedAs::Unknown => return None,
        };
        if let Some(known) = self.destinations.get(&cache_key) {
            if known.until > now && !known.translated {
                return None;
            }
        }
        if self.asked >= self.max_lookups {
            self.over_limit += 1;
            return None;
        }
        self.asked += 1;
        let (direction, namespaces) = match cache_key.direction {
            // The client's namespace (a rule written there, or a host-network client),
            // then the host's, where kube-proxy translates pods' traffic.
            DirectionKey::Original if rec.netns != self.host_netns => {
                (Direction::Original, vec![rec.netns, self.host_netns])
            }
            DirectionKey::Original => (Direction::Original, vec![rec.netns]),
            DirectionKey::Reply => (Direction::Reply, vec![cache_key.netns]),
        };
        Some(Pending {
            conn: ConnId::of(rec),
            query: NatQuery {
                tuple: FlowTuple {
                    src: local,
                    dst: remote,
                },
                direction,
                namespaces,
            },
            cache_key,
        })
    }

    /// Splits an interval's lookups into those to ask first and those that wait for a
    /// probe: every lookup whose destination is known translated is asked at once, and of
    /// each destination not known, the newest connection (the last in `pending`: its
    /// conntrack entry is the likeliest still there) probes for the others.
    pub fn split_probes(
        &self,
        pending: Vec<Pending>,
        now: Duration,
    ) -> (Vec<Pending>, Vec<Pending>) {
        let mut probed = FastSet::default();
        let mut first = Vec::new();
        let mut waiting = Vec::new();
        for p in pending.into_iter().rev() {
            let known_translated = self
                .destinations
                .get(&p.cache_key)
                .is_some_and(|k| k.translated && k.until > now);
            if known_translated || probed.insert(p.cache_key) {
                first.push(p);
            } else {
                waiting.push(p);
            }
        }
        first.reverse();
        waiting.reverse();
        (first, waiting)
    }

    /// The waiting lookups worth asking once the probes are answered: those whose
    /// destination's probe found a translation. An untranslated probe, or one whose entry
    /// is gone (no translation without conntrack, which keeps a closed connection's
    /// entry for minutes), settles its destination as `translations` remembers it.
    pub fn after_probes(
        probes: &[Pending],
        answers: &[NatAnswer],
        waiting: Vec<Pending>,
    ) -> Vec<Pending> {
        let translated: FastSet<CacheKey> = probes
            .iter()
            .zip(answers)
            .filter(|(_, answer)| matches!(answer, NatAnswer::Translated(_)))
            .map(|(p, _)| p.cache_key)
            .collect();
        waiting
            .into_iter()
            .filter(|p| translated.contains(&p.cache_key))
            .collect()
    }

    /// Reads the answers to `pending` (in order); `answers` is `None` when the lookups
    /// failed as a whole. A real client whose address is one of this host's reports the
    /// connection itself (`LeftToClient`).
    pub fn translations(
        &mut self,
        pending: &[Pending],
        answers: Option<&[NatAnswer]>,
        now: Duration,
    ) -> FastMap<ConnId, Translation> {
        let mut out = FastMap::default();
        for (i, p) in pending.iter().enumerate() {
            let known_translated = self
                .destinations
                .get(&p.cache_key)
                .is_some_and(|k| k.translated);
            let Some(answer) = answers.and_then(|a| a.get(i)) else {
                if known_translated {
                    self.unresolved += 1;
                }
                continue;
            };
            let translated = match answer {
                NatAnswer::Translated(entry) => {
                    let translation = match p.query.direction {
                        Direction::Original => Translation::Backend(entry.reply.src),
                        Direction::Reply => {
                            let client = entry.original.src.ip();
                            if self.local_addresses.contains_key(&client) {
                                Translation::LeftToClient
                            } else {
                                Translation::Client(client)
                            }
                        }
                    };
                    out.insert(p.conn, translation);
                    true
                }
                NatAnswer::Untranslated => false,
                NatAnswer::Missing => {
                    if known_translated {
                        self.unresolved += 1;
                    }
                    // Gone before it was read: keep what was known.
                    known_translated
                }
            };
            self.remember(p.cache_key, translated, now);
        }
        out
    }

    fn remember(&mut self, key: CacheKey, translated: bool, now: Duration) {
        if self.destinations.len() >= MAX_DESTINATIONS && !self.destinations.contains_key(&key) {
            return;
        }
        self.destinations.insert(
            key,
            Known {
                translated,
                until: now + DESTINATION_TTL,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use ridley_ebpf::{flags, role};

    use super::*;
    use crate::{aggregate::v4, capture::conntrack::NatEntry};

    const HOST: u32 = 1;
    const POD: u32 = 2;
    const ROUTER: u32 = 3;

    fn record(opened: u8, local: ([u8; 4], u16), remote: ([u8; 4], u16), sk: u64) -> SockRecord {
        SockRecord {
            sk,
            start_ns: sk,
            netns: POD,
            role: opened,
            flags: flags::TRACKED,
            local_addr: v4(local.0),
            local_port: local.1,
            remote_addr: v4(remote.0),
            remote_port: remote.1,
            ..SockRecord::default()
        }
    }

    fn client(sk: u64, dst: [u8; 4]) -> SockRecord {
        record(
            role::CLIENT,
            ([10, 0, 0, 2], 40000 + sk as u16),
            (dst, 80),
            sk,
        )
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn dnat(backend: &str) -> NatAnswer {
        NatAnswer::Translated(NatEntry {
            original: FlowTuple {
                src: sa("10.0.0.2:40001"),
                dst: sa("10.96.0.10:80"),
            },
            reply: FlowTuple {
                src: sa(backend),
                dst: sa("10.0.0.2:40001"),
            },
        })
    }

    #[test]
    fn a_client_is_looked_up_in_its_namespace_then_the_hosts() {
        let mut nat = NatResolver::new(HOST, 100);
        let p = nat
            .lookup_for(&client(1, [10, 96, 0, 10]), Duration::ZERO)
            .unwrap();
        assert_eq!(p.query.namespaces, vec![POD, HOST]);
        assert_eq!(p.query.direction, Direction::Original);
        assert_eq!(p.query.tuple.dst, sa("10.96.0.10:80"));
        let got = nat.translations(
            std::slice::from_ref(&p),
            Some(&[dnat("10.0.1.5:8080")]),
            Duration::ZERO,
        );
        assert_eq!(got[&p.conn], Translation::Backend(sa("10.0.1.5:8080")));
    }

    #[test]
    fn an_untranslated_destination_is_not_looked_up_again_until_it_expires() {
        let mut nat = NatResolver::new(HOST, 100);
        let p = nat
            .lookup_for(&client(1, [10, 0, 0, 9]), Duration::ZERO)
            .unwrap();
        assert!(
            nat.translations(&[p], Some(&[NatAnswer::Untranslated]), Duration::ZERO)
                .is_empty()
        );
        assert!(
            nat.lookup_for(&client(2, [10, 0, 0, 9]), Duration::from_secs(59))
                .is_none()
        );
        assert!(
            nat.lookup_for(&client(3, [10, 0, 0, 9]), DESTINATION_TTL)
                .is_some()
        );
    }

    #[test]
    fn a_translated_destination_is_looked_up_per_connection_and_a_vanished_entry_counted() {
        let mut nat = NatResolver::new(HOST, 100);
        let p = nat
            .lookup_for(&client(1, [10, 96, 0, 10]), Duration::ZERO)
            .unwrap();
        nat.translations(&[p], Some(&[dnat("10.0.1.5:8080")]), Duration::ZERO);
        let p = nat
            .lookup_for(&client(2, [10, 96, 0, 10]), Duration::from_secs(1))
            .unwrap();
        let got = nat.translations(&[p], Some(&[NatAnswer::Missing]), Duration::from_secs(1));
        assert!(got.is_empty());
        assert_eq!(nat.unresolved, 1);
        // Still known translated: the next connection is looked up too.
        assert!(
            nat.lookup_for(&client(3, [10, 96, 0, 10]), Duration::from_secs(2))
                .is_some()
        );
        // A failed batch counts the translated destinations' connections only.
        let p = nat
            .lookup_for(&client(4, [10, 96, 0, 10]), Duration::from_secs(2))
            .unwrap();
        let q = nat
            .lookup_for(&client(5, [10, 0, 0, 77]), Duration::from_secs(2))
            .unwrap();
        nat.translations(&[p, q], None, Duration::from_secs(2));
        assert_eq!(nat.unresolved, 2);
    }

    /// A destination not known yet is probed by its newest connection: untranslated (or
    /// without an entry), its other connections are not looked up; translated, they are.
    /// A destination known translated is looked up per connection at once.
    #[test]
    fn an_unknown_destination_is_probed_by_its_newest_connection_first() {
        let mut nat = NatResolver::new(HOST, 100);
        let now = Duration::ZERO;
        let pending: Vec<Pending> = (1..=7)
            .map(|sk| {
                let dst = if sk <= 4 {
                    [10, 96, 0, 10]
                } else {
                    [10, 0, 0, 9]
                };
                nat.lookup_for(&client(sk, dst), now).unwrap()
            })
            .collect();
        let (probes, waiting) = nat.split_probes(pending.clone(), now);
        let conns = |ps: &[Pending]| ps.iter().map(|p| p.conn).collect::<Vec<_>>();
        assert_eq!(conns(&probes), vec![pending[3].conn, pending[6].conn]);
        assert_eq!(waiting.len(), 5);
        for (answer, kept) in [
            (dnat("10.0.1.5:8080"), 3),
            (NatAnswer::Untranslated, 0),
            (NatAnswer::Missing, 0),
        ] {
            let answers = [answer, NatAnswer::Untranslated];
            let rest = NatResolver::after_probes(&probes, &answers, waiting.clone());
            assert_eq!(conns(&rest), conns(&waiting[..kept]), "{answers:?}");
        }
        nat.translations(
            &probes,
            Some(&[dnat("10.0.1.5:8080"), NatAnswer::Untranslated]),
            now,
        );
        let again: Vec<Pending> = (8..=9)
            .map(|sk| nat.lookup_for(&client(sk, [10, 96, 0, 10]), now).unwrap())
            .collect();
        let (probes, waiting) = nat.split_probes(again, now);
        assert_eq!((probes.len(), waiting.len()), (2, 0));
    }

    /// The destination table holds at most `MAX_DESTINATIONS`: past it a new
    /// destination is not remembered (it is looked up again, within the lookup limit),
    /// and expired entries make room at the next interval.
    #[test]
    fn the_destination_table_is_bounded_and_expired_entries_make_room() {
        let mut nat = NatResolver::new(HOST, usize::MAX);
        let to = |i: usize| {
            let dst = [10, 1, (i >> 8) as u8, i as u8];
            record(
                role::CLIENT,
                ([10, 0, 0, 2], 40000),
                (dst, 80 + (i >> 16) as u16),
                i as u64,
            )
        };
        let untranslated = |nat: &mut NatResolver, i: usize, now: Duration| {
            let p = nat.lookup_for(&to(i), now).expect("a lookup");
            nat.translations(&[p], Some(&[NatAnswer::Untranslated]), now);
        };
        for i in 0..MAX_DESTINATIONS {
            untranslated(&mut nat, i, Duration::ZERO);
        }
        assert_eq!(nat.destinations.len(), MAX_DESTINATIONS);
        let extra = MAX_DESTINATIONS + 1;
        untranslated(&mut nat, extra, Duration::ZERO);
        assert_eq!(nat.destinations.len(), MAX_DESTINATIONS);
        assert!(
            nat.lookup_for(&to(extra), Duration::ZERO).is_some(),
            "not remembered: asked again"
        );
        assert!(
            nat.lookup_for(&to(0), Duration::ZERO).is_none(),
            "remembered"
        );
        assert!(nat.destinations.capacity() >= MAX_DESTINATIONS);
        nat.start_interval(DESTINATION_TTL);
        assert!(nat.destinations.is_empty());
        // The full table's memory is given back once its entries have expired.
        assert!(
            nat.destinations.capacity() < 2 * 1024,
            "{}",
            nat.destinations.capacity()
        );
    }

    #[test]
    fn expired_answers_are_dropped_at_the_next_interval_even_when_the_table_is_not_full() {
        let mut nat = NatResolver::new(HOST, 100);
        let p = nat
            .lookup_for(&client(1, [10, 0, 0, 9]), Duration::ZERO)
            .unwrap();
        nat.translations(&[p], Some(&[NatAnswer::Untranslated]), Duration::ZERO);
        nat.start_interval(Duration::from_secs(59));
        assert_eq!(nat.destinations.len(), 1);
        nat.start_interval(DESTINATION_TTL);
        assert!(nat.destinations.is_empty());
    }

    #[test]
    fn lookups_beyond_the_interval_limit_are_counted_and_not_asked() {
        let mut nat = NatResolver::new(HOST, 2);
        let now = Duration::ZERO;
        assert!(nat.lookup_for(&client(1, [10, 96, 0, 10]), now).is_some());
        assert!(nat.lookup_for(&client(2, [10, 96, 0, 10]), now).is_some());
        assert!(nat.lookup_for(&client(3, [10, 96, 0, 10]), now).is_none());
        assert_eq!(nat.over_limit, 1);
        nat.start_interval(now);
        assert!(nat.lookup_for(&client(4, [10, 96, 0, 10]), now).is_some());
    }

    #[test]
    fn a_server_whose_client_is_a_local_masquerade_is_mapped_back_or_left_to_the_client() {
        let mut nat = NatResolver::new(HOST, 100);
        let server = |sk| {
            record(
                role::SERVER,
                ([10, 0, 2, 2], 80),
                ([10, 0, 2, 1], 61000),
                sk,
            )
        };
        // The masquerading address is not known yet: no lookup.
        assert!(nat.lookup_for(&server(1), Duration::ZERO).is_none());
        nat.set_local_addresses(FastMap::from_iter([
            ("10.0.2.1".parse().unwrap(), ROUTER),
            ("10.0.1.2".parse().unwrap(), 7),
        ]));
        let p = nat.lookup_for(&server(2), Duration::ZERO).unwrap();
        assert_eq!(p.query.namespaces, vec![ROUTER]);
        assert_eq!(p.query.direction, Direction::Reply);
        let masqueraded = |client: &str| {
            NatAnswer::Translated(NatEntry {
                original: FlowTuple {
                    src: sa(client),
                    dst: sa("10.0.2.2:80"),
                },
                reply: FlowTuple {
                    src: sa("10.0.2.2:80"),
                    dst: sa("10.0.2.1:61000"),
                },
            })
        };
        let got = nat.translations(
            std::slice::from_ref(&p),
            Some(&[masqueraded("10.0.1.2:5555")]),
            Duration::ZERO,
        );
        assert_eq!(got[&p.conn], Translation::LeftToClient);
        let p = nat.lookup_for(&server(3), Duration::ZERO).unwrap();
        let got = nat.translations(
            std::slice::from_ref(&p),
            Some(&[masqueraded("192.0.2.7:5555")]),
            Duration::ZERO,
        );
        assert_eq!(
            got[&p.conn],
            Translation::Client("192.0.2.7".parse().unwrap())
        );
    }
}

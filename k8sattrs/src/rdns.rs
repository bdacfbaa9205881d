//! Optional reverse DNS for addresses outside the cluster: cached, bounded, and never
//! on the data path. A lookup that is not cached yet is queued to a background task
//! and the address keeps its number until the answer arrives.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

/// Lookups waiting at most; more are dropped (and asked again next interval).
const PENDING: usize = 256;

struct Entry {
    name: Option<String>,
    at: Instant,
}

#[derive(Clone)]
pub struct ReverseDns {
    cache: Arc<Mutex<HashMap<IpAddr, Entry>>>,
    queue: mpsc::Sender<IpAddr>,
    ttl: Duration,
}

/// Asks the system resolver (`/etc/hosts`, DNS PTR records) for `addr`'s name.
pub fn lookup(addr: IpAddr) -> Option<String> {
    let sockaddr = SocketAddr::new(addr, 0);
    let (storage, len) = socket_addr_to_c(&sockaddr);
    let mut host = [0 as libc::c_char; libc::NI_MAXHOST as usize];
    // SAFETY: storage holds a valid sockaddr of `len` bytes and `host` is a writable
    // buffer of the length passed; NI_NAMEREQD makes failure mean "no name".
    let rc = unsafe {
        libc::getnameinfo(
            &storage as *const libc::sockaddr_storage as *const libc::sockaddr,
            len,
            host.as_mut_ptr(),
            host.len() as libc::socklen_t,
            std::ptr::null_mut(),
            0,
            libc::NI_NAMEREQD,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: getnameinfo wrote a NUL-terminated string into `host`.
    let name = unsafe { std::ffi::CStr::from_ptr(host.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

fn socket_addr_to_c(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

impl ReverseDns {
    /// Starts the background resolver. At most `max_entries` answers (names and
    /// misses) are kept, each for `ttl`.
    pub fn start(max_entries: usize, ttl: Duration) -> ReverseDns {
        let cache: Arc<Mutex<HashMap<IpAddr, Entry>>> = Arc::default();
        let (queue, mut pending) = mpsc::channel::<IpAddr>(PENDING);
        let filled = cache.clone();
        tokio::spawn(async move {
            while let Some(addr) = pending.recv().await {
                let name = tokio::task::spawn_blocking(move || lookup(addr))
                    .await
                    .unwrap_or(None);
                let mut cache = filled.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= max_entries {
                    cache.retain(|_, e| e.at.elapsed() < ttl);
                }
                if cache.len() < max_entries {
                    cache.insert(
                        addr,
                        Entry {
                            name,
                            at: Instant::now(),
                        },
                    );
                }
            }
        });
        ReverseDns { cache, queue, ttl }
    }

    /// The cached name of `addr`; a miss (or an expired answer) queues a lookup.
    pub fn name(&self, addr: IpAddr) -> Option<String> {
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = cache.get(&addr) {
                if entry.at.elapsed() < self.ttl {
                    return entry.name.clone();
                }
            }
        }
        // Full queue: asked again next interval.
        let _ = self.queue.try_send(addr);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_the_hosts_file() {
        // Every Debian system maps 127.0.0.1 to localhost in /etc/hosts.
        assert_eq!(
            lookup("127.0.0.1".parse().unwrap()).as_deref(),
            Some("localhost")
        );
    }

    #[tokio::test]
    async fn answers_from_the_cache_after_a_background_lookup() {
        let dns = ReverseDns::start(10, Duration::from_secs(60));
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(dns.name(addr), None, "first ask only queues the lookup");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(name) = dns.name(addr) {
                assert_eq!(name, "localhost");
                break;
            }
            assert!(Instant::now() < deadline, "lookup never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

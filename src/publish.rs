//! One [`Publisher`], many [`Reader`]s over a single `ArcSwapOption<Snapshot>`.
//!
//! Owns: the one cell the request path reads. The proxy loads it once per request (and once
//! per TLS handshake); sources publish whole snapshots. An equal snapshot is not swapped, so
//! readers never see a pointless change. May import: model only.
//!
//! A snapshot that stops serving is freed by the publisher, never by a request: requests hold
//! the snapshot they loaded until they finish, and whichever drops the last reference pays for
//! freeing it, 10 ms for a 10 000-Ingress snapshot (1 ms for its backend table alone), which
//! on a worker thread would stall every connection it serves. So the publisher keeps each
//! replaced snapshot and frees it in [`Publisher::release`] once no reader holds it.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;

use crate::model::Snapshot;

/// Create the cell: a publisher for the rebuild loop, readers for the proxy and admin.
pub fn channel() -> (Publisher, Reader) {
    let cell = Arc::new(ArcSwapOption::empty());
    let publisher = Publisher {
        cell: cell.clone(),
        retired: Mutex::default(),
    };
    (publisher, Reader { cell })
}

/// Writes snapshots. There is one per process.
#[derive(Debug)]
pub struct Publisher {
    cell: Arc<ArcSwapOption<Snapshot>>,
    /// Replaced snapshots that readers may still hold; see the module doc.
    retired: Mutex<Vec<Arc<Snapshot>>>,
}

/// What [`Publisher::publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The snapshot differed from the current one and is now serving.
    Swapped,
    /// Equal to the current snapshot: nothing changed for readers.
    Unchanged,
}

impl Publisher {
    /// Publish `snapshot` unless it equals the one serving.
    pub fn publish(&self, snapshot: Snapshot) -> Published {
        if let Some(current) = self.cell.load().as_deref()
            && same_snapshot(current, &snapshot)
        {
            return Published::Unchanged;
        }
        // `swap` settles arc-swap's outstanding borrows of the old value before it returns, so
        // from here on its strong count is exact, and no reader can load it again.
        if let Some(old) = self.cell.swap(Some(Arc::new(snapshot))) {
            self.lock_retired().push(old);
        }
        self.release();
        Published::Swapped
    }

    /// Free the replaced snapshots no reader holds any more, here, on the caller's thread;
    /// returns how many are still held (the rebuild loop calls again while any are).
    pub fn release(&self) -> usize {
        let mut retired = self.lock_retired();
        // Only the list holds a snapshot whose count is 1, and nothing can clone it now.
        retired.retain(|s| Arc::strong_count(s) > 1);
        retired.len()
    }

    fn lock_retired(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Snapshot>>> {
        // A plain list: a panic elsewhere cannot leave it inconsistent.
        self.retired.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The snapshot serving now, if any.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.cell.load_full()
    }

    /// A reader over the same cell.
    pub fn reader(&self) -> Reader {
        Reader {
            cell: self.cell.clone(),
        }
    }
}

/// `a == b`, but each part compared by pointer first: an endpoint-only rebuild shares the host
/// and TLS tables of the serving snapshot, and `HostTable` (50 000 routes at issue 6's scale) is
/// only `PartialEq`, so `Arc`'s `==` would compare it field by field on every build.
fn same_snapshot(a: &Snapshot, b: &Snapshot) -> bool {
    fn same<T: PartialEq>(x: &Arc<T>, y: &Arc<T>) -> bool {
        Arc::ptr_eq(x, y) || **x == **y
    }
    // Backends first: after an endpoint-only rebuild they are the part most likely to differ.
    same(&a.backends, &b.backends) && same(&a.hosts, &b.hosts) && same(&a.tls, &b.tls)
}

/// Reads snapshots; cheap to clone, shared across worker threads.
#[derive(Debug, Clone)]
pub struct Reader {
    cell: Arc<ArcSwapOption<Snapshot>>,
}

impl Reader {
    /// The serving snapshot; `None` until the first one is published. Callers load once per
    /// request and use that one value throughout, so a request never mixes two snapshots.
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.cell.load_full()
    }

    /// True once a first snapshot serves.
    pub fn is_ready(&self) -> bool {
        self.cell.load().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot with one backend named `name`: distinct names make distinct snapshots.
    fn snapshot(name: &str) -> Snapshot {
        use crate::model::{Backend, BackendKey, BackendTable, ServicePortRef};
        Snapshot {
            backends: Arc::new(BackendTable {
                backends: vec![Backend {
                    key: BackendKey {
                        namespace: Arc::from("default"),
                        service: Arc::from(name),
                        port: ServicePortRef::Number(80),
                    },
                    endpoints: Arc::from(Vec::new()),
                    draining_fallback: false,
                    health_check: None,
                }],
            }),
            ..Snapshot::default()
        }
    }

    #[test]
    fn a_replaced_snapshot_is_freed_by_the_publisher_not_by_its_last_reader() {
        let (p, r) = channel();
        assert_eq!(p.publish(snapshot("a")), Published::Swapped);
        let held = r.load().expect("published");
        let a = Arc::downgrade(&held);
        assert_eq!(p.publish(snapshot("b")), Published::Swapped);
        assert_eq!(
            p.release(),
            1,
            "a request still holds the replaced snapshot"
        );
        // The request finishes: its drop only lowers the count, nothing is freed there.
        drop(held);
        assert!(a.upgrade().is_some());
        assert_eq!(p.release(), 0);
        assert!(a.upgrade().is_none(), "freed by release");
        // A snapshot nobody holds is freed by the publish that replaces it.
        let b = Arc::downgrade(&r.load().expect("published"));
        assert_eq!(p.publish(snapshot("c")), Published::Swapped);
        assert!(b.upgrade().is_none());
        assert_eq!(p.release(), 0);
    }

    #[test]
    fn unchanged_snapshot_is_not_swapped() {
        let (p, r) = channel();
        assert!(!r.is_ready());
        assert_eq!(p.publish(Snapshot::default()), Published::Swapped);
        let first = r.load().expect("published");
        assert_eq!(p.publish(Snapshot::default()), Published::Unchanged);
        let second = r.load().expect("published");
        assert!(Arc::ptr_eq(&first, &second));
    }

    #[test]
    fn shared_parts_compare_by_pointer_and_fresh_copies_by_value() {
        use crate::model::{Backend, BackendKey, BackendTable, ServicePortRef};
        let (p, r) = channel();
        assert_eq!(p.publish(Snapshot::default()), Published::Swapped);
        let serving = r.load().expect("published");
        // The same tables (shared Arcs): unchanged.
        assert_eq!(p.publish((*serving).clone()), Published::Unchanged);
        // Equal copies behind new Arcs: still unchanged (value comparison).
        let copy = Snapshot {
            hosts: Arc::new((*serving.hosts).clone()),
            backends: Arc::new((*serving.backends).clone()),
            tls: Arc::new((*serving.tls).clone()),
        };
        assert_eq!(p.publish(copy), Published::Unchanged);
        // Shared hosts and TLS, different backends: swapped.
        let changed = Snapshot {
            backends: Arc::new(BackendTable {
                backends: vec![Backend {
                    key: BackendKey {
                        namespace: Arc::from("default"),
                        service: Arc::from("web"),
                        port: ServicePortRef::Number(80),
                    },
                    endpoints: Arc::from(Vec::new()),
                    draining_fallback: false,
                    health_check: None,
                }],
            }),
            ..(*serving).clone()
        };
        assert_eq!(p.publish(changed.clone()), Published::Swapped);
        assert_eq!(*r.load().expect("published"), changed);
    }
}

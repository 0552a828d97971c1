//! One [`Publisher`], many [`Reader`]s over a single `ArcSwapOption<Snapshot>`.
//!
//! Owns: the one cell the request path reads. The proxy loads it once per request (and once
//! per TLS handshake); sources publish whole snapshots. An equal snapshot is not swapped, so
//! readers never see a pointless change. May import: model only.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::model::Snapshot;

/// Create the cell: a publisher for the rebuild loop, readers for the proxy and admin.
pub fn channel() -> (Publisher, Reader) {
    let cell = Arc::new(ArcSwapOption::empty());
    (Publisher { cell: cell.clone() }, Reader { cell })
}

/// Writes snapshots. There is one per process.
#[derive(Debug)]
pub struct Publisher {
    cell: Arc<ArcSwapOption<Snapshot>>,
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
        self.cell.store(Some(Arc::new(snapshot)));
        Published::Swapped
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

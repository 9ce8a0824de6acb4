//! Collectives: the ring schedule, as a sans-IO plan that the data plane executes.

pub mod ring;
pub(crate) mod sizing;

use concord_kernels::{DType, ReduceOp};
use concord_master::proto::{CollKind, CollectiveDesc};

/// What a collective is, as this peer asks for it: the descriptor the master compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Spec {
    pub(crate) kind: CollKind,
    /// Ring position of the root (broadcast and reduce; 0 otherwise).
    pub(crate) root: usize,
    pub(crate) dtype: DType,
    /// The reduction (ignored by collectives that do not reduce; `Sum` there).
    pub(crate) op: ReduceOp,
    /// Elements of the whole buffer (see [`CollectiveDesc::count`]).
    pub(crate) count: usize,
}

impl Spec {
    /// An all-reduce of `count` elements.
    pub(crate) fn all_reduce(dtype: DType, op: ReduceOp, count: usize) -> Self {
        Spec {
            kind: CollKind::AllReduce,
            root: 0,
            dtype,
            op,
            count,
        }
    }

    /// The descriptor voted through the master.
    pub(crate) fn desc(&self) -> CollectiveDesc {
        CollectiveDesc {
            kind: self.kind,
            count: self.count as u64,
            dtype: self.dtype.name().into(),
            op: if self.kind.reduces() {
                self.op.name().into()
            } else {
                "none".into()
            },
            root: self.root as u32,
        }
    }

    /// What the user called, for messages: `all_reduce(tag 3)`.
    pub(crate) fn call(&self, tag: u64) -> String {
        format!("{}(tag {tag})", self.kind)
    }
}

/// Bytes moved by one operation on this peer (frame headers included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes written to the ring successor.
    pub bytes_sent: u64,
    /// Bytes read from the ring predecessor.
    pub bytes_received: u64,
}

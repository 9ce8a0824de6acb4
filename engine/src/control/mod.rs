//! The control plane on the peer side: the master connection (read by its own thread or a
//! driving caller) and the deadline watchdog. The sans-IO protocol they feed is
//! [`crate::protocol`].

pub(crate) mod master_in;
pub(crate) mod master_link;
pub(crate) mod watchdog;

//! Collectives: the ring schedule (sans-IO) and the code that runs it over the links.

pub mod ring;
pub(crate) mod run;

pub use run::Traffic;

//! The upgrade procedure of one cluster: the names of its steps (`step`), the pure rules that
//! decide what comes next (`decide`).

pub mod decide;
pub mod step;

pub use step::Step;

//! Table builders: pure functions from desired state to the exact bytes the data path
//! indexes. No kernel needed; unit- and property-tested here.

pub mod groups;
pub mod maglev;
pub mod split;

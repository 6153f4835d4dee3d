//! Fakes of the forwarder's peers. Each one encodes the behaviour DOCUMENTED in
//! `/work/shared/reference/{cdp,ordercloud}.md`, not whatever the forwarder happens to send.

pub mod cdp;
pub mod faulty_store;
pub mod ordercloud;

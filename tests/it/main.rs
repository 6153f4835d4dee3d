//! One integration binary (like svix-webhooks' tests/it): the real service, fakes of its peers.

mod config;
mod delivery;
mod fakes;
mod faults;
mod fuzz;
mod hardening;
mod helpers;
mod intake;
mod operate;
mod orders;
mod postgres;
mod property;
mod reconcile;
mod restart;
mod store;
mod world;

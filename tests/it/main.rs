//! One integration binary (like svix-webhooks' tests/it): the real service, fakes of its peers.

mod config;
mod delivery;
mod fakes;
mod helpers;
mod intake;
mod orders;
mod property;
mod restart;
mod world;

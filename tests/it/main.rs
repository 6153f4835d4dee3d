//! One integration binary (like svix-webhooks' tests/it): the real service, fakes of its peers.

mod config;
mod helpers;
mod intake;

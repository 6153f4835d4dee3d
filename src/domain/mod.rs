//! The forwarder's domain: what a webhook asks for ([`intent`]), what the forwarder remembers of a
//! shopper ([`shopper`]), of a CDP session ([`session`]) and of a cart ([`cart`]), and the clock.
//! Plain values: the store keeps them, the planner reads them, neither defines them.

pub mod cart;
pub mod clock;
pub mod credentials;
pub mod intent;
pub mod session;
pub mod shopper;

pub use cart::CartLine;
pub use clock::now_ms;
pub use session::{ItemFingerprint, SessionFacts};
pub use shopper::{BrowserId, ShopperState};

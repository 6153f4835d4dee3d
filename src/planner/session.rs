//! What a CDP session holds, as the planner sees it: the stored [`SessionFacts`] at a moment. The
//! forwarder treats a session as closed a safety margin before CDP's idle timeout.

use std::collections::BTreeMap;

use crate::cdp::SessionRef;
use crate::domain::{ItemFingerprint, SessionFacts};

/// A session as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    pub session: SessionRef,
    /// item_id → what CDP's cart holds for it. Empty when the session is closed.
    pub items: BTreeMap<String, ItemFingerprint>,
    /// The identity sent by IDENTITY in this session, if it is still open.
    pub identified_as: Option<String>,
    pub open: bool,
}

impl SessionState {
    /// A session nothing is known of (a new browser, or one the forwarder never sent to).
    pub fn fresh(session: SessionRef) -> SessionState {
        SessionState {
            session,
            items: BTreeMap::new(),
            identified_as: None,
            open: false,
        }
    }

    /// The view of stored facts at `now_ms`, given the effective idle timeout.
    pub fn from_facts(session: SessionRef, facts: Option<&SessionFacts>, now_ms: i64, idle_ms: i64) -> SessionState {
        match facts {
            Some(f) if f.is_open(now_ms, idle_ms) => SessionState {
                session,
                items: f.items.clone(),
                identified_as: f.identified_as.clone(),
                open: true,
            },
            _ => SessionState::fresh(session),
        }
    }
}

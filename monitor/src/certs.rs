//! Certificates as a monitor sees them (issue 10, item 5): every certificate in use (agents'
//! at connect, admins' at each vigilctl connection, its own at start and on each reload) is checked for
//! expiry. Within [`EXPIRY_WARNING_DAYS`] of the end it is warned about once (an event) and
//! listed by `vigilctl status` for as long as it is in use. A genuine but expired certificate
//! refused at the handshake is listed too, and its host kept from being condemned.
//!
//! This is soft, per-monitor state (what this monitor saw); the events are replicated.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use vigil_common::tls::{CertInfo, Role};

use crate::api::CertView;
use crate::state::{ClusterState, EventKind};

/// How long before expiry a certificate is warned about.
pub const EXPIRY_WARNING_DAYS: i64 = 30;
const DAY_S: i64 = 86_400;

#[derive(Debug, Clone)]
struct Seen {
    info: CertInfo,
    /// Refused at the handshake because it expired (last time, Unix s).
    refused_at: Option<i64>,
    /// The serial an event was recorded (or found) for: one per certificate.
    warned: bool,
}

impl Seen {
    /// A certificate (or a renewal's new serial) seen for the first time: neither refused
    /// nor warned about yet.
    fn first_sight(info: &CertInfo) -> Self {
        Seen {
            info: info.clone(),
            refused_at: None,
            warned: false,
        }
    }
}

/// What happened to a certificate the monitor just saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// Nothing new to record.
    Quiet,
    /// Record an expiry warning (first sight of this certificate within the window).
    Expiring,
    /// Record that this genuine certificate was refused as expired (first refusal).
    Expired,
}

/// The certificates this monitor saw, by (role, name): a renewed certificate replaces its
/// predecessor.
#[derive(Default)]
pub struct CertWatch {
    seen: Mutex<BTreeMap<(String, String), Seen>>,
}

fn key(info: &CertInfo) -> (String, String) {
    (info.role.to_string(), info.name.clone())
}

impl CertWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Seen>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A certificate in use (the handshake accepted it). `now`: Unix seconds.
    pub fn in_use(&self, info: &CertInfo, now: i64) -> Note {
        let mut seen = self.lock();
        let entry = seen
            .entry(key(info))
            .or_insert_with(|| Seen::first_sight(info));
        if entry.info.serial != info.serial {
            *entry = Seen::first_sight(info);
        }
        entry.refused_at = None;
        if info.not_after - now <= EXPIRY_WARNING_DAYS * DAY_S && !entry.warned {
            entry.warned = true;
            Note::Expiring
        } else {
            Note::Quiet
        }
    }

    /// A genuine certificate refused at the handshake because it expired.
    pub fn refused_expired(&self, info: &CertInfo, now: i64) -> Note {
        let mut seen = self.lock();
        let entry = seen
            .entry(key(info))
            .or_insert_with(|| Seen::first_sight(info));
        let first = entry.info.serial != info.serial || entry.refused_at.is_none();
        *entry = Seen {
            info: info.clone(),
            refused_at: Some(now),
            warned: entry.warned && entry.info.serial == info.serial,
        };
        if first {
            Note::Expired
        } else {
            Note::Quiet
        }
    }

    /// Forgets the warning of `info` (its event could not be recorded: try again next time).
    pub fn unwarn(&self, info: &CertInfo) {
        if let Some(e) = self.lock().get_mut(&key(info)) {
            if e.info.serial == info.serial {
                e.warned = false;
            }
        }
    }

    /// Certificates within the warning window or refused as expired, soonest first.
    pub fn views(&self, now: i64) -> Vec<CertView> {
        let mut v: Vec<CertView> = self
            .lock()
            .values()
            .filter(|s| {
                s.refused_at.is_some() || s.info.not_after - now <= EXPIRY_WARNING_DAYS * DAY_S
            })
            .map(|s| CertView {
                role: s.info.role.to_string(),
                name: s.info.name.clone(),
                serial: s.info.serial.clone(),
                not_after_ms: (s.info.not_after.max(0) as u64) * 1000,
                days_left: (s.info.not_after - now).div_euclid(DAY_S),
                expired: s.info.not_after <= now,
                refused: s.refused_at.is_some(),
            })
            .collect();
        v.sort_by_key(|c| c.not_after_ms);
        v
    }
}

/// Whether the replicated log already has `kind`'s event for this serial (a restarted
/// monitor, or another monitor, warned already).
pub fn already_recorded(state: &ClusterState, expired: bool, serial: &str) -> bool {
    state.events.iter().any(|e| match &e.kind {
        EventKind::CertificateExpiring { serial: s, .. } => !expired && s == serial,
        EventKind::CertificateExpired { serial: s, .. } => expired && s == serial,
        _ => false,
    })
}

/// The operator's words for a certificate (`agent certificate of hv1`).
pub fn describe(info: &CertInfo) -> String {
    let whose = match info.role {
        Role::Agent => "agent certificate of host",
        Role::Monitor => "monitor certificate of",
        Role::Admin => "admin certificate of",
        Role::Viewer => "viewer certificate of",
    };
    format!("{whose} {} (serial {})", info.name, info.serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(serial: &str, not_after: i64) -> CertInfo {
        CertInfo {
            name: "hv1".into(),
            role: Role::Agent,
            serial: serial.into(),
            not_after,
        }
    }

    #[test]
    fn warns_once_per_certificate_and_forgets_a_renewed_one() {
        let w = CertWatch::default();
        let now = 1_000_000_000;
        assert_eq!(w.in_use(&info("aa", now + 400 * DAY_S), now), Note::Quiet);
        assert!(w.views(now).is_empty());
        assert_eq!(w.in_use(&info("bb", now + 5 * DAY_S), now), Note::Expiring);
        assert_eq!(w.in_use(&info("bb", now + 5 * DAY_S), now), Note::Quiet);
        assert_eq!(w.views(now).len(), 1);
        assert_eq!(w.views(now)[0].days_left, 5);
        // Renewed: the new certificate replaces the old one.
        assert_eq!(w.in_use(&info("cc", now + 800 * DAY_S), now), Note::Quiet);
        assert!(w.views(now).is_empty());
        assert_eq!(w.refused_expired(&info("dd", now - 1), now), Note::Expired);
        assert_eq!(
            w.refused_expired(&info("dd", now - 1), now + 1),
            Note::Quiet
        );
        let v = w.views(now);
        assert!(v[0].expired && v[0].refused, "{v:?}");
    }
}

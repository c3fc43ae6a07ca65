//! This monitor's own certificate: while it is expired, agents refuse the monitor (their TLS
//! client rejects it), every host falls silent at once, and that silence proves nothing —
//! fencing then would kill healthy hosts (issue 9 item 4). So nothing is fenced until it is
//! renewed, and then only a full lease later, once the agents have had time to reconnect
//! (as after an election).

use super::*;

impl Engine {
    /// The edge's periodic check of the certificate this monitor serves.
    pub(super) fn on_own_certificate(&mut self, expired: Option<String>, cx: &mut Context<'_>) {
        let (now_ms, wall_ms, out) = (cx.now_ms, cx.wall_ms, &mut cx.out);
        match (&self.own_certificate_expired, expired) {
            (None, Some(what)) => {
                self.fence_after_ms = u64::MAX;
                record_event(
                    out,
                    wall_ms,
                    Severity::Critical,
                    None,
                    EventKind::OwnCertificate { expired: true },
                    format!(
                        "this monitor's certificate expired ({what}): agents refuse it, so every host falls silent; no host is fenced until it is renewed (`vigilctl cert renew`, then SIGHUP to the monitor)"
                    ),
                );
                self.own_certificate_expired = Some(what);
            }
            (Some(_), None) => {
                self.own_certificate_expired = None;
                let grace = self.election_grace_ms();
                self.fence_after_ms = now_ms + grace;
                record_event(
                    out,
                    wall_ms,
                    Severity::Info,
                    None,
                    EventKind::OwnCertificate { expired: false },
                    format!(
                        "this monitor's certificate is valid again: agents reconnect; fencing resumes in {grace} ms (a full lease)"
                    ),
                );
            }
            (Some(_), Some(what)) => self.own_certificate_expired = Some(what),
            (None, None) => {}
        }
    }

    /// The time from which fencing may start again after an election: a full lease later,
    /// or never while this monitor's own certificate is expired.
    pub(super) fn fencing_resumes_at(&self, now_ms: u64) -> u64 {
        if self.own_certificate_expired.is_some() {
            u64::MAX
        } else {
            now_ms + self.election_grace_ms()
        }
    }
}

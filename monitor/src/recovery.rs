//! The recovery policy: what to do when an HA VM fails. One place for "why did this VM
//! restart here, and why now?".
//!
//! Pure: given the VM's replicated record (its failure history), the failed host, the time
//! and a way to pick another host, it returns a [`Decision`]. The budget stops restart
//! storms: a VM may restart in place `max_restarts_in_place` times and relocate
//! `max_relocations` times within `window_ms`, with exponential backoff between attempts;
//! past that Vigil gives up and says so.

use vigil_common::config::RecoveryConfig;

use crate::placement::Choice;
use crate::state::{Decision, VmRecord};

/// Decides what follows a failure of `vm` on `failed_host` at `now_ms` (Unix ms).
/// `relocation_target` is asked for another host only when the in-place budget is spent.
pub fn decide(
    vm: &VmRecord,
    failed_host: &str,
    now_ms: u64,
    policy: &RecoveryConfig,
    relocation_target: impl FnOnce() -> Option<Choice>,
) -> Decision {
    let n = recent_failures(vm, now_ms, policy) + 1;
    if let Some(give_up) = budget_spent(n, policy) {
        return give_up;
    }
    let not_before_ms = now_ms + policy.backoff_ms(n);
    let in_place = |why: String| Decision::Restart {
        host: failed_host.to_string(),
        relocate: false,
        not_before_ms,
        why,
    };
    if n <= policy.max_restarts_in_place {
        return in_place(String::new());
    }
    match relocation_target() {
        Some(choice) => Decision::Restart {
            host: choice.host,
            relocate: true,
            not_before_ms,
            why: choice.why,
        },
        // No other host can take it: keep trying in place, still within the budget.
        None => in_place(format!(
            "the {} restart(s) in place are spent, but no other host can take it",
            policy.max_restarts_in_place
        )),
    }
}

/// Decides what follows the loss of `vm` with its (fenced) host: always a relocation, at once,
/// to `target` (or, `Err(why)`, queued with no target and placed again as hosts come back),
/// unless the VM's budget is spent.
pub fn decide_host_failure(
    vm: &VmRecord,
    now_ms: u64,
    policy: &RecoveryConfig,
    target: Result<Choice, String>,
) -> Decision {
    let n = recent_failures(vm, now_ms, policy) + 1;
    if let Some(give_up) = budget_spent(n, policy) {
        return give_up;
    }
    let (host, why) = match target {
        Ok(c) => (c.host, c.why),
        Err(why) => (String::new(), why),
    };
    Decision::Restart {
        host,
        relocate: true,
        not_before_ms: now_ms,
        why,
    }
}

/// Failures of `vm` within the budget window before this one.
fn recent_failures(vm: &VmRecord, now_ms: u64, policy: &RecoveryConfig) -> u32 {
    vm.failures
        .iter()
        .filter(|t| now_ms.saturating_sub(**t) <= policy.window_ms)
        .count() as u32
}

/// Giving up, when failure number `n` of the window exceeds the budget.
fn budget_spent(n: u32, policy: &RecoveryConfig) -> Option<Decision> {
    (n > policy.budget()).then(|| Decision::GiveUp {
        reason: format!(
            "{n} failures within {} s; the budget is {} restarts in place and {} relocations",
            policy.window_ms / 1000,
            policy.max_restarts_in_place,
            policy.max_relocations
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(host: &str) -> Choice {
        Choice {
            host: host.into(),
            why: "the test's choice".into(),
        }
    }
    use crate::state::{HaSource, Phase};
    use std::collections::VecDeque;

    fn vm(failures: &[u64]) -> VmRecord {
        VmRecord {
            uuid: "u".into(),
            name: "vm".into(),
            ha: true,
            ha_source: HaSource::Operator,
            priority: 0,
            host: "hv1".into(),
            generation: 1,
            vcpus: 1,
            memory_kib: 65536,
            disks: vec![],
            definition: None,
            phase: Phase::Running,
            failures: failures.iter().copied().collect::<VecDeque<_>>(),
            relocations: VecDeque::new(),
            pending_cause: None,
            last_recovery: None,
            anti_affinity: None,
        }
    }

    #[test]
    fn first_failure_restarts_in_place_at_once() {
        let p = RecoveryConfig::default();
        let d = decide(&vm(&[]), "hv1", 1_000_000, &p, || Some(choice("hv2")));
        assert_eq!(
            d,
            Decision::Restart {
                host: "hv1".into(),
                relocate: false,
                not_before_ms: 1_000_000,
                why: String::new(),
            }
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RecoveryConfig::default();
        let b: Vec<u64> = (1..=9).map(|n| p.backoff_ms(n)).collect();
        assert_eq!(
            b,
            [0, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000]
        );
    }

    #[test]
    fn relocates_after_the_in_place_budget_then_gives_up() {
        let p = RecoveryConfig::default();
        let now = 10_000_000;
        let d = decide(&vm(&[now - 3, now - 2, now - 1]), "hv1", now, &p, || {
            Some(choice("hv2"))
        });
        assert!(
            matches!(d, Decision::Restart { ref host, relocate: true, .. } if host == "hv2"),
            "{d:?}"
        );
        let d = decide(&vm(&[now - 3, now - 2, now - 1]), "hv1", now, &p, || None);
        assert!(
            matches!(d, Decision::Restart { ref host, relocate: false, .. } if host == "hv1"),
            "{d:?}"
        );
        let d = decide(
            &vm(&[1, 2, 3, 4, 5].map(|x| now - x)),
            "hv1",
            now,
            &p,
            || Some(choice("hv2")),
        );
        assert!(matches!(d, Decision::GiveUp { .. }), "{d:?}");
    }

    #[test]
    fn old_failures_fall_out_of_the_window() {
        let p = RecoveryConfig::default();
        let now = 100_000_000;
        let old = now - p.window_ms - 1;
        let d = decide(&vm(&[old, old, old, old, old]), "hv1", now, &p, || None);
        assert!(
            matches!(d, Decision::Restart { relocate: false, not_before_ms, .. } if not_before_ms == now)
        );
    }
}

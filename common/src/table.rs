//! Generation tables larger than one frame (issue 10 item 7).
//!
//! The monitor tells every agent which VMs are HA and their newest activation generation
//! ([`MonitorToAgent::Generations`]). The whole table goes to each fresh session; at 38
//! bytes an entry, one frame ([`MAX_FRAME_LEN`], 1 MiB) holds only some 27,500 entries,
//! and a session writer that cannot encode a frame stops sending grants, so every lease in
//! the cluster would lapse once the cluster grew past that. The engine still produces one
//! logical message; the session writer turns it into frames here:
//!
//! - a **full** table that fits in one frame goes out as it is (agents built before chunking
//!   keep working on clusters where they always worked);
//! - a larger full table becomes [`MonitorToAgent::GenerationsChunk`]s of at most
//!   [`CHUNK_BUDGET`] bytes, all with one table id, in order; the agent collects them with
//!   [`Assembly`] and applies the table only when the last one arrives;
//! - an **update** (`full: false`) that does not fit is cut into several updates: an update
//!   only raises generations and adds HA VMs, entry by entry, so its pieces mean the same.

use crate::codec::MAX_FRAME_LEN;
use crate::wire::MonitorToAgent;

/// Payload bytes a chunk's entries may take (half a frame: room for the enum's fields, and
/// a chunk never holds the stream for long).
pub const CHUNK_BUDGET: usize = MAX_FRAME_LEN / 2;

/// Most entries an agent accepts in one table (about 200 MiB of memory at the limit); a
/// monitor that announces more is refused rather than trusted to be sane.
pub const MAX_TABLE_ENTRIES: usize = 4_000_000;

/// Bytes of a bincode varint (standard configuration).
fn varint_len(v: u64) -> usize {
    match v {
        0..=250 => 1,
        251..=0xFFFF => 3,
        0x1_0000..=0xFFFF_FFFF => 5,
        _ => 9,
    }
}

/// Encoded bytes of one `(uuid, generation)` entry.
pub fn entry_len(uuid: &str, generation: u64) -> usize {
    varint_len(uuid.len() as u64) + uuid.len() + varint_len(generation)
}

/// Bytes of a generations message besides its entries (variant, table id, index, flag and
/// the vector's length, all at their widest).
const OVERHEAD: usize = 1 + 9 + 5 + 1 + 9;

/// Splits `entries` into runs whose encoded size stays within `budget` (an entry larger than
/// the budget alone makes a run of one).
fn runs(entries: Vec<(String, u64)>, budget: usize) -> Vec<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = OVERHEAD;
    for (uuid, g) in entries {
        let n = entry_len(&uuid, g);
        if !cur.is_empty() && size + n > budget {
            out.push(std::mem::take(&mut cur));
            size = OVERHEAD;
        }
        size += n;
        cur.push((uuid, g));
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

/// The frames that carry `msg` on one session. `next_table` is the session's table-id
/// counter (each chunked table takes the next id). Messages other than generation tables
/// pass through unchanged.
pub fn frames(msg: MonitorToAgent, next_table: &mut u64) -> Vec<MonitorToAgent> {
    frames_within(msg, next_table, CHUNK_BUDGET)
}

/// [`frames`] with another byte budget per frame (tests use small ones).
pub fn frames_within(
    msg: MonitorToAgent,
    next_table: &mut u64,
    budget: usize,
) -> Vec<MonitorToAgent> {
    let MonitorToAgent::Generations { entries, full } = msg else {
        return vec![msg];
    };
    let mut parts = runs(entries, budget);
    if parts.len() == 1 {
        let entries = parts.pop().unwrap_or_default();
        return vec![MonitorToAgent::Generations { entries, full }];
    }
    if !full {
        return parts
            .into_iter()
            .map(|entries| MonitorToAgent::Generations {
                entries,
                full: false,
            })
            .collect();
    }
    let table = *next_table;
    *next_table += 1;
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, entries)| MonitorToAgent::GenerationsChunk {
            table,
            index: i as u32,
            last: i + 1 == n,
            entries,
        })
        .collect()
}

/// Generation table entries: `(uuid, generation)`.
pub type Entries = Vec<(String, u64)>;

/// Why a chunk does not continue the table being received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssemblyError {
    #[error("generation table chunk {index} of table {table} arrived, expected chunk {expected} of table {expected_table}")]
    OutOfOrder {
        table: u64,
        index: u32,
        expected_table: u64,
        expected: u32,
    },
    #[error("generation table chunk {index} of table {table} arrived without chunk 0")]
    NoStart { table: u64, index: u32 },
    #[error("generation table {table} has more than {max} entries")]
    TooLarge { table: u64, max: usize },
}

/// The agent's half: collects the chunks of one table (one per session; a new session
/// starts with nothing, so a table cut off by a lost connection is dropped, never applied).
#[derive(Debug, Default)]
pub struct Assembly {
    /// Table id, next expected index, entries so far.
    partial: Option<(u64, u32, Entries)>,
}

impl Assembly {
    /// Takes one chunk. Returns the whole table when `last` completes it, `None` while more
    /// are due, and an error for a chunk that does not follow (the session must then be
    /// dropped: the monitor sends a fresh table to the next one).
    pub fn push(
        &mut self,
        table: u64,
        index: u32,
        last: bool,
        entries: Vec<(String, u64)>,
    ) -> Result<Option<Vec<(String, u64)>>, AssemblyError> {
        let mut acc = if index == 0 {
            // A new table replaces one still incomplete (never applied).
            Vec::new()
        } else {
            match self.partial.take() {
                Some((t, next, acc)) if t == table && next == index => acc,
                Some((t, next, _)) => {
                    return Err(AssemblyError::OutOfOrder {
                        table,
                        index,
                        expected_table: t,
                        expected: next,
                    })
                }
                None => return Err(AssemblyError::NoStart { table, index }),
            }
        };
        self.partial = None;
        if acc.len() + entries.len() > MAX_TABLE_ENTRIES {
            return Err(AssemblyError::TooLarge {
                table,
                max: MAX_TABLE_ENTRIES,
            });
        }
        acc.extend(entries);
        if last {
            return Ok(Some(acc));
        }
        self.partial = Some((table, index + 1, acc));
        Ok(None)
    }

    /// Whether a table is half received.
    pub fn in_progress(&self) -> bool {
        self.partial.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    fn table(n: usize) -> Vec<(String, u64)> {
        (0..n)
            .map(|i| {
                (
                    format!("00000000-0000-4000-8000-{i:012}"),
                    i as u64 % 1000 + 1,
                )
            })
            .collect()
    }

    fn full(n: usize) -> MonitorToAgent {
        MonitorToAgent::Generations {
            entries: table(n),
            full: true,
        }
    }

    #[test]
    fn a_table_of_100k_does_not_fit_one_frame() {
        // The defect: the whole table in one frame is refused by the codec.
        let err = codec::encode_frame(&full(100_000)).expect_err("too large for one frame");
        assert!(
            matches!(err, codec::CodecError::FrameTooLarge { .. }),
            "{err}"
        );
    }

    #[test]
    fn a_table_of_100k_goes_out_in_chunks_that_fit_and_reassemble() {
        let mut next = 7;
        let frames = frames(full(100_000), &mut next);
        assert_eq!(next, 8, "one table id taken");
        assert!(frames.len() > 1);
        let mut asm = Assembly::default();
        let mut whole = None;
        for (i, f) in frames.iter().enumerate() {
            let bytes = codec::encode_frame(f).expect("every chunk fits a frame");
            assert!(
                bytes.len() <= CHUNK_BUDGET + codec::FRAME_HEADER_LEN,
                "{}",
                bytes.len()
            );
            let MonitorToAgent::GenerationsChunk {
                table,
                index,
                last,
                entries,
            } = f.clone()
            else {
                panic!("chunk expected, got {f:?}");
            };
            assert_eq!((table, index as usize, last), (7, i, i + 1 == frames.len()));
            let done = asm.push(table, index, last, entries).expect("in order");
            assert_eq!(done.is_some(), last);
            whole = whole.or(done);
        }
        assert_eq!(whole, Some(table(100_000)));
        assert!(!asm.in_progress());
    }

    #[test]
    fn a_table_that_fits_keeps_the_old_message() {
        let mut next = 0;
        assert_eq!(frames(full(10), &mut next), vec![full(10)]);
        assert_eq!(next, 0);
        let empty = MonitorToAgent::Generations {
            entries: vec![],
            full: true,
        };
        assert_eq!(frames(empty.clone(), &mut next), vec![empty]);
        let grant = MonitorToAgent::LeaseGrant {
            seq: 1,
            lease_ms: 5,
        };
        assert_eq!(frames(grant.clone(), &mut next), vec![grant]);
    }

    #[test]
    fn a_large_update_becomes_several_updates() {
        let mut next = 0;
        let msg = MonitorToAgent::Generations {
            entries: table(50_000),
            full: false,
        };
        let out = frames(msg, &mut next);
        assert!(out.len() > 1);
        let mut all = Vec::new();
        for f in out {
            codec::encode_frame(&f).expect("fits");
            match f {
                MonitorToAgent::Generations { entries, full } => {
                    assert!(!full);
                    all.extend(entries);
                }
                other => panic!("update expected, got {other:?}"),
            }
        }
        assert_eq!(all, table(50_000));
    }

    #[test]
    fn a_half_received_table_is_never_applied() {
        let mut next = 0;
        let frames = frames_within(full(100), &mut next, 600);
        assert!(frames.len() >= 3, "{}", frames.len());
        let mut asm = Assembly::default();
        let chunk = |f: &MonitorToAgent| match f.clone() {
            MonitorToAgent::GenerationsChunk {
                table,
                index,
                last,
                entries,
            } => (table, index, last, entries),
            other => panic!("{other:?}"),
        };
        let (t, i, l, e) = chunk(&frames[0]);
        assert_eq!(asm.push(t, i, l, e), Ok(None));
        // A new table starts before the first ended: the first is dropped, not applied.
        let (_, i, l, e) = chunk(&frames[0]);
        assert_eq!(asm.push(t + 1, i, l, e), Ok(None));
        let (_, i, l, e) = chunk(&frames[1]);
        let err = asm
            .push(t, i, l, e)
            .expect_err("chunk of the dropped table");
        assert!(
            err.to_string().contains("expected chunk 1 of table 1"),
            "{err}"
        );
        // A chunk without its start.
        let mut fresh = Assembly::default();
        let (t, i, l, e) = chunk(&frames[2]);
        assert!(matches!(
            fresh.push(t, i, l, e),
            Err(AssemblyError::NoStart { .. })
        ));
        // Skipping a chunk.
        let mut gap = Assembly::default();
        let (t, i, l, e) = chunk(&frames[0]);
        gap.push(t, i, l, e).expect("start");
        let (t, i, l, e) = chunk(&frames[2]);
        assert!(matches!(
            gap.push(t, i, l, e),
            Err(AssemblyError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn an_inventory_of_1000_large_domains_fits_a_frame() {
        use crate::domain::{DomainInfo, DomainState, HypervisorHealth, StateReason, VigilMeta};
        use crate::wire::AgentToMonitor;
        let d = |i: usize| DomainInfo {
            uuid: format!("00000000-0000-4000-8000-{i:012}"),
            name: format!("{}{i:04}", "n".repeat(60)),
            state: DomainState::Running,
            reason: StateReason::Booted,
            vcpus: 64,
            memory_kib: 1 << 30,
            disks: (0..4).map(|k| format!("/{k}{}", "d".repeat(126))).collect(),
            pools: Some(vec!["pool-primary-0001".into(), "pool-secondary-02".into()]),
            meta: VigilMeta {
                ha: Some(true),
                priority: Some(100),
                generation: Some(u32::MAX as u64 + 1),
            },
            persistent: true,
        };
        let inv = |n: usize| AgentToMonitor::Inventory {
            domains: (0..n).map(d).collect(),
            health: HypervisorHealth::Healthy,
            seq: u64::MAX,
        };
        let size = |n| codec::encode_payload(&inv(n)).expect("encode").len();
        let per_domain = size(1) - size(0);
        let bound = codec::MAX_FRAME_LEN / per_domain;
        eprintln!("{per_domain} bytes a domain: {bound} domains fit one inventory frame");
        assert!(bound >= 1_500, "{bound}");
        codec::encode_frame(&inv(1_000)).expect("1000 domains fit");
    }

    #[test]
    fn entry_sizes_match_bincode() {
        for (u, g) in [
            ("a".to_string(), 0u64),
            ("x".repeat(300), 300),
            ("y".repeat(70_000), u32::MAX as u64 + 1),
        ] {
            let enc = codec::encode_payload(&(u.clone(), g)).expect("encode");
            assert_eq!(enc.len(), entry_len(&u, g));
        }
    }
}

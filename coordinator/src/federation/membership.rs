//! Membership: joining (with partition assignment and re-join after a connection problem),
//! session tokens, authentication, and which clients count as connected.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::{Federation, Refusal, State};
use crate::auth::Member;

/// How old the connected count in a waiting client's reason may be.
const CONNECTED_HINT_AGE: Duration = Duration::from_millis(250);

/// A joined client.
#[derive(Clone, Debug)]
pub struct ClientEntry {
    /// Id.
    pub id: String,
    /// Name it gave.
    pub name: String,
    /// Data partition it was assigned.
    pub partition: u32,
    /// Examples it reported.
    pub num_examples: u64,
    /// Last call.
    pub last_seen: Instant,
}

/// What a client gets back from Join.
#[derive(Clone, Debug)]
pub struct Joined {
    /// Its id.
    pub client_id: String,
    /// Its session token.
    pub token: String,
    /// Its partition.
    pub partition: u32,
}

/// Longest client name kept (and logged).
const MAX_NAME: usize = 64;

/// A client's name as kept and logged: at most [`MAX_NAME`] characters, control characters
/// (a newline would forge a log line) replaced.
fn display_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .take(MAX_NAME)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if name.chars().count() > MAX_NAME {
        out.push('~');
    }
    out
}

fn new_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..4)
        .map(|_| format!("{:08x}", rng.random::<u32>()))
        .collect()
}

impl Federation {
    /// Registers a client. A `previous_token` (re-join after a connection problem) retires the
    /// session it names, so no ghost of the same client is sampled or waited for.
    pub fn join(
        &self,
        name: &str,
        secret: &str,
        num_examples: u64,
        partition_hint: i32,
        previous_token: &str,
    ) -> Result<Joined, Refusal> {
        let Some(member) = self.auth.member(secret) else {
            return Err(Refusal::Unauthenticated(
                if self.config.auth.clients_file.is_some() {
                    "unknown client or wrong credential (per-client credentials: <id>:<secret>)"
                } else {
                    "wrong join secret"
                }
                .into(),
            ));
        };
        let name = display_name(name);
        let name = name.as_str();
        let count = self.config.partition.count();
        let mut s = self.lock();
        if let Some(old) = s.tokens.remove(previous_token) {
            s.retire(&old);
            tracing::info!("{old} re-joined: its previous session is retired");
        }
        if let Member::Credential { id, .. } = &member
            && s.clients.contains_key(id)
        {
            // One credential, one client: a second join replaces the first session (sybils
            // cannot multiply a credential into many sampled clients). The client stays what
            // it was in the open round (a restarted client picks up its task).
            s.tokens.retain(|_, v| v != id);
            tracing::info!("{id} joined again: its previous session is retired");
        }
        if s.tokens.len() >= self.config.auth.max_sessions {
            return Err(Refusal::ResourceExhausted(format!(
                "the coordinator holds its maximum of {} sessions",
                self.config.auth.max_sessions
            )));
        }
        let assigned = match &member {
            Member::Credential {
                partition: Some(p), ..
            } => Some(*p % count),
            _ => None,
        };
        let partition = if let Some(p) = assigned {
            p
        } else if partition_hint >= 0 && (partition_hint as u32) < count {
            partition_hint as u32
        } else {
            let taken: BTreeSet<u32> = s.clients.values().map(|c| c.partition).collect();
            (0..count)
                .find(|p| !taken.contains(p))
                .unwrap_or((s.next_client % u64::from(count)) as u32)
        };
        let id = match member {
            Member::Credential { id, .. } => id,
            Member::Anonymous => {
                // Ids follow the data partition, so the same client keeps its name across
                // coordinator restarts and sweep cells (a second client on the same partition
                // gets a suffix).
                let base = format!("client-{partition:03}");
                if s.clients.contains_key(&base) {
                    format!("{base}-{}", s.next_client)
                } else {
                    base
                }
            }
        };
        s.next_client += 1;
        let token = new_token();
        s.tokens.insert(token.clone(), id.clone());
        s.clients.insert(
            id.clone(),
            ClientEntry {
                id: id.clone(),
                name: name.to_string(),
                partition,
                num_examples,
                last_seen: Instant::now(),
            },
        );
        drop(s);
        tracing::info!("{id} ({name}) joined, partition {partition}");
        // Only the driver cares (a retired session may have been the round's last awaited
        // one); the other clients' long-polls need not wake for a join.
        self.notify_submission();
        Ok(Joined {
            client_id: id,
            token,
            partition,
        })
    }

    /// The client behind a session token (and marks it alive).
    pub fn authenticate(&self, token: &str) -> Result<String, Refusal> {
        let mut s = self.lock();
        let id = s.tokens.get(token).cloned().ok_or_else(|| {
            Refusal::Unauthenticated(
                "unknown session token (coordinator restarted? join again)".into(),
            )
        })?;
        if let Some(c) = s.clients.get_mut(&id) {
            c.last_seen = Instant::now();
        }
        Ok(id)
    }

    /// Clients that called within `client_timeout_secs`.
    pub(super) fn connected(&self, s: &State) -> u32 {
        let timeout = Duration::from_secs_f64(self.config.federation.client_timeout_secs);
        let now = Instant::now();
        s.clients
            .values()
            .filter(|c| now.saturating_duration_since(c.last_seen) < timeout)
            .count() as u32
    }

    /// [`Self::connected`], counted at most every [`CONNECTED_HINT_AGE`] (for the reason a
    /// waiting long-poll is given: with 10,000 registered clients, all 10,000 polls woken by a
    /// round event each counting all 10,000 clients took seconds per round).
    pub(super) fn connected_recently(&self, s: &mut State) -> u32 {
        if let Some((at, n)) = s.connected_hint
            && at.elapsed() < CONNECTED_HINT_AGE
        {
            return n;
        }
        let n = self.connected(s);
        s.connected_hint = Some((Instant::now(), n));
        n
    }
}

impl State {
    /// Forgets client `id`; in an open round it is no longer waited for unless it already
    /// submitted.
    fn retire(&mut self, id: &str) {
        self.clients.remove(id);
        if let Some(r) = self.round.as_mut()
            && !r.submitted.contains(id)
        {
            r.sampled.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_bounded_and_cannot_forge_log_lines() {
        assert_eq!(super::display_name("sim-01"), "sim-01");
        assert_eq!(super::display_name("a\nINFO x"), "a?INFO x");
        let long = "x".repeat(1 << 20);
        assert_eq!(
            super::display_name(&long).chars().count(),
            super::MAX_NAME + 1
        );
    }
}

//! Dividing the notified events among the instances that share a database.
//!
//! Every instance's listener hears every notification. Without a division each instance
//! would try to claim every notified id, and all but one of those claims would find the
//! event taken: with four instances, four claim statements per batch instead of one.
//! So the ids are cut into blocks of [`BLOCK`] consecutive ids, the blocks into
//! [`SHARDS`] shards, and each shard belongs to one live instance by rendezvous hashing
//! with bounded loads over the instances' names: every instance computes the same owner
//! for a shard from the same list of members, shares are even (a drain lasts as long as
//! its busiest instance), and a member joining or leaving moves few shards besides the
//! ones it takes or gives up.
//!
//! The division is a hint, never a lock: claims stay fenced by `FOR UPDATE SKIP LOCKED`
//! and `lock_token`, so two instances that disagree for a moment only both try an
//! event. No id is left unclaimed: an instance that gains shards sweeps every due event
//! after it starts taking their ids, so an id heard before the gain (by an instance that
//! no longer owned it, or by nobody) was committed before that sweep began and is
//! claimed by it.
//!
//! With per-aggregate ordering the shards are of aggregates instead: shard =
//! `hashtext(aggregate_type || '/' || aggregate_id) & 255`, computed by the claim
//! (`sql/claim_ids.sql`), since a notification carries ids only. Every instance takes in
//! every notified id and its claim leases only the events of its own aggregates, so an
//! aggregate's events go to one instance and its claims never wait on another's: divided
//! by id block, ordered instances drifted apart in the id space, the one ahead claimed
//! events whose predecessor the one behind had not delivered yet and held them
//! (measured: four drained 0.46 x of one, 33,447 holds for 100,000 events). In drain
//! mode an ordered instance polls its own aggregates' events first (events due for a
//! second are anyone's); the other sweeps and the retries claim whatever is due, as
//! without ordering, and the claim's rule keeps the order whoever claims. This file is pure; the listener keeps the membership
//! (`sql/heartbeat.sql`) and the relay's inbox applies the division.

/// Consecutive ids that belong to the same shard: one INSERT's ids go to few instances,
/// in runs, so a claim reads neighbouring rows.
pub const BLOCK: i64 = 64;

/// How many shards the blocks are dealt into.
pub const SHARDS: usize = 256;

/// The shard of an event id.
pub fn shard_of(id: i64) -> usize {
    id.div_euclid(BLOCK).rem_euclid(SHARDS as i64) as usize
}

/// The shards one instance claims notified ids of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shares {
    owned: [u64; SHARDS / 64],
    members: usize,
    /// Members on this instance's host, itself included.
    neighbours: usize,
}

impl Default for Shares {
    /// Every shard: an instance alone, or one that has not read the members yet.
    fn default() -> Self {
        Shares {
            owned: [u64::MAX; SHARDS / 64],
            members: 1,
            neighbours: 1,
        }
    }
}

impl Shares {
    /// The shards `me` owns among `members` (live instances' names; `me` counts whether
    /// it is listed or not). Rendezvous hashing with bounded loads: shard by shard, the
    /// member that ranks it highest takes it unless it already holds its cap of
    /// `ceil(256 / n)`, then the next; so every member holds within one or two of an
    /// even share (plain rendezvous hashing left the busiest of four with about 11 %
    /// more than its share, and a drain lasts as long as its busiest instance).
    pub fn of(me: &str, members: &[String]) -> Shares {
        let mut all: Vec<&str> = members
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(me))
            .collect();
        all.sort_unstable();
        all.dedup();
        let mine = all.iter().position(|m| *m == me).expect("me is listed");
        let cap = SHARDS.div_ceil(all.len());
        let mut load = vec![0usize; all.len()];
        let mut ranked: Vec<(u64, usize)> = Vec::with_capacity(all.len());
        let mut owned = [0u64; SHARDS / 64];
        for shard in 0..SHARDS {
            ranked.clear();
            ranked.extend(all.iter().enumerate().map(|(i, m)| (weight(m, shard), i)));
            // Highest weight first; equal weights (practically never): the smaller name.
            ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let owner = ranked
                .iter()
                .map(|(_, i)| *i)
                .find(|i| load[*i] < cap)
                .expect("the caps add up to every shard");
            load[owner] += 1;
            if owner == mine {
                owned[shard / 64] |= 1 << (shard % 64);
            }
        }
        Shares {
            owned,
            members: all.len(),
            neighbours: neighbours(me, &all),
        }
    }

    /// Whether this instance claims `id` when it is notified.
    pub fn owns(&self, id: i64) -> bool {
        self.owns_shard(shard_of(id))
    }

    pub fn owns_shard(&self, shard: usize) -> bool {
        self.owned[shard / 64] & (1 << (shard % 64)) != 0
    }

    /// Whether these shares hold a shard that `before` did not: the ids of that shard
    /// heard until now may have been left to nobody, so a sweep is due.
    pub fn gained_over(&self, before: &Shares) -> bool {
        self.owned
            .iter()
            .zip(before.owned.iter())
            .any(|(now, then)| now & !then != 0)
    }

    /// How many shards are owned.
    pub fn count(&self) -> usize {
        self.owned.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// How many live instances the division was made among.
    pub fn members(&self) -> usize {
        self.members
    }

    /// How many of them run on this instance's host, itself included.
    pub fn neighbours(&self) -> usize {
        self.neighbours
    }

    /// This instance's part of a per-host budget of `per_host` (at least one): instances
    /// on one host share its cores, so `relay.max_in_flight_batches` is a host's budget,
    /// split among the instances there.
    pub fn part_of(&self, per_host: usize) -> usize {
        per_host.div_ceil(self.neighbours.max(1)).max(1)
    }
}

/// The host part of an instance name (`host/pid/random`, see `service.rs`).
pub fn host_of(name: &str) -> &str {
    name.split_once('/').map_or(name, |(host, _)| host)
}

/// Members of `all` on the host of `me` (`me` among them).
fn neighbours(me: &str, all: &[&str]) -> usize {
    let host = host_of(me);
    all.iter().filter(|m| host_of(m) == host).count().max(1)
}

/// A member's rendezvous weight for a shard: a fixed function (FNV-1a of the name, mixed
/// with the shard by SplitMix64), the same in every version and on every machine, since
/// instances of different versions must agree on owners.
fn weight(member: &str, shard: usize) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in member.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = hash ^ (shard as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("host-{i}/4{i}1/a{i}b{i}c{i}d"))
            .collect()
    }

    #[test]
    fn one_instance_owns_every_shard() {
        let shares = Shares::of("alone", &["alone".to_string()]);
        assert_eq!(shares.count(), SHARDS);
        assert_eq!(shares, Shares::default());
        assert_eq!(
            Shares::of("alone", &[]).count(),
            SHARDS,
            "me counts unlisted"
        );
    }

    fn owners(members: &[String]) -> Vec<usize> {
        let all: Vec<Shares> = members.iter().map(|m| Shares::of(m, members)).collect();
        (0..SHARDS)
            .map(|shard| {
                let owners: Vec<usize> = (0..all.len())
                    .filter(|i| all[*i].owns_shard(shard))
                    .collect();
                assert_eq!(owners.len(), 1, "shard {shard}: owners {owners:?}");
                owners[0]
            })
            .collect()
    }

    #[test]
    fn every_shard_has_exactly_one_owner_and_shares_are_even() {
        for n in 1..=8 {
            let members = names(n);
            owners(&members);
            let cap = SHARDS.div_ceil(n);
            for member in &members {
                let shares = Shares::of(member, &members);
                assert!(
                    shares.count() <= cap && shares.count() + (n - 1) * cap >= SHARDS,
                    "{n} members: {member} owns {} shards (cap {cap})",
                    shares.count()
                );
                assert_eq!(shares.members(), n);
            }
        }
    }

    /// Shards whose owner differs between two memberships (by name).
    fn moved(before: &[String], after: &[String]) -> usize {
        let (b, a) = (owners(before), owners(after));
        (0..SHARDS)
            .filter(|s| before[b[*s]] != after[a[*s]])
            .count()
    }

    #[test]
    fn a_joining_or_leaving_instance_moves_few_shards_besides_its_own() {
        for n in 2..=6 {
            let before = names(n);
            let mut after = before.clone();
            after.push("newcomer".into());
            let taken = Shares::of("newcomer", &after).count();
            let moves = moved(&before, &after);
            assert!(
                moves <= 2 * taken,
                "{n} + 1 members: {moves} shards moved, the newcomer took {taken}"
            );
            // And back when it leaves.
            assert_eq!(moved(&after, &before), moves);
        }
    }

    #[test]
    fn instances_on_one_host_split_its_budget() {
        let members: Vec<String> = ["db1/10/aaaa", "db1/11/bbbb", "db2/10/cccc", "db1/12/dddd"]
            .iter()
            .map(|m| m.to_string())
            .collect();
        let on_db1 = Shares::of("db1/10/aaaa", &members);
        assert_eq!((on_db1.members(), on_db1.neighbours()), (4, 3));
        assert_eq!(on_db1.part_of(4), 2, "ceil(4 / 3)");
        assert_eq!(on_db1.part_of(1), 1, "never below one");
        let on_db2 = Shares::of("db2/10/cccc", &members);
        assert_eq!((on_db2.members(), on_db2.neighbours()), (4, 1));
        assert_eq!(on_db2.part_of(4), 4, "alone on its host: the whole budget");
        assert_eq!(Shares::default().part_of(4), 4);
        assert_eq!(host_of("no-slash"), "no-slash");
        let two = Shares::of("db1/10/aaaa", &members[..2]);
        assert_eq!(two.part_of(4), 2);
        assert_eq!(two.part_of(5), 3);
    }

    #[test]
    fn ids_go_in_blocks_of_consecutive_ids() {
        assert_eq!(shard_of(0), 0);
        assert_eq!(shard_of(BLOCK - 1), 0);
        assert_eq!(shard_of(BLOCK), 1);
        assert_eq!(shard_of(BLOCK * SHARDS as i64), 0);
        assert_eq!(shard_of(-1), SHARDS - 1, "never out of range");
        let members = names(2);
        let shares = Shares::of(&members[0], &members);
        let start = 1_000 * BLOCK;
        let first = shares.owns(start);
        assert!((start..start + BLOCK).all(|id| shares.owns(id) == first));
    }

    #[test]
    fn the_division_is_the_same_in_every_version() {
        // Instances of different versions must agree: these owners may never change.
        let members = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let owner = |shard: usize| {
            members
                .iter()
                .find(|m| Shares::of(m, &members).owns_shard(shard))
                .unwrap()
                .clone()
        };
        let got: String = (0..SHARDS).map(owner).collect();
        assert_eq!(got, GOLDEN);
    }

    const GOLDEN: &str = concat!(
        "cccaabacbbbcacababccbcacabaccaababcccccbbbbbcabbbaaacbccccbbccba",
        "acbacbbaaccbbacabacabccbccbbcacbcabaacaacaaaaababacbacacaccbbcbb",
        "acababaccbcbcaaabababbcabccabcabacaacbaacacbcbcccbbabccaacbcaaac",
        "babbababbabbabcaccbccbccbaaacababbcbbacbabaaccccbcaababbbbbcacba"
    );
}

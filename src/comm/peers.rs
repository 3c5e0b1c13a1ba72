//! Point-to-point messages between the ranks of a world: pipeline stages hand their hidden
//! states to the next stage, and the last stage hands a step's results back to rank 0.
//!
//! Messages between two ranks arrive in the order they were sent. A send may wait for the
//! receiver (a full local link, a large MPI message), so the engine only ever sends forward
//! along the pipeline, plus one message back to rank 0 at the end of a step: no cycle of
//! ranks waiting on each other.

use anyhow::{anyhow, bail, Result};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One rank's point-to-point handle on its world.
pub trait Peers: Send {
    /// Sends `data` to world rank `to`.
    fn send(&mut self, to: usize, data: &[f32]) -> Result<()>;

    /// Receives the next message from world rank `from` into `out` (resized to its length).
    fn recv(&mut self, from: usize, out: &mut Vec<f32>) -> Result<()>;
}

/// What an error of a peer that stopped says, so that the runtime can tell it from the
/// failure that stopped it.
pub const PEER_STOPPED: &str = "pipeline peer stopped";

/// Messages a link holds at most before a send waits for the receiver to take one. Every
/// slot grows to the largest message sent, so a link holds this many times that.
const SLOTS: usize = 4;

type Slots = Arc<[Mutex<Vec<f32>>]>;

/// The sending end of a link: the data goes into a free slot, the slot's index into the
/// channel; the receiver hands the index back once it has copied the data out.
struct Outgoing {
    slots: Slots,
    ready: SyncSender<usize>,
    returned: Receiver<usize>,
    /// Free slots, the most recently used last.
    free: Vec<usize>,
    /// The longest message sent: every free slot is grown to it at once, so that a slot
    /// first used late (when timing first puts more messages in flight) does not allocate.
    longest: usize,
}

/// The receiving end.
struct Incoming {
    slots: Slots,
    ready: Receiver<usize>,
    returned: SyncSender<usize>,
}

/// Threads of one process exchanging messages through slots that keep their buffers, so a
/// steady stream of messages allocates nothing. When a rank's thread ends, its links close
/// and its peers' receives fail.
pub struct LocalPeers {
    rank: usize,
    /// How long a receive spins before it sleeps (see [`LocalPeers::create`]).
    spin: Duration,
    outgoing: Vec<Option<Outgoing>>,
    incoming: Vec<Option<Incoming>>,
}

impl LocalPeers {
    /// The members of a world of `size` ranks, linked every way; hand one to each rank.
    ///
    /// A stage waits for the previous one for a whole stage's work (milliseconds), and a
    /// sleeping thread can take a millisecond to wake on a virtual machine, so a receive
    /// spins up to [`RECEIVE_SPIN`] on its own core; when ranks outnumber cores it sleeps
    /// almost at once, since the sender may need that core.
    pub fn create(size: usize) -> Vec<LocalPeers> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let spin = if size <= cores {
            RECEIVE_SPIN
        } else {
            Duration::from_micros(2)
        };
        let mut members: Vec<LocalPeers> = (0..size)
            .map(|rank| LocalPeers {
                rank,
                spin,
                outgoing: (0..size).map(|_| None).collect(),
                incoming: (0..size).map(|_| None).collect(),
            })
            .collect();
        for from in 0..size {
            for to in (0..size).filter(|&to| to != from) {
                let slots: Slots = (0..SLOTS).map(|_| Mutex::new(Vec::new())).collect();
                let (ready_tx, ready_rx) = sync_channel(SLOTS);
                let (returned_tx, returned_rx) = sync_channel(SLOTS);
                members[from].outgoing[to] = Some(Outgoing {
                    slots: slots.clone(),
                    ready: ready_tx,
                    returned: returned_rx,
                    free: (0..SLOTS).rev().collect(),
                    longest: 0,
                });
                members[to].incoming[from] = Some(Incoming {
                    slots,
                    ready: ready_rx,
                    returned: returned_tx,
                });
            }
        }
        members
    }
}

/// How long a receive spins before it sleeps, when every rank has a core.
const RECEIVE_SPIN: Duration = Duration::from_millis(50);

/// A slot's buffer, whether or not a thread panicked holding it (the data is plain floats).
fn lock(slot: &Mutex<Vec<f32>>) -> std::sync::MutexGuard<'_, Vec<f32>> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

impl Peers for LocalPeers {
    fn send(&mut self, to: usize, data: &[f32]) -> Result<()> {
        let rank = self.rank;
        let Some(link) = self.outgoing.get_mut(to).and_then(Option::as_mut) else {
            bail!("rank {rank} has no link to rank {to}");
        };
        let stopped = || anyhow!("{PEER_STOPPED}: rank {to} no longer receives");
        while let Ok(at) = link.returned.try_recv() {
            link.free.push(at);
        }
        link.longest = link.longest.max(data.len());
        for &at in &link.free {
            let mut slot = lock(&link.slots[at]);
            let missing = link.longest.saturating_sub(slot.len());
            slot.reserve(missing);
        }
        let at = match link.free.pop() {
            Some(at) => at,
            None => link.returned.recv().map_err(|_| stopped())?,
        };
        {
            let mut slot = lock(&link.slots[at]);
            slot.clear();
            slot.extend_from_slice(data);
        }
        link.ready.send(at).map_err(|_| stopped())
    }

    fn recv(&mut self, from: usize, out: &mut Vec<f32>) -> Result<()> {
        let rank = self.rank;
        let Some(link) = self.incoming.get(from).and_then(Option::as_ref) else {
            bail!("rank {rank} has no link from rank {from}");
        };
        let stopped = || anyhow!("{PEER_STOPPED}: rank {from} stopped before sending");
        let start = Instant::now();
        let at = loop {
            match link.ready.try_recv() {
                Ok(at) => break at,
                Err(TryRecvError::Disconnected) => return Err(stopped()),
                Err(TryRecvError::Empty) if start.elapsed() < self.spin => std::hint::spin_loop(),
                Err(TryRecvError::Empty) => break link.ready.recv().map_err(|_| stopped())?,
            }
        };
        {
            let slot = lock(&link.slots[at]);
            out.clear();
            out.extend_from_slice(&slot);
        }
        // Never full (it holds at most every slot); when the sender is gone, no matter.
        let _ = link.returned.try_send(at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_arrive_in_order_and_a_stopped_peer_is_an_error() {
        let mut peers = LocalPeers::create(3);
        let mut out = Vec::new();
        peers[0].send(2, &[1.0, 2.0]).unwrap();
        peers[0].send(2, &[3.0]).unwrap();
        peers[1].send(2, &[4.0]).unwrap();
        peers[2].recv(1, &mut out).unwrap();
        assert_eq!(out, [4.0]);
        peers[2].recv(0, &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0]);
        peers[2].recv(0, &mut out).unwrap();
        assert_eq!(out, [3.0]);
        assert!(peers[0].send(0, &[1.0]).is_err(), "no link to itself");
        let mut rank1 = peers.remove(1);
        drop(peers);
        let err = rank1.recv(0, &mut out).unwrap_err().to_string();
        assert!(
            err.contains(PEER_STOPPED) && err.contains("rank 0"),
            "{err}"
        );
    }
}

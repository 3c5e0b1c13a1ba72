//! Pinning rank threads to cores, so ranks do not migrate and fight over caches.

/// Pins the calling thread to `core` (an OS cpu id); silently does nothing where the OS
/// does not allow it.
pub fn pin_to_core(core: usize) {
    if let Some(id) = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.id == core)
    {
        core_affinity::set_for_current(id);
    }
}

/// The OS cpu ids this process may run on.
pub fn available_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// Assigns `threads_per_rank` distinct cores to each of `tp` ranks when there are enough;
/// otherwise no pinning (an empty list per rank): oversubscribed pinning would only hurt.
pub fn assign_cores(tp: usize, threads_per_rank: usize) -> Vec<Vec<usize>> {
    let cores = available_cores();
    if cores.len() < tp * threads_per_rank {
        return vec![vec![]; tp];
    }
    (0..tp)
        .map(|r| cores[r * threads_per_rank..(r + 1) * threads_per_rank].to_vec())
        .collect()
}

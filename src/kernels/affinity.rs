//! Pinning rank threads to cores, so ranks do not migrate and fight over caches.

/// Pins the calling thread to `core` (an OS cpu id); silently does nothing where the OS
/// does not allow it. (Not checked against the thread's current cores: a thread started
/// by a pinned thread inherits its single core and must still be able to move.)
pub fn pin_to_core(core: usize) {
    core_affinity::set_for_current(core_affinity::CoreId { id: core });
}

/// The OS cpu ids this process may run on.
pub fn available_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// Assigns `threads_per_rank` distinct cores to each of `tp` ranks, from `allowed` (or all
/// the process may use), when there are enough; otherwise no pinning (an empty list per
/// rank): oversubscribed pinning would only hurt.
pub fn assign_cores(
    tp: usize,
    threads_per_rank: usize,
    allowed: Option<&[usize]>,
) -> Vec<Vec<usize>> {
    let cores = match allowed {
        Some(list) => list.to_vec(),
        None => available_cores(),
    };
    if cores.len() < tp * threads_per_rank {
        return vec![vec![]; tp];
    }
    (0..tp)
        .map(|r| cores[r * threads_per_rank..(r + 1) * threads_per_rank].to_vec())
        .collect()
}

/// Parses a core list such as `0-3,8,10-11`.
pub fn parse_cpu_list(text: &str) -> anyhow::Result<Vec<usize>> {
    let mut cores = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parse = |s: &str| {
            s.trim().parse::<usize>().map_err(|_| {
                anyhow::anyhow!("`{part}` in --cpus is not a core number or a range like 0-7")
            })
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (parse(a)?, parse(b)?);
                if a > b {
                    anyhow::bail!("the range `{part}` in --cpus runs backwards");
                }
                cores.extend(a..=b);
            }
            None => cores.push(parse(part)?),
        }
    }
    if cores.is_empty() {
        anyhow::bail!("--cpus names no cores");
    }
    let available = available_cores();
    if let Some(c) = cores
        .iter()
        .find(|c| !available.is_empty() && !available.contains(c))
    {
        anyhow::bail!(
            "core {c} of --cpus is not available to this process (it may use {available:?})"
        );
    }
    cores.sort_unstable();
    cores.dedup();
    Ok(cores)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_lists() {
        let cores = super::available_cores();
        if cores.len() >= 2 {
            let list = format!("{}-{}", cores[0], cores[1]);
            assert_eq!(
                super::parse_cpu_list(&list).unwrap(),
                vec![cores[0], cores[1]]
            );
        }
        assert!(super::parse_cpu_list("3-1").is_err());
        assert!(super::parse_cpu_list("x").is_err());
        assert!(super::parse_cpu_list("100000").is_err());
    }
}

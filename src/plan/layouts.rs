//! The seed's comparison of tensor, pipeline and data parallelism for one model and device:
//! every layout (tp, pp, dp) on paper — memory per rank, stage balance, bytes each token
//! moves, and the decode speed a memory-bound step allows.
//!
//! The model of a decode step (the same as `tpserve plan`'s for tp): a stage reads its
//! rank's weights and KV cache at the device's memory bandwidth and all-reduces twice a
//! layer; stages hand hidden states on (f32, point to point). A replica's batch is cut into
//! m micro-batches, so a step takes (m + stages − 1) stage times of a micro-batch (GPipe's
//! fill and drain, as tpserve's engine runs it); m is the best of 1..=stages. In this
//! memory-bound model each micro-batch reads the stage's weights again, so one micro-batch
//! wins: pipeline stages fit a model and move few bytes, they do not speed decode up
//! (compute-bound steps, such as long prefills, are where micro-batches pay). Ranks are
//! numbered with tp innermost: a TP group sits on one node whenever tp ≤ devices per node.

use super::{kv_bytes_per_token, stage_weights, Link, PlanRequest, RankWeights, HEADROOM};
use crate::shard::Stage;
use anyhow::Result;

/// A layout to weigh: tp ranks per stage, pp stages per replica, dp replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Layout {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
}

/// Several nodes: devices per node, and the link between nodes.
#[derive(Debug, Clone)]
pub struct Nodes {
    pub devices_per_node: usize,
    pub link: Link,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LayoutRow {
    #[serde(flatten)]
    pub layout: Layout,
    pub devices: usize,
    /// The most any rank holds.
    pub weight_bytes_per_rank: usize,
    pub fits: bool,
    /// Layers of the smallest and the largest stage.
    pub stage_layers: (usize, usize),
    /// Bytes a token's activations all-reduce over a whole forward pass (every stage).
    pub all_reduce_bytes_per_token: usize,
    /// Bytes a token's hidden state crosses between stages.
    pub p2p_bytes_per_token: usize,
    /// Whether a TP group or a stage boundary crosses nodes.
    pub crosses_nodes: bool,
    /// Time per output token of one request alone (batch 1).
    pub ms_per_token_alone: f64,
    /// Output tokens/s of all replicas, each decoding the request's batch.
    pub tokens_per_s: f64,
    /// Micro-batches a step of the batch is best cut into.
    pub micro_batches: usize,
    pub tokens_per_s_per_device: f64,
}

/// Every layout of `layouts` for the request's model, device, context and batch (the batch
/// is per replica). `nodes`: where devices span several nodes.
pub fn compare(
    req: &PlanRequest,
    layouts: &[Layout],
    nodes: Option<&Nodes>,
) -> Result<Vec<LayoutRow>> {
    layouts.iter().map(|&l| row(req, l, nodes)).collect()
}

fn row(req: &PlanRequest, layout: Layout, nodes: Option<&Nodes>) -> Result<LayoutRow> {
    let cfg = req.cfg;
    let Layout { tp, pp, dp } = layout;
    let stages: Vec<Stage> = (0..pp)
        .map(|s| Stage::new(cfg.num_layers, pp, s))
        .collect::<Result<_>>()?;
    let node_of = |rank: usize| nodes.map_or(0, |n| rank / n.devices_per_node);
    // The links a TP group and a stage boundary use (ranks numbered tp innermost).
    let tp_link = match nodes {
        Some(n) if node_of(0) != node_of(tp - 1) => &n.link,
        _ => &req.link,
    };
    let boundary_link = |s: usize| match nodes {
        Some(n) if node_of(s * tp) != node_of((s + 1) * tp) => &n.link,
        _ => &req.link,
    };
    let crosses_nodes = nodes.is_some()
        && (node_of(0) != node_of(tp - 1)
            || (0..pp - 1).any(|s| node_of(s * tp) != node_of((s + 1) * tp)));
    let usable = req.device_memory as f64 * (1.0 - HEADROOM);
    let context = req.context_length;
    let mut heaviest = 0;
    let mut fits = true;
    // Per stage: (weight bytes, KV bytes per token) of its heaviest rank.
    let mut per_stage = Vec::new();
    for stage in &stages {
        let mut worst = (RankWeights::default(), 0);
        for rank in 0..tp {
            let w = stage_weights(cfg, req.src, tp, rank, stage)?;
            let kv = kv_bytes_per_token(cfg, req.src, tp, rank, req.kv_bytes)? / cfg.num_layers
                * stage.layers.len();
            if w.total + kv > worst.0.total + worst.1 {
                worst = (w, kv);
            }
        }
        heaviest = heaviest.max(worst.0.total);
        fits &= (worst.0.total + worst.1 * context * req.batch_size) as f64 <= usable;
        per_stage.push(worst);
    }
    let stage_s = |s: usize, batch: usize| {
        let (w, kv) = per_stage[s];
        let weights = w.read_per_step(cfg, batch);
        let read = (weights + kv * context * batch) as f64 / (req.link.memory_gbps * 1e9);
        let reduce = cfg.hidden_size * batch * req.comm_bytes;
        read + 2.0 * stages[s].layers.len() as f64 * tp_link.all_reduce_s(tp, reduce)
    };
    let hop_s = |s: usize, batch: usize| {
        let link = boundary_link(s);
        link.latency_us * 1e-6 + (cfg.hidden_size * 4 * batch) as f64 / (link.gbps * 1e9)
    };
    // One step of `batch` sequences cut into `micro` micro-batches.
    let step_s = |batch: usize, micro: usize| {
        let each = batch.div_ceil(micro);
        let slowest = (0..pp).map(|s| stage_s(s, each)).fold(0.0, f64::max);
        let hops: f64 = (0..pp - 1).map(|s| hop_s(s, each)).sum();
        let through: f64 = (0..pp).map(|s| stage_s(s, each)).sum::<f64>() + hops;
        through + (micro - 1) as f64 * slowest
    };
    let batch = req.batch_size;
    let (step, micro_batches) =
        (1..=batch.min(pp))
            .map(|m| (step_s(batch, m), m))
            .fold(
                (f64::INFINITY, 1),
                |best, x| if x.0 < best.0 { x } else { best },
            );
    let tokens_per_s = dp as f64 * batch as f64 / step;
    let devices = tp * pp * dp;
    let layers: Vec<usize> = stages.iter().map(|s| s.layers.len()).collect();
    Ok(LayoutRow {
        layout,
        devices,
        weight_bytes_per_rank: heaviest,
        fits,
        stage_layers: (
            *layers.iter().min().expect("a stage"),
            *layers.iter().max().expect("a stage"),
        ),
        all_reduce_bytes_per_token: if tp > 1 {
            2 * cfg.hidden_size * req.comm_bytes * cfg.num_layers
        } else {
            0
        },
        p2p_bytes_per_token: (pp - 1) * cfg.hidden_size * 4,
        crosses_nodes,
        ms_per_token_alone: step_s(1, 1) * 1e3,
        tokens_per_s,
        micro_batches,
        tokens_per_s_per_device: tokens_per_s / devices as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{preset, ShapeSource, WeightDtype};

    fn request<'a>(cfg: &'a crate::loader::ModelConfig, src: &'a ShapeSource) -> PlanRequest<'a> {
        PlanRequest {
            cfg,
            src,
            device_memory: 80_000_000_000,
            devices: vec![8],
            context_length: 4096,
            batch_size: 16,
            link: Link::parse("nvlink").unwrap(),
            kv_bytes: 2,
            comm_bytes: 2,
        }
    }

    /// The seed's trade-offs, on llama-3.1-70b over 8 and 16 devices: tp is fastest for one
    /// request; pp moves far fewer bytes per token than tp; dp serves more per device
    /// where a replica fits; and tp across nodes pays the slow link that pp avoids.
    #[test]
    fn layouts_show_the_seeds_trade_offs() {
        let cfg = preset("llama-3.1-70b").unwrap();
        let src = ShapeSource::new(cfg.clone(), WeightDtype::Bf16);
        let req = request(&cfg, &src);
        let l = |tp, pp, dp| Layout { tp, pp, dp };
        let rows = compare(
            &req,
            &[l(8, 1, 1), l(1, 8, 1), l(4, 2, 1), l(4, 1, 2)],
            None,
        )
        .unwrap();
        let (tp8, pp8, tp4pp2, dp2) = (&rows[0], &rows[1], &rows[2], &rows[3]);
        assert!(tp8.ms_per_token_alone < tp4pp2.ms_per_token_alone);
        assert!(tp4pp2.ms_per_token_alone < pp8.ms_per_token_alone);
        assert!(pp8.p2p_bytes_per_token < tp8.all_reduce_bytes_per_token / 10);
        assert_eq!(pp8.stage_layers, (10, 10));
        // Each rank of pp 8 holds about an eighth of the model, like tp 8.
        let ratio = pp8.weight_bytes_per_rank as f64 / tp8.weight_bytes_per_rank as f64;
        assert!((0.8..1.3).contains(&ratio), "{ratio}");
        assert!(dp2.fits && dp2.tokens_per_s_per_device > tp8.tokens_per_s_per_device);

        let nodes = Nodes {
            devices_per_node: 8,
            link: Link::parse("ethernet").unwrap(),
        };
        let rows = compare(&req, &[l(16, 1, 1), l(8, 2, 1)], Some(&nodes)).unwrap();
        assert!(rows.iter().all(|r| r.crosses_nodes));
        assert!(
            rows[1].tokens_per_s > rows[0].tokens_per_s,
            "pp across nodes beats tp across nodes: {rows:?}"
        );
    }
}

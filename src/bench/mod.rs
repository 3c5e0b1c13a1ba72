//! Measurements a user runs to see where the time goes: memory bandwidth, and one batch's
//! prefill and decode through the whole engine (`tpserve bench`).

pub mod bandwidth;
pub mod one_batch;
